"""The norm pass of per-tensor rules (``Rule.layout == "tensor"``: LAMB, LARS) on the
Numba CPU backend.

:func:`make_norms_driver` loops over a dense bucket's chunks like the update driver
(one parallel region, ``prange`` over chunks) and, per element, applies the fused
pre-processing of the gradient (``grad_scale``, ``clip_value``) and the rule's
``norms`` function, which returns the two quantities whose L2 norms the rule needs
(computed from the same inputs, in the same dtype, as its update).  Their squares
are summed in float64 in :data:`LANES` fixed lanes per chunk (element ``i`` of a
chunk goes to lane ``i % LANES``; each lane in element order), the lanes added in a
fixed tree at the chunk's end (:func:`lane_total`); the chunk sums are then added
per tensor in chunk order, serially: the result is the same whatever the number of
threads, and the Cython copy (kernels/_cy_norms.pxi) gives the same bits.  Nothing
is written but the (tensors, 2) float64 result.

Why lanes: one sequential float64 sum per chunk is a chain the compiler may not
reassociate, so the rule's per-element math (LAMB's division and square root) ran
one element at a time; eight independent lanes, written out, let LLVM's SLP
vectorizer run eight elements per instruction (measured in docs/benchmarks.md,
"Per-tensor rules").
"""

import numpy as np

from numba import carray, prange
from numba.extending import register_jitable

from ..rules.fused import pre
from .base import norm_uses
from .element import scalar_loader
from .numba_cpu import _compile, _stamp, _voidptr, block_at, stored_tensor

_NORMS = {}

#: the fixed lanes of a chunk's sums (kernels/_cy_norms.pxi has the same)
LANES = 8
#: elements whose squares are computed (vectorized) before they are added to the lanes
BUF = 512


@register_jitable
def lane_total(l0, l1, l2, l3, l4, l5, l6, l7):
    """The chunk's sum from its eight lanes, in a fixed tree."""
    return ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))


def make_norms_driver(config, parallel):
    """The norm-pass driver of one configuration (a closure over the rule's
    ``norms``, the dtype, the used slots and the gradient switches)."""
    NORMS = config.rule.norms
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    ITEM = np.dtype(config.dtype).itemsize
    U0, U1, U2 = (bool(u) for u in config.uses)
    SC, CL = bool(config.switches[0]), bool(config.switches[1])
    STAMP = _stamp(NORMS)
    PARALLEL = bool(parallel)

    @register_jitable
    def SQ(P, G, S0, S1, S2, i, c):
        """The squares (float64) of element ``i``'s two norm quantities."""
        zero = DT(0)
        s0 = S0[i] if U0 else zero
        s1 = S1[i] if U1 else zero
        s2 = S2[i] if U2 else zero
        x, y = NORMS(P[i], pre(G[i], c, SC, CL), s0, s1, s2, c)
        fx = np.float64(x)
        fy = np.float64(y)
        return fx * fx, fy * fy

    def norms_driver(ptrs, chunks, hyper, hidx, out):
        stamp = STAMP  # noqa: F841  (the rule's source hash, in the cache key)
        par = PARALLEL  # noqa: F841
        nc = chunks.shape[0]
        part = np.zeros((nc, 2), dtype=np.float64)
        for ci in prange(nc):
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
            ax = np.zeros(LANES, dtype=np.float64)
            ay = np.zeros(LANES, dtype=np.float64)
            tx = np.empty(BUF, dtype=np.float64)
            ty = np.empty(BUF, dtype=np.float64)
            for k in range(0, n, BUF):
                m = min(BUF, n - k)
                Pk = P[k:k + m]
                Gk = G[k:k + m]
                S0k = S0[k:k + m]
                S1k = S1[k:k + m]
                S2k = S2[k:k + m]
                for j in range(m):        # the rule's math, vectorized: squares stored
                    x, y = SQ(Pk, Gk, S0k, S1k, S2k, j, c)
                    tx[j] = x
                    ty[j] = y
                top = (m + LANES - 1) // LANES * LANES
                for j in range(m, top):   # a partial last block: +0.0 changes no lane
                    tx[j] = 0.0           # (its terms are squares: >= +0.0 or NaN)
                    ty[j] = 0.0
                for j in range(0, top, LANES):   # each lane in element order
                    for q in range(LANES):
                        ax[q] += tx[j + q]
                        ay[q] += ty[j + q]
            a = lane_total(ax[0], ax[1], ax[2], ax[3], ax[4], ax[5], ax[6], ax[7])
            b = lane_total(ay[0], ay[1], ay[2], ay[3], ay[4], ay[5], ay[6], ay[7])
            part[ci, 0] = a
            part[ci, 1] = b
        out[:, :] = 0.0
        for ci in range(nc):
            t = chunks[ci, 0]
            out[t, 0] += part[ci, 0]
            out[t, 1] += part[ci, 1]

    return _compile(norms_driver, parallel)


