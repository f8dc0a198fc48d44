"""The passes of factored rules (``Rule.layout == "factored"``: Adafactor) on the
Numba CPU backend; :mod:`fastopt.factored` runs them, the host work in between.

Tensors of 2 or more dimensions are seen as ``B`` matrices of ``R x C`` (the
leading dimensions flattened, C-contiguous):

* :func:`factored_sums`: per row, the float64 sums of ``G^2`` and ``p^2`` in 8 lanes
  (``LANES``; ``prange`` over blocks of ``FACTOR_ROWS`` rows); per block, the column
  partial sums of ``G^2``; then the column sums, the blocks added in order, and the
  sum of ``p^2``, the rows added in order (serially);
* :func:`factored_usq`: the float64 sum of ``U^2`` (per row, the rows in order);
* :func:`factored_apply`: the update pass (``prange`` over rows).

Vectors (and 0-d tensors, as one element): ``vector_sums`` (lerps ``variance`` in
place, sums ``p^2``), ``vector_usq``, ``vector_apply``, per chunk of ``CHUNK``
elements, the chunk sums added in order.  Every order is fixed by the shape: the
result does not depend on the thread count.  The element math is the rule's
(:mod:`fastopt.rules.adafactor`: ``sq``, ``lerp``, ``factored_v``, ``update``,
``apply``).
"""

import numpy as np

from numba import prange

from .._jit import register_jitable
from ..rules.adafactor import FACTOR_ROWS, apply, factored_v, lerp, sq, update
from .base import CHUNK, may_use_threads
from .numba_cpu import _compile, _stamp

#: float64 accumulators per row (or chunk): element j goes to lane j % LANES over
#: the row's first ``C - C % LANES`` elements; the lanes are then added in order,
#: then the tail in element order (independent chains, so the sums are not bound by
#: the latency of one chain of additions; the order is fixed by the shape)
LANES = 8
_DRIVERS = {}


