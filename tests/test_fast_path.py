"""The small-step fast path (``Optimizer._step_fast``): after a full dense step, a step
whose gradients are plain ndarrays like last time skips the classification and
re-checks; everything it skips must still be caught when it matters.  Each test
arms the fast path with two ordinary steps first, then checks that the next step
behaves exactly as the full path does."""

import numpy as np
import pytest

import fastopt
from fastopt import RowSparse
from fastopt.backends.base import FMT_N

from conftest import CPU_BACKENDS


def _armed(backend, n=3, **hyper):
    ps = [np.zeros(50, np.float32) for _ in range(n)]
    gs = [np.full(50, 0.5, np.float32) for _ in range(n)]
    opt = fastopt.Adam(ps, lr=1e-2, backend=backend, **hyper)
    opt.step(gs)
    opt.step(gs)
    assert opt._fast is not None
    return opt, ps, gs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fast_steps_equal_full_steps(backend):
    opt, ps, gs = _armed(backend)
    ref_ps = [np.zeros(50, np.float32) for _ in range(3)]
    ref = fastopt.Adam(ref_ps, lr=1e-2, backend="numpy")
    ref.step(gs)
    ref.step(gs)
    rng = np.random.default_rng(0)
    for _ in range(5):
        for g in gs:                        # same buffers, new contents
            g[...] = rng.standard_normal(50)
        opt.step(gs)
        ref.step(gs)
    for a, b in zip(ps, ref_ps):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert opt.state_dict()["state"][0]["step"] == 7


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_moved_onto_state_is_refused(backend):
    opt, ps, gs = _armed(backend)
    before = [p.copy() for p in ps]
    bad = list(gs)
    bad[1] = opt._state[0]["exp_avg"]                   # a new address: re-checked
    with pytest.raises(ValueError, match="shares memory"):
        opt.step(bad)
    bad[1] = ps[2]
    with pytest.raises(ValueError, match="shares memory"):
        opt.step(bad)
    for a, b in zip(ps, before):
        np.testing.assert_array_equal(a, b)
    opt.step(gs)                                        # and back to normal


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_other_gradients_take_the_full_path(backend):
    opt, ps, gs = _armed(backend)
    opt.step([gs[0], None, gs[2]])                      # None: that parameter skipped
    assert [opt.state_dict()["state"][i]["step"] for i in range(3)] == [3, 2, 3]
    opt.step([gs[0].astype(np.float64), gs[1], gs[2]])  # converted
    opt.step([gs[0], RowSparse(np.array([1, 1]), np.ones((2,), np.float32)), gs[2]])
    with pytest.raises(ValueError):
        opt.step([gs[0], np.zeros(49, np.float32), gs[2]])
    with pytest.raises(ValueError):
        opt.step(gs[:2])
    assert [opt.state_dict()["state"][i]["step"] for i in range(3)] == [5, 4, 5]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_edits_are_seen(backend):
    opt, ps, gs = _armed(backend)
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        opt.step(gs)
    opt.param_groups[0]["lr"] = 0.0
    before = [p.copy() for p in ps]
    opt.step(gs)                                        # lr 0: nothing moves
    for a, b in zip(ps, before):
        np.testing.assert_array_equal(a, b)
    opt.param_groups[0]["max_norm"] = 0.01              # rows: the full path from now on
    opt.param_groups[0]["lr"] = 1.0
    opt.step(gs)
    assert all(np.abs(p).max() <= 0.01 * (1 + 1e-6) for p in ps)   # rows of 1-D: elements


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scale_and_skip_nonfinite_take_the_full_path(backend):
    opt, ps, gs = _armed(backend)
    before = [p.copy() for p in ps]
    bad = [g.copy() for g in gs]
    bad[2][3] = np.nan
    assert opt.step(bad, skip_nonfinite=True) is False
    for a, b in zip(ps, before):
        np.testing.assert_array_equal(a, b)
    assert opt.step(gs, grad_scale=2.0) is True
    assert opt.state_dict()["state"][0]["step"] == 3


@pytest.mark.parametrize("edit", ["setitem", "update", "setdefault", "params_item",
                                  "params_slice", "plain_dict", "list_betas"])
