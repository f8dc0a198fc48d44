"""The CUDA backend, on a GPU or in numba's CUDA simulator, against the numba backend.

Runs where numba-cuda is installed and either a GPU is present or the simulator is
on.  The simulator must be chosen before numba.cuda is first imported, so CI runs
this file in its own process::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_backend.py

In the normal ``python -m pytest`` run (no GPU, no simulator) the file is skipped.

Driven by the rule registry (:data:`fastopt.rules.RULES`, through the pairwise cases
of tests/cases.py) and the capability table
(:func:`fastopt.backends.capabilities`): every rule x variant x dtype, every fused
option, grad_scale, skip_nonfinite, lazy and exact sparse steps, row-wise rules and
state_dict, each run through the optimizer classes and/or the functional layer on
device arrays and compared with ``backend="numba"`` on host copies of the same data.
The CUDA compiler contracts FMAs, so results are compared with a tight tolerance
(:data:`RTOL`) rather than bit for bit (in the simulator they are identical).

Tensors are tiny and steps few (the simulator runs one Python thread per CUDA
thread); the block size is forced to 32, chunks to 64 elements and the grid to 3
blocks, so launches have several blocks and the grid-stride loops wrap.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from cuda_sim import require_cuda

cuda = require_cuda()         # skips this module where the CUDA tests cannot run

import fastopt  # noqa: E402
from fastopt import backends, functional, planner  # noqa: E402
from fastopt.backends import cuda as cb  # noqa: E402
from fastopt.backends.base import FEATURES  # noqa: E402
from fastopt.rules import RULES  # noqa: E402

from cases import CUDA_DENSE  # noqa: E402
from conftest import DTYPES, awkward_grads, init_params, reference_run  # noqa: E402

SIM = bool(cb._load() and cb._SIM)
#: dense tensors: a short vector, a matrix of 165 elements (3 chunks of 64), 130
SHAPES = [(7,), (33, 5), (130,)]
STEPS = 3
RTOL = {np.dtype(np.float32): 1e-6, np.dtype(np.float64): 1e-12}
#: every fused option on (values that bite on N(0, 1) data: clipping, clamps and
#: the row renorm all change something)
EVERY_OPTION = dict(clip_value=0.8, l1=0.05, param_min=-1.2, param_max=1.1, max_norm=1.5)
GRAD_SCALE = 4.0


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


def assert_close(got, want, err_msg=""):
    """Equal to rounding: relative ``RTOL`` of the dtype, absolute ``RTOL`` times the
    largest magnitude (NaN and Inf where the other has them)."""
    want = np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, err_msg
    tol = RTOL[want.dtype]
    fin = want[np.isfinite(want)]
    scale = max(1.0, float(np.abs(fin).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * scale, err_msg=err_msg)


def assert_state_dicts_close(got, want):
    assert set(got["state"]) == set(want["state"])
    for i, st in want["state"].items():
        assert set(got["state"][i]) == set(st), i
        for key, v in st.items():
            g = got["state"][i][key]
            if isinstance(v, np.ndarray):
                assert isinstance(g, np.ndarray), "state_dict must hold host arrays"
                assert_close(g, v, err_msg=f"state {key!r} of parameter {i}")
            else:
                assert g == pytest.approx(v, rel=1e-12), key


def pair(name, params, cuda_params=None, **kw):
    """The same optimizer on host copies (numba) and on device copies (cuda)."""
    cpu_p = [p.copy() for p in params]
    gpu_p = [dev(p) for p in params] if cuda_params is None else cuda_params
    cpu = fastopt.CLASSES[name](cpu_p, backend="numba", **kw)
    gpu = fastopt.CLASSES[name](gpu_p, backend="cuda", **kw)
    assert gpu.backend.name == "cuda"
    return cpu, cpu_p, gpu, gpu_p


def groups_pair(name, groups):
    """Like :func:`pair` with param groups: ``groups`` = [(params, hyper), ...]."""
    cpu_p, gpu_p, cg, gg = [], [], [], []
    for params, hyper in groups:
        c = [p.copy() for p in params]
        d = [dev(p) for p in params]
        cpu_p += c
        gpu_p += d
        cg.append({"params": c, **hyper})
        gg.append({"params": d, **hyper})
    return (fastopt.CLASSES[name](cg, backend="numba"), cpu_p,
            fastopt.CLASSES[name](gg, backend="cuda"), gpu_p)


def assert_pair_close(cpu, cpu_p, gpu, gpu_p):
    for k, (c, d) in enumerate(zip(cpu_p, gpu_p)):
        assert_close(host(d), c, err_msg=f"parameter {k}")
    assert_state_dicts_close(gpu.state_dict(), cpu.state_dict())


def sparse_grads(nrows, row_shape, dtype, steps, nnz=9, seed=11):
    """Row-sparse gradients with duplicated indices in random order (a row repeated
    four times), alternating int32 / int64 indices, one step scaled by 1e3."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        idx = rng.integers(0, nrows, nnz)
        idx[:3] = idx[3]
        vals = rng.standard_normal((nnz,) + tuple(row_shape)).astype(dtype)
        if t == 1:
            vals *= 1e3
        out.append(fastopt.RowSparse(idx.astype(np.int32 if t % 2 else np.int64), vals))
    return out


