"""The ``"numba"`` backend: Numba ``njit(parallel=True)`` drivers around the element step.

One driver per loop shape for every storage format (:mod:`fastopt.storage`), but
for the rows of float32/float64 parameters (see below):
float32/float64 parameters and state are the format whose loads and stores are the
identity (the parameter and its state are updated in place), bfloat16 parameters
and 16/8-bit state the formats that widen, round or quantize around the same
element step.  The format's load and store functions are chosen once per
configuration (:mod:`fastopt.storage.io`), so a format costs no branch in the
element loop.

Dense steps (:func:`make_stored_dense_driver`): one parallel region over the
chunks of a bucket (:class:`~fastopt.backends.base.DenseWork`):

* ``ptrs``   int64 (T, 2 + NSLOTS): data addresses of param, grad and state slots
  (unused slots hold the param's address and are never touched);
* ``fmt``    int64 (T, FMT_COLS): per tensor its aux and 8-bit scale addresses, size,
  row length, blocks per row, stream key and element base (``base.FMT_*``);
* ``chunks`` int64 (C, 3): ``(tensor, first block, end block)``; a block is
  ``CHUNK`` elements (``Q8_BLOCK`` elements of a row with 8-bit state); ``prange``
  runs over chunks, so 1,000 small tensors cost one parallel region, not 1,000
  calls;
* ``hyper``  float64 (R, NSCALARS) scalar rows and ``hidx`` int64 (T,) the row of
  each tensor.

Row steps (:func:`make_stored_rows_driver`): parallel over the unique touched rows
of one parameter, each task owning a contiguous range of them; a repeated row's
gradient rows are summed in their order of appearance (deterministic,
:func:`summed_row`) into the task's scratch row just before the row's update (no
pass of its own over the gradient); in exact sparse mode each row is first
caught up over its skipped steps (or only caught up, for ``flush``); ``max_norm``
renormalizes each row right after its update, while it is in cache; the rows
``PREFETCH_AHEAD`` unique rows ahead are prefetched.  Row-wise rules
(:func:`make_stored_rowwise_driver`) take whole rows.  Parameters in float32/float64
with state in their dtype keep row drivers of their own (:func:`make_rows_driver`,
:func:`make_rowwise_driver`, :func:`run_rows`: 2-D row views, no blocks), the one
twin whose removal measured slower (docs/backends.md).

Every driver is a closure over the configuration (rule math, format, dtype, used
slots, fixed scalars, fused switches, serial or parallel), compiled once per
configuration and cached on disk by Numba (``cache=True``; the closure's cell
values are part of Numba's cache key, so ``PARALLEL`` and the rule's source stamp
are kept there: a serial build can never be loaded for a parallel driver).
``error_model="numpy"`` keeps IEEE division (and lets LLVM vectorize); no fastmath
flags, so NaN/Inf propagate.  Addresses, shapes and indices are validated by the
Python layer before a launch: the kernels do no bounds checks.
"""

import hashlib
import inspect
import threading

import numpy as np

from .._jit import numba as _numba, register_jitable

numba = _numba()   # this module is loaded when the backend is first used (fastopt.backends)
from numba import carray, njit, prange, types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

from ..rules.fused import RENORM_EPS, renorm_row  # noqa: E402
# CHUNK, PARALLEL_MIN and the chunk tables live in .base (the Cython backend and the
# planner use them without importing numba); PARALLEL_MIN is read here, where tests
# and tuning set it, and by the Cython backend from here once this module is loaded
from .base import (CHUNK, FMT_AUX, FMT_N, FMT_NB, FMT_NSCALE,  # noqa: E402,F401
                   FMT_ROW, FMT_SCALE, PARALLEL_MIN, Backend, make_chunks,
                   may_use_threads, stored_chunks)
from .element import apply_catch_up, element_step, scalar_loader  # noqa: E402
from .prefetch import GATHER_AHEAD, PREFETCH_AHEAD, prefetch_row, prefetch_span  # noqa: E402
from ..storage.codecs import bits32  # noqa: E402


@intrinsic
def _voidptr(typingctx, addr):
    """Reinterpret an integer address as a ``void*`` (for ``numba.carray``)."""
    sig = types.voidptr(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


@intrinsic
def _stack_buffer(typingctx, size, dtype):
    """A pointer to ``size`` (a compile-time constant) elements of ``dtype`` on the
    stack of the calling function.  LLVM knows such a buffer aliases nothing else,
    so a loop that writes it next to the parameter and state arrays still
    vectorizes (heap buffers would add runtime overlap checks beyond LLVM's limit)."""
    if not isinstance(size, types.IntegerLiteral):
        return None
    n = size.literal_value
    elt = dtype.dtype
    sig = types.CPointer(elt)(size, dtype)

    def codegen(context, builder, signature, args):
        ty = context.get_data_type(elt)
        return cgutils.alloca_once(builder, ty, size=n)

    return sig, codegen


def _stamp(*fns):
    """A number that changes when the given functions' source changes (it is kept in
    a closure cell, so it is part of Numba's cache key)."""
    h = hashlib.sha256()
    for fn in fns:
        h.update(inspect.getsource(getattr(fn, "py_func", fn)).encode())
    return int(h.hexdigest()[:15], 16)


def _compile(fn, parallel):
    return njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)(fn)


