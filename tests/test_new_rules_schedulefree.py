"""AdamWScheduleFree and SGDScheduleFree against the ``schedulefree`` package (1.4.1):
the fastopt class on NumPy arrays and the package's class on copies, over many
steps of awkward gradients (exact zeros, an all-zero step, huge and tiny gradients,
a NaN), with ``eval()`` / ``train()`` switches in the middle and at the end, float32
(1e-6 relative) and float64 (1e-9; the package runs float64 parameters), every CPU
backend, the package's foreach and per-tensor paths.  Parameters, ``z``,
``exp_avg_sq`` and the schedule's scalars are compared.  Then the mode as state
(checkpoints resume in either mode), the refused step in eval mode, the torch
drop-in, the functional form, lazy row-sparse steps, ShardedOptimizer (a world of
one), signature, defaults and refusals."""

import inspect

import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")
schedulefree = pytest.importorskip("schedulefree")

STEPS = 50
SHAPES = [(257,), (7, 13)]
BACKENDS = [b for b in fastopt.available_backends() if b != "cuda"]
RTOL = {np.float32: 1e-6, np.float64: 1e-9}

CONFIGS = {
    "AdamWScheduleFree": [
        dict(), dict(lr=0.01, weight_decay=1e-2, warmup_steps=10),
        dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, r=1.0, weight_lr_power=1.0, warmup_steps=3),
        dict(lr=0.005, betas=(0.95, 0.9), weight_decay=0.1, r=0.5, weight_lr_power=0.0)],
    "SGDScheduleFree": [
        dict(lr=0.1), dict(lr=0.05, weight_decay=1e-2, warmup_steps=10),
        dict(lr=0.2, momentum=0.5, r=1.0, weight_lr_power=1.0, warmup_steps=3),
        dict(lr=0.02, momentum=0.98, weight_decay=0.1, r=0.5, weight_lr_power=0.0)],
}
CASES = [(n, k) for n, cs in CONFIGS.items() for k in range(len(cs))]


def _grads(shape, dtype, rng, t, nan, huge=1e10):
    g = rng.standard_normal(shape)
    g[rng.random(shape) < 0.2] = 0.0
    if t % 9 == 4:
        g[...] = 0.0                         # an all-zero step
    elif t % 7 == 2:
        g *= huge                            # huge
    elif t % 5 == 3:
        g *= 1e-20                           # tiny
    if nan and t == 11:
        g.flat[3] = np.nan                   # NaN propagates (one element)
    return g.astype(dtype)


def _close(got, want, dtype, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, what
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=what)
    fin = np.isfinite(want)
    np.testing.assert_array_equal(got[~fin], want[~fin], err_msg=what)
    scale = max(1.0, float(np.abs(want[fin]).max(initial=0.0)))
    np.testing.assert_allclose(got[fin], want[fin], rtol=RTOL[dtype], atol=RTOL[dtype] * scale,
                               err_msg=what)


