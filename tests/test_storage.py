"""Storage formats (fastopt.storage): bfloat16 parameters, 16- and 8-bit state.

* the jitable codecs equal the NumPy definition bit for bit (and bfloat16 rounding
  equals ml_dtypes');
* every rule x format x backend that has the feature, dense and row-sparse (lazy
  and exact), with and without the fused options, over many steps of awkward
  gradients, against the NumPy reference backend (same decode -> float reference
  -> encode): parameters within float32 rounding noise, 8-bit codes within one
  code.  The cases are tests/cases.py's STORED and STORED_EXACT (pairwise, Adam in
  every format), which tests/test_cython_storage.py runs too;
* accuracy against float32 training (bitsandbytes' 8-bit Adam contract; "split"
  within one bfloat16 ulp of float32 where "nearest" stalls), determinism of
  stochastic rounding, checkpoints, bad options.
"""

import numpy as np
import pytest

import fastopt
from fastopt import rules, storage
from fastopt.storage import codecs as C
from fastopt.storage import reference as R

from cases import STORED, STORED_EXACT, STORED_WHOLE, param_dtype, storage_of, stored_variant

ml_dtypes = pytest.importorskip("ml_dtypes")
BF = np.dtype(ml_dtypes.bfloat16)
STORED_BACKENDS = [b for b in fastopt.available_backends() if b not in ("cuda", "numpy")
                   and "state8" in fastopt.backends.capabilities()[b]]
BF16_BACKENDS = [b for b in STORED_BACKENDS if "bfloat16" in fastopt.backends.capabilities()[b]]
#: the matrices against the reference run on numba; cython is checked bit for bit
#: against numba (tests/test_cython_storage.py), cuda too (tests/test_cuda_storage.py)
MATRIX_BACKENDS = [b for b in STORED_BACKENDS if b == "numba"]


# ------------------------------------------------------------------ codecs

def _awkward_floats(n=200_000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(n) * 10.0 ** rng.integers(-45, 38, n)
    x = x.astype(np.float32)
    x[:8] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 3.4e38, -1e-45, 1.0]
    return x




from numba import njit  # noqa: E402


@njit
def _rn(x, out):
    for i in range(x.shape[0]):
        out[i] = C.round_nearest(x[i])


@njit
def _sr(x, r, out):
    for i in range(x.shape[0]):
        out[i] = C.round_stochastic(x[i], r[i])


@njit
def _widen(u, out):
    for i in range(u.shape[0]):
        out[i] = C.widen(u[i])


@njit
def _split(x, hi, lo, back):
    for i in range(x.shape[0]):
        hi[i] = C.split_high(x[i])
        lo[i] = C.split_low(x[i])
        back[i] = C.join(hi[i], lo[i])


@njit
def _rand(key, n, out):
    for i in range(n):
        out[i] = C.random16(key, i * 4099 + (i % 3) * (1 << 33))


@njit
def _q8(x, s, signed, codes, dec):
    inv = C.scale_inverse(s)
    for i in range(x.shape[0]):
        if signed:
            codes[i] = C.encode_signed(x[i], inv)
            dec[i] = C.decode_signed(codes[i], s)
        else:
            codes[i] = C.encode_unsigned(x[i], inv)
            dec[i] = C.decode_unsigned(codes[i], s)


def test_bfloat16_codecs_bit_for_bit():
    x = _awkward_floats()
    out = np.empty(x.shape, np.uint16)
    _rn(x, out)
    np.testing.assert_array_equal(out, R.round_nearest(x))
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(out[finite], x[finite].astype(BF).view(np.uint16))
    assert np.isnan(out.view(BF).astype(np.float32)[~finite]).all()
    w = np.empty(x.shape, np.float32)
    _widen(out, w)
    np.testing.assert_array_equal(w, out.view(BF).astype(np.float32))
    r = np.random.default_rng(3).integers(0, 1 << 16, x.shape[0]).astype(np.uint32)
    _sr(x, r, out)
    np.testing.assert_array_equal(out, R.round_stochastic(x, r))
    hi, lo, back = np.empty_like(out), np.empty_like(out), np.empty_like(x)
    _split(x, hi, lo, back)
    rhi, rlo = R.split(x)
    np.testing.assert_array_equal(hi, rhi)
    np.testing.assert_array_equal(lo, rlo)
    np.testing.assert_array_equal(back[finite].view(np.uint32), x[finite].view(np.uint32))
    assert np.isnan(hi.view(BF).astype(np.float32)[~finite]).all()


def test_random_stream_bit_for_bit_and_uniform():
    n = 1 << 16
    out = np.empty(n, np.uint32)
    _rand(12345, n, out)
    e = np.arange(n, dtype=np.int64) * 4099 + (np.arange(n) % 3) * (1 << 33)
    np.testing.assert_array_equal(out, R.random16(12345, e))
    assert out.max() < 1 << 16
    hist = np.bincount(out >> 12, minlength=16)
    assert hist.min() > 0.9 * n / 16 and hist.max() < 1.1 * n / 16