# ------------------------------------------------ float32/float64 row drivers
#
# The one twin kept: row steps of float32/float64 parameters with state in their
# dtype have drivers of their own (2-D row views, no block structure).  Measured
# against the drivers of every format on a lazy sparse Adam step (200K x 64
# float32 table, 16K Zipf ids, one thread): the format driver's kernel was
# 1.4-1.8x slower there (docs/backends.md), so the plain row drivers stay (the
# row-wise one with them, not measured apart); dense steps have one driver for
# every format.

@register_jitable
def summed_row(vals, order, a, b, scratch, u):
    """The gradient of one touched row: ``vals[order[a]]`` or, with duplicates, the
    sum of ``vals[order[a:b]]`` added in order of appearance (deterministic) into
    ``scratch[u]`` (only then is ``scratch`` indexed); the gradient row
    ``GATHER_AHEAD`` places ahead is prefetched."""
    G = vals[order[a]]
    if b - a > 1:
        row = scratch[u]
        row[:] = G
        for k in range(a + 1, b):
            if k + GATHER_AHEAD < b:
                prefetch_row(vals, order[k + GATHER_AHEAD])
            more = vals[order[k]]
            for j in range(row.shape[0]):
                row[j] += more[j]
        G = row
    return G


#: the cost of updating one unique row, in gradient rows summed (the split of a
#: row step between tasks; any value gives the same results)
UNIQUE_ROW_COST = 2


@register_jitable
def task_rows(seg, n, weighted, t, parts):
    """The unique rows ``[lo, hi)`` of task ``t`` of ``parts`` (of ``n``): contiguous
    ranges that split ``seg[u] + UNIQUE_ROW_COST * u`` (the gradient rows summed and
    the rows updated before unique row ``u``; ``u`` alone when not ``weighted``: a
    catch-up without gradient) evenly.  A hot id repeated thousands of times weighs
    what it costs, so neither task waits on the other; every unique row belongs to
    exactly one task, whatever ``parts`` is."""
    total = (seg[n] if weighted else 0) + UNIQUE_ROW_COST * n
    bounds = np.empty(2, dtype=np.int64)
    for e in range(2):
        k = t + e
        if k >= parts:
            bounds[e] = n
            continue
        target = total * k // parts
        lo, hi = 0, n               # smallest u with cost(u) >= target
        while lo < hi:
            mid = (lo + hi) // 2
            if (seg[mid] if weighted else 0) + UNIQUE_ROW_COST * mid < target:
                lo = mid + 1
            else:
                hi = mid
        bounds[e] = lo
    return bounds[0], bounds[1]


def make_rows_driver(config, parallel, catch, step):
    """The row driver of an element-wise rule, one parallel region: ``parts`` tasks
    each own a contiguous range of unique rows (:func:`task_rows`, balanced by the
    gradient rows to sum); for each unique row, catch up (``catch``), then the
    element step with the row's summed gradient (``step``), then ``max_norm``.  A
    repeated row's gradient rows are summed (:func:`summed_row`: in order of
    appearance, the first copied, added one by one) into the task's own scratch row
    ``scratch[t]`` just before its update, so the sum never leaves the L1 cache and
    no separate pass over the gradient runs.  ``P`` and the slots are (nrows, D)
    views (unused slots get ``P`` and are never touched); ``vals`` (nnz, D)
    gradient rows; ``coef`` (nuniq, 4) float64 catch-up maps; ``scratch`` (parts,
    D).  The table rows and the first gradient row ``PREFETCH_AHEAD`` unique rows
    ahead are prefetched.  Results are identical for any ``parts``."""
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    U0, U1, U2 = (bool(u) for u in config.uses)
    MX = bool(config.switches[5])
    EPS = DT(RENORM_EPS)
    CATCH, STEPPING = bool(catch), bool(step)
    STAMP = _stamp(config.rule.math, task_rows, summed_row)
    PARALLEL = bool(parallel)
    AHEAD = PREFETCH_AHEAD

    def rows_driver(P, S0, S1, S2, vals, order, seg, uniq, hyper, scratch, coef, parts):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        zero = DT(0)
        D = P.shape[1]
        for t in prange(parts):
            # loaded inside the parallel loop: a NamedTuple that crosses into a parfor
            # cannot be typed by Numba's gufunc builder (and LLVM hoists the loads)
            c = LOAD(hyper, 0)
            lo, hi = task_rows(seg, uniq.shape[0], STEPPING, t, parts)
            for u in range(lo, hi):
                if u + AHEAD < hi:
                    q = uniq[u + AHEAD]
                    prefetch_row(P, q)
                    if U0:
                        prefetch_row(S0, q)
                    if U1:
                        prefetch_row(S1, q)
                    if U2:
                        prefetch_row(S2, q)
                    if STEPPING:
                        prefetch_row(vals, order[seg[u + AHEAD]])
                r = uniq[u]
                if CATCH:
                    ca, cb, cc, ce = coef[u, 0], coef[u, 1], coef[u, 2], coef[u, 3]
                    identity = ca == 1.0 and cb == 0.0 and cc == 0.0 and ce == 1.0
                    for j in range(D if not identity else 0):
                        s = S0[r, j] if U0 else zero
                        p, s = apply_catch_up(P[r, j], s, ca, cb, cc, ce, DT)
                        P[r, j] = p
                        if U0:
                            S0[r, j] = s
                if STEPPING:
                    G = summed_row(vals, order, seg[u], seg[u + 1], scratch, t)
                    for j in range(D):
                        s0 = S0[r, j] if U0 else zero
                        s1 = S1[r, j] if U1 else zero
                        s2 = S2[r, j] if U2 else zero
                        p, s0, s1, s2 = STEP(P[r, j], G[j], s0, s1, s2, c, zero)
                        P[r, j] = p
                        if U0:
                            S0[r, j] = s0
                        if U1:
                            S1[r, j] = s1
                        if U2:
                            S2[r, j] = s2
                    if MX:
                        renorm_row(P[r], c, zero, EPS)

    return _compile(rows_driver, parallel)


