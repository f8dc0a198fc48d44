"""The Cython backend's stored formats (``kernels/_cy_storage.pxi``: bfloat16
parameters, float32 / bfloat16 / 8-bit state, bfloat16 or float32 gradients)
against the Numba CPU backend, bit for bit.

(a) the C codecs against the NumPy definition (``fastopt.storage.reference``):
    bfloat16 rounding (nearest, stochastic), split / join, widening, the random
    bits, the 8-bit codes (every code decoded, random values encoded per block);
(b) every registry rule (first and last variant), state_bits 32, 16 and 8,
    bfloat16 parameters with every ``bf16_update`` and bfloat16 or float32
    gradients, dense and row-sparse steps (duplicate indices) on (16, 300) tensors
    (8-bit: 2 blocks per row), the parameters (their bits) and every state array of
    ``state_dict()`` compared;
(c) float32 and float64 parameters with 16-bit, 8-bit and (float64) float32 state;
(d) the fused options (grad_scale, clip, L1, clamps, max_norm) and awkward
    gradients (huge, tiny, zero, NaN / Inf; a NaN equals any NaN);
    (b)-(d): the pairwise cases of tests/cases.py (STORED), which
    tests/test_storage.py runs against the reference (the same compiled drivers);
(e) exact sparse mode with catch-up and a flush (STORED_EXACT);
(f) parallel sizes (>= 32768 elements): serial vs parallel drivers, 1 vs 2 OpenMP
    threads;
(g) the entry points refuse bad tables.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

_cy_dense = pytest.importorskip("fastopt._cy_dense",
                                reason="the Cython extension fastopt._cy_dense is not built")
ml_dtypes = pytest.importorskip("ml_dtypes")

import fastopt  # noqa: E402
from fastopt import rules, storage  # noqa: E402
from fastopt.backends import numba_cpu  # noqa: E402
from fastopt.backends import cython as cy_backend  # noqa: E402
from fastopt.storage import reference as ref  # noqa: E402

from cases import (STORED, STORED_EXACT, STORED_WHOLE, param_dtype, same,  # noqa: E402
                   storage_of, stored_variant)
from cases import same_optimizers as _same_optimizers  # noqa: E402

BACKEND = cy_backend.register_backend()
assert BACKEND is not None, fastopt.backends.unavailable().get("cython")

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPE = (16, 300)


# ------------------------------------------------------------------ helpers

def same_optimizers(on, oc):
    """Parameters and every array of ``state_dict()["state"]`` of two optimizers."""
    _same_optimizers(on, oc, state_dict=True)


def init_param(shape, dtype, seed=1):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(shape)
    f = p.reshape(-1)
    f[::9] *= 1e-3
    f[3::11] = 0.0
    f[5::13] = -0.0
    return p.astype(dtype)


def grad(rng, shape, dtype, t, awkward=False):
    g = rng.standard_normal(shape)
    g[rng.random(shape) < 0.1] = 0.0
    if awkward:
        f = g.reshape(-1)
        kind = t % 5
        if kind == 1:
            f[::7] *= 1e30
        elif kind == 2:
            g *= 1e-30
        elif kind == 3:
            f[:3] = (np.nan, np.inf, -np.inf)
    return g.astype(dtype)


def sparse_grad(rng, shape, dtype, t, nnz, awkward=False):
    rows = rng.choice(shape[0], nnz, replace=False)
    rows = np.concatenate([rows, rows[: max(2, nnz // 4)], rows[:1]])     # duplicates
    return fastopt.RowSparse(rows.astype(np.int64),
                             grad(rng, (rows.shape[0],) + shape[1:], dtype, t, awkward))


def run(backend, name, variant, pdt, bits, update, gdt, kinds, shape=SHAPE, nnz=10,
        grad_scale=None, mode="lazy", awkward=False, seed=0):
    """Steps of kinds ``"d"`` (dense) / ``"s"`` (row-sparse) on one parameter."""
    rng = np.random.default_rng(seed)
    p = init_param(shape, pdt)
    kw = dict(state_bits=bits, seed=11, sparse_mode=mode, **variant)
    if np.dtype(pdt) == BF16:
        kw["bf16_update"] = update
    opt = fastopt.CLASSES[name]([p], backend=backend, **kw)
    for t, kind in enumerate(kinds):
        g = grad(rng, shape, gdt, t, awkward) if kind == "d" else \
            sparse_grad(rng, shape, gdt, t, nnz, awkward)
        opt.step([g], grad_scale=grad_scale)
    return opt


def both(*args, **kw):
    return run("numba", *args, **kw), run("cython", *args, **kw)


# ------------------------------------------------------------- (a) codecs

def test_cython_has_the_storage_features():
    assert {"bfloat16", "state16", "state8"} <= BACKEND.features
    assert _cy_dense.Q8_BLOCK_BUILT == storage.Q8_BLOCK


def _random_floats(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0,
                        3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 1.17549435e-38],
                       dtype=np.float32)
    near = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(np.float32)
    return np.concatenate([special, x, near])


def test_bf16_codecs_match_the_reference():
    x = _random_floats(200_000, 0)
    r = np.random.default_rng(1).integers(0, 1 << 16, x.shape[0]).astype(np.uint32)
    n = x.shape[0]
    near, sto, hi, lo = (np.empty(n, np.uint16) for _ in range(4))
    joined = np.empty(n, np.float32)
    _cy_dense.codec_bf16(x, r, near, sto, hi, lo, joined)
    np.testing.assert_array_equal(near, ref.round_nearest(x))
    np.testing.assert_array_equal(sto, ref.round_stochastic(x, r))
    rh, rl = ref.split(x)
    np.testing.assert_array_equal(hi, rh)
    np.testing.assert_array_equal(lo, rl)
    np.testing.assert_array_equal(joined.view(np.uint32), ref.join(rh, rl).view(np.uint32))
    u = np.arange(1 << 16, dtype=np.uint16)
    w = np.empty(u.shape[0], np.float32)
    _cy_dense.codec_widen(u, w)
    np.testing.assert_array_equal(w.view(np.uint32), ref.widen(u).view(np.uint32))


def test_random_bits_match_the_reference():
    rng = np.random.default_rng(2)
    e = np.concatenate([np.arange(5000), rng.integers(0, 2 ** 62, 5000)]).astype(np.int64)
    for key in (0, 1, 0xFFFFFFFF, storage.stream_key(3, 7, 11)):
        out = np.empty(e.shape[0], np.uint32)
        _cy_dense.codec_random16(key, e, out)
        np.testing.assert_array_equal(out, ref.random16(key, e))


def _q8(signed, x=None, inv=None, c=None, s=None):
    """The C 8-bit codecs: (encode(x, inv), magnitude(x), decode(c, s),
    scale_inverse(s))."""
    f32, none = np.float32, np.zeros(0, np.float32)
    x = none if x is None else np.ascontiguousarray(x, f32)
    inv = none if inv is None else np.ascontiguousarray(inv, f32)
    c = np.zeros(0, np.uint8) if c is None else np.ascontiguousarray(c, np.uint8)
    s = none if s is None else np.ascontiguousarray(s, f32)
    enc, mag = np.empty(x.size, np.uint8), np.empty(x.size, f32)
    dec, invs = np.empty(c.size, f32), np.empty(c.size, f32)
    _cy_dense.codec_q8(signed, x, inv, enc, c, s, dec, mag, invs)
    return enc, mag, dec, invs


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_q8_codecs_match_the_reference(signed):
    B = storage.Q8_BLOCK
    rng = np.random.default_rng(3 + signed)
    nb = 64
    # decode: every code, under random scales (one per block)
    codes = np.tile(np.arange(256, dtype=np.uint8), nb)
    scales = (rng.random(nb) * 10.0 ** rng.integers(-20, 20, nb)).astype(np.float32)
    scales[:3] = (0.0, 1.0, 3.4028235e38)
    _, _, dec, _ = _q8(signed, c=codes, s=np.repeat(scales, B))
    with np.errstate(over="ignore"):
        same(dec, ref.q8_decode(codes, scales, (nb * B,), signed), "decode")
    # encode: values per block (wide ranges, zeros, NaN / Inf); scale = largest finite
    x = (rng.standard_normal(nb * B) * 10.0 ** rng.integers(-12, 12, nb * B)).astype(
        np.float32)
    x = x if signed else np.abs(x)
    x[rng.random(x.shape[0]) < 0.05] = 0.0
    x[7], x[300], x[301], x[302] = np.nan, np.inf, -np.inf, -0.0
    x[2 * B:3 * B] = 0.0                                    # an all-zero block
    x[3 * B:4 * B] = np.inf                                 # no finite value
    x[4 * B:5 * B] = 1e-40                                  # a subnormal scale
    want_codes, want_scales = ref.q8_encode(x, (nb * B,), signed)
    _, mag, _, _ = _q8(signed, x=x, inv=np.ones_like(x))
    block_scale = mag.reshape(nb, B).max(axis=1)
    same(block_scale, want_scales, "scales")
    _, _, _, inv = _q8(signed, c=np.zeros(nb), s=block_scale)
    with np.errstate(divide="ignore", over="ignore"):
        same(inv, np.minimum(np.float32(1) / block_scale, ref.FLT_MAX).astype(np.float32),
             "inverse")
    enc, _, _, _ = _q8(signed, x=x, inv=np.repeat(inv, B))
    same(enc, want_codes, "encode")
    # encode(decode(q)) == q under ordinary scales
    _, _, _, inv = _q8(signed, c=np.zeros(nb), s=scales)
    back, _, _, _ = _q8(signed, x=dec, inv=np.repeat(inv, B))
    ok = np.repeat((scales > 1e-30) & (scales < 1e30), B)
    np.testing.assert_array_equal(back[ok], codes[ok])


# ------------------------- (b)-(d) every stored case: formats, fused options

#: the fused options of the stored cases (tests/cases.py STORED; the same switches
#: as tests/test_storage.py's)
OPTIONS = dict(clip_value=0.5, l1=0.01, param_min=-1.5, param_max=1.25)
STORED_OPTIONS = {"none": ({}, None), "element": (OPTIONS, 4.0),
                  "max_norm": (dict(OPTIONS, max_norm=2.0), 4.0)}


@pytest.mark.parametrize("case", STORED.cases())
def test_stored_formats_bit_identical_to_numba(case):
    """Every stored case (tests/cases.py STORED: every rule, its first and last
    variant, x parameter dtype x state width x bf16_update x gradient dtype x fused
    options, pairwise; Adam in every format): dense and row-sparse steps (duplicate
    indices) on a (16, 300) tensor (8-bit: 2 blocks per row); with the fused
    options, grad_scale and awkward gradients (huge, tiny, zero, NaN / Inf).  The
    parameters (their bits) and every array of ``state_dict()`` compared, and the
    format checked to apply."""
    name = case["rule"]
    rule = rules.RULES[name]
    pdt = param_dtype(case)
    hyper, gs = STORED_OPTIONS[case["options"]]
    variant = {**stored_variant(case), **hyper}
    gdt = BF16 if case["grad"] == "bf16" else (np.float32 if pdt == BF16 else pdt)
    i = list(rules.RULES).index(name)
    on, oc = both(name, variant, pdt, case["bits"], case["update"], gdt, "dsdsd",
                  grad_scale=gs, awkward=case["options"] != "none", seed=i)
    same_optimizers(on, oc)
    st = oc.state_dict()["state"][0]
    fmt = storage_of(case, SHAPE)
    assert not fmt.native
    for slot in rule.slots:          # the format did apply
        if slot in st:
            assert st[slot].dtype == storage.state_dtype(fmt, pdt), (slot, st[slot].dtype)
            assert (slot + storage.SCALE_SUFFIX in st) == (fmt.state == "q8"), slot
    if case["update"] in ("split", "kahan"):
        assert storage.Storage(update=case["update"]).aux in st


@pytest.mark.parametrize("case", STORED_WHOLE.cases())
def test_whole_tensor_stored_formats_bit_identical_to_numba(case):
    """LAMB, LARS (the stored norm pass, ``run_stored_norms``) and Muon (phase 1 on
    the decoded momentum buffer, phase 2 the stored dense driver) in every
    STORED_WHOLE case: dense steps on a (16, 300) tensor (8-bit: 2 blocks per row),
    with the element-wise options, grad_scale and awkward gradients where the case
    has them; parameters (bits) and every state array compared."""
    name = case["rule"]
    pdt = param_dtype(case)
    hyper, gs = STORED_OPTIONS[case["options"]] if case["options"] != "none" else ({}, None)
    hyper = {k: v for k, v in hyper.items() if k != "max_norm"}
    variant = {**stored_variant(case), **hyper}
    gdt = BF16 if case["grad"] == "bf16" else (np.float32 if pdt == BF16 else pdt)
    on, oc = both(name, variant, pdt, case["bits"], case["update"], gdt, "d" * 8,
                  grad_scale=gs, awkward=case["options"] != "none")
    same_optimizers(on, oc)
    fmt = storage_of(case, SHAPE)
    st = oc.state_dict()["state"][0]
    for slot in rules.RULES[name].slots:        # the format did apply
        assert st[slot].dtype == storage.state_dtype(fmt, pdt), slot


@pytest.mark.parametrize("name", ["LAMB", "LARS"])
def test_stored_norm_pass_parallel_size_bit_identical_to_numba(name, monkeypatch):
    """The stored norm pass at a parallel size (several chunks, threads), and run
    serially: the same bits as numba's."""
    assert BIG[0] * BIG[1] >= numba_cpu.PARALLEL_MIN
    variant = dict(rules.variant(rules.RULES[name], 1, 8))
    on, oc = both(name, variant, BF16, 8, "split", BF16, "ddd", shape=BIG)
    same_optimizers(on, oc)
    monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", 1 << 40)
    same_optimizers(on, run("cython", name, variant, BF16, 8, "split", BF16, "ddd",
                            shape=BIG))


