"""Muon: fastopt against torch.optim.Muon, and the machine's float32 GEMM rate.

The case (issue 21): six 1024x1024 and two 1024x4096 float32 matrices, one Muon
step (defaults: momentum 0.95, Nesterov, 5 Newton-Schulz iterations).  A Muon step
is compute-bound: its Newton-Schulz iterations are matrix products, so the ceiling
is the machine's GEMM rate, not its memory bandwidth (``fastopt bench`` measures
memory-bound steps against a STREAM ceiling; this is a script of its own for that
reason).  Measured in the same run, in interleaved rounds (every contender once
per round, the order rotating), so load on a shared machine hits all alike:

* ``gemm``: NumPy float32 ``A @ B`` of 1024x1024 by 1024x4096 (8.6 GFLOP), the
  machine's GEMM rate (GFLOP/s) through the BLAS NumPy links;
* ``fastopt``: ``fastopt.Muon.step`` (numba backend, ns_dtype None: float32);
* ``fastopt-bf16``: the same with ``ns_dtype="bfloat16"`` (torch's bfloat16 GEMM);
* ``torch-bf16``: ``torch.optim.Muon.step`` as shipped (Newton-Schulz in bfloat16);
* ``torch-f32``: the same with its Newton-Schulz kept in float32 (the comparison of
  equal work).

Flops of a step: per matrix (m <= n after the transpose) and iteration, ``X X^T``
is ``2 m^2 n`` nominal GEMM flops (NumPy runs it as ``?syrk``: half of them),
``A A`` ``2 m^3`` and ``P X`` ``2 m^2 n``.  Reported: ms per step (best, median,
10th-90th percentile spread over the rounds), fastopt's Newton-Schulz rate in
nominal GFLOP/s (every product counted as a GEMM) and in executed GFLOP/s (the
syrk counted as what it does), and each as a fraction of the GEMM rate of the same
round (median over rounds).  Nothing here asserts a time.

``python bench/muon_bench.py [--rounds 7] [--json out.json]``; threads: the
environment's (OPENBLAS_NUM_THREADS, torch.get_num_threads()).
"""

import argparse
import json
import platform
import time

import numpy as np

import fastopt

SHAPES = [(1024, 1024)] * 6 + [(1024, 4096)] * 2
NS_STEPS = 5


def ns_flops(shapes, steps=NS_STEPS):
    nominal = executed = 0
    for a, b in shapes:
        m, n = min(a, b), max(a, b)
        nominal += steps * (4 * m * m * n + 2 * m ** 3)
        executed += steps * (3 * m * m * n + 2 * m ** 3)
    return nominal, executed


