"""fastopt.torch: drop-in torch.optim optimizers (skipped when torch is not installed).

The oracle is torch.optim itself: every class against its torch counterpart over
many steps (float64 to 1e-10 relative, float32 within float32 rounding), sparse
embeddings against SparseAdam and torch's sparse Adagrad, closures, hooks, LR
schedulers, param group edits, state_dict round trips both ways, and refusals that
change nothing.  Lion and RowWiseAdagrad (no torch class) are checked bit for bit
against fastopt's own optimizer on NumPy copies of the same data.
"""

import copy
import io
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import fastopt
from fastopt import rules

from conftest import awkward_grads, init_params

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")

TORCH_NAMES = [n for n in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam")]
SHAPES = [(8, 9), (9,), (50,), (3, 4, 5)]
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-13), torch.float32: dict(rtol=2e-5, atol=2e-6)}


@pytest.fixture
def float64_default():
    """torch keeps NAdam's mu_product (and every step) in the default scalar dtype;
    with float64 both sides compute it in float64."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def tensors(shapes, dtype, seed=1):
    return [torch.nn.Parameter(torch.from_numpy(a)) for a in
            init_params(shapes, {torch.float32: np.float32, torch.float64: np.float64}[dtype],
                        seed)]


def clone_params(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = None if g is None else torch.from_numpy(np.array(g))


def variant_cases():
    return [pytest.param(n, k, id=f"{n}-v{k}") for n in TORCH_NAMES
            for k in range(len(rules.RULES[n].variants))]


def assert_close(a_list, b_list, dtype):
    for a, b in zip(a_list, b_list):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), **TOL[dtype])


# -------------------------------------------------------------------- isolation

def test_import_fastopt_does_not_import_torch():
    code = ("import sys, fastopt; assert 'torch' not in sys.modules, 'torch imported'; "
            "import fastopt.torch; assert 'torch' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_classes_are_torch_optimizers_with_torch_defaults():
    import inspect
    for name in TORCH_NAMES:
        ours = inspect.signature(getattr(ft, name).__init__).parameters
        theirs = inspect.signature(getattr(torch.optim, name).__init__).parameters
        assert issubclass(getattr(ft, name), torch.optim.Optimizer)
        for k, p in theirs.items():          # every torch argument, same default and kind
            assert k in ours, (name, k)
            assert ours[k].default == p.default, (name, k, ours[k].default, p.default)
            assert ours[k].kind == p.kind, (name, k)
        # positional order is torch's
        pos = [k for k, p in theirs.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
        assert [k for k in ours if k in pos] == pos
    assert ft.Lion.__init__.__defaults__[:2] == (1e-4, (0.9, 0.99))
    assert set(ft.CLASSES) == set(rules.RULES)


# ------------------------------------------------------------- trajectories

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,k", variant_cases())
def test_trajectory_matches_torch(name, k, dtype, float64_default):
    if dtype == torch.float32:
        torch.set_default_dtype(torch.float32)
    variant = rules.RULES[name].variants[k]
    p0 = tensors(SHAPES, dtype)
    ours, theirs = clone_params(p0), clone_params(p0)
    opt = getattr(ft, name)(ours, **variant)
    ref = getattr(torch.optim, name)(theirs, **variant)
    npd = np.float64 if dtype == torch.float64 else np.float32
    for gs in awkward_grads(SHAPES, npd, 60, seed=3):
        set_grads(ours, gs)
        set_grads(theirs, gs)
        opt.step()
        ref.step()
    assert_close(ours, theirs, dtype)
    moved = max((a - b).abs().max().item() for a, b in zip(ours, p0))
    assert moved > 1e-3                     # the comparison is not vacuous
    s1, s2 = opt.state_dict()["state"], ref.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for i in s1:
        assert s1[i].keys() == s2[i].keys(), (s1[i].keys(), s2[i].keys())
        for key in s1[i]:
            a, b = s1[i][key], s2[i][key]
            assert a.dtype == b.dtype and a.shape == b.shape, (key, a.dtype, b.dtype)
            np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4 if key != "step" else 0,
                                       atol=1e-6 if dtype == torch.float32 else 1e-12)


@pytest.mark.parametrize("name", ["Lion", "RowWiseAdagrad"])
@pytest.mark.parametrize("k", [0, 1])
def test_own_rules_match_fastopt_core_bit_for_bit(name, k):
    variant = rules.RULES[name].variants[k]
    p0 = tensors(SHAPES, torch.float32)
    ours = clone_params(p0)
    arrays = [p.detach().numpy().copy() for p in p0]
    opt = getattr(ft, name)(ours, **variant)
    core = fastopt.CLASSES[name](arrays, **variant)
    for gs in awkward_grads(SHAPES, np.float32, 30, seed=5):
        set_grads(ours, gs)
        opt.step()
        core.step(gs)
    for a, p in zip(arrays, ours):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    sd = opt.state_dict()["state"]
    for i, st in core.state_dict()["state"].items():
        for key, v in st.items():
            if key == "step":
                assert ("step" in sd[i]) == (name == "RowWiseAdagrad")
                if "step" in sd[i]:
                    assert sd[i]["step"].item() == v
            else:
                np.testing.assert_array_equal(sd[i][key].numpy(), v)


@pytest.mark.parametrize("backend", [b for b in fastopt.available_backends() if b != "cuda"])
def test_every_cpu_backend_matches_torch(backend, float64_default):
    p0 = tensors(SHAPES, torch.float64)
    ours, theirs = clone_params(p0), clone_params(p0)
    opt = ft.Adam(ours, lr=1e-2, amsgrad=True, weight_decay=0.1, backend=backend)
    ref = torch.optim.Adam(theirs, lr=1e-2, amsgrad=True, weight_decay=0.1)
    for gs in awkward_grads(SHAPES, np.float64, 20, seed=2):
        set_grads(ours, gs)
        set_grads(theirs, gs)
        opt.step()
        ref.step()
    assert_close(ours, theirs, torch.float64)


def test_fast_path_equals_full_path():
    """The cached plan (fast path) and a re-plan every step give identical bits."""
    p0 = tensors(SHAPES, torch.float32)
    a, b = clone_params(p0), clone_params(p0)
    oa, ob = ft.AdamW(a, lr=1e-2), ft.AdamW(b, lr=1e-2)
    reused = 0
    for gs in awkward_grads(SHAPES, np.float32, 12, seed=9):
        set_grads(a, gs)
        set_grads(b, gs)
        reused += oa.engine._plan is not None
        oa.step()
        ob.engine.invalidate()
        ob.step()
    assert reused >= 10
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_model_training_matches_torch(float64_default):
    """A real model (backward, zero_grad) with Adam: same trajectory as torch."""
    torch.manual_seed(0)
    m1 = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    m2 = copy.deepcopy(m1)
    o1, o2 = ft.Adam(m1.parameters(), lr=3e-3), torch.optim.Adam(m2.parameters(), lr=3e-3)
    x, y = torch.randn(64, 6), torch.randn(64, 2)
    for _ in range(50):
        for m, o in ((m1, o1), (m2, o2)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    assert_close(list(m1.parameters()), list(m2.parameters()), torch.float64)


# -------------------------------------------------------------------- sparse

def _embedding_pair(n=40, d=5, dtype=torch.float64, bag=False):
    torch.manual_seed(0)
    cls = torch.nn.EmbeddingBag if bag else torch.nn.Embedding
    kw = dict(mode="sum") if bag else {}
    e1 = cls(n, d, sparse=True, **kw).to(dtype)
    return e1, copy.deepcopy(e1)


def _sparse_steps(e1, e2, o1, o2, steps, n=40, coalesce=False, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, n, (16,), generator=g)
        w = torch.randn(16, e1.weight.shape[1], generator=g, dtype=dtype)
        for e, o in ((e1, o1), (e2, o2)):
            o.zero_grad()
            if isinstance(e, torch.nn.EmbeddingBag):
                out = e(ids.view(4, 4))
                (out * w[:4]).sum().backward()
            else:
                (e(ids) * w).sum().backward()
            if coalesce:
                e.weight.grad = e.weight.grad.coalesce()
            o.step()


@pytest.mark.parametrize("coalesce", [False, True], ids=["uncoalesced", "coalesced"])
def test_sparse_adam_matches_sparse_adam(coalesce):
    """Lazy Adam on nn.Embedding(sparse=True) against torch.optim.SparseAdam: the
    state agrees to rounding; the parameters to SparseAdam's different eps
    placement (it adds eps before the bias correction of the denominator)."""
    e1, e2 = _embedding_pair()
    o1, o2 = ft.Adam(e1.parameters(), lr=1e-2), torch.optim.SparseAdam(e2.parameters(), lr=1e-2)
    w0 = e1.weight.detach().clone()
    _sparse_steps(e1, e2, o1, o2, 40, coalesce=coalesce)
    np.testing.assert_allclose(e1.weight.detach().numpy(), e2.weight.detach().numpy(),
                               rtol=0, atol=5e-6)
    assert (e1.weight - w0).abs().max() > 0.1
    s1, s2 = o1.state_dict()["state"][0], o2.state_dict()["state"][0]
    assert s1.keys() == s2.keys()
    for key in s1:                        # (SparseAdam keeps step as an int)
        np.testing.assert_allclose(torch.as_tensor(s1[key]).numpy(),
                                   torch.as_tensor(s2[key]).numpy(), rtol=1e-12, atol=1e-15)
    o3 = ft.Adam(e2.parameters(), lr=1e-2)          # SparseAdam's state dict loads here
    o3.load_state_dict(copy.deepcopy(o2.state_dict()))
    assert o3.state[e2.weight]["step"].item() == 40
    _sparse_steps(e2, e1, o3, o1, 3, seed=1)       # both continue alike
    for key in ("exp_avg", "exp_avg_sq"):           # (Adam's moments ignore the params)
        np.testing.assert_allclose(o3.state[e2.weight][key].numpy(),
                                   o1.state[e1.weight][key].numpy(), rtol=1e-12, atol=1e-15)
    assert o3.state[e2.weight]["step"].item() == 43


def test_sparse_adam_equals_eps_free_sparse_adam():
    """With eps -> 0 the two eps placements coincide: then they agree to rounding."""
    e1, e2 = _embedding_pair()
    o1 = ft.Adam(e1.parameters(), lr=1e-2, eps=1e-300)
    o2 = torch.optim.SparseAdam(e2.parameters(), lr=1e-2, eps=1e-300)
    _sparse_steps(e1, e2, o1, o2, 30)
    np.testing.assert_allclose(e1.weight.detach().numpy(), e2.weight.detach().numpy(),
                               rtol=1e-10, atol=1e-13)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")   # torch's Adagrad's own
@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
def test_sparse_adagrad_matches_torch_adagrad(bag):
    e1, e2 = _embedding_pair(bag=bag)
    o1 = ft.Adagrad(e1.parameters(), lr=0.1, initial_accumulator_value=0.1)
    o2 = torch.optim.Adagrad(e2.parameters(), lr=0.1, initial_accumulator_value=0.1)
    _sparse_steps(e1, e2, o1, o2, 40)
    np.testing.assert_allclose(e1.weight.detach().numpy(), e2.weight.detach().numpy(),
                               rtol=1e-10, atol=1e-13)
    s1, s2 = o1.state_dict()["state"][0], o2.state_dict()["state"][0]
    assert s1["step"].item() == s2["step"].item() == 40
    np.testing.assert_allclose(s1["sum"].numpy(), s2["sum"].numpy(), rtol=1e-12)


def test_sparse_and_dense_in_one_model_match_fastopt_core():
    """A recommender-like model (sparse embedding + dense layer), float32, fast path
    included: bit for bit what fastopt.Adam does with RowSparse gradients."""
    torch.manual_seed(1)
    emb = torch.nn.Embedding(30, 4, sparse=True)
    lin = torch.nn.Linear(4, 1)
    params = [emb.weight, lin.weight, lin.bias]
    arrays = [p.detach().numpy().copy() for p in params]
    opt = ft.Adam(params, lr=1e-2)
    core = fastopt.Adam(arrays, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(25):
        ids = torch.randint(0, 30, (12,), generator=g)
        opt.zero_grad()
        lin(emb(ids)).pow(2).sum().backward()
        sp = emb.weight.grad
        grads = [fastopt.RowSparse(sp._indices()[0].numpy().copy(), sp._values().numpy().copy()),
                 lin.weight.grad.numpy().copy(), lin.bias.grad.numpy().copy()]
        opt.step()
        core.step(grads)
    for a, p in zip(arrays, params):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    assert opt.engine._plan is not None           # the cached plan was in use


def test_exact_sparse_mode_equals_dense_torch_sgd():
    """sparse_mode='exact': SGD with momentum and weight decay on sparse gradients
    gives torch's dense trajectory (zero gradient on untouched rows) once flushed."""
    e1, e2 = _embedding_pair()
    dense = torch.nn.Parameter(e2.weight.detach().clone())
    o1 = ft.SGD(e1.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, sparse_mode="exact")
    o2 = torch.optim.SGD([dense], lr=0.05, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        ids = torch.randint(0, 40, (6,), generator=g)
        w = torch.randn(6, 5, generator=g, dtype=torch.float64)
        o1.zero_grad()
        (e1(ids) * w).sum().backward()
        o1.step()
        dense.grad = e1.weight.grad.to_dense()
        o2.step()
    sd = o1.state_dict()                     # flushes
    np.testing.assert_allclose(e1.weight.detach().numpy(), dense.detach().numpy(),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(sd["state"][0]["momentum_buffer"].numpy(),
                               o2.state_dict()["state"][0]["momentum_buffer"].numpy(),
                               rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="exact"):
        ft.Adam(e1.parameters(), sparse_mode="exact")


def test_out_of_range_sparse_index_changes_nothing():
    p = torch.nn.Parameter(torch.randn(10, 3))
    q = torch.nn.Parameter(torch.randn(4))
    opt = ft.Adam([p, q])
    p.grad = torch.sparse_coo_tensor(torch.tensor([[1, 12]]), torch.ones(2, 3), (10, 3),
                                     check_invariants=False)
    q.grad = torch.ones(4)
    before = [p.detach().clone(), q.detach().clone()]
    with pytest.raises(IndexError, match="12"):
        opt.step()
    assert torch.equal(p, before[0]) and torch.equal(q, before[1])
    assert len(opt.state) == 0
    p.grad = torch.sparse_coo_tensor(torch.tensor([[0, 1], [0, 1]]), torch.ones(2), (10, 3))
    with pytest.raises(ValueError, match="sparse_dim=2"):
        opt.step()
    assert torch.equal(p, before[0]) and len(opt.state) == 0


# ------------------------------------------------------- None grads, closures

def test_none_grads_skip_and_leave_state_untouched(float64_default):
    p0 = tensors([(5,), (4, 3), (6,)], torch.float64)
    ours, theirs = clone_params(p0), clone_params(p0)
    ours[2].requires_grad_(False)
    theirs[2].requires_grad_(False)
    opt, ref = ft.Adam(ours, lr=0.1), torch.optim.Adam(theirs, lr=0.1)
    rng = np.random.default_rng(0)
    for t in range(12):
        gs = [rng.standard_normal(5), rng.standard_normal((4, 3)) if t % 3 else None, None]
        set_grads(ours, gs)
        set_grads(theirs, gs)
        opt.step()
        ref.step()
    assert_close(ours, theirs, torch.float64)
    assert torch.equal(ours[2], p0[2])
    assert ours[2] not in opt.state                  # never stepped: no state, as torch
    assert opt.state[ours[1]]["step"].item() == ref.state[theirs[1]]["step"].item() == 8
    assert opt.state[ours[0]]["step"].item() == 12


def test_closure_runs_with_grad_enabled_and_returns_loss():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = ft.SGD([p], lr=0.1)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert calls == [True] and loss.item() == 5.0
    assert torch.allclose(p.detach(), torch.tensor([0.8, -1.6]))
    assert opt.step() is None


def test_lbfgs_style_closure_with_torch_equivalent():
    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randn(20)
    w1 = torch.nn.Parameter(torch.zeros(3))
    w2 = torch.nn.Parameter(torch.zeros(3))
    o1, o2 = ft.RMSprop([w1], lr=0.05), torch.optim.RMSprop([w2], lr=0.05)
    for _ in range(10):
        for w, o in ((w1, o1), (w2, o2)):
            def closure(w=w, o=o):
                o.zero_grad()
                loss = ((x @ w - y) ** 2).mean()
                loss.backward()
                return loss
            l_ = o.step(closure)
        assert torch.is_tensor(l_)
    assert torch.allclose(w1, w2, rtol=1e-5, atol=1e-6)


def test_in_place_update_bumps_the_autograd_version():
    """An update between forward and backward is caught by autograd, as with torch."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = ft.SGD([p], lr=0.1)
    loss = (p * p).sum()
    p.grad = torch.ones(3)
    v = p._version
    opt.step()
    assert p._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_grad_scaler_drives_it_like_torch(float64_default):
    """torch.amp.GradScaler unscales the gradients, skips steps with Inf/NaN and
    calls step(): the same trajectory as with torch's Adam."""
    p0 = tensors([(5, 3)], torch.float64)
    runs = []
    for cls in (ft.Adam, torch.optim.Adam):
        ps = clone_params(p0)
        opt = cls(ps, lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        for t in range(10):
            opt.zero_grad()
            loss = (ps[0] ** 2).sum() * (float("inf") if t == 4 else 1.0)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs.append((ps, opt, scaler.get_scale()))
    (a, oa, sa), (b, ob, sb) = runs
    assert sa == sb
    assert oa.state[a[0]]["step"].item() == ob.state[b[0]]["step"].item() == 9
    assert_close(a, b, torch.float64)


# ------------------------------------------------------------------- hooks

def test_step_and_state_dict_hooks():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([p], lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, a, k: seen.append(("post", o.state[p]["step"].item())))

    def scale_grads(o, args, kwargs):          # a pre-hook may edit the gradients
        p.grad.mul_(0.0)

    h = opt.register_step_pre_hook(scale_grads)
    p.grad = torch.ones(3)
    opt.step()
    assert seen == [("pre", True), ("post", 1.0)]
    assert torch.equal(p.detach(), torch.ones(3))          # zero gradient: no move
    h.remove()
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    sd = opt.state_dict()
    assert sd["extra"] == 1 and "sd-pre" in seen
    opt.load_state_dict(copy.deepcopy(sd))
    assert seen[-2:] == ["load-pre", "load-post"]


def test_zero_grad_set_to_none_false_reuses_grad_buffers(float64_default):
    p0 = tensors([(4, 4), (4,)], torch.float64)
    ours, theirs = clone_params(p0), clone_params(p0)
    opt, ref = ft.NAdam(ours, lr=0.01), torch.optim.NAdam(theirs, lr=0.01)
    for t in range(8):
        for ps, o in ((ours, opt), (theirs, ref)):
            o.zero_grad(set_to_none=False)
            loss = sum((p * (t + 1.0)).sin().sum() for p in ps)
            loss.backward()
            o.step()
    assert_close(ours, theirs, torch.float64)


# -------------------------------------------------------------- schedulers

def _schedule_run(cls_ours, cls_torch, kwargs, make_sched, steps=40):
    torch.manual_seed(0)
    p0 = tensors(SHAPES[:2], torch.float64)
    runs = []
    for cls, ps in ((cls_ours, clone_params(p0)), (cls_torch, clone_params(p0))):
        opt = cls(ps, **kwargs)
        sched = make_sched(opt)
        lrs = []
        for gs in awkward_grads(SHAPES[:2], np.float64, steps, seed=4):
            set_grads(ps, gs)
            opt.step()
            sched.step()
            lrs.append((opt.param_groups[0]["lr"], opt.param_groups[0].get("betas"),
                        opt.param_groups[0].get("momentum")))
        runs.append((ps, lrs, opt))
    return runs


S = torch.optim.lr_scheduler
SCHEDULES = {
    "StepLR": lambda o: S.StepLR(o, step_size=7, gamma=0.5),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=15, eta_min=1e-4),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=0.05, total_steps=40),
    "LambdaLR": lambda o: S.LambdaLR(o, lambda t: 1.0 / (1 + t)),
}


@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("name,kwargs", [("Adam", dict(lr=0.01)),
                                         ("SGD", dict(lr=0.01, momentum=0.9)),
                                         ("RMSprop", dict(lr=0.01, momentum=0.5))])
def test_lr_schedulers_drive_it_like_torch(sched, name, kwargs, float64_default):
    (ours, lrs1, o1), (theirs, lrs2, o2) = _schedule_run(
        getattr(ft, name), getattr(torch.optim, name), kwargs, SCHEDULES[sched])
    assert lrs1 == lrs2
    assert len({x[0] for x in lrs1}) > 3                # the schedule did change lr
    if sched == "OneCycleLR":                           # and cycled betas/momentum
        assert len({x[1] if name == "Adam" else x[2] for x in lrs1}) > 3
        assert "initial_lr" in o1.param_groups[0] and "max_momentum" in o1.param_groups[0]
    assert_close(ours, theirs, torch.float64)


def test_reduce_lr_on_plateau():
    p = torch.nn.Parameter(torch.ones(2))
    opt = ft.Adam([p], lr=0.1)
    sched = S.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    for _ in range(4):
        p.grad = torch.ones(2)
        opt.step()
        sched.step(1.0)
    assert opt.param_groups[0]["lr"] < 0.1


# --------------------------------------------------------------- param groups

def test_group_edits_and_add_param_group_match_torch(float64_default):
    p0 = tensors([(6,), (3, 3), (5,), (2, 2)], torch.float64)
    ours, theirs = clone_params(p0), clone_params(p0)
    opt = ft.SGD([{"params": ours[:2]}, {"params": ours[2:3], "lr": 0.05, "momentum": 0.5}],
                 lr=0.01, momentum=0.9)
    ref = torch.optim.SGD([{"params": theirs[:2]},
                           {"params": theirs[2:3], "lr": 0.05, "momentum": 0.5}],
                          lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    for t in range(30):
        if t == 10:
            for o in (opt, ref):
                o.param_groups[0]["lr"] = 0.02
                o.param_groups[1]["weight_decay"] = 0.1      # changes the kernel config
        if t == 15:
            opt.add_param_group({"params": [ours[3]], "lr": 0.03, "nesterov": True})
            ref.add_param_group({"params": [theirs[3]], "lr": 0.03, "nesterov": True})
        gs = [rng.standard_normal(p.shape) for p in p0]
        set_grads(ours, gs)
        set_grads(theirs, gs)
        opt.step()
        ref.step()
    assert_close(ours, theirs, torch.float64)
    assert opt.param_groups[2]["momentum"] == 0.9 and opt.param_groups[2]["nesterov"] is True


def test_named_parameters_are_accepted():
    m = torch.nn.Linear(3, 2)
    opt = ft.AdamW(m.named_parameters())
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    m.weight.grad = torch.ones_like(m.weight)
    m.bias.grad = torch.ones_like(m.bias)
    opt.step()
    assert opt.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_replaced_param_data_and_state_are_honoured():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = ft.SGD([p], lr=1.0, momentum=0.5)
    for _ in range(3):
        p.grad = torch.ones(4)
        opt.step()
    p.data = torch.full((4,), 10.0)              # new memory behind the same Parameter
    p.grad = torch.ones(4)
    opt.step()
    buf = opt.state[p]["momentum_buffer"]
    assert torch.allclose(p.detach(), 10.0 - buf)
    opt.state[p]["momentum_buffer"] = torch.zeros(4)   # replaced state tensor
    p.grad = torch.ones(4)
    before = p.detach().clone()
    opt.step()
    assert torch.allclose(p.detach(), before - 1.0)    # buf = 0.5 * 0 + 1
    opt.state.clear()                                   # reset: fresh state (buf = g)
    p.grad = torch.full((4,), 2.0)
    before = p.detach().clone()
    opt.step()
    assert torch.allclose(p.detach(), before - 2.0)


def test_non_contiguous_gradient_after_the_plan_is_cached():
    """A transposed gradient (same size and dtype as the cached plan expects) is read
    by its logical values, not its memory order."""
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = ft.SGD([p], lr=1.0)
    for _ in range(3):                       # the fast path is in use from here on
        p.grad = torch.ones(3, 3)
        opt.step()
    assert opt.engine._plan is not None
    g = torch.arange(9.0).reshape(3, 3).t()
    assert not g.is_contiguous()
    p.grad = g
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before - g)


def test_gradients_sharing_memory_with_params_or_state_are_refused():
    p = torch.nn.Parameter(torch.ones(4))
    q = torch.nn.Parameter(torch.ones(4))
    e = torch.nn.Parameter(torch.ones(6, 2))
    opt = ft.Adam([p, q, e], lr=0.1)

    def grads(gp, gq, ge):
        p.grad, q.grad, e.grad = gp, gq, ge

    sparse = torch.sparse_coo_tensor(torch.tensor([[1, 3]]), torch.ones(2, 2), (6, 2))
    for _ in range(3):                       # plan cached: the fast path checks too
        grads(torch.ones(4), torch.ones(4), sparse)
        opt.step()
    snapshot = [t.detach().clone() for t in (p, q, e)]
    cases = [
        (q.detach(), torch.ones(4), sparse, "gradient 0 shares memory with parameter 1"),
        (torch.ones(4), opt.state[q]["exp_avg"], sparse, "gradient 1 shares memory with state"),
        (torch.ones(4), torch.ones(4),
         torch.sparse_coo_tensor(torch.tensor([[0]]), e.detach()[2:3], (6, 2)),
         "gradient 2 shares memory with parameter 2"),
    ]
    for gp, gq, ge, match in cases:
        grads(gp, gq, ge)
        with pytest.raises(ValueError, match=match):
            opt.step()
        assert all(torch.equal(t, s) for t, s in zip((p, q, e), snapshot))
        opt.engine.invalidate()              # and the full path
        with pytest.raises(ValueError, match=match):
            opt.step()
        assert all(torch.equal(t, s) for t, s in zip((p, q, e), snapshot))
    grads(torch.ones(4), torch.ones(4), sparse)
    opt.step()
    assert opt.state[p]["step"].item() == 4


# ------------------------------------------------------------- state_dict

def _train(opt, ps, grads_seq):
    for gs in grads_seq:
        set_grads(ps, gs)
        opt.step()


@pytest.mark.parametrize("name", TORCH_NAMES)
def test_state_dict_to_torch_and_back_continues_the_trajectory(name, float64_default):
    variant = rules.RULES[name].variants[-1]
    seq = awkward_grads(SHAPES, np.float64, 30, seed=8)
    p0 = tensors(SHAPES, torch.float64)
    cls_ours, cls_torch = getattr(ft, name), getattr(torch.optim, name)
    # the uninterrupted run
    full = clone_params(p0)
    _train(cls_ours(full, **variant), full, seq)
    # fastopt.torch for 10 steps -> torch.optim for 10 -> fastopt.torch for 10
    ps = clone_params(p0)
    a = cls_ours(ps, **variant)
    _train(a, ps, seq[:10])
    saved = io.BytesIO()
    torch.save(a.state_dict(), saved)
    saved.seek(0)
    b = cls_torch(ps, **variant)
    b.load_state_dict(torch.load(saved, weights_only=True))
    _train(b, ps, seq[10:20])
    c = cls_ours(ps, **variant)
    c.load_state_dict(copy.deepcopy(b.state_dict()))
    _train(c, ps, seq[20:])
    assert_close(ps, full, torch.float64)
    assert c.state_dict()["state"][0]["step"].item() == 30 if name != "SGD" else True


def test_replaced_state_is_released():
    """Loading state dicts over and over does not keep the old state tensors alive."""
    import gc
    import weakref
    p = torch.nn.Parameter(torch.ones(1000))
    opt = ft.Adam([p])
    p.grad = torch.ones(1000)
    opt.step()
    old = weakref.ref(opt.state[p]["exp_avg"])
    for _ in range(3):
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        opt.step()
    gc.collect()
    assert old() is None
    assert opt.state[p]["step"].item() == 4


def test_state_dict_has_torch_layout():
    ps = tensors([(3,), (2, 2)], torch.float32)
    opt = ft.NAdam(ps)
    ref = torch.optim.NAdam(clone_params(ps))
    for o, qs in ((opt, ps), (ref, ref.param_groups[0]["params"])):
        for q in qs:
            q.grad = torch.ones_like(q)
        o.step()
    sd, rd = opt.state_dict(), ref.state_dict()
    assert sd.keys() == rd.keys()
    assert sd["param_groups"][0]["params"] == rd["param_groups"][0]["params"]
    assert set(rd["param_groups"][0]) <= set(sd["param_groups"][0])
    for i in (0, 1):
        for k, v in rd["state"][i].items():
            assert torch.is_tensor(sd["state"][i][k])
            assert sd["state"][i][k].dtype == v.dtype and sd["state"][i][k].shape == v.shape
    assert sd["state"][0]["step"].dtype == torch.float32
    assert sd["state"][0]["mu_product"].dim() == 0
    # Adagrad has state from construction, as torch's
    assert set(ft.Adagrad(clone_params(ps)).state_dict()["state"]) == {0, 1}


def test_pickle_and_deepcopy_of_the_optimizer():
    ps = tensors([(4,)], torch.float64)
    opt = ft.Adamax(ps, lr=0.1, backend="numpy")
    ps[0].grad = torch.ones(4, dtype=torch.float64)
    opt.step()
    twin = copy.deepcopy(opt)
    assert twin.backend.name == "numpy"
    q = twin.param_groups[0]["params"][0]
    assert q is not ps[0] and torch.equal(q, ps[0])
    for o, p in ((opt, ps[0]), (twin, q)):
        p.grad = torch.full((4,), 0.5, dtype=torch.float64)
        o.step()
    assert torch.equal(q, ps[0])
    assert pickle.loads(pickle.dumps(opt)).state_dict()["state"][0]["step"].item() == 2


# ----------------------------------------------------------------- refusals

@pytest.mark.parametrize("cls,kwargs,match", [
    (ft.Adam, dict(capturable=True), "capturable"),
    (ft.AdamW, dict(differentiable=True), "differentiable"),
    (ft.Adam, dict(decoupled_weight_decay=True), "AdamW"),
    (ft.SGD, dict(lr=torch.tensor(0.1)), "Tensor"),
    (ft.Adam, dict(lr=-1.0), "lr"),
    (ft.Adam, dict(betas=(1.5, 0.9)), "betas"),
    (ft.SGD, dict(nesterov=True), "Nesterov"),
    (ft.Adam, dict(foreach="yes"), "foreach"),
    (ft.Adam, dict(sparse_mode="eager"), "sparse_mode"),
])
def test_unsupported_arguments_are_refused(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_foreach_and_fused_are_accepted_no_ops():
    for kw in (dict(foreach=True), dict(fused=True), dict(foreach=False, fused=False)):
        p = torch.nn.Parameter(torch.ones(3))
        opt = ft.AdamW([p], lr=0.1, **kw)
        p.grad = torch.ones(3)
        opt.step()
        assert torch.allclose(p.detach(), torch.full((3,), 1.0 - 0.1 * 0.01 - 0.1), atol=1e-6)


def test_bad_tensors_are_refused_clearly():
    ft.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])   # supported now
    with pytest.raises(TypeError, match="float16"):
        ft.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])
    with pytest.raises(ValueError, match="contiguous"):
        ft.Adam([torch.nn.Parameter(torch.zeros(3, 4).t())])
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="appears twice"):
        ft.Adam([p, p])
    with pytest.raises(ValueError, match="unknown backend"):
        ft.Adam([p], backend="tpu")
    with pytest.raises(ValueError, match="empty parameter list"):
        ft.Adam([])


