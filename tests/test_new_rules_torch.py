"""The rules added for issue 21 (the rest of torch.optim) against torch.optim itself:
the fastopt class on NumPy arrays and torch.optim.<Name> on copies, over many steps
of awkward gradients (exact zeros, an all-zero step, huge and tiny gradients, a NaN
where the semantics propagate it), float32 and float64, every option (maximize,
weight decay, ...).  Parameters and every state tensor are compared (torch's state
names).  float64 runs set torch's default dtype to float64 (see :func:`_run`)."""

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")

STEPS = 40
SHAPES = [(257,), (7, 13)]
# different operation order (torch's lerp, addcmul, folded host scalars) only
RTOL = {np.float32: 2e-5, np.float64: 1e-10}

#: rule -> configurations (hyperparameters, torch's names), each run against torch
CONFIGS = {
    "RAdam": [dict(), dict(lr=1e-2, weight_decay=1e-2), dict(maximize=True, betas=(0.8, 0.99)),
              dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True, eps=1e-6)],
    "Adadelta": [dict(), dict(weight_decay=1e-2, rho=0.5), dict(maximize=True, lr=0.1, eps=1e-4),
                 dict(lr=0.5, rho=0.95, weight_decay=0.1, maximize=True)],
    "Rprop": [dict(), dict(lr=0.1, etas=(0.3, 1.5)), dict(maximize=True, step_sizes=(1e-3, 0.2)),
              dict(lr=1e-3, etas=(0.4, 1.1), step_sizes=(0.0, 1e3), maximize=True)],
    "ASGD": [dict(), dict(t0=5.0, lambd=1e-2), dict(maximize=True, weight_decay=1e-2, t0=0.0),
             dict(lr=0.05, lambd=0.1, alpha=0.5, t0=10.0, weight_decay=0.1, maximize=True)],
}


def _grads(shape, dtype, rng, t, nan):
    g = rng.standard_normal(shape)
    g[rng.random(shape) < 0.2] = 0.0
    if t % 9 == 4:
        g[...] = 0.0                         # an all-zero step
    elif t % 7 == 2:
        g *= 1e10                            # huge
    elif t % 5 == 3:
        g *= 1e-20                           # tiny
    if nan and t == 11:
        g.flat[3] = np.nan                   # NaN propagates (one element)
    return g.astype(dtype)


def _run(name, config, dtype, backend, nan=True):
    """torch keeps per-parameter scalars (ASGD's eta and mu, the step) as 0-d tensors
    of its default dtype: float64 parameters run with torch's default float64, as
    fastopt keeps them in float64 always."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        return _run_steps(name, config, dtype, backend, nan)
    finally:
        torch.set_default_dtype(old)


def _run_steps(name, config, dtype, backend, nan):
    rng = np.random.default_rng(7)
    ours = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    theirs = [torch.tensor(p.copy(), requires_grad=True) for p in ours]
    opt = fastopt.CLASSES[name](ours, backend=backend, **config)
    ref = getattr(torch.optim, name)(theirs, **config)
    for t in range(STEPS):
        grads = [_grads(s, dtype, rng, t, nan) for s in SHAPES]
        opt.step(grads)
        for p, g in zip(theirs, grads):
            p.grad = torch.from_numpy(g.copy())
        ref.step()
    return opt, ref, ours, theirs


def _close(got, want, dtype, what):
    want = np.asarray(want)
    got = np.asarray(got)
    assert got.dtype == want.dtype, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=what)
    scale = max(1.0, float(np.abs(want[fin]).max(initial=0.0)))
    np.testing.assert_allclose(got[fin], want[fin], rtol=RTOL[dtype], atol=RTOL[dtype] * scale,
                               err_msg=what)


CASES = [(n, k) for n, cs in CONFIGS.items() for k in range(len(cs))]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,k", CASES)
def test_matches_torch(name, k, dtype):
    config = CONFIGS[name][k]
    opt, ref, ours, theirs = _run(name, config, dtype, "numpy")
    for i, (p, tp) in enumerate(zip(ours, theirs)):
        _close(p, tp.detach().numpy(), dtype, f"param {i}")
        got = opt.state_dict()["state"][i]
        want = ref.state[tp]
        assert got["step"] == STEPS == int(want["step"])
        for key, v in want.items():
            if key == "step":
                continue
            assert key in got, key
            if v.ndim == 0:     # torch's per-parameter scalars (float32 0-d tensors)
                assert got[key] == pytest.approx(float(v), rel=1e-6, abs=1e-30), key
            else:
                _close(got[key], v.numpy(), dtype, f"{key} of param {i}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_backend_matches_torch(name):
    """The default (compiled) backend too, on the option-richest configuration."""
    config = CONFIGS[name][-1]
    opt, ref, ours, theirs = _run(name, config, np.float32, "auto")
    for i, (p, tp) in enumerate(zip(ours, theirs)):
        _close(p, tp.detach().numpy(), np.float32, f"param {i}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_signature_and_defaults_match_torch(name):
    import inspect
    ours = inspect.signature(fastopt.CLASSES[name]).parameters
    theirs = inspect.signature(getattr(torch.optim, name)).parameters
    for key, p in theirs.items():
        if key in ("params", "foreach", "capturable", "differentiable"):
            continue
        assert key in ours, key
        want = p.default
        got = ours[key].default
        if isinstance(want, tuple):
            assert tuple(got) == want, key
        else:
            assert got == want, key


def test_adadelta_refuses_8bit_state_only():
    p = np.zeros(5000, np.float32)
    with pytest.raises(ValueError, match="state_bits=8 is not possible"):
        fastopt.Adadelta([p], state_bits=8)
    opt = fastopt.Adadelta([p], state_bits=16)
    opt.step([np.ones(5000, np.float32)])
    assert np.all(p < 0)


def test_asgd_lr_change_and_state_dict_match_torch():
    """ASGD's eta is computed after each step with the group's lr of that step (a
    changed lr acts from the step after next), and it travels in the state dict."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        rng = np.random.default_rng(3)
        ours = [rng.standard_normal(100)]
        theirs = [torch.tensor(ours[0].copy(), requires_grad=True)]
        config = dict(lr=0.05, lambd=0.1, t0=3.0)
        opt = fastopt.ASGD(ours, **config)
        ref = torch.optim.ASGD(theirs, **config)
        for t in range(20):
            if t == 7:
                opt.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.2
            if t == 12:     # through a state dict, into a new optimizer
                sd = opt.state_dict()
                opt = fastopt.ASGD(ours, **config)
                opt.load_state_dict(sd)
            g = rng.standard_normal(100)
            opt.step([g])
            theirs[0].grad = torch.from_numpy(g.copy())
            ref.step()
        _close(ours[0], theirs[0].detach().numpy(), np.float64, "param")
        st = opt.state_dict()["state"][0]
        _close(st["ax"], ref.state[theirs[0]]["ax"].numpy(), np.float64, "ax")
        assert st["eta"] == pytest.approx(float(ref.state[theirs[0]]["eta"]), rel=1e-12)
        assert st["mu"] == pytest.approx(float(ref.state[theirs[0]]["mu"]), rel=1e-12)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("key,bad", [("eta", -0.1), ("eta", float("nan")), ("mu", 0.0),
                                     ("mu", 1.5)])
