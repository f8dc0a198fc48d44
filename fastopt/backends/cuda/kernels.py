"""The plain CUDA kernels: float32 / float64 parameters and state in their own dtype.

Every element-wise kernel updates an element with THE element step of the Numba
drivers, :func:`fastopt.backends.element.element_step` (fused pre-processing, the
rule's math, fused post-processing), fed by the rule's named scalars loaded with
:func:`fastopt.backends.element.scalar_loader`: the same jitable functions the CPU
drivers call, compiled as device functions, so the CUDA backend has every fused
option by construction.  A kernel is a closure over a
:class:`~fastopt.backends.base.Config` (rule, dtype, used slots, fixed scalars,
fused switches): unused slots are never loaded and an option that is off costs
nothing.  The factories here build them; :func:`fastopt.backends.cuda.launch.kernel_for`
compiles and caches them and :mod:`fastopt.backends.cuda.launch` launches them.

* ``dense`` (:func:`make_dense_kernel`), the multi-tensor launch of a
  :class:`~fastopt.backends.base.DenseWork`: one launch per bucket, whatever the
  number of tensors.  It reads a pointer table ``tab`` int64 (T, :data:`TAB_COLS`) =
  (param, slot 0, slot 1, slot 2 addresses, scalar row) and a chunk table ``chunks``
  int64 (C, 3) = (tensor, start, stop) of at most ``CHUNK`` elements, both uploaded
  once per bucket, and the gradient addresses ``grads`` int64 (T,) and the float64
  scalar rows ``hyper``, uploaded in one copy per step.  Blocks grid-stride over
  chunks, the threads of a block stride over the chunk's elements (coalesced).
* ``rows`` (:func:`make_rows_kernel`), a :class:`~fastopt.backends.base.RowsWork`
  of an element-wise rule: a grid-stride loop over the ``nuniq * D`` touched
  elements (thread ``e``: unique row ``e // D``, column ``e % D``).  Each thread
  sums its column of the row's duplicate gradient rows in their order of
  appearance (the order of the CPU driver; no atomics, the result does not depend
  on the launch shape), then, in exact sparse mode, applies the row's catch-up map
  (:func:`~fastopt.backends.element.apply_catch_up`, skipped for an identity map)
  and then the element step.  ``vals=None`` (exact mode's flush): the catch-up
  only.  Dense steps of a ``max_norm`` group arrive here with the identity plan
  (every row once), which is not copied to the device.
* ``renorm`` (:func:`make_renorm_kernel`), ``max_norm``: after the rows kernel,
  one thread per touched row renormalizes it with
  :func:`fastopt.rules.fused.renorm_row` (squares summed in element order in the
  dtype), the CPU driver's function.
* ``rowwise`` (:func:`make_rowwise_kernel`), row-wise rules (RowWiseAdagrad), dense
  or sparse: one thread per touched row; duplicates summed into a scratch row
  (the CPU order), the gradient-side options applied into the scratch row, the
  rule's row function (which reduces the row in its own fixed order), the
  parameter-side options per element and ``max_norm``.  Threads read their rows
  sequentially (uncoalesced): correct and deterministic first.
* ``finite`` (:func:`make_count_kernel`), ``skip_nonfinite``: counts the elements
  of a device array whose ``g / grad_scale`` (in the array's dtype) is Inf or NaN
  (``x - x != 0``); each thread counts its grid-stride share and adds a non-zero
  count to one int64 device counter (an integer sum: deterministic).  Host arrays
  (sparse values) are checked on the CPU.
* ``widen`` (:func:`make_widen_kernel`): bfloat16 bits to float32, for gradients
  of bfloat16 parameters.

The block reductions in shared memory are device functions written once, here:
:func:`tree_sum` and :func:`tree_sum2` (one or two float64 sums in a fixed halving
tree: the norm passes, Adafactor's sums) and :func:`tree_max3` (the 8-bit kernels'
block scales, :mod:`fastopt.backends.cuda.stored`).

``error_model`` and fastmath are numba-cuda's defaults (no fast-math flags: IEEE
``sqrt.rn`` and ``div.rn``, NaN/Inf propagate).  The CUDA compiler contracts
``a * b + c`` into FMA, so results agree with the CPU backends to rounding, not
bit for bit (in the simulator they are usually identical).

Known numba-cuda gap: its CUDA target has no lowering for the NumPy scalar ufuncs
``np.sqrt`` and ``np.abs`` that :mod:`fastopt.rules` uses, nor ``np.floor`` that the
8-bit codecs use (numba-cuda 0.30: a ``KeyError`` while compiling).
:func:`_ensure_scalar_ufuncs` adds the float32 / float64 loops, implemented by the
target's own ``math.sqrt`` / ``math.fabs`` / ``math.floor`` (IEEE ``sqrt.rn``, ``abs``,
``floor``), when they are missing.

The kernels reach numba.cuda through this module's global ``cuda``, bound by
:func:`_prepare` (which every factory calls first): importing this module does not
import numba.cuda.  :mod:`fastopt.backends.cuda.stored` holds the stored-format
twins of the dense, rows and row-wise kernels.
"""

