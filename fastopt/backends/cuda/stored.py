"""The stored-format CUDA kernels: bfloat16 parameters, 16- and 8-bit state.

Kernels for parameters or state not kept in the compute dtype
(:mod:`fastopt.storage`): bfloat16 state (uint16 bits on the device), 8-bit
block-quantized state (uint8 codes and float32 block scales), float32 state of
float64 parameters, bfloat16 parameters (every ``bf16_update`` mode).  They are the
Numba CPU stored drivers (:func:`fastopt.backends.numba_cpu.make_stored_dense_driver`
and friends) with their loops split over threads: the same jitable load/store
functions of :mod:`fastopt.storage.io` and codecs of :mod:`fastopt.storage.codecs`
around the same element step, so the results equal the CPU backend's (bit for bit
in the simulator, ``tests/test_cuda_storage.py``; on a GPU to FMA contraction, see
:mod:`fastopt.backends.cuda.kernels`: an 8-bit code may then differ by one step at
a rounding tie).  They are the twins of the plain kernels of
:mod:`fastopt.backends.cuda.kernels` (why both are kept: docs/cuda.md).

* ``stored_dense`` (:func:`make_stored_dense_kernel`): the plain dense kernel's
  pointer table and chunk table plus the planner's format table ``fmt`` (uploaded
  once per bucket), and per step the gradient addresses, the stochastic-rounding
  stream keys and the scalar rows (one copy).  Without 8-bit state one thread per
  element (chunks of ``CHUNK`` elements).  With 8-bit state one thread block of
  :data:`Q8_THREADS` (= :data:`fastopt.storage.Q8_BLOCK`) threads per 8-bit block
  (chunks of ``CHUNK // Q8_BLOCK`` blocks, stepped in turn by the chunk's thread
  block; see *8-bit blocks* below).
* ``stored_rows`` (:func:`make_stored_rows_kernel`): row steps of element-wise rules
  (lazy and exact, catch-up-only flushes); a thread per element, with 8-bit state a
  thread block per 8-bit block of a touched row, or with ``max_norm`` a thread per
  whole row (stepped into a compute-dtype row buffer, renormalized, then stored;
  8-bit blocks encoded by that thread from a local buffer).
* ``stored_rowwise`` (:func:`make_stored_rowwise_kernel`): row-wise rules with
  bfloat16 parameters or float32 per-row state of float64 parameters, one thread
  per touched row.

8-bit blocks (:func:`q8_block_store`): thread ``i`` of the block's thread block
steps element ``i`` of the block (consecutive threads, consecutive elements: the
loads and stores coalesce; threads past a partial last block of a row step
nothing) and keeps its new state values in registers.  The block's scale, the
largest finite magnitude of its new values (:func:`fastopt.storage.codecs.magnitude`:
Inf and NaN count 0), is a max over the threads in a shared-memory halving tree
(:func:`fastopt.backends.cuda.kernels.tree_max3`, the used slots at once); a max is
exact in any order, so the scale is the CPU driver's.  Thread 0 writes it, and each
thread encodes its own element with it.  The kernels decode and encode with the
codecs that handle the special codes (NaN 128 / 255, Inf 127 / 129 / 254) on every
block; the CPU driver takes the finite-only twins for blocks without one (a
vectorization matter, :func:`fastopt.backends.numba_cpu._q8_slot`), which equal
them bit for bit on finite values and normal codes, so the codes and scales are the
same.  Only ``max_norm`` rows keep a thread per row (the renorm needs the whole row
in one thread) and encode their blocks from a local buffer (:func:`_q8_encoder`).
"""

import numpy as np

from ..._jit import register_jitable
from ...rules import NSLOTS
from ...rules.fused import RENORM_EPS, post, pre, renorm_row
from ...storage import Q8_BLOCK
from ...storage.codecs import magnitude, scale_inverse
from ..element import apply_catch_up, element_step, scalar_loader
from . import kernels as _kernels
from .kernels import TAB_ROW, _view_fn, tree_max3

cuda = None          # numba.cuda, bound by _prepare()

#: threads of an 8-bit launch: one thread block per 8-bit block, a thread per element
#: (a compile-time size: the shared-memory tree of the block scale)
Q8_THREADS = Q8_BLOCK


