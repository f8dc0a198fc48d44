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
(d) errors come from the shared Python layer: the same types as with numba.
"""

import dataclasses
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import _cython_backend, _numba_cpu, registry, rules

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
        assert _cy_dense.MATH_NAMES[ids[name]] == rule.math.__name__


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name,k", rule_cases())
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