import math

import numpy as np

from ...rules import NSLOTS
from ...rules.fused import RENORM_EPS, post, pre, renorm_row
from ..element import apply_catch_up, element_step, scalar_loader
from .. import cuda as _pkg

cuda = None          # numba.cuda, bound by _prepare()
_VIEWS = {}          # dtype -> device function: address -> pointer / array
_UFUNCS_PATCHED = False
#: columns of the dense pointer table ``tab``: param, slot 0 .. NSLOTS-1, scalar row
#: (the gradient addresses travel apart, rewritten every step)
TAB_COLS = 1 + NSLOTS + 1
#: column of the scalar row in ``tab``
TAB_ROW = TAB_COLS - 1


def _ensure_scalar_ufuncs():
    """Give numba-cuda's CUDA target float32/float64 loops for ``np.sqrt``,
    ``np.abs`` and ``np.floor`` (the 8-bit codecs) on scalars when it lacks them (see
    the module docstring)."""
    global _UFUNCS_PATCHED
    if _pkg._SIM or _UFUNCS_PATCHED:
        return
    from numba.cuda import ufuncs as cu_ufuncs
    db = cu_ufuncs.ufunc_db()      # fails loudly if numba-cuda's layout changed

    def via(fn):
        def impl(context, builder, sig, args):
            return context.get_function(fn, sig)(builder, args)
        return impl
    for uf, fn in ((np.sqrt, math.sqrt), (np.absolute, math.fabs), (np.floor, math.floor)):
        loops = db.setdefault(uf, {})
        for key in ("f->f", "d->d"):
            loops.setdefault(key, via(fn))
    _UFUNCS_PATCHED = True


def _view_fn(dtype):
    """Device function ``view(address, n)``: the memory at a device address as
    something indexable by element (0 .. n-1).  On the GPU a typed pointer (an
    ``inttoptr``; ``n`` is unused), in the simulator a NumPy array over the host
    memory that stands for device memory there."""
    dtype = np.dtype(dtype)
    fn = _VIEWS.get(dtype.str)
    if fn is not None:
        return fn
    if _pkg._SIM:
        ctype = np.ctypeslib.as_ctypes_type(dtype)

        def fn(addr, n):
            return np.ctypeslib.as_array((ctype * int(n)).from_address(int(addr)))
    else:
        from numba.cuda import types as nbt
        from numba.cuda.extending import intrinsic
        elem = {"<f4": nbt.float32, "<f8": nbt.float64, "|u1": nbt.uint8,
                "<u2": nbt.uint16}[dtype.str]

        @intrinsic
        def fn(typingctx, addr, n):
            sig = nbt.CPointer(elem)(nbt.int64, n)

            def codegen(context, builder, signature, args):
                return builder.inttoptr(args[0],
                                        context.get_value_type(signature.return_type))
            return sig, codegen
    _VIEWS[dtype.str] = fn
    return fn


