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
  computes with.  Work units: without 8-bit state an element, with 8-bit state an
  8-bit block (thread ``tid`` of a chunk takes units ``lo + tid``, ``lo + tid +
  NORM_THREADS``, ...; a block's elements in order).  Each thread sums the squares in
  float64, the block adds the threads' sums in a fixed tree in shared memory and
  writes the chunk's two sums; the host adds each tensor's chunks in chunk order.
  The result depends on the chunk table (``CHUNK``, or ``BLOCK_SIZE`` blocks with
  8-bit state) and on nothing else of the launch: the same bits run to run and for
  any grid size.  It is not the CPU's order of summation (lanes of
  :func:`fastopt.backends.numba_norms.make_stored_norms_driver`): the norms agree
  with the CPU backends to rounding.
* ``stored_phase1`` (:func:`make_stored_phase1_kernel`): Muon's element phase 1
  (``rule.phase1``) with a stored momentum buffer, per tensor.  The gradient is
  loaded with the format's gradient loader, the buffer decoded with the slot's
  load (bfloat16 widened; 8-bit codes with the block scale), the direction ``U``
  written in the compute dtype, and the new buffer stored: bfloat16 rounded to
  nearest even, float32 state of float64 parameters cast, 8-bit by blocks (one
  thread per block of :data:`fastopt.storage.Q8_BLOCK` elements of a row: the new
  values in a local buffer and their largest finite magnitude, which becomes the
  block's scale, then the codes: the stored update kernel's encoder,
  :func:`fastopt.backends.cuda.stored._q8_encoder`).  The CPU's phase 1
  (:mod:`fastopt.backends.matrix_cpu`) encodes with the NumPy definitions of the same
  formats (:mod:`fastopt.storage.reference`).  Phase 2 is the stored dense kernel,
  which loads the buffer and stores it again unchanged (decoding and encoding an
  encoded value gives it back).