def _prepare():
    """Bind numba.cuda to this module's ``cuda`` (see
    :func:`fastopt.backends.cuda.kernels._prepare`)."""
    global cuda
    cuda = _kernels._prepare()


@register_jitable
def q8_span(kb, nb, D):
    """``(lo, m)``: the first flat element and the length of 8-bit block ``kb`` of a
    tensor of rows of ``D`` elements, ``nb`` blocks a row (block ``kb``: row ``kb //
    nb``, elements ``(kb % nb) * Q8_BLOCK`` on of that row; the last block of a row
    holds ``D % Q8_BLOCK`` elements when that is not 0)."""
    r = kb // nb
    j0 = (kb - r * nb) * Q8_BLOCK
    return r * D + j0, min(Q8_BLOCK, D - j0)


def _q8_encoder(encode):
    """``finish(S, b, scales, kb, lo, m, a)``: write block ``kb``'s scale ``a`` and
    encode its new values ``b[:m]`` into ``S[lo:lo + m]`` (one thread, a local
    buffer: the ``max_norm`` rows)."""
    @register_jitable
    def finish(S, b, scales, kb, lo, m, a):
        scales[kb] = a
        inv = scale_inverse(a)
        for i in range(m):
            S[lo + i] = encode(b[i], inv)
    return finish


def q8_block_store(encoders, uses):
    """``store(S0, S1, S2, C0, C1, C2, sm, tid, kb, e, live, s0, s1, s2)``, called by
    every thread of an 8-bit block's thread block (see the module docstring):
    thread ``tid`` holds the new values ``s0..s2`` of element ``e`` (``live``; a
    thread past the block's end holds zeros); the block's scales are the largest
    magnitudes (:func:`~fastopt.backends.cuda.kernels.tree_max3` over the shared
    float32 array ``sm`` (3, :data:`Q8_THREADS`)), thread 0 writes them to
    ``Ck[kb]``, every live thread encodes its element.  ``encoders``: the slots'
    8-bit encoders (``None`` where unused), ``uses``: the slots stored."""
    U0, U1, U2 = (bool(u) for u in uses)
    E0, E1, E2 = encoders
    TREE = tree_max3(Q8_THREADS, U0, U1, U2)

    @register_jitable
    def store(S0, S1, S2, C0, C1, C2, sm, tid, kb, e, live, s0, s1, s2):
        a0, a1, a2 = TREE(sm, tid, magnitude(s0), magnitude(s1), magnitude(s2))
        if live:
            if U0:
                S0[e] = E0(s0, scale_inverse(a0))
            if U1:
                S1[e] = E1(s1, scale_inverse(a1))
            if U2:
                S2[e] = E2(s2, scale_inverse(a2))
        if tid == 0:
            if U0:
                C0[kb] = a0
            if U1:
                C1[kb] = a1
            if U2:
                C2[kb] = a2
    return store


def _stored_pieces(config):
    """The format's jitable pieces (:mod:`fastopt.storage.io`): compute dtype, param
    load/store on flat arrays, gradient loader, per-slot state (load, store, encode),
    element dtypes of the arrays, 8-bit flag."""
    from ...storage import io
    st = config.storage
    CT = np.dtype(config.compute_dtype).type
    LP = io.param_io(st, CT)[0]
    # SP(P, A, e, x, old, key, base + e): element e stored, its random bits drawn at
    # base + e (the element base of a row range of a larger tensor)
    SP = io.param_store_at(st, CT)
    LG = io.grad_loader(config.grad, CT)
    S = [io.state_io(st, k, CT) for k in range(NSLOTS)]
    PDT, GDT, SDT, ADT = io.dtypes(st, config.grad, CT)
    return dict(CT=CT, LP=LP, SP=SP, LG=LG, S=S, PDT=PDT, GDT=GDT, SDT=SDT, ADT=ADT,
                Q8=st.state == "q8")


