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
elements, the chunk sums added in order.  The 8-lane sums of squares are one
vector loop (:func:`_sq_lanes`, LLVM IR: 8 floats widened, squared and added per
iteration, each lane the scalar chain it replaces).  Every order is fixed by the shape: the
result does not depend on the thread count.  The element math is the rule's
(:mod:`fastopt.rules.adafactor`: ``sq``, ``lerp``, ``factored_v``, ``update``,
``apply``).
"""

import numpy as np

from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic

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


@intrinsic
def _sq_lanes(typingctx, arr, lo, nvec):
    """The 8 float64 lanes of a sum of squares: lane ``l`` is the sum over ``i <
    nvec``, in order, of ``float64(arr[lo + 8 i + l]) ** 2`` (the rule's :func:`sq`,
    eight elements at a time).  Written in LLVM vector IR (8 float loads, widened,
    squared, added to an 8-lane accumulator), as Numba did not vectorize the scalar
    lanes; each lane is the same chain of IEEE operations as the scalar form (no
    fast-math flags: nothing is reassociated or contracted), so the bits are the
    same."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1
            and arr.dtype in (types.float32, types.float64)):
        return None
    sig = types.UniTuple(types.float64, LANES)(arr, lo, nvec)

    def codegen(context, builder, signature, args):
        aty = signature.args[0]
        a = context.make_array(aty)(context, builder, args[0])
        elt = context.get_data_type(aty.dtype)
        vt = ir.VectorType(elt, LANES)
        vd = ir.VectorType(ir.DoubleType(), LANES)
        start = context.cast(builder, args[1], signature.args[1], types.intp)
        nv = context.cast(builder, args[2], signature.args[2], types.intp)
        base = builder.gep(a.data, [start])
        acc = cgutils.alloca_once_value(builder, ir.Constant(vd, None))
        with cgutils.for_range(builder, nv) as loop:
            off = builder.mul(loop.index, ir.Constant(loop.index.type, LANES))
            ptr = builder.bitcast(builder.gep(base, [off]), vt.as_pointer())
            v = builder.load(ptr, align=aty.dtype.bitwidth // 8)
            if aty.dtype != types.float64:
                v = builder.fpext(v, vd)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(v, v)), acc)
        res = builder.load(acc)
        return context.make_tuple(builder, signature.return_type, [
            builder.extract_element(res, ir.Constant(ir.IntType(32), k)) for k in range(LANES)])

    return sig, codegen


