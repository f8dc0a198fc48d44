"""Sparse lazy steps against their bytes bound, torch's sparse optimizers and the
torch adapter, in one interleaved run; and where a step's time goes.

``python bench/sparse_bound.py`` (a few minutes; ``--quick``: seconds)::

    main    1M x 64 float32 table, a fresh batch of 16,384 Zipf(1.2) ids every step
            (fastopt.benchmark.SparseCase's pool: hashed ids, so the hot rows are
            spread over the table): lazy Adam through fastopt (numba, cython), through
            fastopt.torch.Adam on a torch Parameter given the same batches as sparse
            COO gradients (as nn.Embedding(sparse=True) makes them: uncoalesced),
            torch.optim.SparseAdam; sparse Adagrad through fastopt (numba) and
            torch.optim.Adagrad
    big     (``--big``) lazy Adam (numba) on the 1M- and the 16M-row table, the same
            ids (about 13 GB: run it alone)
    stages  the numba step split: the coalescing plan (fastopt.sparse.coalesce_plan), the
            row driver (duplicate sums and updates in one parallel region) and the
            rest (validation, planning, Python), each timed on its own

Each round times every contender ``--reps`` times in turn, the order alternating
from round to round, so a slow phase of a shared machine hits every contender alike.
Reported: median, 10th-90th percentile, ratios of medians, the bytes bound (the
case's bytes over the best of fastopt.benchmark.bandwidth's kernels) and the load
average.  Nothing is asserted; ``--json`` writes the numbers.
"""

import argparse
import json
import os
import time

import numpy as np
import torch

import fastopt
import fastopt.torch as ft
from fastopt.benchmark import SparseCase
from fastopt.benchmark.bandwidth import measure
from fastopt.sparse import RowSparse


def cycle(step, items):
    k = [0]

    def run():
        step(items[k[0] % len(items)])
        k[0] += 1
    return run


def core(case, backend, rule="Adam", **kw):
    opt = getattr(fastopt, rule)([case.table()], backend=backend, lr=1e-3, **kw)
    return cycle(opt.step, [[RowSparse(i, v)] for i, v in case.batches()])


def coo(case):
    return [torch.sparse_coo_tensor(torch.from_numpy(i)[None], torch.from_numpy(v),
                                    (case.rows, case.dim), check_invariants=False)
            for i, v in case.batches()]


def torch_opt(case, make):
    p = torch.nn.Parameter(torch.from_numpy(case.table()))
    opt = make([p])
    grads = coo(case)

    def set_and_step(g):
        p.grad = g
        opt.step()
    return cycle(set_and_step, grads)


