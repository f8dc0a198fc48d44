"""The Cython backend (``fastopt._cy_dense``, ``kernels/_cy_rules.pxd``) against the
rule math of :mod:`fastopt.rules`, the Numba driver and the NumPy reference.

(a) element math: every rule x registry variant x dtype, on awkward inputs (zeros
    of both signs, 1e3, 1e-6, NaN, +-Inf), bit for bit against the Python rule
    functions called with NumPy scalars of the dtype.  Both sides do the same IEEE
    operations in the same order and dtype (sqrt and division are correctly rounded,
    no FMA contraction), so no tolerance is needed;
(b) the optimizer classes with ``backend="cython"``: against the NumPy reference
    (the registry-driven suite of ``test_rules_vs_reference.py``, run here until
    ``conftest.CPU_BACKENDS`` includes "cython" by itself) and bit for bit against
    ``backend="numba"``;
(c) the same bits with 1 and 2 OpenMP threads, and serial vs parallel driver;
(d) errors come from the shared Python layer: the same types as with numba;
(e) row-sparse (lazy) steps: ``CythonBackend.run_rows`` bit for bit against Numba's
    ``launch_rows`` (serial and parallel paths, Zipf gradients with many
    duplicates), the same bits with 1 and 2 OpenMP threads, plan validation.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _cython_backend, _numba_cpu, backends, registry, rules
from fastopt.sparse import coalesce_plan

BACKEND = _cython_backend.register_backend()   # idempotent; fastopt may already do it
if BACKEND is None:
    pytest.skip("the Cython extension fastopt._cy_dense is not built", allow_module_level=True)

from fastopt import _cy_dense  # noqa: E402

import test_rules_vs_reference as ref_suite  # noqa: E402
from conftest import (CPU_BACKENDS, DTYPES, SHAPES, awkward_grads, init_params,  # noqa: E402
                      rule_cases)

DTYPE_IDS = lambda d: np.dtype(d).name  # noqa: E731

#: awkward element values: signed zeros, large, tiny, ordinary, non-finite
AWKWARD = [0.0, -0.0, 1e3, -1e3, 1e-6, -1e-6, 0.5, -2.0, 3.25, np.nan, np.inf, -np.inf]


def _bits_equal(a, b):
    """Bit-identical, except that any NaN equals any NaN."""
    a, b = np.asarray(a), np.asarray(b)
    if np.isnan(a) or np.isnan(b):
        return bool(np.isnan(a) and np.isnan(b))
    return a.tobytes() == b.tobytes()


def _inputs(rng, dtype, n):
    """n rows (p, g, s0, s1, s2): all-awkward rows, mixed rows and random rows."""
    aw = np.array(AWKWARD)
    rows = [rng.choice(aw, 5) for _ in range(n // 2)]
    for _ in range(n - len(rows)):
        r = rng.standard_normal(5) * 10.0 ** rng.integers(-6, 4, 5)
        r[rng.random(5) < 0.2] = 0.0
        rows.append(r)
    # states that only make sense non-negative (v, sum) also as such
    rows += [np.abs(r) for r in rows[: n // 4]]
    return np.array(rows).astype(dtype)


def _scalar_sets(rule, variant):
    """(label, scalars) for the variant's group at steps 1 (fresh state) and 7."""
    group = rule.check_group({**rule.defaults, **variant})
    host = rule.host_init(group)
    out = []
    for step, fresh in ((1, set(rule.slots)), (7, set())):
        c, host2 = rule.scalars(group, step, host, fresh)
        out.append((f"step{step}", c))
        host = host2 if host2 else host
    return out


# ---------------------------------------------------------------- (a) math

def test_every_registry_rule_has_a_cython_copy():
    ids = BACKEND.rule_ids
    assert list(ids) == list(registry.RULES)
    missing = [name for name, rid in ids.items() if rid is None]
    assert not missing, f"no Cython math for {missing}"
    for name, rule in registry.RULES.items():
        names = _cy_dense.ROWWISE_NAMES if rule.layout == "rowwise" else _cy_dense.MATH_NAMES
        assert names[ids[name]] == rule.math.__name__


