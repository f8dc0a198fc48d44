"""The CUDA passes before the update of the per-tensor and matrix rules in a stored
format (backend feature ``stored_passes``): bfloat16 parameters, 16- and 8-bit state.

* ``stored_norms`` (:func:`make_stored_norms_kernel`): the norm pass of LAMB and LARS
  (``rule.norms``).  It runs over the tables of the bucket's stored update launch
  (:class:`fastopt.backends.cuda.launch.DenseTables`: the same chunk table, format
  table and pointer table), one thread block of :data:`NORM_THREADS` threads per
  chunk (grid-stride over chunks).  Each element is loaded as the stored update
  kernel loads it, with the same jitable functions (:mod:`fastopt.storage.io`: the
  parameter with its ``bf16_update`` mode's load, ``split``'s float32 master
  included; a bfloat16 slot widened; an 8-bit slot decoded with its block's scale;
  a bfloat16 gradient widened), so the norms are those of the values the update
  computes with; the tensor's views come from the update kernel's set-up
  (:func:`fastopt.backends.cuda.stored.tensor_views`).  Without 8-bit state thread
  ``tid`` of a chunk takes elements ``lo + tid``, ``lo + tid + NORM_THREADS``, ...;
  with 8-bit state the chunk's 8-bit blocks in turn, thread ``tid`` taking elements
  ``tid``, ``tid + NORM_THREADS``, ... of each (coalesced, as the update).  Each
  thread sums the squares in float64, the block adds the threads' sums in a fixed
  tree in shared memory (:func:`fastopt.backends.cuda.kernels.tree_sum2`) and writes
  the chunk's two sums; the host adds each tensor's chunks in chunk order.  The
  result depends on the chunk table (``CHUNK`` elements, or ``CHUNK // Q8_BLOCK``
  blocks with 8-bit state) and on nothing else of the launch: the same bits run to
  run and for any grid size.  It is not the CPU's order of summation (lanes of
  :func:`fastopt.backends.numba_norms.make_stored_norms_driver`): the norms agree
  with the CPU backends to rounding.
* ``stored_phase1`` (:func:`make_stored_phase1_kernel`): Muon's element phase 1
  (``rule.phase1``) with a stored momentum buffer, per tensor.  The gradient is
  loaded with the format's gradient loader, the buffer decoded with the slot's
  load (bfloat16 widened; 8-bit codes with the block scale), the direction ``U``
  written in the compute dtype, and the new buffer stored: bfloat16 rounded to
  nearest even, float32 state of float64 parameters cast, 8-bit by blocks (one
  thread block of :data:`~fastopt.backends.cuda.stored.Q8_THREADS` threads per block
  of :data:`fastopt.storage.Q8_BLOCK` elements of a row, a thread per element: the
  largest finite magnitude of the new values by a shared-memory max, which becomes
  the block's scale, then the codes: the stored update kernels' block store,
  :func:`fastopt.backends.cuda.stored.q8_block_store`).  The CPU's phase 1
  (:mod:`fastopt.backends.matrix_cpu`) encodes with the NumPy definitions of the same
  formats (:mod:`fastopt.storage.reference`).  Phase 2 is the stored dense kernel,
  which loads the buffer and stores it again unchanged (decoding and encoding an
  encoded value gives it back).

The codecs are the device functions the stored update kernels use; nothing of the
formats' math is written here.
"""

import numpy as np

from ..._jit import register_jitable
from ...rules.fused import pre
from ..base import norm_uses
from ..element import scalar_loader
from . import kernels as _kernels
from .kernels import NORM_THREADS, TAB_ROW, tree_sum2
from .stored import Q8_THREADS, _stored_pieces, q8_block_store, q8_span, tensor_views

cuda = None          # numba.cuda, bound by _prepare()


def _prepare():
    """Bind numba.cuda to this module's ``cuda`` (see
    :func:`fastopt.backends.cuda.kernels._prepare`)."""
    global cuda
    cuda = _kernels._prepare()