def pct(xs, q):
    return float(np.percentile(xs, q))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) * 0.02 for s in SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    a = rng.standard_normal((1024, 1024)).astype(np.float32)
    b = rng.standard_normal((1024, 4096)).astype(np.float32)
    gemm_flops = 2 * 1024 * 1024 * 4096

    fo = fastopt.Muon([p.copy() for p in params], lr=0.02, backend="numba")
    g = [x.copy() for x in grads]
    fo.step(g)                                        # compile, allocate state

    contenders = {"gemm": lambda: a @ b, "fastopt": lambda: fo.step(g)}
    try:
        import torch
        fb = fastopt.Muon([p.copy() for p in params], lr=0.02, backend="numba",
                          ns_dtype="bfloat16")
        fb.step(g)
        contenders["fastopt-bf16"] = lambda: fb.step(g)
        import torch.optim._muon as tm
        shipped = tm._zeropower_via_newtonschulz

        from fastopt.benchmark.torch_peers import newton_schulz_same_dtype as same_dtype

        def torch_opt():
            tp = [torch.tensor(p.copy(), requires_grad=True) for p in params]
            for t, x in zip(tp, grads):
                t.grad = torch.from_numpy(x.copy())
            return torch.optim.Muon(tp, lr=0.02)
        t_bf16, t_f32 = torch_opt(), torch_opt()

        def run_bf16():
            tm._zeropower_via_newtonschulz = shipped
            t_bf16.step()

        def run_f32():
            tm._zeropower_via_newtonschulz = same_dtype
            try:
                t_f32.step()
            finally:
                tm._zeropower_via_newtonschulz = shipped
        run_bf16()
        run_f32()
        contenders["torch-bf16"] = run_bf16
        contenders["torch-f32"] = run_f32
        torch_threads = torch.get_num_threads()
    except ImportError:
        torch_threads = None

    names = list(contenders)
    times = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            t0 = time.perf_counter()
            contenders[n]()
            times[n].append(time.perf_counter() - t0)

    nominal, executed = ns_flops(SHAPES)
    gemm_rate = [gemm_flops / t / 1e9 for t in times["gemm"]]
    nom_rate = [nominal / t / 1e9 for t in times["fastopt"]]
    exe_rate = [executed / t / 1e9 for t in times["fastopt"]]
    frac_nom = [x / y for x, y in zip(nom_rate, gemm_rate)]
    frac_exe = [x / y for x, y in zip(exe_rate, gemm_rate)]
    out = {
        "case": "Muon 6x1024x1024 + 2x1024x4096 float32, 5 NS steps",
        "machine": platform.processor() or platform.machine(),
        "rounds": args.rounds, "torch_threads": torch_threads,
        "ms": {n: {"best": 1e3 * min(v), "median": 1e3 * float(np.median(v)),
                   "p10": 1e3 * pct(v, 10), "p90": 1e3 * pct(v, 90)} for n, v in times.items()},
        "gemm_gflops": {"best": max(gemm_rate), "median": float(np.median(gemm_rate)),
                        "p10": pct(gemm_rate, 10), "p90": pct(gemm_rate, 90)},
        "ns_gflops_nominal": float(np.median(nom_rate)),
        "ns_gflops_executed": float(np.median(exe_rate)),
        "fraction_of_gemm_nominal": {"median": float(np.median(frac_nom)),
                                     "p10": pct(frac_nom, 10), "p90": pct(frac_nom, 90)},
        "fraction_of_gemm_executed": {"median": float(np.median(frac_exe)),
                                      "p10": pct(frac_exe, 10), "p90": pct(frac_exe, 90)},
        "nominal_gflop_per_step": nominal / 1e9, "executed_gflop_per_step": executed / 1e9,
    }
    print(out["case"], f"({args.rounds} interleaved rounds)")
    print(f"{'':12s} {'best ms':>9s} {'median ms':>10s} {'p10-p90 ms':>18s}")
    for n, v in out["ms"].items():
        print(f"{n:12s} {v['best']:9.1f} {v['median']:10.1f} {v['p10']:8.1f}-{v['p90']:<8.1f}")
    gr = out["gemm_gflops"]
    print(f"GEMM rate (NumPy float32 1024x1024 @ 1024x4096): median {gr['median']:.1f} GFLOP/s "
          f"(p10-p90 {gr['p10']:.1f}-{gr['p90']:.1f}, best {gr['best']:.1f})")
    print(f"fastopt Newton-Schulz: {nominal / 1e9:.0f} nominal GFLOP/step, "
          f"{out['ns_gflops_nominal']:.1f} GFLOP/s = "
          f"{out['fraction_of_gemm_nominal']['median']:.2f} of the GEMM rate "
          f"(p10-p90 {out['fraction_of_gemm_nominal']['p10']:.2f}-"
          f"{out['fraction_of_gemm_nominal']['p90']:.2f}); executed (syrk at half): "
          f"{out['ns_gflops_executed']:.1f} GFLOP/s = "
          f"{out['fraction_of_gemm_executed']['median']:.2f} "
          f"(p10-p90 {out['fraction_of_gemm_executed']['p10']:.2f}-"
          f"{out['fraction_of_gemm_executed']['p90']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
