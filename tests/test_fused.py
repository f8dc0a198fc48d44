"""Fused options (fastopt.fused): loss scaling, value clipping, L1 / elastic net,
weight clipping, row max-norm, and skipping non-finite steps."""

import numpy as np
import pytest

import fastopt
from fastopt import RowSparse, rules

from cases import FUSED
from conftest import awkward_grads, init_params

SHAPES = [(7,), (33, 17), (0,)]
#: with a tensor big enough for the parallel drivers (used by one option set)
BIG = SHAPES + [(40_000,)]
OPTIONS = [dict(clip_value=0.5), dict(l1=0.3, weight_decay=0.01),
           dict(param_min=-0.4, param_max=0.3),
           dict(clip_value=2.0, l1=0.1, param_min=-1.5, param_max=1.0)]
RTOL = {np.float32: 2e-5, np.float64: 1e-11}


def _weight_decay_ok(name, opts):
    return "weight_decay" in rules.RULES[name].defaults or "weight_decay" not in opts


def _run(name, variant, backend, dtype, opts, steps=30, scale=None, shapes=SHAPES):
    params = init_params(shapes, dtype)
    opt = fastopt.CLASSES[name](params, backend=backend, **{**variant, **opts})
    for gs in awkward_grads(shapes, dtype, steps):
        if scale is not None:
            gs = [g * g.dtype.type(scale) for g in gs]
        assert opt.step(gs, grad_scale=scale) is True
    return params, opt


@pytest.mark.parametrize("name,k_opt,dtype", FUSED.params("rule", "options", "dtype"))
def test_numba_matches_reference(name, k_opt, dtype):
    """The last registry variant of each rule (the one with most options on): the
    fused options wrap the rule math, every variant of which the main suite checks;
    every extra specialization here costs a compile.  Cases (tests/cases.py): every
    rule x option set, rule x dtype and option set x dtype pair; Adam in full."""
    variant = rules.RULES[name].variants[-1]
    opts = dict(OPTIONS[k_opt])
    if not _weight_decay_ok(name, opts):
        opts.pop("weight_decay")
    scale = 1024.0 if k_opt == 3 else None
    shapes = BIG if k_opt == 3 else SHAPES
    got, _ = _run(name, variant, "numba", dtype, opts, scale=scale, shapes=shapes)
    want, _ = _run(name, variant, "numpy", dtype, opts, scale=scale, shapes=shapes)
    for p, e in zip(got, want):
        s = max(1.0, float(np.nanmax(np.abs(e), initial=0.0)))
        np.testing.assert_allclose(p, e, rtol=RTOL[dtype], atol=RTOL[dtype] * s)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("name", [n for n, r in rules.RULES.items() if not r.factored])
def test_max_norm_rows(name, backend):
    # (factored rules refuse every fused option: tests/test_adafactor.py)
    shapes = [(50, 8), (3, 4, 5)]
    if rules.RULES[name].whole_tensor:        # whole-tensor updates: refused
        with pytest.raises(ValueError, match="max_norm (renormalizes rows|is not supp)"):
            _run(name, {}, backend, np.float64, dict(max_norm=0.9, lr=0.5), steps=10,
                 shapes=shapes)
        return
    got, _ = _run(name, {}, backend, np.float64, dict(max_norm=0.9, lr=0.5), steps=10,
                  shapes=shapes)
    for p in got:
        norms = np.linalg.norm(p.reshape(p.shape[0], -1), axis=1)
        assert norms.max() <= 0.9 * (1 + 1e-12)
    ref, _ = _run(name, {}, "numpy", np.float64, dict(max_norm=0.9, lr=0.5), steps=10,
                  shapes=shapes)
    for p, e in zip(got, ref):
        np.testing.assert_allclose(p, e, rtol=1e-10, atol=1e-12)


