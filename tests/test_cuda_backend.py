"""The CUDA backend, on a GPU or in numba's CUDA simulator.

Runs where numba-cuda is installed and either a GPU is present or the simulator is
on.  The simulator must be chosen before numba.cuda is first imported, so CI runs
this file in its own process::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_backend.py

In the normal ``python -m pytest`` run (no GPU, no simulator) the file is skipped.
Tensors are tiny and steps few (the simulator runs one Python thread per CUDA
thread); the block size is forced to 32, chunks to 64 elements and the grid to a few
blocks, so launches have several blocks and the grid-stride loops wrap.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

if importlib.util.find_spec("numba_cuda") is None:
    pytest.skip("numba-cuda is not installed (pip install 'fastopt[cuda]')",
                allow_module_level=True)

from numba import cuda  # noqa: E402

if not cuda.is_available():
    pytest.skip("no CUDA GPU here; run this file with NUMBA_ENABLE_CUDASIM=1 set to use "
                "numba's CUDA simulator", allow_module_level=True)

import fastopt  # noqa: E402
from fastopt import _cuda_backend as cb  # noqa: E402
from fastopt import backends, registry  # noqa: E402

from conftest import DTYPES, awkward_grads, init_params, reference_run, rule_cases  # noqa: E402

SIM = bool(cb._load() and cb._SIM)
SHAPES = [(7,), (33, 5), (300,)]
STEPS = 8
RTOL = {np.float32: 2e-5, np.float64: 1e-11}


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    cb.register_backend()
    monkeypatch.setattr(cb, "BLOCK_SIZE", 32)
    monkeypatch.setattr(cb, "CHUNK", 64)
    monkeypatch.setattr(cb, "MAX_BLOCKS", 3)
    yield


# ------------------------------------------------------------------ helpers

def dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def host(a):
    return a.copy_to_host()


class Exported:
    """A foreign device array (like a CuPy array or a torch CUDA tensor): it exposes
    ``__cuda_array_interface__`` and nothing else.  In the simulator its "device"
    memory is a host buffer (the simulator's device memory is host memory too)."""

    def __init__(self, a, readonly=False, step=1):
        if SIM:
            self._buf = np.array(a, copy=True)
            view = self._buf[::step] if step != 1 else self._buf
            ptr, strides = view.ctypes.data, (None if step == 1 else view.strides)
            shape, typestr = view.shape, view.dtype.str
        else:
            self._buf = cuda.to_device(np.ascontiguousarray(a))
            view = self._buf[::step] if step != 1 else self._buf
            cai = view.__cuda_array_interface__
            ptr, strides, shape, typestr = cai["data"][0], cai["strides"], cai["shape"], \
                cai["typestr"]
        self._view = view
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                         "data": (ptr, readonly), "strides": strides,
                                         "version": 3}

    def numpy(self):
        return np.array(self._view) if SIM else self._view.copy_to_host()


def assert_close(got, want, dtype, err_msg=""):
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * scale,
                               err_msg=err_msg)


def assert_states_close(opt, exp_states, dtype, steps):
    sd = opt.state_dict()
    for i, st in enumerate(exp_states):
        got = sd["state"][i]
        assert got["step"] == steps
        for key, val in st.items():
            if isinstance(val, np.ndarray):
                assert isinstance(got[key], np.ndarray), "state_dict must hold host arrays"
                assert got[key].dtype == val.dtype
                assert_close(got[key], val, dtype, err_msg=key)
            else:
                assert got[key] == pytest.approx(val, rel=1e-12), key


# ---------------------------------------------------- every rule vs reference

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name,k", rule_cases())
def test_matches_reference(name, k, dtype):
    rule = registry.RULES[name]
    variant = rule.variants[k]
    params = init_params(SHAPES, dtype)
    grads_seq = awkward_grads(SHAPES, dtype, STEPS)
    expected, exp_states = reference_run(rule, variant, params, grads_seq)
    dparams = [dev(p) for p in params]
    opt = fastopt.CLASSES[name](dparams, backend="cuda", **variant)
    assert opt.backend.name == "cuda"
    for grads in grads_seq:
        assert opt.step([dev(g) for g in grads]) is True
    for d, e, p0 in zip(dparams, expected, params):
        got = host(d)
        assert got.dtype == np.dtype(dtype) and got.shape == p0.shape
        assert_close(got, e, dtype)
        assert not np.array_equal(got, p0), "the step changed nothing"
    assert_states_close(opt, exp_states, dtype, STEPS)


