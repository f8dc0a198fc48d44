"""The per-tensor rules (``Rule.layout == "tensor"``: LAMB, LARS): the norm pass and the
update pass against the equations, the edge cases of the trust ratios, determinism
over thread counts, every facade (class, functional, fastopt.torch, checkpoints), and
what they refuse, before anything is written.

(The registry-driven suites run them against the NumPy reference too: every variant
x backend x dtype over 60 steps of awkward gradients, tests/test_rules_vs_reference.py.)
"""

import math

import numpy as np
import pytest

import fastopt
from fastopt import rules
from fastopt.backends import numba_cpu

from conftest import awkward_grads, init_params

TENSOR_RULES = [n for n, r in rules.RULES.items() if r.per_tensor]
SHAPES = [(33, 17), (5,), (70_001,), ()]


def test_the_tensor_rules():
    assert TENSOR_RULES == ["LAMB", "LARS"]


def _norm(a):
    return math.sqrt(float(np.sum(np.asarray(a, np.float64) ** 2)))


def lamb_by_formula(params, grads_seq, lr, betas, eps, wd, trust_clip):
    """LAMB written from the issue's equations in float64, independently of the
    rule module."""
    ps = [p.astype(np.float64) for p in params]
    ms = [np.zeros_like(p) for p in ps]
    vs = [np.zeros_like(p) for p in ps]
    b1, b2 = betas
    for t, grads in enumerate(grads_seq, start=1):
        for p, g, m, v in zip(ps, grads, ms, vs):
            g = g.astype(np.float64)
            m[...] = b1 * m + (1 - b1) * g
            v[...] = b2 * v + (1 - b2) * g * g
            u = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps) + wd * p
            pn, un = _norm(p), _norm(u)
            r = pn / un if pn > 0 and un > 0 else 1.0
            if trust_clip is not None:
                r = min(r, trust_clip)
            p -= lr * r * u
    return ps


def lars_by_formula(params, grads_seq, lr, momentum, wd, tc, eps, nesterov):
    ps = [p.astype(np.float64) for p in params]
    bufs = [np.zeros_like(p) for p in ps]
    for grads in grads_seq:
        for p, g, buf in zip(ps, grads, bufs):
            g = g.astype(np.float64)
            pn, gn = _norm(p), _norm(g)
            local = tc * pn / (gn + wd * pn + eps) if pn > 0 and gn > 0 else 1.0
            d = local * (g + wd * p)
            buf[...] = momentum * buf + d
            p -= lr * (d + momentum * buf) if nesterov else lr * buf
    return ps


@pytest.mark.parametrize("name,k", [(n, k) for n in TENSOR_RULES
                                    for k in range(len(rules.RULES[n].variants))])