def elementwise_cases():
    return [c for c in rule_cases() if registry.RULES[c.values[0]].layout != "rowwise"]


def rowwise_cases():
    return [c for c in rule_cases() if registry.RULES[c.values[0]].layout == "rowwise"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,k", elementwise_cases())
def test_element_math_bit_identical(name, k, dtype):
    rule = registry.RULES[name]
    rid = BACKEND.rule_id(rule)
    py = getattr(rules, rule.math.__name__)      # the plain Python function
    dt = np.dtype(dtype).type
    rng = np.random.default_rng(1000 + 10 * k)
    rows = _inputs(rng, dtype, 200)
    checked = 0
    for label, c64 in _scalar_sets(rule, rule.variants[k]):
        c = tuple(dt(x) for x in c64)            # the drivers' cast of the host scalars
        for row in rows:
            p, g, s0, s1, s2 = (dt(x) for x in row)
            with np.errstate(all="ignore"):
                want = py(p, g, s0, s1, s2, c)
            got = _cy_dense.math_elem(rid, p, g, s0, s1, s2, c, dtype)
            for what, w, v in zip(("p", "s0", "s1", "s2"), want, got):
                assert type(v) is dt
                assert _bits_equal(dt(w), v), (
                    f"{name} v{k} {label} {np.dtype(dtype).name} {what}: "
                    f"inputs {row.tolist()} python {w!r} cython {v!r}")
            checked += 1
    assert checked == 2 * len(rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,k", rowwise_cases())
def test_row_math_bit_identical(name, k, dtype):
    """Row-wise rules: whole rows (lengths 1..33, awkward values) through the Cython
    copy and through the Python function, bit for bit (row and accumulator)."""
    rule = registry.RULES[name]
    rid = BACKEND.rule_id(rule)
    py = getattr(rules, rule.math.__name__)
    dt = np.dtype(dtype).type
    rng = np.random.default_rng(2000 + 10 * k)
    aw = np.array(AWKWARD)
    checked = 0
    for label, c64 in _scalar_sets(rule, rule.variants[k]):
        c = tuple(dt(x) for x in c64)
        for n in (1, 2, 7, 33):
            for trial in range(30):
                if trial % 3 == 0:
                    prow, grow = rng.choice(aw, n), rng.choice(aw, n)
                else:
                    prow = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 4, n)
                    grow = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 4, n)
                    grow[rng.random(n) < 0.2] = 0.0
                prow, grow = prow.astype(dtype), grow.astype(dtype)
                acc = dt(abs(rng.standard_normal()) if trial % 2 else 0.0)
                want_p = prow.copy()
                with np.errstate(all="ignore"):
                    want_acc = py(want_p, grow, acc, dt(1) / dt(n), dt(0), c)
                got_p = prow.copy()
                got_acc = _cy_dense.math_row(rid, got_p, grow, acc, c)
                assert type(got_acc) is dt
                assert _bits_equal(dt(want_acc), got_acc), (name, label, n, trial)
                for w, v in zip(want_p, got_p):
                    assert _bits_equal(w, v), (name, label, n, trial, prow, grow)
                checked += 1
    assert checked == 2 * 4 * 30


def test_math_row_rejects_bad_arguments():
    c = (0.0,) * registry.NSCALARS
    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError):
        _cy_dense.math_row(len(_cy_dense.ROWWISE_NAMES), p, p.copy(), 0.0, c)
    with pytest.raises(ValueError):
        _cy_dense.math_row(0, p, np.zeros(3, np.float64), 0.0, c)
    with pytest.raises(ValueError):
        _cy_dense.math_row(0, p, p.copy(), 0.0, c[:4])


def test_math_elem_rejects_bad_arguments():
    c = (0.0,) * registry.NSCALARS
    with pytest.raises(ValueError):
        _cy_dense.math_elem(len(_cy_dense.MATH_NAMES), 0, 0, 0, 0, 0, c, np.float32)
    with pytest.raises(ValueError):
        _cy_dense.math_elem(0, 0, 0, 0, 0, 0, c[:5], np.float32)
    with pytest.raises(TypeError):
        _cy_dense.math_elem(0, 0, 0, 0, 0, 0, c, np.float16)


