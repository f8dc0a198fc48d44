"""Every option and mode on every backend, through both APIs, against the reference.

Driven by the rule registry and the capability table: for each available host
backend, what it declares it supports must give the NumPy reference backend's
result through the optimizer classes *and* the functional layer (one planner
serves both), and what it declares it lacks must be refused before anything is
written.
"""

import numpy as np
import pytest

import fastopt
from fastopt import storage
from fastopt import backends, functional, rules
from fastopt.backends.base import FEATURES

from conftest import CPU_BACKENDS

#: every test here runs in .ci/run's boundscheck lane (NUMBA_BOUNDSCHECK=1)
pytestmark = pytest.mark.boundscheck

COMPILED = [b for b in CPU_BACKENDS if b != "numpy"]

ALL_OPTIONS = dict(clip_value=0.5, l1=1e-3, param_min=-0.45, param_max=0.45, max_norm=1.2)
ONE_OPTION = [dict(clip_value=0.5), dict(l1=0.02), dict(param_min=-0.3), dict(param_max=0.3),
              dict(max_norm=0.9)]
#: rules that exercise each option alone (an element-wise rule with and without
#: bias correction, and the row-wise rule); every rule gets all options at once
ONE_OPTION_RULES = ["SGD", "Adam", "RowWiseAdagrad"]


def option_cases():
    cases = []
    for name, rule in rules.RULES.items():
        if rule.factored:     # no fused options (tests/test_adafactor.py checks the refusal)
            continue
        # per-tensor rules update whole tensors: max_norm (a row option) is refused
        opts = {k: v for k, v in ALL_OPTIONS.items() if k != "max_norm"} \
            if rule.per_tensor else ALL_OPTIONS
        if rule.matrix is not None:
            # Muon: the options on the parameter (clip_value, max_norm and grad_scale
            # are refused: the update pass reads the orthogonalized matrix)
            opts = {k: v for k, v in ALL_OPTIONS.items() if k in ("l1", "param_min",
                                                                  "param_max")}
            cases.append(pytest.param(name, opts, None, id=f"{name}-post"))
            continue
        cases.append(pytest.param(name, opts, 64.0, id=f"{name}-all-scaled"))
    for name in ONE_OPTION_RULES:
        for opt in ONE_OPTION:
            k = next(iter(opt))
            cases.append(pytest.param(name, opt, None, id=f"{name}-{k}"))
    return cases


def _data(shape, dtype, steps, seed):
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal(shape) * 0.5).astype(dtype)
    grads = []
    for t in range(steps):
        g = rng.standard_normal(shape) * 64.0
        g[rng.random(shape) < 0.2] = 0.0
        if t == 2:
            g *= 1e3
        grads.append(g.astype(dtype))
    return p, grads


def _run_class(name, backend, options, grad_scale, shape=(9, 5), dtype=np.float64, steps=6):
    rule = rules.RULES[name]
    p, grads = _data(shape, dtype, steps, 0)
    opt = fastopt.CLASSES[name]([p], backend=backend, **rule.variants[-1], **options)
    for g in grads:
        assert opt.step([g], grad_scale=grad_scale)
    return p, opt.state_dict()["state"][0]


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("name,options,grad_scale", option_cases())
def test_class_options_match_reference(backend, name, options, grad_scale):
    bk = backends.resolve(backend)
    if not (bk.supports("fused_options") and (grad_scale is None or bk.supports("grad_scale"))):
        with pytest.raises(NotImplementedError):
            _run_class(name, backend, options, grad_scale)
        return
    p, st = _run_class(name, backend, options, grad_scale)
    p_ref, st_ref = _run_class(name, "numpy", options, grad_scale)
    np.testing.assert_allclose(p, p_ref, rtol=1e-9, atol=1e-12)
    for k in st_ref:
        if k != "step":
            np.testing.assert_allclose(st[k], st_ref[k], rtol=1e-9, atol=1e-12, err_msg=k)