def test_every_kind_of_group_edit_is_seen(edit):
    """Groups count their edits (an unedited step checks them in O(1)); every way of
    editing a group, its params list or replacing it must still be seen."""
    opt, ps, gs = _armed("numpy")
    g = opt.param_groups[0]
    new = np.zeros(50, np.float32)
    if edit == "setitem":
        g["lr"] = -1.0
    elif edit == "update":
        g.update(lr=-1.0)
    elif edit == "setdefault":
        del g["weight_decay"]
        g.setdefault("weight_decay", -1.0)
    elif edit == "params_item":
        g["params"][1] = np.zeros(49, np.float32)      # wrong shape: refused
    elif edit == "params_slice":
        g["params"][:] = [new, np.zeros(49, np.float32), ps[2]]
    elif edit == "plain_dict":
        opt.param_groups[0] = dict(g, lr=-1.0)
    elif edit == "list_betas":
        g["betas"] = [0.9, 0.999]
        opt.step(gs)                                   # taken (normalized to a tuple)
        assert opt.param_groups[0]["betas"] == (0.9, 0.999)
        g["betas"] = [0.9, 2.0]
    with pytest.raises(ValueError):
        opt.step(gs)


@pytest.mark.parametrize("name", [n for n, r in fastopt.rules.RULES.items()
                                  if r.layout == "elementwise"])
def test_lean_launch_equals_the_full_path_bit_for_bit(name):
    """The lean launch (scalar rows packed straight into the cached plan's table)
    against the full path forced every step, for every element-wise rule (NAdam's
    host scalar included): two groups with their own hyperparameters, an lr edit
    half-way (a new plan and launch handle), many steps."""
    rule = fastopt.rules.RULES[name]
    rng = np.random.default_rng(1)
    init = [rng.standard_normal(40).astype(np.float32) for _ in range(4)]
    runs = []
    for lean in (True, False):
        ps = [p.copy() for p in init]
        opt = fastopt.CLASSES[name]([{"params": ps[:2]},
                                     {"params": ps[2:], "lr": 3e-3}],
                                    backend="numba", **rule.variants[-1])
        r = np.random.default_rng(2)
        gs = [np.empty(40, np.float32) for _ in range(4)]
        for t in range(12):
            for g in gs:
                g[...] = r.standard_normal(40)
            if t == 6:
                opt.param_groups[0]["lr"] *= 0.5
            if not lean:
                opt._fast = None              # the full path every step
            opt.step(gs)
        if lean:
            assert opt._fast is not None and opt._fast.lean
        runs.append((ps, opt.state_dict()["state"]))
    (pa, sa), (pb, sb) = runs
    for a, b in zip(pa, pb):
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))
    for i in sa:
        for k, v in sa[i].items():
            np.testing.assert_array_equal(np.asarray(v), np.asarray(sb[i][k]))


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lean_launch_runs_the_drivers_of_every_format(backend, dtype):
    """The CPU backends have one set of drivers for every storage format: a
    float32/float64 bucket is planned with its format table (chunks count blocks),
    launched lean, and steps exactly as the NumPy reference does."""
    rng = np.random.default_rng(3)
    init = [rng.standard_normal(n).astype(dtype) for n in (7, 300)]
    ps, ref_ps = [p.copy() for p in init], [p.copy() for p in init]
    opt = fastopt.Adam(ps, lr=1e-2, backend=backend)
    ref = fastopt.Adam(ref_ps, lr=1e-2, backend="numpy")
    for _ in range(6):
        gs = [rng.standard_normal(p.shape).astype(dtype) for p in ps]
        opt.step(gs)
        ref.step(gs)
    assert opt._fast is not None and opt._fast.lean
    (b, _), = opt._fast.launch
    assert b.fmt is not None and b.fmt.shape[0] == 2
    assert b.fmt[:, FMT_N].tolist() == [7, 300]
    assert b.chunks.tolist() == [[0, 0, 1], [1, 0, 1]]   # one block each
    tol = 1e-6 if dtype == np.float32 else 1e-12
    for a, r in zip(ps, ref_ps):
        np.testing.assert_allclose(a, r, rtol=tol, atol=tol)