# --------------------------------------------------- (b) through the optimizer

@pytest.mark.skipif("cython" in CPU_BACKENDS,
                    reason="covered by test_rules_vs_reference.py (CPU_BACKENDS has cython)")
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,k", rule_cases())
def test_matches_reference(name, k, dtype):
    ref_suite.test_matches_reference(name, k, "cython", dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,k", rule_cases())
def test_bit_identical_to_numba(name, k, dtype):
    """Same math, same order, same dtype: the two CPU drivers agree bit for bit."""
    variant = registry.RULES[name].variants[k]
    grads = awkward_grads(SHAPES, dtype, 12, seed=k)
    grads[4][0][:3] = (np.nan, np.inf, -np.inf)
    out = {}
    for backend in ("numba", "cython"):
        params = init_params(SHAPES, dtype)
        opt = fastopt.CLASSES[name](params, backend=backend, **variant)
        for gs in grads:
            opt.step(gs)
        out[backend] = (params, opt.state_dict()["state"])
    for a, b in zip(out["numba"][0], out["cython"][0]):
        np.testing.assert_array_equal(a, b)
    for i, st in out["numba"][1].items():
        for key, val in st.items():
            np.testing.assert_array_equal(out["cython"][1][i][key], val, err_msg=key)


def test_groups_dtypes_and_skipped_params():
    """Several groups (several hyper rows), two dtypes (two buckets), a None grad."""
    def run(backend):
        ps = init_params([(50_000,), (3, 5), (40_000,)], np.float32) \
            + init_params([(1000,)], np.float64)
        opt = fastopt.Adam([{"params": ps[:2], "lr": 0.1},
                            {"params": ps[2:], "amsgrad": True, "weight_decay": 0.1}],
                           backend=backend)
        for t, gs in enumerate(awkward_grads([p.shape for p in ps], np.float64, 6)):
            gs = [g.astype(p.dtype) for g, p in zip(gs, ps)]
            if t % 2:
                gs[1] = None
            opt.step(gs)
        return ps, opt.state_dict()
    (pn, sn), (pc, sc) = run("numba"), run("cython")
    for a, b in zip(pn, pc):
        np.testing.assert_array_equal(a, b)
    assert [sc["state"][i]["step"] for i in range(4)] == [6, 3, 6, 6]


# ------------------------------------------------- (c) threads, serial/parallel

_THREAD_SCRIPT = r"""
import hashlib, sys
import numpy as np
import fastopt
from fastopt import _cython_backend, _cy_dense, registry
_cython_backend.register_backend()
print("threads", _cy_dense.openmp_max_threads())
rng = np.random.default_rng(0)
n = 3 * 32768 + 777
for name in registry.RULES:
    for dt in (np.float32, np.float64):
        p = rng.standard_normal(n).astype(dt)
        opt = fastopt.CLASSES[name]([p], backend="cython")
        for _ in range(3):
            opt.step([rng.standard_normal(n).astype(dt)])
        print(name, np.dtype(dt).name, hashlib.sha256(p.tobytes()).hexdigest())
"""


def test_same_bits_with_one_and_two_openmp_threads():
    assert 3 * 32768 + 777 >= 2 * _numba_cpu.PARALLEL_MIN
    outs = {}
    here = os.path.dirname(os.path.abspath(__file__))
    for nthreads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(nthreads))
        res = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], env=env, cwd=here,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0] == f"threads {nthreads}"
        outs[nthreads] = lines[1:]
    assert len(outs[1]) == 2 * len(registry.RULES)
    assert outs[1] == outs[2]


@pytest.mark.parametrize("name", list(registry.RULES))
def test_serial_and_parallel_driver_agree(name, monkeypatch):
    def run(parallel_min):
        monkeypatch.setattr(_numba_cpu, "PARALLEL_MIN", parallel_min)
        ps = init_params([(70_001,), (9,)], np.float32)
        opt = fastopt.CLASSES[name](ps, backend="cython")
        for gs in awkward_grads([p.shape for p in ps], np.float32, 4):
            opt.step(gs)
        return ps
    serial, parallel = run(1 << 40), run(0)
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------- (d) errors

