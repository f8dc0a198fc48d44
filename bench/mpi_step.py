"""Sharded optimizer step under MPI: time per rank split into communication and
compute, optimizer-state memory per rank (resident memory), bytes communicated.

Run it with each world size (it is an MPI program, not a pytest suite)::

    mpiexec -n 1 python bench/mpi_step.py
    mpiexec -n 2 python bench/mpi_step.py --json step2.json
    MPIR_CVAR_ENABLE_HEAVY_YIELD=1 mpiexec -n 4 python bench/mpi_step.py   # > CPUs

What it does on every rank:

1. makes the parameters (``--elements`` in ``--tensors`` tensors of rows of 1024)
   and one set of gradients, then warms up (kernels loaded, MPI connected) on a
   small optimizer of the same configuration;
2. measures resident memory (``VmRSS``) before and after constructing the
   :class:`~fastopt.distributed.ShardedOptimizer` (its gradient shard and bucket
   buffers, allocated and touched at construction) and before and after its first
   step (the optimizer state, allocated on first use): the growths are reported as
   "buffers" and "state", beside the exact byte counts;
3. times ``--steps`` steps and reports, per rank and per step, the total, the
   update of the rank's shard (the fastopt kernels: compute), the time inside MPI
   calls (communication, waiting for the slowest rank included), the copying into
   and out of the buckets and the float64 averaging, and the bytes received,
   next to the ZeRO figure ``2 (N - 1) / N`` x the parameter bytes;
4. then, on rank 0 alone, the plain optimizer: its step time and the resident
   memory of its state (the single-process baseline).

Rank 0 prints a table; ``--json PATH`` writes every number.  With more ranks than
CPUs the ranks share cores, so the times are not those of a real cluster; the
memory and the byte counts are.
"""

import argparse
import gc
import json
import math
import os
import sys
import time

import numpy as np

import fastopt
from fastopt import rules

MiB = 1 << 20