@register_jitable
def _row_sums(Gr, Pr, body, n):
    """``(sum G^2, sum p^2)`` of one row in float64: element j to lane j % 8 over the
    first ``body`` elements, the lanes added in order, then the tail (scalar lanes:
    with lanes in an array Numba kept them in memory)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    b0, b1, b2, b3, b4, b5, b6, b7 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for j0 in range(0, body, 8):
        x = sq(Gr[j0 + 0])
        a0 += x
        y = np.float64(Pr[j0 + 0])
        b0 += y * y
        x = sq(Gr[j0 + 1])
        a1 += x
        y = np.float64(Pr[j0 + 1])
        b1 += y * y
        x = sq(Gr[j0 + 2])
        a2 += x
        y = np.float64(Pr[j0 + 2])
        b2 += y * y
        x = sq(Gr[j0 + 3])
        a3 += x
        y = np.float64(Pr[j0 + 3])
        b3 += y * y
        x = sq(Gr[j0 + 4])
        a4 += x
        y = np.float64(Pr[j0 + 4])
        b4 += y * y
        x = sq(Gr[j0 + 5])
        a5 += x
        y = np.float64(Pr[j0 + 5])
        b5 += y * y
        x = sq(Gr[j0 + 6])
        a6 += x
        y = np.float64(Pr[j0 + 6])
        b6 += y * y
        x = sq(Gr[j0 + 7])
        a7 += x
        y = np.float64(Pr[j0 + 7])
        b7 += y * y
    s = 0.0
    sp = 0.0
    s += a0
    sp += b0
    s += a1
    sp += b1
    s += a2
    sp += b2
    s += a3
    sp += b3
    s += a4
    sp += b4
    s += a5
    sp += b5
    s += a6
    sp += b6
    s += a7
    sp += b7
    for j in range(body, n):
        x = sq(Gr[j])
        s += x
        y = np.float64(Pr[j])
        sp += y * y
    return s, sp


@register_jitable
def _lane_sumsq(x, n):
    """The float64 sum of ``x[:n]**2``: element i to lane i % 8 over the first
    ``n - n % 8`` elements, the lanes added in order, then the tail in order."""
    body = n - n % 8
    a0, a1, a2, a3, a4, a5, a6, a7 = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    for i0 in range(0, body, 8):
        y = np.float64(x[i0])
        a0 += y * y
        y = np.float64(x[i0 + 1])
        a1 += y * y
        y = np.float64(x[i0 + 2])
        a2 += y * y
        y = np.float64(x[i0 + 3])
        a3 += y * y
        y = np.float64(x[i0 + 4])
        a4 += y * y
        y = np.float64(x[i0 + 5])
        a5 += y * y
        y = np.float64(x[i0 + 6])
        a6 += y * y
        y = np.float64(x[i0 + 7])
        a7 += y * y
    s = a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7
    for i in range(body, n):
        y = np.float64(x[i])
        s += y * y
    return s


def _make(parallel):
    """The driver functions, closures over ``STAMP`` (the rule math's source hash) and
    ``PARALLEL``: closure cells are part of Numba's on-disk cache key, so a change of
    the math recompiles and the serial and parallel drivers are cached apart."""
    STAMP = _stamp(apply, factored_v, lerp, sq, update, _row_sums, _lane_sumsq)
    PARALLEL = bool(parallel)

    def _sums(P, G, B, R, C, rows, prow, part):
        stamp = STAMP  # noqa: F841  (the rule math's source hash, in the cache key)
        par = PARALLEL  # noqa: F841
        nb = (R + FACTOR_ROWS - 1) // FACTOR_ROWS
        body = C - C % LANES
        for k in prange(B * nb):
            b = k // nb
            r0 = (k % nb) * FACTOR_ROWS
            r1 = min(R, r0 + FACTOR_ROWS)
            pc = part[k]
            for j in range(C):
                pc[j] = 0.0
            for r in range(r0, r1):
                base = (b * R + r) * C
                Gr = G[base:base + C]            # row views vectorize (see _apply)
                Pr = P[base:base + C]
                for j in range(C):
                    pc[j] += sq(Gr[j])
                s, sp = _row_sums(Gr, Pr, body, C)
                rows[b * R + r] = s
                prow[b * R + r] = sp
        cols = np.empty(B * C, dtype=np.float64)
        for q in prange(B * C):
            b = q // C
            j = q % C
            a = 0.0
            for blk in range(nb):
                a += part[b * nb + blk, j]
            cols[q] = a
        tot = 0.0
        for r in range(B * R):
            tot += prow[r]
        return cols, tot

    def _usq(G, rv, cv, m, B, R, C, e2, sign, one, rows):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        nb = (R + FACTOR_ROWS - 1) // FACTOR_ROWS
        for kb in prange(B * nb):          # blocks of rows: scratch made once per block
            b = kb // nb
            r0 = (kb % nb) * FACTOR_ROWS
            r1 = min(R, r0 + FACTOR_ROWS)
            ub = np.empty(C, dtype=G.dtype)          # a row of U, in the dtype
            mb = m[b]
            cb = b * C
            cr = cv[cb:cb + C]
            for rr in range(r0, r1):
                k = b * R + rr
                r = rv[k]
                Gr = G[k * C:(k + 1) * C]        # row views vectorize (see _apply)
                for j in range(C):
                    ub[j] = update(Gr[j] * sign, factored_v(r, cr[j], mb), e2, one)
                rows[k] = _lane_sumsq(ub, C)
        tot = 0.0
        for k in range(B * R):
            tot += rows[k]
        return tot

    def _apply(P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        for k in prange(B * R):
            b = k // R
            r = rv[k]
            mb = m[b]
            # row views: with plain indexing into P and G Numba's parallel loop body
            # did not vectorize (7x slower than the serial driver)
            Pr = P[k * C:(k + 1) * C]
            Gr = G[k * C:(k + 1) * C]
            cr = cv[b * C:(b + 1) * C]
            for j in range(C):
                u = update(Gr[j] * sign, factored_v(r, cr[j], mb), e2, one)
                Pr[j] = apply(Pr[j], u, decay, step)

    def _vsums(P, G, V, w, omw, sign, part):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        n = P.shape[0]
        nc = (n + CHUNK - 1) // CHUNK
        for k in prange(nc):
            lo = k * CHUNK
            hi = min(n, lo + CHUNK)
            Pc = P[lo:hi]                # chunk views vectorize (see _apply)
            Gc = G[lo:hi]
            Vc = V[lo:hi]
            for i in range(hi - lo):
                g = Gc[i] * sign
                Vc[i] = lerp(Vc[i], g * g, w, omw)
            part[k] = _lane_sumsq(Pc, hi - lo)
        tot = 0.0
        for k in range(nc):
            tot += part[k]
        return tot

    def _vusq(G, V, e2, sign, one, part):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        n = G.shape[0]
        nc = (n + CHUNK - 1) // CHUNK
        for k in prange(nc):
            lo = k * CHUNK
            hi = min(n, lo + CHUNK)
            Gc = G[lo:hi]                # chunk views vectorize (see _apply)
            Vc = V[lo:hi]
            ub = np.empty(hi - lo, dtype=G.dtype)    # the chunk of U, in the dtype
            for i in range(hi - lo):
                ub[i] = update(Gc[i] * sign, Vc[i], e2, one)
            part[k] = _lane_sumsq(ub, hi - lo)
        tot = 0.0
        for k in range(nc):
            tot += part[k]
        return tot

    def _vapply(P, G, V, e2, sign, one, decay, step):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        n = P.shape[0]
        nc = (n + CHUNK - 1) // CHUNK
        for k in prange(nc):
            lo = k * CHUNK
            hi = min(n, lo + CHUNK)
            Pc = P[lo:hi]
            Gc = G[lo:hi]
            Vc = V[lo:hi]
            for i in range(hi - lo):
                Pc[i] = apply(Pc[i], update(Gc[i] * sign, Vc[i], e2, one), decay, step)

    return {f.__name__: f for f in (_sums, _usq, _apply, _vsums, _vusq, _vapply)}


_FNS = {False: _make(False), True: _make(True)}


def _driver(name, n):
    from .. import factored
    parallel = bool(n >= factored.PARALLEL_MIN) and may_use_threads()
    key = (name, parallel)
    d = _DRIVERS.get(key)
    if d is None:
        d = _DRIVERS[key] = _compile(_FNS[parallel][name], parallel)
    return d


def factored_sums(P, G, B, R, C):
    """``(row sums of G^2 (B, R), column sums of G^2 (B, C), sum of p^2)``, float64."""
    nb = -(-R // FACTOR_ROWS)
    rows = np.empty(B * R, dtype=np.float64)
    prow = np.empty(B * R, dtype=np.float64)
    part = np.empty((B * nb, C), dtype=np.float64)
    cols, psq = _driver("_sums", P.size)(P, G, B, R, C, rows, prow, part)
    return rows.reshape(B, R), cols.reshape(B, C), psq


def factored_usq(G, rv, cv, m, B, R, C, e2, sign, one):
    rows = np.empty(B * R, dtype=np.float64)
    return _driver("_usq", G.size)(G, rv, cv, m, B, R, C, e2, sign, one, rows)


def factored_apply(P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step):
    _driver("_apply", P.size)(P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step)


def vector_sums(P, G, V, w, omw, sign):
    part = np.empty(-(-P.size // CHUNK), dtype=np.float64)
    return _driver("_vsums", P.size)(P, G, V, w, omw, sign, part)


def vector_usq(G, V, e2, sign, one):
    part = np.empty(-(-G.size // CHUNK), dtype=np.float64)
    return _driver("_vusq", G.size)(G, V, e2, sign, one, part)


def vector_apply(P, G, V, e2, sign, one, decay, step):
    _driver("_vapply", P.size)(P, G, V, e2, sign, one, decay, step)