def test_bad_edits_raise_and_change_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    q = torch.nn.Parameter(torch.ones(2))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    snapshot = (p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()})

    def unchanged():
        return torch.equal(p, snapshot[0]) and all(
            torch.equal(opt.state[p][k], v) for k, v in snapshot[1].items())

    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert unchanged()
    opt.param_groups[0]["lr"] = 0.1
    opt.param_groups[0]["capturable"] = True
    with pytest.raises(ValueError, match="capturable"):
        opt.step()
    assert unchanged()
    opt.param_groups[0]["capturable"] = False
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [q], "lr": float("nan")})
    assert len(opt.param_groups) == 1
    with pytest.raises(TypeError, match="float16"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2, dtype=torch.float16))]})
    assert len(opt.param_groups) == 1
    p.grad = torch.ones(3, 1).expand(3, 2)[:, 0]      # non-contiguous grad: converted
    opt.step()
    assert not unchanged()


def test_bad_state_dicts_are_refused_and_change_nothing():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ft.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    state_before = {k: v.clone() for k, v in opt.state[p].items()}

    def bad(edit, exc, match):
        sd = copy.deepcopy(good)
        edit(sd)
        with pytest.raises(exc, match=match):
            opt.load_state_dict(sd)
        assert all(torch.equal(opt.state[p][k], v) for k, v in state_before.items())
        assert opt.param_groups[0]["lr"] == 0.1

    bad(lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3)), ValueError,
        "unknown state")
    bad(lambda sd: sd["state"][0].update(exp_avg=torch.zeros(4)), ValueError, "shape")
    bad(lambda sd: sd["state"][0].update(step=torch.tensor(-1.0)), ValueError, "step")
    bad(lambda sd: sd["state"][0].update(step=torch.tensor(2.5)), ValueError, "step")
    bad(lambda sd: sd["state"][0].pop("exp_avg_sq"), ValueError, "missing")
    bad(lambda sd: sd["state"][0].pop("step"), ValueError, "no 'step'")
    bad(lambda sd: sd["param_groups"][0].update(lr=-3.0), ValueError, "lr")
    bad(lambda sd: sd["param_groups"][0].update(capturable=True), ValueError, "capturable")
    bad(lambda sd: sd["state"][0].update(exp_avg=np.zeros(3, np.float32)), TypeError, "NumPy")
    core = fastopt.Adam([np.ones(3, np.float32)]).state_dict()
    with pytest.raises(ValueError, match="fastopt.Adam state_dict"):
        opt.load_state_dict(core)
    opt.load_state_dict(good)                             # and a good one still loads
    assert opt.state[p]["step"].item() == 1


