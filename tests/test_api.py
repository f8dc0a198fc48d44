"""The optimizer API: param forms, groups, None gradients, input validation."""

import inspect
import math

import numpy as np
import pytest

import fastopt
from fastopt import rules

from conftest import CPU_BACKENDS, shape_for


def _state(opt):
    # opt.state, not state_dict(): state_dict() refuses a bad param_groups edit too
    return {"state": {i: {k: (v.copy() if isinstance(v, np.ndarray) else v)
                          for k, v in st.items()} for i, st in opt.state.items()}}


def snapshot(opt, params):
    return [p.copy() for p in params], _state(opt)


def assert_unchanged(opt, params, snap):
    before_params, before_sd = snap
    for p, b in zip(params, before_params):
        np.testing.assert_array_equal(p, b)
    after = _state(opt)
    assert after["state"].keys() == before_sd["state"].keys()
    for i, st in before_sd["state"].items():
        for k, v in st.items():
            np.testing.assert_array_equal(after["state"][i][k], v)


@pytest.mark.parametrize("name", list(rules.RULES))
def test_class_signature_matches_registry(name):
    cls = fastopt.CLASSES[name]
    sig = inspect.signature(cls.__init__)
    rule = rules.RULES[name]
    options = fastopt.optimizers.OPTIONS
    got = {k: p.default for k, p in sig.parameters.items()
           if k not in ("self", "params", "fused_options", *options)}
    assert got == {k: v for k, v in rule.defaults.items() if k not in fastopt.fused.DEFAULTS}
    assert sig.parameters["fused_options"].kind is inspect.Parameter.VAR_KEYWORD
    for k, v in options.items():
        assert sig.parameters[k].default == v
        assert sig.parameters[k].kind is inspect.Parameter.KEYWORD_ONLY
    assert cls.__doc__ == rule.doc and cls.__doc__


def test_params_as_dict_and_dict_grads():
    w = np.ones((3, 2), np.float32)
    b = np.zeros(2, np.float32)
    opt = fastopt.SGD({"w": w, "b": b}, lr=0.5)
    opt.step({"b": np.ones(2, np.float32), "w": np.full((3, 2), 2, np.float32)})
    np.testing.assert_array_equal(w, np.zeros((3, 2)))
    np.testing.assert_array_equal(b, np.full(2, -0.5))
    with pytest.raises(KeyError, match="missing"):
        opt.step({"w": np.ones((3, 2), np.float32)})
    with pytest.raises(TypeError):
        fastopt.SGD([w]).step({"w": w})