def dtype_id(d):
    return np.dtype(d).name


def exact_cases():
    """Registry variants that exact sparse mode accepts (a closed form exists)."""
    out = []
    for name, rule in RULES.items():
        for k, v in enumerate(rule.variants):
            if rule.exact_possible(v):
                out.append(pytest.param(name, k, id=f"{name}-v{k}"))
    return out


def run_functional(rule, variant, dtype, shape, steps, grad_scale=None, sparse=False, seed=0):
    """The functional layer (``fastopt.functional.<rule>_``) on device arrays
    (backend="cuda") and on host copies (backend="numba"), ``steps`` steps from
    fresh state; returns (cuda param, cuda state), (numba param, numba state)."""
    fn = getattr(functional, functional._fname(rule))
    group = rule.check_group({**rule.defaults, **variant})
    uses = rule.uses_slots(group)
    p0 = init_params([shape], dtype, seed=seed + 1)[0]
    hslots = [np.full(rule.slot_shape(shape), rule.slot_init(group, n), dtype) if u else None
              for n, u in zip(rule.slots, uses)]
    dslots = [dev(s) if s is not None else None for s in hslots]
    hp, dp = p0.copy(), dev(p0)
    host_names = list(rule.host_init(group))
    hh = dh = rule.host_init(group)
    if sparse:
        grads = sparse_grads(shape[0], shape[1:], dtype, steps, seed=seed + 2)
    else:
        grads = awkward_grads([shape], dtype, steps, seed=seed + 2)
    for t, g in enumerate(grads, start=1):
        if sparse:
            gh = gd = g
        else:
            gh, gd = g[0], dev(g[0])
        rh = fn(hp, gh, *hslots, step=t, backend="numba", grad_scale=grad_scale,
                **variant, **hh)
        rd = fn(dp, gd, *dslots, step=t, backend="cuda", grad_scale=grad_scale,
                **variant, **dh)
        if host_names:
            assert rd == pytest.approx(rh, rel=1e-15)
            hh = dh = {host_names[0]: rh} if len(host_names) == 1 else rh
    return (host(dp), [host(s) for s in dslots if s is not None]), \
        (hp, [s for s in hslots if s is not None])


def assert_functional_close(got, want):
    (gp, gs), (wp, ws) = got, want
    assert_close(gp, wp, err_msg="functional: parameter")
    for k, (a, b) in enumerate(zip(gs, ws)):
        assert_close(a, b, err_msg=f"functional: state {k}")


# ------------------------------------------------------------- capabilities

def test_every_feature_is_declared():
    """The capability table lists every feature for cuda, the matrix phase (Muon:
    tests/test_muon_cuda.py) and the factored passes (Adafactor:
    tests/test_adafactor_cuda.py) included, but the stored formats of the
    whole-tensor passes (LAMB, LARS, Muon with bfloat16 parameters or 16/8-bit state:
    refused, tests/test_cuda_storage.py checks how); bfloat16 parameters are uint16
    device arrays marked with fastopt.backends.cuda.bfloat16, see
    tests/test_cuda_storage.py; the optimizer accepts each declared feature."""
    assert set(backends.capabilities()["cuda"]) == set(FEATURES)
    assert backends.capable("sparse_exact").count("cuda") == 1
    d = dev(np.zeros((4, 3), np.float32))
    opt = fastopt.SGD([d], backend="cuda", sparse_mode="exact", lr=0.1, momentum=0.9)
    assert opt.step([fastopt.RowSparse(np.array([1]), np.ones((1, 3), np.float32))],
                    grad_scale=2.0, skip_nonfinite=True) is True
    fastopt.RowWiseAdagrad([dev(np.zeros((4, 3)))], backend="cuda", **EVERY_OPTION)