def rss():
    """Resident set size of this process in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss():
    """Peak resident set size of this process in bytes (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_peak_rss():
    """Reset ``VmHWM`` to the current resident set (Linux >= 4.0: ``clear_refs`` 5);
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def fixed_mmap_threshold():
    """Ask glibc to keep its mmap threshold fixed (128 KiB): large arrays are then
    mapped and unmapped, so a freed array leaves the resident set and the RSS
    growths measured below are the arrays allocated (glibc otherwise raises the
    threshold after the first large free and keeps freed memory resident)."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_MMAP_THRESHOLD = -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024))
    except OSError:
        return False


def polite_barrier(comm):
    """A barrier that sleeps while it waits (so waiting ranks leave the CPU to the
    one being measured)."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(1e-3)


def mpi_bandwidth(comm, nbytes, repeats=5):
    """Best-of-``repeats`` bytes/s received per rank by a bare ``Alltoallv`` and a
    bare ``Allgatherv`` of one bucket (``nbytes``), as this MPI delivers them."""
    from mpi4py import MPI
    n = comm.size
    e = max(n, nbytes // 4 // n * n)
    s = np.ones(e, np.float32)
    r = np.empty(e, np.float32)
    cnt = [e // n] * n
    dsp = [k * (e // n) for k in range(n)]
    got = (n - 1) * (e // n) * 4
    out = {}
    for name, call in (("alltoallv", lambda: comm.Alltoallv([s, (cnt, dsp), MPI.FLOAT],
                                                           [r, (cnt, dsp), MPI.FLOAT])),
                       ("allgatherv", lambda: comm.Allgatherv([s[:e // n], MPI.FLOAT],
                                                             [r, (cnt, dsp), MPI.FLOAT]))):
        best = math.inf
        for _ in range(repeats):
            polite_barrier(comm)
            t = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t)
        best = max(comm.allgather(best))
        out[name] = got / best if got else math.inf
    return out


def make(elements, tensors, dtype, seed):
    rng = np.random.default_rng(seed)
    per = max(1, elements // tensors)
    shapes = [(max(1, per // 1024), min(1024, per))] * tensors
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return params


def bytes_per_element(rule, hyper, itemsize):
    """Bytes an update moves per element: read p, g and the used slots; write p and
    the slots (row-wise rules: their one-per-row slot is left out)."""
    group = rule.check_group({**rule.defaults, **hyper})
    slots = sum(rule.uses_slots(group)) if rule.layout != "rowwise" else 0
    return itemsize * (3 + 2 * slots)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rule", default="Adam", choices=sorted(fastopt.CLASSES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--elements", type=float, default=32 * MiB,
                    help="parameter elements in all (default 32Mi)")
    ap.add_argument("--tensors", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bucket-mib", type=float, default=32.0)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--reuse-grads", action="store_true",
                    help="ShardedOptimizer(reuse_grads=True): average in the gradient arrays")
    ap.add_argument("--overlap", action="store_true",
                    help="ShardedOptimizer(overlap=True): non-blocking exchanges overlapped "
                         "with the averaging and the update")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's mmap threshold dynamic (freed temporaries stay "
                         "resident, as in a long-running process)")
    ap.add_argument("--threads", type=int, default=0,
                    help="Numba threads per rank (default: CPUs / ranks, at least 1)")
    ap.add_argument("--quick", action="store_true", help="1Mi elements, 3 steps")
    ap.add_argument("--json", help="write the results to this file (rank 0)")
    args = ap.parse_args(argv)
    if args.quick:
        args.elements, args.steps = 1 << 20, 3

    from mpi4py import MPI
    from fastopt.distributed import ShardedOptimizer
    import numba
    comm = MPI.COMM_WORLD
    me, n = comm.rank, comm.size
    if not args.default_malloc:
        fixed_mmap_threshold()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or max(1, cpus // n)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    cls = fastopt.CLASSES[args.rule]
    rule = rules.RULES[args.rule]
    dtype = np.dtype(args.dtype)
    hyper = {"backend": args.backend}
    sharded_kw = {"reuse_grads": True} if args.reuse_grads else {}
    if args.overlap:
        sharded_kw["overlap"] = True
    bucket = int(args.bucket_mib * MiB)

    params = make(int(args.elements), args.tensors, dtype, seed=1)
    grads = [g * 1e-3 for g in make(int(args.elements), args.tensors, dtype, seed=2 + me)]
    param_bytes = sum(p.nbytes for p in params)

    # warm up: kernels loaded, MPI connections made, on a small copy of the setup
    small = [p[:2].copy() for p in params]
    w = ShardedOptimizer(cls, small, bucket_bytes=bucket, **sharded_kw, **hyper)
    for _ in range(2):
        w.step([g[:2] for g in grads])
    plain_small = cls([p.copy() for p in small], **hyper)
    plain_small.step([g[:2] for g in grads])
    w.close()
    del w, plain_small
    gc.collect()
    polite_barrier(comm)

    bw = mpi_bandwidth(comm, bucket) if n > 1 else {"alltoallv": math.inf,
                                                     "allgatherv": math.inf}
    reset_peak_rss()
    r0 = rss()
    opt = ShardedOptimizer(cls, params, bucket_bytes=bucket, **sharded_kw, **hyper)
    r1 = rss()
    opt.step(grads)
    r2 = rss()
    polite_barrier(comm)
    opt.reset_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        opt.step(grads)
        times.append(time.perf_counter() - t)
    r3, peak = rss(), peak_rss()
    st = dict(opt.stats)
    k = st["steps"]
    shard_elems = sum((opt.shard_rows(i)[1] - opt.shard_rows(i)[0])
                      * int(np.prod(p.shape[1:], dtype=np.int64)) for i, p in enumerate(params))
    row = {"rank": me, "shard_elements": shard_elems,
           "step_s": float(np.median(times)), "step_best_s": float(np.min(times)),
           "update_s": st["update_s"] / k, "comm_s": st["comm_s"] / k,
           "pack_s": st["pack_s"] / k, "reduce_s": st["reduce_s"] / k,
           "check_s": st["check_s"] / k,
           "bytes_received_per_step": st["bytes_received"] // k,
           "bytes_sent_per_step": st["bytes_sent"] // k,
           "state_bytes": opt.state_bytes(), "buffer_bytes": opt.buffer_bytes(),
           "rss_buffers": r1 - r0, "rss_state": r2 - r1, "rss_growth": r3 - r0,
           "peak_growth": peak - r0, "step_min_s": float(np.min(times)),
           "step_max_s": float(np.max(times))}
    rows = comm.gather(row, root=0)
    opt.close()
    del opt
    gc.collect()
    polite_barrier(comm)

    single = None
    if me == 0:
        numba.set_num_threads(min(cpus, numba.config.NUMBA_NUM_THREADS))
        ps = [p.copy() for p in params]
        s0 = rss()
        plain = cls(ps, **hyper)
        plain.step(grads)
        s1 = rss()
        ts = []
        for _ in range(args.steps):
            t = time.perf_counter()
            plain.step(grads)
            ts.append(time.perf_counter() - t)
        state = sum(v.nbytes for s in plain.state.values() for v in s.values()
                    if isinstance(v, np.ndarray))
        single = {"step_s": float(np.median(ts)), "step_best_s": float(np.min(ts)),
                  "state_bytes": int(state), "rss_state": s1 - s0}
        del plain, ps
    polite_barrier(comm)
    if me != 0:
        return None

    bpe = bytes_per_element(rule, {}, dtype.itemsize)
    zero = 2 * (n - 1) / n * param_bytes
    out = {"ranks": n, "rule": args.rule, "dtype": str(dtype), "elements": int(
        sum(p.size for p in params)), "tensors": args.tensors, "param_bytes": param_bytes,
        "bucket_bytes": bucket, "steps": args.steps, "threads_per_rank": threads,
        "cpus": cpus, "mpi_bytes_per_s": bw, "zero_bytes_per_rank": zero,
        "update_bytes_per_element": bpe, "per_rank": rows, "single": single}
    out["overlap"] = bool(args.overlap)
    print(f"{args.rule} {dtype}, {out['elements']:,} elements ({param_bytes / MiB:.1f} MiB) "
          f"in {args.tensors} tensors, {n} rank{'s' if n > 1 else ''}, bucket "
          f"{bucket / MiB:g} MiB{', overlapped' if args.overlap else ''}, "
          f"{threads} Numba thread(s) per rank on {cpus} CPUs, "
          f"median of {args.steps} steps")
    head = (f"{'rank':>4} {'shard':>11} {'step ms':>8} {'update':>8} {'comm':>8} "
            f"{'pack+avg':>8} {'check':>6} {'recv MiB':>9} {'ZeRO MiB':>9} "
            f"{'state MiB':>9} {'(RSS)':>7} {'buffers':>8} {'(RSS)':>7} {'GB/s':>6}")
    print(head)
    for r in rows:
        gbs = r["shard_elements"] * bpe / r["update_s"] / 1e9 if r["update_s"] else 0.0
        print(f"{r['rank']:>4} {r['shard_elements']:>11,} {1e3 * r['step_s']:>8.2f} "
              f"{1e3 * r['update_s']:>8.2f} {1e3 * r['comm_s']:>8.2f} "
              f"{1e3 * (r['pack_s'] + r['reduce_s']):>8.2f} {1e3 * r['check_s']:>6.2f} "
              f"{r['bytes_received_per_step'] / MiB:>9.2f} {zero / MiB:>9.2f} "
              f"{r['state_bytes'] / MiB:>9.2f} {r['rss_state'] / MiB:>7.1f} "
              f"{r['buffer_bytes'] / MiB:>8.2f} {r['rss_buffers'] / MiB:>7.1f} {gbs:>6.2f}")
    if n > 1:
        half = zero / 2
        model = half / bw["alltoallv"] + half / bw["allgatherv"]
        comm_ms = np.median([r["comm_s"] for r in rows]) * 1e3
        print(f"bare MPI here: Alltoallv {bw['alltoallv'] / 1e9:.2f} GB/s, Allgatherv "
              f"{bw['allgatherv'] / 1e9:.2f} GB/s received per rank (one {bucket / MiB:g} MiB "
              f"bucket); the ZeRO volume at those rates: {model * 1e3:.1f} ms, measured comm "
              f"{comm_ms:.1f} ms")
        out["comm_model_s"] = model
    s = single
    gbs = out["elements"] * bpe / s["step_s"] / 1e9
    print(f"single process (plain {args.rule}): step {1e3 * s['step_s']:.2f} ms "
          f"({gbs:.2f} GB/s), state {s['state_bytes'] / MiB:.2f} MiB "
          f"(RSS growth {s['rss_state'] / MiB:.1f} MiB)")
    worst = max(r["rss_state"] for r in rows)
    with_buffers = max(r["rss_state"] + r["rss_buffers"] for r in rows)
    print(f"state per rank / single-process state (RSS): {worst / s['rss_state']:.3f}; "
          f"with the buffers: {with_buffers / s['rss_state']:.3f}")
    for r in rows:
        print(f"rank {r['rank']}: RSS growth over construction and {args.steps + 1} steps "
              f"{r['rss_growth'] / MiB:.1f} MiB, peak {r['peak_growth'] / MiB:.1f} MiB; step "
              f"min {1e3 * r['step_min_s']:.1f} / median {1e3 * r['step_s']:.1f} / max "
              f"{1e3 * r['step_max_s']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    sys.stdout.flush()
    return out


if __name__ == "__main__":
    main()