def tensor_views(k):
    """The set-up of tensor ``t`` of a stored dense launch, shared by the update
    kernel and the norm pass (:mod:`fastopt.backends.cuda.stored_passes`), from the
    pieces ``k`` (:func:`_stored_pieces`): ``tensor(tab, grads, fmt, t)`` = the views
    ``(P, G, S0, S1, S2, A)`` of the parameter, gradient, slots and aux array, and
    ``scales(fmt, t)`` = the 8-bit block scales ``(C0, C1, C2)``, float32."""
    from ..base import FMT_AUX, FMT_N, FMT_NSCALE, FMT_SCALE
    VP, VG, VS, VA = (_view_fn(k[n]) for n in ("PDT", "GDT", "SDT", "ADT"))
    VF = _view_fn(np.float32)
    FA, FN, FS, FC = FMT_AUX, FMT_N, FMT_SCALE, FMT_NSCALE

    @register_jitable
    def tensor(tab, grads, fmt, t):
        n = fmt[t, FN]
        return (VP(tab[t, 0], n), VG(grads[t], n), VS(tab[t, 1], n), VS(tab[t, 2], n),
                VS(tab[t, 3], n), VA(fmt[t, FA], n))

    @register_jitable
    def scales(fmt, t):
        nsc = fmt[t, FC]
        return VF(fmt[t, FS], nsc), VF(fmt[t, FS + 1], nsc), VF(fmt[t, FS + 2], nsc)
    return tensor, scales


def make_stored_dense_kernel(config):
    """The multi-tensor kernel of a stored format.

    ``kernel[blocks, threads](tab, grads, keys, fmt, chunks, hyper)``: ``tab``,
    ``grads`` and ``hyper`` as the plain dense kernel's
    (:func:`fastopt.backends.cuda.kernels.make_dense_kernel`), ``keys`` int64 (T,) the
    stochastic-rounding stream keys of the step, ``fmt`` int64 (T, FMT_COLS) the
    planner's format table (:data:`fastopt.backends.base.FMT_AUX` ...; its key column
    is not read: ``keys`` has this step's), ``chunks`` int64 (C, 3) rows ``(tensor, lo,
    hi)``.  Without 8-bit state ``lo:hi`` are elements, one thread per element
    (``threads`` = ``BLOCK_SIZE``, any).  With 8-bit state they are 8-bit blocks
    (:func:`q8_span`), stepped one after the other by the chunk's thread block of
    ``threads`` = :data:`Q8_THREADS`, a thread per element of the block
    (:func:`q8_block_store`)."""
    _prepare()
    from ..base import FMT_BASE, FMT_NB, FMT_ROW
    assert not config.switches[5], "max_norm runs through the rows kernels"
    k = _stored_pieces(config)
    CT, LP, SP, LG, Q8 = k["CT"], k["LP"], k["SP"], k["LG"], k["Q8"]
    (L0, W0, E0), (L1, W1, E1), (L2, W2, E2) = k["S"]
    TENSOR, SCALES = tensor_views(k)
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = (bool(u) for u in config.uses)
    STORE = q8_block_store((E0, E1, E2), config.uses) if Q8 else None
    F32 = np.float32
    NSH = Q8_THREADS if Q8 else 1
    FR, FB, FE = FMT_ROW, FMT_NB, FMT_BASE
    ROW = TAB_ROW

    @register_jitable
    def element(P, A, G, S0, S1, S2, e, c0, c1, c2, c, key, base):
        """Step element ``e`` (the parameter stored); returns its new state values."""
        zero = CT(0)
        old = LP(P, A, e)
        s0 = L0(S0, e, c0) if U0 else zero
        s1 = L1(S1, e, c1) if U1 else zero
        s2 = L2(S2, e, c2) if U2 else zero
        p, s0, s1, s2 = STEP(old, LG(G, e), s0, s1, s2, c, zero)
        SP(P, A, e, p, old, key, base + e)
        return s0, s1, s2

    def stored_dense_kernel(tab, grads, keys, fmt, chunks, hyper):
        zero = CT(0)
        sm = cuda.shared.array((3, NSH), F32)
        tid = cuda.threadIdx.x
        ci = cuda.blockIdx.x
        while ci < chunks.shape[0]:
            t = chunks[ci, 0]
            hi = chunks[ci, 2]
            key = np.uint32(keys[t])
            base = fmt[t, FE]
            c = LOAD(hyper, tab[t, ROW])
            P, G, S0, S1, S2, A = TENSOR(tab, grads, fmt, t)
            if Q8:
                D = fmt[t, FR]
                nb = fmt[t, FB]
                C0, C1, C2 = SCALES(fmt, t)
                kb = chunks[ci, 1]
                while kb < hi:            # the same for every thread of the block
                    lo, m = q8_span(kb, nb, D)
                    e = lo + tid
                    live = tid < m
                    s0 = s1 = s2 = zero
                    if live:
                        s0, s1, s2 = element(P, A, G, S0, S1, S2, e,
                                             C0[kb] if U0 else F32(0),
                                             C1[kb] if U1 else F32(0),
                                             C2[kb] if U2 else F32(0), c, key, base)
                    STORE(S0, S1, S2, C0, C1, C2, sm, tid, kb, e, live, s0, s1, s2)
                    kb += 1
            else:
                e = chunks[ci, 1] + tid
                while e < hi:
                    s0, s1, s2 = element(P, A, G, S0, S1, S2, e, F32(0), F32(0), F32(0), c,
                                         key, base)
                    if U0:
                        W0(S0, e, s0)
                    if U1:
                        W1(S1, e, s1)
                    if U2:
                        W2(S2, e, s2)
                    e += cuda.blockDim.x
            ci += cuda.gridDim.x

    return cuda.jit(stored_dense_kernel)


