"""Storage options per param group, and empty sparse batches as steps.

``state_bits``, ``bf16_update`` and ``seed`` given in a param group (to the
constructor or ``add_param_group``) are that group's storage format: its state is
stored so, bit-identical to an optimizer given the option for the same parameter.
They were accepted and shown before, and silently ignored.  Once the group is
added they are fixed: an edit (or deletion) is refused with a message naming the
key, and nothing changes.  fastopt.torch, which has no storage options yet, refuses
them in a group instead of ignoring them.
"""

import numpy as np
import pytest

import fastopt
from fastopt import RowSparse

from conftest import CPU_BACKENDS

ml_dtypes = pytest.importorskip("ml_dtypes")
BF = np.dtype(ml_dtypes.bfloat16)
STORED = [b for b in CPU_BACKENDS if "state8" in fastopt.backends.capabilities()[b]]


def _grads(shapes, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(s).astype(np.float32) for s in shapes]
            for _ in range(steps)]


def _state_arrays(opt, i):
    return {k: v.copy() for k, v in opt.state_dict()["state"].get(i, {}).items()
            if isinstance(v, np.ndarray)}


@pytest.mark.parametrize("backend", STORED)
@pytest.mark.parametrize("how", ["constructor", "add_param_group"])
def test_group_state_bits_are_honoured(backend, how):
    """A group's state_bits store its state so, bit for bit as an optimizer given the
    option; the other group keeps the optimizer's."""
    shape = (8, 1024)
    a = np.zeros(shape, np.float32)
    b = np.zeros(shape, np.float32)
    c = np.zeros(shape, np.float32)
    if how == "constructor":
        opt = fastopt.Adam([{"params": [a]}, {"params": [b], "state_bits": 8},
                            {"params": [c], "state_bits": 16}], lr=1e-3, backend=backend)
    else:
        opt = fastopt.Adam([a], lr=1e-3, backend=backend)
        opt.add_param_group({"params": [b], "state_bits": 8})
        opt.add_param_group({"params": [c], "state_bits": 16})
    a1, b1, c1 = (np.zeros(shape, np.float32) for _ in range(3))
    ref = [fastopt.Adam([a1], lr=1e-3, backend=backend),
           fastopt.Adam([b1], lr=1e-3, backend=backend, state_bits=8),
           fastopt.Adam([c1], lr=1e-3, backend=backend, state_bits=16)]
    for g in _grads([shape] * 3, 5):
        opt.step(g)
        for o, gi in zip(ref, g):
            o.step([gi])
    for p, q in ((a, a1), (b, b1), (c, c1)):
        np.testing.assert_array_equal(p, q)
    assert _state_arrays(opt, 1)["exp_avg"].dtype == np.uint8
    assert _state_arrays(opt, 2)["exp_avg"].dtype == BF
    assert _state_arrays(opt, 0)["exp_avg"].dtype == np.float32
    assert [g["state_bits"] for g in opt.param_groups] == [None, 8, 16]


@pytest.mark.parametrize("backend", STORED)
@pytest.mark.parametrize("name", ["LAMB", "Muon"])
def test_whole_tensor_rules_take_group_state_bits(backend, name):
    """LAMB (a norm pass per bucket: one per storage format) and Muon (phase 1 per
    format) with a group of 8-bit and one of 16-bit state beside a float32 one:
    each parameter bit for bit as an optimizer given the option for it alone."""
    shape = (8, 1024)
    cls = fastopt.CLASSES[name]
    ps = [np.full(shape, 0.5, np.float32) for _ in range(3)]
    opt = cls([{"params": [ps[0]]}, {"params": [ps[1]], "state_bits": 8},
               {"params": [ps[2]], "state_bits": 16}], lr=1e-2, backend=backend)
    qs = [np.full(shape, 0.5, np.float32) for _ in range(3)]
    ref = [cls([q], lr=1e-2, backend=backend, state_bits=bits)
           for q, bits in zip(qs, (None, 8, 16))]
    for g in _grads([shape] * 3, 4):
        opt.step(g)
        for o, gi in zip(ref, g):
            o.step([gi])
    for p, q in zip(ps, qs):
        np.testing.assert_array_equal(p, q)
    assert not np.array_equal(ps[1], ps[2])      # the formats did differ
    slot = fastopt.rules.RULES[name].slots[0]
    assert [_state_arrays(opt, i)[slot].dtype for i in range(3)] == [np.float32, np.uint8, BF]