def _run(name, config, dtype, backend, foreach=True, steps=STEPS):
    """Both optimizers, switched to eval at step 20 and back at 21 (after the eval
    switch the parameters are compared too), and to eval at the end."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64 if dtype == np.float64 else torch.float32)
    try:
        rng = np.random.default_rng(7)
        ours = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
        theirs = [torch.tensor(p.copy(), requires_grad=True) for p in ours]
        opt = fastopt.CLASSES[name](ours, backend=backend, **config)
        ref = getattr(schedulefree, name)(theirs, foreach=foreach, **config)
        opt.train()
        ref.train()
        # SGD on 1e10 gradients leaves the float32 range within a few steps
        huge = 1e10 if name.startswith("AdamW") else 1e3
        for t in range(steps):
            if t == 20:
                opt.eval()
                ref.eval()
                for p, tp in zip(ours, theirs):
                    _close(p, tp.detach().numpy(), dtype, "x after eval()")
                opt.train()
                ref.train()
            grads = [_grads(s, dtype, rng, t, True, huge) for s in SHAPES]
            opt.step(grads)
            for p, g in zip(theirs, grads):
                p.grad = torch.from_numpy(g.copy())
            ref.step()
        return opt, ref, ours, theirs
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,k", CASES)
def test_matches_schedulefree(name, k, dtype, backend):
    if backend != "numpy" and k in (0, 2) and dtype == np.float64:
        pytest.skip("the compiled backends' float64 runs: configurations 1 and 3")
    opt, ref, ours, theirs = _run(name, CONFIGS[name][k], dtype, backend)
    sd = opt.state_dict()
    g = ref.param_groups[0]
    for i, (p, tp) in enumerate(zip(ours, theirs)):
        _close(p, tp.detach().numpy(), dtype, f"y of param {i}")
        st = sd["state"][i]
        assert st["step"] == STEPS == g["k"]
        assert st["lr_max"] == g["lr_max"] and st["weight_sum"] == pytest.approx(
            g["weight_sum"], rel=1e-15)
        for key, v in ref.state[tp].items():
            _close(st[key], v.numpy(), dtype, f"{key} of param {i}")
    assert np.isnan(ours[0].flat[3]) and np.isfinite(np.delete(ours[0], 3)).all()
    opt.eval()
    ref.eval()
    assert sd["param_groups"][0]["train_mode"] is True
    assert opt.param_groups[0]["train_mode"] is False is ref.param_groups[0]["train_mode"]
    for i, (p, tp) in enumerate(zip(ours, theirs)):
        _close(p, tp.detach().numpy(), dtype, f"x of param {i}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_the_per_tensor_path(name):
    """The package's foreach=False path (the same equations)."""
    opt, ref, ours, theirs = _run(name, CONFIGS[name][1], np.float32, "auto", foreach=False)
    for p, tp in zip(ours, theirs):
        _close(p, tp.detach().numpy(), np.float32, "y")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_step_in_eval_mode_is_refused_and_changes_nothing(name):
    p = np.ones(6)
    opt = fastopt.CLASSES[name]([p])
    opt.eval()                             # before any step: no z, only the flag
    np.testing.assert_array_equal(p, np.ones(6))
    with pytest.raises(RuntimeError, match="eval mode.*train()"):
        opt.step([np.ones(6)])
    np.testing.assert_array_equal(p, np.ones(6))
    assert opt.state_dict()["state"] == {}
    opt.train()
    opt.step([np.ones(6)])                 # (after one step y = z = x)
    opt.step([np.linspace(-1, 1, 6)])
    y = p.copy()
    opt.train()                            # already in train mode: a no-op
    np.testing.assert_array_equal(p, y)
    opt.eval()
    x = p.copy()
    opt.eval()                             # already in eval mode: a no-op
    np.testing.assert_array_equal(p, x)
    assert not np.array_equal(x, y)
    with pytest.raises(RuntimeError, match="param group 0 cannot step"):
        opt.step([np.ones(6)])
    np.testing.assert_array_equal(p, x)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_checkpoint_resumes_in_the_saved_mode(name, mode):
    """A state dict saved in either mode loads into a new optimizer (which starts in
    train mode) in that mode; switching and stepping on gives the uninterrupted run's
    parameters bit for bit."""
    config = CONFIGS[name][1]
    rng = np.random.default_rng(4)
    grads = [rng.standard_normal(40) for _ in range(16)]
    a, b = np.linspace(-1, 1, 40), np.linspace(-1, 1, 40)
    oa = fastopt.CLASSES[name]([a], **config)
    ob = fastopt.CLASSES[name]([b], **config)
    for t, g in enumerate(grads):
        if t == 8:
            getattr(oa, mode)()
            getattr(ob, mode)()
            sd = ob.state_dict()
            assert sd["param_groups"][0]["train_mode"] is (mode == "train")
            ob = fastopt.CLASSES[name]([b], **config)
            ob.load_state_dict(sd)
            assert ob.param_groups[0]["train_mode"] is (mode == "train")
            oa.train()
            ob.train()
        oa.step([g])
        ob.step([g])
    np.testing.assert_array_equal(a, b)
    oa.eval()
    ob.eval()
    np.testing.assert_array_equal(a, b)