def make_stored_rows_kernel(config, catch, step):
    """The row kernel of a stored format (element-wise rules).

    ``kernel[blocks, threads](P, A, S0, S1, S2, C0, C1, C2, vals, order, seg, uniq,
    coef, hyper, prows, nuniq, D, key, base, ident)``: parameter, aux, state and scale
    arrays flat; ``vals`` (nnz, D) gradient rows in the compute dtype; ``prows``
    (nuniq, D) compute-dtype row buffers (``max_norm`` only).  Work units, grid-stride:

    * ``max_norm``: a touched row, a thread each (every block of it, then the renorm
      on its row buffer, then the parameter stores: the CPU driver's order);
    * 8-bit state: one block of ``Q8_BLOCK`` elements of a touched row, a thread
      block of ``threads`` = :data:`Q8_THREADS` each (:func:`q8_block_store`);
    * otherwise: one element, a thread each.

    Each element is caught up (``catch``) and stepped (``step``) with its column of the
    row's duplicate gradient rows summed in order of appearance, as the CPU driver
    does.  Catch-up alone (exact mode's flush) touches the parameter and slot 0."""
    _prepare()
    k = _stored_pieces(config)
    CT, LP, SP, Q8 = k["CT"], k["LP"], k["SP"], k["Q8"]
    (L0, W0, E0), (L1, W1, E1), (L2, W2, E2) = k["S"]
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = (bool(u) for u in config.uses)
    MX = bool(config.switches[5])
    CATCH, STEPPING = bool(catch), bool(step)
    V1, V2 = U1 and STEPPING, U2 and STEPPING

    @register_jitable
    def element(P, A, S0, S1, S2, vals, order, ident, u, a, b, j, e, c0, c1, c2, cat, c):
        """Element ``e`` (column ``j`` of unique row ``u``, its gradient rows
        ``order[a:b]``) caught up and stepped: ``(old p, new p, s0, s1, s2)``."""
        zero = CT(0)
        old = LP(P, A, e)
        p = old
        s0 = L0(S0, e, c0) if U0 else zero
        s1 = L1(S1, e, c1) if V1 else zero
        s2 = L2(S2, e, c2) if V2 else zero
        # a row whose catch-up map is the identity (up to date) is not caught up:
        # p + 0 would turn -0 into +0 (the CPU drivers' rule)
        if CATCH and not (cat[0] == 1.0 and cat[1] == 0.0 and cat[2] == 0.0
                          and cat[3] == 1.0):
            p, s0 = apply_catch_up(p, s0, cat[0], cat[1], cat[2], cat[3], CT)
        if STEPPING:
            if ident:
                g = vals[u, j]
            else:
                g = vals[order[a], j]
                for q in range(a + 1, b):
                    g += vals[order[q], j]
            p, s0, s1, s2 = STEP(p, g, s0, s1, s2, c, zero)
        return old, p, s0, s1, s2

    if Q8 and not MX:
        return _q8_rows_kernel(k, element, (E0, E1, E2), (U0, V1, V2), LOAD, CATCH, STEPPING)
    return _rows_kernel(k, element, (W0, W1, W2), (E0, E1, E2), (U0, V1, V2), LOAD,
                        CATCH, STEPPING, MX)


