"""fastopt against torch.optim itself (skipped when torch is not installed).

Every rule torch has, every registry variant, float64, 40 steps of awkward
gradients on two parameters: the trajectories agree to 1e-10 relative (the only
differences are torch's ``lerp`` and operation order).  torch keeps NAdam's
``mu_product`` in the default scalar dtype, so the default dtype is set to float64
here; fastopt keeps it in float64 always."""

import numpy as np
import pytest

import fastopt
from fastopt import rules

import inspect

from conftest import (CPU_BACKENDS, awkward_grads, init_params, rule_cases, shapes_for,
                      torch_ns_same_dtype)

torch = pytest.importorskip("torch")

SHAPES = [(50,), (8, 9)]


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def torch_optimizer(name, tparams, variant):
    cls = getattr(torch.optim, name)
    takes = inspect.signature(cls).parameters          # (Muon's ns_dtype is fastopt's)
    kwargs = {k: v for k, v in rules.RULES[name].defaults.items()
              if k not in fastopt.fused.DEFAULTS and k in takes}
    kwargs.update(variant)
    return cls(tparams, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,k", [c for c in rule_cases() if hasattr(torch.optim, c.values[0])])
def test_matches_torch_optim(name, k, backend, monkeypatch):
    variant = rules.RULES[name].variants[k]
    if name == "Muon":     # torch orthogonalizes in bfloat16: compare in float64 (test_muon.py)
        monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz",
                            torch_ns_same_dtype)
    shapes = shapes_for(name, SHAPES)
    params = init_params(shapes, np.float64)
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    opt = fastopt.CLASSES[name](params, backend=backend, **variant)
    topt = torch_optimizer(name, tparams, variant)
    for gs in awkward_grads(shapes, np.float64, 40, seed=11):
        opt.step(gs)
        for tp, g in zip(tparams, gs):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
    for p, tp in zip(params, tparams):
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-13)


def test_torch_state_keys_match():
    """State names are torch's (fastopt's SGD also counts steps)."""
    for name in rules.RULES:
        if not hasattr(torch.optim, name):      # Lion, RowWiseAdagrad
            continue
        variant = rules.RULES[name].variants[-1]
        shape = shapes_for(name, [(4,)])[0]
        p = np.ones(shape)
        opt = fastopt.CLASSES[name]([p], **variant)
        opt.step([np.ones(shape)])
        tp = torch.ones(shape, dtype=torch.float64, requires_grad=True)
        topt = torch_optimizer(name, [tp], variant)
        tp.grad = torch.ones(shape, dtype=torch.float64)
        topt.step()
        ours = set(opt.state_dict()["state"][0]) - {"step"}
        theirs = set(topt.state_dict()["state"][0]) - {"step"}
        assert ours == theirs, (name, ours, theirs)