def test_asgd_refuses_impossible_host_state(key, bad):
    p = np.zeros(10)
    opt = fastopt.ASGD([p], lr=2.0)
    opt.step([np.ones(10)])
    sd = opt.state_dict()
    assert sd["state"][0]["eta"] > 1.0          # eta may exceed 1 (lr > 1)
    fastopt.ASGD([p.copy()], lr=2.0).load_state_dict(sd)
    sd["state"][0][key] = bad
    with pytest.raises(ValueError, match=f"state '{key}' of parameter 0 must be"):
        fastopt.ASGD([p.copy()], lr=2.0).load_state_dict(sd)


def test_asgd_refuses_low_precision_state():
    for bits in (8, 16):
        with pytest.raises(ValueError, match=f"state_bits={bits} is not possible"):
            fastopt.ASGD([np.zeros(5000, np.float32)], state_bits=bits)


def test_asgd_functional_starts_eta_at_the_given_lr():
    """fastopt.functional.asgd_ without eta and mu starts them as a new parameter's
    state would (eta = the lr given), and returns the new ones."""
    p, q = np.zeros(10), np.zeros(10)
    ax = np.zeros(10)
    opt = fastopt.ASGD([q], lr=0.1, t0=0.0)
    host = {}
    for t in range(1, 6):
        g = np.full(10, float(t))
        host = fastopt.functional.asgd_(p, g, ax, step=t, lr=0.1, t0=0.0, **host)
        opt.step([g])
    np.testing.assert_array_equal(p, q)
    np.testing.assert_array_equal(ax, opt.state_dict()["state"][0]["ax"])
    assert host == {k: opt.state_dict()["state"][0][k] for k in ("eta", "mu")}


@pytest.mark.parametrize("name,k", CASES)
def test_torch_drop_in_matches_torch_and_swaps_state_dicts(name, k):
    """fastopt.torch.<Name> (generated from the registry) on torch tensors: the same
    trajectory as torch.optim.<Name> (float64, 25 steps, two parameters), and each
    state_dict loads into the other class and continues identically."""
    import fastopt.torch as ft
    config = CONFIGS[name][k]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gen = torch.Generator().manual_seed(k)
        init = [torch.randn(shape, generator=gen) for shape in SHAPES]
        ours = [torch.nn.Parameter(t.clone()) for t in init]
        theirs = [torch.nn.Parameter(t.clone()) for t in init]
        o = getattr(ft, name)(ours, **config)
        t = getattr(torch.optim, name)(theirs, **config)

        def steps(n):
            for _ in range(n):
                for a, b in zip(ours, theirs):
                    g = torch.randn(a.shape, generator=gen)
                    a.grad, b.grad = g.clone(), g.clone()
                o.step()
                t.step()

        steps(15)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        o2 = getattr(torch.optim, name)(ours, **config)
        o2.load_state_dict(o.state_dict())              # ours -> torch
        t2 = getattr(ft, name)(theirs, **config)
        t2.load_state_dict(t.state_dict())              # torch -> ours
        o, t = o2, t2
        steps(10)
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(old)