def _error_type(fn):
    try:
        fn()
    except Exception as exc:   # noqa: BLE001  (the type is what is compared)
        return type(exc)
    return None


def test_read_only_param_same_error_as_numba():
    def make(backend):
        p = np.zeros(10, dtype=np.float32)
        p.flags.writeable = False
        return lambda: fastopt.Adam([p], backend=backend)
    err = _error_type(make("numba"))
    assert err is not None
    assert _error_type(make("cython")) is err


def test_wrong_grad_shape_same_error_as_numba_and_nothing_changes():
    errors = {}
    for backend in ("numba", "cython"):
        p = np.ones((4, 5), dtype=np.float64)
        opt = fastopt.Adam([p], backend=backend)
        errors[backend] = _error_type(lambda: opt.step([np.ones((5, 4))]))
        np.testing.assert_array_equal(p, 1.0)
        assert opt.state_dict()["state"] == {}
    assert errors["numba"] is not None
    assert errors["cython"] is errors["numba"]


def test_run_dense_validates_tables():
    p = np.zeros(4, dtype=np.float32)
    g = np.ones(4, dtype=np.float32)
    ptrs = np.array([[p.ctypes.data, g.ctypes.data] + [p.ctypes.data] * 3], dtype=np.int64)
    chunks = np.array([[0, 0, 4]], dtype=np.int64)
    hyper = np.zeros((1, registry.NSCALARS))
    hidx = np.zeros(1, dtype=np.int64)
    rid = BACKEND.rule_ids["SGD"]
    with pytest.raises(ValueError):
        _cy_dense.run_dense(99, 0, False, False, False, ptrs, chunks, hyper, hidx, 4, 0)
    with pytest.raises(ValueError):
        _cy_dense.run_dense(rid, 2, False, False, False, ptrs, chunks, hyper, hidx, 4, 0)
    with pytest.raises(IndexError):
        _cy_dense.run_dense(rid, 0, False, False, False, ptrs, chunks, hyper,
                            np.ones(1, dtype=np.int64), 4, 0)
    with pytest.raises(IndexError):
        _cy_dense.run_dense(rid, 0, False, False, False, ptrs,
                            np.array([[1, 0, 4]], dtype=np.int64), hyper, hidx, 4, 0)
    hyper[0, 0] = 0.5     # lr: p = 0 - 0.5 * 1
    _cy_dense.run_dense(rid, 0, False, False, False, ptrs, chunks, hyper, hidx, 4, 0)
    np.testing.assert_array_equal(p, -0.5)


def test_rule_without_cython_math_is_refused():
    def other(p, g, s0, s1, s2, c):
        return p, s0, s1, s2
    custom = dataclasses.replace(registry.SGD, name="Custom", math=other)
    with pytest.raises(NotImplementedError, match="cython"):
        BACKEND.rule_id(custom)
    # a registry rule keeps its id
    assert BACKEND.rule_id(registry.AdamW) == BACKEND.rule_id(registry.Adam)


def test_register_backend_is_idempotent():
    assert _cython_backend.register_backend() is BACKEND
    assert _cython_backend.register_backend() is BACKEND
    assert fastopt.available_backends().count("cython") == 1
    assert fastopt.backends.resolve("cython") is BACKEND


# ------------------------------------------------------ (e) row-sparse (lazy)

def _numba_rows(rule, w):
    """The Numba rows driver, called as ``NumbaBackend.run_rows`` does."""
    n = w.param.shape[0]
    _numba_cpu.launch_rows(rule.math, w.param.dtype, w.uses, w.const, w.param.reshape(n, -1),
                           [s.reshape(n, -1) if s is not None else None for s in w.slots],
                           w.vals, w.order, w.seg, w.uniq, w.hyper,
                           rowwise=rule.layout == "rowwise")