def make_rowwise_driver(config, parallel):
    """The driver of a row-wise rule (one state value per row): parallel over the
    touched rows; the rule math works on whole rows, the fused options around it
    (gradient side into a scratch row, parameter side after the row's update)."""
    MATH = config.rule.math
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    SC, CL, L1, LO, HI, MX = (bool(s) for s in config.switches)
    from ..rules.fused import post, pre
    PRE = SC or CL
    POST = L1 or LO or HI
    EPS = DT(RENORM_EPS)
    STAMP = _stamp(MATH)
    PARALLEL = bool(parallel)

    def rowwise_driver(P, S0, vals, order, seg, uniq, hyper, scratch):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        zero = DT(0)
        inv_d = DT(1) / DT(P.shape[1])
        for u in prange(uniq.shape[0]):
            c = LOAD(hyper, 0)        # inside the parallel loop: see rows_driver
            r = uniq[u]
            G = summed_row(vals, order, seg[u], seg[u + 1], scratch, u)
            if PRE:                       # scaled / clipped copy of the gradient row
                buf = scratch[u]
                for j in range(G.shape[0]):
                    buf[j] = pre(G[j], c, SC, CL)
                G = buf
            prow = P[r]
            S0[r] = MATH(prow, G, S0[r], inv_d, zero, c)
            if POST:
                for j in range(prow.shape[0]):
                    prow[j] = post(prow[j], c, zero, L1, LO, HI)
            if MX:
                renorm_row(prow, c, zero, EPS)

    return _compile(rowwise_driver, parallel)


_DRIVERS = {}


def _driver(factory, config, parallel, *extra):
    key = (factory.__name__, config, bool(parallel)) + extra
    d = _DRIVERS.get(key)
    if d is None:
        d = _DRIVERS[key] = factory(config, parallel, *extra)
    return d


_EMPTY_COEF = np.zeros((0, 4), dtype=np.float64)
_SCRATCH = threading.local()


def scratch_rows(n, D, dtype):
    """An (n, D) scratch array of ``dtype`` for the duplicate sums, kept per Python
    thread and grown as needed (a step allocates none once the largest batch was
    seen; a driver runs to completion before its thread steps again)."""
    dt = np.dtype(dtype)
    pool = getattr(_SCRATCH, "pool", None)
    if pool is None:
        pool = _SCRATCH.pool = {}
    buf = pool.get(dt)
    if buf is None or buf.size < n * D:
        buf = pool[dt] = np.empty(max(n * D, 1 << 16), dtype=dt)
    return buf[:n * D].reshape(n, D)
def run_rows(work):
    """Run a :class:`~fastopt.backends.base.RowsWork` on the CPU (serial below
    PARALLEL_MIN touched elements)."""
    cfg = work.config
    p = work.param
    nrows = p.shape[0]
    P = p.reshape(nrows, -1)
    D = P.shape[1]
    uniq = work.uniq
    if uniq.shape[0] == 0 or D == 0:
        return
    parallel = uniq.shape[0] * D >= PARALLEL_MIN and may_use_threads()
    dups = work.vals is not None and work.order.shape[0] > uniq.shape[0]
    if cfg.rule.layout == "rowwise":
        pre = cfg.switches[0] or cfg.switches[1]
        scratch = scratch_rows(uniq.shape[0] if (dups or pre) else 0, D, p.dtype)
        _driver(make_rowwise_driver, cfg, parallel)(
            P, work.slots[0].reshape(nrows), work.vals, work.order, work.seg, uniq,
            work.hyper, scratch)
        return
    S = [s.reshape(nrows, -1) if s is not None else P for s in work.slots]
    parts = numba.get_num_threads() if parallel else 1
    scratch = scratch_rows(parts if dups else 0, D, p.dtype)
    catch = work.catch is not None
    step = work.vals is not None
    vals = work.vals if step else P
    order = work.order if step else uniq
    seg = work.seg if step else uniq
    coef = work.catch.coef if catch else _EMPTY_COEF
    _driver(make_rows_driver, cfg, parallel, catch, step)(
        P, S[0], S[1], S[2], vals, order, seg, uniq, work.hyper, scratch, coef, parts)


def _count_nonfinite_impl(a, scale):
    n = a.shape[0]
    nblocks = (n + CHUNK - 1) // CHUNK
    bad = 0
    for b in prange(nblocks):
        lo = b * CHUNK
        hi = min(lo + CHUNK, n)
        k = 0
        for i in range(lo, hi):
            x = a[i] / scale
            if x - x != 0:          # Inf - Inf and NaN - NaN are NaN; finite x - x is 0
                k += 1
        bad += k
    return bad


_count_nonfinite = njit(parallel=True, cache=True, nogil=True)(_count_nonfinite_impl)