def test_max_norm_matches_torch_embedding_renorm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w = rng.standard_normal((20, 6)) * 3
    tw = torch.from_numpy(w.copy())
    opt = fastopt.SGD([w], lr=0.0, max_norm=1.5)       # lr 0: only the renorm acts
    opt.step([np.zeros_like(w)])
    with torch.no_grad():
        torch.embedding_renorm_(tw, torch.arange(20), 1.5, 2.0)
    np.testing.assert_allclose(w, tw.numpy(), rtol=1e-12)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_l1_reaches_exact_zeros_and_keeps_nan(backend):
    p = np.array([0.05, -0.05, 0.5, -0.5, np.nan, 0.0], np.float32)
    opt = fastopt.SGD([p], lr=0.1, l1=1.0, backend=backend)    # threshold 0.1
    opt.step([np.zeros(6, np.float32)])
    np.testing.assert_array_equal(p[:4], np.array([0, 0, 0.4, -0.4], np.float32))
    assert np.isnan(p[4]) and p[5] == 0


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_clip_value_equals_clipping_first(backend):
    rng = np.random.default_rng(1)
    a = rng.standard_normal(1000)
    b = a.copy()
    oa = fastopt.Adam([a], clip_value=0.3, backend=backend)
    ob = fastopt.Adam([b], backend=backend)
    for _ in range(5):
        g = rng.standard_normal(1000)
        g[3] = np.nan
        oa.step([g])
        ob.step([np.clip(g, -0.3, 0.3)])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_grad_scale_divides_in_the_pass(backend):
    rng = np.random.default_rng(2)
    a = rng.standard_normal((64, 9)).astype(np.float32)
    b = a.copy()
    oa, ob = fastopt.AdamW([a], backend=backend), fastopt.AdamW([b], backend=backend)
    for _ in range(5):
        g = rng.standard_normal((64, 9)).astype(np.float32)
        oa.step([g * np.float32(65536)], grad_scale=65536.0)     # power of two: exact
        ob.step([g])
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_skip_nonfinite_leaves_everything_bit_identical(backend):
    rng = np.random.default_rng(3)
    w = rng.standard_normal((100, 4))
    e = rng.standard_normal((1000, 8))
    opt = fastopt.Adam([w, e], backend=backend)
    opt.step([rng.standard_normal((100, 4)), RowSparse([1, 5], np.ones((2, 8)))])
    before = opt.state_dict()
    w0, e0 = w.copy(), e.copy()
    for bad in ("dense", "sparse"):
        gw = rng.standard_normal((100, 4))
        vals = np.ones((2, 8))
        if bad == "dense":
            gw[7, 2] = np.inf
        else:
            vals[1, 3] = np.nan
        assert opt.step([gw, RowSparse([1, 5], vals)], skip_nonfinite=True) is False
        np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(e, e0)
        after = opt.state_dict()
        for i, st in before["state"].items():
            for key, v in st.items():
                np.testing.assert_array_equal(after["state"][i][key], v)
    assert opt.step([np.ones((100, 4)), None], skip_nonfinite=True) is True
    assert opt.state_dict()["state"][0]["step"] == 2 and opt.state_dict()["state"][1]["step"] == 1


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_sparse_lazy_options_touch_only_rows(backend):
    rng = np.random.default_rng(4)
    t = rng.standard_normal((300, 16)).astype(np.float32) * 2
    t0 = t.copy()
    opts = dict(clip_value=0.1, l1=0.01, max_norm=1.0, param_max=0.5)
    opt = fastopt.Adagrad([t], lr=0.1, backend=backend, **opts)
    idx = np.array([3, 3, 100, 299])
    opt.step([RowSparse(idx, rng.standard_normal((4, 16)).astype(np.float32))],
             grad_scale=2.0)
    untouched = np.setdiff1d(np.arange(300), idx)
    np.testing.assert_array_equal(t[untouched], t0[untouched])
    assert np.linalg.norm(t[[3, 100, 299]], axis=1).max() <= 1.0 + 1e-6
    assert t[[3, 100, 299]].max() <= 0.5


def test_numba_and_numpy_agree_on_sparse_options():
    rng = np.random.default_rng(5)
    out = {}
    for backend in ("numba", "numpy"):
        t = np.random.default_rng(0).standard_normal((500, 8))
        opt = fastopt.RowWiseAdagrad([t], lr=0.1, clip_value=0.5, l1=0.01, max_norm=2.0,
                                     backend=backend)
        r = np.random.default_rng(9)
        for _ in range(6):
            idx = np.minimum(r.zipf(1.2, 200) - 1, 499)
            opt.step([RowSparse(idx, r.standard_normal((200, 8)))], grad_scale=4.0)
        out[backend] = t
    np.testing.assert_allclose(out["numba"], out["numpy"], rtol=1e-10, atol=1e-12)
    del rng


@pytest.mark.parametrize("bad", [dict(clip_value=0.0), dict(clip_value=-1.0),
                                 dict(l1=-0.1), dict(param_min=1.0, param_max=0.0),
                                 dict(max_norm=0.0), dict(param_max=float("nan"))])
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        fastopt.Adam([np.ones(3)], **bad)


def test_bad_grad_scale_changes_nothing():
    p = np.ones(5)
    opt = fastopt.Adam([p])
    for s in (0.0, -2.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="grad_scale"):
            opt.step([np.ones(5)], grad_scale=s)
    np.testing.assert_array_equal(p, 1.0)
    assert opt.state_dict()["state"] == {}


def test_option_edited_in_param_groups_is_checked_and_used():
    p = np.zeros(4)
    opt = fastopt.SGD([p], lr=1.0)
    opt.param_groups[0]["param_max"] = 0.5
    opt.step([-np.ones(4)])
    np.testing.assert_array_equal(p, 0.5)
    opt.param_groups[0]["clip_value"] = -1.0
    with pytest.raises(ValueError, match="clip_value"):
        opt.step([np.ones(4)])
    np.testing.assert_array_equal(p, 0.5)


def test_exact_mode_refuses_l1_accepts_clipping():
    with pytest.raises(ValueError, match="l1"):
        fastopt.SGD([np.ones((4, 2))], l1=0.1, sparse_mode="exact")
    p = np.ones((4, 2))
    opt = fastopt.SGD([p], lr=0.1, clip_value=0.5, sparse_mode="exact")
    opt.step([RowSparse([1], np.full((1, 2), 10.0))])
    np.testing.assert_allclose(p[1], 0.95)


def test_options_round_trip_in_state_dict():
    p = np.ones(3)
    opt = fastopt.Adam([p], l1=0.2, max_norm=3.0)
    sd = opt.state_dict()
    assert sd["param_groups"][0]["l1"] == 0.2 and sd["param_groups"][0]["max_norm"] == 3.0
    other = fastopt.Adam([np.ones(3)])
    other.load_state_dict(sd)
    assert other.param_groups[0]["l1"] == 0.2