def _row_setup(CATCH, STEPPING):
    """``(r, (ca, cb, cc, ce), a, b) = setup(u, uniq, coef, seg, ident)``: unique row
    ``u``'s row, catch-up map (identity without ``catch``) and gradient rows
    ``order[a:b]`` (none where not read)."""
    @register_jitable
    def setup(u, uniq, coef, seg, ident):
        r = u if ident else uniq[u]
        cat = (1.0, 0.0, 0.0, 1.0)
        if CATCH:
            cat = (coef[u, 0], coef[u, 1], coef[u, 2], coef[u, 3])
        a = 0
        b = 0
        if STEPPING and not ident:
            a = seg[u]
            b = seg[u + 1]
        return r, cat, a, b
    return setup


def _q8_rows_kernel(k, element, encoders, uses, LOAD, CATCH, STEPPING):
    """The stored rows kernel with 8-bit state (no ``max_norm``): work unit ``w``, a
    thread block each (grid-stride), is block ``jb = w % nb`` of unique row ``w //
    nb``; thread ``tid`` steps its column ``jb * Q8_BLOCK + tid``."""
    SP = k["SP"]
    U0, V1, V2 = uses
    STORE = q8_block_store(encoders, uses)
    SETUP = _row_setup(CATCH, STEPPING)
    QB = Q8_BLOCK
    F32 = np.float32
    CT = k["CT"]

    def stored_rows_kernel(P, A, S0, S1, S2, C0, C1, C2, vals, order, seg, uniq, coef,
                           hyper, prows, nuniq, D, key, base, ident):
        zero = CT(0)
        c = LOAD(hyper, 0)
        ukey = np.uint32(key)
        sm = cuda.shared.array((3, QB), F32)
        tid = cuda.threadIdx.x
        nb = (D + QB - 1) // QB
        w = cuda.blockIdx.x
        while w < nuniq * nb:              # the same for every thread of the block
            u = w // nb
            jb = w - u * nb
            r, cat, a, b = SETUP(u, uniq, coef, seg, ident)
            kb = r * nb + jb
            j = jb * QB + tid
            e = r * D + j
            live = j < D
            s0 = s1 = s2 = zero
            if live:
                old, p, s0, s1, s2 = element(P, A, S0, S1, S2, vals, order, ident, u, a, b,
                                             j, e, C0[kb] if U0 else F32(0),
                                             C1[kb] if V1 else F32(0),
                                             C2[kb] if V2 else F32(0), cat, c)
                SP(P, A, e, p, old, ukey, base + e)
            STORE(S0, S1, S2, C0, C1, C2, sm, tid, kb, e, live, s0, s1, s2)
            w += cuda.gridDim.x

    return cuda.jit(stored_rows_kernel)


