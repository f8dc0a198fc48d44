"""Adafactor on the CUDA backend (:mod:`fastopt.backends.cuda.factored`): the factored
passes as ``cuda.jit`` kernels against the NumPy reference (torch.optim.Adafactor's
algorithm, tests/test_adafactor.py checks it against torch) and the numba backend.

Runs where numba-cuda is installed and a GPU is present or the simulator is on
(``NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_adafactor_cuda.py``); skipped
otherwise.  Matrices are small and reducing blocks narrow (the simulator runs a
Python thread per CUDA thread); several blocks run and the grid-stride loops wrap.
"""

import numpy as np
import pytest

from cuda_sim import require_cuda

cuda = require_cuda()         # skips this module where the CUDA tests cannot run

import fastopt  # noqa: E402
from fastopt import functional  # noqa: E402
from fastopt.backends import cuda as cb  # noqa: E402
from fastopt.rules import RULES  # noqa: E402

RULE = RULES["Adafactor"]
#: a matrix, a batched stack of matrices (B=2, rows of 9: the reducing blocks of 4
#: threads wrap), a vector over 3 chunks, a 0-d tensor
SHAPES = [(5, 7), (2, 3, 9), (150,), ()]
STEPS = 3
RTOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-9}


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    cb.register_backend()
    monkeypatch.setattr(cb, "BLOCK_SIZE", 32)
    monkeypatch.setattr(cb, "MAX_BLOCKS", 3)
    monkeypatch.setattr(cb.factored, "REDUCE_THREADS", 4)
    monkeypatch.setattr(cb.factored, "VCHUNK", 64)
    yield


def _params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [np.asarray(rng.standard_normal(s), dtype=dtype) for s in SHAPES]


def _grads(dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [[np.asarray(rng.standard_normal(s) * (1 + 3 * t), dtype=dtype) for s in SHAPES]
            for t in range(STEPS)]


def _assert_update_close(p_dev, p_ref, p0, rtol, what):
    """The steps' change of the parameter (what the passes compute) to ``rtol`` of its
    size (the parameter itself would hide an error in an update 1e-3 of it)."""
    got = p_dev.copy_to_host() - p0
    want = p_ref - p0
    scale = np.max(np.abs(want)) if want.size else 1.0
    np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale, err_msg=what)


def _assert_state_close(sd_dev, sd_ref, rtol):
    for k, st in sd_ref["state"].items():
        for name, v in st.items():
            if isinstance(v, np.ndarray) and v.dtype.kind == "f":
                np.testing.assert_allclose(sd_dev["state"][k][name], v, rtol=rtol,
                                           atol=0, err_msg=f"state {k} {name}")


@pytest.mark.parametrize("dtype,k", [(np.float64, 0), (np.float64, 1), (np.float64, 2),
                                     (np.float32, 1)])
def test_optimizer_matches_reference(dtype, k):
    """fastopt.Adafactor on device arrays (matrices, a batched stack, a vector, a 0-d
    tensor), three steps, equals the NumPy reference: float64 to 1e-9 of the update
    (in practice to rounding), float32 to rounding; the factored state too."""
    variant = RULE.variants[k]
    dt = np.dtype(dtype)
    p0 = _params(dt, seed=k)
    ref_p = [p.copy() for p in p0]
    ref = fastopt.Adafactor(ref_p, backend="numpy", **variant)
    dev_p = [cuda.to_device(p) for p in p0]
    opt = fastopt.Adafactor(dev_p, backend="cuda", **variant)
    assert opt.backend.name == "cuda"
    for grads in _grads(dt, seed=10 + k):
        ref.step(grads)
        assert opt.step([cuda.to_device(g) for g in grads]) is True
    for i, (d, r, p) in enumerate(zip(dev_p, ref_p, p0)):
        _assert_update_close(d, r, p, RTOL[dt], f"parameter {i}")
        assert not np.array_equal(d.copy_to_host(), p), "the step changed nothing"
    _assert_state_close(opt.state_dict(), ref.state_dict(), RTOL[dt])


def test_matches_numba_backend_and_continues_there():
    """The CUDA steps agree with the numba backend's, and the CUDA state_dict loads
    into a numba optimizer that steps on from it like one that ran on the CPU
    throughout."""
    p0 = _params(np.float64, seed=3)
    grads = _grads(np.float64, seed=4)
    cpu_p = [p.copy() for p in p0]
    cpu = fastopt.Adafactor(cpu_p, backend="numba", lr=0.05, weight_decay=0.1)
    dev_p = [cuda.to_device(p) for p in p0]
    gpu = fastopt.Adafactor(dev_p, backend="cuda", lr=0.05, weight_decay=0.1)
    for g in grads[:2]:
        cpu.step(g)
        gpu.step([cuda.to_device(x) for x in g])
    for d, c, p in zip(dev_p, cpu_p, p0):
        _assert_update_close(d, c, p, 1e-9, "cuda against numba")
    moved = [d.copy_to_host() for d in dev_p]
    cont = fastopt.Adafactor(moved, backend="numba", lr=0.05, weight_decay=0.1)
    cont.load_state_dict(gpu.state_dict())
    cont.step(grads[2])
    cpu.step(grads[2])
    for a, b, p in zip(moved, cpu_p, p0):
        np.testing.assert_allclose(a - p, b - p, rtol=0,
                                   atol=1e-9 * np.max(np.abs(b - p)))


