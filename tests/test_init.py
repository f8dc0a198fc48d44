"""fastopt.init: gains and fans against torch.nn.init, distribution statistics,
reproducibility, in-place semantics and errors."""

import math
import warnings

import numpy as np
import pytest

from fastopt import init

torch = pytest.importorskip("torch")
tinit = torch.nn.init

BIG = (512, 384)  # 196k samples: the sample std is within ~0.5% of the true one


@pytest.mark.parametrize("name,param", [
    ("linear", None), ("conv1d", None), ("conv2d", None), ("conv3d", None),
    ("conv_transpose1d", None), ("conv_transpose2d", None), ("conv_transpose3d", None),
    ("sigmoid", None), ("tanh", None), ("relu", None), ("selu", None),
    ("leaky_relu", None), ("leaky_relu", 0.2), ("leaky_relu", 0), ("leaky_relu", 3),
    ("leaky_relu", -0.5),
])
def test_calculate_gain_matches_torch(name, param):
    assert init.calculate_gain(name, param) == tinit.calculate_gain(name, param)


@pytest.mark.parametrize("name,param", [("softmax", None), ("leaky_relu", "0.1"),
                                        ("leaky_relu", True), ("leaky_relu", float("nan"))])
def test_calculate_gain_errors(name, param):
    with pytest.raises(ValueError):
        init.calculate_gain(name, param)


@pytest.mark.parametrize("shape", [(3, 4), (4, 3), (5, 3, 2), (8, 4, 3, 3), (2, 3, 4, 5, 6),
                                   (1, 1), (0, 4), (6, 0, 3)])
def test_fans_match_torch(shape):
    ours = init._calculate_fan_in_and_fan_out(np.empty(shape))
    assert ours == tinit._calculate_fan_in_and_fan_out(torch.empty(shape))
    for mode in ("fan_in", "fan_out", "FAN_IN"):
        assert init._calculate_correct_fan(np.empty(shape), mode) == \
            tinit._calculate_correct_fan(torch.empty(shape), mode)


@pytest.mark.parametrize("shape", [(5,), ()])
@pytest.mark.parametrize("fn", [init.xavier_uniform_, init.xavier_normal_,
                                init.kaiming_uniform_, init.kaiming_normal_])
def test_fewer_than_two_dims_raise_like_torch(shape, fn):
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        fn(np.zeros(shape))
    tfn = getattr(tinit, fn.__name__)
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        tfn(torch.zeros(shape))


def _expected_std(kind, shape, **kw):
    """The std torch.nn.init's formulas give (computed with torch's own helpers)."""
    t = torch.empty(shape)
    if kind.startswith("xavier"):
        fan_in, fan_out = tinit._calculate_fan_in_and_fan_out(t)
        return kw.get("gain", 1.0) * math.sqrt(2.0 / (fan_in + fan_out))
    fan = tinit._calculate_correct_fan(t, kw.get("mode", "fan_in"))
    gain = tinit.calculate_gain(kw.get("nonlinearity", "leaky_relu"), kw.get("a", 0))
    return gain / math.sqrt(fan)