def _prepare():
    """Load numba.cuda (once) and bind it to this module's ``cuda``; patch the scalar
    ufuncs.  Returns numba.cuda."""
    global cuda
    cuda = _pkg._load()
    _ensure_scalar_ufuncs()
    return cuda

# ------------------------------------------------- block reductions (device functions)

_TREES = {}          # (kind, NT, flags, simulator) -> device function


def _tree(kind, NT, flags=()):
    """The cached device function ``kind`` for ``NT`` threads (see :func:`tree_sum`)."""
    key = (kind, int(NT), tuple(flags), _pkg._SIM)
    fn = _TREES.get(key)
    if fn is None:
        _prepare()
        fn = _TREES[key] = _TREE_MAKERS[kind](int(NT), *flags)
    return fn


def tree_sum(NT):
    """Device function ``tree_sum(sa, tid)``: ``sa[0]`` = the sum of the block's ``NT``
    partial sums ``sa`` (a shared array, each thread ``tid`` having written its own),
    added in a fixed halving tree (``sa[t] += sa[t + h]`` for ``h = NT/2, NT/4, ..., 1``):
    the same order for any grid.  Every thread is synchronized before and after;
    a caller that writes ``sa`` again synchronizes after reading ``sa[0]``.  ``NT``
    a power of two (the launch's block size)."""
    return _tree("sum", NT)


def tree_sum2(NT):
    """Device function ``tree_sum2(sa, sb, tid)``: :func:`tree_sum` of two shared arrays
    at once (one barrier per level for both)."""
    return _tree("sum2", NT)


def tree_max3(NT, u0, u1, u2):
    """Device function ``(a0, a1, a2) = tree_max3(sm, tid, x0, x1, x2)``: the largest of
    the block's ``NT`` values ``xk`` for each row ``k`` of the shared float32 array
    ``sm`` (3, NT) whose flag ``uk`` is set (0 for the others), by a halving tree.  A
    max is exact in any order, so the result is the sequential loop's.  Returns in
    registers, every thread synchronized after reading: ``sm`` may be written again
    at once (the 8-bit kernels' block scale, :mod:`fastopt.backends.cuda.stored`)."""
    return _tree("max3", NT, (bool(u0), bool(u1), bool(u2)))


def _make_sum(NT):
    def tree_sum(sa, tid):
        cuda.syncthreads()
        h = NT // 2
        while h > 0:
            if tid < h:
                sa[tid] += sa[tid + h]
            cuda.syncthreads()
            h //= 2
    return cuda.jit(device=True)(tree_sum)


def _make_sum2(NT):
    def tree_sum2(sa, sb, tid):
        cuda.syncthreads()
        h = NT // 2
        while h > 0:
            if tid < h:
                sa[tid] += sa[tid + h]
                sb[tid] += sb[tid + h]
            cuda.syncthreads()
            h //= 2
    return cuda.jit(device=True)(tree_sum2)


def _make_max3(NT, U0, U1, U2):
    F32 = np.float32

    def tree_max3(sm, tid, x0, x1, x2):
        if U0:
            sm[0, tid] = x0
        if U1:
            sm[1, tid] = x1
        if U2:
            sm[2, tid] = x2
        cuda.syncthreads()
        h = NT // 2
        while h > 0:
            if tid < h:
                if U0:
                    sm[0, tid] = max(sm[0, tid], sm[0, tid + h])
                if U1:
                    sm[1, tid] = max(sm[1, tid], sm[1, tid + h])
                if U2:
                    sm[2, tid] = max(sm[2, tid], sm[2, tid + h])
            cuda.syncthreads()
            h //= 2
        a0 = sm[0, 0] if U0 else F32(0)
        a1 = sm[1, 0] if U1 else F32(0)
        a2 = sm[2, 0] if U2 else F32(0)
        cuda.syncthreads()
        return a0, a1, a2
    return cuda.jit(device=True)(tree_max3)