def _zipf_grad(rng, nrows, D, nnz, dtype, scale):
    """Zipf(1.2) row indices (hot rows repeated many times) and awkward values."""
    idx = np.minimum(rng.zipf(1.2, nnz) - 1, nrows - 1).astype(np.int64)
    vals = rng.standard_normal((nnz, D)) * scale
    vals[rng.random(nnz) < 0.1] = 0.0
    vals[rng.integers(nnz), :3] = (np.nan, np.inf, -np.inf)[: min(3, D)]
    return idx, vals.astype(dtype)


def _lazy_run(run_rows, rule, variant, shape, dtype, nnz, steps=3):
    """``steps`` lazy steps of one parameter through ``run_rows``, built as the
    optimizer builds its RowsWork items; returns (param, slots, start, plans)."""
    group = rule.check_group({**rule.defaults, **variant})
    uses = tuple(rule.uses_slots(group))
    const = rule.constants(group)
    rng = np.random.default_rng(11)
    p = rng.standard_normal(shape).astype(dtype)
    start = p.copy()
    names = rule.slots + (None,) * registry.NSLOTS
    slots = [np.full(rule.slot_shape(shape), rule.slot_init(group, n), dtype) if u else None
             for n, u in zip(names, uses)]
    host = rule.host_init(group)
    nrows, D = shape[0], int(np.prod(shape[1:]))
    plans = []
    for t in range(1, steps + 1):
        idx, vals = _zipf_grad(rng, nrows, D, nnz, dtype, (1.0, 1e3, 1e-6)[t % 3])
        order, seg, uniq = coalesce_plan(idx, nrows)
        plans.append((nnz, uniq.shape[0], int(np.diff(seg).max())))
        scal, host2 = rule.scalars(group, t, host, set(rule.slots) if t == 1 else set())
        host = {**host, **host2}
        run_rows(rule, backends.RowsWork(param=p, slots=slots, vals=vals, idx=idx,
                                         order=order, seg=seg, uniq=uniq, uses=uses,
                                         const=const,
                                         hyper=np.array([scal], dtype=np.float64)))
    return p, slots, start, plans


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,k", rule_cases())
def test_rows_driver_bit_identical_to_numba(name, k, dtype):
    """Zipf gradients with many duplicates; a small 2-D parameter (serial path) and
    a 3-D one with enough touched elements for the parallel path."""
    rule = registry.RULES[name]
    variant = rule.variants[k]
    for shape, nnz, parallel in (((300, 7), 2000, False), ((20_000, 4, 8), 20_000, True)):
        pn, sn, start, plans = _lazy_run(_numba_rows, rule, variant, shape, dtype, nnz)
        pc, sc, _, _ = _lazy_run(BACKEND.run_rows, rule, variant, shape, dtype, nnz)
        D = int(np.prod(shape[1:]))
        for nnz_, nuniq, longest in plans:
            assert (nuniq * D >= _numba_cpu.PARALLEL_MIN) == parallel
            assert nnz_ >= 2 * nuniq and longest >= 100      # many duplicates
        np.testing.assert_array_equal(pc, pn)
        for a, b in zip(sc, sn):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(a, b)
        # untouched rows are never written (nor their state, checked by numba parity)
        assert (pc == start).all(axis=tuple(range(1, len(shape)))).sum() > 0


_ROWS_THREAD_SCRIPT = r"""
import hashlib
import numpy as np
import fastopt
from fastopt import _cython_backend, _cy_dense, _numba_cpu, registry
from fastopt.sparse import coalesce_plan
_cython_backend.register_backend()
print("threads", _cy_dense.openmp_max_threads())
nrows, D, nnz = 50_000, 32, 30_000
for name in registry.RULES:
    for dt in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        p = rng.standard_normal((nrows, D)).astype(dt)
        opt = fastopt.CLASSES[name]([p], backend="cython", **registry.RULES[name].variants[-1])
        for _ in range(2):
            idx = np.minimum(rng.zipf(1.2, nnz) - 1, nrows - 1)
            assert coalesce_plan(idx, nrows)[2].shape[0] * D >= 2 * _numba_cpu.PARALLEL_MIN
            opt.step([fastopt.RowSparse(idx, rng.standard_normal((nnz, D)).astype(dt))])
        print(name, np.dtype(dt).name, hashlib.sha256(p.tobytes()).hexdigest())
"""


