"""The passes of factored rules (``Rule.layout == "factored"``: Adafactor) on the
Numba CPU backend; :mod:`fastopt.factored` runs them, the host work in between.

Tensors of 2 or more dimensions are seen as ``B`` matrices of ``R x C`` (the
leading dimensions flattened, C-contiguous):

* :func:`factored_sums`: per row, the float64 sums of ``G^2`` and ``p^2`` in element
  order (``prange`` over blocks of ``FACTOR_ROWS`` rows); per block, the column
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

from ..rules.adafactor import FACTOR_ROWS, apply, factored_v, lerp, sq, update
from . import numba_cpu
from .base import CHUNK, may_use_threads
from .numba_cpu import _compile, _stamp

_DRIVERS = {}


def _make():
    """The driver functions, closures over ``STAMP`` (the rule math's source hash: a
    closure cell is part of Numba's on-disk cache key, so a change of the math
    recompiles)."""
    STAMP = _stamp(apply, factored_v, lerp, sq, update)

    def _sums(P, G, B, R, C, rows, prow, part):
        stamp = STAMP  # noqa: F841  (the rule math's source hash, in the cache key)
        nb = (R + FACTOR_ROWS - 1) // FACTOR_ROWS
        for k in prange(B * nb):
            b = k // nb
            r0 = (k % nb) * FACTOR_ROWS
            r1 = min(R, r0 + FACTOR_ROWS)
            for j in range(C):
                part[k, j] = 0.0
            for r in range(r0, r1):
                base = (b * R + r) * C
                s = 0.0
                sp = 0.0
                for j in range(C):
                    x = sq(G[base + j])
                    s += x
                    part[k, j] += x
                    y = np.float64(P[base + j])
                    sp += y * y
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
        for k in prange(B * R):
            b = k // R
            r = rv[k]
            mb = m[b]
            base = k * C
            s = 0.0
            for j in range(C):
                u = update(G[base + j] * sign, factored_v(r, cv[b * C + j], mb), e2, one)
                x = np.float64(u)
                s += x * x
            rows[k] = s
        tot = 0.0
        for k in range(B * R):
            tot += rows[k]
        return tot


    def _apply(P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step):
        stamp = STAMP  # noqa: F841
        for k in prange(B * R):
            b = k // R
            r = rv[k]
            mb = m[b]
            base = k * C
            for j in range(C):
                u = update(G[base + j] * sign, factored_v(r, cv[b * C + j], mb), e2, one)
                P[base + j] = apply(P[base + j], u, decay, step)


    def _vsums(P, G, V, w, omw, sign, part):
        stamp = STAMP  # noqa: F841
        n = P.shape[0]
        nc = (n + CHUNK - 1) // CHUNK
        for k in prange(nc):
            lo = k * CHUNK
            hi = min(n, lo + CHUNK)
            sp = 0.0
            for i in range(lo, hi):
                g = G[i] * sign
                V[i] = lerp(V[i], g * g, w, omw)
                y = np.float64(P[i])
                sp += y * y
            part[k] = sp
        tot = 0.0
        for k in range(nc):
            tot += part[k]
        return tot


    def _vusq(G, V, e2, sign, one, part):
        stamp = STAMP  # noqa: F841
        n = G.shape[0]
        nc = (n + CHUNK - 1) // CHUNK
        for k in prange(nc):
            lo = k * CHUNK
            hi = min(n, lo + CHUNK)
            s = 0.0
            for i in range(lo, hi):
                x = np.float64(update(G[i] * sign, V[i], e2, one))
                s += x * x
            part[k] = s
        tot = 0.0
        for k in range(nc):
            tot += part[k]
        return tot


    def _vapply(P, G, V, e2, sign, one, decay, step):
        stamp = STAMP  # noqa: F841
        n = P.shape[0]
        nc = (n + CHUNK - 1) // CHUNK
        for k in prange(nc):
            lo = k * CHUNK
            hi = min(n, lo + CHUNK)
            for i in range(lo, hi):
                P[i] = apply(P[i], update(G[i] * sign, V[i], e2, one), decay, step)

    return {f.__name__: f for f in (_sums, _usq, _apply, _vsums, _vusq, _vapply)}


_FNS = _make()


def _driver(name, n):
    parallel = bool(n >= numba_cpu.PARALLEL_MIN) and may_use_threads()
    key = (name, parallel)
    d = _DRIVERS.get(key)
    if d is None:
        d = _DRIVERS[key] = _compile(_FNS[name], parallel)
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