_TREE_MAKERS = {"sum": _make_sum, "sum2": _make_sum2, "max3": _make_max3}


# ------------------------------------------------------------------ kernels

def make_dense_kernel(config):
    """The multi-tensor kernel of an element-wise rule configuration.

    ``kernel[blocks, BLOCK_SIZE](tab, grads, chunks, hyper)`` with ``tab`` int64 (T,
    :data:`TAB_COLS`): param, slot 0..2 addresses (unused slots: any address, never
    touched) and the tensor's scalar row; ``grads`` int64 (T,): gradient addresses;
    ``chunks`` int64 (C, 3): (tensor, start, stop); ``hyper`` float64 (R, NSCALARS).
    For every element ``i`` of every chunk::

        p[i], s0[i], s1[i], s2[i] = step(p[i], g[i], s0[i], s1[i], s2[i], c, 0)

    with ``step`` the element step of ``config`` and ``c`` the tensor's scalars.
    """
    _prepare()
    assert not config.switches[5], "max_norm runs through the rows kernels"
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    VIEW = _view_fn(config.dtype)
    DT = np.dtype(config.dtype).type
    U0, U1, U2 = (bool(u) for u in config.uses)
    ROW = TAB_ROW

    def dense_kernel(tab, grads, chunks, hyper):
        zero = DT(0)
        ci = cuda.blockIdx.x
        while ci < chunks.shape[0]:
            t = chunks[ci, 0]
            hi = chunks[ci, 2]
            P = VIEW(tab[t, 0], hi)
            G = VIEW(grads[t], hi)
            A0 = VIEW(tab[t, 1], hi)
            A1 = VIEW(tab[t, 2], hi)
            A2 = VIEW(tab[t, 3], hi)
            c = LOAD(hyper, tab[t, ROW])
            i = chunks[ci, 1] + cuda.threadIdx.x
            while i < hi:
                s0 = A0[i] if U0 else zero
                s1 = A1[i] if U1 else zero
                s2 = A2[i] if U2 else zero
                q, s0, s1, s2 = STEP(P[i], G[i], s0, s1, s2, c, zero)
                P[i] = q
                if U0:
                    A0[i] = s0
                if U1:
                    A1[i] = s1
                if U2:
                    A2[i] = s2
                i += cuda.blockDim.x
            ci += cuda.gridDim.x

    return cuda.jit(dense_kernel)


#: threads of a norm-pass block (a compile-time size: the shared-memory tree)
NORM_THREADS = 256


def make_norms_kernel(config):
    """The norm pass of a per-tensor rule (LAMB, LARS) over a bucket.

    ``kernel[blocks, NORM_THREADS](tab, grads, chunks, hyper, part)``: one thread block
    per chunk (grid-stride); each thread sums, in float64, the squares of the rule's
    two ``norms`` values over its strided elements (after the gradient options), the
    block adds the threads' sums in a fixed tree in shared memory, and thread 0 writes
    ``part[ci] = (sum x^2, sum y^2)``; the host adds each tensor's chunks in chunk
    order.  Deterministic (fixed block size and tree), but not the CPU's order of
    summation: the norms agree with the CPU backends to rounding."""
    _prepare()
    NORMS = config.rule.norms
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    VIEW = _view_fn(config.dtype)
    DT = np.dtype(config.dtype).type
    U0, U1, U2 = (bool(u) for u in config.uses)
    SC, CL = bool(config.switches[0]), bool(config.switches[1])
    NT = NORM_THREADS
    TREE = tree_sum2(NT)
    ROW = TAB_ROW

    def norms_kernel(tab, grads, chunks, hyper, part):
        zero = DT(0)
        sa = cuda.shared.array(NT, np.float64)
        sb = cuda.shared.array(NT, np.float64)
        tid = cuda.threadIdx.x
        ci = cuda.blockIdx.x
        while ci < chunks.shape[0]:
            t = chunks[ci, 0]
            hi = chunks[ci, 2]
            P = VIEW(tab[t, 0], hi)
            G = VIEW(grads[t], hi)
            A0 = VIEW(tab[t, 1], hi)
            A1 = VIEW(tab[t, 2], hi)
            A2 = VIEW(tab[t, 3], hi)
            c = LOAD(hyper, tab[t, ROW])
            a = 0.0
            b = 0.0
            i = chunks[ci, 1] + tid
            while i < hi:
                s0 = A0[i] if U0 else zero
                s1 = A1[i] if U1 else zero
                s2 = A2[i] if U2 else zero
                x, y = NORMS(P[i], pre(G[i], c, SC, CL), s0, s1, s2, c)
                fx = np.float64(x)
                fy = np.float64(y)
                a += fx * fx
                b += fy * fy
                i += NT
            sa[tid] = a
            sb[tid] = b
            TREE(sa, sb, tid)
            if tid == 0:
                part[ci, 0] = sa[0]
                part[ci, 1] = sb[0]
            cuda.syncthreads()
            ci += cuda.gridDim.x

    return cuda.jit(norms_kernel)


