"""The passes of factored rules (``Rule.layout == "factored"``: Adafactor) on the CUDA
backend, as ``cuda.jit`` kernels; the device twin of
:mod:`fastopt.backends.numba_factored` plus the small work that
:func:`fastopt.factored.run_tensor` does on the host between the passes (the lerps
of the factors and the mean of ``row_var``), since the state lives on the device.

A tensor of 2 or more dimensions is ``B`` matrices of ``R x C`` (C-contiguous)::

    sums    (one block per row k)   rows[k] = sum_j G[k,j]^2,  prow[k] = sum_j p[k,j]^2
    colpart (one thread per column and block of FACTOR_ROWS rows) the block's
            partial column sums of G^2, its rows in order
    colsum  (one thread per column) cols[b,j] = its blocks' partial sums in order
    factors (one thread per factor) row_var[k] = lerp(row_var[k], n_k^2 / C, w),
            n_k = sqrt(rows[k]) in the dtype (torch's norm, squared and divided);
            col_var likewise with R
    mean    (one block per matrix)  m[b] = max(mean_r row_var[b, r], eps1) (float64 sum)
    usq     (one block per row)     urow[k] = sum_j U[k,j]^2,
            U = sign G rsqrt(max(row_var col_var / m, eps1^2))  (U in the dtype)
    apply   (grid-stride)           p = p decay + step U

and the host adds ``prow`` and ``urow`` (copied back, float64, in row order) and forms ``alpha`` and the divisor with the rule's
:func:`~fastopt.rules.adafactor.alpha_of` / :func:`~fastopt.rules.adafactor.divisor_of`.
Vectors (and 0-d tensors): ``vsums`` (one block per chunk of :data:`VCHUNK`
elements: lerps ``variance`` in place, sums ``p^2``), ``vusq`` and ``vapply``.

The element math is the rule's (:mod:`fastopt.rules.adafactor`: ``sq``, ``lerp``,
``factored_v``, ``update``, ``apply``), compiled as device functions, as the CUDA
element drivers compile the rules' math.

Determinism: every sum has an order fixed by the shape and :data:`REDUCE_THREADS`
(a row: thread ``t`` of a block sums elements ``t, t + T, ...`` in order, then the
block adds the threads' sums in a fixed tree in shared memory,
:func:`fastopt.backends.cuda.kernels.tree_sum` / ``tree_sum2``), never by the grid or
the scheduling, and there are no atomics: a CUDA step gives the same bits run to
run.  The column sums and the totals of ``p^2`` and ``U^2`` over the rows take the
CPU drivers' order (blocks of ``FACTOR_ROWS`` rows, the blocks in order; rows in
order); the row sums do not (the CPU adds a row in 8 lanes, in one thread), nor the
mean of ``row_var`` (NumPy's pairwise sum on the CPU), so CUDA and CPU results
agree to rounding, not bit for bit (float64: within 1e-9 of the update in the
tests, in practice 1e-15; on a GPU the compiler's FMA contraction differs too).
"""

import math

import numpy as np

from ...rules.adafactor import (FACTOR_ROWS, alpha_of, apply, divisor_of, eps1_of,
                                factored_v, lerp, sq, update)
from .. import cuda as _pkg
from .arrays import _flat

#: threads of a reducing block (a compile-time size: the shared-memory tree); part
#: of the summation order, so results are reproducible for a given value
REDUCE_THREADS = 128
#: elements per block of the vector passes' sums
VCHUNK = 1 << 13

_KERNELS = {}
cuda = None          # numba.cuda, bound by _make (a global: the simulator replaces it)


