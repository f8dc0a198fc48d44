"""Every feature of the core engine through fastopt.torch, bit for bit against the core
optimizer on the same data: bfloat16 parameters (each bf16_update, seed), 16/8-bit
state, grad_scale and skip_nonfinite; their state_dict round trips; refusals that
change nothing; GradScaler driving a low-precision optimizer."""

import copy
import inspect
import io

import numpy as np
import pytest

import fastopt
from fastopt import storage

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")
pytest.importorskip("ml_dtypes")


def to_array(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(storage.bf16())
    return t.numpy().copy()


def bits(a):
    a = np.asarray(a)
    return a.view(np.int16) if a.dtype.itemsize == 2 else a.view(np.uint8)


def model(dtype, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(7, 40), torch.nn.Linear(40, 300))
    return [torch.nn.Parameter(p.detach().to(dtype).clone()) for p in m.parameters()]


def grads_for(ps, t, big=False):
    g = torch.Generator().manual_seed(100 + t)
    return [(torch.randn(p.shape, generator=g) * (1e3 if big else 1.0)).to(p.dtype)
            for p in ps]


def run_both(cls_name, dtype, steps=6, step_kw=lambda t: {}, **kw):
    ps = model(dtype)
    arrays = [to_array(p) for p in ps]
    opt = getattr(ft, cls_name)(ps, lr=1e-2, **kw)
    core = fastopt.CLASSES[cls_name](arrays, lr=1e-2, **kw)
    applied = []
    for t in range(steps):
        gs = grads_for(ps, t)
        for p, g in zip(ps, gs):
            p.grad = g
        opt.step(**step_kw(t))
        applied.append((opt.last_step_applied, core.step([to_array(g) for g in gs],
                                                          **step_kw(t))))
    return ps, opt, arrays, core, applied


def assert_same(ps, opt, arrays, core):
    for p, a in zip(ps, arrays):
        np.testing.assert_array_equal(bits(to_array(p)), bits(a))
    ours = opt.state_dict()["state"]
    for i, st in core.state_dict()["state"].items():
        if not opt.stepful:                     # torch's SGD and Lion keep no step
            st = {k: v for k, v in st.items() if k != "step"}
        assert set(ours[i]) == set(st), (set(ours[i]), set(st))
        for k, v in st.items():
            if k == "step":
                assert ours[i][k].item() == v
            elif isinstance(v, float):
                assert ours[i][k].item() == pytest.approx(v, rel=1e-6)
            else:
                np.testing.assert_array_equal(bits(to_array(ours[i][k])), bits(v))


@pytest.mark.parametrize("update", storage.BF16_UPDATES)
@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_bfloat16_parameters_match_the_core_bit_for_bit(update, name):
    kw = dict(momentum=0.9) if name == "SGD" else {}
    out = run_both(name, torch.bfloat16, bf16_update=update, seed=7, **kw)
    assert_same(*out[:4])
    assert out[0][0].dtype == torch.bfloat16


def test_bfloat16_linear_with_stochastic_rounding_trains():
    torch.manual_seed(0)
    m = torch.nn.Linear(16, 4).to(torch.bfloat16)
    opt = ft.AdamW(m.parameters(), lr=1e-2, bf16_update="stochastic", seed=1)
    x = torch.randn(64, 16).to(torch.bfloat16)
    y = torch.randn(64, 4).to(torch.bfloat16)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


@pytest.mark.parametrize("state_bits", [16, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_low_bit_state_matches_the_core_bit_for_bit(state_bits, dtype):
    out = run_both("Adam", dtype, state_bits=state_bits)
    assert_same(*out[:4])


@pytest.mark.parametrize("state_bits", [16, 8])
def test_low_bit_state_dict_round_trip_continues_the_trajectory(state_bits):
    full = run_both("AdamW", torch.float32, steps=8, state_bits=state_bits)
    ps = model(torch.float32)
    a = ft.AdamW(ps, lr=1e-2, state_bits=state_bits)
    for t in range(4):
        for p, g in zip(ps, grads_for(ps, t)):
            p.grad = g
        a.step()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = ft.AdamW(ps, lr=1e-2, state_bits=state_bits)
    b.load_state_dict(torch.load(buf, weights_only=True))
    for t in range(4, 8):
        for p, g in zip(ps, grads_for(ps, t)):
            p.grad = g
        b.step()
    for p, q in zip(ps, full[0]):
        assert torch.equal(p, q)
    # the format: torch tensors under the core's state names
    sd = b.state_dict()
    assert sd["param_groups"][0]["state_bits"] == state_bits
    assert all(torch.is_tensor(v) for st in sd["state"].values() for v in st.values())


def test_grad_scale_matches_the_core_bit_for_bit():
    out = run_both("Adam", torch.float32, step_kw=lambda t: dict(grad_scale=2.0 ** (t % 3)))
    assert_same(*out[:4])
    out = run_both("AdamW", torch.bfloat16, state_bits=8, bf16_update="kahan",
                   step_kw=lambda t: dict(grad_scale=4.0))
    assert_same(*out[:4])


def test_skip_nonfinite_skips_like_the_core():
    def kw(t):
        return dict(skip_nonfinite=True)

    ps = model(torch.float32)
    arrays = [to_array(p) for p in ps]
    opt, core = ft.Adam(ps, lr=1e-2), fastopt.Adam(arrays, lr=1e-2)
    for t in range(6):
        gs = grads_for(ps, t)
        if t in (2, 4):
            gs[1][3] = float("nan") if t == 2 else float("inf")
        for p, g in zip(ps, gs):
            p.grad = g
        before = [p.detach().clone() for p in ps]
        loss = opt.step(lambda: torch.tensor(1.5), skip_nonfinite=True)
        assert loss.item() == 1.5                       # the closure's loss, as torch
        applied = core.step([to_array(g) for g in gs], skip_nonfinite=True)
        assert opt.last_step_applied is applied is (t not in (2, 4))
        if not applied:
            assert all(torch.equal(a, b) for a, b in zip(ps, before))
    assert_same(ps, opt, arrays, core)
    assert opt.state[ps[0]]["step"].item() == 4


def test_grad_scaler_with_low_precision_state_skips_inf_steps():
    """GradScaler's unscale path over a state_bits=8 optimizer: an inf step is
    skipped (no state change), the others equal the core's steps on the unscaled
    gradients."""
    ps = model(torch.float32)
    arrays = [to_array(p) for p in ps]
    opt = ft.AdamW(ps, lr=1e-2, state_bits=8)
    core = fastopt.AdamW(arrays, lr=1e-2, state_bits=8)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0, growth_interval=2)
    x = torch.randn(5, 7)
    for t in range(6):
        opt.zero_grad()
        out = torch.nn.functional.linear(torch.nn.functional.linear(x, ps[0], ps[1]),
                                         ps[2], ps[3])
        loss = out.pow(2).mean() * (float("inf") if t == 3 else 1.0)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        unscaled = [to_array(p.grad) for p in ps]
        scaler.step(opt)
        scaler.update()
        if t != 3:
            core.step(unscaled)
    assert_same(ps, opt, arrays, core)
    assert opt.state[ps[0]]["step"].item() == 5


# ------------------------------------------------------------------ refusals

def snapshot(ps, opt):
    return ([p.detach().clone() for p in ps],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in ps})


def unchanged(ps, opt, snap):
    params, state = snap
    return all(torch.equal(p, q) for p, q in zip(ps, params)) and all(
        torch.equal(opt.state[p][k], v) for p in ps for k, v in state[id(p)].items())


def test_refusals_change_nothing():
    ps = model(torch.float32)
    opt = ft.AdamW(ps, lr=1e-2, state_bits=8)
    for p, g in zip(ps, grads_for(ps, 0)):
        p.grad = g
    opt.step()
    snap = snapshot(ps, opt)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step(grad_scale=-1.0)
    with pytest.raises(TypeError, match="skip_nonfinite"):
        opt.step(skip_nonfinite="yes")
    opt.param_groups[0]["state_bits"] = 16
    with pytest.raises(ValueError, match="state_bits"):
        opt.step()
    opt.param_groups[0]["state_bits"] = 8
    qs = model(torch.float32)
    theirs = torch.optim.AdamW(qs)
    for q, g in zip(qs, grads_for(qs, 0)):
        q.grad = g
    theirs.step()
    with pytest.raises(ValueError, match="dtype"):      # float32 moments: no 8-bit codes
        opt.load_state_dict(theirs.state_dict())
    assert unchanged(ps, opt, snap)
    opt.step()
    assert not unchanged(ps, opt, snap)


def test_option_errors():
    with pytest.raises(ValueError, match="bf16_update"):
        ft.AdamW(model(torch.float32), bf16_update="stochastic")   # no bfloat16 parameter
    with pytest.raises(ValueError, match="state_bits"):
        ft.AdamW(model(torch.float32), state_bits=4)
    with pytest.raises(TypeError, match="float16"):
        ft.AdamW(model(torch.float16))


def test_signatures_have_torch_arguments_then_fastopt_options():
    for name, cls in ft.CLASSES.items():
        sig = inspect.signature(cls.__init__).parameters
        for k, v in [("backend", "auto"), ("sparse_mode", "lazy"), ("state_bits", None),
                     ("bf16_update", None), ("seed", 0)]:
            assert sig[k].default == v and sig[k].kind == inspect.Parameter.KEYWORD_ONLY
        for k, v in fastopt.rules.RULES[name].defaults.items():
            assert k in sig, (name, k)
        assert "torch.optim" in cls.__doc__ or name in ("Lion", "RowWiseAdagrad")


def test_deepcopy_keeps_low_precision_state():
    out = run_both("AdamW", torch.bfloat16, steps=3, state_bits=8, bf16_update="stochastic",
                   seed=5)
    ps, opt = out[0], out[1]
    twin = copy.deepcopy(opt)
    qs = [p for g in twin.param_groups for p in g["params"]]
    for o, params in ((opt, ps), (twin, qs)):
        for p, g in zip(params, grads_for(ps, 9)):
            p.grad = g.clone()
        o.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p.view(torch.int16), q.view(torch.int16))