def test_rows_same_bits_with_one_and_two_openmp_threads():
    outs = {}
    here = os.path.dirname(os.path.abspath(__file__))
    for nthreads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(nthreads))
        res = subprocess.run([sys.executable, "-c", _ROWS_THREAD_SCRIPT], env=env, cwd=here,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0] == f"threads {nthreads}"
        outs[nthreads] = lines[1:]
    assert len(outs[1]) == 2 * len(registry.RULES)
    assert outs[1] == outs[2]


def test_run_rows_validates_plan_and_writes_nothing():
    rid = BACKEND.rule_ids["SGD"]
    p = np.zeros((4, 2), dtype=np.float32)
    vals = np.ones((3, 2), dtype=np.float32)
    addrs = np.array([p.ctypes.data, vals.ctypes.data] + [p.ctypes.data] * 3, dtype=np.int64)
    hyper = np.zeros((1, registry.NSCALARS))
    hyper[0, 0] = 0.5                                   # lr
    i64 = lambda *v: np.array(v, dtype=np.int64)        # noqa: E731
    good = (i64(0, 2, 1), i64(0, 2, 3), i64(1, 3))      # rows 1 (twice) and 3

    def call(order=good[0], seg=good[1], uniq=good[2], nnz=3, dtype_code=0, rule=rid):
        _cy_dense.run_rows(rule, dtype_code, False, False, False, addrs, 4, 2, nnz,
                           order, seg, uniq, hyper, 0)

    for kw, exc in [(dict(rule=99), ValueError), (dict(dtype_code=2), ValueError),
                    (dict(nnz=2), ValueError), (dict(seg=i64(0, 3)), ValueError),
                    (dict(order=i64(0, 3, 1)), IndexError),
                    (dict(uniq=i64(1, 4)), IndexError),            # row out of range
                    (dict(uniq=i64(3, 1)), IndexError),            # not increasing
                    (dict(uniq=i64(1, 1)), IndexError),            # repeated row
                    (dict(seg=i64(0, 0, 3)), IndexError),          # empty segment
                    (dict(seg=i64(0, 2, 4)), IndexError)]:         # past nnz
        with pytest.raises(exc):
            call(**kw)
        np.testing.assert_array_equal(p, 0.0)
    call()
    np.testing.assert_array_equal(p, [[0, 0], [-1, -1], [0, 0], [-0.5, -0.5]])


def test_run_rows_refuses_mismatched_arrays():
    p = np.zeros((6, 4), dtype=np.float32)
    idx = np.array([1, 1, 4])
    order, seg, uniq = coalesce_plan(idx, 6)
    group = registry.Adam.check_group(dict(registry.Adam.defaults))
    scal, _ = registry.Adam.scalars(group, 1, {}, set(registry.Adam.slots))

    def work(slots, vals):
        return backends.RowsWork(param=p, slots=slots, vals=vals, idx=idx, order=order,
                                 seg=seg, uniq=uniq, uses=(True, True, False), const=(),
                                 hyper=np.array([scal]))
    good_vals = np.ones((3, 4), np.float32)
    ok = np.zeros((6, 4), np.float32)
    for slots, vals in [([ok, np.zeros((4, 6), np.float32), None], good_vals),
                        ([ok, np.zeros((6, 4), np.float64), None], good_vals),
                        ([ok, np.zeros((4, 6), np.float32).T, None], good_vals),
                        ([ok, None, None], good_vals),
                        ([ok, ok.copy(), None], np.ones((3, 4), np.float64)),
                        ([ok, ok.copy(), None], np.ones((3, 5), np.float32))]:
        with pytest.raises(ValueError):
            BACKEND.run_rows(registry.Adam, work(slots, vals))
        np.testing.assert_array_equal(p, 0.0)
    BACKEND.run_rows(registry.Adam, work([ok, ok.copy(), None], good_vals))
    assert (p[[1, 4]] != 0).all() and (p[[0, 2, 3, 5]] == 0).all()