@njit(cache=True, nogil=True)
def _first_nonfinite(a, scale):
    for i in range(a.shape[0]):
        x = a[i] / scale
        if x - x != 0:
            return i
    return -1


def all_finite(a, grad_scale=None):
    """True when the 1-D array ``a`` divided by ``grad_scale`` (in ``a``'s dtype, as
    the update pass divides) has no Inf/NaN (parallel above PARALLEL_MIN)."""
    scale = a.dtype.type(1.0 if grad_scale is None else grad_scale)
    if a.shape[0] >= PARALLEL_MIN and may_use_threads():
        return _count_nonfinite(a, scale) == 0
    return _first_nonfinite(a, scale) < 0


# ------------------------------------------------------------- the drivers
#
# The drivers call the format's load and store functions around the element step
# (for float32/float64 they are plain reads and writes of the arrays, which LLVM
# vectorizes as it would a loop without them); 8-bit state is updated a block at a
# time (the new values of a block are kept in a small buffer, the block's scale is
# their largest finite magnitude, then they are encoded).

def _stored_pieces(config):
    from ..storage import Q8_BLOCK, io
    st = config.storage
    CT = np.dtype(config.compute_dtype).type
    LP = io.param_io(st, CT)[0]
    SP = io.param_store_at(st, CT)
    LG = io.grad_loader(config.grad, CT)
    S = [io.state_io(st, k, CT) for k in range(3)]
    PDT, GDT, SDT, ADT = io.dtypes(st, config.grad, CT)
    Q8 = st.state == "q8"
    return dict(CT=CT, LP=LP, SP=SP, LG=LG, S=S, PDT=PDT, GDT=GDT, SDT=SDT, ADT=ADT, Q8=Q8,
                BLK=Q8_BLOCK if Q8 else CHUNK)


@register_jitable
def stored_tensor(ptrs, fmt, t, PDT, GDT, SDT, ADT):
    """Tensor ``t`` of a stored-format bucket as ``(n, D, nb, P, G, S0, S1, S2, A, C0,
    C1, C2)``: its size, row length, blocks per row and flat views of its parameter,
    gradient, state slots, aux array and 8-bit scales, from ``ptrs`` and the
    planner's ``fmt`` table, the element types those of the format
    (:func:`_stored_pieces`).  Every driver that walks a bucket's block chunks, the
    update pass and the norm pass, reads a tensor through it.  (A module function,
    called with the types, not a closure over them: a dynamically made function
    in a driver's closure cell would change Numba's cache key every process.)"""
    n = fmt[t, FMT_N]
    nsc = fmt[t, FMT_NSCALE]
    return (n, fmt[t, FMT_ROW], fmt[t, FMT_NB],
            carray(_voidptr(ptrs[t, 0]), (n,), PDT),
            carray(_voidptr(ptrs[t, 1]), (n,), GDT),
            carray(_voidptr(ptrs[t, 2]), (n,), SDT),
            carray(_voidptr(ptrs[t, 3]), (n,), SDT),
            carray(_voidptr(ptrs[t, 4]), (n,), SDT),
            carray(_voidptr(fmt[t, FMT_AUX]), (n,), ADT),
            carray(_voidptr(fmt[t, FMT_SCALE]), (nsc,), np.float32),
            carray(_voidptr(fmt[t, FMT_SCALE + 1]), (nsc,), np.float32),
            carray(_voidptr(fmt[t, FMT_SCALE + 2]), (nsc,), np.float32))


@register_jitable
def block_at(kb, nb, D, BLK):
    """Block ``kb`` of a tensor of rows of ``D`` elements, ``nb`` blocks of ``BLK``
    per row: ``(row, first element in the row, first flat element, length)``."""
    r = kb // nb
    j0 = (kb - r * nb) * BLK
    return r, j0, r * D + j0, min(BLK, D - j0)


_BLOCK_LOOPS = {}


