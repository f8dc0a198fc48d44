"""Every rule x variant x backend x dtype against the NumPy reference, over 60 steps
of awkward gradients, on several shapes at once (one optimizer, one launch): the
pairwise cases of tests/cases.py (every two of variant, backend, dtype; every rule x
backend x dtype; Adam in full)."""

import numpy as np
import pytest

import fastopt
from fastopt import rules

from cases import REFERENCE
from conftest import (CPU_BACKENDS, SHAPES, awkward_grads, init_params, reference_run, rule_cases,
                      shape_for, shapes_for)

STEPS = 60
# same-dtype reference vs kernel: only rounding order differs
RTOL = {np.float32: 2e-5, np.float64: 1e-11}


def run_optimizer(name, variant, backend, params, grads_seq):
    opt = fastopt.CLASSES[name](params, backend=backend, **variant)
    for grads in grads_seq:
        assert opt.step(grads) is True
    return opt


@pytest.mark.parametrize("variant_id,backend,dtype", REFERENCE.params("variant", "backend",
                                                                      "dtype"))
def test_matches_reference(variant_id, backend, dtype):
    """Cases (tests/cases.py): every variant x backend, variant x dtype and backend x
    dtype pair, every rule x backend x dtype, every combination for Adam."""
    name, k = variant_id
    rule = rules.RULES[name]
    variant = rule.variants[k]
    shapes = shapes_for(name, SHAPES)
    params = init_params(shapes, dtype)
    grads_seq = awkward_grads(shapes, dtype, STEPS)
    expected, exp_states = reference_run(rule, variant, params, grads_seq)
    opt = run_optimizer(name, variant, backend, params, grads_seq)
    for p, e, p0 in zip(params, expected, init_params(shapes, dtype)):
        assert p.dtype == np.dtype(dtype)
        scale = max(1.0, float(np.abs(e).max(initial=0.0)))
        np.testing.assert_allclose(p, e, rtol=RTOL[dtype], atol=RTOL[dtype] * scale)
        if p.size and rule.defaults.get("lr", 1) > 0:
            assert not np.array_equal(p, p0), "the step changed nothing"
    for i, st in enumerate(exp_states):
        got = opt.state_dict()["state"][i]
        assert got["step"] == STEPS
        for key, val in st.items():
            if isinstance(val, np.ndarray):
                scale = max(1.0, float(np.abs(val).max(initial=0.0)))
                np.testing.assert_allclose(got[key], val, rtol=RTOL[dtype],
                                           atol=RTOL[dtype] * scale, err_msg=key)
            else:
                assert got[key] == pytest.approx(val, rel=1e-12), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,k", rule_cases())
def test_float32_tracks_float64_oracle(name, k, backend):
    """The float32 kernels stay close to the float64 reference (no precision bugs)."""
    rule = rules.RULES[name]
    variant = rule.variants[k]
    shapes = shapes_for(name, [(5000,)])
    p64 = init_params(shapes, np.float64)
    g64 = awkward_grads(shapes, np.float64, 30)
    expected, _ = reference_run(rule, variant, p64, g64)
    p32 = [p.astype(np.float32) for p in p64]
    run_optimizer(name, variant, backend, p32, [[g.astype(np.float32) for g in gs] for gs in g64])
    if name == "Lion":   # sign() of a tiny update may differ: compare most elements
        close = np.isclose(p32[0], expected[0], rtol=1e-4, atol=1e-4)
        assert close.mean() > 0.99
    else:
        np.testing.assert_allclose(p32[0], expected[0], rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(rules.RULES))
def test_nonfinite_gradients_propagate(name, backend):
    """NaN and Inf gradients propagate as IEEE arithmetic says, as in the reference."""
    rule = rules.RULES[name]
    shape = shape_for(name, (64,))          # Muon: (8, 8), one matrix
    p = init_params([shape], np.float64)[0]
    g = np.ones(shape)
    g.flat[3], g.flat[10], g.flat[20] = np.nan, np.inf, -np.inf
    expected, _ = reference_run(rule, {}, [p], [[g], [np.ones(shape)]])
    opt = fastopt.CLASSES[name]([p], backend=backend)
    opt.step([g])
    opt.step([np.ones(shape)])
    np.testing.assert_array_equal(np.isnan(p), np.isnan(expected[0]))
    np.testing.assert_array_equal(np.isinf(p), np.isinf(expected[0]))
    if name != "Rprop":     # steps by sign(g), and torch's sign(NaN) is 0 (rules/rprop.py)
        assert np.isnan(p.flat[3])
    fin = np.isfinite(expected[0])
    np.testing.assert_allclose(p[fin], expected[0][fin], rtol=1e-12)