# ------------------------------------------------------- (e) exact sparse mode

@pytest.mark.parametrize("case", STORED_EXACT.cases())
def test_exact_mode_with_catch_up_and_flush(case):
    """Every stored exact case (tests/cases.py STORED_EXACT): sparse steps (rows
    caught up when touched), a dense step, sparse steps, then a flush."""
    name = case["rule"]
    pdt = param_dtype(case)
    variant = stored_variant(case)
    gs = None
    if case["options"] == "clip":
        variant["clip_value"], gs = 0.75, 2.0
    gdt = BF16 if pdt == BF16 else pdt

    def go(backend):
        return run(backend, name, variant, pdt, case["bits"], case["update"], gdt, "ssdss",
                   shape=(40, 300), nnz=6, mode="exact", grad_scale=gs, seed=case["bits"])
    on, oc = go("numba"), go("cython")
    same_optimizers(on, oc)
    for opt in (on, oc):
        opt.flush()
    same_optimizers(on, oc)


# ----------------------------------------------------- (f) parallel sizes

BIG = (128, 300)          # 38400 elements >= numba_cpu.PARALLEL_MIN


@pytest.mark.parametrize("name,bits,update", [("Adam", 8, "stochastic"), ("RMSprop", 8, "kahan"),
                                              ("SGD", 16, "split"), ("Lion", 8, "nearest"),
                                              ("RowWiseAdagrad", 8, "stochastic")])
