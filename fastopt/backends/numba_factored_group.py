"""The grouped step of a factored rule (Adafactor) on the Numba CPU backend: one
driver call steps every small tensor of a group plan (:func:`fastopt.factored.step`
builds the plan), the factor updates compiled too.

A plan is a table of ``T`` tensors of one dtype:

* ``ptrs``  int64 (T, 4): addresses of the parameter, the gradient and the state
  (``row_var`` and ``col_var``, or ``variance`` and the parameter's address again);
* ``dims``  int64 (T, 4): ``B, R, C, n`` (``B`` matrices of ``R x C``, the leading
  dimensions flattened; a vector or 0-d tensor has ``B = 0``);
* ``sqn``   float64 (T,): ``n ** 0.5`` as Python forms it (the host formula's);
* ``sidx``  int64 (T,): the tensor's row of ``scal``, float64 (K, NSCAL): ``w``
  (``t ** beta2_decay``), ``rho``, ``decay`` (``1 - lr weight_decay``), ``eps1``
  (resolved for the dtype), ``eps2``, ``d``, ``maximize``.

Each tensor is stepped by one thread from start to end (``prange`` over the
tensors), with the per-tensor drivers' own bodies (:mod:`.numba_factored`:
``sums_block``, ``usq_row``, ``apply_row`` and the vector chunks) and
:func:`fastopt.factored.run_tensor`'s host work compiled in between, so the bits are
the per-tensor path's and do not depend on the thread count:

1. per row the float64 sums of ``G^2`` and ``p^2`` in 8 lanes, per block of
   ``FACTOR_ROWS`` rows the column partial sums, the blocks added in order, the rows'
   ``p^2`` added in order;
2. the host work, compiled: ``row_var = lerp(row_var, (sqrt(rows) in the dtype)^2 /
   C, w)`` in the dtype (torch's ``norm(G, dim)^2 / C``), ``col_var`` likewise over
   ``R``; the mean of ``row_var`` over each matrix's rows as NumPy's
   ``mean(dtype=float64)`` forms it (:func:`_np_sum`: NumPy's pairwise summation,
   through its cast buffer of ``bufsize`` elements for a float32 ``row_var``),
   clamped at ``eps1``; ``alpha = max(eps2, RMS(p)) rho`` with Python's ``max``;
3. the float64 sum of ``U^2`` per row (``U`` in the dtype), the rows added in order;
4. ``step = -alpha / max(1, RMS(U) / d)`` in float64, cast to the dtype; the update
   pass.

Vectors: ``variance`` lerped in place and ``p^2`` summed per chunk of ``CHUNK``
elements, then the RMS and update passes, the chunk sums added in order.  The
element math is the rule's (:mod:`fastopt.rules.adafactor`).
"""

import math

import numpy as np

from numba import carray, prange
from numba.extending import overload

from .._jit import register_jitable
from ..rules.adafactor import FACTOR_ROWS, lerp
from .base import CHUNK, may_use_threads
from .numba_cpu import _compile, _stamp, _voidptr
from .numba_factored import (BODIES, apply_row, sums_block, usq_row, vapply_chunk,
                             vsums_chunk, vusq_chunk)

#: columns of the scalar table
SC_W, SC_RHO, SC_DECAY, SC_EPS1, SC_EPS2, SC_D, SC_MAX = range(7)
NSCAL = 7
#: NumPy's pairwise summation: blocks of at most this many elements are summed in 8
#: accumulators (numpy/_core/src/umath/loops_utils.h.src, ``PW_BLOCKSIZE``)
PW_BLOCKSIZE = 128
_DRIVERS = {}


def _as(x, like):
    """``x`` converted to the dtype of the scalar ``like`` (jitted code only)."""
    raise NotImplementedError


@overload(_as)
def _as_impl(x, like):
    dt = like

    def impl(x, like):
        return dt(x)
    return impl


