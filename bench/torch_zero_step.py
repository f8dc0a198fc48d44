"""torch's ``ZeroRedundancyOptimizer`` (gloo) on the model of ``bench/mpi_step.py``:
per-rank resident-memory growth and step time, the baseline of the sharded
optimizer's memory target (docs/distributed.md, "Memory").

Run it with torch's launcher (it is a torch.distributed program)::

    python -m torch.distributed.run --nproc_per_node 2 bench/torch_zero_step.py

What it does on every rank: the parameters of ``bench/mpi_step.py`` (``--elements``
float32 in ``--tensors`` tensors of rows of 1024, seed 1) as ``torch.nn.Parameter``
with this rank's gradients (seed 2 + rank) in ``.grad``; a warm-up on a small copy;
then ``VmRSS`` before and after constructing ``ZeroRedundancyOptimizer(params,
torch.optim.Adam)`` and after its first step (the state), and the median of
``--steps`` steps.  A step is what DDP and ZeRO do together: the gradients averaged
in place (``all_reduce`` of each ``.grad``, then divided by the world size), then
``opt.step()`` (the owner's update and the parameters' broadcast).  The gradients
are the caller's (``.grad`` existed before), so they are not in the growth -- as
the sharded optimizer's ``reuse_grads=True`` uses the caller's gradient arrays.
glibc's mmap threshold is fixed as in ``bench/mpi_step.py``.
"""

import argparse
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mpi_step import MiB, fixed_mmap_threshold, make, peak_rss, reset_peak_rss, rss  # noqa: E402

import numpy as np  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=float, default=32 * MiB)
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per rank (default: CPUs / ranks, at least 1)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's mmap threshold dynamic (as bench/mpi_step.py)")
    ap.add_argument("--json", help="write the results to this file (rank 0)")
    args = ap.parse_args(argv)
    if not args.default_malloc:
        fixed_mmap_threshold()
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    dist.init_process_group("gloo")
    me, n = dist.get_rank(), dist.get_world_size()
    cpus = len(os.sched_getaffinity(0))
    torch.set_num_threads(args.threads or max(1, cpus // n))
    params = [torch.nn.Parameter(torch.from_numpy(p))
              for p in make(int(args.elements), args.tensors, np.float32, seed=1)]
    for p, g in zip(params, make(int(args.elements), args.tensors, np.float32, seed=2 + me)):
        p.grad = torch.from_numpy(g * 1e-3)

    def step(opt, ps):
        for p in ps:
            dist.all_reduce(p.grad)
            p.grad.div_(n)
        opt.step()

    small = [torch.nn.Parameter(p.detach()[:2].clone()) for p in params]
    for s, p in zip(small, params):
        s.grad = p.grad[:2].clone()
    w = ZeroRedundancyOptimizer(small, optimizer_class=torch.optim.Adam, lr=1e-3)
    step(w, small)
    step(w, small)
    del w, small
    gc.collect()
    dist.barrier()
    reset_peak_rss()
    r0 = rss()
    opt = ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.Adam, lr=1e-3)
    r1 = rss()
    step(opt, params)
    r2 = rss()
    dist.barrier()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step(opt, params)
        times.append(time.perf_counter() - t)
    r3, peak = rss(), peak_rss()
    row = {"peak_growth": peak - r0, "rank": me, "rss_construct": r1 - r0, "rss_first_step": r2 - r1,
           "rss_total": r3 - r0, "step_s": float(np.median(times)),
           "step_min_s": float(np.min(times)), "step_max_s": float(np.max(times))}
    rows = [None] * n
    dist.all_gather_object(rows, row)
    if me == 0:
        print(f"torch ZeroRedundancyOptimizer(Adam), gloo, {n} ranks, "
              f"{sum(p.numel() for p in params):,} float32 in {args.tensors} tensors, "
              f"median of {args.steps} steps")
        for r in rows:
            print(f"rank {r['rank']}: step {1e3 * r['step_s']:.1f} ms (min "
                  f"{1e3 * r['step_min_s']:.1f}, max {1e3 * r['step_max_s']:.1f}); RSS "
                  f"growth: construction {r['rss_construct'] / MiB:.1f} MiB, first step "
                  f"{r['rss_first_step'] / MiB:.1f} MiB, total {r['rss_total'] / MiB:.1f} MiB, peak "
                  f"{r['peak_growth'] / MiB:.1f} MiB")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
