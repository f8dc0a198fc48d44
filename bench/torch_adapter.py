"""fastopt.torch against torch.optim: optimizer.step() time, interleaved rounds.

Two cases (``python bench/torch_adapter.py``, about a minute; ``--quick``: a few
seconds)::

    dense   300 nn.Linear(256, 256) layers (600 tensors, 19.7M float32 parameters),
            gradients set once: fastopt.torch.AdamW vs torch.optim.AdamW(fused=True)
            and (foreach=True)
    sparse  nn.Embedding(1_000_000, 64, sparse=True), a fresh batch of 16,384
            Zipf(1.2) ids every step (a pool of pre-generated batches; the most
            frequent ids are the lowest rows, as in a frequency-sorted vocabulary and
            in fastopt's own sparse benchmark; ``--permute`` maps ids through a
            fixed random permutation of the rows instead, spreading the hot rows over
            the table), gradient from a real backward of sum(embedding(ids) * w)
            computed outside the timed region:
            fastopt.torch.Adam (lazy) vs torch.optim.SparseAdam, and
            fastopt.torch.Adagrad vs torch.optim.Adagrad (sparse)

Each round times every contender ``--reps`` times in turn (the order alternates
from round to round), so slow phases of a shared machine hit every contender
alike.  Reported per contender: best, median, the spread (10th-90th percentile)
and the ratio of medians and of bests against fastopt.  Only ``step()`` is timed.
Nothing here asserts a time; ``--json`` writes the numbers.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import fastopt
import fastopt.torch as ft


def interleaved(contenders, rounds, reps, warmup=2):
    """``contenders``: name -> (prepare or None, step).  ``prepare`` runs untimed
    before each timed ``step``.  Returns name -> list of seconds."""
    for prep, step in contenders.values():
        for _ in range(warmup):
            if prep is not None:
                prep()
            step()
    times = {n: [] for n in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            prep, step = contenders[name]
            for _ in range(reps):
                if prep is not None:
                    prep()
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return times


def summarize(times, baseline):
    out = {}
    base = np.asarray(times[baseline])
    for name, ts in times.items():
        ts = np.asarray(ts)
        p10, p50, p90 = np.percentile(ts, [10, 50, 90])
        out[name] = dict(best_ms=ts.min() * 1e3, median_ms=p50 * 1e3, p10_ms=p10 * 1e3,
                         p90_ms=p90 * 1e3, n=len(ts),
                         x_median=float(p50 / np.median(base)),
                         x_best=float(ts.min() / base.min()))
    return out


def print_table(title, summary, baseline, extra=None):
    print(f"\n{title}")
    if extra:
        print(extra)
    print(f"  {'contender':<40} {'best ms':>9} {'median ms':>10} {'p10-p90 ms':>16} "
          f"{'x median':>9} {'x best':>7}")
    for name, s in summary.items():
        mark = "  (baseline)" if name == baseline else ""
        print(f"  {name:<40} {s['best_ms']:9.2f} {s['median_ms']:10.2f} "
              f"{s['p10_ms']:7.2f}-{s['p90_ms']:<8.2f} {s['x_median']:9.2f} "
              f"{s['x_best']:7.2f}{mark}")


# ------------------------------------------------------------------------ dense

def dense_models(n_layers, width, seed=0):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(width, width) for _ in range(n_layers)]
    params = [p for layer in layers for p in layer.parameters()]
    g = torch.Generator().manual_seed(seed + 1)
    grads = [torch.randn(p.shape, generator=g) for p in params]
    return params, grads


def dense_case(args):
    n_layers = 30 if args.quick else args.layers
    contenders = {}
    makers = {
        "fastopt.torch.AdamW": lambda ps: ft.AdamW(ps, lr=1e-3),
        "torch.optim.AdamW(fused=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "torch.optim.AdamW(foreach=True)": lambda ps: torch.optim.AdamW(ps, lr=1e-3,
                                                                        foreach=True),
    }
    if "cython" in fastopt.available_backends():
        makers["fastopt.torch.AdamW(backend='cython')"] = \
            lambda ps: ft.AdamW(ps, lr=1e-3, backend="cython")
    nparams = None
    keep = []
    for name, make in makers.items():
        params, grads = dense_models(n_layers, args.width)
        for p, g in zip(params, grads):
            p.grad = g
        opt = make(params)
        keep.append((params, opt))
        contenders[name] = (None, opt.step)
        nparams = sum(p.numel() for p in params)
        ntensors = len(params)
    ceiling = ceiling_kernel([p.numel() for p in keep[0][0]])
    if ceiling is not None:
        contenders["ceiling (same bytes, no math)"] = (None, ceiling)
    times = interleaved(contenders, args.rounds, args.reps)
    base = "fastopt.torch.AdamW"
    summary = summarize(times, base)
    gbs = 28 * nparams / (summary[base]["best_ms"] * 1e-3) / 1e9
    extra = f"  fastopt's best moves 28 B/param at {gbs:.1f} GB/s"
    if ceiling is not None:
        extra += ("; the ceiling row streams the same bytes (read p, g, m, v; write p, m, v) "
                  "through fastopt's driver with no math: the memory bound of this step")
    print_table(f"dense: {n_layers} x nn.Linear({args.width}, {args.width}) = {ntensors} "
                f"tensors, {nparams / 1e6:.1f}M float32 params, AdamW step "
                f"({args.rounds} rounds x {args.reps} steps each)", summary, base, extra=extra)
    return dict(case="dense", tensors=ntensors, params=nparams, summary=summary)


def ceiling_kernel(sizes):
    """fastopt's benchmark ceiling (the dense driver moving AdamW's bytes with no
    math) over tensors of ``sizes`` elements, or None where the benchmark package
    does not offer it."""
    try:
        from fastopt.benchmark.cases import Case
        from fastopt.benchmark.contenders import _ceiling
        return _ceiling(Case("AdamW", tuple(sizes)))
    except Exception:      # noqa: BLE001 (an optional comparison row)
        return None


# ----------------------------------------------------------------------- sparse

def zipf_pool(rows, lookups, pool, permute=False, seed=0):
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows) if permute else np.arange(rows)
    out = []
    for _ in range(pool):
        ids = np.minimum(rng.zipf(1.2, lookups) - 1, rows - 1)
        out.append((torch.from_numpy(perm[ids].astype(np.int64)),
                    torch.from_numpy(rng.standard_normal((lookups, 1)).astype(np.float32))))
    return out


def sparse_case(args):
    rows = 100_000 if args.quick else args.rows
    dim, lookups = args.dim, args.lookups
    batches = zipf_pool(rows, lookups, args.pool, args.permute)
    uniq = np.mean([len(np.unique(ids.numpy())) for ids, _ in batches])
    makers = {
        "fastopt.torch.Adam (lazy)": lambda p: ft.Adam(p, lr=1e-3),
        "torch.optim.SparseAdam": lambda p: torch.optim.SparseAdam(p, lr=1e-3),
        "fastopt.torch.Adagrad (lazy)": lambda p: ft.Adagrad(p, lr=1e-2),
        "torch.optim.Adagrad (sparse)": lambda p: torch.optim.Adagrad(p, lr=1e-2),
    }
    contenders, keep = {}, []
    for name, make in makers.items():
        torch.manual_seed(0)
        emb = torch.nn.Embedding(rows, dim, sparse=True)
        opt = make(emb.parameters())
        counter = [0]

        def prepare(emb=emb, opt=opt, counter=counter):
            ids, w = batches[counter[0] % len(batches)]
            counter[0] += 1
            opt.zero_grad()
            (emb(ids) * w).sum().backward()

        keep.append((emb, opt))
        contenders[name] = (prepare, opt.step)
    times = interleaved(contenders, args.rounds, args.reps)
    out = {}
    for base, other in (("fastopt.torch.Adam (lazy)", "torch.optim.SparseAdam"),
                        ("fastopt.torch.Adagrad (lazy)", "torch.optim.Adagrad (sparse)")):
        summary = summarize({k: times[k] for k in (base, other)}, base)
        print_table(f"sparse: nn.Embedding({rows:,}, {dim}, sparse=True), {lookups:,} "
                    f"Zipf(1.2) ids per step (~{uniq:,.0f} unique rows"
                    f"{', rows permuted' if args.permute else ''}), fresh batch per "
                    f"step ({args.rounds} rounds x {args.reps} steps each)", summary, base)
        out[base] = summary
    return dict(case="sparse", rows=rows, dim=dim, lookups=lookups, unique_rows=uniq,
                permuted=args.permute, summary=out)


def machine():
    try:
        import numba
        nthreads = numba.get_num_threads()
    except Exception:   # noqa: BLE001
        nthreads = None
    return dict(python=platform.python_version(), torch=torch.__version__,
                fastopt=fastopt.__version__, cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                numba_threads=nthreads)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", choices=("dense", "sparse", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--layers", type=int, default=300)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--lookups", type=int, default=16_384)
    ap.add_argument("--pool", type=int, default=16)
    ap.add_argument("--permute", action="store_true",
                    help="spread the hot rows over the table (random row permutation)")
    ap.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.quick else 10
    if args.reps is None:
        args.reps = 2 if args.quick else 3
    info = machine()
    print("machine:", ", ".join(f"{k}={v}" for k, v in info.items()))
    results = {"machine": info, "cases": []}
    if args.case in ("dense", "all"):
        results["cases"].append(dense_case(args))
    if args.case in ("sparse", "all"):
        results["cases"].append(sparse_case(args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
