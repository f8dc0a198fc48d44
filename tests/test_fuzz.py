"""Property-based differential tests: random rules, options, dtypes, shapes (0-size,
0-d, 3-D), sparse gradients and hyperparameter edits between steps, every compiled
host backend against the NumPy reference backend; and "a refused call changes
nothing" as an invariant.

Bounded for CI (derandomized, ``FASTOPT_FUZZ_EXAMPLES`` examples per property,
default 30); raise the environment variable for a longer hunt.
"""

import os

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastopt  # noqa: E402
from fastopt import RowSparse, rules  # noqa: E402

from conftest import CPU_BACKENDS  # noqa: E402

COMPILED = [b for b in CPU_BACKENDS if b != "numpy"]
EXAMPLES = int(os.environ.get("FASTOPT_FUZZ_EXAMPLES", "30"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))
SHAPES = [(), (0,), (1,), (7,), (3, 4), (2, 3, 4), (4, 0), (5, 1)]
OPTION_VALUES = dict(clip_value=[0.3, 2.0], l1=[1e-3, 0.05], param_min=[-0.5, -2.0],
                     param_max=[0.5, 2.0], max_norm=[0.5, 3.0])


@st.composite
def configurations(draw):
    # matrix rules (Muon) take matrices only and refuse the gradient options: fuzzed
    # in tests/test_muon.py's own cases
    name = draw(st.sampled_from(sorted(n for n, r in rules.RULES.items() if r.matrix is None)))
    rule = rules.RULES[name]
    hyper = dict(rule.variants[draw(st.integers(0, len(rule.variants) - 1))])
    for key, values in OPTION_VALUES.items():
        if key == "max_norm" and rule.per_tensor:    # a row option: refused for them
            continue
        if rule.factored:        # Adafactor: no fused options (test_adafactor.py: refused)
            continue
        if draw(st.booleans()) and draw(st.booleans()):
            hyper[key] = draw(st.sampled_from(values))
    if "param_min" in hyper and "param_max" in hyper and hyper["param_min"] > hyper["param_max"]:
        del hyper["param_min"]
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))
    if rule.layout == "rowwise":
        shapes = [s if len(s) else (3,) for s in shapes]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        kinds = [draw(st.sampled_from(["dense", "sparse", "none"]
                                      if len(s) and not (rule.per_tensor or rule.factored)
                                      else ["dense", "none"])) for s in shapes]
        scale = None if rule.factored else draw(st.sampled_from([None, None, 8.0]))
        lr_edit = draw(st.sampled_from([None, None, 0.5]))
        steps.append((kinds, scale, lr_edit, draw(st.integers(0, 2 ** 16))))
    backend = draw(st.sampled_from(COMPILED))
    return name, hyper, shapes, dtype, steps, backend


def _grad(kind, shape, dtype, seed):
    rng = np.random.default_rng(seed)
    if kind == "none":
        return None
    g = np.array(rng.standard_normal(shape))
    if g.size:
        g.reshape(-1)[rng.random(g.size) < 0.2] = 0.0
    g = g.astype(dtype)
    if kind == "dense":
        return g
    n = shape[0]
    idx = rng.integers(0, n, size=rng.integers(0, 2 * n + 1)) if n else np.zeros(0, np.int64)
    return RowSparse(idx.astype(np.int64), rng.standard_normal(
        (idx.shape[0],) + tuple(shape[1:])).astype(dtype))


def _run(name, hyper, shapes, dtype, steps, backend):
    rng = np.random.default_rng(7)
    params = [np.array(rng.standard_normal(s) * 0.7, dtype=dtype) for s in shapes]
    opt = fastopt.CLASSES[name](params, backend=backend, **hyper)
    for kinds, scale, lr_edit, seed in steps:
        if lr_edit is not None:
            opt.param_groups[0]["lr"] = opt.param_groups[0]["lr"] * lr_edit
        grads = [_grad(k, s, dtype, seed + j) for j, (k, s) in enumerate(zip(kinds, shapes))]
        assert opt.step(grads, grad_scale=scale) is True
    return params, opt.state_dict()