def _make(kind, dtype, NT):
    global cuda
    from . import kernels as _k
    cuda = _k._prepare()       # numba.cuda as a global (the simulator swaps globals)
    DT = np.dtype(dtype).type
    # sa[0] (and sb[0]) = the block's NT partial sums added in a fixed halving tree
    tree_sum = _k.tree_sum(NT)
    tree_sum2 = _k.tree_sum2(NT)

    if kind == "sums":
        def sums(P, G, C, nrows, rows, prow):
            sa = cuda.shared.array(NT, np.float64)
            sb = cuda.shared.array(NT, np.float64)
            tid = cuda.threadIdx.x
            k = cuda.blockIdx.x
            while k < nrows:
                base = k * C
                a = 0.0
                b = 0.0
                j = tid
                while j < C:
                    a += sq(G[base + j])
                    y = np.float64(P[base + j])
                    b += y * y
                    j += NT
                sa[tid] = a
                sb[tid] = b
                tree_sum2(sa, sb, tid)
                if tid == 0:
                    rows[k] = sa[0]
                    prow[k] = sb[0]
                cuda.syncthreads()
                k += cuda.gridDim.x
        return cuda.jit(sums)

    if kind == "colpart":
        def colpart(G, R, C, nb, units, part):
            # unit (matrix b, block of FACTOR_ROWS rows blk, column j): the partial
            # column sum over the block's rows in order (the CPU drivers' blocks)
            q = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while q < units:
                kb = q // C
                j = q - kb * C
                b = kb // nb
                r0 = (kb - b * nb) * FACTOR_ROWS
                r1 = min(R, r0 + FACTOR_ROWS)
                a = 0.0
                for r in range(r0, r1):
                    a += sq(G[(b * R + r) * C + j])
                part[q] = a
                q += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(colpart)

    if kind == "colsum":
        def colsum(part, C, nb, ncols, out):
            # column (b, j): its blocks' partial sums added in block order
            q = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while q < ncols:
                b = q // C
                j = q - b * C
                a = 0.0
                for blk in range(nb):
                    a += part[(b * nb + blk) * C + j]
                out[q] = a
                q += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(colsum)

    if kind == "factors":
        def factors(rows, cols, rv, cv, w, omw, R, C):
            nr = rows.shape[0]
            e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while e < nr + cols.shape[0]:
                if e < nr:
                    n = DT(math.sqrt(rows[e]))
                    rv[e] = lerp(rv[e], n * n / DT(C), w, omw)
                else:
                    q = e - nr
                    n = DT(math.sqrt(cols[q]))
                    cv[q] = lerp(cv[q], n * n / DT(R), w, omw)
                e += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(factors)

    if kind == "mean":
        def mean(rv, R, B, eps1, m):
            sa = cuda.shared.array(NT, np.float64)
            tid = cuda.threadIdx.x
            b = cuda.blockIdx.x
            while b < B:
                a = 0.0
                r = tid
                while r < R:
                    a += np.float64(rv[b * R + r])
                    r += NT
                sa[tid] = a
                tree_sum(sa, tid)
                if tid == 0:
                    x = DT(sa[0] / R)
                    m[b] = eps1 if x < eps1 else x     # a NaN mean stays NaN
                cuda.syncthreads()
                b += cuda.gridDim.x
        return cuda.jit(mean)

    if kind == "usq":
        def usq(G, rv, cv, m, R, C, nrows, e2, sign, one, out):
            sa = cuda.shared.array(NT, np.float64)
            tid = cuda.threadIdx.x
            k = cuda.blockIdx.x
            while k < nrows:
                b = k // R
                r = rv[k]
                mb = m[b]
                a = 0.0
                j = tid
                while j < C:
                    u = update(G[k * C + j] * sign, factored_v(r, cv[b * C + j], mb), e2, one)
                    x = np.float64(u)
                    a += x * x
                    j += NT
                sa[tid] = a
                tree_sum(sa, tid)
                if tid == 0:
                    out[k] = sa[0]
                cuda.syncthreads()
                k += cuda.gridDim.x
        return cuda.jit(usq)

    if kind == "apply":
        def apply_k(P, G, rv, cv, m, R, C, e2, sign, one, decay, step):
            i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while i < P.shape[0]:
                k = i // C
                j = i - k * C
                b = k // R
                u = update(G[i] * sign, factored_v(rv[k], cv[b * C + j], m[b]), e2, one)
                P[i] = apply(P[i], u, decay, step)
                i += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(apply_k)

    if kind == "vsums":
        def vsums(P, G, V, w, omw, sign, chunk, part):
            sa = cuda.shared.array(NT, np.float64)
            tid = cuda.threadIdx.x
            n = P.shape[0]
            ci = cuda.blockIdx.x
            while ci < part.shape[0]:
                lo = ci * chunk
                hi = min(n, lo + chunk)
                a = 0.0
                i = lo + tid
                while i < hi:
                    g = G[i] * sign
                    V[i] = lerp(V[i], g * g, w, omw)
                    y = np.float64(P[i])
                    a += y * y
                    i += NT
                sa[tid] = a
                tree_sum(sa, tid)
                if tid == 0:
                    part[ci] = sa[0]
                cuda.syncthreads()
                ci += cuda.gridDim.x
        return cuda.jit(vsums)

    if kind == "vusq":
        def vusq(G, V, e2, sign, one, chunk, part):
            sa = cuda.shared.array(NT, np.float64)
            tid = cuda.threadIdx.x
            n = G.shape[0]
            ci = cuda.blockIdx.x
            while ci < part.shape[0]:
                lo = ci * chunk
                hi = min(n, lo + chunk)
                a = 0.0
                i = lo + tid
                while i < hi:
                    x = np.float64(update(G[i] * sign, V[i], e2, one))
                    a += x * x
                    i += NT
                sa[tid] = a
                tree_sum(sa, tid)
                if tid == 0:
                    part[ci] = sa[0]
                cuda.syncthreads()
                ci += cuda.gridDim.x
        return cuda.jit(vusq)

    if kind == "vapply":
        def vapply(P, G, V, e2, sign, one, decay, step):
            i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while i < P.shape[0]:
                P[i] = apply(P[i], update(G[i] * sign, V[i], e2, one), decay, step)
                i += cuda.gridDim.x * cuda.blockDim.x
        return cuda.jit(vapply)

    raise KeyError(kind)