def make_rows_kernel(config, catch, step):
    """The row kernel of an element-wise rule configuration.

    ``kernel[blocks, BLOCK_SIZE](P, S0, S1, S2, vals, order, seg, uniq, coef, hyper,
    nuniq, ident)``: ``P`` and the slots (nrows, D) (unused slots: ``P``, never
    touched), ``vals`` (nnz, D) gradient rows, ``coef`` float64 (nuniq, 4) catch-up
    maps.  Grid-stride over the ``nuniq * D`` touched elements; element ``j`` of row
    ``r = uniq[u]`` (``u`` when ``ident``: every row once, order/seg/uniq not read):

    * ``catch``: ``(p, s0) <- apply_catch_up(p, s0, *coef[u])`` unless the map is the
      identity;
    * ``step``: the element step with the sum of ``vals[order[seg[u]:seg[u + 1]], j]``
      added in that order (``vals[u, j]`` when ``ident``).
    """
    _prepare()
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    U0, U1, U2 = (bool(u) for u in config.uses)
    CATCH, STEPPING = bool(catch), bool(step)

    def rows_kernel(P, S0, S1, S2, vals, order, seg, uniq, coef, hyper, nuniq, ident):
        zero = DT(0)
        c = LOAD(hyper, 0)
        D = P.shape[1]
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while e < nuniq * D:
            u = e // D
            j = e - u * D
            r = u if ident else uniq[u]
            if CATCH:
                ca, cb, cc, ce = coef[u, 0], coef[u, 1], coef[u, 2], coef[u, 3]
                if not (ca == 1.0 and cb == 0.0 and cc == 0.0 and ce == 1.0):
                    s = S0[r, j] if U0 else zero
                    p, s = apply_catch_up(P[r, j], s, ca, cb, cc, ce, DT)
                    P[r, j] = p
                    if U0:
                        S0[r, j] = s
            if STEPPING:
                if ident:
                    g = vals[u, j]
                else:
                    a = seg[u]
                    g = vals[order[a], j]
                    for k in range(a + 1, seg[u + 1]):
                        g += vals[order[k], j]
                s0 = S0[r, j] if U0 else zero
                s1 = S1[r, j] if U1 else zero
                s2 = S2[r, j] if U2 else zero
                q, s0, s1, s2 = STEP(P[r, j], g, s0, s1, s2, c, zero)
                P[r, j] = q
                if U0:
                    S0[r, j] = s0
                if U1:
                    S1[r, j] = s1
                if U2:
                    S2[r, j] = s2
            e += stride

    return cuda.jit(rows_kernel)


