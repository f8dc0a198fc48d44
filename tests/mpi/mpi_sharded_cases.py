"""fastopt.distributed.ShardedOptimizer, run on every rank of an MPI job.

The file name does not match ``test_*.py``, so the normal ``pytest`` run does not
collect it; ``tests/test_distributed.py`` runs it (pytest runs a file it is given
whatever its name)::

    python -m pytest tests/mpi/mpi_sharded_cases.py                  # a world of one
    mpiexec -n 2 python -m pytest tests/mpi/mpi_sharded_cases.py
    mpiexec -n 3 python -m pytest tests/mpi/mpi_sharded_cases.py

Every test is collective: every rank runs the same tests in the same order and
makes the same calls; assertions come after the collective calls, so that a failed
check on one rank does not leave the others waiting.  Each rank computes the
reference itself: the plain optimizer class stepping on the averaged gradients,
which every rank can form because the local gradients are generated from seeds.

``FASTOPT_MPI_DIR`` (set by the driver) is a directory shared by the runs of
different world sizes: each run saves a checkpoint there and resumes the ones the
runs of other world sizes saved.
"""

import copy
import glob
import math
import os
import re
import tempfile

import numpy as np
import pytest

pytest.importorskip("mpi4py")
from mpi4py import MPI  # noqa: E402

import fastopt  # noqa: E402
from fastopt import rules  # noqa: E402
from fastopt.distributed import (DEFAULT_TIMEOUT, DistributedError, ShardedOptimizer,  # noqa: E402
                                StateDictMismatchError)
from fastopt.sparse import RowSparse, checked_rows, coalesce  # noqa: E402

COMM = MPI.COMM_WORLD
N = COMM.size
ME = COMM.rank
LAST = N - 1
SHARED_DIR = os.environ.get("FASTOPT_MPI_DIR")

needs_two = pytest.mark.skipif(N < 2, reason="needs at least two ranks")

# FASTOPT_MPI_OVERLAP=1 (or 0), set by the driver's overlap lanes: every case runs with
# ShardedOptimizer's ``overlap`` default on (or off)
if os.environ.get("FASTOPT_MPI_OVERLAP") in ("0", "1"):
    import fastopt.distributed.sharded as _sharded  # noqa: E402
    _sharded.DEFAULT_OVERLAP = os.environ["FASTOPT_MPI_OVERLAP"] == "1"


# ------------------------------------------------------------------ gradients

def _rng(*key):
    return np.random.default_rng([abs(int(k)) for k in key])


def dense_grad(shape, dtype, step, rank, seed=0):
    """An uneven gradient: exact zeros, and 1e3- or 1e-6-scaled steps."""
    rng = _rng(seed, step, rank, 1)
    g = np.asarray(rng.standard_normal(shape))
    g = np.where(rng.random(shape) < 0.2, 0.0, g)
    if step % 7 == 3:
        g = g * 1e3
    elif step % 7 == 5:
        g = g * 1e-6
    return np.asarray(g, dtype=dtype)


def sparse_grad(shape, dtype, step, rank, seed=0, rows=None, scipy=False):
    """A row-sparse gradient with duplicates; ``rows``: the rows to draw from."""
    import scipy.sparse as sps
    rng = _rng(seed, step, rank, 2)
    pool = np.arange(shape[0]) if rows is None else np.asarray(rows)
    nnz = int(rng.integers(0, 9)) if pool.size else 0
    idx = rng.choice(pool, size=nnz) if nnz else np.zeros(0, np.int64)
    vals = rng.standard_normal((nnz,) + tuple(shape[1:])).astype(dtype)
    if scipy and len(shape) == 2:
        m = sps.coo_matrix((vals.reshape(-1), (np.repeat(idx, shape[1]),
                                               np.tile(np.arange(shape[1]), nnz))),
                           shape=shape).tocsr()
        return m
    return RowSparse(idx.astype(np.int32 if step % 2 else np.int64), vals)


def grad_dtype(p):
    """The dtype of a parameter's averaged gradient: float32 for bfloat16."""
    return np.dtype(np.float32) if p.dtype.name == "bfloat16" else p.dtype


def averaged(per_rank, params):
    """The reference's gradients: per parameter, the average over ranks formed as the
    documented scheme does: local values in the gradient dtype (the parameter's,
    float32 for bfloat16 parameters), added in rank order in float64, divided once;
    sparse rows coalesced in (rank, position) order."""
    n = len(per_rank)
    out = []
    for k, p in enumerate(params):
        entries = [g[k] for g in per_rank]
        gdt = grad_dtype(p)
        if entries[0] is None:
            out.append(None)
        elif isinstance(entries[0], np.ndarray):
            acc = np.asarray(entries[0], dtype=gdt).astype(np.float64)
            for e in entries[1:]:
                acc += np.asarray(e, dtype=gdt)
            out.append((acc / n).astype(gdt))
        else:
            rows = [checked_rows(e, p, "reference") for e in entries]
            idx = np.concatenate([i for i, _ in rows])
            width = rows[0][1].shape[1]
            vals = np.concatenate([v for _, v in rows]).astype(np.float64).reshape(-1, width)
            if idx.size == 0:
                out.append(RowSparse(idx, np.zeros((0,) + p.shape[1:], gdt)))
                continue
            uniq, summed = coalesce(idx, vals, p.shape[0])
            out.append(RowSparse(uniq, (summed / n).astype(gdt)
                                 .reshape((uniq.shape[0],) + p.shape[1:])))
    return out


def init(shapes, dtype, seed=1):
    rng = _rng(seed, 99)
    dts = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(shapes)
    return [np.asarray(rng.standard_normal(s)).astype(d) for s, d in zip(shapes, dts)]


def same(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.kind != "f":             # bfloat16, uint8/uint16 codes: the bytes
        return np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                              np.ascontiguousarray(b).reshape(-1).view(np.uint8))
    return np.array_equal(a, b, equal_nan=True)


def identical_on_every_rank(arrays):
    import hashlib
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return len(set(COMM.allgather(h.hexdigest()))) == 1


def run_pair(cls, params, hyper, local, steps, sharded_kw=None, check_each=None, step_kw=None):
    """Step a ShardedOptimizer (this rank's gradients ``local(t, rank)``) and the
    plain class (the averaged gradients) from the same parameters.  Returns
    (sharded params, reference params, sharded optimizer, reference optimizer,
    list of (sharded result, reference result))."""
    n, me = N, ME
    mine = [p.copy() for p in params]
    ref_params = [p.copy() for p in params]
    opt = ShardedOptimizer(cls, mine, **(sharded_kw or {}), **hyper)
    ref = cls(ref_params, **hyper)
    results = []
    for t in range(steps):
        per_rank = [local(t, r) for r in range(n)]
        kw = (step_kw or {}).get(t, {})
        mine_t = per_rank[me]
        if (sharded_kw or {}).get("reuse_grads"):       # the step writes into them
            mine_t = [g.copy() if isinstance(g, np.ndarray) else g for g in mine_t]
        got = opt.step(mine_t, **kw)
        want = ref.step(averaged(per_rank, ref_params), **kw)
        results.append((got, want))
        if check_each is not None:
            check_each(t, opt, ref)
    return mine, ref_params, opt, ref, results


def assert_same_params(mine, ref):
    bad = [k for k, (a, b) in enumerate(zip(mine, ref)) if not same(a, b)]
    everywhere = identical_on_every_rank(mine)
    diffs = [float(np.nanmax(np.abs(mine[k] - ref[k]))) if mine[k].size else 0.0 for k in bad]
    assert not bad, (f"parameters {bad} differ from the single-process result; max abs "
                     f"differences {diffs}")
    assert everywhere, "the ranks' parameters differ"


def assert_same_state_dict(a, b):
    assert set(a) == set(b), (sorted(a), sorted(b))
    assert a["version"] == b["version"] and a["optimizer"] == b["optimizer"]
    assert a["param_groups"] == b["param_groups"]
    assert a.get("param_names") == b.get("param_names")
    assert set(a["state"]) == set(b["state"]), (sorted(a["state"]), sorted(b["state"]))
    for i, st in b["state"].items():
        assert set(a["state"][i]) == set(st), (i, sorted(a["state"][i]), sorted(st))
        for k, v in st.items():
            w = a["state"][i][k]
            if isinstance(v, np.ndarray):
                assert isinstance(w, np.ndarray) and same(w, v), (i, k)
            else:
                assert type(w) is type(v) and w == v, (i, k, w, v)


def shared_dir():
    """A directory every rank sees (FASTOPT_MPI_DIR, or a fresh one from rank 0)."""
    d = SHARED_DIR
    if d is None:
        d = COMM.bcast(tempfile.mkdtemp(prefix="fastopt-mpi-") if ME == 0 else None, root=0)
    return d


# ------------------------------------------------------- dense, every rule

SHAPES = [(7,), (33, 17), (0,), (), (40, 3), (5, 2, 3)]
ROW_SHAPES = [(7,), (33, 17), (0, 4), (40, 3), (5, 2, 3)]
#: matrix rules (Muon): matrices, stacks of them, one without rows; each 2-D one is
#: owned whole by one rank, stacks are cut between their matrices
MATRIX_SHAPES = [(7, 3), (33, 17), (0, 4), (40, 3), (5, 2, 3), (3, 4, 6)]


#: the reference rule: every variant in both dtypes, in small buckets
REFERENCE_RULE = "Adam"


def variant_cases():
    """(rule, variant, dtype, small buckets) cases.

    Every rule's first variant runs in both dtypes cut into many small buckets (the
    cuts meet the rule's layout, state slots and host state); its other variants run
    once each, the dtypes alternating, in the default buckets: a variant's
    hyperparameters change the kernel, not the sharding, and the single-process
    suites cross them with every dtype.  The reference rule (Adam) runs every variant
    in both dtypes in small buckets.  Each bucket costs collectives, and collectives
    are what a 3-rank run on 2 CPUs waits on (tests/test_distributed.py)."""
    out = []
    for name, rule in rules.RULES.items():
        for k in range(len(rule.variants)):
            if k == 0 or name == REFERENCE_RULE:
                for dt, tag in ((np.float32, "f32"), (np.float64, "f64")):
                    out.append(pytest.param(name, k, dt, True, id=f"{name}-v{k}-{tag}-cut"))
            else:
                dt, tag = ((np.float64, "f64"), (np.float32, "f32"))[k % 2]
                out.append(pytest.param(name, k, dt, False, id=f"{name}-v{k}-{tag}"))
    return out