@SETTINGS
@given(configurations())
def test_backends_agree_with_the_reference(cfg):
    name, hyper, shapes, dtype, steps, backend = cfg
    with np.errstate(all="ignore"):
        got, sd = _run(name, hyper, shapes, dtype, steps, backend)
        want, sd_ref = _run(name, hyper, shapes, dtype, steps, "numpy")
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-12)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, **tol)
    assert sd["state"].keys() == sd_ref["state"].keys()
    for i, st_ref in sd_ref["state"].items():
        for k, v in st_ref.items():
            np.testing.assert_allclose(sd["state"][i][k], v, **tol, err_msg=f"{i} {k}")


BAD_CALLS = ["shape", "index", "lr", "nan_hyper", "count", "dtype", "alias"]


@SETTINGS
@given(configurations(), st.sampled_from(BAD_CALLS))
def test_a_refused_call_changes_nothing(cfg, bad):
    name, hyper, shapes, dtype, steps, backend = cfg
    params, _ = _run(name, hyper, shapes, dtype, steps[:1], backend)
    opt = fastopt.CLASSES[name](params, backend=backend, **hyper)
    opt.step([_grad("dense", s, dtype, 1) for s in shapes])
    before = ([p.copy() for p in params], opt.state_dict())
    grads = [_grad("dense", s, dtype, 2) for s in shapes]
    if bad == "shape":
        grads[-1] = np.zeros(shapes[-1] + (2,), dtype)
    elif bad == "index":
        s = next((s for s in shapes if len(s)), None)
        if s is None:
            return
        k = shapes.index(s)
        grads[k] = RowSparse(np.array([0, s[0]]), np.zeros((2,) + tuple(s[1:]), dtype))
    elif bad == "lr":
        opt.param_groups[-1]["lr"] = -1.0
    elif bad == "nan_hyper":        # Rprop has no weight decay
        key = "weight_decay" if "weight_decay" in rules.RULES[name].defaults else "lr"
        opt.param_groups[0][key] = float("nan")
    elif bad == "count":
        grads = grads + [grads[0]]
    elif bad == "dtype":
        grads[0] = np.zeros(shapes[0], np.int32)
    elif bad == "alias":
        if params[0].size == 0:
            return
        grads[0] = params[0]
    with pytest.raises((ValueError, TypeError, IndexError, KeyError)):
        opt.step(grads)
    for a, b in zip(params, before[0]):
        np.testing.assert_array_equal(a, b)
    if bad in ("lr", "nan_hyper"):
        return          # the edit itself stays in param_groups (it is the user's)
    after = opt.state_dict()
    for i, st_ref in before[1]["state"].items():
        for k, v in st_ref.items():
            np.testing.assert_array_equal(after["state"][i][k], v)


# ------------------------------------------------------------- stored formats

STORED_SHAPES = [(0, 5), (4, 0), (3, 7), (3, 1500), (2, 3, 700)]
BF16_UPDATES = ["split", "kahan", "stochastic", "nearest"]