def test_functional_matches_reference():
    """fastopt.functional.adafactor_ on device arrays (a batched matrix and a vector)
    equals the reference on host copies; the state arrays are updated in place."""
    rng = np.random.default_rng(5)
    for shape in [(2, 6, 5), (40,)]:
        p0 = rng.standard_normal(shape)
        names = RULE.slots_of(shape)
        hs = {n: np.zeros(RULE.slot_shape(shape, n)) for n in names}
        ds = {n: cuda.to_device(a) for n, a in hs.items()}
        hp, dp = p0.copy(), cuda.to_device(p0)
        for t in range(1, 3):
            g = rng.standard_normal(shape)
            RULE.reference(hp, g, hs, RULE.check_group(dict(RULE.defaults, lr=0.1)), t)
            functional.adafactor_(dp, cuda.to_device(g), **ds, step=t, lr=0.1,
                                  backend="cuda")
        _assert_update_close(dp, hp, p0, 1e-9, f"functional {shape}")
        for n in names:
            np.testing.assert_allclose(ds[n].copy_to_host(), hs[n], rtol=1e-12)


def test_reproducible_whatever_the_grid(monkeypatch):
    """The sums have an order fixed by the shape (and the reducing block's width): the
    same step gives the same bits with one block or several (grid-stride loops
    wrapping or not), run after run."""
    p0 = _params(np.float32, seed=6)
    grads = _grads(np.float32, seed=7)[:2]
    out = []
    for blocks in (1, 3, 1):
        monkeypatch.setattr(cb, "MAX_BLOCKS", blocks)
        dp = [cuda.to_device(p) for p in p0]
        opt = fastopt.Adafactor(dp, backend="cuda")
        for g in grads:
            opt.step([cuda.to_device(x) for x in g])
        out.append([d.copy_to_host() for d in dp])
    for a, b in zip(out[0], out[1]):
        assert np.array_equal(a, b)
    for a, b in zip(out[0], out[2]):
        assert np.array_equal(a, b)


def test_nonfinite_gradient_like_reference():
    """A NaN gradient element makes its matrix's update NaN (through the row and
    column factors and the mean, as torch); a matrix without one is unaffected."""
    p0 = np.random.default_rng(8).standard_normal((2, 3, 4))
    g = np.random.default_rng(9).standard_normal((2, 3, 4))
    g[1, 2, 0] = np.nan
    ref_p = p0.copy()
    ref = fastopt.Adafactor([ref_p], backend="numpy")
    dp = cuda.to_device(p0)
    opt = fastopt.Adafactor([dp], backend="cuda")
    ref.step([g])
    opt.step([cuda.to_device(g)])
    got = dp.copy_to_host()
    assert np.array_equal(np.isnan(got), np.isnan(ref_p))
    ok = ~np.isnan(ref_p)
    np.testing.assert_allclose(got[ok], ref_p[ok], rtol=1e-12)


def test_cuda_refuses_what_adafactor_refuses():
    """What Adafactor refuses everywhere (row-sparse gradients, grad_scale, bfloat16
    parameters) is refused on CUDA too, before anything is written."""
    p = cuda.to_device(np.ones((4, 3), np.float32))
    opt = fastopt.Adafactor([p], backend="cuda")
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step([cuda.to_device(np.ones((4, 3), np.float32))], grad_scale=2.0)
    with pytest.raises(ValueError, match="row-sparse"):
        opt.step([fastopt.RowSparse(np.array([1]), np.ones((1, 3), np.float32))])
    assert (p.copy_to_host() == 1).all()
    with pytest.raises((TypeError, ValueError, NotImplementedError)):
        fastopt.Adafactor([cb.bfloat16(cuda.to_device(np.zeros((4, 3), np.uint16)))],
                          backend="cuda")


@pytest.mark.skipif(not cb._SIM, reason="bit-identity holds in the simulator (a GPU's "
                    "compiler contracts a += x * x into an FMA)")
def test_column_sums_take_the_cpu_order():
    """The column sums (blocks of FACTOR_ROWS rows, the blocks in order) and the sum
    of p^2 (rows in order) are the numba driver's bits; the row sums agree to
    rounding (a fixed tree here, 8 lanes there)."""
    from fastopt.backends import numba_factored
    from fastopt.rules.adafactor import FACTOR_ROWS
    rng = np.random.default_rng(12)
    B, R, C = 2, FACTOR_ROWS + 6, 3          # two row blocks per matrix, one partial
    P, G = rng.standard_normal(B * R * C), rng.standard_normal(B * R * C) * 1e3
    rows, cols, psq = cb.factored.factored_sums(cuda.to_device(P), cuda.to_device(G),
                                                B, R, C)
    hr, hc, hp = numba_factored.factored_sums(P, G, B, R, C)
    assert np.array_equal(cols.copy_to_host(), hc.reshape(-1))
    assert psq == hp
    np.testing.assert_allclose(rows.copy_to_host(), hr.reshape(-1), rtol=1e-14)
