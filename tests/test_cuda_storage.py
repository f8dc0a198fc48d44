"""The CUDA backend's stored formats (``state_bits=16`` and ``8``, float32 state of
float64 parameters) against the numba backend, bit for bit.

Runs where numba-cuda is installed and either a GPU is present or the simulator is
on; the simulator must be chosen before numba.cuda is first imported::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest tests/test_cuda_storage.py

In the simulator the kernels run the same jitable float32/float64 operations as the
Numba CPU drivers, so parameters, state codes and block scales must be identical
(compared as bytes, so NaN equals NaN).  On a GPU the CUDA compiler contracts
``a * b + c`` into FMA, so there the comparison is to rounding (parameters and
decoded state), as in ``tests/test_cuda_backend.py``.

Every rule of :data:`fastopt.rules.RULES` (the variant that uses the most state
slots), dense and row-sparse steps (duplicate indices), lazy and exact sparse mode
(with a flush), ``max_norm`` (the row buffer), 8-bit tensors with two blocks per
row and a 1-D tensor of many blocks in one bucket with a small tensor that keeps
float32 state.  Tensors are small and steps few; launches are forced small
(several blocks, grid-stride loops that wrap).
"""

import os
import subprocess
import sys

import numpy as np
import pytest


def ptx_main():
    """Compile every stored-format kernel to PTX without a GPU (run as a script, in a
    process without the simulator; see tests/cuda_ptx_check.py): every rule, plain
    and with every fused option, for float32 with 16/8-bit state, float64 with
    8/32-bit state and bfloat16 parameters (float32, 16- and 8-bit state, the
    bf16_update modes cycled; dense kernels with float32 and bfloat16 gradients);
    dense, rows (lazy, exact, flush) and row-wise kernels, and the widen kernel.  The
    8-bit dense and rows kernels (without ``max_norm``) are checked for a thread block
    per 8-bit block (``cuda_ptx_check.check_q8_layout``).  Exit status 0 compiled, 1
    failed, 3 cannot check here."""
    import types as pytypes
    try:
        from numba import cuda
        from numba.cuda import types
        import numba.cuda.dispatcher as dispatcher
        dispatcher.get_current_device
    except (ImportError, AttributeError) as exc:
        print(f"numba-cuda is missing or its internals changed: {exc}")
        return 3
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))

    def probe(x):
        x[0] = 1.0
    try:
        cuda.compile_ptx(probe, (types.float32[::1],), cc=(9, 0))
    except Exception as exc:  # noqa: BLE001
        msg = " ".join(str(exc).split())
        print(f"the CUDA compiler libraries (NVVM, NVRTC) are not available here: {msg:.200}")
        return 3
    from fastopt import planner, rules, storage
    from fastopt.backends import cuda as cb
    from fastopt.storage import io
    from cuda_ptx_check import check_q8_layout

    i64, idx = types.int64, types.Array(types.int64, 1, "C")
    tab, f64_2d = types.Array(i64, 2, "C"), types.Array(types.float64, 2, "C")
    nbt = {np.dtype(np.float32): types.float32, np.dtype(np.float64): types.float64,
           np.dtype(np.uint8): types.uint8, np.dtype(np.uint16): types.uint16}

    def arr(dt, nd):
        return types.Array(nbt[np.dtype(dt)], nd, "C")

    def ptx_of(kernel, sig, q8_blocks=False):
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
        assert "sqrt.approx" not in ptx and "div.approx" not in ptx \
            and "div.full" not in ptx, "approximate sqrt or division"
        if q8_blocks:             # a thread block per 8-bit block
            check_q8_layout(ptx, what)

    every = dict(clip_value=0.5, l1=0.01, param_min=-2.0, param_max=2.0, max_norm=1.0)
    n = 0
    for r, (name, rule) in enumerate(rules.RULES.items()):
        if rule.whole_tensor:          # float32/float64 only: no stored kernels
            continue
        for fused in (False, True):
            group = rule.check_group({**rule.defaults, **rule.variants[-1],
                                      **(every if fused else {})})
            spec = planner.group_spec(rule, group)
            # bfloat16 parameters: the update modes cycled over rules and state widths
            modes = storage.BF16_UPDATES
            for dt, bits, mode in ((np.float32, 16, None), (np.float32, 8, None),
                                   (np.float64, 8, None), (np.float64, 32, None),
                                   (storage.BF16, None, modes[r % 4]),
                                   (storage.BF16, 16, modes[(r + 1) % 4]),
                                   (storage.BF16, 8, modes[(r + 2) % 4])):
                st = storage.storage_for(rule, np.zeros((64, 300), dt), bits, mode)
                if st.native:
                    continue
                cfg = planner.config(rule, dt, spec, grad_scale=1.0 if fused else None,
                                     storage=st)
                CT = np.dtype(cfg.compute_dtype).type
                PDT, _, SDT, _ = io.dtypes(st, cfg.grad, CT)
                what = f"{name} {np.dtype(dt)} state_bits={bits} {mode} fused={fused}"
                try:
                    if rule.layout == "rowwise":
                        ptx_of(cb.make_stored_rowwise_kernel(cfg),
                               (arr(PDT, 1), arr(np.uint16, 1), arr(SDT, 1), arr(CT, 2),
                                idx, idx, idx, f64_2d, arr(CT, 2), arr(CT, 2), i64, i64, i64,
                                i64, types.boolean))
                        n += 1
                        continue
                    q8 = st.state == "q8"
                    if not fused:
                        ptx_of(cb.make_stored_dense_kernel(cfg), (tab, idx, idx, tab, tab, f64_2d),
                               q8)
                        n += 1
                        if st.param == "bfloat16":      # bfloat16 gradients
                            ptx_of(cb.make_stored_dense_kernel(cfg.with_grad("bfloat16")),
                                   (tab, idx, idx, tab, tab, f64_2d), q8)
                            n += 1
                    flags = [(False, True)]
                    if not fused and rule.exact_refusal(group) is None:
                        flags += [(True, True), (True, False)]
                    for catch, step in flags:
                        ptx_of(cb.make_stored_rows_kernel(cfg, catch, step),
                               (arr(PDT, 1), arr(np.uint16, 1)) + (arr(SDT, 1),) * 3
                               + (arr(np.float32, 1),) * 3
                               + (arr(CT, 2), idx, idx, idx, f64_2d, f64_2d, arr(CT, 2),
                                  i64, i64, i64, i64, types.boolean),
                               q8 and not fused)        # fused: max_norm, a thread a row
                        n += 1
                except Exception as exc:  # noqa: BLE001
                    print(f"FAILED to compile {what}: {type(exc).__name__}: {exc}")
                    return 1
    ptx_of(cb.make_widen_kernel(), (arr(np.uint16, 1), arr(np.float32, 1)))
    print(f"compiled {n + 1} stored-format kernels to PTX")
    return 0


