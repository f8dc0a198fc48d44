"""Numba CPU driver: one parallel region over tensor-chunks for all parameters.

A launch receives

* ``ptrs``   int64 (T, 2 + NSLOTS): data addresses of param, grad and state slots of
  the T tensors in this launch (unused slots hold the param's address and are
  never touched);
* ``chunks`` int64 (C, 3): ``(tensor, start, stop)`` element ranges of at most
  ``CHUNK`` elements; ``prange`` runs over chunks, so 1,000 small tensors cost one
  parallel region, not 1,000 calls;
* ``hyper``  float64 (R, NSCALARS): per-step host scalars, one row per distinct
  (group, step) and ``hidx`` int64 (T,): the row of each tensor.

The driver is a closure over the rule's math (a ``register_jitable`` function),
the dtype and which slots are used; Numba folds those constants, so each rule gets
a specialized, vectorized loop.  Closures whose cells hold only picklable constants
are cached on disk by Numba (``cache=True``; Numba falls back to a per-user cache
directory when the package directory is read-only).  ``error_model="numpy"`` keeps
IEEE division (and lets LLVM vectorize); no fastmath flags, so NaN/Inf propagate.

Addresses are validated by the Python layer (shapes, dtypes, contiguity, sizes)
before a launch: the kernels do no bounds checks.
"""

import hashlib
import inspect

import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable

from . import fused
from .fused import post, pre, renorm_row
from .registry import NSCALARS, NSLOTS

#: Elements per chunk: big enough to amortize the per-chunk setup, small enough to
#: balance 1,000 mid-size tensors over the threads.
CHUNK = 1 << 15
#: Below this many elements in a step, a serial driver is used (a parallel region
#: costs more than it saves).
PARALLEL_MIN = 1 << 15

assert NSCALARS == 18 and NSLOTS == 3


@intrinsic
def _voidptr(typingctx, addr):
    """Reinterpret an integer address as a ``void*`` (for ``numba.carray``)."""
    sig = types.voidptr(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


def _stamp(fn):
    """A number that changes when the rule's source changes (part of the cache key)."""
    src = inspect.getsource(getattr(fn, "py_func", fn))
    return int(hashlib.sha256(src.encode()).hexdigest()[:15], 16)


def scalar_loader(dtype, const):
    """A jitable ``load(hyper, r) -> c``: row ``r`` of the per-step scalars as a tuple
    in ``dtype``, with the ``const`` entries ``((index, value), ...)`` compiled in as
    constants (option flags, zero weight decay), so the branches they control vanish
    from the vectorized loop.  (A ``("fused", flags)`` entry of ``const`` is for the
    drivers: see :func:`fastopt.fused.split`.)"""
    DT = np.dtype(dtype).type
    fixed = dict(k for k in const if isinstance(k[0], int))
    (F0, F1, F2, F3, F4, F5, F6, F7, F8, F9, F10, F11, F12, F13, F14, F15, F16,
     F17) = (k in fixed for k in range(NSCALARS))
    (K0, K1, K2, K3, K4, K5, K6, K7, K8, K9, K10, K11, K12, K13, K14, K15, K16,
     K17) = (DT(fixed.get(k, 0.0)) for k in range(NSCALARS))

    def load(hyper, r):
        return (K0 if F0 else DT(hyper[r, 0]),
                K1 if F1 else DT(hyper[r, 1]),
                K2 if F2 else DT(hyper[r, 2]),
                K3 if F3 else DT(hyper[r, 3]),
                K4 if F4 else DT(hyper[r, 4]),
                K5 if F5 else DT(hyper[r, 5]),
                K6 if F6 else DT(hyper[r, 6]),
                K7 if F7 else DT(hyper[r, 7]),
                K8 if F8 else DT(hyper[r, 8]),
                K9 if F9 else DT(hyper[r, 9]),
                K10 if F10 else DT(hyper[r, 10]),
                K11 if F11 else DT(hyper[r, 11]),
                K12 if F12 else DT(hyper[r, 12]),
                K13 if F13 else DT(hyper[r, 13]),
                K14 if F14 else DT(hyper[r, 14]),
                K15 if F15 else DT(hyper[r, 15]),
                K16 if F16 else DT(hyper[r, 16]),
                K17 if F17 else DT(hyper[r, 17]))

    return register_jitable(load)


def make_driver(math, dtype, uses, const, parallel):
    """Compile (or load from cache) the chunked dense driver for one configuration."""
    MATH = math
    LOAD = scalar_loader(dtype, const)
    DT = np.dtype(dtype).type
    ITEM = np.dtype(dtype).itemsize
    U0, U1, U2 = (bool(u) for u in uses)
    SC, CL, L1, LO, HI, MX = fused.split(const)[1]
    assert not MX, "max_norm runs through the row driver"
    STAMP = _stamp(math)

    def driver(ptrs, chunks, hyper, hidx):
        stamp = STAMP  # noqa: F841  (keeps the rule's source hash in the cache key)
        zero = DT(0)
        for ci in prange(chunks.shape[0]):
            t = chunks[ci, 0]
            lo = chunks[ci, 1]
            n = chunks[ci, 2] - lo
            c = LOAD(hyper, hidx[t])
            off = lo * ITEM
            P = carray(_voidptr(ptrs[t, 0] + off), (n,), DT)
            G = carray(_voidptr(ptrs[t, 1] + off), (n,), DT)
            S0 = carray(_voidptr(ptrs[t, 2] + off), (n,), DT)
            S1 = carray(_voidptr(ptrs[t, 3] + off), (n,), DT)
            S2 = carray(_voidptr(ptrs[t, 4] + off), (n,), DT)
            for i in range(n):
                s0 = S0[i] if U0 else zero
                s1 = S1[i] if U1 else zero
                s2 = S2[i] if U2 else zero
                g = pre(G[i], c, SC, CL)
                p, s0, s1, s2 = MATH(P[i], g, s0, s1, s2, c)
                P[i] = post(p, c, zero, L1, LO, HI)
                if U0:
                    S0[i] = s0
                if U1:
                    S1[i] = s1
                if U2:
                    S2[i] = s2

    return njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)(driver)