@pytest.mark.parametrize("backend", STORED)
def test_group_bf16_update_and_seed_are_honoured(backend):
    """bf16_update and seed in a group: the same bits as the optimizer-wide option
    for the same parameter (the stream key is the seed, the parameter's index and
    the step)."""
    shape = (4, 300)
    rng = np.random.default_rng(1)
    start = (rng.standard_normal(shape) * 0.1).astype(BF)
    grads = _grads([shape, shape], 6, seed=2)
    p0, p1 = start.copy(), start.copy()
    opt = fastopt.AdamW([{"params": [p0], "bf16_update": "kahan"},
                         {"params": [p1], "bf16_update": "stochastic", "seed": 7}],
                        lr=1e-2, backend=backend)
    q0, q1 = start.copy(), start.copy()
    r0 = fastopt.AdamW([q0, np.zeros(1, BF)], lr=1e-2, backend=backend, bf16_update="kahan")
    r1 = fastopt.AdamW([np.zeros(1, BF), q1], lr=1e-2, backend=backend,
                       bf16_update="stochastic", seed=7)
    for g0, g1 in grads:
        opt.step([g0, g1])
        r0.step([g0, None])
        r1.step([None, g1])
    np.testing.assert_array_equal(p0.view(np.uint16), q0.view(np.uint16))
    np.testing.assert_array_equal(p1.view(np.uint16), q1.view(np.uint16))
    assert "kahan" in "".join(_state_arrays(opt, 0))        # the compensation buffer
    # another seed is another stream
    p2 = start.copy()
    other = fastopt.AdamW([{"params": [np.zeros(1, BF)]},
                           {"params": [p2], "bf16_update": "stochastic", "seed": 8}],
                          lr=1e-2, backend=backend)
    for _, g1 in grads:
        other.step([None, g1])
    assert not np.array_equal(p2.view(np.uint16), p1.view(np.uint16))


@pytest.mark.parametrize("key,value", [("state_bits", 16), ("state_bits", 32),
                                       ("bf16_update", "stochastic"), ("seed", 3)])