def _run_functional(name, backend, options, grad_scale, sparse, dtype=np.float64, steps=5):
    """The functional layer, keeping state by hand."""
    rule = rules.RULES[name]
    fn = getattr(functional, functional._fname(rule))
    variant = rule.variants[-1]
    group = rule.check_group({**rule.defaults, **variant, **options})
    p, grads = _data((8, 4), dtype, steps, 1)
    slots = [np.full(rule.slot_shape(p.shape), rule.slot_init(group, n), dtype)
             for n in rule.slots]
    host = dict(rule.host_init(group))
    for t, g in enumerate(grads, start=1):
        if sparse:
            idx = np.array([5, 1, 5, 7], dtype=np.int64)
            grad = fastopt.RowSparse(idx, g[:4].copy())
        else:
            grad = g
        out = fn(p, grad, *slots, step=t, backend=backend, grad_scale=grad_scale,
                 **variant, **options, **host)
        if host:       # one host scalar comes back alone, several as a dict (ASGD)
            host = out if isinstance(out, dict) else {next(iter(host)): out}
    return p, slots


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("name,options,grad_scale", option_cases())
def test_functional_options_match_reference(backend, name, options, grad_scale, sparse):
    bk = backends.resolve(backend)
    need = ["fused_options"] + (["grad_scale"] if grad_scale else []) + (
        ["sparse_lazy"] if sparse else [])
    if not all(bk.supports(f) for f in need):
        with pytest.raises(NotImplementedError):
            _run_functional(name, backend, options, grad_scale, sparse)
        return
    if sparse and rules.RULES[name].whole_tensor:
        with pytest.raises(ValueError, match="row-sparse gradient"):
            _run_functional(name, backend, options, grad_scale, sparse)
        return
    p, slots = _run_functional(name, backend, options, grad_scale, sparse)
    p_ref, slots_ref = _run_functional(name, "numpy", options, grad_scale, sparse)
    np.testing.assert_allclose(p, p_ref, rtol=1e-9, atol=1e-12)
    for a, b in zip(slots, slots_ref):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_honours_fused_options(backend):
    """The report that started the redesign: the functional layer used to ignore
    l1 and param_max on the compiled backends."""
    rng = np.random.default_rng(3)
    p = rng.standard_normal(1000).astype(np.float32)
    g = rng.standard_normal(1000).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    functional.adam_(p, g, m, v, step=1, lr=0.1, l1=0.5, param_max=0.5, backend=backend)
    assert p.max() <= 0.5
    assert (p == 0).sum() > 10           # the soft threshold (lr * l1 = 0.05) made zeros
    q = rng.standard_normal(1000).astype(np.float32)
    q_ref = q.copy()
    for arr, bk in ((q, backend), (q_ref, "numpy")):
        functional.adam_(arr, g, np.zeros_like(p), np.zeros_like(p), step=1, lr=0.1, l1=0.5,
                         param_max=0.5, backend=bk)
    np.testing.assert_allclose(q, q_ref, rtol=1e-6, atol=1e-7)


def test_capability_table_is_consistent():
    caps = backends.capabilities()
    assert "numpy" in caps and "numba" in caps
    for name, feats in caps.items():
        assert set(feats) <= set(FEATURES), name
        assert backends.resolve(name).name == name
    # the reference defines every feature
    assert set(caps["numpy"]) == set(FEATURES)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_missing_feature_is_refused_before_writing(backend, feature):
    """Where a backend declares a feature missing, using it raises and changes
    nothing; where it declares it present, the same call works."""
    bk = backends.resolve(backend)
    p = np.linspace(-1, 1, 12).reshape(4, 3)
    if feature == "float32":
        p = p.astype(np.float32)
    if feature == "bfloat16":
        p = p.astype(storage.BF16)
    before = p.copy()
    calls = {
        "dense": lambda: fastopt.SGD([p], lr=0.1, backend=backend).step([np.ones_like(p)]),
        "float32": lambda: fastopt.SGD([p], lr=0.1, backend=backend).step([np.ones_like(p)]),
        "float64": lambda: fastopt.SGD([p], lr=0.1, backend=backend).step([np.ones_like(p)]),
        "sparse_lazy": lambda: fastopt.SGD([p], lr=0.1, backend=backend).step(
            [fastopt.RowSparse(np.array([1]), np.ones((1, 3)))]),
        "sparse_exact": lambda: fastopt.SGD([p], lr=0.1, backend=backend,
                                            sparse_mode="exact").step(
            [fastopt.RowSparse(np.array([1]), np.ones((1, 3)))]),
        "rowwise": lambda: fastopt.RowWiseAdagrad([p], lr=0.1, backend=backend).step(
            [np.ones_like(p)]),
        "fused_options": lambda: fastopt.SGD([p], lr=0.1, clip_value=0.5,
                                             backend=backend).step([np.ones_like(p)]),
        "grad_scale": lambda: fastopt.SGD([p], lr=0.1, backend=backend).step(
            [np.ones_like(p)], grad_scale=2.0),
        "skip_nonfinite": lambda: fastopt.SGD([p], lr=0.1, backend=backend).step(
            [np.ones_like(p)], skip_nonfinite=True),
        "bfloat16": lambda: fastopt.SGD([p], lr=0.1, backend=backend).step(
            [np.ones_like(p)]),
        "state16": lambda: fastopt.SGD([p], lr=0.1, momentum=0.9, state_bits=16,
                                       backend=backend).step([np.ones_like(p)]),
        "state8": lambda: fastopt.SGD([p], lr=0.1, momentum=0.9, state_bits=8,
                                      backend=backend).step([np.ones_like(p)]),
        "tensor_norms": lambda: fastopt.LAMB([p], lr=0.1, backend=backend).step(
            [np.ones_like(p)]),
        "matrix": lambda: fastopt.Muon([p], lr=0.1, backend=backend).step(
            [np.ones_like(p)]),
        "factored": lambda: fastopt.Adafactor([p], lr=0.1, backend=backend).step(
            [np.ones_like(p)]),
        "stored_passes": lambda: fastopt.LARS([p], lr=0.1, state_bits=16,
                                              backend=backend).step([np.ones_like(p)]),
    }
    if bk.supports(feature):
        assert calls[feature]() is True
        assert not np.array_equal(p, before)
    else:
        with pytest.raises(NotImplementedError, match=backend):
            calls[feature]()
        np.testing.assert_array_equal(p, before)


def test_info_command_lists_backends(capsys):
    from fastopt.__main__ import main
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert fastopt.__version__ in out
    for name in backends.capabilities():
        assert name in out
    for feature in FEATURES:
        assert feature in out
