"""fastopt.lr_scheduler against torch.optim.lr_scheduler (same groups, same steps).

Every schedule is run on a stand-in optimizer (and on the real fastopt SGD/Adam
when the core provides them) and on a torch.optim.SGD/Adam with two param groups
with different rates; the rates (and the cycled momentum / beta1) must agree to
1e-12 relative after construction and after every step.
"""

import json
import math
import warnings

import numpy as np
import pytest

import fastopt
from fastopt import lr_scheduler as ls

torch = pytest.importorskip("torch")
tsched = torch.optim.lr_scheduler

LRS = (0.1, 0.02)
RTOL = 1e-12


class FakeOpt:
    """Minimal optimizer: param_groups, defaults and a checked state_dict round trip."""

    def __init__(self, kind="sgd", lrs=LRS):
        self.kind = kind
        if kind == "sgd":
            self.defaults = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.0}
        else:
            self.defaults = {"lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}
        self.param_groups = [dict(self.defaults, lr=lr, params=[i]) for i, lr in enumerate(lrs)]

    def state_dict(self):
        return {"version": 1, "optimizer": "Fake" + self.kind,
                "state": {}, "param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, sd):
        if sd["optimizer"] != "Fake" + self.kind:
            raise ValueError("wrong optimizer")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("wrong number of groups")
        for g, new in zip(self.param_groups, sd["param_groups"]):
            g.clear()
            g.update(new)


def fastopt_opt(kind, lrs=LRS):
    cls = getattr(fastopt, "SGD" if kind == "sgd" else "Adam", None)
    if cls is None:
        pytest.skip("fastopt optimizers not available yet")
    ps = [np.zeros(3, np.float32), np.zeros(2, np.float32)]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(ps, lrs)]
    if kind == "sgd":
        return cls(groups, lr=0.1, momentum=0.9)
    return cls(groups, lr=0.1, betas=(0.9, 0.999))


def torch_opt(kind, lrs=LRS):
    ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    groups = [{"params": [p], "lr": lr} for p, lr in zip(ps, lrs)]
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return torch.optim.Adam(groups, lr=0.1, betas=(0.9, 0.999))


def momenta(opt, kind):
    if kind == "sgd":
        return [g["momentum"] for g in opt.param_groups]
    return [g["betas"][0] for g in opt.param_groups]


def trace(opt, sched, kind, steps, is_torch=False):
    """Group rates / momenta / get_last_lr after construction and after each step."""
    lrs, moms, last = [], [], []

    def record():
        lrs.append([g["lr"] for g in opt.param_groups])
        moms.append(momenta(opt, kind))
        last.append(list(sched.get_last_lr()))

    record()
    for _ in range(steps):
        if is_torch:
            opt.step()  # no gradients: a no-op that keeps torch's call-order check quiet
        sched.step()
        record()
    return np.array(lrs, float), np.array(moms, float), np.array(last, float)


# name -> (our constructor, torch constructor, optimizer kind, steps)
CASES = {
    "lambda": (lambda o: ls.LambdaLR(o, [lambda e: 0.95 ** e, lambda e: 1.0 / (1 + e)]),
               lambda o: tsched.LambdaLR(o, [lambda e: 0.95 ** e, lambda e: 1.0 / (1 + e)]),
               "sgd", 150),
    "step": (lambda o: ls.StepLR(o, step_size=7, gamma=0.5),
             lambda o: tsched.StepLR(o, step_size=7, gamma=0.5), "sgd", 200),
    "multistep": (lambda o: ls.MultiStepLR(o, milestones=[10, 30, 30, 80], gamma=0.3),
                  lambda o: tsched.MultiStepLR(o, milestones=[10, 30, 30, 80], gamma=0.3),
                  "sgd", 150),
    "exponential": (lambda o: ls.ExponentialLR(o, gamma=0.97),
                    lambda o: tsched.ExponentialLR(o, gamma=0.97), "sgd", 300),
    "cosine": (lambda o: ls.CosineAnnealingLR(o, T_max=50, eta_min=1e-3),
               lambda o: tsched.CosineAnnealingLR(o, T_max=50, eta_min=1e-3), "sgd", 250),
    "cosine-default": (lambda o: ls.CosineAnnealingLR(o, T_max=37),
                       lambda o: tsched.CosineAnnealingLR(o, T_max=37), "adam", 120),
    "linear-warmup": (lambda o: ls.LinearLR(o, start_factor=0.1, total_iters=20),
                      lambda o: tsched.LinearLR(o, start_factor=0.1, total_iters=20),
                      "sgd", 100),
    "linear-decay": (lambda o: ls.LinearLR(o, start_factor=1.0, end_factor=0.2,
                                           total_iters=30),
                     lambda o: tsched.LinearLR(o, start_factor=1.0, end_factor=0.2,
                                               total_iters=30), "sgd", 60),
    "linear-default": (lambda o: ls.LinearLR(o), lambda o: tsched.LinearLR(o), "sgd", 20),
}

for _mode in ("triangular", "triangular2", "exp_range"):
    for _kind in ("sgd", "adam"):
        CASES[f"cyclic-{_mode}-{_kind}"] = (
            (lambda m: lambda o: ls.CyclicLR(o, base_lr=[1e-3, 2e-3], max_lr=[0.1, 0.05],
                                             step_size_up=10, step_size_down=15, mode=m,
                                             gamma=0.99))(_mode),
            (lambda m: lambda o: tsched.CyclicLR(o, base_lr=[1e-3, 2e-3], max_lr=[0.1, 0.05],
                                                 step_size_up=10, step_size_down=15, mode=m,
                                                 gamma=0.99))(_mode),
            _kind, 300)
CASES["cyclic-scale-fn-iterations"] = (
    lambda o: ls.CyclicLR(o, 0.01, 0.1, step_size_up=7, scale_fn=lambda x: 1 / (1 + 0.01 * x),
                          scale_mode="iterations", base_momentum=0.7, max_momentum=0.95),
    lambda o: tsched.CyclicLR(o, 0.01, 0.1, step_size_up=7,
                              scale_fn=lambda x: 1 / (1 + 0.01 * x), scale_mode="iterations",
                              base_momentum=0.7, max_momentum=0.95),
    "sgd", 200)
CASES["cyclic-no-momentum"] = (
    lambda o: ls.CyclicLR(o, 0.01, 0.1, step_size_up=5, cycle_momentum=False),
    lambda o: tsched.CyclicLR(o, 0.01, 0.1, step_size_up=5, cycle_momentum=False),
    "adam", 100)
for _strategy in ("cos", "linear"):
    for _three in (False, True):
        for _kind in ("sgd", "adam"):
            CASES[f"onecycle-{_strategy}-{'3' if _three else '2'}-{_kind}"] = (
                (lambda s, t: lambda o: ls.OneCycleLR(o, max_lr=[0.1, 0.05], total_steps=100,
                                                      anneal_strategy=s, three_phase=t))(
                    _strategy, _three),
                (lambda s, t: lambda o: tsched.OneCycleLR(o, max_lr=[0.1, 0.05],
                                                          total_steps=100, anneal_strategy=s,
                                                          three_phase=t))(_strategy, _three),
                _kind, 100)
CASES["onecycle-epochs"] = (
    lambda o: ls.OneCycleLR(o, max_lr=0.3, epochs=7, steps_per_epoch=13, pct_start=0.25,
                            div_factor=10.0, final_div_factor=100.0, base_momentum=0.8,
                            max_momentum=0.9),
    lambda o: tsched.OneCycleLR(o, max_lr=0.3, epochs=7, steps_per_epoch=13, pct_start=0.25,
                                div_factor=10.0, final_div_factor=100.0, base_momentum=0.8,
                                max_momentum=0.9),
    "sgd", 91)
CASES["sequential-warmup-cosine"] = (
    lambda o: ls.SequentialLR(o, [ls.LinearLR(o, start_factor=0.01, total_iters=5),
                                  ls.CosineAnnealingLR(o, T_max=45)], milestones=[5]),
    lambda o: tsched.SequentialLR(o, [tsched.LinearLR(o, start_factor=0.01, total_iters=5),
                                      tsched.CosineAnnealingLR(o, T_max=45)], milestones=[5]),
    "sgd", 150)
CASES["sequential-three"] = (
    lambda o: ls.SequentialLR(o, [ls.LambdaLR(o, lambda e: 1.0 + e), ls.ExponentialLR(o, 0.9),
                                  ls.StepLR(o, 4, gamma=0.5)], milestones=[10, 40]),
    lambda o: tsched.SequentialLR(o, [tsched.LambdaLR(o, lambda e: 1.0 + e),
                                      tsched.ExponentialLR(o, 0.9),
                                      tsched.StepLR(o, 4, gamma=0.5)], milestones=[10, 40]),
    "sgd", 120)


def _assert_traces_equal(ours, theirs):
    for a, b, what in zip(ours, theirs, ("group lr", "momentum", "get_last_lr")):
        np.testing.assert_allclose(a, b, rtol=RTOL, atol=0, err_msg=what)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_torch(name):
    mine, theirs, kind, steps = CASES[name]
    o = FakeOpt(kind)
    ours = trace(o, mine(o), kind, steps)
    t = torch_opt(kind)
    ref = trace(t, theirs(t), kind, steps, is_torch=True)
    _assert_traces_equal(ours, ref)
    # the schedule actually moves (guards against comparing two constant sequences)
    assert np.ptp(ours[0][:, 0]) > 0
    for g, tg in zip(o.param_groups, t.param_groups):
        assert g["initial_lr"] == pytest.approx(tg["initial_lr"], rel=RTOL)


@pytest.mark.parametrize("name", ["step", "cosine", "linear-warmup", "cyclic-triangular2-sgd",
                                  "cyclic-exp_range-adam", "onecycle-cos-3-adam",
                                  "sequential-warmup-cosine"])
def test_matches_torch_on_fastopt_optimizer(name):
    mine, theirs, kind, steps = CASES[name]
    o = fastopt_opt(kind)
    ours = trace(o, mine(o), kind, steps)
    t = torch_opt(kind)
    ref = trace(t, theirs(t), kind, steps, is_torch=True)
    _assert_traces_equal(ours, ref)


def _has_callable(x):
    if isinstance(x, dict):
        return any(_has_callable(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_has_callable(v) for v in x)
    return callable(x)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip_mid_run(name):
    mine, _, kind, steps = CASES[name]
    k = steps // 3 + 1
    o = FakeOpt(kind)
    s = mine(o)
    full = trace(o, s, kind, steps)
    # run k steps, save, rebuild everything from scratch, load, continue
    o1 = FakeOpt(kind)
    s1 = mine(o1)
    for _ in range(k):
        s1.step()
    sd_o, sd_s = o1.state_dict(), s1.state_dict()
    assert not _has_callable(sd_s)
    sd_s = json.loads(json.dumps(sd_s))  # plain data: survives JSON
    o2 = FakeOpt(kind)
    s2 = mine(o2)
    o2.load_state_dict(sd_o)
    s2.load_state_dict(sd_s)
    assert s2.get_last_lr() == pytest.approx(list(full[2][k]), rel=RTOL)
    rest = trace(o2, s2, kind, steps - k)
    for a, b in zip(rest, full):
        np.testing.assert_allclose(a, b[k:], rtol=RTOL, atol=0)


def test_construction_sets_initial_lr_and_initial_step():
    o = FakeOpt()
    ls.LinearLR(o, start_factor=0.5, total_iters=4)
    assert [g["initial_lr"] for g in o.param_groups] == list(LRS)
    assert [g["lr"] for g in o.param_groups] == [0.05, 0.01]
    # a second scheduler keeps the first one's initial_lr (setdefault, as torch)
    s2 = ls.ExponentialLR(o, gamma=0.5)
    assert s2.base_lrs == list(LRS)
    assert s2.last_epoch == 0


def test_resume_with_last_epoch_needs_initial_lr():
    o = FakeOpt()
    with pytest.raises(KeyError, match="initial_lr"):
        ls.StepLR(o, 3, last_epoch=5)
    t = torch_opt("sgd")
    for g in t.param_groups:
        g["initial_lr"] = g["lr"]
    for g in o.param_groups:
        g["initial_lr"] = g["lr"]
    a, b = ls.StepLR(o, 3, last_epoch=5), tsched.StepLR(t, 3, last_epoch=5)
    assert a.last_epoch == b.last_epoch == 6
    assert a.get_last_lr() == pytest.approx(b.get_last_lr(), rel=RTOL)


def test_get_lr_outside_step_warns_like_torch():
    s = ls.StepLR(FakeOpt(), 3)
    with pytest.warns(UserWarning, match="get_last_lr"):
        s.get_lr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.step()


def test_onecycle_past_total_steps_raises_without_change():
    o = FakeOpt()
    s = ls.OneCycleLR(o, max_lr=0.1, total_steps=10)
    for _ in range(10):
        s.step()
    before = [dict(g) for g in o.param_groups]
    with pytest.raises(ValueError, match="Tried to step 11 times"):
        s.step()
    assert o.param_groups == before and s.last_epoch == 10


def test_onecycle_empty_phase_is_a_value_error():
    o = FakeOpt()
    before = [dict(g) for g in o.param_groups]
    with pytest.raises(ValueError, match="empty phase"):
        ls.OneCycleLR(o, max_lr=0.1, total_steps=10, pct_start=0.1)  # torch: ZeroDivisionError
    assert o.param_groups == before


# -------------------------------------------------------------- ReduceLROnPlateau

def _metrics(n=120):
    """Scripted metric: improves, plateaus, small wiggles, a spike, nan, improves again."""
    out = []
    for t in range(n):
        if t < 15:
            v = 1.0 - 0.05 * t
        elif t < 60:
            v = 0.3 + 1e-5 * ((t * 7) % 5)
        elif t < 62:
            v = 5.0
        elif t == 62:
            v = float("nan")
        elif t < 80:
            v = 0.3 - 0.01 * (t - 62)
        else:
            v = 0.12 + 0.001 * ((t * 3) % 4)
        out.append(v)
    return out


PLATEAU = [
    dict(),
    dict(patience=3, cooldown=2, factor=0.5),
    dict(mode="max", threshold_mode="abs", threshold=0.01, patience=2, factor=0.3),
    dict(patience=0, min_lr=[0.005, 1e-3], factor=0.2),
    dict(patience=1, min_lr=0.004, threshold=0.0, cooldown=5),
    dict(patience=2, eps=0.01, factor=0.5),
    dict(mode="max", patience=4),
    dict(threshold_mode="abs", threshold=1e-3, patience=1, factor=0.7),
]


@pytest.mark.parametrize("kw", PLATEAU, ids=[str(i) for i in range(len(PLATEAU))])
def test_plateau_matches_torch(kw):
    metrics = _metrics()
    o, t = FakeOpt(), torch_opt("sgd")
    s, ts = ls.ReduceLROnPlateau(o, **kw), tsched.ReduceLROnPlateau(t, **kw)
    assert "initial_lr" not in o.param_groups[0]
    ours, theirs = [], []
    for m in metrics:
        s.step(m)
        t.step()
        ts.step(m)
        ours.append(s.get_last_lr() + [s.num_bad_epochs, s.cooldown_counter, s.last_epoch])
        theirs.append(list(ts.get_last_lr()) + [ts.num_bad_epochs, ts.cooldown_counter,
                                                ts.last_epoch])
    np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=0)
    assert s.best == ts.best or (math.isnan(s.best) and math.isnan(ts.best))
    if kw.get("mode") != "max":
        assert min(r[0] for r in ours) < LRS[0]  # it did reduce


def test_plateau_state_dict_round_trip():
    metrics = _metrics()
    kw = dict(patience=2, cooldown=3, factor=0.5, min_lr=[1e-3, 1e-4])
    o = FakeOpt()
    s = ls.ReduceLROnPlateau(o, **kw)
    full = []
    for m in metrics:
        s.step(m)
        full.append(s.get_last_lr())
    o1 = FakeOpt()
    s1 = ls.ReduceLROnPlateau(o1, **kw)
    for m in metrics[:50]:
        s1.step(m)
    sd = json.loads(json.dumps(s1.state_dict()))  # includes best=inf-safe values
    o2 = FakeOpt()
    o2.load_state_dict(o1.state_dict())
    s2 = ls.ReduceLROnPlateau(o2)
    s2.load_state_dict(sd)
    rest = []
    for m in metrics[50:]:
        s2.step(m)
        rest.append(s2.get_last_lr())
    assert rest == full[50:]


def test_plateau_metric_must_be_a_number():
    s = ls.ReduceLROnPlateau(FakeOpt())
    with pytest.raises(ValueError, match="metrics"):
        s.step("low")


# ------------------------------------------------------------------- validation

BAD = [
    (lambda o: ls.StepLR(o, step_size=0), "step_size"),
    (lambda o: ls.StepLR(o, step_size=2.5), "step_size"),
    (lambda o: ls.StepLR(o, step_size=3, gamma=float("nan")), "gamma"),
    (lambda o: ls.StepLR(o, step_size=3, last_epoch=-2), "last_epoch"),
    (lambda o: ls.MultiStepLR(o, milestones=[3, -1]), "milestone"),
    (lambda o: ls.MultiStepLR(o, milestones=5), "milestones"),
    (lambda o: ls.ExponentialLR(o, gamma="0.9"), "gamma"),
    (lambda o: ls.CosineAnnealingLR(o, T_max=0), "T_max"),
    (lambda o: ls.LinearLR(o, start_factor=0.0), "start_factor"),
    (lambda o: ls.LinearLR(o, start_factor=1.5), "start_factor"),
    (lambda o: ls.LinearLR(o, end_factor=-0.1), "end_factor"),
    (lambda o: ls.LinearLR(o, total_iters=0), "total_iters"),
    (lambda o: ls.LambdaLR(o, [lambda e: 1.0]), "lr_lambdas"),
    (lambda o: ls.CyclicLR(o, 0.1, [0.2, 0.3, 0.4]), "max_lr"),
    (lambda o: ls.CyclicLR(o, -0.1, 0.2), "base_lr"),
    (lambda o: ls.CyclicLR(o, 0.1, 0.2, mode="square"), "mode"),
    (lambda o: ls.CyclicLR(o, 0.1, 0.2, scale_mode="epochs"), "scale_mode"),
    (lambda o: ls.CyclicLR(o, 0.1, 0.2, step_size_up=0), "step_size_up"),
    (lambda o: ls.CyclicLR(o, 0.1, 0.2, max_momentum=1.5), "max_momentum"),
    (lambda o: ls.OneCycleLR(o, 0.1), "total_steps OR"),
    (lambda o: ls.OneCycleLR(o, 0.1, total_steps=0), "total_steps"),
    (lambda o: ls.OneCycleLR(o, 0.1, epochs=2, steps_per_epoch=0), "steps_per_epoch"),
    (lambda o: ls.OneCycleLR(o, 0.1, total_steps=10, pct_start=1.5), "pct_start"),
    (lambda o: ls.OneCycleLR(o, 0.1, total_steps=10, anneal_strategy="exp"), "anneal"),
    (lambda o: ls.OneCycleLR(o, 0.1, total_steps=10, div_factor=0), "div_factor"),
    (lambda o: ls.OneCycleLR(o, [0.1], total_steps=10), "max_lr"),
    (lambda o: ls.ReduceLROnPlateau(o, factor=1.0), "factor"),
    (lambda o: ls.ReduceLROnPlateau(o, mode="up"), "mode"),
    (lambda o: ls.ReduceLROnPlateau(o, threshold_mode="pct"), "threshold mode"),
    (lambda o: ls.ReduceLROnPlateau(o, patience=-1), "patience"),
    (lambda o: ls.ReduceLROnPlateau(o, cooldown=1.5), "cooldown"),
    (lambda o: ls.ReduceLROnPlateau(o, min_lr=[0.1]), "min_lrs"),
    (lambda o: ls.ReduceLROnPlateau(o, min_lr=-1.0), "min_lr"),
    (lambda o: ls.ReduceLROnPlateau(o, eps=-1.0), "eps"),
    (lambda o: ls.SequentialLR(o, [], []), "at least one"),
    (lambda o: ls.SequentialLR(o, [ls.StepLR(o, 2), ls.StepLR(o, 3)], [5, 6]), "milestones"),
    (lambda o: ls.SequentialLR(o, [ls.StepLR(o, 2), ls.ReduceLROnPlateau(o)], [5]),
     "ReduceLROnPlateau"),
    (lambda o: ls.SequentialLR(o, [ls.StepLR(o, 2), ls.StepLR(FakeOpt(), 3)], [5]),
     "same optimizer"),
]


@pytest.mark.parametrize("make,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_invalid_arguments(make, match):
    o = FakeOpt()
    with pytest.raises(ValueError, match=match):
        make(o)


@pytest.mark.parametrize("make", [
    lambda o: ls.CyclicLR(o, 0.1, 0.2, max_momentum=1.5),
    lambda o: ls.OneCycleLR(o, 0.1, total_steps=10, anneal_strategy="exp"),
    lambda o: ls.CyclicLR(o, 0.1, 0.2, mode="square"),
])
def test_invalid_arguments_leave_optimizer_untouched(make):
    o = FakeOpt()
    before = [dict(g) for g in o.param_groups]
    with pytest.raises(ValueError):
        make(o)
    assert o.param_groups == before


def test_type_errors():
    with pytest.raises(TypeError, match="not an optimizer"):
        ls.StepLR(object(), 3)
    with pytest.raises(TypeError, match="callable"):
        ls.LambdaLR(FakeOpt(), 0.5)
    o = FakeOpt()
    o.defaults = {"lr": 0.1}
    for g in o.param_groups:
        del g["momentum"]
    with pytest.raises(ValueError, match="momentum or beta1"):
        ls.CyclicLR(o, 0.1, 0.2)
    with pytest.raises(ValueError, match="momentum or beta1"):
        ls.OneCycleLR(o, 0.1, total_steps=10)
    ls.CyclicLR(o, 0.1, 0.2, cycle_momentum=False)  # fine without momentum


@pytest.mark.parametrize("mutate,match", [
    (lambda sd: sd.pop("gamma"), "missing"),
    (lambda sd: sd.update(bogus=1), "unexpected"),
    (lambda sd: sd.update(base_lrs=[0.1]), "base_lrs"),
    (lambda sd: sd.update(last_epoch="3"), "last_epoch"),
])
def test_load_state_dict_validates(mutate, match):
    o = FakeOpt()
    s = ls.ExponentialLR(o, 0.9)
    s.step()
    sd = s.state_dict()
    mutate(sd)
    before = s.state_dict()
    with pytest.raises(ValueError, match=match):
        s.load_state_dict(sd)
    assert s.state_dict() == before
    with pytest.raises(TypeError):
        s.load_state_dict([1, 2])


def test_lambda_state_dict_saves_callable_objects_only():
    class Mult:
        def __init__(self):
            self.factor = 0.5

        def __call__(self, e):
            return self.factor ** e

    o = FakeOpt()
    m = Mult()
    s = ls.LambdaLR(o, [m, lambda e: 1.0])
    sd = s.state_dict()
    assert sd["lr_lambdas"] == [{"factor": 0.5}, None]
    m2 = Mult()
    m2.factor = 0.9
    s2 = ls.LambdaLR(FakeOpt(), [m2, lambda e: 1.0])
    s2.load_state_dict(sd)
    assert m2.factor == 0.5
    # torch has the same layout
    t = torch_opt("sgd")
    tsd = tsched.LambdaLR(t, [Mult(), lambda e: 1.0]).state_dict()
    assert tsd["lr_lambdas"] == sd["lr_lambdas"]


def test_get_last_lr_is_a_copy():
    o = FakeOpt()
    s = ls.StepLR(o, 2)
    s.get_last_lr()[0] = 123.0
    assert s.get_last_lr()[0] == LRS[0]


@pytest.mark.parametrize("pair", ["linear+exp", "multistep+cosine", "step+lambda"])
def test_two_schedulers_stepping_together_match_torch(pair):
    """torch's chainable forms: schedulers stepped together compose multiplicatively."""
    def make(mod, o):
        if pair == "linear+exp":
            return [mod.LinearLR(o, start_factor=0.2, total_iters=10), mod.ExponentialLR(o, 0.95)]
        if pair == "multistep+cosine":
            return [mod.MultiStepLR(o, [20, 45], gamma=0.5), mod.CosineAnnealingLR(o, T_max=30)]
        return [mod.StepLR(o, 5, gamma=0.7), mod.LambdaLR(o, lambda e: 1.0 / (1 + e))]

    o, t = FakeOpt(), torch_opt("sgd")
    ours, theirs = make(ls, o), make(tsched, t)
    a, b = [], []
    for _ in range(80):
        t.step()
        for s in ours:
            s.step()
        for s in theirs:
            s.step()
        a.append([g["lr"] for g in o.param_groups])
        b.append([g["lr"] for g in t.param_groups])
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=0)