def _block_loop(config, grad_kind, catch, step, finite):
    """The element loop over one block (views indexed from 0), shared by the stored
    dense and row drivers: load, catch up (``catch``), step (``step``), store the
    parameter (or keep it in the row buffer ``Rb`` for max_norm), and store the
    state (8-bit: keep it in the block buffers ``b0..b2`` for encoding).
    ``finite``: 8-bit slots are decoded without special codes (the block has
    none).  Returns, per 8-bit slot, the largest bit pattern of the new values'
    magnitudes (:func:`_magnitude_bits`), the block scale's max reduction fused
    into the element loop (a separate pass over each buffer cost about 0.02 ns per
    element and slot, docs/low-precision.md); zeros for other formats."""
    key = (config, grad_kind, bool(catch), bool(step), bool(finite))
    fn = _BLOCK_LOOPS.get(key)
    if fn is not None:
        return fn
    from ..storage import io
    st = config.storage
    CT = np.dtype(config.compute_dtype).type
    LP = io.param_io(st, CT)[0]
    SP = io.param_store_block(st, CT)
    LG = io.grad_loader(grad_kind, CT)
    Q8 = st.state == "q8"
    if Q8:
        pieces = [io.q8_pieces(st, k, CT) for k in range(3)]
        (L0, L1, L2) = (p[1] if finite else p[0] for p in pieces)
        W0 = W1 = W2 = None
    else:
        (L0, W0, _), (L1, W1, _), (L2, W2, _) = (io.state_io(st, k, CT) for k in range(3))
    STEP = element_step(config.rule.math, config.switches)
    U0, U1, U2 = (bool(u) for u in config.uses)
    CATCH, STEPPING = bool(catch), bool(step)
    V1, V2 = U1 and STEPPING, U2 and STEPPING     # catch-up alone touches p and slot 0
    MX = bool(config.switches[5])
    I32 = np.int32
    MAG = _magnitude_bits

    def block(Pb, Ab, Gb, T0, T1, T2, b0, b1, b2, Rb, c0, c1, c2, m, c, zero, key, lo,
              ca, cb, cc, ce):
        # a row whose catch-up map is exactly the identity (up to date) is not
        # caught up: p + 0 would turn -0 into +0 (as the float32/float64 row driver)
        catching = CATCH and not (ca == 1.0 and cb == 0.0 and cc == 0.0 and ce == 1.0)
        t0 = t1 = t2 = I32(0)
        for i in range(m):
            old = LP(Pb, Ab, i)
            p = old
            s0 = L0(T0, i, c0) if U0 else zero
            s1 = L1(T1, i, c1) if V1 else zero
            s2 = L2(T2, i, c2) if V2 else zero
            if catching:
                p, s0 = apply_catch_up(p, s0, ca, cb, cc, ce, CT)
            if STEPPING:
                p, s0, s1, s2 = STEP(p, LG(Gb, i), s0, s1, s2, c, zero)
            if MX:
                Rb[i] = p
            else:
                SP(Pb, Ab, i, p, old, key, lo)
            if Q8:
                if U0:
                    b0[i] = s0
                    t0 = max(t0, MAG(s0))
                if V1:
                    b1[i] = s1
                    t1 = max(t1, MAG(s1))
                if V2:
                    b2[i] = s2
                    t2 = max(t2, MAG(s2))
            else:
                if U0:
                    W0(T0, i, s0)
                if V1:
                    W1(T1, i, s1)
                if V2:
                    W2(T2, i, s2)
        return t0, t1, t2

    fn = _BLOCK_LOOPS[key] = register_jitable(inline="always")(block)
    return fn


@register_jitable
def _magnitude_bits(x):
    """The bit pattern of ``|x|`` as float32, an int32 (Inf and NaN above 0x7F800000 -
    1): for non-negative floats the patterns order like the values, so a block's
    largest magnitude is an integer max, which vectorizes."""
    return np.int32(bits32(x) & np.uint32(0x7FFFFFFF))


def _q8_slot(storage, slot, CT):
    """(has_special(T, m), finish(T, b, scales, kb, m)) of an 8-bit slot: whether a
    block's codes hold a special code (a byte min/max reduction); encoding a block's
    new values ``b`` with their scale (the largest finite magnitude, an integer max
    over the bit patterns), with the finite-only encoder unless a value is not
    finite.  ``finish`` computes the block's largest pattern itself; the drivers
    call ``_q8_finish(...)(T, b, scales, kb, m, top)`` with the one their element
    loop reduced."""
    from ..storage import codecs as C
    signed = storage.signed[slot] if slot < len(storage.signed) else True
    HAS = C.block_has_special_signed if signed else C.block_has_special_unsigned
    FIN = _q8_finish(storage, slot, CT)
    I32 = np.int32

    @register_jitable
    def has_special(T, m):
        return HAS(T, m)

    @register_jitable
    def finish(T, b, scales, kb, m):
        top = I32(0)
        for i in range(m):
            top = max(top, _magnitude_bits(b[i]))
        FIN(T, b, scales, kb, m, top)
    return has_special, finish


def _q8_finish(storage, slot, CT):
    """``finish(T, b, scales, kb, m, top)``: encode the block's new values ``b``
    given ``top``, the largest :func:`_magnitude_bits` of ``b[:m]``.  Every value
    finite (``top`` below Inf's pattern), nearly always: the scale is ``top``'s
    float and one encode pass with the finite-only encoder follows; otherwise a
    pass finds the largest finite magnitude and the full encoder runs."""
    from ..storage import io
    from ..storage.codecs import from_bits, scale_inverse
    _, _, ENC, ENCF, _ = io.q8_pieces(storage, slot, CT)
    I32 = np.int32

    @register_jitable
    def finish(T, b, scales, kb, m, top):
        if top >= I32(0x7F800000):
            fin = I32(0)
            for i in range(m):
                x = _magnitude_bits(b[i])
                fin = max(fin, x if x < I32(0x7F800000) else I32(0))
            a = from_bits(fin)
            scales[kb] = a
            inv = scale_inverse(a)
            for i in range(m):
                T[i] = ENC(b[i], inv)
        else:
            a = from_bits(top)
            scales[kb] = a
            inv = scale_inverse(a)
            for i in range(m):
                T[i] = ENCF(b[i], inv)
    return finish


