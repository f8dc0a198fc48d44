"""Muon on the CUDA backend (:mod:`fastopt.backends.cuda.matrix`): element phase 1 and
Newton-Schulz through the tiled ``cuda.jit`` GEMM, against the CPU's NumPy matrix
phase (:func:`fastopt.rules.muon.orthogonalized`) and the NumPy reference.

Runs where numba-cuda is installed and a GPU is present or the simulator is on
(``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_muon_cuda.py``); skipped
otherwise.  Matrices are small (the simulator runs a Python thread per CUDA
thread) and tiles 8 wide, so a product spans several tiles and partial ones.
"""

import numpy as np
import pytest

from cuda_sim import require_cuda

cuda = require_cuda()         # skips this module where the CUDA tests cannot run

import fastopt  # noqa: E402
from fastopt import functional  # noqa: E402
from fastopt.backends import cuda as cb  # noqa: E402
from fastopt.rules import RULES, muon  # noqa: E402

RULE = RULES["Muon"]
#: wide, tall (transposed), batched
SHAPES = [(16, 24), (40, 8), (2, 8, 12)]
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-9}


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    cb.register_backend()
    monkeypatch.setattr(cb, "BLOCK_SIZE", 32)
    monkeypatch.setattr(cb, "CHUNK", 64)
    monkeypatch.setattr(cb, "MAX_BLOCKS", 3)
    monkeypatch.setattr(cb.matrix, "TILE", 8)
    monkeypatch.setattr(cb.matrix, "REDUCE_THREADS", 16)
    yield


def _group(**kw):
    return RULE.check_group({**RULE.defaults, **kw})


def _close(got, want, rtol, what, ulp_of=None):
    """``got`` within ``rtol`` of ``want``'s largest magnitude; plus, for a change of a
    parameter, 2 units in the last place of the parameter (its rounding)."""
    scale = np.max(np.abs(want)) if want.size else 1.0
    atol = rtol * scale
    if ulp_of is not None:
        atol += 2 * np.finfo(ulp_of.dtype).eps * np.max(np.abs(ulp_of))
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=what)


@pytest.mark.parametrize("dtype,ns", [(np.float64, None), (np.float32, None),
                                      (np.float32, "float64")])
@pytest.mark.parametrize("shape", SHAPES)
def test_orthogonalize_matches_cpu(shape, dtype, ns):
    """r * NS(U) on the device equals the CPU's NumPy (BLAS) matrix phase: float64 to
    1e-9 of its size (in practice to rounding), float32 to rounding; iterations in
    float64 for a float32 parameter (ns_dtype) too."""
    dt = np.dtype(dtype)
    u = np.random.default_rng(sum(shape)).standard_normal(shape).astype(dt)
    group = _group(ns_dtype=ns, adjust_lr_fn="match_rms_adamw" if ns else None)
    want = muon.orthogonalized(u.copy(), group, dt)
    got = cb.matrix.orthogonalize(cuda.to_device(u.reshape(-1)), shape, group, dt)
    assert got.dtype == dt
    _close(got.copy_to_host().reshape(shape), want, RTOL[np.dtype(ns or dt)], str(shape))


def test_orthogonalize_edge_matrices():
    """A zero matrix gives zero; a NaN in one matrix of a stack makes that matrix NaN
    and leaves the others; float64 squares that overflow are rescaled (as the CPU
    does) instead of giving a zero update."""
    group = _group(ns_steps=2)
    u = np.random.default_rng(1).standard_normal((3, 5, 7))
    u[0] = 0.0
    u[1, 2, 3] = np.nan
    u[2] *= 1e200
    want = muon.orthogonalized(u.copy(), group, u.dtype)
    got = cb.matrix.orthogonalize(cuda.to_device(u.reshape(-1)), u.shape, group,
                                  u.dtype).copy_to_host().reshape(u.shape)
    assert (got[0] == 0).all()
    assert np.isnan(got[1]).all() and np.isnan(want[1]).all()
    assert np.abs(got[2]).max() > 0.1
    _close(got[2], want[2], 1e-9, "overflowing squares")


@pytest.mark.parametrize("dtype,k", [(np.float64, 0), (np.float64, 1), (np.float64, 2),
                                     (np.float32, 0)])
def test_optimizer_matches_reference(dtype, k):
    """fastopt.Muon on device arrays, two steps (momentum, Nesterov or not, weight
    decay, both lr ratios), equals the NumPy reference: the parameters' change to 1e-9
    of its size in float64, the momentum buffers to rounding."""
    variant = RULE.variants[k]
    dt = np.dtype(dtype)
    shapes = [(6, 10), (9, 4)] if k else SHAPES
    rng = np.random.default_rng(k)
    p0 = [rng.standard_normal(s).astype(dt) for s in shapes]
    ref_p = [p.copy() for p in p0]
    ref = fastopt.Muon(ref_p, backend="numpy", **variant)
    dev_p = [cuda.to_device(p) for p in p0]
    opt = fastopt.Muon(dev_p, backend="cuda", **variant)
    for _ in range(2):
        grads = [rng.standard_normal(s).astype(dt) for s in shapes]
        ref.step(grads)
        assert opt.step([cuda.to_device(g) for g in grads]) is True
    for i, (d, r, p) in enumerate(zip(dev_p, ref_p, p0)):
        _close(d.copy_to_host() - p, r - p, RTOL[dt], f"parameter {i}", ulp_of=r)
    sd, rd = opt.state_dict()["state"], ref.state_dict()["state"]
    for i in rd:
        np.testing.assert_allclose(sd[i]["momentum_buffer"], rd[i]["momentum_buffer"],
                                   rtol=RTOL[dt])