# ------------------------------------------- every rule x variant x dtype, dense

@pytest.mark.parametrize("variant_id,dtype,api", CUDA_DENSE.params("variant", "dtype", "api"))
def test_dense_matches_numba(variant_id, dtype, api):
    """Multi-tensor dense steps (several chunks and blocks) through the class, or
    the functional layer, equal the numba backend on host copies.  Cases
    (tests/cases.py): every variant x dtype, variant x API and dtype x API pair;
    Adam in full."""
    name, k = variant_id
    rule = RULES[name]
    variant = rule.variants[k]
    if api == "functional":
        assert_functional_close(*run_functional(rule, variant, dtype, (33, 5), 2, seed=k))
        return
    params = init_params(SHAPES, dtype)
    cpu, cpu_p, gpu, gpu_p = pair(name, params, **variant)
    for grads in awkward_grads(SHAPES, dtype, STEPS, seed=k):
        assert cpu.step(grads) is True
        assert gpu.step([dev(g) for g in grads]) is True
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)
    for d, p0 in zip(gpu_p, params):
        assert not np.array_equal(host(d), p0), "the step changed nothing"


# ------------------------------------------------------------ fused options

# (matrix rules, Muon, and factored rules, Adafactor, take their own kernels and
# refuse most fused options: tests/test_muon_cuda.py, tests/test_adafactor_cuda.py)
@pytest.mark.parametrize("name", [n for n, r in RULES.items()
                                  if r.matrix is None and not r.factored])
def test_every_fused_option_with_grad_scale(name):
    """Every fused option at once, with grad_scale, for every rule: a group with
    max_norm (dense steps through the rows kernels and the renorm kernel), a group
    without it (the dense kernel with the options compiled in), a lazy sparse step,
    and the functional layer."""
    rule = RULES[name]
    dtype = DTYPES[list(RULES).index(name) % 2]
    variant = rule.variants[-1]
    no_max = {k: v for k, v in EVERY_OPTION.items() if k != "max_norm"}
    pa = [2 * p for p in init_params([(9, 4), (6,)], dtype, seed=3)]
    pb = [2 * p for p in init_params([(5, 7), (70,)], dtype, seed=4)]
    if rule.per_tensor:          # whole tensors: no max_norm, no row-sparse steps
        cpu, cpu_p, gpu, gpu_p = groups_pair(name, [(pa, {**variant, **no_max}),
                                                    (pb, {**variant, **no_max})])
        for grads in awkward_grads([p.shape for p in pa + pb], dtype, 3, seed=5):
            cpu.step(grads, grad_scale=GRAD_SCALE)
            gpu.step([dev(g) for g in grads], grad_scale=GRAD_SCALE)
        assert_pair_close(cpu, cpu_p, gpu, gpu_p)
        assert_functional_close(*run_functional(rule, {**variant, **no_max}, dtype, (6, 5),
                                                2, grad_scale=GRAD_SCALE))
        return
    cpu, cpu_p, gpu, gpu_p = groups_pair(name, [(pa, {**variant, **EVERY_OPTION}),
                                                (pb, {**variant, **no_max})])
    shapes = [p.shape for p in pa + pb]
    for grads in awkward_grads(shapes, dtype, 2, seed=5):
        cpu.step(grads, grad_scale=GRAD_SCALE)
        gpu.step([dev(g) for g in grads], grad_scale=GRAD_SCALE)
    sparse = [sparse_grads(s[0], s[1:], dtype, 1, nnz=5, seed=6 + j)[0]
              for j, s in enumerate(shapes)]
    cpu.step(sparse, grad_scale=GRAD_SCALE)
    gpu.step(sparse, grad_scale=GRAD_SCALE)
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)
    norms = np.linalg.norm(host(gpu_p[0]).astype(np.float64), axis=1)
    assert norms.max() <= EVERY_OPTION["max_norm"] * (1 + 1e-5)
    got = host(gpu_p[3])
    assert got.min() >= no_max["param_min"] and got.max() <= no_max["param_max"]
    assert_functional_close(*run_functional(rule, {**variant, **EVERY_OPTION}, dtype, (6, 5),
                                            2, grad_scale=GRAD_SCALE))
    assert_functional_close(*run_functional(rule, {**variant, **no_max}, dtype, (6, 5), 2,
                                            grad_scale=GRAD_SCALE, sparse=True))