def test_fused_options_match_fastopt_core():
    opts = dict(clip_value=0.5, l1=0.01, param_min=-0.9, param_max=0.9, max_norm=2.0)
    p0 = tensors([(6, 4), (7,)], torch.float32)
    ours = clone_params(p0)
    arrays = [p.detach().numpy().copy() for p in p0]
    opt = ft.Adam(ours, lr=0.05, **opts)
    core = fastopt.Adam(arrays, lr=0.05, **opts)
    for gs in awkward_grads([(6, 4), (7,)], np.float32, 15, seed=1):
        set_grads(ours, gs)
        opt.step()
        core.step(gs)
    for a, p in zip(arrays, ours):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    assert float(ours[1].detach().abs().max()) <= 0.9


# --------------------------------------------------------------------- CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_tensors_match_torch_on_gpu():
    p0 = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
    ours = [torch.nn.Parameter(p.detach().clone()) for p in p0]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in p0]
    opt, ref = ft.AdamW(ours, lr=1e-2), torch.optim.AdamW(theirs, lr=1e-2)
    assert opt.backend.name == "cuda"
    for t in range(20):
        for a, b in zip(ours, theirs):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


SIM_SCRIPT = textwrap.dedent("""
    import numpy as np, torch, fastopt.torch as ft
    from fastopt.backends import cuda as cb
    cb._load(); assert cb._SIM
    cb.BLOCK_SIZE, cb.CHUNK, cb.MAX_BLOCKS = 32, 64, 3
    torch.manual_seed(0)
    def run(backend):
        torch.manual_seed(0)
        emb = torch.nn.Embedding(20, 3, sparse=True)
        lin = torch.nn.Linear(3, 70)
        ps = [emb.weight, lin.weight, lin.bias]
        opt = ft.Adam(ps, lr=1e-2, backend=backend)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            ids = torch.randint(0, 20, (8,), generator=g)
            opt.zero_grad()
            lin(emb(ids)).pow(2).sum().backward()
            opt.step()
        return [p.detach().clone() for p in ps], opt
    a, oa = run("cuda")
    b, ob = run("numba")
    assert oa.backend.name == "cuda"
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()
    # the storage formats through the CUDA backend: bfloat16 tensors, 8/16-bit state
    def low(backend, dtype=torch.float32, **kw):
        torch.manual_seed(0)
        ps = list(torch.nn.Linear(16, 40).to(dtype).parameters())
        opt = ft.AdamW(ps, lr=1e-2, backend=backend, **kw)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step(grad_scale=2.0)
        opt.state_dict()
        return [p.detach().clone().view(torch.int16) if dtype == torch.bfloat16 else
                p.detach().clone() for p in ps]
    for kw in (dict(state_bits=8), dict(dtype=torch.bfloat16, bf16_update="stochastic", seed=3),
               dict(dtype=torch.bfloat16, state_bits=16)):
        for x, y in zip(low("cuda", **kw), low("numba", **kw)):
            assert torch.equal(x, y), kw
    print("sim ok")
""")