def test_parallel_size_bit_identical_to_numba(name, bits, update):
    assert BIG[0] * BIG[1] >= numba_cpu.PARALLEL_MIN
    variant = rules.variant(rules.RULES[name], -1, bits)
    if name == "RMSprop":
        variant = {**variant, "max_norm": 3.0}
    on, oc = both(name, variant, BF16, bits, update, BF16, "dsd", shape=BIG, nnz=120)
    same_optimizers(on, oc)


def test_serial_and_parallel_cython_agree(monkeypatch):
    def go(parallel_min):
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", parallel_min)
        return [run("cython", "Adam", {"amsgrad": True}, BF16, 8, "stochastic", BF16, "dsd",
                    shape=(64, 300), nnz=40),
                run("cython", "RMSprop", rules.variant(rules.RULES["RMSprop"], -1, 8), np.float64, 8,
                    None, np.float64, "dsd", shape=(64, 300), nnz=40)]
    for a, b in zip(go(1 << 40), go(0)):
        same_optimizers(a, b)


_THREAD_SCRIPT = r"""
import hashlib
import numpy as np
import ml_dtypes
import fastopt
from fastopt import _cy_dense
print("threads", _cy_dense.openmp_max_threads())
BF = ml_dtypes.bfloat16
rng = np.random.default_rng(0)
for name, bits, upd in (("Adam", 8, "stochastic"), ("RMSprop", 16, "kahan"),
                        ("RowWiseAdagrad", 8, "split")):
    p = rng.standard_normal((300, 257)).astype(BF)
    opt = fastopt.CLASSES[name]([p], backend="cython", state_bits=bits, bf16_update=upd,
                                clip_value=0.5)
    for _ in range(2):
        opt.step([rng.standard_normal(p.shape).astype(BF)])
        idx = rng.integers(0, 300, 400)
        opt.step([fastopt.RowSparse(idx, rng.standard_normal((400, 257)).astype(np.float32))])
    h = hashlib.sha256(p.view(np.uint16).tobytes())
    for v in opt.state_dict()["state"][0].values():
        if isinstance(v, np.ndarray):
            h.update(np.ascontiguousarray(v).tobytes())
    print(name, h.hexdigest())
"""