@pytest.mark.parametrize("name", ["Adam", "SGD", "RMSprop", "Adagrad"])
def test_host_gradients_are_copied_to_the_device(name):
    """Gradients may be host arrays (copied each step), also of another float dtype;
    device gradients of another float dtype are cast on the device."""
    rule = registry.RULES[name]
    variant = rule.variants[-1]
    dtype = np.float32
    params = init_params(SHAPES, dtype)
    grads_seq = awkward_grads(SHAPES, np.float64, 4, seed=3)
    expected, exp_states = reference_run(
        rule, variant, params, [[g.astype(dtype) for g in gs] for gs in grads_seq])
    dparams = [dev(p) for p in params]
    opt = fastopt.CLASSES[name](dparams, backend="cuda", **variant)
    for t, gs in enumerate(grads_seq):
        if t % 2 == 0:
            given = [gs[0].astype(dtype), gs[1], gs[2]]      # host: float32, float64, float64
        else:
            given = [dev(g) for g in gs]                       # device float64: cast there
        opt.step(given)
    for d, e in zip(dparams, expected):
        assert_close(host(d), e, dtype)
    assert_states_close(opt, exp_states, dtype, 4)


def test_float16_device_gradient_is_cast_on_the_device():
    p = init_params([(50,)], np.float32)[0]
    g16 = (np.arange(50, dtype=np.float32) / 7).astype(np.float16)
    expected, _ = reference_run(registry.RULES["SGD"], {"lr": 0.5}, [p], [[g16.astype(np.float32)]])
    dp = dev(p)
    fastopt.SGD([dp], lr=0.5, backend="cuda").step([dev(g16)])
    np.testing.assert_array_equal(host(dp), expected[0])


class LaunchCounter:
    """Wraps ``cb.kernel_for`` and counts launches per kernel kind."""

    def __init__(self, monkeypatch):
        self.launches = {}
        real = cb.kernel_for

        def counting(kind, *args):
            kernel = real(kind, *args)
            counter = self

            class Counted:
                def __getitem__(self, config):
                    launch = kernel[config]

                    def call(*a):
                        counter.launches[kind] = counter.launches.get(kind, 0) + 1
                        return launch(*a)
                    return call
            return Counted()

        monkeypatch.setattr(cb, "kernel_for", counting)


def test_multi_tensor_launch_groups_and_dtypes(monkeypatch):
    """Twelve tensors (an empty and a one-element one among them), two param groups
    with their own lr (two scalar rows in one bucket) and two dtypes (two buckets):
    one launch per bucket and step; chunks of 16 elements over a grid of 2 blocks, so
    blocks take several chunks of several tensors."""
    monkeypatch.setattr(cb, "CHUNK", 16)
    monkeypatch.setattr(cb, "MAX_BLOCKS", 2)
    shapes32 = [(1,), (0,), (130,), (9, 4), (3,), (17,), (2, 3), (40,), (5,), (16,)]
    shapes64 = [(70,), (2, 2)]
    p32 = init_params(shapes32, np.float32, seed=4)
    p64 = init_params(shapes64, np.float64, seed=5)
    g32 = awkward_grads(shapes32, np.float32, 3, seed=6)
    g64 = awkward_grads(shapes64, np.float64, 3, seed=7)
    rule = registry.RULES["Adam"]
    e_a, _ = reference_run(rule, {"lr": 0.1}, p32[:3], [g[:3] for g in g32])
    e_b, _ = reference_run(rule, {"lr": 0.02}, p32[3:] + p64,
                           [a[3:] + b for a, b in zip(g32, g64)])
    d32, d64 = [dev(p) for p in p32], [dev(p) for p in p64]
    opt = fastopt.Adam([{"params": d32[:3], "lr": 0.1}, {"params": d32[3:] + d64, "lr": 0.02}],
                       backend="cuda")
    counter = LaunchCounter(monkeypatch)
    for a, b in zip(g32, g64):
        opt.step([dev(g) for g in a + b])
    assert counter.launches == {"dense": 2 * 3}, counter.launches
    for d, e in zip(d32 + d64, e_a + e_b):
        assert_close(host(d), e, e.dtype.type)