def test_cuda_backend_plumbing_in_the_simulator():
    """The CUDA path (device views of parameters and state, grad pointers, sparse
    values as device arrays) run in numba's CUDA simulator on CPU tensors (whose
    memory the simulator reads through __cuda_array_interface__): bit for bit the
    numba backend's result.  Real GPUs: test_cuda_tensors_match_torch_on_gpu."""
    import importlib.util
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    out = subprocess.run([sys.executable, "-c", SIM_SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sim ok" in out.stdout


def test_cpu_backend_refuses_other_devices_and_cuda_refuses_cpu():
    p = torch.nn.Parameter(torch.zeros(3, device="meta"))
    with pytest.raises(TypeError, match="backend='cuda'"):
        ft.Adam([p], backend="numba")
    try:
        fastopt.backends.resolve("cuda")
    except RuntimeError:
        return                                           # no CUDA backend here: done
    with pytest.raises(TypeError, match="CUDA tensors"):
        ft.Adam([torch.nn.Parameter(torch.zeros(3))], backend="cuda")


# ------------------------------------------------------------------ example

def test_torch_training_example(capsys):
    import runpy
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "examples" / "torch_training.py"
    main = runpy.run_path(str(path), run_name="example_torch_training")["main"]
    results = main(["--quick"])
    out = capsys.readouterr().out
    assert "fastopt.torch" in out and "torch.optim" in out
    for task, r in results.items():
        f, t = r["fastopt.torch"], r["torch.optim"]
        assert len(f["loss"]) == len(t["loss"]) > 5
        assert f["loss"][-1] < 0.7 * f["loss"][0], task
        # the same optimizer math: the two loss curves agree closely
        np.testing.assert_allclose(f["loss"], t["loss"], rtol=2e-3, err_msg=task)
        assert f["step_ms"] > 0 and t["step_ms"] > 0