CASES = [
    ("xavier_uniform_", BIG, {}),
    ("xavier_uniform_", (64, 32, 3, 3), {"gain": 2.0}),
    ("xavier_normal_", BIG, {}),
    ("xavier_normal_", (64, 32, 3, 3), {"gain": 0.5}),
    ("kaiming_uniform_", BIG, {}),
    ("kaiming_uniform_", (64, 32, 3, 3), {"a": math.sqrt(5)}),
    ("kaiming_uniform_", BIG, {"mode": "fan_out", "nonlinearity": "relu"}),
    ("kaiming_normal_", BIG, {}),
    ("kaiming_normal_", (64, 32, 3, 3), {"mode": "fan_out", "nonlinearity": "tanh"}),
    ("kaiming_normal_", BIG, {"a": 0.2, "nonlinearity": "leaky_relu"}),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,shape,kw", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_statistics(name, shape, kw, dtype):
    std = _expected_std(name, shape, **kw)
    w = np.full(shape, np.nan, dtype=dtype)
    out = getattr(init, name)(w, rng=np.random.default_rng(1), **kw)
    assert out is w and w.dtype == dtype and np.isfinite(w).all()
    n = w.size
    assert abs(float(w.mean(dtype=np.float64))) < 5 * std / math.sqrt(n)
    assert float(w.std(dtype=np.float64)) == pytest.approx(std, rel=0.02)
    if name.endswith("uniform_"):
        bound = math.sqrt(3.0) * std
        assert float(np.abs(w).max()) <= bound * (1 + 1e-6)
        assert float(w.max()) > 0.99 * bound and float(w.min()) < -0.99 * bound
    else:
        # normal: a few samples beyond 3 std, none absurdly far
        assert 0.001 < float(np.mean(np.abs(w) > 3 * std)) < 0.005
    # torch's own draw for the same call has the same spread (same formulas)
    t = getattr(tinit, name)(torch.empty(shape, dtype=torch.float64), **kw)
    assert float(t.std()) == pytest.approx(float(w.std(dtype=np.float64)), rel=0.04)


@pytest.mark.parametrize("fn,kw", [
    (init.uniform_, {"a": -2.0, "b": 3.0}), (init.normal_, {"mean": 1.5, "std": 0.25}),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uniform_normal(fn, kw, dtype):
    w = np.zeros(200_000, dtype)
    fn(w, rng=np.random.default_rng(3), **kw)
    if fn is init.uniform_:
        assert w.min() >= -2.0 and w.max() <= 3.0
        assert float(w.mean()) == pytest.approx(0.5, abs=0.02)
        assert float(w.std()) == pytest.approx(5 / math.sqrt(12), rel=0.01)
    else:
        assert float(w.mean()) == pytest.approx(1.5, abs=0.005)
        assert float(w.std()) == pytest.approx(0.25, rel=0.01)


def test_defaults_uniform_normal():
    w = init.uniform_(np.zeros(50_000), rng=np.random.default_rng(0))
    assert 0.0 <= w.min() and w.max() < 1.0 and abs(w.mean() - 0.5) < 0.01
    w = init.normal_(np.zeros(50_000), rng=np.random.default_rng(0))
    assert abs(w.mean()) < 0.02 and abs(w.std() - 1.0) < 0.02


@pytest.mark.parametrize("name", ["uniform_", "normal_", "xavier_uniform_", "xavier_normal_",
                                  "kaiming_uniform_", "kaiming_normal_"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reproducible_with_seed(name, dtype):
    fn = getattr(init, name)
    a = fn(np.zeros((40, 30), dtype), rng=np.random.default_rng(123))
    b = fn(np.zeros((40, 30), dtype), rng=np.random.default_rng(123))
    c = fn(np.zeros((40, 30), dtype), rng=np.random.default_rng(124))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    d = fn(np.zeros((40, 30), dtype))  # rng=None: a fresh generator
    assert np.isfinite(d).all() and d.std() > 0


def test_non_contiguous_view_is_filled_in_place():
    base = np.full((50, 40), 7.0)
    view = base[:, ::2]
    init.kaiming_normal_(view, rng=np.random.default_rng(0))
    assert np.all(base[:, 1::2] == 7.0)
    assert not np.any(base[:, ::2] == 7.0)
    f = np.asfortranarray(np.zeros((30, 20), np.float32))
    init.xavier_uniform_(f, rng=np.random.default_rng(0))
    assert f.flags.f_contiguous and f.std() > 0


def test_zeros_ones():
    w = np.full((3, 4), 5.0, np.float32)
    assert init.zeros_(w) is w and not w.any()
    assert init.ones_(w) is w and np.all(w == 1.0)


def test_zero_element_arrays():
    with pytest.warns(UserWarning, match="zero-element"):
        w = np.zeros((0, 3))
        assert init.kaiming_uniform_(w) is w
    with pytest.warns(UserWarning, match="zero-element"):
        init.kaiming_normal_(np.zeros(0))  # torch also warns before checking the dims
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert init.xavier_uniform_(np.zeros((0, 0))).shape == (0, 0)
        assert init.normal_(np.zeros((0, 5))).shape == (0, 5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda w: init.kaiming_uniform_(w, mode="fan_avg"), ValueError, "fan_avg"),
    (lambda w: init.kaiming_normal_(w, nonlinearity="gelu"), ValueError, "gelu"),
    (lambda w: init.kaiming_uniform_(w, a="x"), ValueError, "negative_slope"),
    (lambda w: init.xavier_uniform_(w, gain=-1.0), ValueError, "gain"),
    (lambda w: init.xavier_normal_(w, gain=float("inf")), ValueError, "gain"),
    (lambda w: init.uniform_(w, a=1.0, b=0.0), ValueError, "a <= b"),
    (lambda w: init.uniform_(w, a=float("-inf")), ValueError, "a"),
    (lambda w: init.normal_(w, std=-1.0), ValueError, "std"),
    (lambda w: init.normal_(w, mean="0"), ValueError, "mean"),
    (lambda w: init.normal_(w, rng=42), TypeError, "Generator"),
    (lambda w: init.xavier_uniform_(w, rng=np.random.RandomState(0)), TypeError, "Generator"),
])
def test_argument_errors_leave_array_unchanged(call, exc, match):
    w = np.full((4, 3), 9.0)
    with pytest.raises(exc, match=match):
        call(w)
    assert np.all(w == 9.0)


@pytest.mark.parametrize("fn", [init.uniform_, init.normal_, init.zeros_, init.ones_,
                                init.xavier_uniform_, init.kaiming_normal_])
def test_array_errors(fn):
    with pytest.raises(TypeError):
        fn(np.zeros((3, 3), np.int32))
    with pytest.raises(TypeError):
        fn(np.zeros((3, 3), np.float16))
    with pytest.raises(TypeError):
        fn([[0.0, 0.0], [0.0, 0.0]])
    ro = np.zeros((3, 3))
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fn(ro)
