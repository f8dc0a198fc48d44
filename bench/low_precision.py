"""Low-precision storage: step time of every format beside float32, in one run.

    python bench/low_precision.py [--quick] [--json docs/low-precision.json]

Contenders (Adam, one tensor, a fresh gradient each call), timed in interleaved
rounds (fastopt.benchmark.timing): fastopt float32; float32 parameters with 16- and
8-bit state; bfloat16 parameters and gradients with float32 state ("split") and
with 8-bit state ("stochastic" and "split"); torch's fused float32 Adam when torch
is installed.  Two sizes: 10M elements (from memory) and 256K elements (in cache:
the compute cost per element).  For each row: median and spread, elements/s,
bytes moved per element (fastopt.storage.bytes_per_element), GB/s, the fraction of
the machine's bandwidth bound (measured in the same run), and the ratio to
fastopt's float32 step.  From the in-cache compute cost and the bytes, the
expected speed-up where bandwidth per core is scarce is printed (a model, stated
as such).
"""

import argparse
import json
import sys

import numpy as np

import fastopt
from fastopt import storage
from fastopt.benchmark import bandwidth, machine_description, versions
from fastopt.benchmark.timing import time_interleaved

BF = storage.BF16
FORMATS = [
    ("float32", np.float32, np.float32, {}),
    ("f32 params, 16-bit state", np.float32, np.float32, dict(state_bits=16)),
    ("f32 params, 8-bit state", np.float32, np.float32, dict(state_bits=8)),
    ("bf16 params+grads, f32 state, split", BF, BF, {}),
    ("bf16 params+grads, 8-bit state, stochastic", BF, BF,
     dict(state_bits=8, bf16_update="stochastic")),
    ("bf16 params+grads, 8-bit state, split", BF, BF, dict(state_bits=8)),
]


def contenders(n):
    rng = np.random.default_rng(0)
    fns, meta = {}, {}
    for name, pdt, gdt, kw in FORMATS:
        p = (rng.standard_normal(n) * 0.1).astype(pdt)
        grads = [(rng.standard_normal(n) * 0.01).astype(gdt) for _ in range(2)]
        opt = fastopt.Adam([p], lr=1e-4, **kw)
        k = [0]

        def step(opt=opt, grads=grads, k=k):
            k[0] ^= 1
            opt.step([grads[k[0]]])
        step()
        stg = opt._storage[0]
        moved, kept = storage.bytes_per_element(opt.rule, stg, p.dtype, (True, True, False),
                                                gdt)
        fns[name] = step
        meta[name] = dict(bytes=moved, state_bytes=kept)
    try:
        import torch
        tp = torch.randn(n) * 0.1
        tp.grad = torch.randn(n) * 0.01
        topt = torch.optim.Adam([tp], lr=1e-4, fused=True)
        topt.step()
        fns["torch fused Adam (float32)"] = topt.step
        meta["torch fused Adam (float32)"] = dict(bytes=28, state_bytes=8)
    except Exception as exc:       # torch absent: reported, not faked
        print(f"# torch omitted: {exc}", file=sys.stderr)
    return fns, meta


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rounds = 5 if args.quick else 9
    bw = bandwidth.measure()
    out = {"machine": machine_description(), "versions": versions(), "bandwidth": bw,
           "cases": {}}
    for n in (10_000_000, 262_144):
        fns, meta = contenders(n)
        stats = time_interleaved(fns, rounds=rounds, per_round=2,
                                 sample_time=0.03 if n > 1e6 else 0.01)
        base = stats["float32"].median
        rows = []
        for name, s in stats.items():
            b = meta[name]["bytes"]
            rows.append(dict(name=name, median_ms=s.median * 1e3, spread=s.spread,
                             gelem_s=n / s.median / 1e9, bytes=b, state_bytes=meta[name][
                                 "state_bytes"], gb_s=b * n / s.median / 1e9,
                             of_bound=b * n / s.median / 1e9 / bw["bound"],
                             vs_float32=base / s.median, ns_per_elem=s.median / n * 1e9))
        out["cases"][str(n)] = rows
        print(f"\n## Adam, one tensor of {n:,} elements "
              f"(bandwidth bound {bw['bound']:.1f} GB/s)\n")
        print("| format | bytes/elem moved | state bytes/elem | median ms (spread) | "
              "Gelem/s | GB/s | of bound | speed vs fastopt float32 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['name']} | {r['bytes']:.1f} | {r['state_bytes']:.2f} | "
                  f"{r['median_ms']:.3f} ({r['spread']:.0%}) | {r['gelem_s']:.2f} | "
                  f"{r['gb_s']:.1f} | {r['of_bound']:.2f} | {r['vs_float32']:.2f}x |")
    # a model, from this run's numbers: time per element per core = the larger of
    # bytes / (bandwidth per core) and the measured in-cache compute per core
    import numba
    threads = numba.get_num_threads()
    cache = {r["name"]: r for r in out["cases"]["262144"]}
    print("\n## Expected speed-up over float32 where bandwidth is scarce (model)\n")
    print("time/elem/core = max(bytes / (bandwidth per core), in-cache compute "
          f"x {threads} threads measured here)\n")
    print("| format | compute ns/elem/core | 64 cores, 300 GB/s | GPU (bandwidth-bound) |")
    print("|---|---:|---:|---:|")
    per_core = 300e9 / 64
    f32 = cache["float32"]
    t32 = max(f32["bytes"] / per_core * 1e9, f32["ns_per_elem"] * threads)
    model = {}
    for name, r in cache.items():
        if name.startswith("torch"):
            continue
        t = max(r["bytes"] / per_core * 1e9, r["ns_per_elem"] * threads)
        model[name] = dict(compute_ns=r["ns_per_elem"] * threads, server=t32 / t,
                           gpu=f32["bytes"] / r["bytes"])
        print(f"| {name} | {r['ns_per_elem'] * threads:.2f} | {t32 / t:.2f}x | "
              f"{f32['bytes'] / r['bytes']:.2f}x |")
    out["model"] = model
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