@register_jitable
def _row_sums(Gr, Pr, body, n):
    """``(sum G^2, sum p^2)`` of one row in float64: element j to lane j % 8 over the
    first ``body`` elements (:func:`_sq_lanes`), the lanes added in order, then the
    tail in element order."""
    a = _sq_lanes(Gr, 0, body // LANES)
    b = _sq_lanes(Pr, 0, body // LANES)
    s = 0.0
    sp = 0.0
    for k in range(LANES):
        s += a[k]
        sp += b[k]
    for j in range(body, n):
        x = sq(Gr[j])
        s += x
        y = np.float64(Pr[j])
        sp += y * y
    return s, sp


@register_jitable
def _lane_sumsq(x, n):
    """The float64 sum of ``x[:n]**2``: element i to lane i % 8 over the first
    ``n - n % 8`` elements (:func:`_sq_lanes`), the lanes added in order, then the
    tail in order."""
    body = n - n % LANES
    a = _sq_lanes(x, 0, body // LANES)
    s = a[0] + a[1] + a[2] + a[3] + a[4] + a[5] + a[6] + a[7]
    for i in range(body, n):
        y = np.float64(x[i])
        s += y * y
    return s


# --------------------------------------------- the bodies (per-tensor and grouped)
# One block of rows, one row, one chunk: the per-tensor drivers below run them in
# parallel loops, the grouped step (numba_factored_group) serially per tensor; row
# and chunk views, as with plain indexing into P and G Numba's parallel loop bodies
# did not vectorize (the update pass 7x slower than the serial driver, 16x for
# vectors).
@register_jitable
def sums_block(P, G, R, C, b, r0, r1, pc, rows, prow):
    """Rows ``r0:r1`` of matrix ``b``: ``pc`` (C) the column partial sums of ``G^2``,
    ``rows`` and ``prow`` (B R) the rows' sums of ``G^2`` and ``p^2``."""
    body = C - C % LANES
    for j in range(C):
        pc[j] = 0.0
    for r in range(r0, r1):
        base = (b * R + r) * C
        Gr = G[base:base + C]
        Pr = P[base:base + C]
        for j in range(C):
            pc[j] += sq(Gr[j])
        s, sp = _row_sums(Gr, Pr, body, C)
        rows[b * R + r] = s
        prow[b * R + r] = sp


@register_jitable
def usq_row(G, rv, cv, m, R, C, k, e2, sign, one, ub):
    """The float64 sum of ``U^2`` over row ``k`` (``ub``: a row of scratch)."""
    b = k // R
    r = rv[k]
    mb = m[b]
    cr = cv[b * C:(b + 1) * C]
    Gr = G[k * C:(k + 1) * C]
    for j in range(C):
        ub[j] = update(Gr[j] * sign, factored_v(r, cr[j], mb), e2, one)
    return _lane_sumsq(ub, C)


@register_jitable
def apply_row(P, G, rv, cv, m, R, C, k, e2, sign, one, decay, step):
    """The update of row ``k``."""
    b = k // R
    r = rv[k]
    mb = m[b]
    Pr = P[k * C:(k + 1) * C]
    Gr = G[k * C:(k + 1) * C]
    cr = cv[b * C:(b + 1) * C]
    for j in range(C):
        u = update(Gr[j] * sign, factored_v(r, cr[j], mb), e2, one)
        Pr[j] = apply(Pr[j], u, decay, step)


@register_jitable
def vsums_chunk(P, G, V, n, k, w, omw, sign):
    """Chunk ``k`` of a vector: ``V = lerp(V, G^2, w)``; returns its sum of ``p^2``."""
    lo = k * CHUNK
    hi = min(n, lo + CHUNK)
    Pc = P[lo:hi]
    Gc = G[lo:hi]
    Vc = V[lo:hi]
    for i in range(hi - lo):
        g = Gc[i] * sign
        Vc[i] = lerp(Vc[i], g * g, w, omw)
    return _lane_sumsq(Pc, hi - lo)


@register_jitable
def vusq_chunk(G, V, n, k, e2, sign, one, ub):
    """Chunk ``k`` of a vector: its sum of ``U^2`` (``ub``: a chunk of scratch)."""
    lo = k * CHUNK
    hi = min(n, lo + CHUNK)
    Gc = G[lo:hi]
    Vc = V[lo:hi]
    for i in range(hi - lo):
        ub[i] = update(Gc[i] * sign, Vc[i], e2, one)
    return _lane_sumsq(ub, hi - lo)


@register_jitable
def vapply_chunk(P, G, V, n, k, e2, sign, one, decay, step):
    """Chunk ``k`` of a vector: the update."""
    lo = k * CHUNK
    hi = min(n, lo + CHUNK)
    Pc = P[lo:hi]
    Gc = G[lo:hi]
    Vc = V[lo:hi]
    for i in range(hi - lo):
        Pc[i] = apply(Pc[i], update(Gc[i] * sign, Vc[i], e2, one), decay, step)


#: the bodies' sources, in the drivers' cache key
BODIES = (apply, factored_v, lerp, sq, update, _row_sums, _lane_sumsq, _sq_lanes._defn,
          sums_block, usq_row, apply_row, vsums_chunk, vusq_chunk, vapply_chunk)


def _make(parallel):
    """The driver functions, closures over ``STAMP`` (the rule math's source hash) and
    ``PARALLEL``: closure cells are part of Numba's on-disk cache key, so a change of
    the math recompiles and the serial and parallel drivers are cached apart."""
    STAMP = _stamp(*BODIES)
    PARALLEL = bool(parallel)

    def _sums(P, G, B, R, C, rows, prow, part):
        stamp = STAMP  # noqa: F841  (the rule math's source hash, in the cache key)
        par = PARALLEL  # noqa: F841
        nb = (R + FACTOR_ROWS - 1) // FACTOR_ROWS
        for k in prange(B * nb):
            r0 = (k % nb) * FACTOR_ROWS
            sums_block(P, G, R, C, k // nb, r0, min(R, r0 + FACTOR_ROWS), part[k], rows,
                       prow)
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
            for rr in range(r0, r1):
                rows[b * R + rr] = usq_row(G, rv, cv, m, R, C, b * R + rr, e2, sign, one, ub)
        tot = 0.0
        for k in range(B * R):
            tot += rows[k]
        return tot

    def _apply(P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        for k in prange(B * R):
            apply_row(P, G, rv, cv, m, R, C, k, e2, sign, one, decay, step)

    def _vsums(P, G, V, w, omw, sign, part):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        n = P.shape[0]
        nc = (n + CHUNK - 1) // CHUNK
        for k in prange(nc):
            part[k] = vsums_chunk(P, G, V, n, k, w, omw, sign)
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
            ub = np.empty(min(CHUNK, n - k * CHUNK), dtype=G.dtype)  # the chunk of U
            part[k] = vusq_chunk(G, V, n, k, e2, sign, one, ub)
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
            vapply_chunk(P, G, V, n, k, e2, sign, one, decay, step)

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