if __name__ == "__main__":
    sys.exit(ptx_main())

from cuda_sim import require_cuda  # noqa: E402

cuda = require_cuda()         # skips this module where the CUDA tests cannot run

import fastopt  # noqa: E402
from fastopt import backends, rules, storage  # noqa: E402
from fastopt.backends import cuda as cb  # noqa: E402
from fastopt.rules import RULES  # noqa: E402

from cases import CUDA_STORED, same_bytes  # noqa: E402

SIM = bool(cb._load() and cb._SIM)
BF16 = storage.BF16
#: the simulator runs the kernels on NumPy scalars, which report the (intended)
#: uint32 wraparound of the stochastic-rounding hash and Inf - Inf of the
#: non-finite scan
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
#: 8-bit state needs >= storage.Q8_MIN_SIZE (4096) elements: 16 rows of 300 are
#: two 8-bit blocks per row (256 + 44)
SHAPE = (16, 300)
STEPS = 2


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    cb.register_backend()
    monkeypatch.setattr(cb, "BLOCK_SIZE", 8)
    monkeypatch.setattr(cb, "CHUNK", 512)
    monkeypatch.setattr(cb, "MAX_BLOCKS", 3)
    yield


# ------------------------------------------------------------------ helpers

def richest_variant(rule, bits=None):
    """The registry variant that uses the most state slots (SGD: with momentum)
    among those that take ``bits``-bit state."""
    def used(v):
        return sum(rule.uses_slots(rule.check_group({**rule.defaults, **v})))
    return max((v for v in rule.variants if rules.takes_state_bits(rule, v, bits)), key=used)


def exact_variant(rule):
    """The richest variant that exact sparse mode accepts, or None."""
    ok = [v for v in rule.variants if rule.exact_possible(v)]
    if not ok:
        return None
    return max(ok, key=lambda v: sum(rule.uses_slots(rule.check_group(
        {**rule.defaults, **v}))))


def same_bits(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if SIM:
        same_bytes(got, want, what)
    else:                                    # FMA contraction on the GPU
        g = got.astype(np.float64) if got.dtype.kind != "u" else got.astype(np.int64)
        w = want.astype(np.float64) if want.dtype.kind != "u" else want.astype(np.int64)
        if got.dtype.kind == "u":            # 8-bit codes: off by one at most
            assert np.abs(g - w).max(initial=0) <= 1, what
        else:
            tol = 1e-2 if got.dtype == storage.BF16 else 1e-4
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol, err_msg=what)


def assert_same(cpu, cpu_p, gpu, gpu_p):
    for k, (c, d) in enumerate(zip(cpu_p, gpu_p)):
        same_bits(d.copy_to_host(), c, f"parameter {k}")
    want, got = cpu.state_dict()["state"], gpu.state_dict()["state"]
    assert set(got) == set(want)
    for i, st in want.items():
        assert set(got[i]) == set(st), i
        for key, v in st.items():
            if isinstance(v, np.ndarray):
                assert isinstance(got[i][key], np.ndarray), "state_dict holds host arrays"
                same_bits(got[i][key], v, f"state {key!r} of parameter {i}")
            else:
                assert got[i][key] == v, key


def pair(name, params, **kw):
    """The same optimizer on host copies (numba) and on device copies (cuda)."""
    cpu_p = [p.copy() for p in params]
    gpu_p = [cuda.to_device(p) for p in params]
    cpu = fastopt.CLASSES[name](cpu_p, backend="numba", **kw)
    gpu = fastopt.CLASSES[name](gpu_p, backend="cuda", **kw)
    return cpu, cpu_p, gpu, gpu_p