@njit
def _rand_at(key, e0, m, out):
    for i in range(m):
        out[i] = C.random16_at(key, e0, i)


def test_block_random_stream_is_the_element_stream():
    """random16_at (32-bit lanes, the dense blocks' stream) is random16 of e0 + i,
    across a carry into the high word of the element index."""
    out = np.empty(512, np.uint32)
    for e0 in (0, 7, (1 << 32) - 300, (1 << 32) - 1, 1 << 32, 5 * (1 << 32) - 17,
               (1 << 32) - 512, (1 << 32) - 511,
               (1 << 62) + 3):
        for key in (0, 12345, 0xFFFFFFFF):
            _rand_at(key, e0, 512, out)
            np.testing.assert_array_equal(
                out, R.random16(key, e0 + np.arange(512, dtype=np.int64)))


def test_stochastic_rounding_is_unbiased():
    x = np.full(1 << 16, 1.0 + 2.0 ** -9, dtype=np.float32)   # a quarter ulp above 1
    r = R.random16(7, np.arange(x.size, dtype=np.int64))
    y = R.widen(R.round_stochastic(x, r))
    assert set(np.unique(y)) == {1.0, 1.0 + 2.0 ** -7}
    assert abs(y.mean() - x[0]) < 2e-5


@pytest.mark.parametrize("signed", [True, False])
def test_q8_codecs_bit_for_bit(signed):
    rng = np.random.default_rng(1)
    for s in (1.0, 3e-7, 2.5e30, 1e-39, 0.0):
        x = (rng.standard_normal(4096) * s).astype(np.float32)
        if not signed:
            x = np.abs(x)
        x[:4] = [np.nan, np.inf, 0.0, -np.inf if signed else 0.0]
        scale = R.q8_scales(x, x.shape)[0] if x.size <= storage.Q8_BLOCK else None
        block = x[:storage.Q8_BLOCK]
        ref_codes, ref_scales = R.q8_encode(block, block.shape, signed)
        codes = np.empty(block.shape, np.uint8)
        dec = np.empty(block.shape, np.float32)
        _q8(block, np.float32(ref_scales[0]), signed, codes, dec)
        np.testing.assert_array_equal(codes, ref_codes)
        np.testing.assert_array_equal(dec, R.q8_decode(ref_codes, ref_scales, block.shape,
                                                       signed))
        assert scale is None or scale == ref_scales[0]
        assert np.isnan(dec[0]) and dec[1] == np.inf
        if signed:
            assert dec[3] == -np.inf


@pytest.mark.parametrize("signed", [True, False])
def test_q8_blocks_decoded_and_encoded_again_are_unchanged(signed):
    """Muon's phase 2 (the stored dense driver) loads the 8-bit momentum buffer that
    phase 1 encoded and stores it again unchanged (fastopt/backends/matrix_cpu.py):
    encoding the decoded values of a block must give its codes and its scale back
    (the block's largest code decodes to the scale exactly), else the buffer would
    be quantized twice per step.  Random blocks over many scales, NaN/Inf codes
    included, through the reference."""
    rng = np.random.default_rng(3)
    for trial in range(50):
        x = (rng.standard_normal((4, 700)) * 10.0 ** rng.uniform(-30, 30)).astype(np.float32)
        if not signed:
            x = np.abs(x)
        if trial % 5 == 0:
            x[0, 3], x[1, 600] = np.nan, np.inf
        codes, scales = R.q8_encode(x, x.shape, signed)
        again, s2 = R.q8_encode(R.q8_decode(codes, scales, x.shape, signed), x.shape, signed)
        np.testing.assert_array_equal(again, codes)
        np.testing.assert_array_equal(s2.view(np.uint32), scales.view(np.uint32))


@pytest.mark.parametrize("signed", [True, False])
def test_every_q8_code_round_trips(signed):
    codes = np.arange(256, dtype=np.uint8).reshape(1, 256)
    if not signed:
        codes = codes                                   # 0..253 finite, 254 Inf, 255 NaN
    for s in (1.0, 0.37, 6e-20):
        scales = np.array([s], np.float32)
        x = R.q8_decode(codes, scales, codes.shape, signed)
        back, _ = R.q8_encode(x, x.shape, signed)
        finite = np.isfinite(x[0])
        got = back[0]
        want = codes[0].copy()
        if signed:
            want[want == 130 - 4] = want[want == 130 - 4]      # no alias
            want[0] = 0
        np.testing.assert_array_equal(got[finite & (np.abs(x[0]) <= s)],
                                      want[finite & (np.abs(x[0]) <= s)])