@register_jitable
def summed_row(vals, order, a, b, scratch_row):
    """The gradient of one touched row: ``vals[order[a]]`` or, with duplicates, the
    sum of ``vals[order[a:b]]`` added in order of appearance (deterministic)."""
    G = vals[order[a]]
    if b - a > 1:
        G = scratch_row
        G[:] = vals[order[a]]
        for k in range(a + 1, b):
            row = vals[order[k]]
            for j in range(G.shape[0]):
                G[j] += row[j]
    return G


def make_rowwise_driver(math, dtype, uses, const, parallel):
    """Compile the driver of a row-wise rule (one state value per row): parallel over
    the touched rows, the rule math works on whole rows.  Dense steps use it too,
    with every row touched once."""
    MATH = math
    LOAD = scalar_loader(dtype, const)
    DT = np.dtype(dtype).type
    SC, CL, L1, LO, HI, MX = fused.split(const)[1]
    PRE = SC or CL
    POST = L1 or LO or HI
    EPS = DT(fused.RENORM_EPS)
    STAMP = _stamp(math)

    def rowwise_driver(P, S0, S1, S2, vals, order, seg, uniq, hyper, scratch):
        stamp = STAMP  # noqa: F841
        zero = DT(0)
        c = LOAD(hyper, 0)
        inv_d = DT(1) / DT(P.shape[1])
        for u in prange(uniq.shape[0]):
            r = uniq[u]
            G = summed_row(vals, order, seg[u], seg[u + 1], scratch[u])
            if PRE:                       # scaled / clipped copy of the gradient row
                buf = scratch[u]
                for j in range(G.shape[0]):
                    buf[j] = pre(G[j], c, SC, CL)
                G = buf
            prow = P[r]
            S0[r, 0] = MATH(prow, G, S0[r, 0], inv_d, zero, c)
            if POST:
                for j in range(prow.shape[0]):
                    prow[j] = post(prow[j], c, zero, L1, LO, HI)
            if MX:
                renorm_row(prow, c, zero, EPS)

    return njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)(rowwise_driver)


def make_rows_driver(math, dtype, uses, const, parallel):
    """Compile the row-sparse driver: parallel over unique rows, duplicates summed
    in their order of appearance (see :func:`fastopt.sparse.coalesce_plan`).

    ``P, S0, S1, S2``: (nrows, D) views of the parameter and its state (unused slots
    get ``P`` and are never touched); ``vals``: (nnz, D) gradient rows.
    """
    MATH = math
    LOAD = scalar_loader(dtype, const)
    DT = np.dtype(dtype).type
    U0, U1, U2 = (bool(u) for u in uses)
    SC, CL, L1, LO, HI, MX = fused.split(const)[1]
    EPS = DT(fused.RENORM_EPS)
    STAMP = _stamp(math)

    def rows_driver(P, S0, S1, S2, vals, order, seg, uniq, hyper, scratch):
        stamp = STAMP  # noqa: F841
        zero = DT(0)
        c = LOAD(hyper, 0)
        D = P.shape[1]
        for u in prange(uniq.shape[0]):
            r = uniq[u]
            a = seg[u]
            b = seg[u + 1]
            G = summed_row(vals, order, a, b, scratch[u])
            for j in range(D):
                s0 = S0[r, j] if U0 else zero
                s1 = S1[r, j] if U1 else zero
                s2 = S2[r, j] if U2 else zero
                g = pre(G[j], c, SC, CL)
                p, s0, s1, s2 = MATH(P[r, j], g, s0, s1, s2, c)
                P[r, j] = post(p, c, zero, L1, LO, HI)
                if U0:
                    S0[r, j] = s0
                if U1:
                    S1[r, j] = s1
                if U2:
                    S2[r, j] = s2
            if MX:
                renorm_row(P[r], c, zero, EPS)

    return njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)(rows_driver)