def make_stored_dense_driver(config, parallel):
    """The dense driver of a stored format: ``chunks`` rows ``(tensor, first block,
    end block)``; block ``k`` of a tensor is row ``k // nb``, elements
    ``[(k % nb) * BLK, ...)`` of that row (``fmt`` holds row length and nb)."""
    from .base import FMT_BASE, FMT_KEY
    k = _stored_pieces(config)
    CT, Q8, BLK = k["CT"], k["Q8"], k["BLK"]
    PDT, GDT, SDT, ADT = k["PDT"], k["GDT"], k["SDT"], k["ADT"]
    BODY = _block_loop(config, config.grad, False, True, True)
    BODYS = _block_loop(config, config.grad, False, True, False) if Q8 else BODY
    Q = [_q8_slot(config.storage, s, CT) for s in range(3)] if Q8 else [(None, None)] * 3
    (H0, _), (H1, _), (H2, _) = Q
    E0, E1, E2 = ([_q8_finish(config.storage, s, CT) for s in range(3)] if Q8
                  else [None] * 3)
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = (bool(u) for u in config.uses)
    assert not config.switches[5], "max_norm runs through the row driver"
    STAMP = _stamp(config.rule.math, stored_tensor, block_at)
    PARALLEL = bool(parallel)
    F32 = np.float32
    FK, FE = FMT_KEY, FMT_BASE
    NBUF = BLK if Q8 else 1
    CTT = numba.from_dtype(np.dtype(CT))
    HAS_AUX = config.storage.aux is not None

    def stored_dense_driver(ptrs, fmt, chunks, hyper, hidx):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        zero = CT(0)
        for ci in prange(chunks.shape[0]):
            t = chunks[ci, 0]
            n, D, nb, P, G, S0, S1, S2, A, C0, C1, C2 = stored_tensor(ptrs, fmt, t, PDT, GDT,
                                                                     SDT, ADT)
            key = np.uint32(fmt[t, FK])
            base = fmt[t, FE]
            c = LOAD(hyper, hidx[t])
            # block buffers on the stack (see _stack_buffer)
            b0 = carray(_stack_buffer(NBUF, CTT), (NBUF,))
            b1 = carray(_stack_buffer(NBUF, CTT), (NBUF,))
            b2 = carray(_stack_buffer(NBUF, CTT), (NBUF,))
            for kb in range(chunks[ci, 1], chunks[ci, 2]):
                r, j0, lo, m = block_at(kb, nb, D, BLK)
                # views of the block, indexed from 0 (see fastopt.storage.io)
                Pb, Gb, Ab = P[lo:lo + m], G[lo:lo + m], A[lo:lo + m] if HAS_AUX else A
                T0, T1, T2 = S0[lo:lo + m], S1[lo:lo + m], S2[lo:lo + m]
                c0 = C0[kb] if Q8 and U0 else F32(0)
                c1 = C1[kb] if Q8 and U1 else F32(0)
                c2 = C2[kb] if Q8 and U2 else F32(0)
                special = False
                if Q8:
                    special = ((U0 and H0(T0, m)) or (U1 and H1(T1, m))
                               or (U2 and H2(T2, m)))
                if special:
                    t0, t1, t2 = BODYS(Pb, Ab, Gb, T0, T1, T2, b0, b1, b2, b0, c0, c1, c2, m,
                                       c, zero, key, base + lo, 1.0, 0.0, 0.0, 1.0)
                else:
                    t0, t1, t2 = BODY(Pb, Ab, Gb, T0, T1, T2, b0, b1, b2, b0, c0, c1, c2, m,
                                      c, zero, key, base + lo, 1.0, 0.0, 0.0, 1.0)
                if Q8:
                    if U0:
                        E0(T0, b0, C0, kb, m, t0)
                    if U1:
                        E1(T1, b1, C1, kb, m, t1)
                    if U2:
                        E2(T2, b2, C2, kb, m, t2)

    return _compile(stored_dense_driver, parallel)