def make_stored_norms_kernel(config):
    """The norm pass of a per-tensor rule in a stored format.

    ``kernel[blocks, NORM_THREADS](tab, grads, keys, fmt, chunks, hyper, part)``: the
    stored dense kernel's arguments (:func:`fastopt.backends.cuda.stored.
    make_stored_dense_kernel`; ``keys`` is not read) and ``part`` float64 (C, 2), where
    chunk ``ci`` writes ``(sum x^2, sum y^2)`` of the rule's two ``norms`` values over
    its elements (after the gradient options ``grad_scale`` and clipping)."""
    _prepare()
    from ..base import FMT_NB, FMT_ROW
    k = _stored_pieces(config)
    CT, LP, LG, Q8 = k["CT"], k["LP"], k["LG"], k["Q8"]
    (L0, _, _), (L1, _, _), (L2, _, _) = k["S"]
    TENSOR, SCALES = tensor_views(k)
    NORMS = config.rule.norms
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = norm_uses(config)
    SC, CL = bool(config.switches[0]), bool(config.switches[1])
    F32 = np.float32
    NT = NORM_THREADS
    TREE = tree_sum2(NT)
    ROW = TAB_ROW
    FR, FB = FMT_ROW, FMT_NB

    @register_jitable
    def squares(P, A, G, S0, S1, S2, i, end, c0, c1, c2, c):
        """The float64 sums of ``x^2`` and ``y^2`` over elements ``i, i + NT, ...``
        below ``end``, in order."""
        zero = CT(0)
        a = 0.0
        b = 0.0
        while i < end:
            s0 = L0(S0, i, c0) if U0 else zero
            s1 = L1(S1, i, c1) if U1 else zero
            s2 = L2(S2, i, c2) if U2 else zero
            x, y = NORMS(LP(P, A, i), pre(LG(G, i), c, SC, CL), s0, s1, s2, c)
            fx = np.float64(x)
            fy = np.float64(y)
            a += fx * fx
            b += fy * fy
            i += NT
        return a, b

    def stored_norms_kernel(tab, grads, keys, fmt, chunks, hyper, part):
        sa = cuda.shared.array(NT, np.float64)
        sb = cuda.shared.array(NT, np.float64)
        tid = cuda.threadIdx.x
        ci = cuda.blockIdx.x
        while ci < chunks.shape[0]:
            t = chunks[ci, 0]
            hi = chunks[ci, 2]
            c = LOAD(hyper, tab[t, ROW])
            P, G, S0, S1, S2, A = TENSOR(tab, grads, fmt, t)
            if Q8:                   # the chunk's 8-bit blocks in turn
                D = fmt[t, FR]
                nb = fmt[t, FB]
                C0, C1, C2 = SCALES(fmt, t)
                a = 0.0
                b = 0.0
                for kb in range(chunks[ci, 1], hi):
                    lo, m = q8_span(kb, nb, D)
                    x, y = squares(P, A, G, S0, S1, S2, lo + tid, lo + m,
                                   C0[kb] if U0 else F32(0), C1[kb] if U1 else F32(0),
                                   C2[kb] if U2 else F32(0), c)
                    a += x
                    b += y
            else:
                a, b = squares(P, A, G, S0, S1, S2, chunks[ci, 1] + tid, hi, F32(0), F32(0),
                               F32(0), c)
            sa[tid] = a
            sb[tid] = b
            TREE(sa, sb, tid)
            if tid == 0:
                part[ci, 0] = sa[0]
                part[ci, 1] = sb[0]
            cuda.syncthreads()
            ci += cuda.gridDim.x

    return cuda.jit(stored_norms_kernel)


def make_stored_phase1_kernel(config):
    """Muon's element phase 1 with a stored momentum buffer (slot 0), one tensor.

    ``kernel[blocks, threads](G, S0, C0, U, hyper, row, D, nb, units)``: ``G`` the
    flat gradient (the format's gradient dtype: float32, bfloat16 bits, or the
    parameter's dtype), ``S0`` the flat buffer (its stored dtype), ``C0`` float32 block
    scales (8-bit; otherwise never read), ``U`` the flat direction in the compute
    dtype, ``hyper`` the bucket's float64 scalar rows and ``row`` the tensor's.  Units
    (grid-stride): with 8-bit state the ``units`` blocks (:func:`fastopt.backends.
    cuda.stored.q8_span`: rows of length ``D``, ``nb`` blocks a row), a thread block
    of ``threads`` = :data:`~fastopt.backends.cuda.stored.Q8_THREADS` each, a thread
    per element; otherwise the ``units`` elements, a thread each."""
    _prepare()
    k = _stored_pieces(config)
    CT, LG, Q8 = k["CT"], k["LG"], k["Q8"]
    L0, W0, E0 = k["S"][0]
    STORE = q8_block_store((E0, None, None), (True, False, False)) if Q8 else None
    PHASE1 = config.rule.phase1
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    F32 = np.float32
    NSH = Q8_THREADS if Q8 else 1

    def stored_phase1_kernel(G, S0, C0, U, hyper, row, D, nb, units):
        c = LOAD(hyper, row)
        if Q8:
            sm = cuda.shared.array((3, NSH), F32)
            tid = cuda.threadIdx.x
            kb = cuda.blockIdx.x
            while kb < units:              # the same for every thread of the block
                lo, m = q8_span(kb, nb, D)
                e = lo + tid
                live = tid < m
                s = CT(0)
                if live:
                    s, d = PHASE1(LG(G, e), L0(S0, e, C0[kb]), c)
                    U[e] = d
                STORE(S0, S0, S0, C0, C0, C0, sm, tid, kb, e, live, s, s, s)
                kb += cuda.gridDim.x
        else:
            w = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
            while w < units:
                s, d = PHASE1(LG(G, w), L0(S0, w, F32(0)), c)
                U[w] = d
                W0(S0, w, s)
                w += cuda.gridDim.x * cuda.blockDim.x

    return cuda.jit(stored_phase1_kernel)