def test_dict_params_and_none_gradient_skips():
    params = {"w": init_params([(20,)], np.float32)[0], "b": init_params([(3,)], np.float32)[0]}
    dparams = {k: dev(v) for k, v in params.items()}
    opt = fastopt.SGD(dparams, lr=0.1, momentum=0.9, backend="cuda")
    opt.step({"w": dev(np.ones(20, np.float32)), "b": None})
    np.testing.assert_array_equal(host(dparams["b"]), params["b"])
    np.testing.assert_allclose(host(dparams["w"]), params["w"] - 0.1, rtol=1e-6)
    sd = opt.state_dict()
    assert sd["state"][0]["step"] == 1 and 1 not in sd["state"]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the simulator computes with NumPy
@pytest.mark.parametrize("name", ["Adam", "Adamax", "Lion"])
def test_nonfinite_gradients_propagate(name):
    rule = registry.RULES[name]
    p = init_params([(40,)], np.float64)[0]
    g = np.ones(40)
    g[3], g[10], g[20] = np.nan, np.inf, -np.inf
    expected, _ = reference_run(rule, {}, [p], [[g], [np.ones(40)]])
    dp = dev(p)
    opt = fastopt.CLASSES[name]([dp], backend="cuda")
    opt.step([dev(g)])
    opt.step([dev(np.ones(40))])
    got = host(dp)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(expected[0]))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(expected[0]))
    fin = np.isfinite(expected[0])
    np.testing.assert_allclose(got[fin], expected[0][fin], rtol=1e-12)


# ------------------------------------------------------------- device arrays

def test_foreign_device_arrays_are_updated_in_place_and_auto_picks_cuda():
    """Objects exposing only __cuda_array_interface__ (CuPy, torch) are viewed without
    a copy; backend='auto' picks cuda for them."""
    params = init_params(SHAPES, np.float32)
    grads_seq = awkward_grads(SHAPES, np.float32, 3)
    expected, _ = reference_run(registry.RULES["AdamW"], {}, params, grads_seq)
    exported = [Exported(p) for p in params]
    opt = fastopt.AdamW(exported, backend="auto")
    assert opt.backend.name == "cuda"
    for gs in grads_seq:
        opt.step([Exported(g) for g in gs])
    for x, e in zip(exported, expected):
        assert_close(x.numpy(), e, np.float32)


def test_auto_picks_cuda_for_numba_device_arrays():
    assert fastopt.Adam([dev(np.zeros(3, np.float32))]).backend.name == "cuda"


def test_state_dict_moves_between_cpu_and_gpu():
    """state_dict() holds host NumPy arrays; a CPU optimizer loads a GPU one's state and
    continues like it, and the other way round."""
    rule_name, variant = "Adam", {"amsgrad": True, "weight_decay": 1e-2}
    grads = awkward_grads(SHAPES, np.float32, 6, seed=2)
    params = init_params(SHAPES, np.float32)
    dparams = [dev(p) for p in params]
    gpu = fastopt.CLASSES[rule_name](dparams, backend="cuda", **variant)
    for gs in grads[:3]:
        gpu.step([dev(g) for g in gs])
    sd = gpu.state_dict()
    for st in sd["state"].values():
        assert all(isinstance(v, np.ndarray) for k, v in st.items() if k != "step")
    # GPU -> CPU
    cparams = [host(d) for d in dparams]
    cpu = fastopt.CLASSES[rule_name](cparams, backend="numba", **variant)
    cpu.load_state_dict(sd)
    for gs in grads[3:]:
        gpu.step([dev(g) for g in gs])
        cpu.step(gs)
    for d, c in zip(dparams, cparams):
        assert_close(host(d), c, np.float32)
    # CPU -> GPU
    sd_cpu = cpu.state_dict()
    dparams2 = [dev(c) for c in cparams]
    gpu2 = fastopt.CLASSES[rule_name](dparams2, backend="cuda", **variant)
    gpu2.load_state_dict(sd_cpu)
    gs = awkward_grads(SHAPES, np.float32, 1, seed=9)[0]
    gpu2.step([dev(g) for g in gs])
    cpu.step(gs)
    for d, c in zip(dparams2, cparams):
        assert_close(host(d), c, np.float32)
    for i, st in gpu2.state_dict()["state"].items():
        assert st["step"] == 7
        for key, v in st.items():
            if key != "step":
                assert_close(v, cpu.state_dict()["state"][i][key], np.float32, err_msg=key)