def test_param_groups_with_own_lr_and_lr_change():
    a, b = np.ones(4), np.ones(4)
    opt = fastopt.SGD([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=0.01)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.01
    opt.step([np.ones(4), np.ones(4)])
    np.testing.assert_allclose(a, 0.9)
    np.testing.assert_allclose(b, 0.99)
    opt.param_groups[1]["lr"] = 1.0
    opt.step([np.ones(4), np.ones(4)])
    np.testing.assert_allclose(b, -0.01)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_none_gradient_skips_and_keeps_step_count(backend):
    a, b = np.ones(5), np.ones(5)
    opt = fastopt.Adam([a, b], lr=0.1, backend=backend)
    opt.step([np.ones(5), None])
    np.testing.assert_array_equal(b, np.ones(5))
    opt.step([np.ones(5), np.ones(5)])
    sd = opt.state_dict()["state"]
    assert sd[0]["step"] == 2 and sd[1]["step"] == 1
    # b's first step uses bias correction for t=1: |update| == lr exactly-ish
    np.testing.assert_allclose(b, 0.9, rtol=1e-6)
    assert opt.step([None, None]) is True


def test_wrong_gradient_count_shape_and_type_change_nothing():
    params = [np.ones(3, np.float32), np.ones((2, 2), np.float32)]
    opt = fastopt.Adam(params)
    opt.step([np.ones(3, np.float32), np.ones((2, 2), np.float32)])
    snap = snapshot(opt, params)
    with pytest.raises(ValueError, match="2 parameters"):
        opt.step([np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="shape"):
        opt.step([np.ones(3, np.float32), np.ones((2, 3), np.float32)])
    with pytest.raises(TypeError, match="dtype"):
        opt.step([np.ones(3, np.float32), np.ones((2, 2), np.int64)])
    with pytest.raises(TypeError):
        opt.step([np.ones(3, np.float32), [[1.0, 1.0], [1.0, 1.0]]])
    assert_unchanged(opt, params, snap)
    opt.step([np.ones(3, np.float32), np.ones((2, 2), np.float32)])  # still usable
    assert opt.state_dict()["state"][0]["step"] == 2


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_other_dtype_and_noncontiguous_gradients_are_converted(backend):
    p1, p2 = np.ones(6, np.float32), np.ones(6, np.float32)
    g64 = np.linspace(-1, 1, 12)[::2]          # float64 and strided
    fastopt.Adam([p1], backend=backend).step([g64])
    fastopt.Adam([p2], backend=backend).step([np.ascontiguousarray(g64, np.float32)])
    np.testing.assert_array_equal(p1, p2)


def test_bad_parameters_are_refused():
    ro = np.ones(3)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        fastopt.SGD([ro])
    with pytest.raises(ValueError, match="contiguous"):
        fastopt.SGD([np.ones((4, 4))[:, ::2]])
    with pytest.raises(TypeError, match="dtype"):
        fastopt.SGD([np.ones(3, np.int32)])
    with pytest.raises(TypeError, match="dtype"):
        fastopt.SGD([np.ones(3, np.float16)])
    with pytest.raises(TypeError):
        fastopt.SGD([[1.0, 2.0]])
    p = np.ones(3)
    with pytest.raises(ValueError, match="twice"):
        fastopt.SGD([p, p])
    with pytest.raises(ValueError, match="empty"):
        fastopt.SGD([])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_size_parameters_are_harmless(backend):
    e, w = np.ones(0, np.float32), np.ones(3, np.float32)
    opt = fastopt.Adam([e, w], backend=backend)
    opt.step([np.ones(0, np.float32), np.ones(3, np.float32)])
    assert e.size == 0 and np.all(w < 1)


def bad_values(check):
    """Values each kind of hyperparameter check must refuse."""
    if check is rules.hyperparams.boolean:
        return [1, "yes", None]
    if check in (rules.hyperparams.betas_half_open, rules.hyperparams.betas_closed):
        return [(0.9,), (0.9, 1.5), (-0.1, 0.9), (math.nan, 0.9), 0.9]
    if check is rules.hyperparams.real:
        return [math.nan, math.inf, -math.inf, "0.1", None]
    if check is rules.hyperparams.positive_int_or_none:
        return [0, -1, 2.5, math.nan, "3", True]
    if getattr(check, "__name__", "") in ("_adjust_lr_fn", "_ns_dtype"):  # None: valid
        return ["bad", 1.0, "float16"]
    if getattr(check, "__name__", "") == "_ns_steps":
        return [0, 100, -1, 2.5, True, None]
    if getattr(check, "__name__", "") == "_coefficients":
        return [(1.0, 2.0), (1.0, math.nan, 2.0), None, 3.0]
    if getattr(check, "__name__", "") == "_trust_clip":     # None: no clamp
        return [-1.0, 0.0, math.nan, math.inf, "0.1"]
    if getattr(check, "__name__", "") == "_beta2_decay":    # Adafactor's: <= 0
        return [0.5, math.nan, math.inf, "0.1", None]
    if getattr(check, "__name__", "") == "_d":              # Adafactor's: >= 1
        return [0.5, -1.0, math.nan, math.inf, "0.1", None]
    bad = [-1.0, math.nan, math.inf, -math.inf, "0.1", None]
    if check is rules.hyperparams.unit_closed:
        bad.append(1.5)
    if check is rules.hyperparams.unit_half_open:
        bad.append(1.0)
    return bad


def hyper_cases():
    return [pytest.param(name, key, bad, id=f"{name}-{key}-{bad!r}")
            for name, rule in rules.RULES.items()
            for key, check in rule.checks.items() if key not in fastopt.fused.DEFAULTS
            for bad in bad_values(check)]       # fused options: tests/test_fused.py


@pytest.mark.parametrize("name,key,bad", hyper_cases())
def test_bad_hyperparameters_raise_naming_the_value(name, key, bad):
    with pytest.raises(ValueError, match=key):
        fastopt.CLASSES[name]([np.ones(shape_for(name, (3,)))], **{key: bad})


@pytest.mark.parametrize("name", list(rules.RULES))
def test_bad_hyperparameter_set_between_steps_changes_nothing(name):
    shape = shape_for(name, (4,))
    params = [np.ones(shape)]
    opt = fastopt.CLASSES[name](params)
    opt.step([np.full(shape, 0.5)])
    snap = snapshot(opt, params)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step([np.full(shape, 0.5)])
    assert_unchanged(opt, params, snap)
    opt.param_groups[0]["lr"] = 1e-3
    opt.step([np.full(shape, 0.5)])


def test_nesterov_needs_momentum_and_no_dampening():
    with pytest.raises(ValueError, match="nesterov"):
        fastopt.SGD([np.ones(2)], nesterov=True)
    with pytest.raises(ValueError, match="nesterov"):
        fastopt.SGD([np.ones(2)], nesterov=True, momentum=0.9, dampening=0.1)


def test_unknown_hyperparameter_and_backend():
    with pytest.raises(TypeError, match="unexpected"):
        fastopt.optimizer.Optimizer.__init__(fastopt.Adam.__new__(fastopt.Adam),
                                             [np.ones(2)], momentum=0.9)
    with pytest.raises(ValueError, match="unknown backend"):
        fastopt.Adam([np.ones(2)], backend="fortran")
    if "cuda" not in fastopt.available_backends():
        with pytest.raises(RuntimeError, match="not available"):
            fastopt.Adam([np.ones(2)], backend="cuda")


def test_mixed_dtypes_in_one_optimizer():
    a, b = np.ones(5, np.float32), np.ones(5, np.float64)
    opt = fastopt.Adam([a, b], lr=0.1)
    opt.step([np.ones(5, np.float32), np.ones(5)])
    np.testing.assert_allclose(a, 0.9, rtol=1e-6)
    np.testing.assert_allclose(b, 0.9, rtol=1e-8)


@pytest.mark.parametrize("name", list(rules.RULES))
def test_functional_matches_class(name):
    rule = rules.RULES[name]
    variant = rule.variants[-1]
    group = rule.check_group({**rule.defaults, **variant})
    uses = rule.uses_slots(group)
    rng = np.random.default_rng(3)
    shape = shape_for(name, (50,))
    p_cls = rng.standard_normal(shape)
    p_fn = p_cls.copy()
    opt = fastopt.CLASSES[name]([p_cls], **variant)
    slots = [np.full(rule.slot_shape(shape, s), rule.slot_init(group, s))
             if u and s in rule.slots_of(shape) else None
             for s, u in zip(rule.slots, uses)]
    host = rule.host_init(group)
    fn = getattr(fastopt.functional, fastopt.functional._fname(rule))
    for t in range(1, 6):
        g = rng.standard_normal(shape)
        opt.step([g])
        out = fn(p_fn, g, *slots, step=t, **variant, **host)
        if host:       # one host scalar comes back alone, several as a dict (ASGD)
            host = out if isinstance(out, dict) else {next(iter(host)): out}
    np.testing.assert_array_equal(p_fn, p_cls)


def test_functional_validates_before_writing():
    p, g = np.ones(4), np.ones(4)
    m, v = np.zeros(4), np.zeros(4)
    with pytest.raises(ValueError, match="exp_avg_sq"):
        fastopt.functional.adam_(p, g, m, None, step=1)
    with pytest.raises(ValueError, match="step"):
        fastopt.functional.adam_(p, g, m, v, step=0)
    with pytest.raises(ValueError, match="shape"):
        fastopt.functional.adam_(p, g, m, np.zeros(5), step=1)
    with pytest.raises(ValueError, match="lr"):
        fastopt.functional.adam_(p, g, m, v, step=1, lr=math.nan)
    np.testing.assert_array_equal(p, 1)
    np.testing.assert_array_equal(m, 0)
    fastopt.functional.adam_(p, g, exp_avg=m, exp_avg_sq=v, step=1, lr=0.5)
    np.testing.assert_allclose(p, 0.5)