@pytest.mark.parametrize("name,variant,dtype,cut", variant_cases())
def test_dense_equals_single_process(name, variant, dtype, cut):
    cls = fastopt.CLASSES[name]
    rule = rules.RULES[name]
    shapes = ROW_SHAPES if rule.layout == "rowwise" else \
        MATRIX_SHAPES if rule.layout == "matrix" else SHAPES
    hyper = dict(rule.variants[variant])
    params = init(shapes, dtype)

    def local(t, r):
        return [dense_grad(s, dtype, t, r, seed=variant) for s in shapes]

    # cut: a small bucket, many buckets per step, cut inside parameters
    mine, ref, opt, refopt, _ = run_pair(cls, params, hyper, local, 7,
                                         sharded_kw={"bucket_bytes": 200} if cut else {})
    sd = opt.consolidated_state_dict(to=LAST)
    if rule.per_tensor:
        # the norms of whole tensors are the ranks' parts added in rank order: the
        # same on every rank, equal to the single process's to rounding
        assert identical_on_every_rank(mine)
        tol = 1e-5 if dtype == np.float32 else 1e-12
        for a, b in zip(mine, ref):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
        if ME == LAST:
            want = refopt.state_dict()
            for i, st in want["state"].items():
                for k, v in st.items():
                    if isinstance(v, np.ndarray):
                        np.testing.assert_allclose(sd["state"][i][k], v, rtol=tol, atol=tol)
        return
    assert_same_params(mine, ref)
    if ME == LAST:
        assert_same_state_dict(sd, refopt.state_dict())
    else:
        assert sd is None


@pytest.mark.parametrize("name", [n for n, r in rules.RULES.items() if r.methods])
def test_rule_methods_switch_the_full_parameters(name):
    """Schedule-free's eval()/train() on a ShardedOptimizer: each rank switches its
    rows, every rank then holds the full switched parameters, bit-identical to the
    single process; a step in eval mode is refused on every rank; the mode is in
    the consolidated state dict's groups."""
    cls = fastopt.CLASSES[name]
    rule = rules.RULES[name]
    hyper = dict(rule.variants[-1])
    params = init(SHAPES, np.float64)
    switched, refused = [], []

    def local(t, r):
        return [dense_grad(s, np.float64, t, r, seed=3) for s in SHAPES]

    def check_each(t, opt, ref):
        if t == 3:
            opt.eval()
            ref.eval()
            switched.append(all(same(a, b) for a, b in zip(opt.param_groups[0]["params"],
                                                           ref.param_groups[0]["params"])))
            sent = opt.stats["bytes_sent"] + opt.stats["bytes_received"]
            try:
                opt.step(local(t, ME))
            except RuntimeError as e:       # refused before any communication
                refused.append("eval mode" in str(e) and
                               opt.stats["bytes_sent"] + opt.stats["bytes_received"] == sent)
            opt.train()
            ref.train()

    mine, ref, opt, refopt, _ = run_pair(cls, params, hyper, local, 7,
                                         sharded_kw={"bucket_bytes": 200},
                                         check_each=check_each)
    opt.eval()
    refopt.eval()
    sd = opt.consolidated_state_dict(to=LAST)
    assert switched == [True] and refused == [True]
    assert_same_params(mine, ref)
    if ME == LAST:
        assert sd["param_groups"][0]["train_mode"] is False
        assert_same_state_dict(sd, refopt.state_dict())


def test_mixed_dtypes_and_default_buckets():
    shapes = [(50, 3), (9,), (4, 4), (), (31,)]
    dts = [np.float32, np.float64, np.float32, np.float64, np.float32]
    params = init(shapes, dts)

    def local(t, r):
        return [dense_grad(s, d, t, r) for s, d in zip(shapes, dts)]

    mine, ref, opt, _, _ = run_pair(fastopt.Adam, params, {"amsgrad": True}, local, 5)
    assert_same_params(mine, ref)
    assert [p.dtype for p in mine] == [np.dtype(d) for d in dts]


@pytest.mark.parametrize("clip", [None, 0.5])
def test_reuse_grads_averages_in_the_callers_gradients(clip):
    """``reuse_grads=True``: the average is formed in the caller's gradient arrays
    (no gradient shard); gradients it cannot use (non-contiguous, another dtype,
    read-only) are copied for the step; the result is the same bits as without it."""
    shapes = [(50, 3), (9,), (4, 4), (), (31,), (6, 5)]
    dts = [np.float32, np.float64, np.float32, np.float64, np.float32, np.float32]
    params = init(shapes, dts)

    def local(t, r):
        g = [dense_grad(s, d, t, r) for s, d in zip(shapes, dts)]
        g[2] = np.asfortranarray(g[2])                      # not C-contiguous
        g[4] = g[4].astype(np.float64)                      # another dtype
        g[5] = g[5].copy()
        g[5].flags.writeable = False                        # read-only
        return g

    kw = {"reuse_grads": True, "bucket_bytes": 96}
    if clip is not None:
        kw["max_grad_norm"] = clip
    mine = [p.copy() for p in params]
    ref_p = [p.copy() for p in params]
    opt = ShardedOptimizer(fastopt.Adam, mine, **kw)
    ref = fastopt.Adam(ref_p)
    ro = []
    for t in range(4):
        per_rank = [local(t, r) for r in range(N)]
        want = [np.array(w) for w in averaged(per_rank, ref_p)]
        if clip is not None:
            fastopt.clip_grad_norm_(want, clip)
        before = per_rank[ME][5].copy()
        opt.step(per_rank[ME])
        ref.step(want)
        ro.append(same(per_rank[ME][5], before))
    if clip is None:
        assert_same_params(mine, ref_p)
    else:                       # the clip norm: the ranks' parts added in rank order
        assert identical_on_every_rank(mine)
        for a, b in zip(mine, ref_p):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert all(ro)                                   # a read-only gradient is only read
    assert opt.buffer_bytes() == 0                   # no gradient shard
    with pytest.raises(TypeError, match="reuse_grads"):
        ShardedOptimizer(fastopt.Adam, [np.zeros(3)], reuse_grads=1)


def test_large_pieces_take_the_threaded_average():
    shapes = [(300, 700), (5,)]           # >= 65536 elements per rank and bucket
    params = init(shapes, np.float32)

    def local(t, r):
        return [dense_grad(s, np.float32, t, r) for s in shapes]

    mine, ref, _, _, _ = run_pair(fastopt.Adam, params, {}, local, 3)
    assert_same_params(mine, ref)


def test_other_float_dtypes_and_noncontiguous_gradients():
    shapes = [(12, 5), (20,)]
    params = init(shapes, np.float32)

    def local(t, r):
        g0 = dense_grad((5, 12), np.float64, t, r).T            # not contiguous
        g1 = dense_grad((20,), np.float16, t, r)                # another float dtype
        return [g0, g1]

    mine, ref, _, _, _ = run_pair(fastopt.RMSprop, params, {"momentum": 0.5}, local, 4)
    assert_same_params(mine, ref)


def test_none_gradients_skip_parameters():
    shapes = [(10, 3), (6,), (4,)]
    params = init(shapes, np.float64)

    def local(t, r):
        g = [dense_grad(s, np.float64, t, r) for s in shapes]
        if t % 2:
            g[1] = None
        if t == 2:
            g[0] = None
        return g

    mine, ref, opt, refopt, _ = run_pair(fastopt.Adam, params, {}, local, 5)
    sd = opt.consolidated_state_dict(to=0)
    assert_same_params(mine, ref)
    if ME == 0:
        assert_same_state_dict(sd, refopt.state_dict())
        assert [sd["state"][i]["step"] for i in range(3)] == [4, 3, 5]


# ------------------------------------------------------ sparse, every rule

def sparse_cases():
    out = []
    for name, rule in rules.RULES.items():
        if rule.whole_tensor:         # dense gradients only (refused: test_tensor_rules.py, test_muon.py, test_adafactor.py)
            continue
        for dt, tag in ((np.float32, "f32"), (np.float64, "f64")):
            out.append(pytest.param(name, 0, "lazy", dt, id=f"{name}-lazy-{tag}"))
        for k, v in enumerate(rule.variants):
            if rule.exact_possible(v):
                out.append(pytest.param(name, k, "exact", np.float64,
                                        id=f"{name}-v{k}-exact-f64"))
    return out


@pytest.mark.parametrize("name,variant,mode,dtype", sparse_cases())
def test_sparse_equals_single_process(name, variant, mode, dtype):
    cls = fastopt.CLASSES[name]
    rule = rules.RULES[name]
    hyper = dict(rule.variants[variant], sparse_mode=mode)
    shapes = [(50, 4), (30,), (6, 3), (20, 2)]
    params = init(shapes, dtype)
    owners = {}

    def local(t, r):
        if t == 0:
            rows = None
        elif t % 4 == 1:          # rows of one rank only: the others advance untouched
            lo, hi = owners[0][t % N]
            rows = np.arange(lo, hi)
        else:
            rows = None
        g = [sparse_grad(shapes[0], dtype, t, r, rows=rows, scipy=(t % 3 == 2)),
             sparse_grad(shapes[1], dtype, t, r),
             dense_grad(shapes[2], dtype, t, r),
             sparse_grad(shapes[3], dtype, t, r)]
        if t == 3:                # globally empty: a no-op, the step count stays
            g[1] = RowSparse(np.zeros(0, np.int64), np.zeros(0, dtype))
        if t % 5 == 4 and r != 0:  # only rank 0 has rows
            g[3] = RowSparse(np.zeros(0, np.int64), np.zeros((0, 2), dtype))
        return g

    mine = [p.copy() for p in params]
    ref_params = [p.copy() for p in params]
    opt = ShardedOptimizer(cls, mine, bucket_bytes=96, **hyper)
    ref = cls(ref_params, **hyper)
    owners[0] = COMM.allgather(opt.shard_rows(0))
    for t in range(9):
        per_rank = [local(t, r) for r in range(N)]
        opt.step(per_rank[ME])
        ref.step(averaged(per_rank, ref_params))
    before_flush = [k for k, (a, b) in enumerate(zip(mine, ref_params)) if not same(a, b)]
    sd = opt.consolidated_state_dict(to=0)       # exact mode: brings every row up to date
    ref_sd = ref.state_dict()                    # ... as the plain state_dict() does
    assert_same_params(mine, ref_params)
    assert not before_flush
    if ME == 0:
        assert_same_state_dict(sd, ref_sd)


def test_exact_mode_flush_matches():
    hyper = {"lr": 0.05, "momentum": 0.9, "sparse_mode": "exact"}
    shapes = [(40, 3)]
    params = init(shapes, np.float64)

    def local(t, r):
        return [sparse_grad(shapes[0], np.float64, t, r)]

    mine, ref, opt, refopt, _ = run_pair(fastopt.SGD, params, hyper, local, 6)
    opt.flush()
    refopt.flush()
    assert_same_params(mine, ref)


# --------------------------------------------------------------- fused options

FUSED = [
    ("Adam", {"clip_value": 0.5}),
    ("SGD", {"lr": 0.01, "momentum": 0.9, "l1": 1e-3, "param_min": -1.0, "param_max": 1.0}),
    ("Adam", {"max_norm": 0.8}),
    ("RowWiseAdagrad", {"max_norm": 0.5, "weight_decay": 1e-2}),
    ("Lion", {"param_min": -0.5, "param_max": 0.5, "l1": 1e-4}),
    ("AdamW", {"max_norm": 1.0, "clip_value": 1.0}),
    ("NAdam", {"clip_value": 0.3, "max_norm": 2.0}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,hyper", [pytest.param(n, h, id=f"{n}-{'-'.join(h)}")
                                        for n, h in FUSED])
