"""Adafactor's grouped step (fastopt/backends/numba_factored_group.py, its Cython twin in
kernels/_cy_factored.pxi): one driver call
for the small tensors of a step gives the bits of the per-tensor path
(fastopt.factored.run_tensor with the Backend's per-tensor passes).

(a) grouped == per-tensor, bit for bit, on numba and cython (and Cython's grouped
    step == Numba's): mixed shapes (matrices, batched, (N, 1),
    (1, N), vectors, 0-d, empty, a float32 ``row_var`` longer than NumPy's cast
    buffer), float32 and float64 in one optimizer, two param groups with their own
    hyperparameters, tensors at different step counts (gradients left out), NaN and
    Inf, big tensors beside small ones (``PARALLEL_MIN`` lowered);
(b) the plan follows load_state_dict and add_param_group;
(c) the compiled helpers: NumPy's float64 mean of ``row_var`` and the 8-lane sums.
"""

import numpy as np
import pytest

import fastopt
from fastopt import factored

pytest.importorskip("numba")
from numba import njit  # noqa: E402

from fastopt import backends  # noqa: E402
from fastopt.backends import numba_cpu, numba_factored, numba_factored_group  # noqa: E402

BACKENDS = [b for b in ("numba", "cython") if b in backends.available()]


def _backend_class(name):
    if name == "cython":
        from fastopt.backends import cython
        return cython.CythonBackend
    return numba_cpu.NumbaBackend


@njit
def _np_sum(a, lo, n, bufsize):
    return numba_factored_group._np_sum(a, lo, n, bufsize)


@njit
def _lane_sumsq(x, n):
    return numba_factored._lane_sumsq(x, n)

SHAPES = [(12, 5), (5, 12), (3, 4, 6), (2, 1, 3, 5), (10,), (), (1, 9), (9, 1), (0, 3),
          (70, 131), (3, 9000, 2), (257,), (64, 8)]


def _data(shapes, dtypes, seed, steps):
    rng = np.random.default_rng(seed)
    ps = [np.asarray(rng.standard_normal(s) * np.exp(rng.standard_normal(s) * 3)).astype(d)
          for s, d in zip(shapes, dtypes)]
    gs = [[np.asarray(rng.standard_normal(s) * np.exp(rng.standard_normal(s) * 3)).astype(d)
           for s, d in zip(shapes, dtypes)] for _ in range(steps)]
    return ps, gs


def _run(monkeypatch, grouped, make, steps_of, backend="numba"):
    with monkeypatch.context() as m:
        if not grouped:
            m.delattr(_backend_class(backend), "factored_group")
        ps, opt = make()
        for gs in steps_of:
            opt.step(gs)
        return ps, opt


def _assert_same(a, b):
    (pa, oa), (pb, ob) = a, b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert x.tobytes() == y.tobytes(), f"param {i} {x.shape}"
        for n in ("row_var", "col_var", "variance"):
            if n in oa.state.get(i, {}):
                assert oa.state[i][n].tobytes() == ob.state[i][n].tobytes(), (i, n)
        assert oa.state.get(i, {}).get("step") == ob.state.get(i, {}).get("step")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", [{}, {"lr": 0.05, "weight_decay": 0.1, "maximize": True},
                                     {"beta2_decay": -0.5, "eps": (1e-5, 1e-2), "d": 2.0,
                                      "lr": 0.1}])
def test_grouped_equals_per_tensor(monkeypatch, backend, variant):
    dtypes = [np.float32 if k % 3 else np.float64 for k in range(len(SHAPES))]
    ps0, gs = _data(SHAPES, dtypes, 0, 4)
    gs[1][0] = None                       # tensor 0 one step behind the others
    gs[2][4] = None
    gs[2][2].reshape(-1)[5] = np.nan
    gs[3][7].reshape(-1)[0] = np.inf

    def make():
        ps = [p.copy() for p in ps0]
        return ps, fastopt.Adafactor(ps, backend=backend, **variant)
    grouped = _run(monkeypatch, True, make, gs, backend)
    _assert_same(grouped, _run(monkeypatch, False, make, gs, backend))
    if backend != "numba":                  # and the Cython twin gives Numba's bits
        _assert_same(grouped, _run(monkeypatch, True, lambda: (
            lambda ps: (ps, fastopt.Adafactor(ps, backend="numba", **variant)))(
                [p.copy() for p in ps0]), gs))


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_two_groups_and_big_tensors(monkeypatch, backend):
    monkeypatch.setattr(factored, "PARALLEL_MIN", 600)     # (70, 131) and (3, 9000, 2)
    dtypes = [np.float32] * len(SHAPES)
    ps0, gs = _data(SHAPES, dtypes, 1, 3)

    def make():
        ps = [p.copy() for p in ps0]
        return ps, fastopt.Adafactor(
            [{"params": ps[:6], "lr": 0.02, "weight_decay": 0.05},
             {"params": ps[6:], "eps": (1e-4, 1e-3), "maximize": True}], backend=backend)
    _assert_same(_run(monkeypatch, True, make, gs, backend),
                 _run(monkeypatch, False, make, gs, backend))


def test_plan_follows_load_state_dict_and_new_groups(monkeypatch):
    shapes = [(6, 5), (2, 3, 4), (7,)]
    ps0, gs = _data(shapes, [np.float64] * 3, 2, 6)
    extra0, egs = _data([(4, 9)], [np.float64], 3, 6)

    def make():
        ps = [p.copy() for p in ps0]
        return ps, fastopt.Adafactor(ps, backend="numba")
    _, src = _run(monkeypatch, False, make, gs[:3])
    sd = src.state_dict()

    def scenario(grouped):
        with monkeypatch.context() as m:
            if not grouped:
                m.delattr(numba_cpu.NumbaBackend, "factored_group")
            ps, opt = make()
            opt.step(gs[0])                       # a plan cached, then the state replaced
            opt.load_state_dict(sd)
            for g in gs[3:5]:
                opt.step(g)
            extra = [extra0[0].copy()]
            opt.add_param_group({"params": extra, "lr": 0.03})
            opt.step(gs[5] + egs[5])
            return ps + extra, opt
    _assert_same(scenario(True), scenario(False))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_np_sum_is_numpys_mean(dtype):
    rng = np.random.default_rng(4)
    bufsize = np.getbufsize() if dtype == np.float32 else 1 << 62
    for B, R in [(1, 1), (3, 7), (2, 8), (2, 9), (3, 128), (2, 129), (2, 300), (1, 8192),
                 (2, 8193), (2, 20000)]:
        rv = np.exp(rng.standard_normal((B, R)) * 8).astype(dtype)
        want = rv.mean(axis=1, dtype=np.float64)
        got = [_np_sum(rv.reshape(-1), b * R, R, bufsize) / R
               for b in range(B)]
        assert np.array(got).tobytes() == want.tobytes(), (B, R)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lane_sums_keep_the_lane_order(dtype):
    rng = np.random.default_rng(5)
    for n in [0, 1, 7, 8, 9, 16, 63, 256, 1001]:
        x = (rng.standard_normal(n + 1) * np.exp(rng.standard_normal(n + 1) * 6)).astype(dtype)
        x = x[1:]                                   # an unaligned start
        lanes = [0.0] * 8
        body = n - n % 8
        for i in range(body):
            lanes[i % 8] += float(x[i]) * float(x[i])
        want = sum(lanes[1:], lanes[0])
        for i in range(body, n):
            want += float(x[i]) * float(x[i])
        assert _lane_sumsq(x, n) == want, n