def _rows_kernel(k, element, writers, encoders, uses, LOAD, CATCH, STEPPING, MX):
    """The stored rows kernel without 8-bit state (a thread per element) or with
    ``max_norm`` (a thread per row; 8-bit blocks encoded from local buffers)."""
    CT, LP, SP, Q8 = k["CT"], k["LP"], k["SP"], k["Q8"]
    W0, W1, W2 = writers
    F0, F1, F2 = (_q8_encoder(e) if e is not None else None for e in encoders)
    U0, V1, V2 = uses
    SETUP = _row_setup(CATCH, STEPPING)
    EPS = CT(RENORM_EPS)
    F32 = np.float32
    QB = Q8_BLOCK
    NBUF = QB if Q8 else 1

    def stored_rows_kernel(P, A, S0, S1, S2, C0, C1, C2, vals, order, seg, uniq, coef,
                           hyper, prows, nuniq, D, key, base, ident):
        zero = CT(0)
        c = LOAD(hyper, 0)
        ukey = np.uint32(key)
        b0 = cuda.local.array(NBUF, CT)
        b1 = cuda.local.array(NBUF, CT)
        b2 = cuda.local.array(NBUF, CT)
        if Q8:
            BLK = QB
        elif MX:
            BLK = D
        else:
            BLK = 1
        nb = (D + BLK - 1) // BLK
        NU = 1 if MX else nb
        w = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while w < nuniq * NU:
            u = w // NU
            r, cat, a, b = SETUP(u, uniq, coef, seg, ident)
            if MX:
                jb_lo = 0
                jb_hi = nb
            else:
                jb_lo = w - u * NU
                jb_hi = jb_lo + 1
            for jb in range(jb_lo, jb_hi):
                j0 = jb * BLK
                m = min(BLK, D - j0)
                kb = r * nb + jb
                c0 = C0[kb] if Q8 and U0 else F32(0)
                c1 = C1[kb] if Q8 and V1 else F32(0)
                c2 = C2[kb] if Q8 and V2 else F32(0)
                a0 = F32(0)
                a1 = F32(0)
                a2 = F32(0)
                for i in range(m):
                    j = j0 + i
                    e = r * D + j
                    old, p, s0, s1, s2 = element(P, A, S0, S1, S2, vals, order, ident, u, a,
                                                 b, j, e, c0, c1, c2, cat, c)
                    if MX:
                        prows[u, j] = p
                    else:
                        SP(P, A, e, p, old, ukey, base + e)
                    if Q8:
                        if U0:
                            b0[i] = s0
                            a0 = max(a0, magnitude(s0))
                        if V1:
                            b1[i] = s1
                            a1 = max(a1, magnitude(s1))
                        if V2:
                            b2[i] = s2
                            a2 = max(a2, magnitude(s2))
                    else:
                        if U0:
                            W0(S0, e, s0)
                        if V1:
                            W1(S1, e, s1)
                        if V2:
                            W2(S2, e, s2)
                if Q8:
                    lo = r * D + j0
                    if U0:
                        F0(S0, b0, C0, kb, lo, m, a0)
                    if V1:
                        F1(S1, b1, C1, kb, lo, m, a1)
                    if V2:
                        F2(S2, b2, C2, kb, lo, m, a2)
            if MX:
                prow = prows[u]
                renorm_row(prow, c, zero, EPS)
                for j in range(D):
                    e = r * D + j
                    SP(P, A, e, prow[j], LP(P, A, e), ukey, base + e)
            w += stride

    return cuda.jit(stored_rows_kernel)


def make_stored_rowwise_kernel(config):
    """Row-wise rules whose parameter or per-row state is stored in another format
    (float64 parameters with float32 state): ``kernel[blocks, BLOCK_SIZE](P, A, S0,
    vals, order, seg, uniq, hyper, prows, grows, nuniq, D, key, base, ident)``, one thread
    per touched row: the row loaded into ``prows[u]``, its summed and pre-processed
    gradient into ``grows[u]``, the rule's row math, the parameter-side options,
    ``max_norm``, the stores (the CPU stored row-wise driver)."""
    _prepare()
    k = _stored_pieces(config)
    CT, LP, SP = k["CT"], k["LP"], k["SP"]
    MATH = config.rule.math
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    SC, CL, L1, LO, HI, MX = (bool(s) for s in config.switches)
    POST = L1 or LO or HI
    EPS = CT(RENORM_EPS)

    def stored_rowwise_kernel(P, A, S0, vals, order, seg, uniq, hyper, prows, grows, nuniq,
                              D, key, base, ident):
        zero = CT(0)
        c = LOAD(hyper, 0)
        inv_d = CT(1) / CT(D)
        ukey = np.uint32(key)
        u = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while u < nuniq:
            prow = prows[u]
            grow = grows[u]
            if ident:
                r = u
                a = 0
                b = 0
            else:
                r = uniq[u]
                a = seg[u]
                b = seg[u + 1]
            for j in range(D):
                prow[j] = LP(P, A, r * D + j)
                if ident:
                    g = vals[u, j]
                else:
                    g = vals[order[a], j]
                    for q in range(a + 1, b):
                        g += vals[order[q], j]
                grow[j] = pre(g, c, SC, CL)
            S0[r] = MATH(prow, grow, S0[r], inv_d, zero, c)
            if POST:
                for j in range(D):
                    prow[j] = post(prow[j], c, zero, L1, LO, HI)
            if MX:
                renorm_row(prow, c, zero, EPS)
            for j in range(D):
                e = r * D + j
                SP(P, A, e, prow[j], LP(P, A, e), ukey, base + e)
            u += stride

    return cuda.jit(stored_rowwise_kernel)