OPTIONS = [dict(clip_value=0.3), dict(l1=0.5), dict(param_min=-0.5), dict(param_max=0.4),
           dict(max_norm=0.7), dict(grad_scale=0.25)]


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o)))
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_each_fused_option(name, option):
    """Each option alone (dense multi-tensor steps, then a lazy sparse step)."""
    option = dict(option)
    gs = option.pop("grad_scale", None)
    variant = RULES[name].variants[1]
    dtype = np.float32 if name == "Adam" else np.float64
    shapes = [(12, 3), (40,)]
    cpu, cpu_p, gpu, gpu_p = pair(name, init_params(shapes, dtype, seed=7),
                                  **{"lr": 0.1, **variant, **option})
    for grads in awkward_grads(shapes, dtype, 2, seed=8):
        cpu.step(grads, grad_scale=gs)
        gpu.step([dev(g) for g in grads], grad_scale=gs)
    sparse = [sparse_grads(12, (3,), dtype, 1, seed=9)[0], None]
    cpu.step(sparse, grad_scale=gs)
    gpu.step(sparse, grad_scale=gs)
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)


def test_max_norm_renormalizes_dense_and_sparse_rows():
    """Rows above max_norm are scaled to it (dense: every row, sparse: touched rows
    only), exactly as the numba backend does; 1-D parameters renormalize elements."""
    dtype = np.float64
    params = [3 * p for p in init_params([(20, 6), (15,)], dtype, seed=10)]
    cpu, cpu_p, gpu, gpu_p = pair("SGD", params, lr=0.01, max_norm=1.0)
    grads = awkward_grads([(20, 6), (15,)], dtype, 1, seed=11)[0]
    cpu.step(grads)
    gpu.step([dev(g) for g in grads])
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)
    assert np.linalg.norm(host(gpu_p[0]), axis=1).max() <= 1.0 + 1e-12
    assert np.abs(host(gpu_p[1])).max() <= 1.0 + 1e-12
    cpu2, cpu_p2, gpu2, gpu_p2 = pair("SGD", params, lr=0.01, max_norm=1.0)
    g = fastopt.RowSparse(np.array([3, 17, 3]), np.ones((3, 6), dtype))
    cpu2.step([g, None])
    gpu2.step([g, None])
    assert_pair_close(cpu2, cpu_p2, gpu2, gpu_p2)
    got = host(gpu_p2[0])
    untouched = [r for r in range(20) if r not in (3, 17)]
    np.testing.assert_array_equal(got[untouched], params[0][untouched])
    assert np.linalg.norm(got[[3, 17]], axis=1).max() <= 1.0 + 1e-12


# ------------------------------------------------------------ skip_nonfinite

@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_skip_nonfinite(dtype):
    """A NaN or Inf in a device gradient (or in g / grad_scale, in the dtype), or in
    sparse host values, skips the whole step: False, nothing changes."""
    shapes = [(33, 5), (130,), (0,)]
    cpu, cpu_p, gpu, gpu_p = pair("Adam", init_params(shapes, dtype, seed=12), lr=0.1)
    grads = awkward_grads(shapes, dtype, 3, seed=13)
    assert gpu.step([dev(g) for g in grads[0]], skip_nonfinite=True) is True
    cpu.step(grads[0], skip_nonfinite=True)
    before, sd = [host(d) for d in gpu_p], gpu.state_dict()
    bad_nan = [g.copy() for g in grads[1]]
    bad_nan[1][77] = np.nan
    bad_inf = [g.copy() for g in grads[1]]
    bad_inf[0][32, 4] = -np.inf
    huge = [g.copy() for g in grads[1]]
    huge[1][5] = np.finfo(dtype).max / 2             # finite; / grad_scale overflows
    sparse_nan = fastopt.RowSparse(np.array([2, 2]), np.array([[1, 2, 3, 4, np.nan]] * 2,
                                                              dtype=dtype))
    for bad, gs in ((bad_nan, None), (bad_inf, None), (huge, 0.25)):
        assert gpu.step([dev(g) for g in bad], grad_scale=gs, skip_nonfinite=True) is False
        assert gpu.step([Exported(g) for g in bad], grad_scale=gs,
                        skip_nonfinite=True) is False
    assert gpu.step([sparse_nan, dev(grads[1][1]), None], skip_nonfinite=True) is False
    for d, b in zip(gpu_p, before):
        np.testing.assert_array_equal(host(d), b)
    sd2 = gpu.state_dict()
    for i, st in sd["state"].items():
        assert sd2["state"][i]["step"] == st["step"] == 1
        for key in st:
            np.testing.assert_array_equal(sd2["state"][i][key], st[key])
    # finite: applied, as on the CPU (g / 0.25 stays finite)
    assert gpu.step([dev(g) for g in grads[2]], grad_scale=0.25, skip_nonfinite=True) is True
    assert cpu.step(grads[2], grad_scale=0.25, skip_nonfinite=True) is True
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the simulator computes with NumPy
def test_all_finite_on_device_and_host_arrays():
    bk = backends.resolve("cuda")
    x = np.linspace(-1, 1, 300).astype(np.float32)
    assert bk.all_finite([dev(x), x, dev(np.zeros(0, np.float32))])
    for where in (0, 299, 150):
        y = x.copy()
        y[where] = np.inf
        assert not bk.all_finite([dev(x), dev(y)])
        assert not bk.all_finite([dev(x), y])                       # host: CPU check
        assert not bk.all_finite([Exported(y.reshape(30, 10))])    # foreign device array
    strided = Exported(np.repeat(np.r_[x[:9], np.nan], 2), step=2)   # not contiguous
    assert not bk.all_finite([strided])
    big = x * np.float32(1e10)
    assert bk.all_finite([dev(big)], grad_scale=1e-30) is False      # / 1e-30 in float32
    assert bk.all_finite([dev(big.astype(np.float64))], grad_scale=1e-30) is True