@register_jitable
def _pw_leaf(a, lo, n):
    """NumPy's pairwise sum of ``a[lo:lo+n]`` for ``n <= PW_BLOCKSIZE``, float64."""
    if n < 8:
        res = 0.0
        for i in range(n):
            res += np.float64(a[lo + i])
        return res
    r0 = np.float64(a[lo])
    r1 = np.float64(a[lo + 1])
    r2 = np.float64(a[lo + 2])
    r3 = np.float64(a[lo + 3])
    r4 = np.float64(a[lo + 4])
    r5 = np.float64(a[lo + 5])
    r6 = np.float64(a[lo + 6])
    r7 = np.float64(a[lo + 7])
    i = 8
    top = n - n % 8
    while i < top:
        r0 += np.float64(a[lo + i])
        r1 += np.float64(a[lo + i + 1])
        r2 += np.float64(a[lo + i + 2])
        r3 += np.float64(a[lo + i + 3])
        r4 += np.float64(a[lo + i + 4])
        r5 += np.float64(a[lo + i + 5])
        r6 += np.float64(a[lo + i + 6])
        r7 += np.float64(a[lo + i + 7])
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += np.float64(a[lo + i])
        i += 1
    return res


@register_jitable
def _pairwise(a, lo, n):
    """NumPy's ``pairwise_sum`` of ``a[lo:lo+n]`` in float64: a block of at most 128
    elements by :func:`_pw_leaf`, a longer span split at ``n/2`` rounded down to a
    multiple of 8, the halves' sums added (an explicit stack, depth < 64)."""
    if n <= PW_BLOCKSIZE:
        return _pw_leaf(a, lo, n)
    los = np.empty(64, dtype=np.int64)
    ns = np.empty(64, dtype=np.int64)
    st = np.empty(64, dtype=np.int64)
    vals = np.empty(64, dtype=np.float64)
    top = 0
    nv = 0
    los[0] = lo
    ns[0] = n
    st[0] = 0
    while top >= 0:
        k = ns[top]
        if k <= PW_BLOCKSIZE:
            vals[nv] = _pw_leaf(a, los[top], k)
            nv += 1
            top -= 1
            continue
        n2 = k // 2
        n2 -= n2 % 8
        if st[top] == 0:
            st[top] = 1
            top += 1
            los[top] = los[top - 1]
            ns[top] = n2
            st[top] = 0
        elif st[top] == 1:
            st[top] = 2
            top += 1
            los[top] = los[top - 1] + n2
            ns[top] = k - n2
            st[top] = 0
        else:
            vals[nv - 2] = vals[nv - 2] + vals[nv - 1]
            nv -= 1
            top -= 1
    return vals[0]


@register_jitable
def _np_sum(a, lo, n, bufsize):
    """``np.add.reduce`` of ``a[lo:lo+n]`` into float64 as NumPy runs it: 0.0 plus
    the pairwise sums of spans of ``bufsize`` elements in order (a float32 input
    goes through NumPy's cast buffer; a float64 one is passed ``bufsize >= n``)."""
    res = 0.0
    for s in range(lo, lo + n, bufsize):
        res += _pairwise(a, s, min(bufsize, lo + n - s))
    return res


@register_jitable
def _py_max(a, b):
    """Python's ``max(a, b)``: a NaN ``b`` gives ``a``."""
    return b if b > a else a


@register_jitable
def _matrix_step(P, G, rv, cv, B, R, C, sqn, sc, bufsize):
    """One tensor of ``B`` matrices of ``R x C``: its whole step (module doc)."""
    one = _as(1.0, P[0])
    w = _as(sc[SC_W], one)
    omw = one - w
    eps1 = _as(sc[SC_EPS1], one)
    e2 = _as(sc[SC_EPS1] * sc[SC_EPS1], one)
    sign = one
    if sc[SC_MAX] != 0:
        sign = -one
    decay = _as(sc[SC_DECAY], one)
    dC = _as(C, one)
    dR = _as(R, one)
    nb = (R + FACTOR_ROWS - 1) // FACTOR_ROWS
    rows = np.empty(B * R, dtype=np.float64)
    prow = np.empty(B * R, dtype=np.float64)
    part = np.empty((nb, C), dtype=np.float64)
    ub = np.empty(C, dtype=P.dtype)
    m = np.empty(B, dtype=P.dtype)
    # pass 1 and the factors, matrix by matrix (each matrix's sums are its own)
    for b in range(B):
        for blk in range(nb):
            r0 = blk * FACTOR_ROWS
            sums_block(P, G, R, C, b, r0, min(R, r0 + FACTOR_ROWS), part[blk], rows, prow)
        rb = rv[b * R:(b + 1) * R]
        cb = cv[b * C:(b + 1) * C]
        for r in range(R):
            x = _as(np.sqrt(rows[b * R + r]), one)
            rb[r] = lerp(rb[r], x * x / dC, w, omw)
        for j in range(C):
            a = 0.0
            for blk in range(nb):
                a += part[blk, j]
            x = _as(np.sqrt(a), one)
            cb[j] = lerp(cb[j], x * x / dR, w, omw)
        mb = _as(_np_sum(rv, b * R, R, bufsize) / np.float64(R), one)
        if mb < eps1:
            mb = eps1
        m[b] = mb
    psq = 0.0
    for k in range(B * R):
        psq += prow[k]
    alpha = _py_max(sc[SC_EPS2], math.sqrt(psq) / sqn) * sc[SC_RHO]
    usq = 0.0
    for k in range(B * R):
        usq += usq_row(G, rv, cv, m, R, C, k, e2, sign, one, ub)
    step = _as(-alpha / _py_max(1.0, math.sqrt(usq) / (sqn * sc[SC_D])), one)
    for k in range(B * R):
        apply_row(P, G, rv, cv, m, R, C, k, e2, sign, one, decay, step)