def test_host_scalars_are_checked_on_load():
    p = np.zeros(5)
    opt = fastopt.AdamWScheduleFree([p])
    opt.step([np.ones(5)])
    sd = opt.state_dict()
    sd["state"][0]["weight_sum"] = -1.0
    with pytest.raises(ValueError, match="weight_sum"):
        fastopt.AdamWScheduleFree([p.copy()]).load_state_dict(sd)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_drop_in_matches_schedulefree(name):
    import fastopt.torch as ft
    config = CONFIGS[name][1]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    ours = [torch.nn.Parameter(t.clone()) for t in init]
    theirs = [torch.nn.Parameter(t.clone()) for t in init]
    o = getattr(ft, name)(ours, **config)
    t = getattr(schedulefree, name)(theirs, **config)
    o.train()
    t.train()
    for step in range(30):
        if step == 12:
            v = ours[0]._version
            o.eval()
            t.eval()
            assert ours[0]._version > v        # autograd sees the in-place rewrite
            for x, y in zip(ours, theirs):
                torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
            o.train()
            t.train()
        for x, y in zip(ours, theirs):
            g = torch.randn(x.shape, generator=gen)
            x.grad, y.grad = g.clone(), g.clone()
        o.step()
        t.step()
    o.eval()
    t.eval()
    for x, y in zip(ours, theirs):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(o.state[x]["z"], t.state[y]["z"], rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="eval mode"):
        o.step()


