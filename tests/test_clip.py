"""fastopt.clip against torch.nn.utils.clip_grad_norm_ / clip_grad_value_."""

import math

import numpy as np
import pytest

from fastopt import clip
from fastopt.clip import clip_grad_norm_, clip_grad_value_

torch = pytest.importorskip("torch")

SHAPES = [(7,), (33, 17), (5, 4, 3), (300_001,)]  # the last spans several float64 chunks


def make_grads(dtype, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(s) * scale).astype(dtype) for s in SHAPES]


def torch_clip(grads, max_norm, norm_type, **kw):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=torch.from_numpy(g).dtype))
        p.grad = torch.from_numpy(g.copy())
        params.append(p)
    total = torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type, **kw)
    return float(total), [p.grad.numpy() for p in params]


def reference_norm(grads, p):
    flat = np.concatenate([g.ravel().astype(np.float64) for g in grads])
    return float(np.linalg.norm(flat, ord=p))


# torch reduces float32 gradients in float32 (relative error ~1e-5 on 300k elements);
# fastopt reduces in float64 (checked against an exact float64 norm to 1e-12 below)
TOL = {np.float32: 3e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm_type", [1, 2.0, 3, math.inf, "inf"])
@pytest.mark.parametrize("max_norm_factor", [0.1, 0.999, 2.0])
def test_matches_torch(dtype, norm_type, max_norm_factor):
    grads = make_grads(dtype)
    p = math.inf if norm_type == "inf" else norm_type
    exact = reference_norm(grads, p)
    max_norm = exact * max_norm_factor
    t_total, t_grads = torch_clip(grads, max_norm, norm_type)
    before = [g.copy() for g in grads]
    total = clip_grad_norm_(grads, max_norm, norm_type=norm_type)
    assert isinstance(total, float)
    assert total == pytest.approx(exact, rel=1e-12)  # float64 reduction
    assert total == pytest.approx(t_total, rel=TOL[dtype])
    for g, tg, b in zip(grads, t_grads, before):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, tg, rtol=TOL[dtype] * 2, atol=0)
        if max_norm_factor < 1:
            assert not np.array_equal(g, b)  # it did clip
        else:
            assert np.array_equal(g, b)  # coefficient clamped to 1: untouched
    if max_norm_factor < 1:
        assert reference_norm(grads, p) == pytest.approx(max_norm, rel=1e-5)


def test_all_zero_gradients():
    for dtype in (np.float32, np.float64):
        grads = [np.zeros((4, 5), dtype), np.zeros(3, dtype)]
        t_total, _ = torch_clip(grads, 1.0, 2.0)
        assert clip_grad_norm_(grads, 1.0) == t_total == 0.0
        assert not any(g.any() for g in grads)
        assert clip_grad_norm_(grads, 0.0, norm_type=math.inf) == 0.0


def test_max_norm_zero_zeroes_gradients_like_torch():
    grads = make_grads(np.float64)[:2]
    _, t_grads = torch_clip(grads, 0.0, 2.0)
    clip_grad_norm_(grads, 0.0)
    for g, tg in zip(grads, t_grads):
        assert np.array_equal(g, tg) and not g.any()


def test_just_below_max_norm_is_scaled_like_torch():
    """torch's coefficient max_norm / (total + 1e-6) is < 1 slightly below max_norm."""
    grads = [np.full(4, 0.5)]  # norm exactly 1
    t_total, t_grads = torch_clip(grads, 1.0 + 1e-7, 2.0)
    clip_grad_norm_(grads, 1.0 + 1e-7)
    assert grads[0][0] < 0.5
    np.testing.assert_allclose(grads[0], t_grads[0], rtol=1e-14)


def test_mixed_dtypes_none_and_containers():
    rng = np.random.default_rng(3)
    a = rng.standard_normal((6, 7)).astype(np.float32)
    b = rng.standard_normal(11)
    ref_total = reference_norm([a, b], 2)
    ea, eb = a * (1.0 / (ref_total + 1e-6)), b * (1.0 / (ref_total + 1e-6))
    orig_a, orig_b = a.copy(), b.copy()
    for container in (lambda: [a, None, b], lambda: (a, b), lambda: {"w": a, "b": b, "c": None},
                      lambda: iter([None, a, b])):
        a[...], b[...] = orig_a, orig_b
        total = clip_grad_norm_(container(), 1.0)
        assert total == pytest.approx(ref_total, rel=1e-12)
        np.testing.assert_allclose(a, ea, rtol=1e-6)
        np.testing.assert_allclose(b, eb, rtol=1e-13)
    assert clip_grad_norm_([], 1.0) == 0.0
    assert clip_grad_norm_([None, None], 1.0) == 0.0


def test_single_array_and_non_contiguous_view():
    base = np.arange(1.0, 41.0).reshape(5, 8)
    view = base[:, ::2]
    expect_norm = float(np.linalg.norm(view.ravel()))
    untouched = base[:, 1::2].copy()
    total = clip_grad_norm_(view, 1.0)
    assert total == pytest.approx(expect_norm, rel=1e-14)
    assert float(np.linalg.norm(base[:, ::2].ravel())) == pytest.approx(1.0, rel=1e-5)
    assert np.array_equal(base[:, 1::2], untouched)


def test_float16_is_accepted():
    g = np.full(10, 2.0, dtype=np.float16)
    total = clip_grad_norm_([g], 1.0)
    assert total == pytest.approx(math.sqrt(40.0), rel=1e-12)
    assert g.dtype == np.float16
    np.testing.assert_allclose(g.astype(float), np.full(10, 2.0 / math.sqrt(40)), rtol=1e-3)