@st.composite
def stored_configurations(draw):
    """A configuration with storage options, per group: bfloat16 or float32
    parameters, 8/16/32-bit state, every bf16_update, clamps and max_norm, shapes
    with no rows or no columns beside ones large enough for 8-bit blocks."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    # per-tensor rules keep float32/float64 only (their refusals: test_tensor_rules.py)
    name = draw(st.sampled_from(sorted(n for n, r in rules.RULES.items()
                                       if not r.whole_tensor)))
    rule = rules.RULES[name]
    groups = []
    for _ in range(draw(st.integers(1, 2))):
        # the widths some variant of the rule takes (ASGD and schedule-free refuse 8
        # and 16 bits in every variant)
        bits = draw(st.sampled_from([b for b in (None, 32, 16, 8) if any(
            rules.takes_state_bits(rule, v, b) for v in rule.variants)]))
        variants = [v for v in rule.variants if rules.takes_state_bits(rule, v, bits)]
        hyper = dict(draw(st.sampled_from(variants)))
        bound = draw(st.sampled_from(["none", "clamp", "max_norm"]))   # clamp, then
        if bound == "clamp":                                            # renorm, leaves
            hyper.update(param_min=-0.3, param_max=draw(st.sampled_from([0.3, -0.1])))
        elif bound == "max_norm":                                       # a clamp
            hyper["max_norm"] = 0.8
        bf16 = draw(st.booleans()) if rule.bf16_reason is None else False
        group = dict(hyper, state_bits=bits, seed=draw(st.integers(0, 5)))
        if bf16:
            group["bf16_update"] = draw(st.sampled_from(BF16_UPDATES))
        shapes = draw(st.lists(st.sampled_from(STORED_SHAPES), min_size=1, max_size=2))
        dtype = np.dtype(ml_dtypes.bfloat16) if bf16 else np.dtype(np.float32)
        groups.append((group, shapes, dtype))
    steps = [(draw(st.integers(0, 2 ** 16)), draw(st.booleans()))
             for _ in range(draw(st.integers(1, 3)))]
    backend = draw(st.sampled_from(COMPILED))
    return name, groups, steps, backend


def _run_stored(name, groups, steps, backend):
    rng = np.random.default_rng(3)
    param_groups, flat = [], []
    for group, shapes, dtype in groups:
        ps = []
        for s in shapes:                  # start inside the bounds (lazy sparse steps
            x = rng.standard_normal(s) * 0.2                # leave untouched rows)
            if group.get("param_min") is not None:
                lo, hi = group["param_min"], group["param_max"]
                x = lo + (hi - lo) * (0.25 + 0.5 * rng.random(s))
            if group.get("max_norm") is not None and x.size:
                rows = x.reshape(s[0], -1)
                rows *= 0.4 / np.sqrt((rows * rows).sum(axis=1, keepdims=True))
            ps.append(x.astype(dtype))
        param_groups.append(dict(group, params=ps))
        flat.extend((p, group) for p in ps)
    opt = fastopt.CLASSES[name](param_groups, backend=backend)
    for seed, sparse in steps:
        grads = []
        for k, (p, group) in enumerate(flat):
            sparse_ok = sparse and p.ndim > 1 and group.get("max_norm") is None
            grads.append(_grad("sparse" if sparse_ok else "dense", p.shape, np.float32,
                               seed + k))
        assert opt.step(grads) is True
    return [p for p, _ in flat], [g for _, g in flat]


def _inside(p, group):
    """bfloat16 parameters: strictly inside the bounds; float32 ones: inside up to
    float32 rounding (the bound itself is rounded to float32, as torch does)."""
    w = np.asarray(p, dtype=np.float64)
    if w.size == 0:
        return
    bf16 = p.dtype.itemsize == 2
    if group.get("param_min") is not None:
        lo, hi = group["param_min"], group["param_max"]
        if not bf16:
            lo, hi = float(np.float32(lo)), float(np.float32(hi))
        assert w.min() >= lo and w.max() <= hi
    if group.get("max_norm") is not None:
        rows = w.reshape(w.shape[0], -1)
        slack = 1.0 if bf16 else 1.0 + 1e-6
        assert np.sqrt((rows * rows).sum(axis=1)).max() <= group["max_norm"] * slack


@SETTINGS
@given(stored_configurations())
def test_stored_formats_agree_with_the_reference_and_stay_inside(cfg):
    """The reference backend and the kernels take the same stored steps (no refusal,
    no failure on shapes without rows), agree within a few bfloat16 steps / 8-bit
    codes, and keep bfloat16 parameters inside their clamps and max_norm."""
    name, groups, steps, backend = cfg
    with np.errstate(all="ignore"):
        got, owners = _run_stored(name, groups, steps, backend)
        want, _ = _run_stored(name, groups, steps, "numpy")
    for a, b, group in zip(got, want, owners):
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float64)
        np.testing.assert_allclose(a64, b64, rtol=2 ** -5, atol=2e-2)
        _inside(a, group)
        _inside(b, group)
