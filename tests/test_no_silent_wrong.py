"""Regression tests for results that used to be silently wrong (or hang, or crash).

Each case gives the right answer or a clear error with nothing changed, on every
host backend.
"""

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import fastopt
from fastopt import RowSparse, rules

from conftest import CPU_BACKENDS

#: every test here runs in .ci/run's boundscheck lane (NUMBA_BOUNDSCHECK=1)
pytestmark = pytest.mark.boundscheck


def _snapshot(opt, params):
    return ([p.copy() for p in params],
            {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
             for i, st in opt.state.items()})


def _assert_unchanged(opt, params, snap):
    ps, st = snap
    for a, b in zip(params, ps):
        np.testing.assert_array_equal(a, b)
    now = opt.state
    assert set(now) == set(st)
    for i in st:
        for k, v in st[i].items():
            np.testing.assert_array_equal(now[i][k], v)


# ------------------------------------------------------------ 1. stale step counts

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,hyper", [("Adam", {}), ("NAdam", {}), ("Adamax", {}),
                                        ("Adagrad", {"lr_decay": 0.1}), ("AdamW", {})])
def test_step_counts_after_sparse_only_step(backend, name, hyper):
    """a advances through a sparse-only step, b does not: b's next dense step must
    use b's own step count (bias correction, lr decay, NAdam's mu_product)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 3)), rng.standard_normal((5, 3))
    b_alone = b.copy()
    Ga, Gb = rng.standard_normal(a.shape), rng.standard_normal(b.shape)
    cls = fastopt.CLASSES[name]
    opt = cls([a, b], backend=backend, **hyper)
    ref = cls([b_alone], backend="numpy", **hyper)
    for _ in range(2):
        opt.step([Ga, Gb])
        ref.step([Gb])
    opt.step([RowSparse(np.arange(4), rng.standard_normal((4, 3))), None])
    opt.step([Ga, Gb])
    ref.step([Gb])
    np.testing.assert_allclose(b, b_alone, rtol=1e-12, atol=1e-15)
    assert opt.state[1]["step"] == 3 and opt.state[0]["step"] == 4
    if name == "NAdam":
        assert opt.state[1]["mu_product"] == pytest.approx(ref.state[0]["mu_product"],
                                                           rel=1e-15)


# ------------------------------------------------------------ 2. param-group edits

def test_edit_that_compares_equal_is_checked():
    p = np.zeros(4)
    opt = fastopt.SGD([p], lr=1.0)
    opt.param_groups[0]["lr"] = True           # == 1.0, but not a number
    snap = _snapshot(opt, [p])
    with pytest.raises(ValueError, match="lr"):
        opt.step([np.ones(4)])
    _assert_unchanged(opt, [p], snap)


def test_in_place_list_edits_are_checked_and_used():
    p, q = np.ones(5), np.ones(5)
    opt = fastopt.Adam([p], betas=[0.9, 0.999])
    betas = [0.9, 0.999]
    opt.param_groups[0]["betas"] = betas
    betas[0] = 5.0                              # in place, invalid
    with pytest.raises(ValueError, match="betas"):
        opt.step([np.ones(5)])
    np.testing.assert_array_equal(p, 1.0)
    betas[0] = 0.5                              # in place, valid: must be used
    opt.step([np.full(5, 0.3)])
    opt.step([np.full(5, -0.1)])
    ref = fastopt.Adam([q], betas=(0.5, 0.999))
    ref.step([np.full(5, 0.3)])
    ref.step([np.full(5, -0.1)])
    np.testing.assert_array_equal(p, q)


def test_replaced_parameter_is_the_one_updated():
    old, new = np.zeros(3), np.zeros(3)
    opt = fastopt.SGD([old], lr=0.5)
    opt.param_groups[0]["params"][0] = new
    opt.step([np.ones(3)])
    np.testing.assert_array_equal(old, 0.0)
    np.testing.assert_array_equal(new, -0.5)
    opt.param_groups[0]["params"][0] = np.zeros(4)
    with pytest.raises(ValueError, match="replaced"):
        opt.step([np.ones(3)])


def test_saved_edit_round_trips(tmp_path):
    p = np.zeros(4)
    opt = fastopt.SGD([p], lr=1.0)
    opt.param_groups[0]["lr"] = True
    with pytest.raises(ValueError):
        fastopt.save(tmp_path / "ck", opt)
    opt.param_groups[0]["lr"] = 0.5
    fastopt.save(tmp_path / "ck", opt)
    fastopt.load(tmp_path / "ck", opt)


# ---------------------------------------------------------------- 3. aliasing

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "NAdam", "Lion", "SGD"])
def test_gradient_that_is_the_parameter_is_refused(backend, name):
    buf = np.linspace(-1, 1, 41)
    p = buf[:40]
    opt = fastopt.CLASSES[name]([p], backend=backend, lr=0.1)
    opt.step([np.ones_like(p)])
    snap = _snapshot(opt, [p])
    for alias in (p, p.view(), buf[1:]):       # itself, a view, a shifted overlap
        with pytest.raises(ValueError, match="shares memory"):
            opt.step([alias])
    _assert_unchanged(opt, [p], snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradient_that_is_state_or_another_parameter_is_refused(backend):
    p, q = np.ones((8, 2)), np.ones((8, 2))
    opt = fastopt.Adam([p, q], backend=backend)
    opt.step([np.ones_like(p), np.ones_like(q)])
    snap = _snapshot(opt, [p, q])
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([opt._state[0]["exp_avg"], np.ones_like(q)])
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([q, np.ones_like(q)])
    with pytest.raises(ValueError, match="shares memory"):
        opt.step([RowSparse(np.arange(8), p), None])
    _assert_unchanged(opt, [p, q], snap)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n", [3, 40])
def test_alias_among_many_gradients_is_refused(backend, n):
    """The alias check searches in Python for a few gradients and with NumPy for
    many (more than 16): both find an alias at any position, dense or sparse."""
    ps = [np.ones((4, 3)) for _ in range(n)]
    opt = fastopt.Adam(ps, backend=backend)
    ok = [np.ones_like(p) for p in ps]
    opt.step(ok)
    snap = _snapshot(opt, ps)
    for k in (0, n // 2, n - 1):
        for bad in (ps[(k + 1) % n], opt._state[k]["exp_avg_sq"],
                    RowSparse(np.arange(4), ps[k - 1])):
            grads = list(ok)
            grads[k] = bad
            with pytest.raises(ValueError, match=f"gradient {k} shares memory"):
                opt.step(grads)
    _assert_unchanged(opt, ps, snap)
    opt.step(ok)                               # and no false alarm either way


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_functional_aliases_are_refused(backend):
    p = np.ones(6)
    m, v = np.zeros(6), np.zeros(6)
    with pytest.raises(ValueError, match="shares memory"):
        fastopt.functional.adamw_(p, p, m, v, step=1, backend=backend)
    with pytest.raises(ValueError, match="shares memory"):
        fastopt.functional.adamw_(p, m, m, v, step=1, backend=backend)
    with pytest.raises(ValueError, match="overlaps"):
        fastopt.functional.adamw_(p, np.ones(6), m, m, step=1, backend=backend)
    np.testing.assert_array_equal(p, 1.0)


# ------------------------------------------------------------- 4. strict loading

def test_state_is_matched_by_name():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(3), rng.standard_normal(3)
    opt = fastopt.Adam({"a": a, "b": b}, lr=0.1)
    opt.step({"a": np.ones(3), "b": -np.ones(3)})
    sd = opt.state_dict()
    a2, b2 = a.copy(), b.copy()
    other = fastopt.Adam({"b": b2, "a": a2}, lr=0.1)       # another order
    other.load_state_dict(sd)
    np.testing.assert_array_equal(other.state[0]["exp_avg"], opt.state[1]["exp_avg"])
    np.testing.assert_array_equal(other.state[1]["exp_avg"], opt.state[0]["exp_avg"])
    for o in (opt, other):
        o.step({"a": np.ones(3), "b": -np.ones(3)})
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    wrong = fastopt.Adam({"a": a.copy(), "c": b.copy()}, lr=0.1)
    with pytest.raises(ValueError, match="names"):
        wrong.load_state_dict(sd)


@pytest.mark.parametrize("edit,match", [
    (lambda st: st.pop("step"), "step"),
    (lambda st: st.pop("exp_avg_sq"), "missing"),
    (lambda st: st.pop("mu_product"), "missing"),
    (lambda st: st.__setitem__("mu_product", float("nan")), "mu_product"),
    (lambda st: st.__setitem__("mu_product", 0.0), "mu_product"),
    (lambda st: st.__setitem__("step", 2 ** 63 - 1), "step"),
    (lambda st: st.__setitem__("step", -1), "step"),
])
def test_incomplete_or_bad_state_is_refused(edit, match):
    p = np.ones(4)
    opt = fastopt.NAdam([p])
    opt.step([np.ones(4)])
    sd = opt.state_dict()
    edit(sd["state"][0])
    snap = _snapshot(opt, [p])
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    _assert_unchanged(opt, [p], snap)


def test_bad_state_key_is_a_clear_error():
    opt = fastopt.SGD([np.ones(2)], lr=0.1)
    sd = opt.state_dict()
    sd["state"] = {"x": {"step": 1}}
    with pytest.raises(ValueError, match="parameter indices"):
        opt.load_state_dict(sd)


def test_refused_load_in_exact_mode_changes_nothing(tmp_path):
    p = np.ones((6, 2))
    opt = fastopt.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.1, sparse_mode="exact")
    opt.step([RowSparse(np.array([0]), np.ones((1, 2)))])
    fastopt.save(tmp_path / "ck", opt)
    other = fastopt.SGD([np.ones((5, 2))], lr=0.1, momentum=0.9, weight_decay=0.1,
                        sparse_mode="exact")
    other.step([np.ones((5, 2))])           # its state has another shape
    opt.step([RowSparse(np.array([1]), np.ones((1, 2)))])
    before = p.copy()          # rows 2..5 are behind (pending decay)
    bad = tmp_path / "other"
    fastopt.save(bad, other)
    with pytest.raises(ValueError):
        fastopt.load(bad, opt)
    np.testing.assert_array_equal(p, before)     # nothing flushed


# -------------------------------------------------------- 5. loss scale vs dtype

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_grad_scale_outside_the_dtype_is_refused(backend):
    p = np.ones(5, np.float32)
    opt = fastopt.Adam([p], backend=backend)
    for bad in (1e-50, 1e50):
        with pytest.raises(ValueError, match="grad_scale"):
            opt.step([np.ones(5, np.float32)], grad_scale=bad)
    np.testing.assert_array_equal(p, 1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_skip_nonfinite_checks_the_scaled_gradient(backend):
    p = np.ones(5, np.float32)
    opt = fastopt.Adam([p], backend=backend)
    g = np.full(5, 3e38, np.float32)          # finite, but g / 0.5 is inf in float32
    assert opt.step([g], grad_scale=0.5, skip_nonfinite=True) is False
    np.testing.assert_array_equal(p, 1.0)
    assert opt.step([g], grad_scale=4.0, skip_nonfinite=True) is True


# --------------------------------------------------------------- 6. smaller ones

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_rowwise_adagrad_with_empty_rows(backend):
    p = np.zeros((4, 0))
    opt = fastopt.RowWiseAdagrad([p], backend=backend, initial_accumulator_value=0.5)
    opt.step([RowSparse(np.array([1, 2]), np.zeros((2, 0)))])
    opt.step([np.zeros((4, 0))])
    assert np.all(opt.state[0]["sum"] == 0.5)


def test_clip_norm_does_not_depend_on_blas_threads():
    code = textwrap.dedent("""
        import numpy as np, fastopt
        rng = np.random.default_rng(5)
        gs = [rng.standard_normal(n) for n in (3, 100_000, 1_000_003)]
        gs += [rng.standard_normal(70_001).astype(np.float32)]
        print(repr(fastopt.clip_grad_norm_(gs, 1.0)))
    """)
    outs = set()
    for threads in ("1", "2"):
        env = {**os.environ, "OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads,
               "NUMBA_NUM_THREADS": threads}
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                capture_output=True, text=True).stdout)
    assert len(outs) == 1, outs


# ------------------------------------- 7. serial code cached for parallel drivers

@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
@pytest.mark.exclusive
def test_large_step_runs_parallel_after_a_small_one(tmp_path):
    """A small (serial) step compiled first must not make later large steps serial,
    in this process or, through the disk cache, in the next.  Measured as process
    CPU time over wall time during large steps (1.0 means one thread)."""
    code = textwrap.dedent("""
        import os, time, numpy as np, fastopt
        small = np.zeros(10, np.float32)
        fastopt.Adam([small]).step([np.ones(10, np.float32)])
        big = np.zeros(4_000_000, np.float32)
        g = np.ones_like(big)
        opt = fastopt.Adam([big])
        opt.step([g])
        best = 0.0
        for _ in range(4):                      # the least disturbed of a few windows
            t0, c0 = time.perf_counter(), os.times()
            while time.perf_counter() - t0 < 0.3:
                opt.step([g])
            c1 = os.times()
            wall = time.perf_counter() - t0
            best = max(best, (c1.user + c1.system - c0.user - c0.system) / wall)
        print(best)
    """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "2"}
    for _ in range(2):          # the second process loads the first one's cache
        out = subprocess.run([sys.executable, "-c", code], env=env, check=True,
                             capture_output=True, text=True, timeout=300).stdout
        assert float(out) > 1.2, out


# ------------------------------------------------------------------ 9. fork

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forked_child_can_step(backend):
    code = textwrap.dedent(f"""
        import os, sys, numpy as np, fastopt
        p = np.zeros(200_000, np.float32)
        opt = fastopt.Adam([p], backend={backend!r})
        opt.step([np.ones_like(p)])                 # a parallel step in the parent
        pid = os.fork()
        if pid == 0:
            opt.step([np.ones_like(p)], skip_nonfinite=True)
            fastopt.clip_grad_norm_([p], 1.0)
            os._exit(0 if opt.state[0]["step"] == 2 else 3)
        _, status = os.waitpid(pid, 0)
        opt.step([np.ones_like(p)])                 # the parent still steps in parallel
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr


def test_serial_kernels_never_load_a_cached_parallel_build(tmp_path):
    """Kernels with a parallel and a serial build (clip's block sums, the sharded
    optimizer's rank mean): a process that ran only the parallel builds fills a fresh
    cache; a forked child of the next process must get serial builds from it (two
    njit wrappers of one function shared cache entries: the child loaded the
    parallel build and OpenMP aborted it)."""
    fill = textwrap.dedent("""
        import numpy as np
        from fastopt import clip
        from fastopt.distributed import collectives
        clip._block_sums(np.ones(300_000, np.float32), 2.0)
        collectives._mean_parallel(np.ones(10_000), 2, 0, 10_000, 0, np.ones(10_000))
    """)
    use = textwrap.dedent("""
        import os, sys, numpy as np, fastopt
        from fastopt.distributed import collectives
        p = np.ones(300_000, np.float32)
        fastopt.clip_grad_norm_([p], 1.0)          # parallel in the parent
        pid = os.fork()
        if pid == 0:
            fastopt.clip_grad_norm_([np.ones(300_000, np.float32)], 1.0)
            out = np.ones(10_000)
            collectives._mean_serial(np.ones(10_000), 2, 0, 10_000, 0, out)
            os._exit(0 if out[0] == 1.0 else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_NUM_THREADS": "2"}
    for code in (fill, use):
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr


# ------------------------------------------------------- 10. concurrent steps

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_steps_from_two_threads_are_serialized(backend):
    p, q = np.zeros(50_000), np.zeros(50_000)
    g = np.linspace(-1, 1, 50_000)
    opt = fastopt.Adam([p], backend=backend)
    ref = fastopt.Adam([q], backend=backend)

    def work():
        for _ in range(20):
            opt.step([g])
    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for _ in range(40):
        ref.step([g])
    assert opt.state[0]["step"] == 40
    np.testing.assert_array_equal(p, q)


# --------------------------------------------------------------- unclear errors

def test_clear_errors():
    p, q = np.ones(3), np.ones(3)
    with pytest.raises(ValueError, match="weight_decay"):
        fastopt.SGD([p], lr=0.1, weight_decay=10 ** 400)
    opt = fastopt.SGD([p, q], lr=0.1)
    with pytest.raises(TypeError, match="generator"):
        opt.step([(x for x in range(3)), np.ones(3)])
    with pytest.raises(TypeError, match="list"):
        opt.step(np.ones((2, 3)))          # not silently split into rows
    with pytest.raises(ValueError, match="step"):
        fastopt.functional.sgd_(p, np.ones(3), step=2 ** 64, lr=0.1)
    np.testing.assert_array_equal(p, 1.0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,hyper", [("Adagrad", {}), ("RMSprop", {})])
def test_exact_catch_up_keeps_infinite_state_out_of_the_parameter(backend, name, hyper):
    """An Inf accumulator must not turn a caught-up parameter into NaN (0 * Inf):
    exact mode equals the dense reference, as lazy mode does here."""
    def run(bk, mode):
        p = np.ones((3, 2), np.float32)
        opt = fastopt.CLASSES[name]([p], backend=bk, sparse_mode=mode, lr=0.1, **hyper)
        huge = RowSparse(np.array([0]), np.full((1, 2), 1e20, np.float32))
        other = RowSparse(np.array([1]), np.ones((1, 2), np.float32))
        with np.errstate(all="ignore"):
            for g in (huge, other, other, huge):
                opt.step([g])
            opt.flush()
        return p
    np.testing.assert_array_equal(run(backend, "exact"), run("numpy", "exact"))
    assert not np.isnan(run(backend, "exact")).any()