def test_functional_and_host_gradients():
    """fastopt.functional.muon_ on a device parameter with a host gradient (copied
    over) and a device momentum buffer equals the reference on host copies."""
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal((2, 5, 3))
    hp, hb = p0.copy(), np.zeros_like(p0)
    dp, db = cuda.to_device(p0), cuda.to_device(hb)
    for t in (1, 2):
        g = rng.standard_normal(p0.shape)
        RULE.reference(hp, g, {"momentum_buffer": hb}, _group(lr=0.02), t)
        functional.muon_(dp, g, db, step=t, lr=0.02, backend="cuda")
    _close(dp.copy_to_host() - p0, hp - p0, 1e-9, "parameter")
    np.testing.assert_allclose(db.copy_to_host(), hb, rtol=1e-12)


def _numpy_lib():
    """The array-library path with NumPy standing in for torch / CuPy: in the
    simulator a device array is host memory, so NumPy can view it without a copy."""
    from numpy.lib.stride_tricks import as_strided

    def view(d, shape, strides):
        a = d._ary
        return as_strided(a, shape, tuple(s * a.itemsize for s in strides))
    return cb.matrix.ArrayLib("numpy", view, lambda a, b, o: np.matmul(a, b, out=o))


@pytest.mark.skipif(not cb._load() or not cb._SIM, reason="NumPy views need the simulator")
@pytest.mark.parametrize("shape", [(16, 24), (2, 9, 5)])
def test_array_library_products_match_cpu(monkeypatch, shape):
    """The products through an array library (the path torch and CuPy, i.e. cuBLAS,
    take: strided views of the device buffers, transposes without copies) give the
    CPU's result: NumPy stands in for the library and, doing the CPU's operations in
    the CPU's order, gives its bits up to the norm's summation order."""
    monkeypatch.setattr(cb.matrix, "GEMM", _numpy_lib())
    u = np.random.default_rng(2).standard_normal(shape)
    group = _group()
    want = muon.orthogonalized(u.copy(), group, u.dtype)
    got = cb.matrix.orthogonalize(cuda.to_device(u.reshape(-1)), shape, group, u.dtype)
    _close(got.copy_to_host().reshape(shape), want, 1e-12, str(shape))


def test_library_choice(monkeypatch):
    """"kernel" and, in the simulator, "auto" run the gemm kernel; an ArrayLib is used
    as given."""
    monkeypatch.setattr(cb.matrix, "GEMM", "kernel")
    assert cb.matrix.library() is None
    lib = _numpy_lib()
    monkeypatch.setattr(cb.matrix, "GEMM", lib)
    assert cb.matrix.library() is lib
    if cb._SIM:
        monkeypatch.setattr(cb.matrix, "GEMM", "auto")
        assert cb.matrix.library() is None


def test_parameter_side_options_and_skip_nonfinite():
    """l1, param_min and param_max (compiled into phase 2's dense kernel) and
    skip_nonfinite (a NaN gradient skips the step, state untouched) as on the numba
    backend."""
    opts = dict(lr=0.05, l1=0.01, param_min=-0.5, param_max=0.6)
    rng = np.random.default_rng(4)
    p0 = [rng.standard_normal(s) for s in [(6, 10), (2, 3, 4)]]
    cpu_p = [p.copy() for p in p0]
    cpu = fastopt.Muon(cpu_p, backend="numba", **opts)
    dev_p = [cuda.to_device(p) for p in p0]
    gpu = fastopt.Muon(dev_p, backend="cuda", **opts)
    bad = [rng.standard_normal(p.shape) for p in p0]
    bad[1][0, 1, 2] = np.nan
    assert gpu.step([cuda.to_device(g) for g in bad], skip_nonfinite=True) is False
    for d, p in zip(dev_p, p0):
        assert np.array_equal(d.copy_to_host(), p)
    for _ in range(2):
        grads = [rng.standard_normal(p.shape) for p in p0]
        cpu.step(grads)
        assert gpu.step([cuda.to_device(g) for g in grads], skip_nonfinite=True) is True
    for d, c in zip(dev_p, cpu_p):
        np.testing.assert_allclose(d.copy_to_host(), c, rtol=1e-12, atol=1e-15)
        assert c.max() <= 0.6 and c.min() >= -0.5


def test_reproducible_whatever_the_grid(monkeypatch):
    """The matrix phase has no atomics and fixed summation orders: the same bits with
    one block or several (grid-stride loops wrapping or not)."""
    u = np.random.default_rng(6).standard_normal((2, 9, 5)).astype(np.float32)
    group = _group(ns_steps=2)
    out = []
    for blocks in (1, 3):
        monkeypatch.setattr(cb, "MAX_BLOCKS", blocks)
        out.append(cb.matrix.orthogonalize(cuda.to_device(u.reshape(-1)), u.shape, group,
                                           u.dtype).copy_to_host())
    assert np.array_equal(out[0], out[1])
