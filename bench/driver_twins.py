"""Do the stored-format drivers run plain float32/float64 as fast as the plain drivers?

Every backend carries two sets of drivers: the plain ones (float32/float64 parameters
and state) and the stored ones (bfloat16 parameters, 16/8-bit state; a load and a
store around the rule math).  The stored drivers can run a plain parameter too: this
script forces a float32/float64 Adam parameter through them with a state format
equal to the plain one (``Storage.native`` False, state "native"), checks that the
result is bit-identical to the plain driver's after a few steps, then times both,
interleaved (the order alternates each round), ``--rounds`` rounds.  Reported: the
median ms per step of each, and the median ratio stored/plain with its 10th-90th
percentile spread.  Nothing asserts a time.

``python bench/driver_twins.py [--backend numba|cython] [--rounds 15]``
"""

import argparse
import time

import numpy as np

import fastopt
from fastopt import storage


class _ForcedStored(storage.Storage):
    """A plain format that the planner takes for a stored one."""

    @property
    def native(self):
        return False


def _make(n, dt, forced, backend):
    p = np.random.default_rng(0).standard_normal(n).astype(dt)
    opt = fastopt.Adam([p], lr=1e-3, backend=backend)
    if forced:
        opt._storage[0] = _ForcedStored(state="native")
    return p, opt


def measure(backend, n, dt, rounds):
    g = np.random.default_rng(1).standard_normal(n).astype(dt) * 1e-2
    pa, a = _make(n, dt, False, backend)
    pb, b = _make(n, dt, True, backend)
    for _ in range(3):
        a.step([g])
        b.step([g])
    same = np.array_equal(pa.view(np.uint8), pb.view(np.uint8)) and all(
        np.array_equal(a.state[0][k], b.state[0][k]) for k in ("exp_avg", "exp_avg_sq"))
    reps = max(1, 20_000_000 // n)
    ta, tb = [], []
    for r in range(rounds):
        order = ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))
        for opt, out in order:
            t0 = time.perf_counter()
            for _ in range(reps):
                opt.step([g])
            out.append((time.perf_counter() - t0) / reps)
    ratio = np.array(tb) / np.array(ta)
    return dict(backend=backend, dtype=np.dtype(dt).name, n=n, plain_ms=np.median(ta) * 1e3,
                stored_ms=np.median(tb) * 1e3, ratio=float(np.median(ratio)),
                p10=float(np.percentile(ratio, 10)), p90=float(np.percentile(ratio, 90)),
                bit_identical=bool(same))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", action="append", choices=["numba", "cython"])
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    print("| backend | dtype | elements | plain ms | stored ms | stored/plain [p10, p90] "
          "| bit-identical |\n|---|---|---:|---:|---:|---|---|")
    for backend in args.backend or ["numba", "cython"]:
        for dt in (np.float32, np.float64):
            for n in (262_144, 10_000_000):
                m = measure(backend, n, dt, args.rounds)
                print(f"| {backend} | {m['dtype']} | {n:,} | {m['plain_ms']:.3f} | "
                      f"{m['stored_ms']:.3f} | {m['ratio']:.3f} [{m['p10']:.3f}, {m['p90']:.3f}] "
                      f"| {m['bit_identical']} |", flush=True)


if __name__ == "__main__":
    main()