The codecs are the device functions the stored update kernels use; nothing of the
formats' math is written here.
"""

import numpy as np

from ...storage import Q8_BLOCK
from ...rules.fused import pre
from ..base import norm_uses
from ..element import scalar_loader
from . import kernels as _kernels
from .kernels import NORM_THREADS, TAB_ROW, _view_fn
from .stored import _q8_encoder, _stored_pieces

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
    from ..base import FMT_AUX, FMT_N, FMT_NB, FMT_NSCALE, FMT_ROW, FMT_SCALE
    k = _stored_pieces(config)
    CT, LP, LG, Q8 = k["CT"], k["LP"], k["LG"], k["Q8"]
    (L0, _, _), (L1, _, _), (L2, _, _) = k["S"]
    VP, VG, VS, VA = (_view_fn(k[n]) for n in ("PDT", "GDT", "SDT", "ADT"))
    VF = _view_fn(np.float32)
    NORMS = config.rule.norms
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    U0, U1, U2 = norm_uses(config)
    SC, CL = bool(config.switches[0]), bool(config.switches[1])
    F32 = np.float32
    QB = Q8_BLOCK
    NT = NORM_THREADS
    ROW = TAB_ROW
    FA, FS, FN, FR, FB, FC = FMT_AUX, FMT_SCALE, FMT_N, FMT_ROW, FMT_NB, FMT_NSCALE

    def stored_norms_kernel(tab, grads, keys, fmt, chunks, hyper, part):
        zero = CT(0)
        sa = cuda.shared.array(NT, np.float64)
        sb = cuda.shared.array(NT, np.float64)
        tid = cuda.threadIdx.x
        ci = cuda.blockIdx.x
        while ci < chunks.shape[0]:
            t = chunks[ci, 0]
            hi = chunks[ci, 2]
            n = fmt[t, FN]
            c = LOAD(hyper, tab[t, ROW])
            P = VP(tab[t, 0], n)
            G = VG(grads[t], n)
            S0 = VS(tab[t, 1], n)
            S1 = VS(tab[t, 2], n)
            S2 = VS(tab[t, 3], n)
            A = VA(fmt[t, FA], n)
            a = 0.0
            b = 0.0
            u = chunks[ci, 1] + tid
            if Q8:
                D = fmt[t, FR]
                nb = fmt[t, FB]
                nsc = fmt[t, FC]
                C0 = VF(fmt[t, FS], nsc)
                C1 = VF(fmt[t, FS + 1], nsc)
                C2 = VF(fmt[t, FS + 2], nsc)
            while u < hi:
                if Q8:
                    r = u // nb
                    j0 = (u - r * nb) * QB
                    lo = r * D + j0
                    m = min(QB, D - j0)
                    c0 = C0[u] if U0 else F32(0)
                    c1 = C1[u] if U1 else F32(0)
                    c2 = C2[u] if U2 else F32(0)
                else:
                    lo = u
                    m = 1
                    c0 = c1 = c2 = F32(0)
                for i in range(m):
                    e = lo + i
                    s0 = L0(S0, e, c0) if U0 else zero
                    s1 = L1(S1, e, c1) if U1 else zero
                    s2 = L2(S2, e, c2) if U2 else zero
                    x, y = NORMS(LP(P, A, e), pre(LG(G, e), c, SC, CL), s0, s1, s2, c)
                    fx = np.float64(x)
                    fy = np.float64(y)
                    a += fx * fx
                    b += fy * fy
                u += NT
            sa[tid] = a
            sb[tid] = b
            cuda.syncthreads()
            h = NT // 2
            while h > 0:
                if tid < h:
                    sa[tid] += sa[tid + h]
                    sb[tid] += sb[tid + h]
                cuda.syncthreads()
                h //= 2
            if tid == 0:
                part[ci, 0] = sa[0]
                part[ci, 1] = sb[0]
            cuda.syncthreads()
            ci += cuda.gridDim.x

    return cuda.jit(stored_norms_kernel)


def make_stored_phase1_kernel(config):
    """Muon's element phase 1 with a stored momentum buffer (slot 0), one tensor.

    ``kernel[blocks, BLOCK_SIZE](G, S0, C0, U, hyper, row, D, nb, units)``: ``G`` the
    flat gradient (the format's gradient dtype: float32, bfloat16 bits, or the
    parameter's dtype), ``S0`` the flat buffer (its stored dtype), ``C0`` float32 block
    scales (8-bit; otherwise never read), ``U`` the flat direction in the compute
    dtype, ``hyper`` the bucket's float64 scalar rows and ``row`` the tensor's.  Units
    (grid-stride): with 8-bit state the ``units`` blocks (block ``kb``: row ``kb //
    nb`` of length ``D``, elements ``(kb % nb) * Q8_BLOCK`` on), otherwise the
    ``units`` elements."""
    _prepare()
    from ...storage.codecs import magnitude
    k = _stored_pieces(config)
    CT, LG, Q8 = k["CT"], k["LG"], k["Q8"]
    L0, W0, E0 = k["S"][0]
    F0 = _q8_encoder(E0) if Q8 else None
    PHASE1 = config.rule.phase1
    LOAD = scalar_loader(config.rule.Scalars, CT, config.fixed)
    F32 = np.float32
    QB = Q8_BLOCK
    NBUF = QB if Q8 else 1

    def stored_phase1_kernel(G, S0, C0, U, hyper, row, D, nb, units):
        c = LOAD(hyper, row)
        buf = cuda.local.array(NBUF, CT)
        w = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while w < units:
            if Q8:
                r = w // nb
                j0 = (w - r * nb) * QB
                lo = r * D + j0
                m = min(QB, D - j0)
                sc = C0[w]
                amax = F32(0)
                for i in range(m):
                    e = lo + i
                    s, d = PHASE1(LG(G, e), L0(S0, e, sc), c)
                    U[e] = d
                    buf[i] = s
                    amax = max(amax, magnitude(s))
                F0(S0, buf, C0, w, lo, m, amax)
            else:
                s, d = PHASE1(LG(G, w), L0(S0, w, F32(0)), c)
                U[w] = d
                W0(S0, w, s)
            w += cuda.gridDim.x * cuda.blockDim.x

    return cuda.jit(stored_phase1_kernel)