@register_jitable
def _vector_step(P, G, V, n, sqn, sc):
    """One vector's whole step (module doc)."""
    one = _as(1.0, P[0])
    w = _as(sc[SC_W], one)
    omw = one - w
    e2 = _as(sc[SC_EPS1] * sc[SC_EPS1], one)
    sign = one
    if sc[SC_MAX] != 0:
        sign = -one
    decay = _as(sc[SC_DECAY], one)
    nc = (n + CHUNK - 1) // CHUNK
    psq = 0.0
    for k in range(nc):
        psq += vsums_chunk(P, G, V, n, k, w, omw, sign)
    alpha = _py_max(sc[SC_EPS2], math.sqrt(psq) / sqn) * sc[SC_RHO]
    ub = np.empty(min(n, CHUNK), dtype=P.dtype)
    usq = 0.0
    for k in range(nc):
        usq += vusq_chunk(G, V, n, k, e2, sign, one, ub)
    step = _as(-alpha / _py_max(1.0, math.sqrt(usq) / (sqn * sc[SC_D])), one)
    for k in range(nc):
        vapply_chunk(P, G, V, n, k, e2, sign, one, decay, step)


def _make(dtype, parallel):
    """The group driver for parameters of ``dtype``, a closure over ``STAMP`` (the
    math's source hash), ``DT`` and ``PARALLEL`` (closure cells are part of Numba's
    on-disk cache key)."""
    STAMP = _stamp(*BODIES, _pw_leaf, _pairwise, _np_sum, _matrix_step, _vector_step)
    DT = np.dtype(dtype).type
    PARALLEL = bool(parallel)

    def _group(ptrs, dims, sqn, sidx, scal, bufsize):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        for t in prange(ptrs.shape[0]):
            B = dims[t, 0]
            n = dims[t, 3]
            P = carray(_voidptr(ptrs[t, 0]), (n,), DT)
            G = carray(_voidptr(ptrs[t, 1]), (n,), DT)
            sc = scal[sidx[t]]
            if B == 0:
                V = carray(_voidptr(ptrs[t, 2]), (n,), DT)
                _vector_step(P, G, V, n, sqn[t], sc)
            else:
                R = dims[t, 1]
                C = dims[t, 2]
                rv = carray(_voidptr(ptrs[t, 2]), (B * R,), DT)
                cv = carray(_voidptr(ptrs[t, 3]), (B * C,), DT)
                _matrix_step(P, G, rv, cv, B, R, C, sqn[t], sc, bufsize)

    return _group


def run_group(ptrs, dims, sqn, sidx, scal, dtype):
    """Step the plan's tensors (module doc); ``dtype`` float32 or float64."""
    dtype = np.dtype(dtype)
    parallel = may_use_threads() and ptrs.shape[0] > 1
    key = (dtype.name, parallel)
    d = _DRIVERS.get(key)
    if d is None:
        d = _DRIVERS[key] = _compile(_make(dtype, parallel), parallel)
    # NumPy casts a float32 row_var to float64 through its buffer for the mean
    bufsize = np.getbufsize() if dtype != np.float64 else (1 << 62)
    d(ptrs, dims, sqn, sidx, scal, bufsize)


__all__ = ["run_group", "NSCAL"]