# ------------------------------------------------------------------ sparse

@pytest.mark.parametrize("shape", [(12, 3), (15,)], ids=["2d", "1d"])
@pytest.mark.parametrize("name", [n for n, r in RULES.items() if not r.whole_tensor])
def test_sparse_lazy_matches_numba(name, shape):
    """Lazy row-sparse steps (duplicates summed in order of appearance) give the
    numba result; rows never touched keep their value and state."""
    rule = RULES[name]
    k = list(RULES).index(name) % len(rule.variants)
    dtype = DTYPES[(list(RULES).index(name) + len(shape)) % 2]
    p0 = init_params([shape], dtype, seed=12)[0]
    cpu, cpu_p, gpu, gpu_p = pair(name, [p0], **rule.variants[k])
    touched = set()
    for g in sparse_grads(shape[0], shape[1:], dtype, 3):
        cpu.step([g])
        gpu.step([g])
        touched.update(g.indices.tolist())
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)
    untouched = sorted(set(range(shape[0])) - touched)
    assert untouched, "the test needs rows that are never touched"
    np.testing.assert_array_equal(host(gpu_p[0])[untouched], p0[untouched])


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


def test_rows_work_takes_device_values():
    """The backend's row step with gradient rows already on the device matches the
    host-values path."""
    rule = RULES["Adam"]
    group = rule.check_group(rule.defaults)
    spec = planner.group_spec(rule, group)
    p0 = init_params([(10, 3)], np.float32, seed=14)[0]
    idx = np.array([7, 2, 7, 9, 2, 2], dtype=np.int64)
    vals = init_params([(6, 3)], np.float32, seed=15)[0]
    row, _ = rule.row(group, 1, {}, tuple(rule.slots))
    bk = backends.resolve("cuda")
    results = []
    for v in (vals, dev(vals)):
        p = dev(p0)
        slots = [bk.full((10, 3), 0.0, np.float32) if u else None for u in spec.uses]
        bk.run_rows(planner.rows_work(rule, spec, p, slots, row, idx, v))
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


# -------------------------------------------------------------- exact mode