#: the kernels, for the PTX check: kind -> argument kinds ("a": 1-D array of the
#: dtype, "d": 1-D float64 array, "s": scalar of the dtype, "i": int64)
SIGNATURES = {
    "sums": "aaiidd", "colpart": "aiiiid", "colsum": "diiid", "factors": "ddaassii", "mean": "aiisa",
    "usq": "aaaaiiisssd", "apply": "aaaaaiisssss", "vsums": "aaasssid",
    "vusq": "aasssid", "vapply": "aaasssss",
}


def kernel(kind, dtype):
    """The compiled kernel ``kind`` for ``dtype`` (cached per reduce-block size)."""
    NT = int(REDUCE_THREADS)
    assert NT > 0 and NT & (NT - 1) == 0, "REDUCE_THREADS must be a power of two"
    key = (kind, np.dtype(dtype).str, NT, _pkg._SIM)
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = _make(kind, dtype, NT)
    return k


def _grid(n, per_block):
    from .launch import _blocks
    return _blocks(n, per_block)


def _dev_f64(n):
    return _pkg.cuda.device_array(int(n), dtype=np.float64)


def _in_order(d):
    """The float64 sum of device array ``d``'s elements in index order (copied back;
    ``cumsum`` adds sequentially, as the CPU drivers add their rows and chunks)."""
    h = d.copy_to_host()
    return float(np.cumsum(h)[-1]) if h.size else 0.0