def make_stored_norms_driver(config, parallel):
    """The norm pass of a stored format (bfloat16 parameters, float32/bfloat16/8-bit
    state, bfloat16/float32 gradients): over the bucket's block chunks
    (``work.chunks``, ``work.fmt``: the update pass's own tables), each element is
    loaded with the format's load functions (:mod:`fastopt.storage.io`: the
    parameter as the update pass loads it, ``split``'s float32 master included; an
    8-bit slot decoded with its block's scale), so the norms are those of the values
    the update pass will compute with.  The squares of a block go to the
    :data:`LANES` lanes by their index in the block (``j % LANES``), each lane in
    element order, blocks in order; the lanes added by :func:`lane_total` per chunk,
    the chunks per tensor in order (kernels/_cy_norms.pxi gives the same bits)."""
    from ..storage import io
    from .numba_cpu import _stored_pieces
    k = _stored_pieces(config)
    CT, Q8, BLK = k["CT"], k["Q8"], k["BLK"]
    PDT, GDT, SDT, ADT = k["PDT"], k["GDT"], k["SDT"], k["ADT"]
    LP, LG = k["LP"], k["LG"]
    st = config.storage
    if Q8:
        L0, L1, L2 = (io.q8_pieces(st, s, CT)[0] for s in range(3))
    else:
        L0, L1, L2 = (io.state_io(st, s, CT)[0] for s in range(3))
    NORMS = config.rule.norms
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = norm_uses(config)
    SC, CL = bool(config.switches[0]), bool(config.switches[1])
    STAMP = _stamp(NORMS, stored_tensor, block_at)
    PARALLEL = bool(parallel)
    F32 = np.float32
    HAS_AUX = st.aux is not None

    @register_jitable
    def SQ(Pb, Ab, Gb, T0, T1, T2, c0, c1, c2, i, c):
        zero = CT(0)
        s0 = L0(T0, i, c0) if U0 else zero
        s1 = L1(T1, i, c1) if U1 else zero
        s2 = L2(T2, i, c2) if U2 else zero
        x, y = NORMS(LP(Pb, Ab, i), pre(LG(Gb, i), c, SC, CL), s0, s1, s2, c)
        fx = np.float64(x)
        fy = np.float64(y)
        return fx * fx, fy * fy

    def stored_norms_driver(ptrs, fmt, chunks, hyper, hidx, out):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        nc = chunks.shape[0]
        part = np.zeros((nc, 2), dtype=np.float64)
        for ci in prange(nc):
            t = chunks[ci, 0]
            n, D, nb, P, G, S0, S1, S2, A, C0, C1, C2 = stored_tensor(ptrs, fmt, t, PDT, GDT,
                                                                     SDT, ADT)
            c = LOAD(hyper, hidx[t])
            ax = np.zeros(LANES, dtype=np.float64)
            ay = np.zeros(LANES, dtype=np.float64)
            tx = np.empty(BUF, dtype=np.float64)
            ty = np.empty(BUF, dtype=np.float64)
            for kb in range(chunks[ci, 1], chunks[ci, 2]):
                r, j0, lo, mb = block_at(kb, nb, D, BLK)
                c0 = C0[kb] if Q8 and U0 else F32(0)
                c1 = C1[kb] if Q8 and U1 else F32(0)
                c2 = C2[kb] if Q8 and U2 else F32(0)
                for q in range(0, mb, BUF):       # BUF % LANES == 0: lane j % LANES
                    m = min(BUF, mb - q)
                    e = lo + q
                    Pb, Gb = P[e:e + m], G[e:e + m]
                    Ab = A[e:e + m] if HAS_AUX else A
                    T0, T1, T2 = S0[e:e + m], S1[e:e + m], S2[e:e + m]
                    for j in range(m):
                        x, y = SQ(Pb, Ab, Gb, T0, T1, T2, c0, c1, c2, j, c)
                        tx[j] = x
                        ty[j] = y
                    top = (m + LANES - 1) // LANES * LANES
                    for j in range(m, top):
                        tx[j] = 0.0
                        ty[j] = 0.0
                    for j in range(0, top, LANES):
                        for w in range(LANES):
                            ax[w] += tx[j + w]
                            ay[w] += ty[j + w]
            part[ci, 0] = lane_total(ax[0], ax[1], ax[2], ax[3], ax[4], ax[5], ax[6], ax[7])
            part[ci, 1] = lane_total(ay[0], ay[1], ay[2], ay[3], ay[4], ay[5], ay[6], ay[7])
        out[:, :] = 0.0
        for ci in range(nc):
            t = chunks[ci, 0]
            out[t, 0] += part[ci, 0]
            out[t, 1] += part[ci, 1]

    return _compile(stored_norms_driver, parallel)


def run_norms(work, chunks, parallel):
    """The per-tensor sums of squares of a :class:`~fastopt.backends.base.DenseWork`:
    float32/float64 over its element chunk table ``chunks``
    (``Backend.element_chunks``); a stored format over its block chunks
    (``work.chunks`` and ``work.fmt``, :func:`make_stored_norms_driver`)."""
    out = np.zeros((len(work.params), 2), dtype=np.float64)
    if work.nelem:
        stored = not work.config.storage.native
        key = (work.config, bool(parallel), stored)
        d = _NORMS.get(key)
        if d is None:
            d = _NORMS[key] = (make_stored_norms_driver if stored else make_norms_driver)(
                work.config, parallel)
        if stored:
            d(work.ptrs, work.fmt, work.chunks, work.hyper, work.hidx, out)
        else:
            d(work.ptrs, chunks, work.hyper, work.hidx, out)
    return out