@pytest.mark.parametrize("name,k", exact_cases())
def test_exact_mode_matches_numba(name, k):
    """sparse_mode="exact": sparse steps (rows caught up in closed form when touched),
    an lr change (pending rows flushed with the old lr), a dense step, more sparse
    steps, then flush(): equal to the numba backend in exact mode, and to dense
    steps with zero rows."""
    rule = RULES[name]
    variant = rule.variants[k]
    dtype = np.float64 if k % 2 == 0 else np.float32
    shape = (16, 3)
    p0 = init_params([shape], dtype, seed=20 + k)[0]
    cpu, cpu_p, gpu, gpu_p = pair(name, [p0], sparse_mode="exact", **variant)
    steps = sparse_grads(shape[0], shape[1:], dtype, 7, nnz=4, seed=21)
    dense_g = awkward_grads([shape], dtype, 1, seed=22)[0]
    for t, g in enumerate(steps):
        if t == 3:
            for o in (cpu, gpu):
                o.param_groups[0]["lr"] *= 0.5
        if t == 4:
            cpu.step(dense_g)
            gpu.step([dev(dense_g[0])])
        cpu.step([g])
        gpu.step([g])
    assert_close(host(gpu_p[0]), cpu_p[0])    # caught-up and pending rows alike
    cpu.flush()
    gpu.flush()
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)
    # the oracle: dense steps with the scattered gradient
    ref_p = [p0.copy()]
    ref = fastopt.CLASSES[name](ref_p, backend="numba", **variant)
    for t, g in enumerate(steps):
        if t == 3:
            ref.param_groups[0]["lr"] *= 0.5
        if t == 4:
            ref.step(dense_g)
        d = np.zeros(shape, dtype)
        np.add.at(d, g.indices, g.values)
        ref.step([d])
    tol = 1e-5 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(host(gpu_p[0]), ref_p[0], rtol=tol, atol=tol)


def test_exact_mode_flush_only_touches_pending_rows(monkeypatch):
    """flush() is one catch-up-only launch over the rows that are behind; a second
    flush launches nothing."""
    counter = LaunchCounter(monkeypatch)
    p0 = init_params([(10, 2)], np.float64, seed=23)[0]
    cpu, cpu_p, gpu, gpu_p = pair("SGD", [p0], sparse_mode="exact", lr=0.1, momentum=0.9,
                                  weight_decay=0.1)
    for idx in ([1, 4, 1], [4, 7], [2]):
        g = fastopt.RowSparse(np.array(idx), np.ones((len(idx), 2)))
        cpu.step([g])
        gpu.step([g])
    counter.launches.clear()
    gpu.flush()
    assert counter.launches == {"rows": 1}
    gpu.flush()
    assert counter.launches == {"rows": 1}
    cpu.flush()
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)


# --------------------------------------------------------------- launches

class LaunchCounter:
    """Wraps ``cb.launch.kernel_for`` (every launch gets its kernel there) and counts
    launches per kernel kind."""

    def __init__(self, monkeypatch):
        self.launches = {}
        real = cb.launch.kernel_for

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

        monkeypatch.setattr(cb.launch, "kernel_for", counting)


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
    rule = RULES["Adam"]
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
        np.testing.assert_allclose(host(d), e, rtol=2e-5 if e.dtype == np.float32 else 1e-11,
                                   atol=1e-6)


def test_max_norm_and_rowwise_launches(monkeypatch):
    """A dense step of a max_norm group: the rows kernel then the renorm kernel; a
    row-wise rule: one launch, renorm included."""
    counter = LaunchCounter(monkeypatch)
    fastopt.Adam([dev(np.ones((4, 3)))], backend="cuda", max_norm=1.0).step(
        [dev(np.ones((4, 3)))])
    assert counter.launches == {"rows": 1, "renorm": 1}
    counter.launches.clear()
    fastopt.RowWiseAdagrad([dev(np.ones((4, 3)))], backend="cuda", max_norm=1.0).step(
        [dev(np.ones((4, 3)))])
    assert counter.launches == {"rowwise": 1}


class UploadCounter:
    """Wraps ``cb.launch._upload`` (every copy of a bucket's device tables and of a
    step's scalars goes through it) and counts the copies of each kind."""

    def __init__(self, monkeypatch):
        self.counts = {}
        real = cb.launch._upload

        def counting(what, dev_array, host_array):
            self.counts[what] = self.counts.get(what, 0) + 1
            return real(what, dev_array, host_array)

        monkeypatch.setattr(cb.launch, "_upload", counting)

    def take(self):
        out, self.counts = self.counts, {}
        return out


