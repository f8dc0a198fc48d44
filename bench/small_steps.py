"""Per-step overhead of small steps: the Python around a kernel of about a microsecond.

Cases (float32 Adam, lr 1e-3, gradients set once, plans cached)::

    10 x 100     ten tensors of 100 elements
    1 x 1K       one tensor of 1,000 elements

Contenders: fastopt's numba and cython backends, ``torch.optim.Adam(fused=True)``
(when torch is installed) and, with ``--before PATH``, the fastopt of another
source tree (built in place: ``python setup.py build_ext --inplace``) run in a
subprocess of its own, in the same interleaved rounds.  Each round times every
contender ``--reps`` steps in turn; the order rotates from round to round.  Reported:
median and best microseconds per step over the rounds, the spread (IQR / median),
and the ratio of torch fused's median to each contender's.  Nothing here asserts a
time.  ``python bench/small_steps.py [--before /tmp/before] [--json out.json]``.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

CASES = [(10, 100), (1, 1000)]

_CHILD = r"""
import sys, time, numpy as np
sys.path.insert(0, sys.argv[1])
import fastopt
backend, n, size, reps = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
ps = [np.zeros(size, np.float32) for _ in range(n)]
gs = [np.ones(size, np.float32) for _ in range(n)]
opt = fastopt.Adam(ps, lr=1e-3, backend=backend)
for _ in range(300):
    opt.step(gs)
for line in sys.stdin:
    t0 = time.perf_counter()
    for _ in range(reps):
        opt.step(gs)
    print((time.perf_counter() - t0) / reps * 1e6, flush=True)
"""


def _fastopt(backend, n, size):
    import fastopt
    ps = [np.zeros(size, np.float32) for _ in range(n)]
    gs = [np.ones(size, np.float32) for _ in range(n)]
    opt = fastopt.Adam(ps, lr=1e-3, backend=backend)
    for _ in range(300):
        opt.step(gs)
    return lambda: opt.step(gs)


def _torch_fused(n, size):
    import torch
    ps = [torch.zeros(size, requires_grad=True) for _ in range(n)]
    for p in ps:
        p.grad = torch.ones(size)
    opt = torch.optim.Adam(ps, lr=1e-3, fused=True)
    for _ in range(300):
        opt.step()
    return opt.step


class _Before:
    """A contender stepping in a child process (another fastopt tree)."""

    def __init__(self, path, backend, n, size, reps):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, path, backend, str(n), str(size), str(reps)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def round(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run(before=None, rounds=15, reps=2000, backends=("numba", "cython")):
    import fastopt
    out = []
    for n, size in CASES:
        local = {f"fastopt-{b}": _fastopt(b, n, size) for b in backends
                 if b in fastopt.available_backends()}
        try:
            local["torch-fused"] = _torch_fused(n, size)
        except ImportError:
            pass
        remote = {f"before-{b}": _Before(before, b, n, size, reps) for b in backends} \
            if before else {}
        names = list(local) + list(remote)
        times = {k: [] for k in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for k in order:
                if k in remote:
                    times[k].append(remote[k].round())
                else:
                    f = local[k]
                    t0 = time.perf_counter()
                    for _ in range(reps):
                        f()
                    times[k].append((time.perf_counter() - t0) / reps * 1e6)
        for c in remote.values():
            c.close()
        ref = np.median(times["torch-fused"]) if "torch-fused" in times else None
        for k in names:
            t = np.asarray(times[k])
            q1, med, q3 = np.percentile(t, [25, 50, 75])
            out.append(dict(case=f"Adam {n}x{size} float32", contender=k, median_us=med,
                            best_us=t.min(), spread=(q3 - q1) / med,
                            torch_fused_over_this=(ref / med) if ref else None))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="another fastopt source tree (built in place)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = run(args.before, args.rounds, args.reps)
    print(f"{os.cpu_count()} CPUs; median and best us per step over {args.rounds} "
          f"interleaved rounds of {args.reps} steps")
    print(f"{'case':<22} {'contender':<16} {'median':>8} {'best':>8} {'spread':>7} "
          f"{'torch-fused/this':>17}")
    for r in rows:
        ratio = f"{r['torch_fused_over_this']:.1f}x" if r["torch_fused_over_this"] else ""
        print(f"{r['case']:<22} {r['contender']:<16} {r['median_us']:8.2f} "
              f"{r['best_us']:8.2f} {r['spread']:7.0%} {ratio:>17}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