def test_step_hooks_global_hooks_and_profiler_label():
    from torch.optim.optimizer import register_optimizer_step_post_hook
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([p], lr=0.1)
    seen = []
    h = register_optimizer_step_post_hook(lambda o, a, k: seen.append(k))
    p.grad = torch.ones(3)
    opt.step(grad_scale=2.0)
    h.remove()
    p.grad = torch.ones(3)
    opt.step()
    assert seen == [{"grad_scale": 2.0, "skip_nonfinite": False}]
    with torch.profiler.profile() as prof:
        p.grad = torch.ones(3)
        opt.step()
    assert any(e.name == "Optimizer.step#Adam.step" for e in prof.events())
    assert opt.state[p]["step"].item() == 3


def test_exact_mode_state_edit_keeps_pending_rows():
    """A user's replacement of a state tensor in exact sparse mode (a copy of the
    lagging state): its rows stay pending, caught up later as if nothing happened."""
    def run(edit):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(20, 3, sparse=True)
        opt = ft.SGD(emb.parameters(), lr=0.1, momentum=0.9, sparse_mode="exact")
        g = torch.Generator().manual_seed(1)
        for t in range(8):
            opt.zero_grad()
            emb(torch.randint(0, 20, (4,), generator=g)).sum().backward()
            if edit and t == 4:
                st = opt.state[emb.weight]
                st["momentum_buffer"] = st["momentum_buffer"].clone()
            opt.step()
        opt.flush()
        return emb.weight.detach().clone()
    assert torch.equal(run(True), run(False))