def make_renorm_kernel(config):
    """``max_norm`` after the rows kernel: ``kernel[blocks, BLOCK_SIZE](P, uniq, hyper,
    nuniq, ident)``, one thread per touched row (grid-stride), the CPU driver's
    :func:`fastopt.rules.fused.renorm_row`."""
    _prepare()
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    EPS = DT(RENORM_EPS)

    def renorm_kernel(P, uniq, hyper, nuniq, ident):
        zero = DT(0)
        c = LOAD(hyper, 0)
        u = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while u < nuniq:
            r = u if ident else uniq[u]
            renorm_row(P[r], c, zero, EPS)
            u += stride

    return cuda.jit(renorm_kernel)


def make_rowwise_kernel(config):
    """The kernel of a row-wise rule (one state value per row), dense or sparse.

    ``kernel[blocks, BLOCK_SIZE](P, S0, vals, order, seg, uniq, scratch, hyper, nuniq,
    ident)``: ``P`` (nrows, D), ``S0`` (nrows,); one thread per touched row ``r``
    (grid-stride), with ``G`` the row's summed gradient (duplicates added in order
    into ``scratch[u]``), as the CPU row-wise driver::

        G = pre(G)                                    # into scratch[u] (grad_scale, clip)
        S0[r] = math(P[r], G, S0[r], 1 / D, 0, c)     # updates P[r] in place
        P[r] = post(P[r]); renorm(P[r])               # l1, clamps; max_norm
    """
    _prepare()
    MATH = config.rule.math
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    SC, CL, L1, LO, HI, MX = (bool(s) for s in config.switches)
    PRE = SC or CL
    POST = L1 or LO or HI
    EPS = DT(RENORM_EPS)

    def rowwise_kernel(P, S0, vals, order, seg, uniq, scratch, hyper, nuniq, ident):
        zero = DT(0)
        c = LOAD(hyper, 0)
        D = P.shape[1]
        inv_d = DT(1) / DT(D)
        u = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while u < nuniq:
            if ident:
                r = u
                G = vals[u]
            else:
                r = uniq[u]
                a = seg[u]
                b = seg[u + 1]
                if b - a > 1:
                    G = scratch[u]
                    first = vals[order[a]]
                    for j in range(D):
                        G[j] = first[j]
                    for k in range(a + 1, b):
                        more = vals[order[k]]
                        for j in range(D):
                            G[j] += more[j]
                else:
                    G = vals[order[a]]
            if PRE:
                buf = scratch[u]
                for j in range(D):
                    buf[j] = pre(G[j], c, SC, CL)
                G = buf
            prow = P[r]
            S0[r] = MATH(prow, G, S0[r], inv_d, zero, c)
            if POST:
                for j in range(D):
                    prow[j] = post(prow[j], c, zero, L1, LO, HI)
            if MX:
                renorm_row(prow, c, zero, EPS)
            u += stride

    return cuda.jit(rowwise_kernel)


def make_count_kernel(config=None):
    """``kernel[blocks, BLOCK_SIZE](a, scale, out)``: adds to ``out[0]`` (int64) the
    number of elements of the 1-D array ``a`` whose ``a[i] / scale`` (``scale`` in
    ``a``'s dtype) is Inf or NaN."""
    _prepare()

    def count_nonfinite(a, scale, out):
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        k = 0
        while e < a.shape[0]:
            x = a[e] / scale
            if x - x != 0:          # Inf - Inf and NaN - NaN are NaN; finite x - x is 0
                k += 1
            e += stride
        if k:
            cuda.atomic.add(out, 0, k)

    return cuda.jit(count_nonfinite)


def make_widen_kernel(config=None):
    """``kernel[blocks, BLOCK_SIZE](bits, out)``: ``out[i] = widen(bits[i])``, 1-D
    uint16 bfloat16 bits to float32 (exact; :func:`fastopt.storage.codecs.widen`).
    Gradients of bfloat16 parameters that must become float32 (a bucket mixing
    bfloat16 and float32 gradients, the row kernels' gradient rows, the non-finite
    scan)."""
    _prepare()
    from ...storage.codecs import widen

    def widen_kernel(bits, out):
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while e < bits.shape[0]:
            out[e] = widen(bits[e])
            e += stride

    return cuda.jit(widen_kernel)

