"""Row-wise Adagrad (one accumulator per row of the first axis), dense and sparse.

The registry-driven suites (reference parity, sparse lazy parity, state_dict,
Cython bit parity) already run it; here are the properties specific to it."""

import numpy as np
import pytest

import fastopt
from fastopt import RowSparse

from conftest import CPU_BACKENDS

#: every test here runs in .ci/run's boundscheck lane (NUMBA_BOUNDSCHECK=1)
pytestmark = pytest.mark.boundscheck


def _rows_ref(p, g, acc, lr=0.01, eps=1e-10):
    """Row-wise Adagrad on 2-D float64 arrays, written out once more by hand."""
    acc += (g * g).mean(axis=1)
    p -= lr * g / (np.sqrt(acc)[:, None] + eps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_is_one_value_per_row(backend):
    p = np.ones((1000, 64), np.float32)
    q = np.ones((10, 4, 5), np.float32)
    opt = fastopt.RowWiseAdagrad([p, q], backend=backend)
    opt.step([np.ones_like(p), np.ones_like(q)])
    st = opt.state_dict()["state"]
    assert st[0]["sum"].shape == (1000,) and st[1]["sum"].shape == (10,)
    assert st[0]["sum"].nbytes * 64 == p.nbytes          # 64x less state than Adagrad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_hand_written_rows(backend):
    rng = np.random.default_rng(0)
    p = rng.standard_normal((40, 6))
    want, acc = p.copy(), np.zeros(40)
    opt = fastopt.RowWiseAdagrad([p], lr=0.01, backend=backend)
    for t in range(20):
        g = rng.standard_normal((40, 6)) * (1e3 if t == 5 else 1.0)
        if t == 7:
            g[:] = 0.0
        opt.step([g])
        _rows_ref(want, g, acc)
    np.testing.assert_allclose(p, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(opt.state_dict()["state"][0]["sum"], acc, rtol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rows_of_one_element_are_plain_adagrad(backend):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((300, 1))
    b = a.copy()
    kw = dict(lr=0.05, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.2)
    ra = fastopt.RowWiseAdagrad([a], backend=backend, **kw)
    rb = fastopt.Adagrad([b], backend=backend, **kw)
    for _ in range(10):
        g = rng.standard_normal((300, 1))
        ra.step([g])
        rb.step([g])
    np.testing.assert_allclose(a, b, rtol=1e-13)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sparse_touches_only_its_rows_and_sums_duplicates(backend):
    rng = np.random.default_rng(2)
    p = rng.standard_normal((50, 8)).astype(np.float32)
    dense = p.copy()
    sp = fastopt.RowWiseAdagrad([p], lr=0.1, backend=backend)
    idx = np.array([3, 17, 3, 49, 3])
    vals = rng.standard_normal((5, 8)).astype(np.float32)
    sp.step([RowSparse(idx, vals)])
    # the dense step of the touched rows with the summed gradient
    rows = np.array([3, 17, 49])
    summed = np.zeros((50, 8), np.float32)
    np.add.at(summed, idx, vals)
    sub = dense[rows].copy()
    fastopt.RowWiseAdagrad([sub], lr=0.1, backend=backend).step([summed[rows]])
    np.testing.assert_allclose(p[rows], sub, rtol=1e-6)
    untouched = np.setdiff1d(np.arange(50), rows)
    np.testing.assert_array_equal(p[untouched], dense[untouched])
    acc = sp.state_dict()["state"][0]["sum"]
    assert (acc[untouched] == 0).all() and (acc[rows] > 0).all()


def test_bad_shapes_are_refused_before_writing():
    with pytest.raises(ValueError, match="dimension"):
        fastopt.RowWiseAdagrad([np.ones(())])
    p = np.ones((4, 3))
    opt = fastopt.RowWiseAdagrad([p])
    state = opt.state_dict()
    state["state"][0] = {"step": 1, "sum": np.zeros((4, 3))}     # elementwise-shaped
    with pytest.raises(ValueError, match=r"shape \(4, 3\), expected \(4,\)"):
        opt.load_state_dict(state)
    with pytest.raises(ValueError):
        opt.step([np.ones((4, 2))])
    np.testing.assert_array_equal(p, 1.0)


def test_zero_size_parameter_is_a_noop():
    p = np.ones((0, 5), np.float32)
    q = np.ones((3, 0), np.float32)
    opt = fastopt.RowWiseAdagrad([p, q])
    opt.step([np.ones_like(p), np.ones_like(q)])
    assert opt.state_dict()["state"][1]["sum"].shape == (3,)
    assert (opt.state_dict()["state"][1]["sum"] == 0).all()


def test_functional_layer():
    rng = np.random.default_rng(4)
    p = rng.standard_normal((20, 3))
    q = p.copy()
    acc = np.zeros(20)
    opt = fastopt.RowWiseAdagrad([q], lr=0.1)
    for t in range(1, 6):
        g = rng.standard_normal((20, 3))
        fastopt.functional.rowwise_adagrad_(p, g, acc, step=t, lr=0.1)
        opt.step([g])
    np.testing.assert_array_equal(p, q)
    with pytest.raises(ValueError, match="shape"):
        fastopt.functional.rowwise_adagrad_(p, g, np.zeros((20, 3)), step=6)