@pytest.mark.parametrize("delete", [False, True])
def test_storage_edit_mid_run_is_refused_and_changes_nothing(key, value, delete):
    shape = (4, 1100)
    p = np.zeros(shape, BF)
    q = np.zeros(shape, np.float32)
    opt = fastopt.Adam([{"params": [p]}, {"params": [q], "state_bits": 8}], lr=1e-2)
    g = _grads([shape, shape], 2)
    opt.step(g[0])
    before = (p.copy(), q.copy(), opt.state_dict())
    gi = 1 if key == "state_bits" else 0
    if delete:
        del opt.param_groups[gi][key]
    else:
        opt.param_groups[gi][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[{gi}\]\['{key}'\].*fixed"):
        opt.step(g[1])
    np.testing.assert_array_equal(p.view(np.uint16), before[0].view(np.uint16))
    np.testing.assert_array_equal(q, before[1])
    # taking the edit back makes the optimizer usable again
    opt.param_groups[gi][key] = before[2]["param_groups"][gi][key]
    opt.step(g[1])
    assert opt.state_dict()["state"][1]["step"] == 2


def test_group_storage_is_checked_like_the_optimizers():
    p = np.zeros((4, 1100), np.float32)
    with pytest.raises(ValueError, match="Invalid state_bits: 4"):
        fastopt.Adam([{"params": [p], "state_bits": 4}])
    with pytest.raises(ValueError, match="bf16_update='kahan' applies to bfloat16"):
        fastopt.Adam([{"params": [p], "bf16_update": "kahan"}])
    with pytest.raises(ValueError, match="Invalid seed"):
        fastopt.Adam([{"params": [p], "seed": -1}])
    with pytest.raises(ValueError, match="state_bits=8 is not possible"):
        fastopt.RMSprop([{"params": [p], "state_bits": 8, "centered": True}])
    opt = fastopt.RMSprop([p])
    opt.add_param_group({"params": [np.zeros((4, 1100), np.float32)], "state_bits": 16})
    opt.param_groups[1]["centered"] = True             # the group's own bits are checked
    with pytest.raises(ValueError, match="state_bits=16 is not possible"):
        opt.step([np.ones_like(p), np.ones_like(p)])
    opt = fastopt.Adam([p], backend="numpy")
    n = len(opt.param_groups)
    with pytest.raises(ValueError, match="Invalid state_bits"):
        opt.add_param_group({"params": [np.zeros(3, np.float32)], "state_bits": 12})
    assert len(opt.param_groups) == n and len(opt._params) == 1


def test_state_dict_round_trips_group_storage(tmp_path):
    shape = (8, 600)
    a, b = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    opt = fastopt.Adam([{"params": [a]}, {"params": [b], "state_bits": 8}], lr=1e-3)
    grads = _grads([shape, shape], 6)
    for g in grads[:3]:
        opt.step(g)
    path = tmp_path / "ck.fastopt"
    fastopt.save(path, opt)
    a2, b2 = a.copy(), b.copy()
    other = fastopt.Adam([{"params": [a2]}, {"params": [b2], "state_bits": 8}], lr=1e-3)
    fastopt.load(path, other)
    for g in grads[3:]:
        opt.step(g)
        other.step(g)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    wrong = fastopt.Adam([{"params": [a.copy()]}, {"params": [b.copy()]}], lr=1e-3)
    before = wrong.state_dict()
    with pytest.raises(ValueError, match="param group 1 of the state_dict was saved with"):
        wrong.load_state_dict(opt.state_dict())
    assert wrong.state_dict()["state"] == before["state"]


def test_state_dict_without_group_storage_entries_loads():
    """A state dict of an earlier version (storage options only optimizer-wide)."""
    p = np.zeros((4, 1100), np.float32)
    opt = fastopt.Adam([p], state_bits=8)
    opt.step([np.ones_like(p)])
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        for k in ("state_bits", "bf16_update", "seed"):
            del g[k]
    other = fastopt.Adam([p.copy()], state_bits=8)
    other.load_state_dict(sd)
    assert other.param_groups[0]["state_bits"] == 8
    assert other.state_dict()["state"][0]["step"] == 1


def test_torch_adapter_takes_group_storage_options():
    """fastopt.torch runs the engine: storage options per group are honoured (and
    fixed once the group is added), as in the NumPy classes."""
    torch = pytest.importorskip("torch")
    import fastopt.torch as ft
    w = torch.nn.Parameter(torch.zeros(64, 64))
    v = torch.nn.Parameter(torch.zeros(64, 64))
    opt = ft.Adam([{"params": [w], "state_bits": 8}, {"params": [v]}])
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "seed": 1})
    assert opt.param_groups[2]["seed"] == 1
    w.grad = torch.ones(64, 64)
    v.grad = torch.ones(64, 64)
    opt.step()
    assert opt.state[w]["exp_avg"].dtype == torch.uint8          # 8-bit codes
    assert opt.state[v]["exp_avg"].dtype == torch.float32
    before = w.detach().clone()
    opt.param_groups[0]["bf16_update"] = "kahan"
    with pytest.raises(ValueError, match="bf16_update"):
        opt.step()
    assert torch.equal(w.detach(), before)