# ------------------------------------------------------------------ sparse

def sparse_grads(nrows, row_shape, dtype, steps, seed=11):
    """Row-sparse gradients with duplicated indices in random order."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        nnz = 9
        idx = rng.integers(0, nrows, nnz)
        idx[:3] = idx[3]                  # a row repeated four times
        vals = rng.standard_normal((nnz,) + row_shape).astype(dtype)
        if t == 1:
            vals *= 1e3
        out.append((idx.astype(np.int32 if t % 2 else np.int64), vals))
    return out


SPARSE_CASES = [("Adam", 3, np.float32), ("SGD", 2, np.float64), ("RMSprop", 3, np.float32),
                ("Adagrad", 1, np.float64), ("Lion", 1, np.float32),
                ("RowWiseAdagrad", 1, np.float32), ("RowWiseAdagrad", 2, np.float64)]


@pytest.mark.parametrize("name,k,dtype", SPARSE_CASES,
                         ids=[f"{n}-v{k}-{np.dtype(d).name}" for n, k, d in SPARSE_CASES])
@pytest.mark.parametrize("shape", [(12, 3), (15,)], ids=["2d", "1d"])
def test_sparse_lazy_matches_cpu_numba(name, k, dtype, shape):
    """Lazy row-sparse steps (duplicates summed in order of appearance) give the CPU
    numba result; rows never touched keep their value and state."""
    variant = registry.RULES[name].variants[k]
    p0 = init_params([shape], dtype, seed=12)[0]
    steps = sparse_grads(shape[0], shape[1:], dtype, 3)
    cpu_p = p0.copy()
    cpu = fastopt.CLASSES[name]([cpu_p], backend="numba", **variant)
    dp = dev(p0)
    gpu = fastopt.CLASSES[name]([dp], backend="cuda", **variant)
    touched = set()
    for idx, vals in steps:
        cpu.step([fastopt.RowSparse(idx, vals)])
        gpu.step([fastopt.RowSparse(idx, vals)])
        touched.update(idx.tolist())
    got = host(dp)
    assert_close(got, cpu_p, dtype)
    untouched = sorted(set(range(shape[0])) - touched)
    assert untouched, "the test needs rows that are never touched"
    np.testing.assert_array_equal(got[untouched], p0[untouched])
    sd_cpu, sd_gpu = cpu.state_dict()["state"][0], gpu.state_dict()["state"][0]
    assert sd_gpu["step"] == sd_cpu["step"] == 3
    for key, v in sd_cpu.items():
        if isinstance(v, np.ndarray):
            assert_close(sd_gpu[key], v, dtype, err_msg=key)


def test_sparse_duplicates_equal_dense_summed_gradient():
    """A sparse step with repeated rows equals the dense step with the summed gradient
    (SGD without momentum: the untouched rows see a zero gradient either way)."""
    p0 = init_params([(6, 4)], np.float64, seed=13)[0]
    idx = np.array([4, 1, 4, 4, 0])
    vals = np.arange(20, dtype=np.float64).reshape(5, 4) / 3
    dense = np.zeros_like(p0)
    for i, v in zip(idx, vals):
        dense[i] += v
    a, b = dev(p0), dev(p0)
    fastopt.SGD([a], lr=0.5, backend="cuda").step([fastopt.RowSparse(idx, vals)])
    fastopt.SGD([b], lr=0.5, backend="cuda").step([dev(dense)])
    np.testing.assert_allclose(host(a), host(b), rtol=1e-15, atol=1e-15)


def test_rows_kernel_takes_device_values():
    """The backend's row step with gradient rows already on the device (what a
    device-side RowSparse hands it) matches the host-values path."""
    from fastopt.sparse import coalesce_plan
    rule = registry.RULES["Adam"]
    group = rule.check_group(rule.defaults)
    p0 = init_params([(10, 3)], np.float32, seed=14)[0]
    idx = np.array([7, 2, 7, 9, 2, 2], dtype=np.int64)
    vals = init_params([(6, 3)], np.float32, seed=15)[0]
    order, seg, uniq = coalesce_plan(idx, 10)
    scal, _ = rule.scalars(group, 1, {}, tuple(rule.slots))
    results = []
    for v in (vals, dev(vals)):
        p = dev(p0)
        slots = [cb.register_backend().full((10, 3), 0.0, np.float32) if u else None
                 for u in rule.uses_slots(group)]
        w = backends.RowsWork(param=p, slots=slots, vals=v, idx=idx, order=order, seg=seg,
                              uniq=uniq, uses=rule.uses_slots(group),
                              const=rule.constants(group),
                              hyper=np.array([scal], dtype=np.float64))
        cb.register_backend().run_rows(rule, w)
        results.append(host(p))
    np.testing.assert_array_equal(results[0], results[1])
    assert not np.array_equal(results[0], p0)


def test_bad_sparse_index_changes_nothing():
    p0 = init_params([(8, 2)], np.float32)[0]
    dp = dev(p0)
    opt = fastopt.Adam([dp], backend="cuda")
    opt.step([fastopt.RowSparse(np.array([1, 3]), np.ones((2, 2), np.float32))])
    before, sd = host(dp), opt.state_dict()
    for bad in ([0, 8], [-1, 2]):
        with pytest.raises(IndexError, match="out of range"):
            opt.step([fastopt.RowSparse(np.array(bad), np.ones((2, 2), np.float32))])
    with pytest.raises(ValueError, match="values shape"):
        opt.step([fastopt.RowSparse(np.array([1]), np.ones((1, 3), np.float32))])
    np.testing.assert_array_equal(host(dp), before)
    sd2 = opt.state_dict()
    assert sd2["state"][0]["step"] == sd["state"][0]["step"] == 1
    for key in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_array_equal(sd2["state"][0][key], sd["state"][0][key])


def test_exact_sparse_mode_is_refused_naming_the_alternative():
    dp = dev(np.zeros((4, 2), np.float32))
    opt = fastopt.SGD([dp], lr=0.1, backend="cuda", sparse_mode="exact")
    with pytest.raises(NotImplementedError, match="backend='numba'"):
        opt.step([fastopt.RowSparse(np.array([1]), np.ones((1, 2), np.float32))])
    np.testing.assert_array_equal(host(dp), 0.0)


# ------------------------------------------------------------------ errors

def test_wrong_gradient_raises_before_anything_changes():
    params = init_params(SHAPES, np.float32)
    dparams = [dev(p) for p in params]
    opt = fastopt.Adam(dparams, backend="cuda")
    opt.step([dev(g) for g in awkward_grads(SHAPES, np.float32, 1)[0]])
    before = [host(d) for d in dparams]
    sd = opt.state_dict()
    good = [dev(np.ones(s, np.float32)) for s in SHAPES]
    with pytest.raises(ValueError, match=r"gradient 2: gradient shape \(299,\) does not match"):
        opt.step(good[:2] + [dev(np.ones(299, np.float32))])
    with pytest.raises(ValueError, match="gradient 1: gradient shape"):
        opt.step([good[0], np.ones((5, 33), np.float32), good[2]])   # host, wrong shape
    with pytest.raises(TypeError, match="not a float dtype"):
        opt.step(good[:2] + [dev(np.ones(300, np.int32))])
    for d, b in zip(dparams, before):
        np.testing.assert_array_equal(host(d), b)
    sd2 = opt.state_dict()
    for i, st in sd["state"].items():
        assert sd2["state"][i]["step"] == st["step"] == 1
        for key in st:
            np.testing.assert_array_equal(sd2["state"][i][key], st[key])


def test_bad_parameters_are_refused():
    with pytest.raises(TypeError, match="backend 'cuda' updates device arrays"):
        fastopt.Adam([np.zeros(3, np.float32)], backend="cuda")
    with pytest.raises(TypeError, match="dtype float16 is not supported"):
        fastopt.Adam([dev(np.zeros(3, np.float16))], backend="cuda")
    with pytest.raises(TypeError, match="expected an array"):
        fastopt.Adam([[1.0, 2.0]], backend="cuda")
    with pytest.raises(ValueError, match="read-only"):
        fastopt.Adam([Exported(np.zeros(3, np.float32), readonly=True)], backend="cuda")
    with pytest.raises(ValueError, match="not C-contiguous"):
        fastopt.Adam([Exported(np.zeros(8, np.float32), step=2)], backend="cuda")


def test_noncontiguous_device_gradient_is_made_contiguous():
    p = init_params([(4,)], np.float32)[0]
    g = np.arange(8, dtype=np.float32)
    dp = dev(p)
    fastopt.SGD([dp], lr=1.0, backend="cuda").step([Exported(g, step=2)])
    np.testing.assert_array_equal(host(dp), p - g[::2])


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    """Without numba-cuda, or without a GPU, backend='cuda' names the reason."""
    monkeypatch.delitem(backends._BACKENDS, "cuda")
    monkeypatch.setattr(backends, "_UNAVAILABLE", dict(backends._UNAVAILABLE))
    monkeypatch.setattr(cb, "_BACKEND", None)

    def no_numba_cuda():
        raise ImportError("No module named 'numba_cuda'")

    monkeypatch.setattr(cb, "_load", no_numba_cuda)
    assert cb.register_backend() is None
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available: numba-cuda is not "
                                           "installed"):
        fastopt.Adam([dev(np.zeros(3, np.float32))], backend="cuda")

    class NoGPU:
        @staticmethod
        def is_available():
            return False

        @staticmethod
        def cuda_error():
            return "CUDA driver library cannot be found"

    monkeypatch.setattr(cb, "_load", lambda: NoGPU)
    assert cb.register_backend() is None
    with pytest.raises(RuntimeError, match="no usable CUDA GPU.*driver library cannot be found"):
        fastopt.SGD([dev(np.zeros(3, np.float32))], backend="cuda")
    assert "cuda" not in fastopt.available_backends()


def test_import_fastopt_does_not_import_numba_cuda():
    """Registration is lazy: numba.cuda (about 0.3 s) is imported on the first request
    for the backend, not by ``import fastopt``."""
    code = ("import sys, fastopt; a = 'numba.cuda' in sys.modules; "
            "fastopt.available_backends(); print(a, 'numba.cuda' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "True"]


def test_register_is_idempotent_and_kernels_are_cached():
    assert cb.register_backend() is cb.register_backend()
    assert "cuda" in fastopt.available_backends()
    p = [dev(np.zeros(5, np.float32))]
    fastopt.Lion(p, backend="cuda").step([dev(np.ones(5, np.float32))])
    n = len(cb._KERNELS)
    q = [dev(np.zeros(9, np.float32))]
    fastopt.Lion(q, backend="cuda").step([dev(np.ones(9, np.float32))])
    assert len(cb._KERNELS) == n


# ------------------------------------------------- the real compiler (no GPU)

@pytest.mark.skipif(not SIM, reason="on a GPU the tests above compile every kernel")
def test_kernels_compile_for_a_gpu():
    """The simulator runs kernels as Python, so it cannot see what the CUDA compiler
    rejects.  Where NVVM is installed (pip install 'numba-cuda[cu13]' or a CUDA
    toolkit), compile every rule's kernel to PTX in a process without the simulator."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    script = os.path.join(os.path.dirname(__file__), "cuda_ptx_check.py")
    res = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True,
                         timeout=900)
    out = res.stdout + res.stderr
    if res.returncode == 3:
        pytest.skip(out.strip().splitlines()[-1])
    assert res.returncode == 0, out


def test_benchmark_table_runs():
    """The `python -m fastopt bench --device cuda` table, on a tiny case (in the
    simulator the timings mean nothing; this checks the machinery)."""
    import io

    from fastopt import _cuda_bench
    from fastopt.benchmark import Case
    out = io.StringIO()
    rows = _cuda_bench.benchmark_table(cases=[Case("SGD", (40,) * 3, variant=1)], min_time=0,
                                       out=out, progress=None)
    impls = {r["impl"] for r in rows}
    assert {"fastopt-cuda", "ceiling-cuda"} <= impls
    text = out.getvalue()
    assert text.startswith("Machine: ") and "| SGD 3x40 float32 | fastopt-cuda |" in text
    assert all(r["gb_per_s"] > 0 and r["of_ceiling"] > 0 for r in rows)
