"""The stored-format CUDA kernels: bfloat16 parameters, 16- and 8-bit state.

Kernels for parameters or state not kept in the compute dtype
(:mod:`fastopt.storage`): bfloat16 state (uint16 bits on the device), 8-bit
block-quantized state (uint8 codes and float32 block scales), float32 state of
float64 parameters, bfloat16 parameters (every ``bf16_update`` mode).  They are the
Numba CPU stored drivers (:func:`fastopt.backends.numba_cpu.make_stored_dense_driver`
and friends) with their loops split over threads: the same jitable load/store
functions of :mod:`fastopt.storage.io` and codecs of :mod:`fastopt.storage.codecs`
around the same element step, in the same order, so the results equal the CPU
backend's (bit for bit in the simulator, ``tests/test_cuda_storage.py``; on a GPU to
FMA contraction, see :mod:`fastopt.backends.cuda.kernels`: an 8-bit code may then
differ by one step at a rounding tie).  They are the twins of the plain kernels of
:mod:`fastopt.backends.cuda.kernels` (why both are kept: docs/cuda.md).

* ``stored_dense`` (:func:`make_stored_dense_kernel`): the plain dense kernel's
  pointer table and chunk table plus the planner's format table ``fmt`` (uploaded
  once per bucket), and per step the gradient addresses, the stochastic-rounding
  stream keys and the scalar rows (one copy).  Without 8-bit state one thread per
  element (chunks of ``CHUNK`` elements); with 8-bit state one thread per 8-bit
  block of :data:`fastopt.storage.Q8_BLOCK` elements (chunks of ``BLOCK_SIZE``
  blocks): it steps the block's elements, keeps the new state values in a local
  buffer and their largest finite magnitude, writes that as the block's scale and
  encodes the buffer.  No atomics, no reduction across threads.
* ``stored_rows`` (:func:`make_stored_rows_kernel`): row steps of element-wise rules
  (lazy and exact, catch-up-only flushes); units are elements, 8-bit blocks of a
  touched row, or with ``max_norm`` whole rows (stepped into a compute-dtype row
  buffer, renormalized, then stored).
* ``stored_rowwise`` (:func:`make_stored_rowwise_kernel`): row-wise rules with
  bfloat16 parameters or float32 per-row state of float64 parameters, one thread
  per touched row.

A thread per 8-bit block (and per row with ``max_norm``) is the simple, correct
first version: its memory accesses are not coalesced.  A faster layout would give
each 8-bit block a thread block (a thread per element, a shared-memory max
reduction, which is exact in any order).
"""

import numpy as np

from ..._jit import register_jitable
from ...rules import NSLOTS
from ...rules.fused import RENORM_EPS, post, pre, renorm_row
from ...storage import Q8_BLOCK
from ...storage.codecs import scale_inverse
from ..element import apply_catch_up, element_step, scalar_loader
from . import kernels as _kernels
from .kernels import TAB_ROW, _view_fn

cuda = None          # numba.cuda, bound by _prepare()


def _prepare():
    """Bind numba.cuda to this module's ``cuda`` (see
    :func:`fastopt.backends.cuda.kernels._prepare`)."""
    global cuda
    cuda = _kernels._prepare()


def _q8_encoder(encode):
    """``finish(S, b, scales, kb, lo, m, a)``: write block ``kb``'s scale ``a`` and
    encode its new values ``b[:m]`` into ``S[lo:lo + m]``."""
    @register_jitable
    def finish(S, b, scales, kb, lo, m, a):
        scales[kb] = a
        inv = scale_inverse(a)
        for i in range(m):
            S[lo + i] = encode(b[i], inv)
    return finish


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