# --------------------------------------------------------- empty sparse batches

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_sparse_step_counts_in_exact_mode(backend):
    """Exact mode: an empty batch is a dense step with zero gradient, so momentum
    and weight decay move every row (before: dropped, the weight stayed 1.0)."""
    p = np.ones((3, 2))
    q = np.ones((3, 2))
    hyper = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
    opt = fastopt.SGD([p], sparse_mode="exact", backend=backend, **hyper)
    dense = fastopt.SGD([q], backend=backend, **hyper)
    steps = [RowSparse(np.array([1]), np.array([[0.5, -1.0]])),
             RowSparse(np.zeros(0, np.int64), np.zeros((0, 2))),
             RowSparse(np.array([0, 2]), np.array([[1.0, 2.0], [3.0, 4.0]])),
             RowSparse(np.zeros(0, np.int64), np.zeros((0, 2)))]
    for g in [steps[1]] + steps:
        opt.step([g])
        dense.step([_dense(g, q.shape)])
    opt.flush()
    np.testing.assert_allclose(p, q, rtol=1e-14, atol=1e-15)
    assert opt.state_dict()["state"][0]["step"] == 5


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_sparse_steps_follow_torch_sparse_adam(backend):
    """Lazy Adam on a stream with empty batches against torch.optim.SparseAdam (eps
    tiny, where SparseAdam's eps placement and Adam's agree): the step counts, and so
    the bias corrections, advance on empty batches."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p = rng.standard_normal((6, 3))
    t = torch.nn.Parameter(torch.from_numpy(p.copy()))
    opt = fastopt.Adam([p], lr=0.1, eps=1e-300, backend=backend)
    ref = torch.optim.SparseAdam([t], lr=0.1, eps=1e-300)
    for k in range(10):
        if k in (0, 3, 4):
            idx = np.zeros(0, np.int64)
        else:
            idx = rng.integers(0, 6, 3)
        vals = rng.standard_normal((idx.size, 3))
        opt.step([RowSparse(idx, vals)])
        t.grad = torch.sparse_coo_tensor(torch.from_numpy(idx)[None], torch.from_numpy(vals),
                                         (6, 3))
        ref.step()
        assert opt.state_dict()["state"][0]["step"] == ref.state[t]["step"]
    np.testing.assert_allclose(p, t.detach().numpy(), rtol=1e-10, atol=1e-12)


def _dense(g, shape):
    out = np.zeros(shape)
    np.add.at(out, g.indices, g.values)
    return out


# ------------------------------------------------- impossible loaded values

def _bad_state(edit):
    shape = (4, 1100)
    p = (np.random.default_rng(0).standard_normal(shape) * 0.1).astype(BF)
    opt = fastopt.Adam([p], lr=1e-3, state_bits=8, bf16_update="kahan")
    for g in _grads([shape], 3):
        opt.step(g)
    sd = opt.state_dict()
    st = sd["state"][0]
    edit(st)
    return opt, sd, p


@pytest.mark.parametrize("edit,match", [
    (lambda st: st["exp_avg_absmax"].__setitem__(0, -1.0), "block 0 has scale -1.0"),
    (lambda st: st["exp_avg_sq_absmax"].__setitem__(2, np.nan), "block 2 has scale nan"),
    (lambda st: st["exp_avg_absmax"].__setitem__(1, np.inf), "block 1 has scale inf"),
    (lambda st: st["kahan_comp"].__setitem__((0, 0), 1e30), "compensation up to"),
    (lambda st: st["kahan_comp"].__setitem__((1, 3), np.nan), "non-finite compensation"),
])
def test_impossible_stored_values_are_refused(edit, match):
    """Loading checked the arrays' shapes and dtypes, not their values: a negated
    scale flipped a block's moments, a NaN one turned 256 parameters NaN for good,
    a compensation of 1e30 was accepted."""
    opt, sd, p = _bad_state(edit)
    target = fastopt.Adam([p.copy()], lr=1e-3, state_bits=8, bf16_update="kahan")
    before = target.state_dict()
    with pytest.raises(ValueError, match=match):
        target.load_state_dict(sd)
    assert target.state_dict()["state"] == before["state"]


@pytest.mark.parametrize("bits", [None, 16])
def test_negative_second_moments_are_refused(bits):
    p = np.zeros((4, 1100), np.float32)
    opt = fastopt.Adam([p], state_bits=bits)
    opt.step([np.ones_like(p)])
    sd = opt.state_dict()
    v = sd["state"][0]["exp_avg_sq"]
    v[0, 0] = -1.0
    other = fastopt.Adam([p.copy()], state_bits=bits)
    with pytest.raises(ValueError, match="negative values in a non-negative slot"):
        other.load_state_dict(sd)
    sd["state"][0]["exp_avg_sq"][0, 0] = np.nan         # IEEE NaN propagation: possible
    other.load_state_dict(sd)


def test_legitimate_kahan_state_loads_into_fresh_parameters():
    """The compensation bound has slack for parameters restored after the optimizer
    state (a fresh initialization of another scale)."""
    opt, sd, p = _bad_state(lambda st: None)
    fresh = (np.random.default_rng(5).standard_normal(p.shape) * 0.02).astype(BF)
    fastopt.Adam([fresh], lr=1e-3, state_bits=8, bf16_update="kahan").load_state_dict(sd)


# ------------------------------------------------------- groups of named params

def test_named_parameters_take_named_groups():
    """An optimizer of named parameters took a list group, then every step by name
    failed with "gather_grads: inconsistent sizes"."""
    a, b = np.zeros(3, np.float32), np.zeros(2, np.float32)
    opt = fastopt.Adam({"a": a}, lr=0.1)
    with pytest.raises(TypeError, match="as a dict name -> array"):
        opt.add_param_group({"params": [b]})
    with pytest.raises(ValueError, match="already taken"):
        opt.add_param_group({"params": {"a": b}})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": {"b": b}, "lr": 0.5})
    opt.step({"a": np.ones(3, np.float32), "b": np.ones(2, np.float32)})
    assert opt.state_dict()["param_names"] == ["a", "b"]
    np.testing.assert_allclose(a, -0.1, rtol=1e-6)
    np.testing.assert_allclose(b, -0.5, rtol=1e-6)
    with pytest.raises(ValueError, match="empty parameter dict"):
        fastopt.Adam({})


def test_a_group_copied_from_param_groups_is_taken():
    """Groups carry their storage options; a copy given to another optimizer (float32
    parameters, bf16_update 'split') is taken."""
    opt = fastopt.Adam([np.zeros(3, np.float32)])
    g = dict(opt.param_groups[0], params=[np.zeros(4, np.float32)])
    other = fastopt.Adam([np.zeros(2, np.float32)])
    other.add_param_group(g)
    assert other.param_groups[1]["bf16_update"] == "split"


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None, derandomize=True)
@given(which=st.sampled_from(["exp_avg_absmax", "exp_avg_sq_absmax", "kahan_comp",
                              "exp_avg_sq"]),
       value=st.sampled_from([-1.0, -1e-30, np.nan, np.inf, -np.inf, 1e30]),
       where=st.integers(0, 10 ** 6))
def test_any_impossible_stored_value_is_refused(which, value, where):
    """The class of the unchecked scales: any value that no step can produce, in any
    scale, compensation or non-negative slot, is refused, and nothing changes."""
    shape = (4, 1100)
    p = (np.random.default_rng(0).standard_normal(shape) * 0.1).astype(BF)
    bits = None if which == "exp_avg_sq" else 8
    opt = fastopt.Adam([p], lr=1e-3, state_bits=bits, bf16_update="kahan")
    opt.step([np.ones(shape, np.float32)])
    sd = opt.state_dict()
    a = sd["state"][0][which]
    flat = a.reshape(-1)
    k = where % flat.size
    impossible = {"exp_avg_absmax": lambda v: not (np.isfinite(v) and v >= 0),
                  "exp_avg_sq_absmax": lambda v: not (np.isfinite(v) and v >= 0),
                  "kahan_comp": lambda v: not np.isfinite(v) or abs(v) > 1e-2,
                  "exp_avg_sq": lambda v: v < 0}[which](value)
    flat[k] = value
    target = fastopt.Adam([p.copy()], lr=1e-3, state_bits=bits, bf16_update="kahan")
    before = target.state_dict()
    if impossible:
        with pytest.raises(ValueError):
            target.load_state_dict(sd)
        assert target.state_dict()["state"] == before["state"]
    else:
        target.load_state_dict(sd)
