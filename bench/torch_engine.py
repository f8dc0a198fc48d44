"""fastopt.torch over the engine: its step time against the core optimizer on the same
tensors, torch's fused AdamW and (``--before PATH``) the fastopt.torch of another
source tree, run in a child process, all in the same interleaved rounds.

Cases (float32, gradients set once, plans cached)::

    dense   300 x nn.Linear(256, 256) (600 tensors, 19.7M parameters), AdamW
    small   10 tensors of 100 elements, Adam
    sparse  nn.Embedding(100_000, 64, sparse=True), one batch of 16,384 Zipf(1.2)
            ids (its sparse gradient set once), Adam (lazy); torch: SparseAdam

Each round times every contender ``--reps`` steps in turn (the order rotates from
round to round); reported: median and best per-step time over the rounds and the
spread (10th-90th percentile).  ``--paired N``: besides, N pairs of one
fastopt.torch step and one core step on the same sizes (order alternating), and the
median and 10th-90th percentiles of the per-pair ratio: the facade's overhead,
robust to a shared machine's slow phases.  ``python bench/torch_engine.py [--before PATH]``;
nothing here asserts a time.
"""

import argparse
import json
import subprocess
import sys
import time

import numpy as np

_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import torch, fastopt.torch as ft
case, reps = sys.argv[2], int(sys.argv[3])
sys.path.insert(0, sys.argv[4])
from torch_engine import make_params
ps = make_params(case)
opt = (ft.AdamW if case == "dense" else ft.Adam)(ps, lr=1e-3)
for _ in range(20):
    opt.step()
print("ready", flush=True)
for line in sys.stdin:
    t0 = time.perf_counter()
    for _ in range(reps):
        opt.step()
    print((time.perf_counter() - t0) / reps, flush=True)
"""


def make_params(case):
    import torch
    torch.manual_seed(0)
    if case == "dense":
        ps = [p for _ in range(300) for p in torch.nn.Linear(256, 256).parameters()]
    elif case == "sparse":
        emb = torch.nn.Embedding(100_000, 64, sparse=True)
        rng = np.random.default_rng(0)
        ids = torch.from_numpy(np.minimum(rng.zipf(1.2, 16384) - 1, 99_999))
        emb(ids).sum().backward()
        return [emb.weight]
    else:
        ps = [torch.nn.Parameter(torch.randn(100)) for _ in range(10)]
    for p in ps:
        p.grad = torch.randn_like(p) * 1e-3
    return ps


def contenders(case, reps, before):
    import torch
    import fastopt
    import fastopt.torch as ft
    out = {}
    name = "AdamW" if case == "dense" else "Adam"
    ps = make_params(case)
    opt = getattr(ft, name)(ps, lr=1e-3)
    out["fastopt.torch (after)"] = opt.step
    qs = make_params(case)
    arrays = [q.detach().numpy() for q in qs]
    if case == "sparse":
        g = qs[0].grad
        grads = [fastopt.RowSparse(g._indices()[0].numpy(), g._values().numpy())]
    else:
        grads = [q.grad.numpy() for q in qs]
    core = fastopt.CLASSES[name](arrays, lr=1e-3)
    out["core fastopt (same tensors)"] = lambda: core.step(grads)
    rs = make_params(case)
    if case == "sparse":
        out["torch.optim.SparseAdam"] = torch.optim.SparseAdam(rs, lr=1e-3).step
    else:
        out["torch.optim fused"] = getattr(torch.optim, name)(rs, lr=1e-3, fused=True).step
    if before:
        out["fastopt.torch (before)"] = _Child(before, case, reps)
    return out


class _Child:
    def __init__(self, path, case, reps):
        import os
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, path, case, str(reps), here],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def round(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())


def run(case, rounds, reps, before):
    cs = contenders(case, reps, before)
    for c in cs.values():
        if not isinstance(c, _Child):
            for _ in range(20):
                c()
    names = list(cs)
    times = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            c = cs[n]
            if isinstance(c, _Child):
                times[n].append(c.round())
            else:
                t0 = time.perf_counter()
                for _ in range(reps):
                    c()
                times[n].append((time.perf_counter() - t0) / reps)
    return times


def paired(case, n):
    """Per-pair ratio of a fastopt.torch step to a core step (same sizes)."""
    cs = contenders(case, 1, None)
    a, b = cs["fastopt.torch (after)"], cs["core fastopt (same tensors)"]
    for _ in range(20):
        a()
        b()
    ratios = []
    for k in range(n):
        first, second = (a, b) if k % 2 == 0 else (b, a)
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        ta, tb = (t1 - t0, t2 - t1) if k % 2 == 0 else (t2 - t1, t1 - t0)
        ratios.append(ta / tb)
    return np.array(ratios)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--before", help="another source tree (its fastopt.torch)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json")
    ap.add_argument("--cases", default="dense,small,sparse")
    ap.add_argument("--paired", type=int, default=0)
    args = ap.parse_args(argv)
    import torch
    result = {}
    if args.paired:
        for case in args.cases.split(","):
            r = paired(case, args.paired)
            p10, p90 = np.percentile(r, [10, 90])
            print(f"{case}: fastopt.torch / core per pair, {args.paired} pairs: median "
                  f"{np.median(r):.3f}, p10-p90 {p10:.3f}-{p90:.3f}")
            result[f"{case}-paired"] = list(r)
    for case in args.cases.split(",") if args.rounds else ():
        reps = {"dense": 5, "sparse": 20}.get(case, 2000)
        times = run(case, args.rounds, reps, args.before)
        unit, scale = ("us", 1e6) if case == "small" else ("ms", 1e3)
        print(f"\n{case} ({args.rounds} rounds x {reps} steps; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads)")
        ref = np.median(times["fastopt.torch (after)"])
        for n, t in times.items():
            t = np.array(t)
            p10, p90 = np.percentile(t, [10, 90])
            print(f"  {n:30s} median {np.median(t) * scale:9.2f} {unit}  best "
                  f"{t.min() * scale:9.2f}  p10-p90 {p10 * scale:.2f}-{p90 * scale:.2f}  "
                  f"median/after {np.median(t) / ref:.2f}")
        result[case] = {n: list(t) for n, t in times.items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