def test_float64_follows_the_equations(name, k):
    """numba in float64, 40 steps of awkward gradients (zeros, an all-zero step,
    huge and tiny steps), against the equations written out here."""
    rule = rules.RULES[name]
    variant = rule.variants[k]
    group = rule.check_group({**rule.defaults, **variant})
    params = init_params(SHAPES, np.float64)
    grads_seq = awkward_grads(SHAPES, np.float64, 40)
    if name == "LAMB":
        want = lamb_by_formula(params, grads_seq, group["lr"], group["betas"], group["eps"],
                               group["weight_decay"], group["trust_clip"])
    else:
        want = lars_by_formula(params, grads_seq, group["lr"], group["momentum"],
                               group["weight_decay"], group["trust_coefficient"],
                               group["eps"], group["nesterov"])
    opt = fastopt.CLASSES[name](params, backend="numba", **variant)
    for grads in grads_seq:
        opt.step(grads)
    for p, w in zip(params, want):
        np.testing.assert_allclose(p, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", TENSOR_RULES)
def test_norms_do_not_depend_on_the_thread_count(name, monkeypatch):
    """The norm pass sums per chunk, then the chunks in order: the parallel driver
    (several chunks, several threads) gives the serial driver's result bit for bit."""
    shapes = [(3 * numba_cpu.CHUNK + 5,), (40, 30)]
    params = init_params(shapes, np.float32)
    grads_seq = awkward_grads(shapes, np.float32, 6)
    out = []
    for threshold in (1 << 60, 1):          # serial everywhere, parallel everywhere
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", threshold)
        ps = [p.copy() for p in params]
        opt = fastopt.CLASSES[name](ps, backend="numba")
        for grads in grads_seq:
            opt.step(grads)
        out.append(ps)
    for a, b in zip(*out):
        np.testing.assert_array_equal(a, b)


def test_lamb_trust_ratio_edge_cases():
    """A zero parameter tensor or a zero direction takes r = 1; trust_clip caps r."""
    p = np.zeros(10, np.float32)
    opt = fastopt.LAMB([p], backend="numba", lr=0.1)
    opt.step([np.ones(10, np.float32)])
    # r = 1: the first Adam step of a constant gradient is u = 1 / (1 + eps)
    np.testing.assert_allclose(p, -0.1 / (1 + 1e-6), rtol=1e-6)
    q = np.full(4, 100.0)
    opt = fastopt.LAMB([q], backend="numba", lr=0.1, trust_clip=2.0)
    opt.step([np.ones(4)])
    # ||p|| / ||u|| = 100 (u = 1 / (1 + eps) per element), capped at 2
    np.testing.assert_allclose(q, 100.0 - 0.1 * 2.0 / (1 + 1e-6), rtol=1e-12)
    z = np.ones(6)
    fastopt.LAMB([z], backend="numba").step([np.zeros(6)])
    np.testing.assert_array_equal(z, 1.0)     # zero gradient, no decay: u = 0, r = 1


def test_lars_local_rate_edge_cases():
    p = np.full(4, 3.0)
    opt = fastopt.LARS([p], backend="numba", lr=1.0, momentum=0.0, trust_coefficient=0.5)
    opt.step([np.full(4, 2.0)])
    # local = 0.5 * 6 / (4 + 1e-8); p -= local * g
    np.testing.assert_allclose(p, 3.0 - 0.5 * 6 / (4 + 1e-8) * 2.0, rtol=1e-12)
    z = np.zeros(3)
    fastopt.LARS([z], backend="numba", lr=0.1, momentum=0.0).step([np.ones(3)])
    np.testing.assert_allclose(z, -0.1)        # ||p|| = 0: local = 1


@pytest.mark.parametrize("name", TENSOR_RULES)
def test_nan_gradient_propagates_to_its_tensor(name):
    p = np.ones(5, np.float32)
    other = np.ones(3, np.float32)
    opt = fastopt.CLASSES[name]([p, other], backend="numba")
    g = np.ones(5, np.float32)
    g[2] = np.nan
    opt.step([g, np.ones(3, np.float32)])
    assert np.isnan(p[2])
    assert np.isfinite(other).all()


@pytest.mark.parametrize("name", TENSOR_RULES)
def test_functional_equals_the_class(name):
    rule = rules.RULES[name]
    variant = rule.variants[1]
    p1 = init_params([(20, 7)], np.float32)[0]
    p2 = p1.copy()
    opt = fastopt.CLASSES[name]([p1], backend="numba", **variant)
    state = [np.zeros_like(p2) for _ in rule.slots]
    fn = getattr(fastopt.functional, name.lower() + "_")
    for t, (g,) in enumerate(awkward_grads([(20, 7)], np.float32, 12), start=1):
        opt.step([g])
        fn(p2, g, *state, step=t, backend="numba", **variant)
    np.testing.assert_array_equal(p1, p2)
    for k, name_ in enumerate(rule.slots):
        np.testing.assert_array_equal(opt.state[0][name_], state[k])


@pytest.mark.parametrize("name", TENSOR_RULES)
def test_checkpoint_resumes_bit_identically(name, tmp_path):
    shapes = [(30, 4), (9,)]
    grads_seq = awkward_grads(shapes, np.float32, 10)
    ps = init_params(shapes, np.float32)
    opt = fastopt.CLASSES[name](ps, backend="numba")
    for grads in grads_seq[:5]:
        opt.step(grads)
    fastopt.save(tmp_path / "ck", opt)
    qs = [p.copy() for p in ps]
    for grads in grads_seq[5:]:
        opt.step(grads)
    opt2 = fastopt.CLASSES[name](qs, backend="numba")
    fastopt.load(tmp_path / "ck", opt2)
    for grads in grads_seq[5:]:
        opt2.step(grads)
    for a, b in zip(ps, qs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", TENSOR_RULES)
def test_torch_drop_in_equals_the_core(name):
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 3))
    arrays = [p.detach().numpy().copy() for p in model.parameters()]
    opt = getattr(ft, name)(model.parameters(), weight_decay=1e-2)
    core = fastopt.CLASSES[name](arrays, backend="numba", weight_decay=1e-2)
    x = torch.randn(32, 8)
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = [p.grad.numpy().copy() for p in model.parameters()]
        opt.step()
        core.step(grads)
    for p, a in zip(model.parameters(), arrays):
        np.testing.assert_array_equal(p.detach().numpy(), a)
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", *rules.RULES[name].slots}