def test_fused_options(name, hyper, dtype):
    cls = fastopt.CLASSES[name]
    shapes = [(30, 4), (11,), (9, 5)]

    def local(t, r):
        return [sparse_grad(shapes[0], dtype, t, r) if t % 2 else
                dense_grad(shapes[0], dtype, t, r),
                dense_grad(shapes[1], dtype, t, r),
                dense_grad(shapes[2], dtype, t, r)]

    mine, ref, _, _, _ = run_pair(cls, init(shapes, dtype), hyper, local, 6,
                                  sharded_kw={"bucket_bytes": 160})
    assert_same_params(mine, ref)


@pytest.mark.parametrize("backend", [b for b in fastopt.available_backends() if b != "cuda"])
@pytest.mark.parametrize("name,hyper", [("Adam", {"amsgrad": True}),
                                        ("RowWiseAdagrad", {"max_norm": 1.0}),
                                        ("SGD", {"lr": 0.01, "momentum": 0.9,
                                                 "sparse_mode": "exact"})])
def test_every_cpu_backend(backend, name, hyper):
    cls = fastopt.CLASSES[name]
    shapes = [(25, 3), (13,)]

    def local(t, r):
        return [sparse_grad(shapes[0], np.float64, t, r) if t % 2 else
                dense_grad(shapes[0], np.float64, t, r),
                dense_grad(shapes[1], np.float64, t, r)]

    mine, ref, opt, _, _ = run_pair(cls, init(shapes, np.float64),
                                    dict(hyper, backend=backend), local, 5)
    assert opt.backend.name == backend
    assert_same_params(mine, ref)


# ----------------------------------------------- groups, names, schedulers

def test_named_params_groups_and_a_scheduler():
    shapes = {"emb": (40, 4), "w": (8, 6), "b": (6,)}
    arrays = dict(zip(shapes, init(list(shapes.values()), np.float32)))

    def make(ps):
        return [{"params": [ps["emb"]], "lr": 0.05}, {"params": [ps["w"], ps["b"]], "lr": 0.01,
                                                      "weight_decay": 1e-2}]

    mine = {k: v.copy() for k, v in arrays.items()}
    ref_p = {k: v.copy() for k, v in arrays.items()}
    opt = ShardedOptimizer(fastopt.Adam, make(mine))
    ref = fastopt.Adam(make(ref_p))
    sch = fastopt.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    ref_sch = fastopt.lr_scheduler.StepLR(ref, step_size=2, gamma=0.5)
    plist = [ref_p["emb"], ref_p["w"], ref_p["b"]]
    for t in range(6):
        per_rank = [[sparse_grad((40, 4), np.float32, t, r), dense_grad((8, 6), np.float32, t, r),
                     dense_grad((6,), np.float32, t, r)] for r in range(N)]
        opt.step(per_rank[ME])
        ref.step(averaged(per_rank, plist))
        sch.step()
        ref_sch.step()
    sd = opt.consolidated_state_dict(to=0)
    assert_same_params([mine[k] for k in shapes], [ref_p[k] for k in shapes])
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    assert opt.param_groups[0]["params"][0] is mine["emb"]
    if ME == 0:
        assert_same_state_dict(sd, ref.state_dict())


def test_dict_params_and_dict_gradients():
    names = ["a", "b", "c"]
    shapes = [(9, 2), (5,), (3, 3)]
    arrays = init(shapes, np.float64)
    mine = {n: a.copy() for n, a in zip(names, arrays)}
    ref_p = {n: a.copy() for n, a in zip(names, arrays)}
    opt = ShardedOptimizer(fastopt.Adagrad, mine, lr=0.1)
    ref = fastopt.Adagrad(ref_p, lr=0.1)
    for t in range(4):
        per_rank = [[dense_grad(s, np.float64, t, r) for s in shapes] for r in range(N)]
        opt.step(dict(zip(reversed(names), reversed(per_rank[ME]))))
        ref.step(dict(zip(names, averaged(per_rank, arrays))))
    sd = opt.consolidated_state_dict(to=0)
    assert_same_params([mine[n] for n in names], [ref_p[n] for n in names])
    if ME == 0:
        assert sd["param_names"] == names
        assert_same_state_dict(sd, ref.state_dict())


# --------------------------------------------- grad_scale, skipping, clipping

def test_grad_scale():
    shapes = [(20, 3), (7,)]

    def local(t, r):
        return [sparse_grad(shapes[0], np.float32, t, r) if t % 2 else
                dense_grad(shapes[0], np.float32, t, r) * 64,
                dense_grad(shapes[1], np.float32, t, r) * 64]

    mine, ref, _, _, _ = run_pair(fastopt.Adam, init(shapes, np.float32), {}, local, 4,
                                  step_kw={t: {"grad_scale": 64.0} for t in range(4)})
    assert_same_params(mine, ref)


@pytest.mark.parametrize("where", ["dense-inf", "sparse-nan"])
def test_skip_nonfinite_on_every_rank(where):
    shapes = [(30, 2), (10,)]
    bad_rank, bad_step = LAST, 2

    def local(t, r):
        g = [sparse_grad(shapes[0], np.float64, t, r, rows=[0, 1, 2, 29]),
             dense_grad(shapes[1], np.float64, t, r)]
        if (t, r) == (bad_step, bad_rank):
            if where == "dense-inf":
                g[1][3] = np.inf
            else:
                g[0] = RowSparse(np.array([29, 0]), np.array([[np.nan, 1.0], [2.0, 3.0]]))
        return g

    snapshots = {}

    def check(t, opt, ref):
        if t == bad_step - 1:
            snapshots["before"] = opt.consolidated_state_dict(to=0)
        if t == bad_step:
            snapshots["after"] = opt.consolidated_state_dict(to=0)

    mine, ref, opt, refopt, results = run_pair(
        fastopt.Adam, init(shapes, np.float64), {}, local, 5, check_each=check,
        step_kw={t: {"skip_nonfinite": True} for t in range(5)})
    assert_same_params(mine, ref)
    assert results[bad_step] == (False, False)
    assert all(r == (True, True) for t, r in enumerate(results) if t != bad_step)
    if ME == 0:
        assert_same_state_dict(snapshots["after"], snapshots["before"])