_DRIVERS = {}


def driver_for(math, dtype, uses, const, parallel, factory=make_driver):
    key = (factory.__name__, math, np.dtype(dtype).str, tuple(bool(u) for u in uses), const,
           bool(parallel))
    d = _DRIVERS.get(key)
    if d is None:
        d = _DRIVERS[key] = factory(math, dtype, uses, const, parallel)
    return d


def launch(math, dtype, uses, const, ptrs, chunks, hyper, hidx, nelem):
    """Run one driver over the given chunk table (serial below PARALLEL_MIN)."""
    driver_for(math, dtype, uses, const, nelem >= PARALLEL_MIN)(ptrs, chunks, hyper, hidx)


def launch_rows(math, dtype, uses, const, P, slots, vals, order, seg, uniq, hyper,
                rowwise=False):
    """Run the row-sparse driver (serial below PARALLEL_MIN touched elements)."""
    S = [s if s is not None else P for s in slots]
    parallel = uniq.shape[0] * P.shape[1] >= PARALLEL_MIN
    # scratch rows only when some rows are summed (scratch[u] is then never read)
    sc, cl = fused.split(const)[1][:2]
    need = order.shape[0] > uniq.shape[0] or (rowwise and (sc or cl))
    scratch = np.empty((uniq.shape[0] if need else 0, P.shape[1]), dtype=P.dtype)
    factory = make_rowwise_driver if rowwise else make_rows_driver
    driver_for(math, dtype, uses, const, parallel, factory)(
        P, S[0], S[1], S[2], vals, order, seg, uniq, hyper, scratch)


def make_catch_up_driver(coeff, dtype, uses, const, parallel):
    """Compile the exact-mode catch-up: for each listed row, apply the rule's closed
    form (``fastopt.exact``) for its number of skipped steps to (param, slot 0)."""
    COEFF = coeff
    DT = np.dtype(dtype).type
    U0 = bool(uses[0])
    STAMP = _stamp(coeff)

    def catch_up(P, S0, rows, ks, firsts, h):
        stamp = STAMP  # noqa: F841
        D = P.shape[1]
        for q in prange(rows.shape[0]):
            k = ks[q]
            if k <= 0:
                continue
            a, b, c, e = COEFF(k, firsts[q], h)
            r = rows[q]
            for j in range(D):
                p = P[r, j]
                if U0:
                    s = S0[r, j]
                    P[r, j] = DT(a * p + b * s)
                    S0[r, j] = DT(c * p + e * s)
                else:
                    P[r, j] = DT(a * p)

    return njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)(catch_up)


def launch_catch_up(coeff, dtype, uses, P, S0, rows, ks, firsts, h):
    parallel = rows.shape[0] * P.shape[1] >= PARALLEL_MIN
    driver_for(coeff, dtype, uses[:1] + (False, False), (), parallel, make_catch_up_driver)(
        P, S0 if S0 is not None else P, rows, ks, firsts, h)


def make_chunks(sizes, chunk=CHUNK):
    """Chunk table (tensor, start, stop) for tensors of the given element counts."""
    rows = []
    for t, n in enumerate(sizes):
        for lo in range(0, n, chunk):
            rows.append((t, lo, min(lo + chunk, n)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


@njit(parallel=True, cache=True, nogil=True)
def _count_nonfinite(a):
    n = a.shape[0]
    nblocks = (n + CHUNK - 1) // CHUNK
    bad = 0
    for b in prange(nblocks):
        lo = b * CHUNK
        hi = min(lo + CHUNK, n)
        k = 0
        for i in range(lo, hi):
            x = a[i]
            if x - x != 0:          # Inf - Inf and NaN - NaN are NaN; finite x - x is 0
                k += 1
        bad += k
    return bad


@njit(cache=True, nogil=True)
def _first_nonfinite(a):
    for i in range(a.shape[0]):
        x = a[i]
        if x - x != 0:
            return i
    return -1


def all_finite(a):
    """True when the 1-D array ``a`` has no Inf/NaN (parallel above PARALLEL_MIN)."""
    if a.shape[0] >= PARALLEL_MIN:
        return _count_nonfinite(a) == 0
    return _first_nonfinite(a) < 0