def test_same_bits_with_one_and_two_openmp_threads():
    outs = {}
    here = os.path.dirname(os.path.abspath(__file__))
    for nthreads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(nthreads))
        res = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], env=env, cwd=here,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0] == f"threads {nthreads}"
        outs[nthreads] = lines[1:]
    assert len(outs[1]) == 3
    assert outs[1] == outs[2]


# ------------------------------------------------------- (g) bad arguments

def test_stored_entry_points_validate_tables():
    ext = _cy_dense
    T = 1
    p = np.zeros(512, np.uint16)
    ptrs = np.full((T, 5), p.__array_interface__["data"][0], dtype=np.int64)
    from fastopt.backends.base import FMT_COLS
    fmt = np.zeros((T, FMT_COLS), dtype=np.int64)
    fmt[0, :4] = ptrs[0, 0]
    fmt[0, 4:8] = (512, 512, 2, 2)
    hyper = np.zeros((1, rules.NSCALARS))
    hidx = np.zeros(T, dtype=np.int64)
    args = (0, 0, ext.PARAM_KINDS["nearest"], ext.GRAD_KINDS["bfloat16"],
            ext.STATE_KINDS["q8"], 0, False, False, False, 0)
    with pytest.raises(IndexError):        # a chunk past the tensor's blocks
        ext.run_stored_dense(*args, ptrs, fmt, np.array([[0, 0, 3]], np.int64), hyper, hidx,
                             256, 512, 1 << 40)
    with pytest.raises(ValueError):        # 8-bit blocks are Q8_BLOCK long
        ext.run_stored_dense(*args, ptrs, fmt, np.array([[0, 0, 2]], np.int64), hyper, hidx,
                             128, 512, 1 << 40)
    bad = fmt.copy()
    bad[0, 5] = 100                        # row length disagrees with the element count
    with pytest.raises(IndexError):
        ext.run_stored_dense(*args, ptrs, bad, np.array([[0, 0, 2]], np.int64), hyper, hidx,
                             256, 512, 1 << 40)
    with pytest.raises(ValueError):        # bfloat16 parameters compute in float32
        ext.run_stored_dense(0, 1, *args[2:], ptrs, fmt, np.array([[0, 0, 2]], np.int64),
                             hyper, hidx, 256, 512, 1 << 40)
    assert not p.any()