@pytest.mark.parametrize("norm_type", [2.0, "inf"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_clip_grad_norm_of_the_averaged_gradient(norm_type, dtype):
    shapes = [(30, 3), (12,), (4, 5)]
    max_norm = 0.75
    params = init(shapes, dtype)
    mine = [p.copy() for p in params]
    ref_p = [p.copy() for p in params]
    opt = ShardedOptimizer(fastopt.SGD, mine, lr=0.1, momentum=0.9, max_grad_norm=max_norm,
                           norm_type=norm_type, bucket_bytes=128)
    ref = fastopt.SGD(ref_p, lr=0.1, momentum=0.9)
    norms = []
    for t in range(5):
        per_rank = [[sparse_grad(shapes[0], dtype, t, r), dense_grad(shapes[1], dtype, t, r),
                     dense_grad(shapes[2], dtype, t, r)] for r in range(N)]
        opt.step(per_rank[ME])
        g = averaged(per_rank, ref_p)
        total = fastopt.clip_grad_norm_([g[0].values, g[1], g[2]], max_norm, norm_type)
        ref.step(g)
        norms.append((opt.last_grad_norm, total))
    rtol = 1e-5 if dtype == np.float32 else 1e-11
    for a, b in zip(mine, ref_p):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol)
    assert identical_on_every_rank(mine)
    for a, b in norms:
        assert math.isclose(a, b, rel_tol=1e-12), (a, b)
    assert any(b > max_norm for _, b in norms)        # clipping happened


# --------------------------------------------------------------- state dicts

def _checkpoint_case(dtype=np.float32):
    """The configuration whose checkpoints move between world sizes."""
    names = ["emb", "w", "b", "s"]
    shapes = [(37, 4), (9, 7), (7,), ()]
    hyper = {"amsgrad": True, "lr": 0.01}

    def groups(ps):
        return [{"params": [ps["emb"], ps["s"]], "lr": 0.02},
                {"params": [ps["w"], ps["b"]], "weight_decay": 1e-2}]

    def local(t, r, order):
        sh = dict(zip(names, shapes))
        g = {"emb": sparse_grad(sh["emb"], dtype, t, r, seed=5),
             "w": dense_grad(sh["w"], dtype, t, r, seed=5),
             "b": dense_grad(sh["b"], dtype, t, r, seed=5),
             "s": dense_grad(sh["s"], dtype, t, r, seed=5)}
        return [g[k] for k in order]

    return names, shapes, hyper, groups, local


def _flat(groups):
    return [p for g in groups for p in g["params"]]


def _run_and_compare_from(sd, params0, world, steps=4, t0=100):
    """Load ``sd`` into a ShardedOptimizer over ``world`` and into the plain class;
    check the consolidated state equals ``sd``; step both; compare."""
    names, shapes, hyper, groups, local = _checkpoint_case()
    mine = dict(zip(names, [p.copy() for p in params0]))
    ref_p = dict(zip(names, [p.copy() for p in params0]))
    opt = ShardedOptimizer(fastopt.Adam, groups(mine), comm=world, **hyper)
    ref = fastopt.Adam(groups(ref_p), **hyper)
    opt.load_state_dict(sd)
    ref.load_state_dict(sd)
    back = opt.consolidated_state_dict(to=0)
    order = ["emb", "s", "w", "b"]
    for t in range(t0, t0 + steps):
        per_rank = [local(t, r, order) for r in range(world.size)]
        opt.step(per_rank[world.rank])
        ref.step(averaged(per_rank, _flat(groups(ref_p))))
    final = opt.consolidated_state_dict(to=0)
    ok = all(same(mine[k], ref_p[k]) for k in names)
    opt.close()
    return back, final, ref.state_dict(), ok


def test_reshard_to_every_smaller_world():
    names, shapes, hyper, groups, local = _checkpoint_case()
    params0 = init(shapes, np.float32)
    mine = dict(zip(names, [p.copy() for p in params0]))
    opt = ShardedOptimizer(fastopt.Adam, groups(mine), **hyper)
    order = ["emb", "s", "w", "b"]
    for t in range(5):
        opt.step(local(t, ME, order))
    sd = COMM.bcast(opt.consolidated_state_dict(to=0), root=0)
    now = [mine[k].copy() for k in names]
    checks = []
    for m in range(1, N + 1):
        sub = COMM.Split(0 if ME < m else MPI.UNDEFINED, ME)
        if sub != MPI.COMM_NULL:
            back, final, ref_sd, ok = _run_and_compare_from(sd, now, sub)
            if sub.rank == 0:
                assert_same_state_dict(back, sd)
                assert_same_state_dict(final, ref_sd)
            checks.append(ok)
            sub.Free()
        COMM.Barrier()
    assert all(checks)


def test_reshard_exact_mode_to_one_rank():
    hyper = {"lr": 0.05, "momentum": 0.9, "sparse_mode": "exact"}
    shapes = [(41, 3), (9,)]
    params0 = init(shapes, np.float64)

    def local(t, r):
        return [sparse_grad(shapes[0], np.float64, t, r, seed=7),
                dense_grad(shapes[1], np.float64, t, r, seed=7) if t % 3 else None]

    mine = [p.copy() for p in params0]
    opt = ShardedOptimizer(fastopt.SGD, mine, **hyper)
    for t in range(5):
        opt.step(local(t, ME))
    sd = COMM.bcast(opt.consolidated_state_dict(to=0), root=0)   # flushed everywhere
    now = [p.copy() for p in mine]
    ok, same_sd = True, True
    sub = COMM.Split(0 if ME == LAST else MPI.UNDEFINED, ME)
    if sub != MPI.COMM_NULL:                  # the last rank alone resumes the run
        ps = [p.copy() for p in now]
        ref_p = [p.copy() for p in now]
        o1 = ShardedOptimizer(fastopt.SGD, ps, comm=sub, **hyper)
        ref = fastopt.SGD(ref_p, **hyper)
        o1.load_state_dict(sd)
        ref.load_state_dict(sd)
        for t in range(5, 9):
            per_rank = [local(t, 0)]
            o1.step(per_rank[0])
            ref.step(averaged(per_rank, ref_p))
        o1.flush()
        ref.flush()
        ok = all(same(a, b) for a, b in zip(ps, ref_p))
        back = o1.state_dict()
        ref_sd = ref.state_dict()
        try:
            assert_same_state_dict(back, ref_sd)
        except AssertionError:
            same_sd = False
        o1.close()
        sub.Free()
    COMM.Barrier()
    assert identical_on_every_rank(now)
    assert ok and same_sd


def test_consolidate_to_any_rank_and_state_dict_rules():
    shapes = [(21, 3), (5,)]
    params = init(shapes, np.float64)
    opt = ShardedOptimizer(fastopt.NAdam, params)
    for t in range(3):
        opt.step([dense_grad(s, np.float64, t, ME) for s in shapes])
    got = [opt.consolidated_state_dict(to=r) for r in range(N)]
    for r in range(N):
        assert (got[r] is None) == (r != ME)
    mine = got[ME]
    assert_same_state_dict(opt.state_dict(), mine)        # after consolidating to ME
    assert isinstance(mine["state"][0]["mu_product"], float)
    opt.step([dense_grad(s, np.float64, 9, ME) for s in shapes])
    if N > 1:
        with pytest.raises(RuntimeError, match="consolidated_state_dict"):
            opt.state_dict()                              # stale: a step came since
    else:
        assert opt.state_dict()["state"][0]["step"] == 4  # one rank: consolidates itself
    with pytest.raises(ValueError, match="Invalid to"):
        opt.consolidated_state_dict(to=N)
    opt.step([dense_grad(s, np.float64, 10, ME) for s in shapes])   # still in step


def test_load_refuses_bad_state_dicts_on_every_rank():
    shapes = [(10, 2), (4,)]
    params = init(shapes, np.float64)
    opt = ShardedOptimizer(fastopt.Adam, params)
    ref = fastopt.Adam([p.copy() for p in params])
    g = [dense_grad(s, np.float64, 0, 0) for s in shapes]
    ref.step(g)
    good = ref.state_dict()
    bad = ref.state_dict()
    bad["state"][0]["exp_avg"] = np.zeros((11, 2))
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(bad)
    # one rank's dict is bad: it raises its own error, the others DistributedError
    one_bad = bad if ME == LAST else good
    err = ValueError if ME == LAST else DistributedError
    with pytest.raises(err):
        opt.load_state_dict(one_bad)
    sd = opt.consolidated_state_dict(to=0)
    if ME == 0:
        assert sd["state"] == {}                # nothing was loaded anywhere
    with pytest.raises(ValueError, match="optimizer"):
        opt.load_state_dict({**good, "optimizer": "SGD"})
    opt.load_state_dict(good)
    sd = opt.consolidated_state_dict(to=0)
    if ME == 0:
        assert_same_state_dict(sd, good)


def test_fastopt_save_and_load_with_a_scheduler():
    names, shapes, hyper, groups, local = _checkpoint_case(np.float64)
    params0 = init(shapes, np.float64)
    mine = dict(zip(names, [p.copy() for p in params0]))
    opt = ShardedOptimizer(fastopt.Adam, groups(mine), **hyper)
    sch = fastopt.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    order = ["emb", "s", "w", "b"]
    for t in range(3):
        opt.step(local(t, ME, order))
        sch.step()
    path = os.path.join(shared_dir(), f"save_load_{N}.npz")
    opt.consolidated_state_dict(to=0)
    if ME == 0:
        fastopt.save(path, opt, scheduler=sch, extra={"epoch": 3})
    COMM.Barrier()
    other = dict(zip(names, [mine[k].copy() for k in names]))
    opt2 = ShardedOptimizer(fastopt.Adam, groups(other), **hyper)
    sch2 = fastopt.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    extra = fastopt.load(path, opt2, scheduler=sch2)
    # a scheduler of another class: refused, nothing changed
    opt3 = ShardedOptimizer(fastopt.Adam, groups({k: v.copy() for k, v in mine.items()}),
                            **hyper)
    with pytest.raises(ValueError, match="scheduler"):
        fastopt.load(path, opt3, scheduler=fastopt.lr_scheduler.ExponentialLR(opt3, 0.9))
    for t in range(3, 6):
        opt.step(local(t, ME, order))
        opt2.step(local(t, ME, order))
        sch.step()
        sch2.step()
    a = opt.consolidated_state_dict(to=0)
    b = opt2.consolidated_state_dict(to=0)
    c = opt3.consolidated_state_dict(to=0)
    assert extra == {"epoch": 3}
    assert_same_params([other[k] for k in names], [mine[k] for k in names])
    if ME == 0:
        assert_same_state_dict(b, a)
        assert c["state"] == {}


def test_write_checkpoint_for_other_world_sizes():
    if SHARED_DIR is None:
        pytest.skip("FASTOPT_MPI_DIR is not set (the driver tests/test_distributed.py sets it)")
    names, shapes, hyper, groups, local = _checkpoint_case()
    params0 = init(shapes, np.float32)
    mine = dict(zip(names, [p.copy() for p in params0]))
    opt = ShardedOptimizer(fastopt.Adam, groups(mine), **hyper)
    order = ["emb", "s", "w", "b"]
    for t in range(6):
        opt.step(local(t, ME, order))
    opt.consolidated_state_dict(to=0)
    if ME == 0:
        np.savez(os.path.join(SHARED_DIR, f"params_w{N}.npz"), *[mine[k] for k in names])
        fastopt.save(os.path.join(SHARED_DIR, f"ckpt_w{N}.npz"), opt, extra={"world": N})
    COMM.Barrier()
    assert os.path.exists(os.path.join(SHARED_DIR, f"ckpt_w{N}.npz"))


def test_resume_checkpoints_of_other_world_sizes():
    if SHARED_DIR is None:
        pytest.skip("FASTOPT_MPI_DIR is not set (the driver tests/test_distributed.py sets it)")
    names, shapes, hyper, groups, local = _checkpoint_case()
    files = sorted(glob.glob(os.path.join(SHARED_DIR, "ckpt_w*.npz")))
    worlds = [int(re.search(r"ckpt_w(\d+)\.npz$", f).group(1)) for f in files]
    for f, w in zip(files, worlds):
        if w == N:
            continue
        with np.load(os.path.join(SHARED_DIR, f"params_w{w}.npz")) as z:
            params0 = [z[f"arr_{k}"] for k in range(len(names))]
        mine = dict(zip(names, [p.copy() for p in params0]))
        ref_p = dict(zip(names, [p.copy() for p in params0]))
        opt = ShardedOptimizer(fastopt.Adam, groups(mine), **hyper)
        ref = fastopt.Adam(groups(ref_p), **hyper)
        extra = fastopt.load(f, opt)
        fastopt.load(f, ref)
        back = opt.consolidated_state_dict(to=0)
        ref_sd = ref.state_dict()
        order = ["emb", "s", "w", "b"]
        for t in range(6, 10):
            per_rank = [local(t, r, order) for r in range(N)]
            opt.step(per_rank[ME])
            ref.step(averaged(per_rank, _flat(groups(ref_p))))
        assert extra == {"world": w}
        assert_same_params([mine[k] for k in names], [ref_p[k] for k in names])
        if ME == 0:
            assert_same_state_dict(back, ref_sd)
            assert back["state"][1]["step"] == 6      # "s": dense, stepped 6 times
            open(os.path.join(SHARED_DIR, f"resumed_w{w}_in_w{N}"), "w").close()
        COMM.Barrier()


def test_factored_whole_tensors_balanced_and_resumed():
    """Adafactor: each tensor (matrices, a stack, vectors, a scalar) is owned whole by
    one rank, balanced by cost; the step equals the single process's bit for bit;
    the consolidated state carries ``row_var``/``col_var``/``variance`` in their
    real shapes and resumes bit for bit in every smaller world (re-sharded)."""
    shapes = [(64, 48), (33, 17), (3, 20, 9), (40,), (), (16, 16), (8, 1)]
    hyper = {"lr": 0.05, "weight_decay": 0.01}
    params = init(shapes, np.float32, seed=3)

    def local(t, r):
        return [dense_grad(s, np.float32, t, r, seed=4) for s in shapes]

    mine, ref, opt, refopt, _ = run_pair(fastopt.Adafactor, params, hyper, local, 3,
                                         sharded_kw={"bucket_bytes": 1024})
    owners = [[r for r, (lo, hi) in enumerate(COMM.allgather(opt.shard_rows(i))) if hi > lo]
              for i in range(len(shapes))]
    loads = [0] * N
    for i, o in enumerate(owners):
        loads[o[0]] += int(np.prod(shapes[i], dtype=np.int64))
    sd = COMM.bcast(opt.consolidated_state_dict(to=0), root=0)
    want = refopt.state_dict()
    now = [p.copy() for p in mine]
    checks = []
    for m in range(1, N + 1):
        sub = COMM.Split(0 if ME < m else MPI.UNDEFINED, ME)
        if sub != MPI.COMM_NULL:
            a = [p.copy() for p in now]
            b = [p.copy() for p in now]
            o2 = ShardedOptimizer(fastopt.Adafactor, a, comm=sub, **hyper)
            r2 = fastopt.Adafactor(b, **hyper)
            o2.load_state_dict(sd)
            r2.load_state_dict(want)
            for t in range(3, 6):
                per_rank = [local(t, r) for r in range(sub.size)]
                o2.step(per_rank[sub.rank])
                r2.step(averaged(per_rank, b))
            final = o2.consolidated_state_dict(to=0)
            checks.append(all(same(x, y) for x, y in zip(a, b)))
            if sub.rank == 0:
                assert_same_state_dict(final, r2.state_dict())
            o2.close()
            sub.Free()
        COMM.Barrier()
    assert_same_params(mine, ref)
    assert all(len(o) == 1 for o in owners), owners
    assert max(loads) <= sum(loads) / N + 64 * 48, loads
    assert_same_state_dict(sd, want)
    assert sd["state"][0]["row_var"].shape == (64, 1)
    assert sd["state"][2]["col_var"].shape == (3, 1, 9)
    assert sd["state"][3]["variance"].shape == (40,)
    assert all(checks)


@pytest.mark.parametrize("overlap", [False, True])
def test_factored_steps_take_the_grouped_driver(monkeypatch, overlap):
    """A sharded Adafactor step of many small tensors runs the backend's grouped
    driver (one call per dtype over the tensors a rank owns), not the per-tensor
    passes (``fastopt.factored.run_tensor``, ~100 us of host work per tensor): the
    inner optimizer gets the gradient addresses from the engine's check, so every
    rank's owned tensors take it, also split by bucket (``overlap``); bit for bit
    the single process's parameters."""
    from fastopt import factored
    from fastopt.backends import numba_cpu
    calls = {"group": 0, "tensor": 0}
    real_group, real_tensor = numba_cpu.NumbaBackend.factored_group, factored.run_tensor

    def group(self, *a):
        calls["group"] += 1
        return real_group(self, *a)

    def tensor(*a):
        calls["tensor"] += 1
        return real_tensor(*a)
    monkeypatch.setattr(numba_cpu.NumbaBackend, "factored_group", group)
    monkeypatch.setattr(factored, "run_tensor", tensor)
    shapes = [(6, 5), (9,), (4, 3, 2)] * 12
    params = init(shapes, np.float32, seed=5)

    def local(t, r):
        return [dense_grad(s, np.float32, t, r, seed=6) for s in shapes]
    mine, ref, opt, _, _ = run_pair(fastopt.Adafactor, params, {"lr": 0.05, "backend": "numba"},
                                    local, 3, sharded_kw={"overlap": overlap,
                                                          "bucket_bytes": 512})
    owned = sum(opt.shard_rows(i)[1] > opt.shard_rows(i)[0] for i in range(len(shapes)))
    opt.close()
    assert_same_params(mine, ref)
    assert calls["tensor"] == 0, calls
    assert owned == 0 or calls["group"] >= 3 * 2, (calls, owned)     # sharded + reference


# --------------------------------------------------------- memory, volume

def test_state_is_sharded_by_rows():
    shapes = [(64, 8), (100,), (3, 3)]
    params = init(shapes, np.float32)
    opt = ShardedOptimizer(fastopt.Adam, params)
    ref = fastopt.Adam([p.copy() for p in params])
    g = [dense_grad(s, np.float32, 0, ME) for s in shapes]
    opt.step(g)
    ref.step(g)
    rows = [COMM.allgather(opt.shard_rows(i)) for i in range(3)]
    total = sum(v.nbytes for st in ref.state.values() for v in st.values()
                if isinstance(v, np.ndarray))
    mine = opt.state_bytes()
    all_bytes = COMM.allgather(mine)
    for i, rr in enumerate(rows):           # contiguous, in rank order, covering every row
        assert rr[0][0] == 0 and rr[-1][1] == shapes[i][0]
        assert all(a[1] == b[0] for a, b in zip(rr, rr[1:]))
    assert sum(all_bytes) == total
    widest = max(2 * 4 * int(np.prod(s[1:], dtype=np.int64)) for s in shapes)
    assert mine <= total / N + widest * 2
    st = opt.state
    assert set(st) == {0, 1, 2} and all(v["step"] == 1 for v in st.values())
    lo, hi = opt.shard_rows(0)
    assert st[0]["exp_avg"].shape == (hi - lo, 8)


def test_communication_volume_is_twice_the_parameter_bytes():
    shapes = [(1000, 6), (333,), (7, 7, 7)]
    params = init(shapes, np.float32)
    opt = ShardedOptimizer(fastopt.SGD, params, lr=0.01, bucket_bytes=4096)
    g = [dense_grad(s, np.float32, 0, ME) for s in shapes]
    opt.step(g)
    buffers = opt.buffer_bytes()
    opt.reset_stats()
    for t in range(3):
        opt.step(g)
    st = opt.stats
    item = 4
    nbytes = sum(int(np.prod(s)) for s in shapes) * item
    mine = sum((opt.shard_rows(i)[1] - opt.shard_rows(i)[0]) * int(np.prod(s[1:], dtype=np.int64))
               for i, s in enumerate(shapes)) * item
    per_step = st["bytes_received"] // 3
    assert per_step == (N - 1) * mine + (nbytes - mine)
    assert sum(COMM.allgather(per_step)) == 2 * (N - 1) * nbytes
    assert st["steps"] == 3 and st["step_s"] > 0
    assert opt.buffer_bytes() == buffers                  # reused, not regrown
    assert buffers <= 2 * 4096 + mine + 64


def overlap_cases():
    return [("Adam", {"lr": 0.01, "amsgrad": True}, {}, 8),
            ("Adam", {"lr": 0.01}, {"reuse_grads": True}, 200),
            ("SGD", {"lr": 0.1, "momentum": 0.9, "max_norm": 0.5}, {}, 1 << 20),
            ("Adafactor", {"lr": 0.05}, {}, 256),
            ("Muon", {"lr": 0.02}, {}, 512),
            ("LAMB", {"lr": 0.01}, {}, 200),
            ("Adam", {"lr": 0.01}, {"max_grad_norm": 1.0}, 200)]


@pytest.mark.parametrize("name,hyper,kw,bucket", overlap_cases(),
                         ids=lambda v: str(v) if not isinstance(v, dict) else
                         "-".join(f"{k}={x}" for k, x in v.items()) or "plain")
def test_overlap_equals_blocking_and_single_process(name, hyper, kw, bucket):
    """``overlap=True`` (non-blocking exchanges, the update split by bucket where no
    global decision needs every gradient first) gives the blocking step's parameters,
    state and byte counts bit for bit, and the single process's parameters; a step
    with a ``None`` gradient and a float64 parameter among float32 ones included; the
    split update runs where it should (an all-gather per bucket) and not where it
    must not (clipping, LAMB's whole-tensor norms)."""
    cls = getattr(fastopt, name)
    if name == "Muon":
        shapes, dts = [(24, 16), (3, 8, 8), (40, 12), (16, 16)], [np.float32] * 4
    else:
        shapes = [(37, 5), (3,), (), (100, 7), (0, 4), (64,), (5, 0), (211, 3), (9, 9)]
        dts = [np.float32, np.float64, np.float32, np.float32, np.float32, np.float64,
               np.float32, np.float32, np.float32]
    params = [np.asarray(_rng(7, k, 99).standard_normal(s)).astype(d)
              for k, (s, d) in enumerate(zip(shapes, dts))]

    def local(t, r):
        g = [dense_grad(s, d, t, r, seed=8) for s, d in zip(shapes, dts)]
        if t == 2:
            g[1] = None
        return g

    out = {}
    for ov in (False, True):
        mine, ref, opt, refopt, _ = run_pair(cls, params, hyper, local, 4,
                                             sharded_kw={"bucket_bytes": bucket,
                                                         "overlap": ov, **kw})
        out[ov] = ([p.copy() for p in mine], ref, opt.consolidated_state_dict(to=0),
                   refopt.state_dict(),
                   (opt.stats["bytes_received"], opt.stats["bytes_sent"]))
        if ov:          # one more step, counting the per-bucket all-gathers
            pieces = []
            real = opt._gather_piece
            opt._gather_piece = lambda dp, k: pieces.append(k) or real(dp, k)
            opt.step(local(0, ME))
        opt.close()
    # (LAMB's norms agree with one process to rounding only, and the reference is not
    # clipped: those two against the blocking step alone)
    single = name != "LAMB" and "max_grad_norm" not in kw
    split = N > 1 and single
    if single:
        assert_same_params(out[True][0], out[True][1])
    assert all(same(a, b) for a, b in zip(out[True][0], out[False][0]))
    assert identical_on_every_rank(out[True][0])
    assert out[True][4] == out[False][4]
    if ME == 0:
        assert_same_state_dict(out[True][2], out[False][2])
        if single:
            assert_same_state_dict(out[True][2], out[True][3])
    assert bool(pieces) == split, pieces


# ------------------------------------------------------------------ bad use

@needs_two
def test_different_shapes_fail_on_every_rank():
    shapes = [(4, 3), (5, 3) if ME == LAST else (5, 4)]
    with pytest.raises(DistributedError, match=rf"parameter 1 has shape .* on rank {LAST}"):
        ShardedOptimizer(fastopt.Adam, init(shapes, np.float32))
    with pytest.raises(DistributedError, match="dtype"):
        ShardedOptimizer(fastopt.Adam, init([(4,)], np.float32 if ME else np.float64))
    with pytest.raises(DistributedError, match="hyperparameters"):
        ShardedOptimizer(fastopt.Adam, init([(4,)], np.float32), lr=0.1 if ME else 0.2)


def test_invalid_input_on_one_rank_fails_on_every_rank():
    err = ValueError if ME == LAST else DistributedError
    with pytest.raises(err, match="lr" if ME == LAST else f"failed on rank {LAST}"):
        ShardedOptimizer(fastopt.Adam, init([(4,)], np.float32), lr=-1.0 if ME == LAST else 0.1)
    shapes = [(8, 3), (5,)]
    params = init(shapes, np.float64)
    mine = [p.copy() for p in params]
    opt = ShardedOptimizer(fastopt.Adam, mine)
    g = [dense_grad(s, np.float64, 0, ME) for s in shapes]
    opt.step(g)
    before = [p.copy() for p in mine]
    bad = list(g)
    if ME == LAST:
        bad[1] = np.zeros(6)
    with pytest.raises(err, match="shape" if ME == LAST else "failed on rank"):
        opt.step(bad)
    if ME == LAST:
        bad[1] = RowSparse(np.array([5]), np.ones(1))        # row 5 of 5: out of range
    with pytest.raises(IndexError if ME == LAST else DistributedError):
        opt.step(bad)
    unchanged = all(same(a, b) for a, b in zip(mine, before))
    opt.step(g)                                               # still in step
    assert unchanged
    assert identical_on_every_rank(mine)


@needs_two
def test_gradient_kinds_must_agree():
    shapes = [(8, 3), (5,)]
    opt = ShardedOptimizer(fastopt.Adam, init(shapes, np.float64))
    g = [dense_grad(s, np.float64, 0, ME) for s in shapes]
    kinds = list(g)
    if ME == LAST:
        kinds[0] = RowSparse(np.array([1]), np.ones((1, 3)))
    with pytest.raises(DistributedError, match=f"gradient 0 is sparse on rank {LAST}"):
        opt.step(kinds)
    nones = list(g)
    if ME == 0:
        nones[1] = None
    with pytest.raises(DistributedError, match="gradient 1 is dense on rank 1 but None"):
        opt.step(nones)
    with pytest.raises(DistributedError, match="grad_scale"):
        opt.step(g, grad_scale=2.0 if ME else 1.0)
    assert opt.step(g)


@needs_two
def test_a_rank_calling_something_else_fails_everywhere():
    shapes = [(8, 3)]
    opt = ShardedOptimizer(fastopt.SGD, init(shapes, np.float64), lr=0.1)
    g = [dense_grad(shapes[0], np.float64, 0, ME)]
    with pytest.raises(DistributedError, match="called"):
        if ME == 0:
            opt.step(g)                      # the others missed this step ...
        else:
            opt.consolidated_state_dict()    # ... and went on to checkpoint
    assert opt.step(g)


@needs_two
def test_a_rank_that_stops_calling_is_reported_after_the_timeout():
    opt = ShardedOptimizer(fastopt.SGD, init([(6,)], np.float64), lr=0.1)
    g = [dense_grad((6,), np.float64, 0, ME)]
    opt.step(g)
    COMM.Barrier()
    opt.timeout = 1.0
    with pytest.raises(ValueError, match="timeout"):
        opt.timeout = -1.0
    if ME == 0:
        with pytest.raises(DistributedError, match="timed out"):
            opt.step(g)                      # nobody else comes
        with pytest.raises(DistributedError, match="unusable"):
            opt.step(g)
    COMM.Barrier()


@needs_two
def test_param_groups_edited_on_one_rank():
    shapes = [(8, 3), (5,)]
    mine = init(shapes, np.float64)
    opt = ShardedOptimizer(fastopt.Adam, mine)
    g = [dense_grad(s, np.float64, 0, ME) for s in shapes]
    opt.step(g)
    if ME == LAST:
        opt.param_groups[0]["lr"] = 0.5
    with pytest.raises(DistributedError, match=rf"hyperparameters .*lr=0.5 on rank {LAST}"):
        opt.step(g)
    opt.param_groups[0]["lr"] = 0.5                           # now everywhere
    assert opt.step(g)
    assert identical_on_every_rank(mine)


def test_bad_edits_and_replaced_parameters():
    shapes = [(8, 3), (5,)]
    mine = init(shapes, np.float64)
    opt = ShardedOptimizer(fastopt.Adam, mine)
    g = [dense_grad(s, np.float64, 0, ME) for s in shapes]
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step(g)
    opt.param_groups[0]["lr"] = 1e-3
    assert opt.step(g)
    opt2 = ShardedOptimizer(fastopt.Adam, init(shapes, np.float64))
    opt2.param_groups[0]["params"][1] = np.zeros(5)
    with pytest.raises(ValueError, match="replaced"):
        opt2.step(g)
    with pytest.raises(TypeError, match="optimizer class"):
        ShardedOptimizer(dict, mine)
    with pytest.raises(ValueError, match="bucket_bytes"):
        ShardedOptimizer(fastopt.Adam, mine, bucket_bytes=0)
    with pytest.raises(TypeError, match="communicator"):
        ShardedOptimizer(fastopt.Adam, mine, comm="world")
    assert ShardedOptimizer("Lion", mine).rule.name == "Lion"


def test_close_frees_the_communicator():
    opt = ShardedOptimizer(fastopt.SGD, init([(6,)], np.float64), lr=0.1)
    opt.close()
    with pytest.raises(DistributedError, match="closed"):
        opt.step([np.zeros(6)])
    assert "rank" in repr(ShardedOptimizer(fastopt.SGD, init([(6,)], np.float64), lr=0.1))


# ------------------------------------- load_state_dict: the same dict on every rank

def outcome(fn, *args, **kw):
    """``(exception or None, result)`` of a collective call, so that a rank whose
    expectation fails still makes every later collective call (assert afterwards)."""
    try:
        return None, fn(*args, **kw)
    except Exception as e:          # noqa: BLE001 (recorded, asserted by the caller)
        return e, None


def _refused_everywhere(err):
    """What every rank must raise when the ranks were given different state dicts."""
    return isinstance(err, ValueError) and isinstance(err, StateDictMismatchError) \
        and "state dicts differ between ranks" in str(err) and "nothing was loaded" in str(err)


def _two_checkpoints():
    """Two valid Adam checkpoints of the same parameters with the same step counts
    (two runs that saw different gradients): a current and a stale copy."""
    shapes = [(13, 3), (6,)]
    params = init(shapes, np.float64)
    out = []
    for seed in (11, 12):
        ref = fastopt.Adam([p.copy() for p in params], lr=0.01)
        for t in range(3):
            ref.step([dense_grad(s, np.float64, t, 0, seed=seed) for s in shapes])
        out.append(ref.state_dict())
    return shapes, params, out


@needs_two
def test_load_refuses_different_checkpoints_on_different_ranks():
    shapes, params, (a, b) = _two_checkpoints()
    assert a["state"][0]["step"] == b["state"][0]["step"]
    opt = ShardedOptimizer(fastopt.Adam, [p.copy() for p in params], lr=0.01)
    opt.load_state_dict(a)
    results = []
    for stale in range(N):              # the stale copy on each rank in turn
        results.append(outcome(opt.load_state_dict, b if ME == stale else a)[0])
    # through files, as fastopt.load reads them: one node has a stale copy
    d = shared_dir()
    path_a = os.path.join(d, f"stitch_a_{N}.npz")
    path_b = os.path.join(d, f"stitch_b_{N}.npz")
    if ME == 0:
        ref = fastopt.Adam([p.copy() for p in params], lr=0.01)
        ref.load_state_dict(a)
        fastopt.save(path_a, ref)
        ref.load_state_dict(b)
        fastopt.save(path_b, ref)
    COMM.Barrier()
    results.append(outcome(fastopt.load, path_b if ME == LAST else path_a, opt)[0])
    back = opt.consolidated_state_dict(to=0)
    lr = opt.param_groups[0]["lr"]
    # the same checkpoint everywhere still loads, and is what the ranks hold
    opt.load_state_dict(b)
    after = opt.consolidated_state_dict(to=0)
    for err in results:
        assert _refused_everywhere(err), repr(err)
    assert "state 'exp_avg' of parameter 0 differs" in str(results[0])
    if ME == 0:
        assert_same_state_dict(back, a)          # nothing changed on any rank
        assert_same_state_dict(after, b)
    assert lr == 0.01


def _perturbations(name):
    """Per-rank differences a loaded state dict can have, each of them valid on its
    own: ``(label, function(sd), what the message names)``."""
    def nudge(i, key, index):
        def f(sd):
            a = sd["state"][i][key]
            a[index] = np.nextafter(a[index], np.inf)
        return f

    def setter(path, value):
        def f(sd):
            d = sd
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value
        return f

    def drop_state(sd):
        del sd["state"][2]

    out = [("first row", nudge(0, "exp_avg", (0, 0)), "state 'exp_avg' of parameter 0"),
           ("last row", nudge(0, "exp_avg_sq", (-1, -1)), "state 'exp_avg_sq' of parameter 0"),
           ("0-d parameter", nudge(1, "exp_avg", ()), "state 'exp_avg' of parameter 1"),
           ("signed zero", setter(("state", 2, "exp_avg", 4), -0.0),
            "state 'exp_avg' of parameter 2"),
           ("step", setter(("state", 2, "step"), 4), "state 'step' of parameter 2 is "),
           ("no state", drop_state, "parameter 2 has state 'exp_avg' on rank"),
           ("lr", setter(("param_groups", 1, "lr"), 0.5), "group 1 has lr="),
           ("betas", setter(("param_groups", 0, "betas"), (0.8, 0.999)), "group 0 has betas="),
           ("extra key", setter(("param_groups", 0, "initial_lr"), 0.05),
            "group 0 has initial_lr=")]
    if name == "Adam":
        out.append(("amsgrad slot", nudge(2, "max_exp_avg_sq", (7,)),
                    "state 'max_exp_avg_sq' of parameter 2"))
    else:
        out.append(("host scalar", setter(("state", 0, "mu_product"), 0.5),
                    "state 'mu_product' of parameter 0 is "))
    return out


@needs_two
@pytest.mark.parametrize("name,hyper", [("Adam", {"amsgrad": True}), ("NAdam", {})])
def test_load_refuses_any_per_rank_difference(name, hyper):
    """Matrix: every kind of per-rank difference (arrays, bits, steps, host scalars,
    missing state, hyperparameters, extra group keys) on every rank in turn is
    refused on every rank; then random single-bit flips; then dicts that differ only
    in layout (copies, Fortran order, names in another order) are accepted."""
    cls = fastopt.CLASSES[name]
    shapes = [(13, 3), (), (9,)]
    arrays = init(shapes, np.float64)

    def groups(ps):
        return [{"params": [ps[0], ps[1]], "lr": 0.02, "initial_lr": 0.02},
                {"params": [ps[2]], "weight_decay": 1e-2}]

    ref = cls(groups([a.copy() for a in arrays]), **hyper)
    for t in range(3):
        ref.step([dense_grad(s, np.float64, t, 0, seed=3) for s in shapes])
    base = ref.state_dict()
    base["state"][2]["exp_avg"][4] = 0.0          # a zero to flip the sign of
    opt = ShardedOptimizer(cls, groups([a.copy() for a in arrays]), **hyper)
    opt.load_state_dict(base)
    want_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    results, kept = [], []
    for label, change, says in _perturbations(name):
        other = copy.deepcopy(base)
        change(other)
        for d in range(N):
            err = outcome(opt.load_state_dict, other if ME == d else base)[0]
            results.append((label, d, err, says))
            kept.append([{k: v for k, v in g.items() if k != "params"}
                         for g in opt.param_groups] == want_groups)
    flips = []
    for trial in range(12):                       # any single bit of any array
        rng = _rng(77, trial)                     # the same draw on every rank
        other = copy.deepcopy(base)
        keys = [(i, k) for i in sorted(other["state"]) for k, v in other["state"][i].items()
                if isinstance(v, np.ndarray)]
        i, k = keys[int(rng.integers(len(keys)))]
        a = other["state"][i][k]
        bits = a.reshape(-1).view(np.uint64)
        bits[int(rng.integers(a.size))] ^= np.uint64(1) << np.uint64(int(rng.integers(64)))
        err = outcome(opt.load_state_dict, other if ME == trial % N else base)[0]
        flips.append((i, k, err))
    # the same state in other layouts, on some ranks: accepted
    layout = copy.deepcopy(base)
    for st in layout["state"].values():
        for k, v in st.items():
            if isinstance(v, np.ndarray) and v.ndim == 2:
                st[k] = np.asfortranarray(v)
    layout["state"] = dict(reversed(list(layout["state"].items())))
    accepted = outcome(opt.load_state_dict, layout if ME % 2 else base)[0]
    back = opt.consolidated_state_dict(to=0)
    for label, d, err, says in results:
        assert _refused_everywhere(err), (label, d, repr(err))
        assert says in str(err), (label, d, str(err))
    for i, k, err in flips:
        assert _refused_everywhere(err) and f"state {k!r} of parameter {i}" in str(err), \
            (i, k, repr(err))
    assert all(kept), "a refused load changed param_groups"
    assert accepted is None, repr(accepted)
    if ME == 0:
        assert_same_state_dict(back, base)        # nothing from a refused load stuck


def test_load_of_named_parameters_in_another_order_agrees():
    """Names matched across orders: the ranks hold the same state, so it loads."""
    names = ["a", "b", "c"]
    shapes = [(9, 2), (5,), (3, 3)]
    arrays = init(shapes, np.float64)
    ref = fastopt.Adam({n: a.copy() for n, a in zip(names, arrays)})
    ref.step({n: dense_grad(s, np.float64, 0, 0) for n, s in zip(names, shapes)})
    sd = ref.state_dict()
    order = [2, 0, 1]
    moved = {**sd, "param_names": [names[j] for j in order],
             "state": {k: sd["state"][j] for k, j in enumerate(order)}}
    opt = ShardedOptimizer(fastopt.Adam, {n: a.copy() for n, a in zip(names, arrays)})
    err = outcome(opt.load_state_dict, moved if ME == LAST else sd)[0]
    back = opt.consolidated_state_dict(to=0)
    assert err is None, repr(err)
    if ME == 0:
        assert_same_state_dict(back, sd)


# ------------------------------------------------ bfloat16 and storage options

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
#: 8-bit state needs >= 4096 elements: a 1-D tensor of 20 blocks (cut at block
#: multiples), rows of two blocks (300 = 256 + 44), rows of one; small tensors keep
#: float32 state; 0-d and empty tensors
STORAGE_SHAPES = [(5000,), (40, 300), (70, 100), (7,), (33, 17), (), (0,)]
STORAGE_CASES = [
    ("Adam", BF16, {"bf16_update": "split"}),
    ("Adam", BF16, {"bf16_update": "kahan"}),
    ("Adam", BF16, {"bf16_update": "stochastic", "seed": 5}),
    ("Adam", BF16, {"bf16_update": "nearest"}),
    ("Adam", np.float32, {"state_bits": 8}),
    ("Adam", np.float32, {"state_bits": 16}),
    ("Adam", np.float64, {"state_bits": 8}),
    ("AdamW", BF16, {"state_bits": 8, "bf16_update": "stochastic", "seed": 3}),
    ("Adam", BF16, {"state_bits": 16, "bf16_update": "kahan", "amsgrad": True}),
    ("RowWiseAdagrad", BF16, {"bf16_update": "stochastic", "seed": 9}),
    ("RowWiseAdagrad", BF16, {"bf16_update": "split", "state_bits": 8}),
    ("SGD", BF16, {"momentum": 0.9, "state_bits": 8, "bf16_update": "split"}),
    ("SGD", np.float32, {"momentum": 0.9, "nesterov": True, "state_bits": 8}),
    # the stored norm pass over row-range shards: the ranks' sums added in rank order
    ("LAMB", BF16, {"state_bits": 8, "bf16_update": "kahan", "weight_decay": 0.01}),
    ("LARS", np.float32, {"state_bits": 16, "nesterov": True}),
]


def storage_params(name, dtype, seed=1):
    shapes = [s for s in STORAGE_SHAPES
              if not (rules.RULES[name].layout == "rowwise" and len(s) == 0)]
    rng = _rng(seed, 98)
    return [np.asarray(rng.standard_normal(s) * 0.5).astype(np.float32).astype(dtype)
            for s in shapes]


def storage_grads(params, t, r):
    """Dense gradients; those of bfloat16 parameters alternate between bfloat16 and
    float32 (each rank's converted to float32 before averaging)."""
    out = []
    for k, p in enumerate(params):
        g = dense_grad(p.shape, np.float32, t, r, seed=11 + k)
        if p.dtype == BF16 and (k + t) % 2:
            g = g.astype(BF16)
        elif p.dtype != BF16:
            g = g.astype(p.dtype)
        out.append(g)
    return out


@pytest.mark.parametrize("name,dtype,hyper", [
    pytest.param(n, d, h, id=f"{n}-{np.dtype(d).name}-" + "-".join(
        f"{k}={v}" for k, v in h.items())) for n, d, h in STORAGE_CASES])
def test_storage_options_equal_single_process(name, dtype, hyper):
    """bfloat16 parameters (every bf16_update) and 8/16-bit state, bit for bit the
    single process on the averaged gradients (float32 averages for bfloat16
    parameters); the consolidated state dict is the single process's (8-bit scales,
    master_low, kahan_comp included), loads into the plain class, and both go on
    identically."""
    cls = fastopt.CLASSES[name]
    params = storage_params(name, dtype)
    hyper = {"lr": 0.01, **hyper}
    mine, ref_p, opt, ref, _ = run_pair(
        cls, params, hyper, lambda t, r: storage_grads(params, t, r), 4)
    sd = opt.consolidated_state_dict(to=0)
    assert_same_params(mine, ref_p)
    if ME == 0:
        assert_same_state_dict(sd, ref.state_dict())
    # the consolidated dict in one process (fresh copies of the parameters), and the
    # single-process dict re-sharded into a new ShardedOptimizer: both continue
    sd = COMM.bcast(sd, root=0)
    one_p = [p.copy() for p in ref_p]
    one = cls(one_p, **hyper)
    one.load_state_dict(sd)
    again_p = [p.copy() for p in ref_p]
    again = ShardedOptimizer(cls, again_p, **hyper)
    again.load_state_dict(ref.state_dict())
    for t in range(4, 7):
        per_rank = [storage_grads(params, t, r) for r in range(N)]
        avg = averaged(per_rank, ref_p)
        opt.step(per_rank[ME])
        again.step(per_rank[ME])
        ref.step(avg)
        one.step([None if g is None else g.copy() for g in avg])
    final = again.consolidated_state_dict(to=0)
    assert_same_params(mine, ref_p)
    assert_same_params(one_p, ref_p)
    assert_same_params(again_p, ref_p)
    if ME == 0:
        assert_same_state_dict(final, ref.state_dict())
        assert_same_state_dict(one.state_dict(), ref.state_dict())


def test_storage_options_per_group_and_added_groups():
    """Groups with their own storage options (8-bit, 16-bit, bfloat16 stochastic
    with its own seed), one of them added later."""
    f32 = storage_params("Adam", np.float32, seed=2)
    bf = storage_params("Adam", BF16, seed=3)

    def make(cls, ps, **kw):
        return cls([{"params": ps[0][:3], "state_bits": 8},
                    {"params": ps[1][:3], "bf16_update": "stochastic", "seed": 17,
                     "lr": 0.02}], bf16_update="kahan", state_bits=16, **kw)

    mine = [[p.copy() for p in f32], [p.copy() for p in bf]]
    ref_p = [[p.copy() for p in f32], [p.copy() for p in bf]]
    opt = make(lambda g, **kw: ShardedOptimizer(fastopt.AdamW, g, **kw), mine)
    ref = make(fastopt.AdamW, ref_p)
    extra = {"params": mine[1][3:], "bf16_update": "nearest", "state_bits": 8}
    flat_mine = mine[0][:3] + mine[1][:3]
    flat_ref = ref_p[0][:3] + ref_p[1][:3]
    for t in range(5):
        if t == 2:
            opt.add_param_group(extra)
            ref.add_param_group({**extra, "params": ref_p[1][3:]})
            flat_mine = flat_mine + mine[1][3:]
            flat_ref = flat_ref + ref_p[1][3:]
        per_rank = [storage_grads(flat_ref, t, r) for r in range(N)]
        opt.step(per_rank[ME])
        ref.step(averaged(per_rank, flat_ref))
    sd = opt.consolidated_state_dict(to=0)
    assert_same_params(flat_mine, flat_ref)
    if ME == 0:
        assert_same_state_dict(sd, ref.state_dict())


@pytest.mark.parametrize("mode", ["lazy", "exact"])
def test_sparse_gradients_with_storage_options(mode):
    """Row-sparse gradients of bfloat16 parameters (stochastic rounding) and of 2-D
    parameters with 8-bit state, lazy and exact (SGD with momentum), beside dense
    ones."""
    name = "Adam" if mode == "lazy" else "SGD"
    hyper = {"lr": 0.01} if mode == "lazy" else {"lr": 0.05, "momentum": 0.9}
    shapes = [(40, 300), (40, 300), (9,)]
    rng = _rng(4, 97)
    params = [np.asarray(rng.standard_normal(shapes[0])).astype(np.float32).astype(BF16),
              np.asarray(rng.standard_normal(shapes[1])).astype(np.float32),
              np.asarray(rng.standard_normal(shapes[2])).astype(np.float32).astype(BF16)]

    def make(cls, ps, **kw):
        return cls([{"params": [ps[0], ps[2]], "bf16_update": "stochastic", "seed": 4},
                    {"params": [ps[1]], "state_bits": 8}], sparse_mode=mode, **hyper, **kw)

    def local(t, r):
        return [sparse_grad(shapes[0], np.float32, t, r, seed=21),
                dense_grad(shapes[2], np.float32, t, r, seed=22),
                sparse_grad(shapes[1], np.float32, t, r, seed=23)]

    mine = [p.copy() for p in params]
    ref_p = [p.copy() for p in params]
    opt = make(lambda g, **kw: ShardedOptimizer(fastopt.CLASSES[name], g, **kw), mine)
    ref = make(fastopt.CLASSES[name], ref_p)
    for t in range(5):
        per_rank = [local(t, r) for r in range(N)]
        opt.step(per_rank[ME])
        ref.step(averaged(per_rank, [ref_p[0], ref_p[2], ref_p[1]]))
    sd = opt.consolidated_state_dict(to=0)        # (exact mode: flushed first)
    ref.flush()
    assert_same_params(mine, ref_p)
    if ME == 0:
        assert_same_state_dict(sd, ref.state_dict())


def test_row_steps_of_1d_8bit_parameters_are_refused_on_every_rank():
    """A sparse gradient or max_norm on a 1-D parameter with 8-bit state: the plain
    class's error, on every rank, before anything changes."""
    p = np.zeros(5000, np.float32)
    opt = ShardedOptimizer(fastopt.Adam, [p], state_bits=8)
    err = outcome(opt.step, [RowSparse(np.array([3]), np.ones(1, np.float32))])[0]
    clipped = ShardedOptimizer(fastopt.Adam, [np.zeros(5000, np.float32)], state_bits=8,
                               max_norm=1.0)
    err2 = outcome(clipped.step, [np.ones(5000, np.float32)])[0]
    ok = opt.step([np.ones(5000, np.float32)])
    assert isinstance(err, ValueError) and "blocks of 256" in str(err), repr(err)
    assert isinstance(err2, ValueError) and "max_norm" in str(err2), repr(err2)
    assert ok and opt.state[0]["step"] == 1


def test_1d_8bit_parameters_are_cut_at_block_multiples():
    """A 1-D parameter with 8-bit state is cut at multiples of Q8_BLOCK elements
    (the blocks do not depend on the sharding); one below Q8_MIN_SIZE keeps float32
    state on every piece, whatever the pieces' sizes."""
    from fastopt import storage
    params = [np.zeros(5000, np.float32), np.zeros(4000, np.float32), np.zeros(4100)]
    opt = ShardedOptimizer(fastopt.Adam, params, state_bits=8)
    opt.step([np.ones(5000, np.float32), np.ones(4000, np.float32), np.ones(4100)])
    cuts = [COMM.allgather(opt.shard_rows(i)) for i in range(3)]
    dtypes = [opt.state[i]["exp_avg"].dtype for i in range(3)]
    for i in (0, 2):
        assert all(a % storage.Q8_BLOCK == 0 or a == b == params[i].size
                   for a, b in cuts[i]), cuts[i]
    assert dtypes == [np.uint8, np.float32, np.uint8]


# ---------------------------------------------------------------- add_param_group

ADD_GROUP_CASES = [("Adam", {"amsgrad": True}),
                   ("SGD", {"lr": 0.05, "momentum": 0.9, "sparse_mode": "exact"}),
                   ("RowWiseAdagrad", {"max_norm": 1.0})]


@pytest.mark.parametrize("name,hyper", ADD_GROUP_CASES)
def test_add_param_group_equals_single_process(name, hyper):
    cls = fastopt.CLASSES[name]
    rowwise = rules.RULES[name].layout == "rowwise"
    first = [(30, 4), (7,)]
    later = [(21, 3), (11,), (5,) if rowwise else ()]
    later_dt = [np.float64, np.float32, np.float64]      # a dtype the first group lacks
    p_first = init(first, np.float32)
    p_later = init(later, later_dt, seed=2)
    mine = [p.copy() for p in p_first]
    mine_later = [p.copy() for p in p_later]
    ref_p = [p.copy() for p in p_first]
    ref_later = [p.copy() for p in p_later]
    opt = ShardedOptimizer(cls, mine, bucket_bytes=160, **hyper)
    ref = cls(ref_p, **hyper)
    group = {"lr": 0.01, "initial_lr": 0.01}

    def local(t, r):
        g = [sparse_grad(first[0], np.float32, t, r) if t % 2 else
             dense_grad(first[0], np.float32, t, r), dense_grad(first[1], np.float32, t, r)]
        if t >= 3:
            g += [sparse_grad(later[0], np.float64, t, r) if t % 2 else
                  dense_grad(later[0], np.float64, t, r),
                  dense_grad(later[1], np.float32, t, r), dense_grad(later[2], np.float64, t, r)]
        return g

    for t in range(7):
        if t == 3:
            opt.add_param_group({"params": mine_later, **group})
            ref.add_param_group({"params": ref_later, **group})
        per_rank = [local(t, r) for r in range(N)]
        opt.step(per_rank[ME])
        ref.step(averaged(per_rank, ref_p + (ref_later if t >= 3 else [])))
    sd = opt.consolidated_state_dict(to=0)
    ref_sd = ref.state_dict()
    rows = [COMM.allgather(opt.shard_rows(i)) for i in range(5)]
    held = sum(COMM.allgather(opt.state_bytes()))
    # a checkpoint of the grown optimizer resumes in one built with both groups
    full = COMM.bcast(sd, root=0)
    again = [p.copy() for p in mine]
    again_later = [p.copy() for p in mine_later]
    opt2 = ShardedOptimizer(cls, [{"params": again}, {"params": again_later, **group}],
                            **hyper)
    opt2.load_state_dict(full)
    for t in range(7, 9):
        per_rank = [local(t, r) for r in range(N)]
        opt.step(per_rank[ME])
        opt2.step(per_rank[ME])
        ref.step(averaged(per_rank, ref_p + ref_later))
    assert_same_params(mine + mine_later, ref_p + ref_later)
    assert_same_params(again + again_later, ref_p + ref_later)
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["initial_lr"] == 0.01
    assert opt.param_groups[1]["params"][0] is mine_later[0]
    for i, rr in enumerate(rows):        # every parameter's rows covered, in rank order
        n = (first + later)[i][0] if (first + later)[i] else 1
        assert rr[0][0] == 0 and rr[-1][1] == n and all(x[1] == y[0] for x, y in zip(rr, rr[1:]))
    if ME == 0:
        assert_same_state_dict(sd, ref_sd)
        assert held == sum(v.nbytes for st in ref_sd["state"].values() for v in st.values()
                           if isinstance(v, np.ndarray))


def test_add_param_group_refusals_change_nothing():
    shapes = [(8, 3), (5,)]
    mine = init(shapes, np.float64)
    ref_p = [p.copy() for p in mine]
    opt = ShardedOptimizer(fastopt.Adam, mine)
    ref = fastopt.Adam(ref_p)
    g = [dense_grad(s, np.float64, 0, ME) for s in shapes]
    errs = {
        "bf16_update": outcome(opt.add_param_group,
                               {"params": [np.zeros(4)], "bf16_update": "nearest"})[0],
        "overlap": outcome(opt.add_param_group, {"params": [mine[1][1:3]]})[0],
        "no params": outcome(opt.add_param_group, {"lr": 0.1})[0],
        "bad lr": outcome(opt.add_param_group, {"params": [np.zeros(3)], "lr": -1.0})[0],
    }
    opt.param_groups.append({"params": [np.zeros(3)], "lr": 0.1})
    errs["appended"] = outcome(opt.step, g)[0]
    opt.param_groups.pop()
    opt.param_groups[0]["params"].append(np.zeros(3))
    errs["params appended"] = outcome(opt.step, g)[0]
    opt.param_groups[0]["params"].pop()
    named = ShardedOptimizer(fastopt.Adam, {"w": np.zeros(3)})
    errs["named"] = outcome(named.add_param_group, {"params": [np.zeros(2)]})[0]
    per_rank = [[dense_grad(s, np.float64, 1, r) for s in shapes] for r in range(N)]
    ok = opt.step(per_rank[ME])                               # still in step
    ref.step(averaged(per_rank, ref_p))
    assert ok and len(opt.param_groups) == 1
    assert isinstance(errs["bf16_update"], ValueError) and \
        "applies to bfloat16 parameters" in str(errs["bf16_update"]), repr(errs["bf16_update"])
    assert isinstance(errs["overlap"], ValueError) and "overlaps" in str(errs["overlap"])
    assert isinstance(errs["no params"], TypeError), repr(errs["no params"])
    assert isinstance(errs["bad lr"], ValueError) and "lr" in str(errs["bad lr"])
    for k in ("appended", "params appended"):
        assert isinstance(errs[k], ValueError) and "add_param_group" in str(errs[k]) and \
            "every rank" in str(errs[k]), (k, repr(errs[k]))
    assert isinstance(errs["named"], ValueError) and "by name" in str(errs["named"])
    assert_same_params(mine, ref_p)


@needs_two
def test_add_param_group_must_be_the_same_on_every_rank():
    shapes = [(8, 3), (5,)]
    mine = init(shapes, np.float64)
    opt = ShardedOptimizer(fastopt.Adam, mine)
    g = [dense_grad(s, np.float64, 0, ME) for s in shapes]
    errs = [
        outcome(opt.add_param_group, {"params": [np.zeros((4, 3) if ME == LAST else (4, 2))]})[0],
        outcome(opt.add_param_group, {"params": [np.zeros(4)],
                                      "lr": 0.1 if ME == LAST else 0.2})[0],
        outcome(opt.add_param_group, {"params": [np.zeros(4)] * (2 if ME == LAST else 1)})[0],
        outcome(opt.add_param_group, {"params": [np.zeros(4)],
                                      "lr": -1.0 if ME == LAST else 0.1})[0],
    ]
    missed = outcome(lambda: opt.step(g) if ME == 0 else
                     opt.add_param_group({"params": [np.zeros(4)]}))[0]
    ok = opt.step(g)
    assert isinstance(errs[0], DistributedError) and \
        f"parameter 0 of the group has shape (4, 3) and dtype float64 on rank {LAST}" in \
        str(errs[0]), repr(errs[0])
    assert isinstance(errs[1], DistributedError) and "lr=0.1 on rank" in str(errs[1])
    if ME == LAST:
        assert isinstance(errs[2], ValueError) and "appears twice" in str(errs[2])
        assert isinstance(errs[3], ValueError) and "lr" in str(errs[3])
    else:
        assert isinstance(errs[2], DistributedError) and "failed on rank" in str(errs[2])
        assert isinstance(errs[3], DistributedError) and "failed on rank" in str(errs[3])
    assert isinstance(missed, DistributedError) and "called" in str(missed), repr(missed)
    assert ok and len(opt.param_groups) == 1 and len(opt.state) == 2
    assert identical_on_every_rank(mine)


def test_default_timeout_is_finite_and_none_waits_forever():
    opt = ShardedOptimizer(fastopt.SGD, init([(6,)], np.float64), lr=0.1)
    forever = ShardedOptimizer(fastopt.SGD, init([(6,)], np.float64), lr=0.1, timeout=None)
    assert opt.timeout == DEFAULT_TIMEOUT == 1800.0
    assert forever.timeout is None
    assert opt.step([np.ones(6)]) and forever.step([np.ones(6)])


# ------------------------------------------------------------ per-tensor rules

@pytest.mark.parametrize("name", [n for n, r in rules.RULES.items() if r.per_tensor])
def test_per_tensor_rules_resume_bit_identically(name):
    """LAMB/LARS sharded: the norms of whole tensors (the ranks' parts added in rank
    order) are the same on every rank; a consolidated state dict loaded into a new
    ShardedOptimizer halfway goes on bit for bit as the run that never stopped; and
    the single process agrees to rounding."""
    cls = fastopt.CLASSES[name]
    hyper = dict(rules.RULES[name].variants[1])
    shapes = [(41, 5), (7,), (), (3, 2, 4)]
    params = init(shapes, np.float32)

    def local(t, r):
        return [dense_grad(s, np.float32, t, r, seed=31) for s in shapes]

    mine, ref, opt, refopt, _ = run_pair(cls, params, hyper, local, 3)
    sd = COMM.bcast(opt.consolidated_state_dict(to=0), root=0)
    resumed = [p.copy() for p in mine]
    again = ShardedOptimizer(cls, resumed, **hyper)
    again.load_state_dict(sd)
    for t in range(3, 7):
        g = local(t, ME)
        opt.step(g)
        again.step(g)
        refopt.step(averaged([local(t, r) for r in range(N)], ref))
    for a, b in zip(mine, resumed):
        assert same(a, b)
    assert identical_on_every_rank(mine)
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_per_tensor_rules_refuse_the_reference_backend():
    with pytest.raises(NotImplementedError, match="whole tensor"):
        ShardedOptimizer(fastopt.LAMB, [np.ones(4)], backend="numpy")