def make_stored_dense_kernel(config):
    """The multi-tensor kernel of a stored format.

    ``kernel[blocks, BLOCK_SIZE](tab, grads, keys, fmt, chunks, hyper)``: ``tab``,
    ``grads`` and ``hyper`` as the plain dense kernel's
    (:func:`fastopt.backends.cuda.kernels.make_dense_kernel`), ``keys`` int64 (T,) the
    stochastic-rounding stream keys of the step, ``fmt`` int64 (T, FMT_COLS) the
    planner's format table (:data:`fastopt.backends.base.FMT_AUX` ...; its key column
    is not read: ``keys`` has this step's), ``chunks`` int64 (C, 3) rows ``(tensor, lo,
    hi)``.  Without 8-bit state ``lo:hi`` are elements, one thread per element (the
    format has no block structure).  With 8-bit state they are 8-bit blocks (block
    ``kb``: row ``kb // nb``, elements ``(kb % nb) * Q8_BLOCK`` on of that row), one
    thread per block: it steps the block's elements, keeps the new state values in a
    local buffer and their largest finite magnitude, writes that as the block's scale
    and encodes the buffer (the CPU driver's order)."""
    _prepare()
    from ...storage.codecs import magnitude
    from ..base import FMT_AUX, FMT_BASE, FMT_N, FMT_NB, FMT_NSCALE, FMT_ROW, FMT_SCALE
    assert not config.switches[5], "max_norm runs through the rows kernels"
    k = _stored_pieces(config)
    CT, LP, SP, LG, Q8 = k["CT"], k["LP"], k["SP"], k["LG"], k["Q8"]
    (L0, W0, E0), (L1, W1, E1), (L2, W2, E2) = k["S"]
    F0, F1, F2 = (_q8_encoder(e) if e is not None else None for e in (E0, E1, E2))
    VP, VG, VS, VA = (_view_fn(k[n]) for n in ("PDT", "GDT", "SDT", "ADT"))
    VF = _view_fn(np.float32)
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = (bool(u) for u in config.uses)
    F32 = np.float32
    QB = Q8_BLOCK
    NBUF = QB if Q8 else 1
    FA, FS, FN, FR, FB, FC = FMT_AUX, FMT_SCALE, FMT_N, FMT_ROW, FMT_NB, FMT_NSCALE
    FE = FMT_BASE
    ROW = TAB_ROW

    def stored_dense_kernel(tab, grads, keys, fmt, chunks, hyper):
        zero = CT(0)
        b0 = cuda.local.array(NBUF, CT)
        b1 = cuda.local.array(NBUF, CT)
        b2 = cuda.local.array(NBUF, CT)
        ci = cuda.blockIdx.x
        while ci < chunks.shape[0]:
            t = chunks[ci, 0]
            hi = chunks[ci, 2]
            n = fmt[t, FN]
            key = np.uint32(keys[t])
            base = fmt[t, FE]
            c = LOAD(hyper, tab[t, ROW])
            P = VP(tab[t, 0], n)
            G = VG(grads[t], n)
            S0 = VS(tab[t, 1], n)
            S1 = VS(tab[t, 2], n)
            S2 = VS(tab[t, 3], n)
            A = VA(fmt[t, FA], n)
            if Q8:
                D = fmt[t, FR]
                nb = fmt[t, FB]
                nsc = fmt[t, FC]
                C0 = VF(fmt[t, FS], nsc)
                C1 = VF(fmt[t, FS + 1], nsc)
                C2 = VF(fmt[t, FS + 2], nsc)
                kb = chunks[ci, 1] + cuda.threadIdx.x
                while kb < hi:
                    r = kb // nb
                    j0 = (kb - r * nb) * QB
                    lo = r * D + j0
                    m = min(QB, D - j0)
                    c0 = C0[kb] if U0 else F32(0)
                    c1 = C1[kb] if U1 else F32(0)
                    c2 = C2[kb] if U2 else F32(0)
                    a0 = F32(0)
                    a1 = F32(0)
                    a2 = F32(0)
                    for i in range(m):
                        e = lo + i
                        old = LP(P, A, e)
                        s0 = L0(S0, e, c0) if U0 else zero
                        s1 = L1(S1, e, c1) if U1 else zero
                        s2 = L2(S2, e, c2) if U2 else zero
                        p, s0, s1, s2 = STEP(old, LG(G, e), s0, s1, s2, c, zero)
                        SP(P, A, e, p, old, key, base + e)
                        if U0:
                            b0[i] = s0
                            a0 = max(a0, magnitude(s0))
                        if U1:
                            b1[i] = s1
                            a1 = max(a1, magnitude(s1))
                        if U2:
                            b2[i] = s2
                            a2 = max(a2, magnitude(s2))
                    if U0:
                        F0(S0, b0, C0, kb, lo, m, a0)
                    if U1:
                        F1(S1, b1, C1, kb, lo, m, a1)
                    if U2:
                        F2(S2, b2, C2, kb, lo, m, a2)
                    kb += cuda.blockDim.x
            else:
                e = chunks[ci, 1] + cuda.threadIdx.x
                while e < hi:
                    old = LP(P, A, e)
                    s0 = L0(S0, e, F32(0)) if U0 else zero
                    s1 = L1(S1, e, F32(0)) if U1 else zero
                    s2 = L2(S2, e, F32(0)) if U2 else zero
                    p, s0, s1, s2 = STEP(old, LG(G, e), s0, s1, s2, c, zero)
                    SP(P, A, e, p, old, key, base + e)
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

    ``kernel[blocks, BLOCK_SIZE](P, A, S0, S1, S2, C0, C1, C2, vals, order, seg, uniq,
    coef, hyper, prows, nuniq, D, key, base, ident)``: parameter, aux, state and scale
    arrays flat; ``vals`` (nnz, D) gradient rows in the compute dtype; ``prows``
    (nuniq, D) compute-dtype row buffers (``max_norm`` only).  Work units, grid-stride:

    * ``max_norm``: a touched row (every block of it, then the renorm on its row
      buffer, then the parameter stores: the CPU driver's order);
    * 8-bit state: one block of ``Q8_BLOCK`` elements of a touched row;
    * otherwise: one element.

    Each element is caught up (``catch``) and stepped (``step``) with its column of the
    row's duplicate gradient rows summed in order of appearance, as the CPU driver
    does.  Catch-up alone (exact mode's flush) touches the parameter and slot 0."""
    _prepare()
    from ...storage.codecs import magnitude
    k = _stored_pieces(config)
    CT, LP, SP, Q8 = k["CT"], k["LP"], k["SP"], k["Q8"]
    (L0, W0, E0), (L1, W1, E1), (L2, W2, E2) = k["S"]
    F0, F1, F2 = (_q8_encoder(e) if e is not None else None for e in (E0, E1, E2))
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = (bool(u) for u in config.uses)
    MX = bool(config.switches[5])
    EPS = CT(RENORM_EPS)
    CATCH, STEPPING = bool(catch), bool(step)
    V1, V2 = U1 and STEPPING, U2 and STEPPING
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
            r = u if ident else uniq[u]
            if MX:
                jb_lo = 0
                jb_hi = nb
            else:
                jb_lo = w - u * NU
                jb_hi = jb_lo + 1
            ca = cb = cc = ce = 0.0
            if CATCH:
                ca, cb, cc, ce = coef[u, 0], coef[u, 1], coef[u, 2], coef[u, 3]
            a = 0
            b = 0
            if STEPPING and not ident:
                a = seg[u]
                b = seg[u + 1]
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
                    old = LP(P, A, e)
                    p = old
                    s0 = L0(S0, e, c0) if U0 else zero
                    s1 = L1(S1, e, c1) if V1 else zero
                    s2 = L2(S2, e, c2) if V2 else zero
                    if CATCH:
                        p, s0 = apply_catch_up(p, s0, ca, cb, cc, ce, CT)
                    if STEPPING:
                        if ident:
                            g = vals[u, j]
                        else:
                            g = vals[order[a], j]
                            for q in range(a + 1, b):
                                g += vals[order[q], j]
                        p, s0, s1, s2 = STEP(p, g, s0, s1, s2, c, zero)
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