def test_functional_matches_the_class():
    config = CONFIGS["AdamWScheduleFree"][2]
    rng = np.random.default_rng(2)
    p, q = rng.standard_normal(30), np.zeros(30)
    q[...] = p
    z, v = p.copy(), np.zeros(30)          # z starts as the parameter
    opt = fastopt.AdamWScheduleFree([q], **config)
    host = {}
    for t in range(1, 12):
        g = rng.standard_normal(30)
        host = fastopt.functional.adamwschedulefree_(p, g, z, v, step=t, **config, **host)
        opt.step([g])
    np.testing.assert_array_equal(p, q)
    st = opt.state_dict()["state"][0]
    np.testing.assert_array_equal(z, st["z"])
    assert host == {k: st[k] for k in ("lr_max", "weight_sum")}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lazy_sparse_rows_start_z_on_their_first_step(name):
    """Rows a row-sparse step does not touch keep z unset (NaN) and are left alone by
    eval()/train() (for them x = y = z = p); a row's first step starts its z from the
    parameter, so a parameter stepped only through sparse steps of all its rows
    equals the dense run."""
    config = CONFIGS[name][1]
    rng = np.random.default_rng(5)
    p = rng.standard_normal((4, 3))
    q = p.copy()
    sparse = fastopt.CLASSES[name]([p], **config)
    dense = fastopt.CLASSES[name]([q], **config)
    g = rng.standard_normal((4, 3))
    sparse.step([fastopt.RowSparse(np.array([0, 2]), g[[0, 2]])])
    z = sparse.state_dict()["state"][0]["z"]
    assert np.isnan(z[[1, 3]]).all() and np.isfinite(z[[0, 2]]).all()
    before = p.copy()
    sparse.eval()
    np.testing.assert_array_equal(p[[1, 3]], before[[1, 3]])
    sparse.train()
    dense.step([np.where(np.isin(np.arange(4), [0, 2])[:, None], g, 0.0)])
    # rows 0 and 2 as a dense step whose other rows' gradients are zero ... except
    # that the dense step moved rows 1 and 3 (zero gradient, weight decay): compare
    # the touched rows
    np.testing.assert_allclose(p[[0, 2]], q[[0, 2]], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_signature_and_defaults_match_schedulefree(name):
    ours = inspect.signature(fastopt.CLASSES[name]).parameters
    theirs = inspect.signature(getattr(schedulefree, name)).parameters
    names = [k for k in theirs if k != "foreach"]
    assert list(ours)[:len(names)] == names
    for key in names[1:]:
        want, got = theirs[key].default, ours[key].default
        assert (tuple(got) if isinstance(want, tuple) else got) == want, key


@pytest.mark.parametrize("name,bad,match", [
    ("AdamWScheduleFree", dict(betas=(0.0, 0.999)), r"betas\[0\].*1 - 1/beta1"),
    ("AdamWScheduleFree", dict(warmup_steps=-1), "warmup_steps"),
    ("AdamWScheduleFree", dict(warmup_steps=2.5), "warmup_steps"),
    ("AdamWScheduleFree", dict(weight_lr_power=-1.0), "weight_lr_power"),
    ("SGDScheduleFree", dict(momentum=0.0), "momentum.*1 - 1/momentum"),
    ("SGDScheduleFree", dict(momentum=1.0), "momentum"),
    ("SGDScheduleFree", dict(r=float("nan")), "r"),
])
def test_refuses_bad_hyperparameters(name, bad, match):
    p = np.ones(4)
    with pytest.raises(ValueError, match=match):
        fastopt.CLASSES[name]([p], **bad)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_refuses_low_precision_state_and_bfloat16_parameters(name):
    for bits in (8, 16):
        with pytest.raises(ValueError, match=f"state_bits={bits} is not possible.*z is"):
            fastopt.CLASSES[name]([np.zeros(5000, np.float32)], state_bits=bits)
    from fastopt import storage
    bf16 = storage.bf16_zeros(10) if hasattr(storage, "bf16_zeros") else None
    if bf16 is None:
        import ml_dtypes
        bf16 = np.zeros(10, ml_dtypes.bfloat16)
    with pytest.raises(ValueError, match="bfloat16 parameters are not possible"):
        fastopt.CLASSES[name]([bf16])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sharded_world_of_one_switches_modes_like_the_plain_class(name):
    pytest.importorskip("mpi4py")
    from fastopt.distributed import ShardedOptimizer
    config = CONFIGS[name][2]
    rng = np.random.default_rng(6)
    a = [rng.standard_normal((6, 5)), rng.standard_normal(9)]
    b = [x.copy() for x in a]
    plain = fastopt.CLASSES[name](a, **config)
    sharded = ShardedOptimizer(fastopt.CLASSES[name], b, **config)
    for t in range(10):
        if t == 5:
            plain.eval()
            sharded.eval()
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
            assert sharded.param_groups[0]["train_mode"] is False
            with pytest.raises(RuntimeError, match="eval mode"):
                sharded.step([np.ones_like(x) for x in b])
            plain.train()
            sharded.train()
        grads = [rng.standard_normal(x.shape) for x in a]
        plain.step(grads)
        sharded.step([g.copy() for g in grads])
    plain.eval()
    sharded.eval()
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_torch_state_dicts_load_both_ways_with_the_package(name, mode):
    """The drop-in's state dict loads into the package's class and the package's into
    the drop-in (saved in either mode; the package keeps k, lr_max, weight_sum per
    group, fastopt per parameter); both continue on the same trajectory."""
    import fastopt.torch as ft
    config = CONFIGS[name][1]
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        gen = torch.Generator().manual_seed(1)
        init = [torch.randn(s, generator=gen) for s in SHAPES]
        ours = [torch.nn.Parameter(t.clone()) for t in init]
        theirs = [torch.nn.Parameter(t.clone()) for t in init]
        o = getattr(ft, name)(ours, **config)
        t = getattr(schedulefree, name)(theirs, **config)

        def steps(o, t, n):
            o.train()
            t.train()
            for _ in range(n):
                for x, y in zip(ours, theirs):
                    g = torch.randn(x.shape, generator=gen)
                    x.grad, y.grad = g.clone(), g.clone()
                o.step()
                t.step()

        steps(o, t, 12)
        getattr(o, mode)()
        getattr(t, mode)()
        o2 = getattr(schedulefree, name)(ours, **config)
        o2.load_state_dict(o.state_dict())             # ours -> the package
        t2 = getattr(ft, name)(theirs, **config)
        t2.load_state_dict(t.state_dict())             # the package -> ours
        assert t2.param_groups[0]["train_mode"] is (mode == "train")
        assert "k" not in t2.param_groups[0]
        st = t2.state_dict()
        assert st["state"][0]["step"] == 12 and st["param_groups"][0]["k"] == 12
        steps(o2, t2, 10)
        o2.eval()
        t2.eval()
        for x, y in zip(ours, theirs):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-12)
    finally:
        torch.set_default_dtype(old)