def params_of(shapes, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def dense_grads(shapes, dtype, steps, seed=2):
    """Gradients with one step scaled by 1e3 (block scales change); the first 8-bit
    block of a 2-D tensor gets zero gradients at every step (the zero scale of an
    all-zero block, where the rule keeps zero state)."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        gs = [rng.standard_normal(s).astype(dtype) for s in shapes]
        if t == 1:
            gs = [g * dtype(1e3) for g in gs]
        for g in gs:
            if g.ndim == 2:
                g[0, :storage.Q8_BLOCK] = 0
        out.append(gs)
    return out


def sparse_grad(nrows, row_shape, dtype, rng, nnz=6):
    """Row-sparse gradient with a row repeated three times, in random order."""
    idx = rng.integers(0, nrows, nnz)
    idx[:2] = idx[2]
    rng.shuffle(idx)
    vals = rng.standard_normal((nnz,) + tuple(row_shape)).astype(dtype)
    return fastopt.RowSparse(idx, vals)


# ------------------------------------------------------------- capabilities

def test_features():
    """state16/state8 and bfloat16 parameters are declared; a uint16 device array is a
    bfloat16 parameter only when marked with ``cb.bfloat16``."""
    caps = backends.capabilities()["cuda"]
    assert "state16" in caps and "state8" in caps and "bfloat16" in caps
    with pytest.raises(TypeError, match=r"dtype uint16 .*fastopt\.backends\.cuda\.bfloat16"):
        fastopt.Adam([cuda.to_device(np.zeros((4, 3), np.uint16))], backend="cuda")


def test_full_and_host_copies_of_bf16_state():
    """bfloat16 state lives as uint16 bits on the device; host copies are
    ml_dtypes.bfloat16 both ways."""
    bk = backends.resolve("cuda")
    a = bk.full((3, 2), 1.0 / 3.0, storage.BF16)
    assert a.dtype == np.uint16 and cb.is_bf16_state(a)
    h = bk.to_host(a)
    assert h.dtype == storage.BF16
    same_bits(h, np.full((3, 2), 1.0 / 3.0, storage.BF16), "full")
    back = bk.from_host(h * storage.BF16.type(2), a)
    assert cb.is_bf16_state(back)
    same_bits(bk.to_host(back), h * storage.BF16.type(2), "from_host")
    codes = bk.full((5,), 7, np.uint8)
    assert bk.to_host(codes).dtype == np.uint8 and not cb.is_bf16_state(codes)


# ------------------------------------------ every rule, dense and sparse steps

@pytest.mark.parametrize("name,bits,steps", CUDA_STORED.params("rule", "bits", "steps"))
def test_steps_match_numba(name, bits, steps):
    """Every element-wise rule with 16- and 8-bit state, dense or row-sparse steps
    (tests/cases.py: every rule x state width, rule x step kind and state width x
    step kind pair; Adam in full).  Dense: a (16, 300) matrix, a 1-D tensor of 5000
    elements (20 8-bit blocks) and, for 8 bits, a small tensor (float32 state, its
    own bucket), in one optimizer; sparse: lazy steps with duplicate indices."""
    rule = RULES[name]
    if steps == "sparse":
        params = params_of([SHAPE], np.float32)
        cpu, cpu_p, gpu, gpu_p = pair(name, params, state_bits=bits,
                                      **richest_variant(rule, bits))
        rng = np.random.default_rng(3)
        for _ in range(STEPS):
            g = sparse_grad(SHAPE[0], SHAPE[1:], np.float32, rng)
            cpu.step([g])
            gpu.step([g])
        assert_same(cpu, cpu_p, gpu, gpu_p)
        return
    shapes = [SHAPE, (5000,)] + ([(7, 3)] if bits == 8 else [])
    params = params_of(shapes, np.float32)
    cpu, cpu_p, gpu, gpu_p = pair(name, params, state_bits=bits, **richest_variant(rule, bits))
    for gs in dense_grads(shapes, np.float32, STEPS):
        cpu.step(gs)
        gpu.step([cuda.to_device(g) for g in gs])
    assert_same(cpu, cpu_p, gpu, gpu_p)


def special_grads(shapes, rng, steps):
    """Gradients that put NaN and +-Inf into 8-bit blocks (full blocks, partial last
    blocks of a row, a row's last element) and a finite 3e38 whose square overflows
    (exp_avg finite, exp_avg_sq Inf), a different set each step."""
    out = []
    for t in range(steps):
        gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        a, b = gs
        a[1 + t, 5] = np.inf                  # a full block
        a[2 + t, 290] = np.nan                # the partial last block of a row (44)
        a[3 + t, 270] = -np.inf
        a[4 + t, 10] = 3e38
        b[5 + t, 7] = np.nan                  # rows of 100: one partial block each
        b[6 + t, 99] = np.inf                 # the row's last element
        b[7 + t, 0] = -3e38
        out.append(gs)
    return out


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_q8_partial_and_special_blocks_match_numba(name):
    """8-bit state with NaN and +-Inf values (special codes) in full and partial
    blocks: the blocks' scales are their largest finite magnitudes and the codes the
    numba driver's, bit for bit in the simulator; later steps decode the special codes
    (dense, then a row-sparse step over the rows that hold them).  A (16, 300) matrix
    (blocks of 256 + 44) and a (48, 100) one (one partial block a row), in one
    bucket."""
    rule = RULES[name]
    shapes = [SHAPE, (48, 100)]
    params = params_of(shapes, np.float32)
    cpu, cpu_p, gpu, gpu_p = pair(name, params, state_bits=8, **richest_variant(rule, 8))
    rng = np.random.default_rng(12)
    for gs in special_grads(shapes, rng, 2):
        cpu.step(gs)
        gpu.step([cuda.to_device(g) for g in gs])
    idx = np.array([1, 2, 3, 9, 2, 5])
    vals = rng.standard_normal((6, 300)).astype(np.float32)
    vals[0, 260] = np.inf
    g = fastopt.RowSparse(idx, vals)
    cpu.step([g, None])
    gpu.step([g, None])
    slot = rule.slots[0]                        # signed: +Inf 127, NaN 128, -Inf 129
    for st in gpu.state_dict()["state"].values():
        assert st[slot].dtype == np.uint8
        assert {127, 128} <= set(np.unique(st[slot]).tolist()), "special codes stored"
    assert_same(cpu, cpu_p, gpu, gpu_p)


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_dense_float64_matches_numba(name, bits):
    """float64 parameters: bfloat16 / 8-bit state computed in float64, and
    state_bits=32 (float32 state); grad_scale on."""
    rule = RULES[name]
    params = params_of([SHAPE], np.float64)
    for b in (bits, 32):
        cpu, cpu_p, gpu, gpu_p = pair(name, params, state_bits=b, **richest_variant(rule, b))
        for gs in dense_grads([SHAPE], np.float64, STEPS):
            cpu.step(gs, grad_scale=2.0)
            gpu.step([cuda.to_device(g) for g in gs], grad_scale=2.0)
        assert_same(cpu, cpu_p, gpu, gpu_p)


# ------------------------------------------------------ exact sparse steps

def exact_rules():
    return [pytest.param(n, id=n) for n, r in RULES.items()
            if r.layout != "rowwise" and exact_variant(r) is not None]


@pytest.mark.parametrize("bits", [16, 8])
@pytest.mark.parametrize("name", exact_rules())
def test_sparse_exact_matches_numba(name, bits):
    """Exact sparse mode: the catch-up of rows skipped for some steps, then a flush
    (catch-up only) of every pending row."""
    rule = RULES[name]
    params = params_of([SHAPE], np.float32)
    cpu, cpu_p, gpu, gpu_p = pair(name, params, state_bits=bits, sparse_mode="exact",
                                  **exact_variant(rule))
    rng = np.random.default_rng(4)
    for _ in range(3):
        g = sparse_grad(SHAPE[0], SHAPE[1:], np.float32, rng, nnz=4)
        cpu.step([g])
        gpu.step([g])
    cpu.flush()
    gpu.flush()
    assert_same(cpu, cpu_p, gpu, gpu_p)


@pytest.mark.parametrize("bits", [16, 8])
def test_sparse_exact_keeps_signed_zeros(bits):
    """Exact sparse mode: rows stepped at consecutive steps (their catch-up map the
    identity) keep a -0.0 parameter where the gradient is 0, as numba does (catching
    them up by the identity would turn -0.0 into +0.0); then a flush."""
    params = params_of([SHAPE], np.float32)
    params[0][:, ::5] = -0.0
    cpu, cpu_p, gpu, gpu_p = pair("SGD", params, state_bits=bits, sparse_mode="exact",
                                  lr=0.1, momentum=0.9)
    rng = np.random.default_rng(9)
    for rows in ([0, 3, 7], [0, 3, 9], [0, 3, 7]):
        vals = rng.standard_normal((3,) + SHAPE[1:]).astype(np.float32)
        vals[:, ::5] = 0.0
        g = fastopt.RowSparse(np.array(rows), vals)
        cpu.step([g])
        gpu.step([g])
    cpu.flush()
    gpu.flush()
    assert np.signbit(cpu_p[0][[0, 3], ::5]).all(), "numba keeps the signed zeros"
    assert_same(cpu, cpu_p, gpu, gpu_p)


@pytest.mark.parametrize("bits", [16, 8])
def test_max_norm_matches_numba(bits):
    """max_norm (the row buffer, renormalized before the stores), with clipping and
    clamps: sparse and dense steps (a dense step of a max_norm group runs by rows)."""
    opts = dict(max_norm=1.5, clip_value=0.8, param_min=-1.2, param_max=1.1)
    params = params_of([SHAPE], np.float32)
    cpu, cpu_p, gpu, gpu_p = pair("Adam", params, state_bits=bits, **opts)
    rng = np.random.default_rng(5)
    g = sparse_grad(SHAPE[0], SHAPE[1:], np.float32, rng)
    cpu.step([g])
    gpu.step([g])
    d = rng.standard_normal(SHAPE).astype(np.float32)
    cpu.step([d])
    gpu.step([cuda.to_device(d)])
    assert_same(cpu, cpu_p, gpu, gpu_p)


def test_rowwise_float64_float32_state():
    """A row-wise rule with float64 parameters and state_bits=32 keeps float32
    per-row state (the stored row-wise kernel): dense and sparse steps, max_norm."""
    params = params_of([(6, 40)], np.float64)
    cpu, cpu_p, gpu, gpu_p = pair("RowWiseAdagrad", params, state_bits=32, lr=0.1,
                                  max_norm=2.0, clip_value=1.0)
    rng = np.random.default_rng(6)
    g = sparse_grad(6, (40,), np.float64, rng)
    cpu.step([g])
    gpu.step([g])
    d = rng.standard_normal((6, 40))
    cpu.step([d])
    gpu.step([cuda.to_device(d)])
    assert gpu.state_dict()["state"][0]["sum"].dtype == np.float32
    assert_same(cpu, cpu_p, gpu, gpu_p)


@pytest.mark.parametrize("bits", [16, 8])
def test_state_dict_moves_between_backends(bits):
    """A numba state_dict (bfloat16 / uint8 / float32 scale arrays) loads into the
    CUDA optimizer and back; the next steps agree bit for bit."""
    params = params_of([SHAPE], np.float32)
    cpu, cpu_p, gpu, gpu_p = pair("Adam", params, state_bits=bits)
    gs = dense_grads([SHAPE], np.float32, 3)
    cpu.step(gs[0])
    gpu_p[0].copy_to_device(cpu_p[0])
    gpu.load_state_dict(cpu.state_dict())
    for g in gs[1:]:
        cpu.step(g)
        gpu.step([cuda.to_device(x) for x in g])
    assert_same(cpu, cpu_p, gpu, gpu_p)
    back = fastopt.Adam([cpu_p[0].copy()], backend="numba", state_bits=bits)
    back.load_state_dict(gpu.state_dict())
    assert_same(cpu, cpu_p, gpu, gpu_p)


# ------------------------------------------------------ bfloat16 parameters
#
# bfloat16 parameters live on the device as uint16 bits marked with cb.bfloat16;
# every rule, the four bf16_update modes cycled over the rules and the state widths,
# against the numba backend bit for bit.

MODES = storage.BF16_UPDATES
ALL_RULES = list(RULES)


def bf16_case(name):
    """(bf16_update, state_bits) of rule ``name``: modes cycle over the rules, state
    widths over the rules shifted every four, so every mode meets several widths."""
    i = ALL_RULES.index(name)
    return MODES[i % 4], (None, 16, 8, 32)[(i + i // 4) % 4]


def bf16_device(h):
    """A marked device copy of host bfloat16 (or float32, rounded) values."""
    return cb.bfloat16(cuda.to_device(np.asarray(h, dtype=BF16).view(np.uint16)))


def bf16_params(shapes, seed=1):
    return [p.astype(BF16) for p in params_of(shapes, np.float32, seed)]


def bf16_pair(name, params, **kw):
    """The same optimizer on host bfloat16 copies (numba) and marked device copies."""
    cpu_p = [p.copy() for p in params]
    gpu_p = [bf16_device(p) for p in params]
    cpu = fastopt.CLASSES[name](cpu_p, backend="numba", **kw)
    gpu = fastopt.CLASSES[name](gpu_p, backend="cuda", **kw)
    return cpu, cpu_p, gpu, gpu_p


def bf16_same(cpu, cpu_p, gpu, gpu_p):
    assert_same(cpu, cpu_p, gpu, [_Host(d) for d in gpu_p])


class _Host:
    """A marked device parameter whose host copy is bfloat16 (as the numba one)."""

    def __init__(self, d):
        self.d = d

    def copy_to_host(self):
        return self.d.copy_to_host().view(BF16)


#: the rules that take bfloat16 parameters (schedule-free's refuse them,
#: Rule.bf16_reason); the whole-tensor rules' stored passes: test_stored_passes_*
BF16_RULES = [pytest.param(n, id=n) for n, r in RULES.items()
              if r.bf16_reason is None and not r.whole_tensor]


def codes_close(got, want, what):
    """Stored values after steps whose norms were summed in another order than the
    CPU's: to rounding of the codes.  bfloat16 bits and 8-bit codes: most equal, the
    rest one code step apart; float arrays (scales, float32 state): to 1e-5
    relative."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if got.dtype == BF16 or got.dtype.kind == "u":
        iv = np.uint8 if got.dtype.itemsize == 1 else np.uint16
        g = got.view(iv).astype(np.int64)
        w = want.view(iv).astype(np.int64)
        d = np.abs(g - w)
        assert d.max(initial=0) <= 1, f"{what}: codes {d.max()} steps apart"
        assert (d == 0).mean() >= 0.9 if d.size else True, \
            f"{what}: only {(d == 0).mean():.2%} of the codes equal"
    else:
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=1e-5, atol=1e-7, err_msg=what)


def master(high, low):
    """``split``'s float32 master from the parameter's bfloat16 bits and
    ``master_low``."""
    hi = np.asarray(high).view(np.uint16).astype(np.uint32)
    return ((hi << 16) | np.asarray(low).astype(np.uint32)).view(np.float32)


#: (rule, bf16_update, state_bits): bfloat16 parameters with float32 state and with
#: 16- and 8-bit state, two update modes each
STORED_PASS_CASES = [pytest.param(n, m, b, id=f"{n}-{m}-{b}")
                     for n in ("LAMB", "LARS", "Muon")
                     for m, b in (("nearest", None), ("split", 16), ("stochastic", 8),
                                  ("kahan", 16), ("nearest", 8))]


@pytest.mark.parametrize("name,mode,bits", STORED_PASS_CASES)
def test_stored_passes_match_numba(name, mode, bits):
    """LAMB and LARS (the norm pass reading the stored formats) and Muon (phase 1 with
    a stored momentum buffer) with bfloat16 parameters on CUDA against the numba
    backend over three steps: float32 device gradients, then marked bfloat16 ones.
    A 16 x 300 tensor (two 8-bit blocks per row) and a small one in one bucket."""
    from fastopt.backends.cuda import CudaBackend
    assert "stored_passes" in CudaBackend.features
    shapes = [SHAPE, (4, 6)]
    params = bf16_params(shapes)
    kw = dict(bf16_update=mode, seed=5, lr=0.01)
    if bits is not None:
        kw["state_bits"] = bits
    cpu, cpu_p, gpu, gpu_p = bf16_pair(name, params, **kw)
    rng = np.random.default_rng(3)
    for t in range(3):
        gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if t < 2:
            dev = [cuda.to_device(g) for g in gs]
        else:
            gs = [g.astype(BF16) for g in gs]
            dev = [bf16_device(g) for g in gs]
        assert cpu.step(gs) and gpu.step(dev)
    for k, (c, d) in enumerate(zip(cpu_p, gpu_p)):
        codes_close(d.copy_to_host().view(BF16), c, f"{name} parameter {k}")
    want, got = cpu.state_dict()["state"], gpu.state_dict()["state"]
    assert set(got) == set(want)
    for i, st in want.items():
        assert set(got[i]) == set(st), i
        for key, v in st.items():
            if key == "master_low":     # split's float32 master: bits of a float32 value
                codes_close(master(gpu_p[i].copy_to_host(), got[i][key]),
                            master(cpu_p[i].view(np.uint16), v), f"{name} master {i}")
            elif key == "kahan_comp":   # the rounding residual: compare p + comp
                np.testing.assert_allclose(
                    gpu_p[i].copy_to_host().view(BF16).astype(np.float64)
                    + np.asarray(got[i][key], np.float64),
                    cpu_p[i].astype(np.float64) + np.asarray(v, np.float64),
                    rtol=1e-4, atol=1e-6, err_msg=f"{name} kahan {i}")
            elif isinstance(v, np.ndarray) and v.ndim:
                codes_close(got[i][key], v, f"{name} state {key!r} of parameter {i}")
            else:
                assert got[i][key] == v, key


@pytest.mark.parametrize("name,bits", [("LAMB", 8), ("LARS", 16), ("Muon", 8)])
def test_stored_passes_float32_params_match_numba(name, bits):
    """float32 parameters with 16/8-bit state: the norm pass decoding the state (LAMB
    reads m and v) and Muon's phase 1 encoding its buffer, against numba."""
    params = params_of([SHAPE], np.float32)
    cpu, cpu_p, gpu, gpu_p = pair(name, params, state_bits=bits, lr=0.01)
    for gs in dense_grads([SHAPE], np.float32, 3):
        assert cpu.step(gs) and gpu.step([cuda.to_device(g) for g in gs])
    np.testing.assert_allclose(gpu_p[0].copy_to_host(), cpu_p[0], rtol=1e-5, atol=1e-6)
    want, got = cpu.state_dict()["state"], gpu.state_dict()["state"]
    for key, v in want[0].items():
        if isinstance(v, np.ndarray) and v.ndim:
            codes_close(got[0][key], v, f"{name} state {key!r}")


def test_stored_norms_are_the_same_for_any_grid(monkeypatch):
    """The stored norm pass gives the same bits whatever the number of blocks (the
    chunk table fixes the order of summation)."""
    out = []
    for blocks in (1, 3, 7):
        monkeypatch.setattr(cb, "MAX_BLOCKS", blocks)
        p = [bf16_device(bf16_params([SHAPE])[0])]
        opt = fastopt.LAMB(p, backend="cuda", state_bits=8, lr=0.01)
        rng = np.random.default_rng(4)
        for _ in range(2):
            opt.step([cuda.to_device(rng.standard_normal(SHAPE).astype(np.float32))])
        out.append(p[0].copy_to_host())
    for o in out[1:]:
        same_bytes(o, out[0], "parameter")


@pytest.mark.parametrize("name", BF16_RULES)
def test_bf16_dense_matches_numba(name):
    """Dense steps with bfloat16 parameters, every rule (a 0-d tensor for the
    element-wise ones; a 4100-element tensor for 8-bit state): float32 device
    gradients, then marked bfloat16, host bfloat16 and float64 device ones mixed
    (bfloat16 widened: one gradient dtype per bucket).  Marked bfloat16 gradients
    alone: the fused and state_dict tests."""
    rule = RULES[name]
    mode, bits = bf16_case(name)
    shapes = [(6, 40), (5,)]
    if rule.layout != "rowwise":
        shapes.append(())
    if bits == 8:
        shapes.append((4100,))
    params = bf16_params(shapes)
    cpu, cpu_p, gpu, gpu_p = bf16_pair(name, params, bf16_update=mode, state_bits=bits,
                                       seed=7, **rules.variant(rule, -1, bits))
    rng = np.random.default_rng(2)
    for t in range(2):
        gs = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        if t == 0:
            dev = [cuda.to_device(g) for g in gs]
        else:
            gs = [g.astype(BF16) if k != 1 else g for k, g in enumerate(gs)]
            dev = [bf16_device(g) if k % 2 == 0 else g for k, g in enumerate(gs)]
            dev[1] = cuda.to_device(gs[1].astype(np.float64))
        cpu.step(gs)
        gpu.step(dev)
    bf16_same(cpu, cpu_p, gpu, gpu_p)


@pytest.mark.parametrize("name", BF16_RULES)
def test_bf16_sparse_matches_numba(name):
    """Row-sparse steps (lazy, duplicate indices) with bfloat16 parameters, every
    rule; 8-bit state on a (16, 300) matrix (two blocks per row)."""
    rule = RULES[name]
    mode, bits = bf16_case(name)
    shape = SHAPE if bits == 8 and rule.layout != "rowwise" else (12, 20)
    params = bf16_params([shape])
    cpu, cpu_p, gpu, gpu_p = bf16_pair(name, params, bf16_update=mode, state_bits=bits,
                                       seed=5, **rules.variant(rule, -1, bits))
    rng = np.random.default_rng(3)
    for t in range(2):
        g = sparse_grad(shape[0], shape[1:], np.float32 if t == 0 else BF16, rng, nnz=5)
        cpu.step([g])
        gpu.step([g])
    bf16_same(cpu, cpu_p, gpu, gpu_p)


@pytest.mark.parametrize("name,mode,bits", [("SGD", "kahan", 16), ("Adagrad", "stochastic", None),
                                            ("RMSprop", "split", 32)])
def test_bf16_sparse_exact_matches_numba(name, mode, bits):
    """Exact sparse mode with bfloat16 parameters (catch-up, then a flush): the
    rules with a closed form, each with another mode (the kahan store takes the
    caught-up value, the stochastic one the element's stream)."""
    rule = RULES[name]
    params = bf16_params([(10, 8)])
    cpu, cpu_p, gpu, gpu_p = bf16_pair(name, params, bf16_update=mode, state_bits=bits,
                                       sparse_mode="exact", **exact_variant(rule))
    rng = np.random.default_rng(4)
    for _ in range(3):
        g = sparse_grad(10, (8,), np.float32, rng, nnz=3)
        cpu.step([g])
        gpu.step([g])
    cpu.flush()
    gpu.flush()
    bf16_same(cpu, cpu_p, gpu, gpu_p)


def awkward(shape, rng):
    """Gradients with huge, tiny (subnormal), zero, NaN and Inf entries."""
    g = rng.standard_normal(shape).astype(np.float32)
    flat = g.reshape(-1)
    flat[0:3] = [3e38, -1e30, 1e-40]
    flat[3:6] = [0.0, -0.0, 1e-30]
    flat[6] = np.nan
    flat[7] = np.inf
    flat[8] = -np.inf
    return g


@pytest.mark.parametrize("mode,max_norm", [("split", None), ("kahan", 1.5),
                                           ("stochastic", None), ("nearest", 1.5)])
def test_bf16_fused_awkward_matches_numba(mode, max_norm):
    """Every fused option with bfloat16 parameters (clip_value, l1, clamps, max_norm
    through the row kernel for two of the modes, grad_scale) and awkward gradients,
    dense then sparse; skip_nonfinite skips a step with an Inf in a marked bfloat16
    gradient."""
    opts = dict(clip_value=0.8, l1=0.01, param_min=-1.2, param_max=1.1)
    if max_norm is not None:
        opts["max_norm"] = max_norm
    bits = (None, 16, 32, 16)[MODES.index(mode)]
    shape = (4, 40)
    params = bf16_params([shape, (12,)])
    params[0].reshape(-1)[10:13] = [1e30, -3e38, 1e-39]
    cpu, cpu_p, gpu, gpu_p = bf16_pair("Adam", params, bf16_update=mode, state_bits=bits,
                                       seed=11, **opts)
    rng = np.random.default_rng(8)
    gs = [awkward(shape, rng), rng.standard_normal(12).astype(np.float32)]
    gs[1][3] = 1e38
    cpu.step(gs, grad_scale=4.0)
    gpu.step([cuda.to_device(g) for g in gs], grad_scale=4.0)
    gb = [g.astype(BF16) for g in gs]
    assert not cpu.step(gb, grad_scale=2.0, skip_nonfinite=True)
    assert not gpu.step([bf16_device(g) for g in gb], grad_scale=2.0, skip_nonfinite=True)
    gb = [np.nan_to_num(g.astype(np.float32), nan=0.5, posinf=2e30, neginf=-7.0).astype(BF16)
          for g in gb]
    assert cpu.step(gb, skip_nonfinite=True)
    assert gpu.step([bf16_device(g) for g in gb], skip_nonfinite=True)
    sp = sparse_grad(4, (40,), np.float32, rng, nnz=4)
    sp.values[0, :3] = [np.inf, 1e-41, -2e38]
    cpu.step([sp, None], grad_scale=0.5)
    gpu.step([sp, None], grad_scale=0.5)
    bf16_same(cpu, cpu_p, gpu, gpu_p)


@pytest.mark.parametrize("mode,bits", [("split", 8), ("kahan", 16), ("stochastic", 32)])
def test_bf16_state_dict_round_trip(mode, bits):
    """state_dict of bfloat16 parameters: the CPU backends' arrays and dtypes
    (master_low uint16, kahan_comp bfloat16, ...); a numba state_dict loads into the
    CUDA optimizer and back, and the resumed steps agree bit for bit."""
    shapes = [SHAPE] if bits == 8 else [(6, 40)]
    params = bf16_params(shapes)
    cpu, cpu_p, gpu, gpu_p = bf16_pair("Adam", params, bf16_update=mode, state_bits=bits,
                                       seed=3)
    gs = [[g.astype(BF16) for g in gg] for gg in dense_grads(shapes, np.float32, 3)]
    cpu.step(gs[0])
    gpu_p[0].copy_to_device(cpu_p[0].view(np.uint16))
    gpu.load_state_dict(cpu.state_dict())
    for g in gs[1:]:
        cpu.step(g)
        gpu.step([bf16_device(x) for x in g])
    bf16_same(cpu, cpu_p, gpu, gpu_p)
    st = gpu.state_dict()["state"][0]
    aux = storage.Storage(param="bfloat16", update=mode).aux
    if aux is not None:
        assert st[aux].dtype == (np.uint16 if aux == storage.MASTER_LOW else BF16)
    assert st["exp_avg"].dtype == {8: np.uint8, 16: BF16, 32: np.float32}[bits]
    assert gpu.backend.to_host(gpu.param_groups[0]["params"][0]).dtype == BF16
    back = fastopt.Adam([cpu_p[0].copy()], backend="numba", bf16_update=mode, state_bits=bits,
                        seed=3)
    back.load_state_dict(gpu.state_dict())
    g = [rng_g.astype(BF16) for rng_g in dense_grads(shapes, np.float32, 1, seed=9)[0]]
    back.step(g)
    gpu.step([bf16_device(x) for x in g])
    bf16_same(back, back.param_groups[0]["params"], gpu, gpu_p)


def test_stored_tables_are_prepared_once_per_plan(monkeypatch):
    """Stored-format buckets follow the plain ones' mechanism
    (``test_dense_tables_are_prepared_once_per_plan``): the tables (pointer, chunk and
    format tables) go to the device on a bucket's first launch, and a step of the
    cached plan copies only its gradient addresses, stream keys and scalar rows.
    Stochastic rounding with 8-bit state: the keys change every step, so a stale key
    would break the bit-for-bit agreement with the numba backend."""
    uploads = {}
    real = cb.launch._upload

    def counting(what, dev_array, host_array):
        uploads[what] = uploads.get(what, 0) + 1
        return real(what, dev_array, host_array)

    monkeypatch.setattr(cb.launch, "_upload", counting)
    params = bf16_params([SHAPE], seed=5)
    cpu, cpu_p, gpu, gpu_p = bf16_pair("Adam", params, bf16_update="stochastic",
                                       state_bits=8, lr=0.01, seed=3)
    for k, gs in enumerate(dense_grads([SHAPE], np.float32, 5, seed=6)):
        cpu.step(gs)
        gpu.step([cuda.to_device(g) for g in gs])
        if k == 1:
            assert uploads.get("tables", 0) >= 1
            uploads.clear()
    assert uploads == {"step": 3}
    bf16_same(cpu, cpu_p, gpu, gpu_p)


def test_bf16_marking_and_refusals():
    """cb.bfloat16 marks uint16 / int16 device arrays (a view, no copy); unmarked
    uint16 parameters and gradients, float16 and host bfloat16 arrays are refused."""
    h = np.arange(12, dtype=np.float32).astype(BF16).reshape(3, 4)
    raw = cuda.to_device(h.view(np.uint16))
    m = cb.bfloat16(raw)
    assert cb.is_bf16_state(m) and m.dtype == np.uint16 and not cb.is_bf16_state(raw)
    m16 = cb.bfloat16(cuda.to_device(h.view(np.int16)))
    assert cb.is_bf16_state(m16) and m16.dtype == np.uint16
    for bad in (cuda.to_device(np.zeros(3, np.float32)), np.zeros(3, np.uint16)):
        with pytest.raises(TypeError, match="uint16 or int16"):
            cb.bfloat16(bad)
    with pytest.raises(ValueError, match="contiguous"):
        cb.bfloat16(cuda.to_device(np.zeros((4, 6), np.uint16))[:, ::2])
    with pytest.raises(TypeError, match=r"fastopt\.backends\.cuda\.bfloat16"):
        fastopt.Adam([raw], backend="cuda")
    with pytest.raises(TypeError, match="float16"):
        fastopt.Adam([cuda.to_device(np.zeros(3, np.float16))], backend="cuda")
    with pytest.raises(TypeError, match="device arrays"):
        fastopt.Adam([h.copy()], backend="cuda")
    opt = fastopt.SGD([m], backend="auto", lr=0.5)
    assert opt.backend.name == "cuda"
    with pytest.raises(TypeError, match="float dtype"):
        opt.step([cuda.to_device(np.ones((3, 4), np.uint16))])
    with pytest.raises(ValueError, match="shape"):
        opt.step([bf16_device(np.ones((4, 3)))])
    assert opt.step([bf16_device(np.ones((3, 4)))])
    same_bits(m.copy_to_host().view(BF16), (h.astype(np.float32) - 0.5).astype(BF16), "SGD")
    same_bits(raw.copy_to_host(), m.copy_to_host(), "the mark is a view")


# ------------------------------------------------------------ row ranges
#
# Optimizer.set_row_range (the sharded optimizer's pieces): pieces of a tensor on
# the device, each declared at its rows, stepped alone, equal the whole tensor
# stepped on the numba backend (the stochastic-rounding element base and the
# whole tensor's storage format in every stored kernel).

@pytest.mark.parametrize("name,shape,cuts,kw", [
    pytest.param("Adam", (16, 300), (5,), dict(bf16_update="stochastic", seed=4),
                 id="dense-2d"),
    pytest.param("AdamW", (4400,), (2304,), dict(bf16_update="stochastic", state_bits=8),
                 id="dense-1d-q8"),
    pytest.param("Adam", (16, 300), (9,), dict(bf16_update="stochastic", state_bits=16,
                                               max_norm=2.0), id="rows-max-norm"),
    pytest.param("RowWiseAdagrad", (16, 300), (3,), dict(bf16_update="stochastic"),
                 id="rowwise"),
    pytest.param("Adam", (16, 300), (7,), dict(bf16_update="stochastic", sparse=True),
                 id="sparse"),
])
def test_row_ranges_match_the_whole_tensor_on_numba(name, shape, cuts, kw):
    kw = dict(kw)
    sparse = kw.pop("sparse", False)
    rng = np.random.default_rng(1)
    w0 = (rng.standard_normal(shape) * 0.5).astype(np.float32).astype(BF16)
    whole = w0.copy()
    cpu = fastopt.CLASSES[name]([whole], backend="numba", **kw)
    bounds = [0, *cuts, shape[0]]
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        d = bf16_device(w0[a:b])
        o = fastopt.CLASSES[name]([d], backend="cuda", **kw)
        o.set_row_range(0, shape, a)
        pieces.append((o, d, a, b))
    for t in range(STEPS):
        g = rng.standard_normal(shape).astype(np.float32)
        if sparse:
            idx = rng.integers(0, shape[0], 9)
            cpu.step([fastopt.RowSparse(idx, g[idx])])
            for o, _, a, b in pieces:
                m = (idx >= a) & (idx < b)
                o.step([fastopt.RowSparse(idx[m] - a, g[idx[m]])])
        else:
            cpu.step([g])
            for o, _, a, b in pieces:
                o.step([cuda.to_device(np.ascontiguousarray(g[a:b]))])
    got = np.concatenate([_Host(d).copy_to_host().reshape(-1) for _, d, _, _ in pieces])
    same_bits(got, whole.reshape(-1), "parameters")
    want = cpu.state_dict()["state"][0]
    parts = [o.state_dict()["state"][0] for o, _, _, _ in pieces]
    for key, v in want.items():
        if isinstance(v, np.ndarray):
            same_bits(np.concatenate([s[key].reshape(-1) for s in parts]), v.reshape(-1),
                      f"state {key!r}")
        else:
            assert all(s[key] == v for s in parts), key


# ------------------------------------------------- the real compiler (no GPU)

@pytest.mark.skipif(not SIM, reason="on a GPU the tests above compile every kernel")
def test_stored_kernels_compile_for_a_gpu():
    """The simulator cannot see what the CUDA compiler rejects (numba-cuda lacked
    ``np.floor``, which the 8-bit codecs use).  Where NVVM is installed, compile every
    stored-format kernel to PTX in a process without the simulator."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                         capture_output=True, text=True, timeout=900)
    out = res.stdout + res.stderr
    if res.returncode == 3:
        pytest.skip(out.strip().splitlines()[-1])
    assert res.returncode == 0, out