# ------------------------------------------------ the Backend's factored methods
def factored_sums(P, G, B, R, C):
    """``(row sums of G^2, column sums of G^2, sum of p^2)``: the first two float64
    device arrays (B * R,) and (B * C,), the last a float (the rows' sums of ``p^2``
    copied back and added in row order)."""
    dt = P.dtype
    nrows, ncols = B * R, B * C
    rows, prow, cols = _dev_f64(nrows), _dev_f64(nrows), _dev_f64(ncols)
    kernel("sums", dt)[_grid(nrows, 1), int(REDUCE_THREADS)](P, G, C, nrows, rows, prow)
    bs = _pkg.BLOCK_SIZE
    nb = -(-R // FACTOR_ROWS)
    units = B * nb * C
    part = _dev_f64(units)
    kernel("colpart", dt)[_grid(units, bs), bs](G, R, C, nb, units, part)
    kernel("colsum", dt)[_grid(ncols, bs), bs](part, C, nb, ncols, cols)
    return rows, cols, _in_order(prow)


def factored_factors(rows, cols, rv, cv, w, omw, B, R, C, eps1):
    """The host work of :func:`fastopt.factored.run_tensor` between the sums and the
    RMS pass, on the device: the lerps of ``rv`` (B * R,) and ``cv`` (B * C,) in
    place; returns ``m`` (B,), the clamped means of ``rv``, in its dtype."""
    dt = rv.dtype
    bs = _pkg.BLOCK_SIZE
    n = B * (R + C)
    kernel("factors", dt)[_grid(n, bs), bs](rows, cols, rv, cv, w, omw, R, C)
    m = _pkg.cuda.device_array(B, dtype=dt)
    kernel("mean", dt)[_grid(B, 1), int(REDUCE_THREADS)](rv, R, B, eps1, m)
    return m


def factored_usq(G, rv, cv, m, B, R, C, e2, sign, one):
    """The sum of ``U^2`` (float64): per row on the device, the rows added on the host."""
    nrows = B * R
    out = _dev_f64(nrows)
    kernel("usq", G.dtype)[_grid(nrows, 1), int(REDUCE_THREADS)](
        G, rv, cv, m, R, C, nrows, e2, sign, one, out)
    return _in_order(out)


def factored_apply(P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step):
    """``P = P decay + step U``, in place."""
    bs = _pkg.BLOCK_SIZE
    kernel("apply", P.dtype)[_grid(P.shape[0], bs), bs](
        P, G, rv, cv, m, R, C, e2, sign, one, decay, step)


def vector_sums(P, G, V, w, omw, sign):
    """``V = lerp(V, G^2, w)`` in place; returns the sum of ``p^2``."""
    nc = -(-P.shape[0] // VCHUNK)
    part = _dev_f64(nc)
    kernel("vsums", P.dtype)[_grid(nc, 1), int(REDUCE_THREADS)](
        P, G, V, w, omw, sign, VCHUNK, part)
    return _in_order(part)


def vector_usq(G, V, e2, sign, one):
    nc = -(-G.shape[0] // VCHUNK)
    part = _dev_f64(nc)
    kernel("vusq", G.dtype)[_grid(nc, 1), int(REDUCE_THREADS)](
        G, V, e2, sign, one, VCHUNK, part)
    return _in_order(part)


def vector_apply(P, G, V, e2, sign, one, decay, step):
    bs = _pkg.BLOCK_SIZE
    kernel("vapply", P.dtype)[_grid(P.shape[0], bs), bs](P, G, V, e2, sign, one, decay, step)


def run_tensor(rule, group, step, p, g, state):
    """One tensor's step on the device (:func:`fastopt.factored.run_tensor`'s flow with
    the host work between the passes on the device too): ``p``, ``g`` and the state
    arrays are C-contiguous device arrays of one dtype."""
    sc, _ = rule.host_scalars(group, step, {}, ())
    P, G = _flat(p), _flat(g)
    dt = np.dtype(P.dtype).type
    eps1 = eps1_of(group, P.dtype)
    e2 = dt(eps1 * eps1)
    sign = dt(-1) if sc["maximize"] else dt(1)
    one = dt(1)
    w = dt(sc["beta2_weight"])
    omw = one - w
    n = P.shape[0]
    shape = tuple(p.shape)
    if len(shape) >= 2:
        R, C = shape[-2:]
        B = n // (R * C)
        rv, cv = _flat(state["row_var"]), _flat(state["col_var"])
        rows, cols, psq = factored_sums(P, G, B, R, C)
        alpha = alpha_of(sc["rho"], sc["eps2"], psq, n)
        m = factored_factors(rows, cols, rv, cv, w, omw, B, R, C, dt(eps1))
        usq = factored_usq(G, rv, cv, m, B, R, C, e2, sign, one)
        s = dt(-alpha / divisor_of(usq, n, sc["d"]))
        factored_apply(P, G, rv, cv, m, B, R, C, e2, sign, one, dt(sc["decay"]), s)
    else:
        V = _flat(state["variance"])
        psq = vector_sums(P, G, V, w, omw, sign)
        alpha = alpha_of(sc["rho"], sc["eps2"], psq, n)
        usq = vector_usq(G, V, e2, sign, one)
        s = dt(-alpha / divisor_of(usq, n, sc["d"]))
        vector_apply(P, G, V, e2, sign, one, dt(sc["decay"]), s)