@njit
def _block_scans(T, m):
    return (C.block_has_special_signed(T, m), C.block_has_special_unsigned(T, m),
            C.special_signed(T[0]), C.special_unsigned(T[0]))


def test_block_special_scans_agree_with_the_code_predicates():
    """The byte min/max block scans of the drivers find a special code wherever it
    sits in the block, and only the special codes (every code, at every position
    parity of a vector, in blocks of full and partial length)."""
    for m in (256, 77, 1):
        for c in range(256):
            for pos in sorted({0, m // 2, m - 1}):
                T = np.zeros(256, np.uint8)
                T[pos] = c
                sig, uns, one_sig, one_uns = _block_scans(T[pos:pos + 1], 1)
                assert (sig, uns) == (one_sig, one_uns) == (c in (127, 128, 129), c >= 254)
                sig, uns, _, _ = _block_scans(T, m)
                assert (sig, uns) == (c in (127, 128, 129), c >= 254)
        T = np.full(256, 127, np.uint8)
        assert _block_scans(T, m)[0] and not _block_scans(T[m:], 0)[0]


# ----------------------------------------------------- kernels vs reference

FORMATS = [
    pytest.param(np.float32, dict(state_bits=8), id="f32-q8"),
    pytest.param(BF, dict(), id="bf16-split"),
    pytest.param(BF, dict(bf16_update="stochastic", state_bits=8), id="bf16-stochastic-q8"),
]
SHAPES = [(16, 300), (5000,), (3, 40, 50), (7,)]
STEPS = 12
#: the fused options of the stored cases (tests/cases.py STORED): none, the
#: element-wise ones with grad_scale, and those with max_norm (the row buffer)
ELEMENT = dict(clip_value=0.5, l1=1e-4, param_min=-1.5, param_max=1.5)
STORED_OPTIONS = {"none": ({}, None), "element": (ELEMENT, 4.0),
                  "max_norm": (dict(ELEMENT, max_norm=8.0), 4.0)}


def stored_options(case):
    """(constructor keywords, fused hyperparameters, grad_scale) of a stored case."""
    kw = dict(state_bits=case["bits"])
    if case["update"] is not None:
        kw["bf16_update"] = case["update"]
    hyper, gs = STORED_OPTIONS[case["options"]]
    return kw, hyper, gs


def _grads(shapes, steps, gdt, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        gs = []
        for shape in shapes:
            g = rng.standard_normal(shape) * 0.01
            g[rng.random(shape) < 0.2] = 0.0
            if t == 3:
                g *= 1e3
            elif t == 5:
                g *= 1e-6
            elif t == 7:
                g[...] = 0.0
            gs.append(g.astype(gdt))
        out.append(gs)
    return out


def _effective(opt, i, p):
    """A parameter as the float the format represents (master for split,
    p + compensation for Kahan)."""
    st = opt.state_dict()["state"].get(i, {})
    if p.dtype == BF:
        if "master_low" in st:
            return R.join(p.view(np.uint16), st["master_low"]).astype(np.float64)
        x = p.astype(np.float64)
        if "kahan_comp" in st:
            x = x + st["kahan_comp"].astype(np.float64)
        return x
    return p.astype(np.float64)


def _close_but_straddles(x, y, tol, what=""):
    """``x`` equals ``y`` to ``tol``, except for a few elements (under 1%) within
    2**-6 relative: a row norm (max_norm) summed in another order than the
    reference's moves a value across a bfloat16 rounding point of 16-bit state,
    which then moves that element by about one bfloat16 step."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=what)
    fin = ~np.isnan(y)
    x, y = x[fin], y[fin]
    scale = max(1e-30, float(np.abs(y).max(initial=0.0)))
    off = np.abs(x - y) > tol * np.abs(y) + tol * scale
    assert off.mean() < 0.01, (what, off.sum(), off.size)
    assert (np.abs(x - y)[off] <= np.abs(y)[off] * 2.0 ** -6 + tol * scale).all(), what


#: state that copies the parameter's value (ASGD's averaged parameter ``ax``)
PARAM_TRACKING = ("ax",)


def _compare_states(a, b, tol, straddle=False, track=False):
    """State ``a`` against the reference's ``b``: within ``tol``, 8-bit codes within
    one code; ``straddle``: bfloat16 state (and the parameter) may differ by one
    rounding step in a few elements (max_norm's row norms, :func:`_close_but_straddles`);
    ``track``: so may state that copies a bfloat16 parameter's value
    (:data:`PARAM_TRACKING`), which inherits the parameter's straddles."""
    for key, va in a.items():
        if key == "step" or isinstance(va, float):
            assert va == pytest.approx(b[key], rel=1e-12)
            continue
        vb = b[key]
        assert va.dtype == vb.dtype and va.shape == vb.shape, key
        if key == "master_low" or key == "kahan_comp":
            continue                      # compared through the effective parameter
        if va.dtype == np.uint8:          # 8-bit codes: within one code
            d = np.abs(va.astype(np.int16) - vb.astype(np.int16))
            d = np.minimum(d, 256 - d)    # the signed code wraps at 0
            assert d.max() <= 1, key
            assert (d > 0).mean() < 0.02, key
        elif (straddle and va.dtype == BF) or (track and key in PARAM_TRACKING):
            _close_but_straddles(va, vb, tol, key)
        else:
            x, y = va.astype(np.float64) if va.dtype != BF else va.astype(np.float64), \
                vb.astype(np.float64)
            scale = max(1e-30, float(np.nanmax(np.abs(y), initial=0.0)))
            np.testing.assert_allclose(x, y, rtol=tol, atol=tol * scale, err_msg=key)


@pytest.mark.parametrize("backend", MATRIX_BACKENDS)
@pytest.mark.parametrize("case", STORED.cases() + STORED_WHOLE.cases())
def test_stored_kernel_matches_reference(case, backend):
    """Dense steps of every stored case (tests/cases.py STORED: every rule x
    parameter dtype x state width x bf16_update x gradient dtype x fused options
    pair, Adam in every format; STORED_WHOLE: the same of LAMB, LARS and Muon, whose
    norm pass and matrix phase read the formats, over 3x the steps) against the
    reference backend, on several shapes in one optimizer (a small one keeps float32
    state under 8 bits; Muon's are matrices)."""
    name = case["rule"]
    pdt = param_dtype(case)
    if pdt == BF and backend not in BF16_BACKENDS:
        pytest.skip(f"{backend} has no bfloat16 parameters")
    rule = rules.RULES[name]
    kw, hyper, gs = stored_options(case)
    variant = {**stored_variant(case), **hyper}
    gdt = np.float32 if pdt == BF else pdt
    # max_norm renormalizes a 1-D parameter element by element: refused for 8-bit
    # state (blocks of elements), so that case leaves the 1-D tensor of 8-bit state out
    shapes = [s for s in SHAPES if "max_norm" not in hyper or len(s) > 1
              or storage_of(case, s).state != "q8"]
    if rule.matrix is not None:        # matrices only (a stack, a tall one)
        shapes = [s for s in shapes if len(s) >= 2] + [(70, 64)]
    grads = _grads(shapes, 3 * STEPS if rule.whole_tensor else STEPS, gdt)
    if gs is not None:                 # a power of two: the division is exact
        grads = [[g * g.dtype.type(gs) for g in gs_] for gs_ in grads]
    if case["grad"] == "bf16":         # bfloat16 gradients on alternate tensors
        grads = [[g.astype(BF) if j % 2 else g for j, g in enumerate(gs_)] for gs_ in grads]
    rng = np.random.default_rng(1)
    init = [(rng.standard_normal(s) * 0.5).astype(np.float32).astype(pdt) for s in shapes]
    got, want = [p.copy() for p in init], [p.copy() for p in init]
    opt = fastopt.CLASSES[name](got, backend=backend, **variant, **kw)
    ref = fastopt.CLASSES[name](want, backend="numpy", **variant, **kw)
    with np.errstate(all="ignore"):
        for gs_ in grads:
            opt.step(gs_, grad_scale=gs)
            ref.step([g.copy() for g in gs_], grad_scale=gs)
    tol = 1e-9 if pdt == np.float64 else 3e-5
    straddle = "max_norm" in hyper and storage_of(case).state == "bfloat16"
    for i, (a, b, p0) in enumerate(zip(got, want, init)):
        assert a.dtype == pdt
        ea, eb = _effective(opt, i, a), _effective(ref, i, b)
        scale = max(1.0, float(np.abs(eb).max(initial=0.0)))
        if straddle and not (pdt == BF and case["update"] in ("stochastic", "nearest")):
            _close_but_straddles(ea, eb, tol, f"parameter {i}")
        elif pdt == BF and case["update"] in ("stochastic", "nearest"):
            # one bfloat16 ulp where the float32 results straddle a rounding point
            ulp = np.abs(eb) * 2.0 ** -7 + 1e-30
            np.testing.assert_array_equal(np.isnan(ea), np.isnan(eb))
            fin = ~np.isnan(eb)
            assert (np.abs(ea[fin] - eb[fin]) <= ulp[fin]).all()
            assert (ea[fin] != eb[fin]).mean() < 0.02
        else:
            np.testing.assert_allclose(ea, eb, rtol=tol, atol=tol * scale)
        if rule.defaults.get("lr", 1) > 0 and a.size > 7:
            assert not np.array_equal(a.view(np.uint8), p0.view(np.uint8))
        if "param_max" in hyper:           # the options did run
            assert np.nanmax(np.asarray(a, np.float64), initial=0.0) <= hyper["param_max"]
    sa, sb = opt.state_dict()["state"], ref.state_dict()["state"]
    st = storage_of(case)
    for i in sa:
        _compare_states(sa[i], sb[i], 1e-9 if pdt == np.float64 else 1e-4, straddle,
                        track="max_norm" in hyper and pdt == BF)
    for slot in rule.slots:                # the format did apply (the (16, 300) tensor)
        if slot in sa[0]:
            assert sa[0][slot].dtype == storage.state_dtype(st, pdt), slot
            assert (slot + storage.SCALE_SUFFIX in sa[0]) == (st.state == "q8"), slot


@pytest.mark.parametrize("backend", MATRIX_BACKENDS)
@pytest.mark.parametrize("case", STORED.cases())
def test_stored_sparse_matches_reference(case, backend):
    """Lazy row-sparse steps (duplicate indices summed) of every stored case
    against the reference backend."""
    _sparse_against_reference(case, backend, "lazy", 40)


@pytest.mark.parametrize("backend", MATRIX_BACKENDS)
@pytest.mark.parametrize("case", STORED_EXACT.cases())
def test_stored_exact_matches_reference(case, backend):
    """Exact sparse mode (rows caught up in closed form, then a flush) of every
    stored exact case against the reference backend."""
    _sparse_against_reference(case, backend, "exact", 40)


def _sparse_against_reference(case, backend, mode, nnz):
    name = case["rule"]
    pdt = param_dtype(case)
    if pdt == BF and backend not in BF16_BACKENDS:
        pytest.skip(f"{backend} has no bfloat16 parameters")
    kw, hyper, gs = stored_options(case) if case["options"] != "clip" else \
        (stored_options(dict(case, options="none"))[0], dict(clip_value=0.75), 2.0)
    variant = {**stored_variant(case), **hyper}
    vdt = BF if case.get("grad") == "bf16" else np.float32
    rng = np.random.default_rng(2)
    init = (rng.standard_normal((64, 300)) * 0.5).astype(np.float32).astype(pdt)
    got, want = init.copy(), init.copy()
    opt = fastopt.CLASSES[name]([got], backend=backend, sparse_mode=mode, **variant, **kw)
    ref = fastopt.CLASSES[name]([want], backend="numpy", sparse_mode=mode, **variant, **kw)
    for t in range(10):
        idx = rng.integers(0, 64, nnz)                       # duplicates summed
        vals = rng.standard_normal((nnz, 300)) * 0.01
        if t == 4:
            vals *= 1e3
        if gs is not None:
            vals *= gs
        vals = vals.astype(np.float32).astype(vdt)
        opt.step([fastopt.RowSparse(idx, vals)], grad_scale=gs)
        ref.step([fastopt.RowSparse(idx, vals.copy())], grad_scale=gs)
    opt.flush()
    ref.flush()
    ea, eb = _effective(opt, 0, got), _effective(ref, 0, want)
    tol = 1e-9 if pdt == np.float64 else 3e-5
    straddle = "max_norm" in hyper and storage_of(case).state == "bfloat16"
    if case["update"] in ("stochastic", "nearest"):
        assert (np.abs(ea - eb) <= np.abs(eb) * 2.0 ** -7 + 1e-30).all()
        assert (ea != eb).mean() < 0.02
    elif straddle:
        _close_but_straddles(ea, eb, tol, "parameter")
    else:
        np.testing.assert_allclose(ea, eb, rtol=tol, atol=tol * max(1, np.abs(eb).max()))
    _compare_states(opt.state_dict()["state"][0], ref.state_dict()["state"][0],
                    1e-9 if pdt == np.float64 else 1e-4, straddle)


@pytest.mark.parametrize("backend", STORED_BACKENDS)
def test_nan_gradient_stays_in_its_element(backend):
    """A NaN gradient makes that element's 8-bit state NaN (its own code), not its
    block: the block scale is the largest *finite* magnitude."""
    p = np.ones((4, 2048), np.float32)
    opt = fastopt.Adam([p], backend=backend, state_bits=8)
    g = np.full(p.shape, 0.01, np.float32)
    g[1, 5] = np.nan
    g[2, 7] = 1e30                       # g*g overflows: exp_avg_sq is +Inf
    opt.step([g])
    st = opt.state_dict()["state"][0]
    m = R.q8_decode(st["exp_avg"], st["exp_avg_absmax"], p.shape, True)
    v = R.q8_decode(st["exp_avg_sq"], st["exp_avg_sq_absmax"], p.shape, False)
    assert np.isnan(m[1, 5]) and np.isnan(v[1, 5]) and np.isnan(p[1, 5])
    assert v[2, 7] == np.inf
    bad = np.zeros(p.shape, bool)
    bad[1, 5] = bad[2, 7] = True
    assert np.isfinite(m[~bad]).all() and np.isfinite(p[~bad]).all()
    assert np.isfinite(v[~bad]).all()


# ---------------------------------------------------------------- accuracy

def _adam_fp32(p, m, v, g, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    p -= np.float32(lr / (1 - b1 ** t)) * m / (np.sqrt(v) / np.float32(np.sqrt(1 - b2 ** t))
                                              + np.float32(eps))


@pytest.mark.parametrize("backend", MATRIX_BACKENDS)
def test_adam_8bit_meets_the_bitsandbytes_contract(backend):
    """bitsandbytes' test of 8-bit Adam: 1024 x 4097, 50 steps, lr 1e-3, against
    float32 Adam started each step from the same parameters and the dequantized
    state; mean absolute error < 6e-5, mean relative error < 6e-4."""
    rng = np.random.default_rng(0)
    p = (rng.standard_normal((1024, 4097)) * 0.1).astype(np.float32)
    opt = fastopt.Adam([p], lr=1e-3, backend=backend, state_bits=8)
    errs, rels = [], []
    for t in range(1, 51):
        g = (rng.standard_normal(p.shape) * 0.01).astype(np.float32)
        st = opt.state_dict()["state"].get(0)
        if st:
            m = R.q8_decode(st["exp_avg"], st["exp_avg_absmax"], p.shape, True)
            v = R.q8_decode(st["exp_avg_sq"], st["exp_avg_sq_absmax"], p.shape, False)
        else:
            m, v = np.zeros_like(p), np.zeros_like(p)
        p32 = p.copy()
        _adam_fp32(p32, m, v, g, t)
        opt.step([g])
        err = np.abs(p32 - p)
        errs.append(err.mean())
        rels.append((err / (np.abs(p32) + 1e-9)).mean())
    assert max(errs) < 6e-5 and max(rels) < 6e-4
    st = opt.state_dict()["state"][0]
    state_bytes = sum(v.nbytes for k, v in st.items() if isinstance(v, np.ndarray))
    assert state_bytes / p.size <= 2.2


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_split_tracks_float32_where_nearest_stalls(backend):
    """Updates far below half a bfloat16 ulp: "split" stays within one ulp of the
    float32 trajectory (it *is* the float32 trajectory, truncated), "kahan" and
    "stochastic" follow it, "nearest" does not move."""
    n = 8192
    p32 = np.ones(n, np.float32)
    ref = fastopt.SGD([p32], lr=1e-4, backend=backend)
    ps = {u: np.ones(n, BF) for u in storage.BF16_UPDATES}
    opts = {u: fastopt.SGD([ps[u]], lr=1e-4, backend=backend, bf16_update=u) for u in ps}
    g = np.ones(n, np.float32)          # each update is 1e-4: 1/80 of an ulp at 1.0
    for _ in range(300):
        ref.step([g.copy()])
        for u in ps:
            opts[u].step([g.copy()])
    ulp = 2.0 ** -8                      # below 1.0
    moved = 1.0 - p32[0]
    assert moved == pytest.approx(0.03, rel=1e-3)
    assert np.all(np.abs(ps["split"].astype(np.float32) - p32) <= ulp)
    master = R.join(ps["split"].view(np.uint16), opts["split"].state_dict()["state"][0][
        "master_low"])
    np.testing.assert_array_equal(master, p32)
    kahan = ps["kahan"].astype(np.float32) + opts["kahan"].state_dict()["state"][0][
        "kahan_comp"].astype(np.float32)
    # the bfloat16 compensation carries 8 bits: it tracks to a small part of an ulp
    np.testing.assert_allclose(kahan, p32, atol=ulp / 8)
    assert abs(ps["stochastic"].astype(np.float32).mean() - p32[0]) < 2e-4
    assert np.all(ps["nearest"].astype(np.float32) == 1.0)


@pytest.mark.parametrize("backend", BF16_BACKENDS)
def test_stochastic_rounding_is_deterministic(backend):
    import numba
    outs = []
    for threads, seed in ((1, 3), (numba.config.NUMBA_NUM_THREADS, 3), (1, 4)):
        prev = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            p = np.linspace(-1, 1, 70_000).astype(BF)
            opt = fastopt.Adam([p], backend=backend, bf16_update="stochastic", seed=seed)
            rng = np.random.default_rng(0)
            for _ in range(3):
                opt.step([rng.standard_normal(p.shape).astype(np.float32)])
                opt.step([fastopt.RowSparse(rng.integers(0, p.size, 100),
                                            rng.standard_normal(100).astype(np.float32))])
        finally:
            numba.set_num_threads(prev)
        outs.append(p.view(np.uint16).copy())
    np.testing.assert_array_equal(outs[0], outs[1])
    assert not np.array_equal(outs[0], outs[2])


# ---------------------------------------------------- state, checkpoints, errors

@pytest.mark.parametrize("backend", BF16_BACKENDS)
@pytest.mark.parametrize("options", [dict(state_bits=8), dict(bf16_update="stochastic",
                                                               state_bits=16)])
def test_resume_is_bit_identical(tmp_path, backend, options):
    rng = np.random.default_rng(0)
    init = (rng.standard_normal((32, 300)) * 0.1).astype(BF)
    grads = [(rng.standard_normal(init.shape) * 0.01).astype(np.float32) for _ in range(8)]
    a = init.copy()
    oa = fastopt.AdamW([a], backend=backend, **options)
    for g in grads:
        oa.step([g.copy()])
    b = init.copy()
    ob = fastopt.AdamW([b], backend=backend, **options)
    for g in grads[:4]:
        ob.step([g.copy()])
    fastopt.save(tmp_path / "ck.npz", ob)
    c = b.copy()
    oc = fastopt.AdamW([c], backend=backend, **options)
    fastopt.load(tmp_path / "ck.npz", oc)
    for g in grads[4:]:
        oc.step([g.copy()])
    np.testing.assert_array_equal(a.view(np.uint16), c.view(np.uint16))
    sa, sc = oa.state_dict()["state"][0], oc.state_dict()["state"][0]
    assert sorted(sa) == sorted(sc)
    for k in sa:
        if isinstance(sa[k], np.ndarray):
            assert sa[k].dtype == sc[k].dtype
            np.testing.assert_array_equal(sa[k].view(np.uint8), sc[k].view(np.uint8))


def test_loading_checks_formats():
    p = np.zeros((32, 300), np.float32)
    o8 = fastopt.Adam([p], state_bits=8)
    o8.step([np.ones_like(p)])
    sd = o8.state_dict()
    with pytest.raises(ValueError, match="state_bits"):
        fastopt.Adam([p.copy()], state_bits=16).load_state_dict(sd)
    bad = {**sd, "state": {0: {**sd["state"][0],
                               "exp_avg": sd["state"][0]["exp_avg"].astype(np.float32)}}}
    other = fastopt.Adam([p.copy()], state_bits=8)
    with pytest.raises(ValueError, match="exp_avg"):
        other.load_state_dict(bad)
    assert other.state == {}


@pytest.mark.parametrize("kw,match", [
    (dict(state_bits=7), "state_bits: 7"),
    (dict(state_bits=True), "state_bits"),
    (dict(bf16_update="round"), "bf16_update: 'round'"),
    (dict(bf16_update="stochastic"), "bf16_update='stochastic' applies to bfloat16"),
    (dict(seed=-1), "seed"),
])
def test_bad_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        fastopt.Adam([np.zeros(10, np.float32)], **kw)


@pytest.mark.parametrize("bits", [8, 16])
def test_centered_rmsprop_refuses_low_precision_state(bits):
    """sqrt(square_avg - grad_avg^2) of two separately rounded moments is rounding
    noise, negative (NaN) for near-constant gradients: refused, at construction and
    when a group is edited to centered=True, before anything is written."""
    with pytest.raises(ValueError, match=f"state_bits={bits} .*centered=True"):
        fastopt.RMSprop([np.zeros((20, 300), np.float32)], centered=True, state_bits=bits)
    p = np.ones((20, 300), np.float32)
    opt = fastopt.RMSprop([p], momentum=0.5, state_bits=bits)
    g = np.full_like(p, 0.5)
    for _ in range(3):
        opt.step([g])
    before = p.copy(), {k: v.copy() for k, v in opt.state_dict()["state"][0].items()
                        if isinstance(v, np.ndarray)}
    opt.param_groups[0]["centered"] = True
    with pytest.raises(ValueError, match="centered=True"):
        opt.step([g])
    opt.param_groups[0]["centered"] = False
    np.testing.assert_array_equal(p, before[0])
    for k, v in before[1].items():
        np.testing.assert_array_equal(opt.state_dict()["state"][0][k], v)
    fastopt.RMSprop([np.zeros((20, 300), np.float32)], centered=True, state_bits=32)


def test_float16_parameters_say_what_to_use():
    with pytest.raises(TypeError, match="bfloat16"):
        fastopt.Adam([np.zeros(10, np.float16)])


def test_backends_without_the_formats_refuse_them():
    caps = fastopt.backends.capabilities()
    for name, feats in caps.items():
        if "state8" not in feats:
            with pytest.raises(NotImplementedError, match="state_bits=8"):
                fastopt.Adam([np.zeros(10, np.float32)], backend=name, state_bits=8)
        if "bfloat16" not in feats:
            with pytest.raises(NotImplementedError, match="bfloat16"):
                fastopt.Adam([np.zeros(10, BF)], backend=name)


def test_sparse_step_of_a_1d_8bit_parameter_is_refused_before_writing():
    p = np.ones(8192, np.float32)
    opt = fastopt.Adam([p], state_bits=8)
    opt.step([np.ones_like(p)])
    before = p.copy(), {k: v.copy() for k, v in opt.state_dict()["state"][0].items()
                        if isinstance(v, np.ndarray)}
    with pytest.raises(ValueError, match="state_bits=16"):
        opt.step([fastopt.RowSparse(np.array([3]), np.ones(1, np.float32))])
    np.testing.assert_array_equal(p, before[0])
    for k, v in before[1].items():
        np.testing.assert_array_equal(opt.state_dict()["state"][0][k], v)


def test_small_tensors_keep_float32_state():
    small, big = np.zeros(100, np.float32), np.zeros((20, 300), np.float32)
    opt = fastopt.Adam([small, big], state_bits=8)
    opt.step([np.ones_like(small), np.ones_like(big)])
    st = opt.state_dict()["state"]
    assert st[0]["exp_avg"].dtype == np.float32 and "exp_avg_absmax" not in st[0]
    assert st[1]["exp_avg"].dtype == np.uint8
    assert st[1]["exp_avg_absmax"].shape == (20 * 2,)


@pytest.mark.parametrize("backend", MATRIX_BACKENDS)
@pytest.mark.parametrize("pdt,options", FORMATS)
@pytest.mark.parametrize("fused", [
    dict(clip_value=0.005, l1=1e-3), dict(param_min=-0.4, param_max=0.4),
    dict(max_norm=2.0), dict(weight_decay=0.1, amsgrad=True)])
def test_stored_fused_options_and_grad_scale(fused, pdt, options, backend):
    """The fused options, grad_scale and skip_nonfinite through the stored drivers,
    against the reference."""
    if np.dtype(pdt) == BF and backend not in BF16_BACKENDS:
        pytest.skip(f"{backend} has no bfloat16 parameters")
    rng = np.random.default_rng(5)
    init = (rng.standard_normal((24, 300)) * 0.3).astype(np.float32).astype(pdt)
    got, want = init.copy(), init.copy()
    opt = fastopt.AdamW([got], backend=backend, **fused, **options)
    ref = fastopt.AdamW([want], backend="numpy", **fused, **options)
    for t in range(8):
        g = (rng.standard_normal(init.shape) * 0.02).astype(np.float32)
        if t == 3:
            g[2, 5] = np.inf                     # skipped: nothing changes
            before = got.copy()
            assert opt.step([g], skip_nonfinite=True) is False
            assert ref.step([g.copy()], skip_nonfinite=True) is False
            np.testing.assert_array_equal(got.view(np.uint8), before.view(np.uint8))
            continue
        if t % 2:
            sparse = fastopt.RowSparse(rng.integers(0, 24, 10), g[:10] * 128.0)
            opt.step([sparse], grad_scale=128.0)
            ref.step([fastopt.RowSparse(sparse.indices, sparse.values.copy())],
                     grad_scale=128.0)
        else:
            opt.step([g * 128.0], grad_scale=128.0)
            ref.step([g * 128.0], grad_scale=128.0)
    ea, eb = _effective(opt, 0, got), _effective(ref, 0, want)
    if options.get("bf16_update") in ("stochastic", "nearest"):
        assert (np.abs(ea - eb) <= np.abs(eb) * 2.0 ** -7 + 1e-30).all()
        assert (ea != eb).mean() < 0.02
    else:
        np.testing.assert_allclose(ea, eb, rtol=3e-5, atol=3e-5)
    _compare_states(opt.state_dict()["state"][0], ref.state_dict()["state"][0], 1e-4)


@pytest.mark.parametrize("backend", ["numpy"] + STORED_BACKENDS)
@pytest.mark.parametrize("pdt,options", [(BF, {}), (np.float32, dict(state_bits=16)),
                                         (np.float64, dict(state_bits=32)),
                                         (np.float32, dict(state_bits=8)),
                                         (BF, dict(bf16_update="stochastic"))])
@pytest.mark.parametrize("empty", [(0, 5), (5, 0)])
def test_parameters_without_rows_beside_others_in_stored_formats(backend, pdt, options, empty):
    """The reference backend failed with "cannot reshape array of size 0" on a (0, 5)
    parameter in a stored format, after the bucket's other tensors were written."""
    rng = np.random.default_rng(0)
    a = np.zeros(empty, pdt)
    b = (rng.standard_normal((3, 5)) * 0.1).astype(pdt)
    ref_b = b.copy()
    opt = fastopt.Adam([a, b], lr=1e-2, backend=backend, **options)
    alone = fastopt.Adam([np.zeros((3, 1), pdt), ref_b], lr=1e-2, backend=backend, **options)
    for k in range(3):
        g = rng.standard_normal((3, 5)).astype(np.float32)
        opt.step([np.zeros(empty, np.float32), g])
        alone.step([None, g])
    np.testing.assert_array_equal(np.asarray(b, np.float64), np.asarray(ref_b, np.float64))
    assert opt.state_dict()["state"][0]["step"] == 3
