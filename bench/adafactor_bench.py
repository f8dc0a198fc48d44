"""fastopt.Adafactor against torch.optim.Adafactor, interleaved on one machine.

Two cases, float32, default hyperparameters (lr 1e-2, beta2_decay -0.8, eps (None,
1e-3), d 1, no weight decay):

* ``linear300``: 300 x Linear(256, 256), weights (256, 256) and biases (256,): 600
  tensors, 19.7M elements;
* ``big``: one (4096, 4096) matrix, 16.8M elements.

Contenders: ``fastopt-numba``, ``fastopt-cython`` and torch's two implementations,
``torch-foreach`` (``foreach=True``) and ``torch-single`` (the for-loop, torch's
default for Adafactor).  Each round times one step of every contender in an order
that rotates from round to round (so load on a shared machine hits all alike), after
warm-up steps; gradients are fixed (the time of a step does not depend on their
values).  Reported per case and contender: the median ms per step over the rounds
with its 10th-90th percentile spread, and the ratio of torch's fastest
implementation's median to each fastopt contender's.  Nothing here asserts a time.

``python bench/adafactor_bench.py [--rounds 15] [--case linear300 big] [--threads 2]``
"""

import argparse
import time

import numpy as np

CASES = {
    "linear300": [s for _ in range(300) for s in ((256, 256), (256,))],
    "big": [(4096, 4096)],
}
CONTENDERS = ("fastopt-numba", "fastopt-cython", "torch-foreach", "torch-single")


def make(who, shapes, seed=0):
    import torch
    import fastopt
    rng = np.random.default_rng(seed)
    ps = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in shapes]
    gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    if who.startswith("torch"):
        tp = [torch.from_numpy(p).requires_grad_() for p in ps]
        for t, g in zip(tp, gs):
            t.grad = torch.from_numpy(g)
        opt = torch.optim.Adafactor(tp, foreach=who == "torch-foreach")
        return opt.step
    opt = fastopt.Adafactor(ps, backend=who.split("-")[1])
    return lambda: opt.step(gs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--case", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--contender", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (numba and OpenMP: their environment)")
    args = ap.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    for case in args.case:
        steps = {w: make(w, CASES[case]) for w in args.contender}
        for w, step in steps.items():
            for _ in range(args.warmup):
                step()
        times = {w: [] for w in steps}
        order = list(steps)
        for r in range(args.rounds):
            for w in order[r % len(order):] + order[:r % len(order)]:
                t = time.perf_counter()
                steps[w]()
                times[w].append((time.perf_counter() - t) * 1e3)
        med = {w: float(np.median(v)) for w, v in times.items()}
        print(f"\n{case} ({len(CASES[case])} tensors, "
              f"{sum(int(np.prod(s)) for s in CASES[case]):,} elements), {args.rounds} rounds")
        for w, v in times.items():
            lo, hi = np.percentile(v, [10, 90])
            print(f"  {w:15s} median {med[w]:8.1f} ms   (p10 {lo:7.1f}, p90 {hi:7.1f})")
        peers = [w for w in med if w.startswith("torch")]
        if peers:
            best = min(peers, key=med.get)
            for w in med:
                if w.startswith("fastopt"):
                    ratios = np.array(times[best]) / np.array(times[w])
                    lo, hi = np.percentile(ratios, [10, 90])
                    print(f"  {w} vs {best}: {med[best] / med[w]:.2f}x "
                          f"(per-round ratio p10 {lo:.2f}, p90 {hi:.2f})")
        del steps


if __name__ == "__main__":
    main()
