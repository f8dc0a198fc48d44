"""``Optimizer.set_row_range``: a parameter declared to be rows of a larger tensor
(what the sharded optimizer's pieces are) is stepped as that tensor's rows would
be: the storage format is the whole tensor's (8-bit state or float32 by its size)
and stochastic rounding draws the whole tensor's random stream at the piece's
element base.  Every host backend (the NumPy reference included) and every driver
that stores a bfloat16 parameter: dense stored buckets, the stored row driver
(``max_norm``, sparse gradients) and the row-wise rule's driver.  Pieces stepped
alone must equal the whole tensor stepped at once, bit for bit; the CUDA kernels
are checked the same way in ``tests/test_cuda_storage.py``."""

import numpy as np
import pytest

import fastopt
from fastopt import storage

ml_dtypes = pytest.importorskip("ml_dtypes")
BF = np.dtype(ml_dtypes.bfloat16)
BACKENDS = [b for b in ("numpy", "numba", "cython") if b in fastopt.available_backends()]


def _bits(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _grads(shape, steps, seed=3):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        g = rng.standard_normal(shape).astype(np.float32)
        out.append(g.astype(BF) if t % 2 else g)      # bfloat16 and float32 gradients
    return out


def _run(name, shape, cuts, backend, steps=3, sparse=False, **kw):
    """(whole optimizer and parameter, [(piece optimizer, piece parameter)])."""
    rng = np.random.default_rng(1)
    pdt = kw.pop("pdt", BF)
    w0 = (rng.standard_normal(shape) * 0.5).astype(np.float32).astype(pdt)
    whole = w0.copy()
    opt = fastopt.CLASSES[name]([whole], backend=backend, **kw)
    bounds = [0] + list(cuts) + [shape[0]]
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        p = w0[a:b].copy()
        o = fastopt.CLASSES[name]([p], backend=backend, **kw)
        o.set_row_range(0, shape, a)
        pieces.append((o, p, a, b))
    for t, g in enumerate(_grads(shape, steps)):
        if sparse:
            idx = np.random.default_rng([t, 9]).integers(0, shape[0], size=12)
            vals = np.asarray(g, np.float32)[idx]
            opt.step([fastopt.RowSparse(idx, vals)])
            for o, _, a, b in pieces:
                mine = (idx >= a) & (idx < b)
                o.step([fastopt.RowSparse(idx[mine] - a, vals[mine])])
        else:
            opt.step([g])
            for o, _, a, b in pieces:
                o.step([g[a:b].copy()])
    return opt, whole, pieces


def _assert_pieces_equal_whole(opt, whole, pieces):
    got = np.concatenate([_bits(p) for _, p, _, _ in pieces])
    assert np.array_equal(got, _bits(whole)), "parameters differ from the whole tensor's"
    full = opt.state_dict()["state"][0]
    parts = [o.state_dict()["state"][0] for o, _, _, _ in pieces]
    for k, v in full.items():
        if isinstance(v, np.ndarray):
            cat = np.concatenate([_bits(s[k]) for s in parts])
            assert parts[0][k].dtype == v.dtype, k
            assert np.array_equal(cat, _bits(v)), f"state {k!r} differs"
        else:
            assert all(s[k] == v for s in parts), k


CASES = [
    pytest.param("Adam", (40, 300), (13, 29), dict(bf16_update="stochastic", seed=5),
                 id="adam-2d-stochastic"),
    pytest.param("Adam", (5000,), (1234,), dict(bf16_update="stochastic", seed=2),
                 id="adam-1d-stochastic"),
    pytest.param("AdamW", (5000,), (2560,), dict(bf16_update="stochastic", state_bits=8),
                 id="adamw-1d-stochastic-q8"),
    pytest.param("Adam", (40, 300), (17,), dict(bf16_update="stochastic", state_bits=8),
                 id="adam-2d-stochastic-q8"),
    pytest.param("Adam", (40, 300), (11,), dict(bf16_update="stochastic", state_bits=16,
                                                max_norm=2.0), id="adam-max-norm-rows"),
    pytest.param("RowWiseAdagrad", (40, 300), (7, 30), dict(bf16_update="stochastic"),
                 id="rowwise-stochastic"),
    pytest.param("SGD", (5000,), (2816,), dict(momentum=0.9, state_bits=8, pdt=np.float32),
                 id="sgd-1d-q8-float32"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,shape,cuts,kw", CASES)
def test_pieces_equal_the_whole_tensor(name, shape, cuts, kw, backend):
    opt, whole, pieces = _run(name, shape, cuts, backend, **kw)
    _assert_pieces_equal_whole(opt, whole, pieces)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_pieces_equal_the_whole_tensor(backend):
    opt, whole, pieces = _run("Adam", (40, 300), (13,), backend, sparse=True,
                              bf16_update="stochastic", seed=11)
    _assert_pieces_equal_whole(opt, whole, pieces)


def test_without_the_row_range_the_stream_differs():
    """The test above is not vacuous: a piece stepped as a tensor of its own draws
    other random bits."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((40, 300)) * 0.5).astype(np.float32).astype(BF)
    g = rng.standard_normal((40, 300)).astype(np.float32)
    whole, piece = w.copy(), w[20:].copy()
    fastopt.Adam([whole], backend="numba", bf16_update="stochastic").step([g])
    fastopt.Adam([piece], backend="numba", bf16_update="stochastic").step([g[20:].copy()])
    assert not np.array_equal(_bits(piece), _bits(whole[20:]))


def test_the_storage_format_is_the_whole_tensors():
    """8-bit state is chosen by the whole tensor's size: pieces of a 5000-element
    tensor (each below Q8_MIN_SIZE) keep 8-bit state."""
    p = np.zeros(2560, np.float32)
    alone = fastopt.Adam([p.copy()], state_bits=8)
    alone.step([np.ones(2560, np.float32)])
    assert alone.state[0]["exp_avg"].dtype == np.float32
    opt = fastopt.Adam([p], state_bits=8)
    opt.set_row_range(0, (5000,), 0)
    opt.step([np.ones(2560, np.float32)])
    assert opt.state[0]["exp_avg"].dtype == np.uint8
    assert opt.state[0]["exp_avg" + storage.SCALE_SUFFIX].shape == (10,)


def test_row_range_refusals():
    opt = fastopt.Adam([np.zeros(2560, np.float32)], state_bits=8)
    with pytest.raises(ValueError, match="multiple of 256"):
        opt.set_row_range(0, (5000,), 100)
    with pytest.raises(ValueError, match="is not rows"):
        opt.set_row_range(0, (2000,), 0)
    with pytest.raises(ValueError, match="is not rows"):
        opt.set_row_range(0, (5000, 2), 0)
    opt.set_row_range(0, (5000,), 2304)
    opt.step([np.ones(2560, np.float32)])
    with pytest.raises(ValueError, match="has state"):
        opt.set_row_range(0, (5000,), 0)