def interleaved(contenders, rounds, reps, warmup=20):
    for step in contenders.values():
        for _ in range(warmup):
            step()
    times = {n: [] for n in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            step = contenders[name]
            for _ in range(reps):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return times


def stats(ts):
    ts = np.asarray(ts) * 1e3
    p10, p50, p90 = np.percentile(ts, [10, 50, 90])
    return dict(median_ms=float(p50), p10_ms=float(p10), p90_ms=float(p90), n=len(ts))


def stages(case, reps):
    """The numba step split into plan, row driver (duplicate sums and updates) and the
    rest (timed through wrappers around fastopt.planner.coalesce_plan and the numba driver
    call)."""
    import fastopt.planner as planner
    from fastopt.backends import numba_cpu as nc
    step = core(case, "numba")
    for _ in range(20):
        step()
    t = {"plan": [], "driver": []}

    def timer(name, fn):
        def run(*a):
            t0 = time.perf_counter()
            out = fn(*a)
            t[name].append(time.perf_counter() - t0)
            return out
        return run
    plan, driver = planner.coalesce_plan, nc._driver

    def timed_driver(*a):
        return timer("driver", driver(*a))
    total = []
    planner.coalesce_plan, nc._driver = timer("plan", plan), timed_driver
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            total.append(time.perf_counter() - t0)
    finally:
        planner.coalesce_plan, nc._driver = plan, driver
    out = {"step": stats(total)}
    rest = np.asarray(total)
    for k, v in t.items():
        if len(v) == len(total):
            out[k] = stats(v)
            rest = rest - np.asarray(v)
    out["rest"] = stats(rest)
    return out


def report(title, times, base, bound_ms=None):
    print(f"\n{title}")
    b = np.median(times[base])
    print(f"  {'contender':<34} {'median ms':>10} {'p10-p90 ms':>15} {'x ' + base:>28}"
          + ("  x bound" if bound_ms else ""))
    out = {}
    for name, ts in times.items():
        s = stats(ts)
        s["vs_base"] = float(np.median(ts) / b)
        if bound_ms:
            s["vs_bound"] = s["median_ms"] / bound_ms
        out[name] = s
        print(f"  {name:<34} {s['median_ms']:>10.3f} {s['p10_ms']:>7.3f}-{s['p90_ms']:<7.3f} "
              f"{s['vs_base']:>28.2f}" + (f"  {s['vs_bound']:7.2f}" if bound_ms else ""))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--big", action="store_true", help="only the 1M vs 16M rows case")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    rounds = a.rounds or (4 if a.quick else 30)
    reps = a.reps or (5 if a.quick else 10)
    rows = 100_000 if a.quick else 1_000_000
    out = dict(load_before=os.getloadavg(), rounds=rounds, reps=reps,
               threads=__import__("numba").get_num_threads())
    bw = measure()
    out["bandwidth_GBps"] = bw
    adam = SparseCase("Adam", rows)
    bound_ms = adam.bytes_per_step() / (bw["bound"] * 1e9) * 1e3
    out["bound_ms"] = bound_ms
    print(f"bandwidth bound {bw['bound']:.1f} GB/s; {adam.bytes_per_step() / 1e6:.1f} MB per "
          f"Adam step ({adam.touched:.0f} unique rows of {adam.lookups}) -> {bound_ms:.3f} ms")
    if a.big:
        big = SparseCase("Adam", 4 * rows if a.quick else 16_000_000)
        times = interleaved({f"numba {fmt(rows)}": core(adam, "numba"),
                             f"numba {fmt(big.rows)}": core(big, "numba")}, rounds, reps)
        out["big"] = report(f"lazy Adam, {fmt(rows)} vs {fmt(big.rows)} rows", times,
                            f"numba {fmt(rows)}")
    else:
        times = interleaved({
            "fastopt-numba": core(adam, "numba"),
            "fastopt-cython": core(adam, "cython"),
            "fastopt.torch.Adam (numba)": torch_opt(
                adam, lambda ps: ft.Adam(ps, lr=1e-3, backend="numba")),
            "torch.optim.SparseAdam": torch_opt(
                adam, lambda ps: torch.optim.SparseAdam(ps, lr=1e-3)),
        }, rounds, reps)
        out["adam"] = report(f"lazy Adam {adam.label}", times, "fastopt-numba", bound_ms)
        ada = SparseCase("Adagrad", rows)
        times = interleaved({
            "fastopt-numba Adagrad": core(ada, "numba", "Adagrad"),
            "fastopt-cython Adagrad": core(ada, "cython", "Adagrad"),
            "torch.optim.Adagrad": torch_opt(ada, lambda ps: torch.optim.Adagrad(ps, lr=1e-3)),
        }, rounds, reps)
        out["adagrad"] = report(f"sparse Adagrad {ada.label}", times, "fastopt-numba Adagrad")
        out["stages"] = stages(adam, rounds * reps)
        print("\nnumba step split (ms, median, p10-p90):")
        for k, s in out["stages"].items():
            print(f"  {k:<8} {s['median_ms']:.3f} ({s['p10_ms']:.3f}-{s['p90_ms']:.3f})")
    out["load_after"] = os.getloadavg()
    print(f"\nload average before {out['load_before']}, after {out['load_after']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


def fmt(n):
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}K"


if __name__ == "__main__":
    main()