# --------------------------------------------------------------- refusals

def _unchanged(opt, params, before):
    for p, b in zip(params, before):
        np.testing.assert_array_equal(p, b)
    assert all(not st for st in opt.state.values()) if isinstance(opt.state, dict) else True


@pytest.mark.parametrize("name", TENSOR_RULES)
def test_sparse_gradient_is_refused_before_writing(name):
    p = np.ones((6, 3), np.float32)
    q = np.ones(4, np.float32)
    opt = fastopt.CLASSES[name]([p, q], backend="numba")
    with pytest.raises(ValueError, match="norms of the whole tensor.*row-sparse"):
        opt.step([fastopt.RowSparse(np.array([1]), np.ones((1, 3), np.float32)),
                  np.ones(4, np.float32)])
    np.testing.assert_array_equal(p, 1.0)
    np.testing.assert_array_equal(q, 1.0)
    with pytest.raises(ValueError, match="row-sparse"):
        getattr(fastopt.functional, name.lower() + "_")(
            p, fastopt.RowSparse(np.array([1]), np.ones((1, 3), np.float32)),
            *[np.zeros_like(p) for _ in rules.RULES[name].slots], step=1, backend="numba")
    np.testing.assert_array_equal(p, 1.0)


@pytest.mark.parametrize("name", TENSOR_RULES)
def test_refused_options(name):
    p = np.ones(4, np.float32)
    cls = fastopt.CLASSES[name]
    with pytest.raises(ValueError, match="max_norm renormalizes rows"):
        cls([p], backend="numba", max_norm=1.0)
    opt = cls([p], backend="numba")
    with pytest.raises(ValueError, match="max_norm"):
        opt.param_groups[0]["max_norm"] = 1.0
        opt.step([np.ones(4, np.float32)])
    np.testing.assert_array_equal(p, 1.0)


@pytest.mark.parametrize("name", TENSOR_RULES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cython_is_numba_bit_for_bit(name, dtype, monkeypatch):
    """The Cython norm pass and update are the Numba ones, bit for bit, with the
    gradient options (grad_scale, clip_value) and the parameter options (l1, clamps),
    serial and parallel."""
    if "cython" not in fastopt.available_backends():
        pytest.skip("the Cython extension is not built")
    shapes = [(2 * numba_cpu.CHUNK + 3,), (33, 17), (5,)]
    hyper = dict(rules.RULES[name].variants[1], clip_value=0.5, l1=1e-4, param_min=-3.0)
    for threshold in (1 << 60, 1):
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", threshold)
        out = []
        for backend in ("numba", "cython"):
            ps = init_params(shapes, dtype)
            opt = fastopt.CLASSES[name](ps, backend=backend, **hyper)
            for t, grads in enumerate(awkward_grads(shapes, dtype, 8)):
                opt.step(grads, grad_scale=2.0 if t % 2 else None)
            out.append(ps)
        for a, b in zip(*out):
            np.testing.assert_array_equal(a, b)


def test_capability_table_names_the_norm_pass():
    from fastopt import backends
    for b in ("numba", "numpy", "cython"):
        if b in fastopt.available_backends():
            assert b in backends.capable("tensor_norms")


@pytest.mark.parametrize("name,k", [(n, k) for n in TENSOR_RULES
                                    for k in range(len(rules.RULES[n].variants))])
def test_benchmark_torch_peer_follows_the_reference(name, k):
    """The torch peer the benchmark times (fastopt.benchmark.torch_peers) computes
    the rule: 6 steps in float64 against the NumPy reference."""
    torch = pytest.importorskip("torch")
    from fastopt.benchmark import torch_peers
    rule = rules.RULES[name]
    group = rule.check_group({**rule.defaults, **rule.variants[k]})
    shapes = [(50,), (7, 3)]
    params = init_params(shapes, np.float64)
    grads = awkward_grads(shapes, np.float64, 1)[0]
    ref = [p.copy() for p in params]
    states = [{s: np.zeros_like(p) for s in rule.slots} for p in ref]
    step = torch_peers.PEERS[name](torch, params, grads, group)
    for t in range(1, 7):
        step()
        for p, g, st in zip(ref, grads, states):
            rule.reference(p, g, st, group, t)
    for a, b in zip(params, ref):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