def test_deterministic():
    g1, g2 = make_grads(np.float32, seed=5), make_grads(np.float32, seed=5)
    assert clip_grad_norm_(g1, 1.0, norm_type=3) == clip_grad_norm_(g2, 1.0, norm_type=3)
    for a, b in zip(g1, g2):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_nonfinite_norm(bad):
    grads = [np.ones(5), np.array([1.0, bad, 2.0])]
    before = [g.copy() for g in grads]
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(grads, 1.0, error_if_nonfinite=True)
    for g, b in zip(grads, before):
        np.testing.assert_array_equal(g, b)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch_clip(grads, 1.0, 2.0, error_if_nonfinite=True)
    # without the check: scaled by the (0 or nan) coefficient, exactly as torch
    t_total, t_grads = torch_clip(grads, 1.0, 2.0)
    total = clip_grad_norm_(grads, 1.0)
    assert (math.isnan(total) and math.isnan(t_total)) or total == t_total
    for g, tg in zip(grads, t_grads):
        np.testing.assert_array_equal(g, tg)


def test_clip_grad_value_matches_torch():
    for dtype in (np.float32, np.float64):
        grads = make_grads(dtype, scale=2.0, seed=7)[1:]
        grads[0][2] = np.nan
        tg = [torch.from_numpy(g.copy()) for g in grads]
        params = []
        for t in tg:
            p = torch.nn.Parameter(torch.zeros_like(t))
            p.grad = t
            params.append(p)
        torch.nn.utils.clip_grad_value_(params, 0.75)
        assert clip_grad_value_([grads[0], None, grads[1], grads[2]], 0.75) is None
        for g, p in zip(grads, params):
            assert g.dtype == dtype
            np.testing.assert_array_equal(g, p.grad.numpy())
            finite = g[np.isfinite(g)]
            assert finite.max() == pytest.approx(0.75) and finite.min() == pytest.approx(-0.75)


@pytest.mark.parametrize("kw,match", [
    (dict(max_norm=-1.0), "max_norm"),
    (dict(max_norm=float("nan")), "max_norm"),
    (dict(max_norm=float("inf")), "max_norm"),
    (dict(max_norm=True), "max_norm"),
    (dict(max_norm="1"), "max_norm"),
    (dict(max_norm=1.0, norm_type=0), "norm_type"),
    (dict(max_norm=1.0, norm_type=-2), "norm_type"),
    (dict(max_norm=1.0, norm_type=float("nan")), "norm_type"),
    (dict(max_norm=1.0, norm_type="fro"), "norm_type"),
])
def test_norm_argument_errors(kw, match):
    g = np.ones(3)
    with pytest.raises(ValueError, match=match):
        clip_grad_norm_([g], **kw)
    assert np.array_equal(g, np.ones(3))


@pytest.mark.parametrize("value", [-0.5, float("nan"), float("inf"), None])
def test_value_argument_errors(value):
    g = np.full(3, 5.0)
    with pytest.raises(ValueError, match="clip_value"):
        clip_grad_value_([g], value)
    assert np.array_equal(g, np.full(3, 5.0))


@pytest.mark.parametrize("fn,arg", [(clip_grad_norm_, 0.1), (clip_grad_value_, 0.1)])
def test_read_only_refused_before_any_change(fn, arg):
    a = np.full(4, 3.0)
    ro = np.full(4, 3.0)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fn([a, ro], arg)
    assert np.array_equal(a, np.full(4, 3.0))


@pytest.mark.parametrize("fn,arg", [(clip_grad_norm_, 0.1), (clip_grad_value_, 0.1)])
@pytest.mark.parametrize("bad", [np.ones(3, np.int64), np.ones(3, np.complex128),
                                 np.ones(3, bool), [1.0, 2.0], 5])
def test_type_errors(fn, arg, bad):
    a = np.full(4, 3.0)
    with pytest.raises(TypeError):
        fn([a, bad], arg)
    assert np.array_equal(a, np.full(4, 3.0))
    with pytest.raises(TypeError):
        fn(5, arg)


def test_chunk_boundary_matches_unchunked():
    n = clip._CHUNK * 2 + 17
    g = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    for p in (1, 2, 3.5):
        ref = float(np.linalg.norm(g.astype(np.float64), ord=p))
        assert clip_grad_norm_([g.copy()], 1e30, norm_type=p) == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_bfloat16_gradients_clip_like_torch(norm_type):
    """bfloat16 gradients (which the optimizers take) were refused with "a floating
    dtype is required"; torch clips bfloat16 gradients: norms agree, and the scaled
    gradients are torch's within one bfloat16 rounding."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    torch = pytest.importorskip("torch")
    bf = ml_dtypes.bfloat16
    rng = np.random.default_rng(0)
    shapes = [(40, 30), (7,)] + ([] if norm_type == math.inf else [(0,)])  # torch: no
    gs = [(rng.standard_normal(s) * 3).astype(bf) for s in shapes]         # inf of empty
    ts = [torch.tensor(g.astype(np.float32)).to(torch.bfloat16) for g in gs]
    for t in ts:
        t.grad = t.clone()
    total = clip_grad_norm_(gs, 1.0, norm_type=norm_type)
    want = torch.nn.utils.clip_grad_norm_(ts, 1.0, norm_type=norm_type)
    assert total == pytest.approx(float(want), rel=1e-2)
    for g, t in zip(gs, ts):
        assert g.dtype == bf
        np.testing.assert_allclose(g.astype(np.float32), t.grad.float().numpy(),
                                   rtol=2 ** -7, atol=1e-6)


def test_bfloat16_clip_value_stays_inside():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    g = (np.random.default_rng(1).standard_normal(1000) * 3).astype(ml_dtypes.bfloat16)
    clip_grad_value_([g], 0.1)
    w = g.astype(np.float64)
    assert w.max() <= 0.1 and w.min() >= -0.1 and w.max() > 0.099