def test_dense_tables_are_prepared_once_per_plan(monkeypatch):
    """A bucket's pointer table goes to the device once, on its first launch; a step
    of an unchanged plan (grad_scale included: its work is a copy of the bucket)
    copies only the step's gradient addresses and scalar rows, one copy per bucket.
    A changed plan prepares again: a group's lr edited, a param group added, new state
    arrays after load_state_dict.  Results follow the numba backend throughout (stale
    tables would update the old arrays)."""
    grads = awkward_grads(SHAPES + [(9,)], np.float32, 16, seed=3)
    params = init_params(SHAPES + [(9,)], np.float32, seed=8)
    cpu, cpu_p, gpu, gpu_p = groups_pair("Adam", [(params[:2], {"lr": 0.05}),
                                                  (params[2:3], {"lr": 0.01})])
    uploads = UploadCounter(monkeypatch)
    it = iter(grads)

    def steps(n, k=3, **kw):
        for _ in range(n):
            gs = next(it)[:k]
            cpu.step(gs, **kw)
            gpu.step([dev(g) for g in gs], **kw)

    steps(2)                      # first step: fresh state; then the cached plan
    assert uploads.take().get("tables", 0) >= 1
    steps(3)
    assert uploads.take() == {"step": 3}
    steps(2, grad_scale=GRAD_SCALE)
    assert uploads.take() == {"step": 2}
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)

    for opt in (cpu, gpu):
        opt.param_groups[1]["lr"] = 0.02
    steps(1)
    assert uploads.take() == {"tables": 1, "step": 1}
    steps(2)
    assert uploads.take() == {"step": 2}

    extra_c = params[3].copy()
    extra_d = dev(params[3])
    cpu.add_param_group({"params": [extra_c], "lr": 0.03})
    gpu.add_param_group({"params": [extra_d], "lr": 0.03})
    cpu_p.append(extra_c)
    gpu_p.append(extra_d)
    steps(2, k=4)
    assert uploads.take().get("tables", 0) >= 1
    steps(2, k=4)
    assert uploads.take() == {"step": 2}
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)

    gpu.load_state_dict(cpu.state_dict())          # new device state arrays
    steps(1, k=4)
    assert uploads.take() == {"tables": 1, "step": 1}
    steps(1, k=4)
    assert uploads.take() == {"step": 1}
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)


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
    p = init_params([(40,)], np.float64)[0]
    g = np.ones(40)
    g[3], g[10], g[20] = np.nan, np.inf, -np.inf
    cpu, cpu_p, gpu, gpu_p = pair(name, [p])
    for grads in ([g], [np.ones(40)]):
        cpu.step(grads)
        gpu.step([dev(x) for x in grads])
    got, want = host(gpu_p[0]), cpu_p[0]
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    assert_close(got[fin], want[fin])


# ------------------------------------------------------------- device arrays

@pytest.mark.parametrize("name", ["Adam", "SGD", "RowWiseAdagrad"])
def test_host_gradients_are_copied_to_the_device(name):
    """Gradients may be host arrays (copied each step), also of another float dtype;
    device gradients of another float dtype are cast on the device."""
    variant = RULES[name].variants[-1]
    dtype = np.float32
    shapes = [(7, 2), (33, 5)]
    cpu, cpu_p, gpu, gpu_p = pair(name, init_params(shapes, dtype), **variant)
    for t, gs in enumerate(awkward_grads(shapes, np.float64, 3, seed=3)):
        cpu.step([g.astype(dtype) for g in gs])
        if t % 2 == 0:
            gpu.step([gs[0].astype(dtype), gs[1]])        # host: float32, float64
        else:
            gpu.step([dev(g) for g in gs])                # device float64: cast there
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)


def test_float16_device_gradient_is_cast_on_the_device():
    p = init_params([(50,)], np.float32)[0]
    g16 = (np.arange(50, dtype=np.float32) / 7).astype(np.float16)
    expected, _ = reference_run(RULES["SGD"], {"lr": 0.5}, [p], [[g16.astype(np.float32)]])
    dp = dev(p)
    fastopt.SGD([dp], lr=0.5, backend="cuda").step([dev(g16)])
    np.testing.assert_array_equal(host(dp), expected[0])


def test_foreign_device_arrays_are_updated_in_place_and_auto_picks_cuda():
    """Objects exposing only __cuda_array_interface__ (CuPy, torch) are viewed without
    a copy; backend='auto' picks cuda for them."""
    params = init_params(SHAPES, np.float32)
    exported = [Exported(p) for p in params]
    opt = fastopt.AdamW(exported, backend="auto", max_norm=2.0)
    assert opt.backend.name == "cuda"
    cpu_p = [p.copy() for p in params]
    cpu = fastopt.AdamW(cpu_p, backend="numba", max_norm=2.0)
    for gs in awkward_grads(SHAPES, np.float32, 2):
        opt.step([Exported(g) for g in gs])
        cpu.step(gs)
    for x, e in zip(exported, cpu_p):
        assert_close(x.numpy(), e)


def test_auto_picks_cuda_for_numba_device_arrays():
    assert fastopt.Adam([dev(np.zeros(3, np.float32))]).backend.name == "cuda"