def make_stored_rows_driver(config, parallel, catch, step):
    """The row driver of a stored format (element-wise rules): parameters, state,
    aux and scale arrays flat; each unique row ``uniq[u]`` (``D`` elements, in
    blocks of BLK for 8-bit state) is caught up (``catch``), stepped with its
    summed gradient (``step``; ``vals`` in the compute dtype, duplicates summed by
    :func:`summed_row` into the task's row ``scratch[t]``), renormalized
    (``max_norm``, on a row buffer) and stored.  ``tasks`` tasks own contiguous
    ranges of unique rows."""
    k = _stored_pieces(config)
    CT, LP, SP, Q8 = k["CT"], k["LP"], k["SP"], k["Q8"]
    BODY = _block_loop(config, "native", catch, step, True)
    BODYS = _block_loop(config, "native", catch, step, False) if Q8 else BODY
    Q = [_q8_slot(config.storage, s, CT) for s in range(3)] if Q8 else [(None, None)] * 3
    (H0, _), (H1, _), (H2, _) = Q
    E0, E1, E2 = ([_q8_finish(config.storage, s, CT) for s in range(3)] if Q8
                  else [None] * 3)
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = (bool(u) for u in config.uses)
    MX = bool(config.switches[5])
    EPS = CT(RENORM_EPS)
    CATCH, STEPPING = bool(catch), bool(step)
    V1, V2 = U1 and STEPPING, U2 and STEPPING     # catch-up alone touches p and slot 0
    STAMP = _stamp(config.rule.math)
    PARALLEL = bool(parallel)
    F32 = np.float32
    Q8BLK = k["BLK"]
    NBUF = Q8BLK if Q8 else 1
    CTT = numba.from_dtype(np.dtype(CT))
    HAS_AUX = config.storage.aux is not None
    AHEAD = PREFETCH_AHEAD

    def stored_rows_driver(P, A, S0, S1, S2, C0, C1, C2, vals, order, seg, uniq, hyper,
                           scratch, coef, D, key, base, tasks):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        zero = CT(0)
        n = uniq.shape[0]
        BLK = Q8BLK if Q8 else D
        nb = (D + BLK - 1) // BLK
        ukey = np.uint32(key)
        for t in prange(tasks):
            c = LOAD(hyper, 0)
            b0 = carray(_stack_buffer(NBUF, CTT), (NBUF,))   # see _stack_buffer
            b1 = carray(_stack_buffer(NBUF, CTT), (NBUF,))
            b2 = carray(_stack_buffer(NBUF, CTT), (NBUF,))
            prow = np.empty(D if MX else 1, dtype=CT)
            hi = n * (t + 1) // tasks
            for u in range(n * t // tasks, hi):
                if u + AHEAD < hi:          # the rows AHEAD unique rows ahead
                    q = uniq[u + AHEAD] * D
                    prefetch_span(P, q, D)
                    if HAS_AUX:
                        prefetch_span(A, q, D)
                    if U0:
                        prefetch_span(S0, q, D)
                    if V1:
                        prefetch_span(S1, q, D)
                    if V2:
                        prefetch_span(S2, q, D)
                    if STEPPING:
                        if seg[u + AHEAD + 1] - seg[u + AHEAD] == 1:
                            prefetch_row(vals, order[seg[u + AHEAD]])
                r = uniq[u]
                G = b0                      # (no gradient when only catching up)
                if STEPPING:
                    G = summed_row(vals, order, seg[u], seg[u + 1], scratch, t)
                ca, cb, cc, ce = 1.0, 0.0, 0.0, 1.0
                if CATCH:
                    ca, cb, cc, ce = coef[u, 0], coef[u, 1], coef[u, 2], coef[u, 3]
                for jb in range(nb):
                    j0 = jb * BLK
                    m = min(BLK, D - j0)
                    kb = r * nb + jb
                    lo = r * D + j0
                    # views of the block, indexed from 0 (see fastopt.storage.io)
                    Pb, Ab = P[lo:lo + m], A[lo:lo + m] if HAS_AUX else A
                    T0, T1, T2 = S0[lo:lo + m], S1[lo:lo + m], S2[lo:lo + m]
                    Gb = G[j0:j0 + m]
                    Rb = prow[j0:j0 + m] if MX else prow
                    c0 = C0[kb] if Q8 and U0 else F32(0)
                    c1 = C1[kb] if Q8 and V1 else F32(0)
                    c2 = C2[kb] if Q8 and V2 else F32(0)
                    special = False
                    if Q8:
                        special = ((U0 and H0(T0, m)) or (V1 and H1(T1, m))
                                   or (V2 and H2(T2, m)))
                    if special:
                        t0, t1, t2 = BODYS(Pb, Ab, Gb, T0, T1, T2, b0, b1, b2, Rb, c0, c1,
                                           c2, m, c, zero, ukey, base + lo, ca, cb, cc, ce)
                    else:
                        t0, t1, t2 = BODY(Pb, Ab, Gb, T0, T1, T2, b0, b1, b2, Rb, c0, c1,
                                          c2, m, c, zero, ukey, base + lo, ca, cb, cc, ce)
                    if Q8:
                        if U0:
                            E0(T0, b0, C0, kb, m, t0)
                        if V1:
                            E1(T1, b1, C1, kb, m, t1)
                        if V2:
                            E2(T2, b2, C2, kb, m, t2)
                if MX:
                    renorm_row(prow, c, zero, EPS)
                    lo = r * D
                    Pr, Ar = P[lo:lo + D], A[lo:lo + D] if HAS_AUX else A
                    for j in range(D):
                        SP(Pr, Ar, j, prow[j], LP(Pr, Ar, j), ukey, base + lo + j)

    return _compile(stored_rows_driver, parallel)


def make_stored_rowwise_driver(config, parallel):
    """Row-wise rules with bfloat16 parameters: each touched row is widened into a
    buffer, updated by the rule's row math with the fused options around it, and
    stored in the parameter's format (the per-row state stays float32)."""
    k = _stored_pieces(config)
    CT, LP, SP = k["CT"], k["LP"], k["SP"]
    MATH = config.rule.math
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    SC, CL, L1, LO, HI, MX = (bool(s) for s in config.switches)
    from ..rules.fused import post, pre
    POST = L1 or LO or HI
    EPS = CT(RENORM_EPS)
    STAMP = _stamp(MATH)
    PARALLEL = bool(parallel)
    HAS_AUX = config.storage.aux is not None

    def stored_rowwise_driver(P, A, S0, vals, order, seg, uniq, hyper, scratch, D, key,
                              base, tasks):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        zero = CT(0)
        inv_d = CT(1) / CT(D)
        n = uniq.shape[0]
        ukey = np.uint32(key)
        for t in prange(tasks):
            c = LOAD(hyper, 0)
            prow = np.empty(D, dtype=CT)
            grow = np.empty(D, dtype=CT)
            for u in range(n * t // tasks, n * (t + 1) // tasks):
                r = uniq[u]
                G = summed_row(vals, order, seg[u], seg[u + 1], scratch, t)
                lo = r * D
                Pr, Ar = P[lo:lo + D], A[lo:lo + D] if HAS_AUX else A
                for j in range(D):
                    prow[j] = LP(Pr, Ar, j)
                    grow[j] = pre(G[j], c, SC, CL)
                S0[r] = MATH(prow, grow, S0[r], inv_d, zero, c)
                if POST:
                    for j in range(D):
                        prow[j] = post(prow[j], c, zero, L1, LO, HI)
                if MX:
                    renorm_row(prow, c, zero, EPS)
                for j in range(D):
                    SP(Pr, Ar, j, prow[j], LP(Pr, Ar, j), ukey, base + lo + j)

    return _compile(stored_rowwise_driver, parallel)


def _flat_view(a, dtype):
    """A flat view of ``a`` with the kernel's element dtype (bfloat16 -> uint16)."""
    v = a.reshape(-1)
    return v.view(dtype) if v.dtype != np.dtype(dtype) else v


def run_stored_rows(work):
    """A :class:`~fastopt.backends.base.RowsWork` of a stored format."""
    from ..storage import io
    cfg = work.config
    p = work.param
    nrows = p.shape[0]
    D = p.size // nrows if nrows else 0
    uniq = work.uniq
    if uniq.shape[0] == 0 or D == 0:
        return
    CT = np.dtype(cfg.compute_dtype)
    PDT, _, SDT, ADT = io.dtypes(cfg.storage, "native", CT.type)
    parallel = uniq.shape[0] * D >= PARALLEL_MIN and may_use_threads()
    threads = numba.get_num_threads() if parallel else 1
    tasks = max(1, min(uniq.shape[0], 4 * threads))
    P = _flat_view(p, PDT)
    extras = work.extras if work.extras is not None else (None,) * 4
    aux = extras[0]
    A = _flat_view(aux, ADT) if aux is not None else np.empty(0, np.uint16)
    step = work.vals is not None
    if step:
        vals = work.vals
        if vals.dtype != CT:
            vals = vals.astype(CT)
        dups = work.order.shape[0] > uniq.shape[0]
        scratch = scratch_rows(tasks if dups else 0, D, CT)
        order, seg = work.order, work.seg
    else:
        vals = np.empty((0, D), dtype=CT)
        scratch = vals
        order, seg = uniq, uniq
    if cfg.rule.layout == "rowwise":
        _driver(make_stored_rowwise_driver, cfg, parallel)(
            P, A, work.slots[0].reshape(nrows), vals, order, seg, uniq, work.hyper, scratch,
            D, work.key, work.base, tasks)
        return
    S = [_flat_view(s, SDT) if s is not None else P for s in work.slots]
    none = np.empty(0, np.float32)
    C = [c if c is not None else none for c in extras[1:]]
    catch = work.catch is not None
    coef = work.catch.coef if catch else _EMPTY_COEF
    _driver(make_stored_rows_driver, cfg, parallel, catch, step)(
        P, A, S[0], S[1], S[2], C[0], C[1], C[2], vals, order, seg, uniq, work.hyper, scratch,
        coef, D, work.key, work.base, tasks)


class NumbaBackend(Backend):
    """Numba CPU drivers; every feature of :data:`fastopt.backends.base.FEATURES`."""

    name = "numba"
    #: every format, float32/float64 included, runs through the drivers above
    plain_layout = False

    def run_dense(self, work):
        if work.nelem:
            parallel = bool(work.nelem >= PARALLEL_MIN) and may_use_threads()
            # the launch handle, kept on the bucket (work.launch, as every backend);
            # identity, not equality: comparing Config dataclasses costs a microsecond
            cached = work.launch.get("numba")
            if cached is None or cached[0] is not work.config or cached[1] is not parallel:
                cached = work.launch["numba"] = (work.config, parallel, _driver(
                    make_stored_dense_driver, work.config, parallel))
            cached[2](work.ptrs, work.fmt, work.chunks, work.hyper, work.hidx)

    # factored rules: the grouped step, an optional capability that
    # fastopt.factored.step uses when a backend has it
    # (fastopt/backends/numba_factored_group.py), and the per-tensor passes
    # (fastopt/backends/numba_factored.py)
    def factored_group(self, ptrs, dims, sqn, sidx, scal, dtype):
        """One call stepping every tensor of a group plan (small tensors: one
        thread per tensor; the same bits as the per-tensor passes)."""
        from . import numba_factored_group
        numba_factored_group.run_group(ptrs, dims, sqn, sidx, scal, dtype)

    def factored_sums(self, *a):
        from . import numba_factored
        return numba_factored.factored_sums(*a)

    def factored_usq(self, *a):
        from . import numba_factored
        return numba_factored.factored_usq(*a)

    def factored_apply(self, *a):
        from . import numba_factored
        numba_factored.factored_apply(*a)

    def vector_sums(self, *a):
        from . import numba_factored
        return numba_factored.vector_sums(*a)

    def vector_usq(self, *a):
        from . import numba_factored
        return numba_factored.vector_usq(*a)

    def vector_apply(self, *a):
        from . import numba_factored
        numba_factored.vector_apply(*a)

    def run_norms(self, work):
        from .numba_norms import run_norms
        return run_norms(work, self.element_chunks(work),
                         bool(work.nelem >= PARALLEL_MIN) and may_use_threads())

    def run_rows(self, work):
        if work.catch is not None and work.catch.coef is None:
            raise ValueError("exact-mode work without its catch-up maps")
        if work.config.storage.native:
            run_rows(work)
        else:
            run_stored_rows(work)