def test_state_dict_moves_between_cuda_and_numba():
    """state_dict() holds host NumPy arrays; a numba optimizer loads a cuda one's state
    and continues like it, and the other way round."""
    name, variant = "Adam", {"amsgrad": True, "weight_decay": 1e-2}
    grads = awkward_grads(SHAPES, np.float32, 5, seed=2)
    dparams = [dev(p) for p in init_params(SHAPES, np.float32)]
    gpu = fastopt.CLASSES[name](dparams, backend="cuda", **variant)
    for gs in grads[:2]:
        gpu.step([dev(g) for g in gs])
    sd = gpu.state_dict()
    for st in sd["state"].values():
        assert all(isinstance(v, np.ndarray) for k, v in st.items() if k != "step")
    # cuda -> numba
    cparams = [host(d) for d in dparams]
    cpu = fastopt.CLASSES[name](cparams, backend="numba", **variant)
    cpu.load_state_dict(sd)
    for gs in grads[2:4]:
        gpu.step([dev(g) for g in gs])
        cpu.step(gs)
    assert_pair_close(cpu, cparams, gpu, dparams)
    # numba -> cuda
    dparams2 = [dev(c) for c in cparams]
    gpu2 = fastopt.CLASSES[name](dparams2, backend="cuda", **variant)
    gpu2.load_state_dict(cpu.state_dict())
    gpu2.step([dev(g) for g in grads[4]])
    cpu.step(grads[4])
    assert_pair_close(cpu, cparams, gpu2, dparams2)
    assert gpu2.state_dict()["state"][0]["step"] == 5


# ------------------------------------------------------------------ errors

def test_wrong_gradient_raises_before_anything_changes():
    params = init_params(SHAPES, np.float32)
    dparams = [dev(p) for p in params]
    opt = fastopt.Adam(dparams, backend="cuda")
    opt.step([dev(g) for g in awkward_grads(SHAPES, np.float32, 1)[0]])
    before = [host(d) for d in dparams]
    sd = opt.state_dict()
    good = [dev(np.ones(s, np.float32)) for s in SHAPES]
    with pytest.raises(ValueError, match=r"gradient 2: gradient shape \(129,\) does not match"):
        opt.step(good[:2] + [dev(np.ones(129, np.float32))])
    with pytest.raises(ValueError, match="gradient 1: gradient shape"):
        opt.step([good[0], np.ones((5, 33), np.float32), good[2]])   # host, wrong shape
    with pytest.raises(TypeError, match="not a float dtype"):
        opt.step(good[:2] + [dev(np.ones(130, np.int32))])
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
    toolkit), compile every kernel to PTX in a process without the simulator."""
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

    from fastopt.benchmark import cuda as cuda_bench
    from fastopt.benchmark import Case
    out = io.StringIO()
    rows = cuda_bench.benchmark_table(cases=[Case("SGD", (40,) * 3, variant=1)], out=out,
                                      progress=None,
                                      profile=dict(rounds=2, per_round=1, sample_time=0))
    impls = {r["impl"] for r in rows}
    assert {"fastopt-cuda", "ceiling-cuda"} <= impls
    text = out.getvalue()
    assert text.startswith("Machine: ") and "| SGD 3x40 float32 | fastopt-cuda |" in text
    assert all(r["gb_per_s"] > 0 and r["of_ceiling"] > 0 for r in rows)


@pytest.mark.parametrize("name", [n for n, r in RULES.items() if r.methods])
def test_schedulefree_mode_switch_on_device_arrays(name):
    """train()/eval() rewrite device parameters (through host memory) as the host
    optimizer rewrites its arrays; a step in eval mode is refused."""
    rule = RULES[name]
    p0 = init_params([(12, 3), (7,)], np.float32, seed=4)
    cpu, cpu_p, gpu, gpu_p = pair(name, p0, **rule.variants[-1])
    rng = np.random.default_rng(8)
    for t in range(6):
        if t == 3:
            cpu.eval()
            gpu.eval()
            assert_pair_close(cpu, cpu_p, gpu, gpu_p)
            with pytest.raises(RuntimeError, match="eval mode"):
                gpu.step([np.ones_like(p) for p in p0])
            cpu.train()
            gpu.train()
        grads = [rng.standard_normal(p.shape).astype(np.float32) for p in p0]
        cpu.step(grads)
        gpu.step(grads)
    cpu.eval()
    gpu.eval()
    assert_pair_close(cpu, cpu_p, gpu, gpu_p)
