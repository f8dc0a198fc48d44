"""The ``"cuda"`` backend: optimizer steps on NVIDIA GPUs with Numba ``cuda.jit`` kernels.

Every feature of :data:`fastopt.backends.base.FEATURES`: dense multi-tensor steps,
row-sparse steps (lazy and exact), row-wise rules, the fused options (clipping,
L1, clamps, max-norm), ``grad_scale`` and ``skip_nonfinite``, float32 and float64.

Arrays
------
Parameters are *device* arrays updated in place: anything with
``__cuda_array_interface__`` (numba device arrays, CuPy arrays, torch CUDA tensors)
is viewed without a copy, and must be float32 or float64, C-contiguous and
writeable.  State is allocated on the same device.  Gradients may be device arrays
(used in place; another float dtype or a non-contiguous one is converted on the
device into a new array) or host arrays (NumPy, CPU torch tensors), checked like the
CPU backends check them and copied to the device on every step: correct, but the
copy costs more than the update, so keep gradients on the device.  The values of
a row-sparse gradient are host arrays (copied with the step's plan).
``state_dict()`` returns host NumPy copies and ``load_state_dict`` copies host
arrays to the device, so checkpoints move freely between the CPU and CUDA backends.

Kernels run on numba's default stream.  A gradient whose
``__cuda_array_interface__`` names another stream has that stream synchronized once
per step before the launch (work on the legacy default stream is ordered anyway).

Kernels
-------
Every element-wise kernel updates an element with THE element step of the Numba
drivers, :func:`fastopt.backends.element.element_step` (fused pre-processing, the
rule's math, fused post-processing), fed by the rule's named scalars loaded with
:func:`fastopt.backends.element.scalar_loader`: the same jitable functions the CPU
drivers call, compiled as device functions, so the CUDA backend has every fused
option by construction.  A kernel is a closure over a
:class:`~fastopt.backends.base.Config` (rule, dtype, used slots, fixed scalars,
fused switches): unused slots are never loaded and an option that is off costs
nothing.  Compiled kernels are kept in :data:`_KERNELS` (:func:`kernel_for`).

* ``dense`` (:func:`make_dense_kernel`), the multi-tensor launch of a
  :class:`~fastopt.backends.base.DenseWork`: one launch per bucket, whatever the
  number of tensors.  It reads a pointer table ``tab`` int64 (T, 6) = (param, grad,
  slot 0, slot 1, slot 2 addresses, scalar row) and a chunk table ``chunks`` int64
  (C, 3) = (tensor, start, stop) of at most :data:`CHUNK` elements.  Blocks
  grid-stride over chunks, the threads of a block stride over the chunk's elements
  (coalesced).  Per step the host writes the gradient addresses and the float64
  scalar rows into one host buffer and copies it to the device in one transfer;
  the chunk table stays on the device while the bucket's pointer table lives.
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

``error_model`` and fastmath are numba-cuda's defaults (no fast-math flags: IEEE
``sqrt.rn`` and ``div.rn``, NaN/Inf propagate).  The CUDA compiler contracts
``a * b + c`` into FMA, so results agree with the CPU backends to rounding, not
bit for bit (in the simulator they are usually identical).  Launch settings
(module attributes, read at every launch): :data:`BLOCK_SIZE`, :data:`CHUNK`,
:data:`MAX_BLOCKS` (``None``: 32 blocks per multiprocessor).  Tests set a small
block size and grid so that several blocks run and the grid-stride loops wrap.

Known numba-cuda gap: its CUDA target has no lowering for the NumPy scalar ufuncs
``np.sqrt`` and ``np.abs`` that :mod:`fastopt.rules` uses (numba-cuda 0.30: a
``KeyError`` while compiling).  :func:`_ensure_scalar_ufuncs` adds the float32 /
float64 loops, implemented by the target's own ``math.sqrt`` / ``math.fabs`` (IEEE
``sqrt.rn`` and ``abs``), when they are missing.

Importing this module is cheap (numba.cuda is imported on first use);
:func:`register_lazily` is what ``import fastopt`` calls.
"""

import importlib.util
import math
import weakref

import numpy as np

from ..arrays import FLOAT_DTYPES, as_grad
from ..rules import NSLOTS
from ..rules.fused import RENORM_EPS, post, pre, renorm_row
from .base import Backend
from .element import apply_catch_up, element_step, scalar_loader
from .numba_cpu import make_chunks

#: threads per block
BLOCK_SIZE = 256
#: elements per chunk of the dense multi-tensor launch
CHUNK = 1 << 13
#: most blocks in one launch (grid-stride loops cover the rest); None: 32 per SM
MAX_BLOCKS = None

cuda = None          # numba.cuda, set by _load()
_SIM = False         # running under NUMBA_ENABLE_CUDASIM=1
_KERNELS = {}        # (kind, config, extra, simulator) -> cuda.jit kernel
_VIEWS = {}          # dtype -> device function: address -> pointer / array
_PLANS = {}          # id(DenseWork.ptrs) -> (weak reference to ptrs, _DensePlan)
_DEFAULT_MAX_BLOCKS = None
_UFUNCS_PATCHED = False
TAB_COLS = 2 + NSLOTS + 1   # param, grad, slots, scalar row


def _load():
    """Import numba.cuda (numba-cuda) once; returns it or raises ImportError."""
    global cuda, _SIM
    if cuda is None:
        if importlib.util.find_spec("numba_cuda") is None:
            raise ImportError("No module named 'numba_cuda'")
        from numba import cuda as _cuda
        from numba.cuda import config
        _SIM = bool(config.ENABLE_CUDASIM)
        cuda = _cuda
    return cuda


# ------------------------------------------------------------------ device arrays

def is_device(obj):
    """A device array: anything with ``__cuda_array_interface__`` and numba device
    arrays (the simulator's have no interface)."""
    return not isinstance(obj, np.ndarray) and (
        hasattr(obj, "__cuda_array_interface__") or getattr(obj, "__cuda_ndarray__", False))


def _is_numba(obj):
    return getattr(obj, "__cuda_ndarray__", False)


def _import_device(obj):
    """A numba device array viewing ``obj``'s memory (no copy)."""
    if _is_numba(obj):
        return obj
    if not _SIM:
        return cuda.as_cuda_array(obj)
    return _sim_from_cai(obj)


def _sim_from_cai(obj):
    """Simulator: view a ``__cuda_array_interface__`` object (whose "device" pointer is
    a host pointer there) as a simulated device array, without a copy."""
    import ctypes

    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    cai = obj.__cuda_array_interface__
    ptr, readonly = cai["data"]
    dtype = np.dtype(cai["typestr"])
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    size = int(np.prod(shape, dtype=np.int64))
    if strides is None:
        extent = size * dtype.itemsize
    else:
        extent = (dtype.itemsize + sum((n - 1) * abs(s) for n, s in zip(shape, strides))
                  if size else 0)
    buf = (ctypes.c_char * max(extent, 1)).from_address(ptr) if ptr else bytearray(1)
    arr = np.ndarray(shape, dtype=dtype, buffer=buf, strides=strides)
    arr.flags.writeable = not readonly
    fake = FakeCUDAArray(arr)
    fake._owner = obj            # keep the exporter (and its memory) alive
    return fake


def _describe(obj):
    """(shape, dtype, C-contiguous, read-only, address, stream) of a device array,
    read from its ``__cuda_array_interface__`` (or the simulator's array)."""
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is None:                                   # simulator array
        a = obj._ary
        return (a.shape, a.dtype, a.flags.c_contiguous, not a.flags.writeable,
                int(a.ctypes.data), None)
    shape = tuple(cai["shape"])
    dtype = np.dtype(cai["typestr"])
    contig = _contiguous(shape, cai.get("strides"), dtype.itemsize)
    ptr, readonly = cai["data"]
    return shape, dtype, contig, bool(readonly), int(ptr or 0), cai.get("stream")


def _contiguous(shape, strides, item):
    """C-contiguity from a shape and byte strides (dimensions of length 1 may have
    any stride; an empty array is contiguous)."""
    if strides is None or 0 in shape:
        return True
    acc = item
    for n, st in zip(reversed(shape), reversed(strides)):
        if n != 1 and st != acc:
            return False
        acc *= n
    return True


def _address(a):
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        return int(cai["data"][0] or 0)
    return int(a._ary.ctypes.data)              # simulator: host memory


def _max_blocks():
    global _DEFAULT_MAX_BLOCKS
    if MAX_BLOCKS is not None:
        return max(1, int(MAX_BLOCKS))
    if _DEFAULT_MAX_BLOCKS is None:
        sms = None if _SIM else cuda.get_current_device().MULTIPROCESSOR_COUNT
        _DEFAULT_MAX_BLOCKS = 32 * sms if sms else 64
    return _DEFAULT_MAX_BLOCKS


def _blocks(n_units, per_block=1):
    """Blocks for ``n_units`` work units of ``per_block`` each, capped by MAX_BLOCKS."""
    return max(1, min(-(-n_units // per_block), _max_blocks()))


# ---------------------------------------------------------------------- kernels

def _ensure_scalar_ufuncs():
    """Give numba-cuda's CUDA target float32/float64 loops for ``np.sqrt`` and
    ``np.abs`` on scalars when it lacks them (see the module docstring)."""
    global _UFUNCS_PATCHED
    if _SIM or _UFUNCS_PATCHED:
        return
    from numba.cuda import ufuncs as cu_ufuncs
    db = cu_ufuncs.ufunc_db()      # fails loudly if numba-cuda's layout changed

    def via(fn):
        def impl(context, builder, sig, args):
            return context.get_function(fn, sig)(builder, args)
        return impl
    for uf, fn in ((np.sqrt, math.sqrt), (np.absolute, math.fabs)):
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
    if _SIM:
        ctype = np.ctypeslib.as_ctypes_type(dtype)

        def fn(addr, n):
            return np.ctypeslib.as_array((ctype * int(n)).from_address(int(addr)))
    else:
        from numba.cuda import types as nbt
        from numba.cuda.extending import intrinsic
        elem = {"<f4": nbt.float32, "<f8": nbt.float64}[dtype.str]

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
    _load()
    _ensure_scalar_ufuncs()


def make_dense_kernel(config):
    """The multi-tensor kernel of an element-wise rule configuration.

    ``kernel[blocks, BLOCK_SIZE](tab, chunks, hyper)`` with ``tab`` int64 (T, 6):
    param, grad, slot 0..2 addresses (unused slots: any address, never touched) and
    the tensor's scalar row; ``chunks`` int64 (C, 3): (tensor, start, stop);
    ``hyper`` float64 (R, NSCALARS).  For every element ``i`` of every chunk::

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

    def dense_kernel(tab, chunks, hyper):
        zero = DT(0)
        ci = cuda.blockIdx.x
        while ci < chunks.shape[0]:
            t = chunks[ci, 0]
            hi = chunks[ci, 2]
            P = VIEW(tab[t, 0], hi)
            G = VIEW(tab[t, 1], hi)
            A0 = VIEW(tab[t, 2], hi)
            A1 = VIEW(tab[t, 3], hi)
            A2 = VIEW(tab[t, 4], hi)
            c = LOAD(hyper, tab[t, 5])
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


_FACTORIES = {"dense": make_dense_kernel, "rows": make_rows_kernel,
              "renorm": make_renorm_kernel, "rowwise": make_rowwise_kernel,
              "finite": make_count_kernel}


def kernel_for(kind, config, *extra):
    """The compiled kernel of ``kind`` ("dense", "rows", "renorm", "rowwise",
    "finite") for a :class:`~fastopt.backends.base.Config` (cached); ``extra``: the
    rows kernel's (catch, step) flags."""
    key = (kind, config, extra, _SIM)
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = _FACTORIES[kind](config, *extra)
    return k


class _DensePlan:
    """Device tables of one bucket: chunk table (fixed), and a buffer holding the
    pointer table and the per-step scalars, refreshed by one copy per step."""

    def __init__(self, work):
        T, (R, NS) = work.ptrs.shape[0], work.hyper.shape
        sizes = [int(np.prod(_describe(p)[0], dtype=np.int64)) for p in work.params]
        self.key = (T, R, NS, CHUNK, tuple(sizes))
        chunks = make_chunks(sizes, CHUNK)
        self.nchunks = chunks.shape[0]
        self.chunks = cuda.to_device(chunks) if self.nchunks else None
        self.host = np.zeros(T * TAB_COLS + R * NS, dtype=np.int64)
        self.tab = self.host[:T * TAB_COLS].reshape(T, TAB_COLS)
        self.tab[:, TAB_COLS - 1] = work.hidx
        self.hyper = self.host[T * TAB_COLS:].view(np.float64).reshape(R, NS)
        self.dev = cuda.device_array(self.host.shape, dtype=np.int64)
        self.dtab = self.dev[:T * TAB_COLS].reshape(T, TAB_COLS)
        self.dhyper = self.dev[T * TAB_COLS:].view(np.float64).reshape(R, NS)


def _dense_plan(work):
    """The device plan of a bucket, kept while its pointer table lives (the copies
    :func:`fastopt.planner.fill_bucket` makes for ``grad_scale`` share it)."""
    ptrs = work.ptrs
    key = id(ptrs)
    T, (R, NS) = ptrs.shape[0], work.hyper.shape
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is ptrs and hit[1].key[:4] == (T, R, NS, CHUNK):
        return hit[1]
    plan = _DensePlan(work)
    _PLANS[key] = (weakref.ref(ptrs), plan)
    weakref.finalize(ptrs, _forget_plan, key, plan)
    return plan


def _forget_plan(key, plan):
    hit = _PLANS.get(key)
    if hit is not None and hit[1] is plan:
        del _PLANS[key]


def _rows_plan(work, nuniq, ident, catch):
    """One host-to-device copy of a row step's float64 scalars, catch-up maps and
    int64 plan.  Returns device (order, seg, uniq, coef, hyper); order/seg/uniq are
    stand-ins where not read (``ident``, or a catch-up only), coef where ``catch`` is
    off."""
    hyper = np.ascontiguousarray(work.hyper, dtype=np.float64)
    R, NS = hyper.shape
    parts = [hyper.reshape(-1).view(np.int64)]
    if catch:
        coef = np.ascontiguousarray(work.catch.coef, dtype=np.float64)
        parts.append(coef.reshape(-1).view(np.int64))
    ints = []
    if not ident:
        if work.vals is not None:
            ints = [np.asarray(work.order, np.int64), np.asarray(work.seg, np.int64)]
        ints.append(np.asarray(work.uniq, np.int64))
    dev = cuda.to_device(np.concatenate(parts + ints))
    at = R * NS
    dhyper = dev[:at].view(np.float64).reshape(R, NS)
    dcoef = dhyper
    if catch:
        dcoef = dev[at:at + 4 * nuniq].view(np.float64).reshape(nuniq, 4)
        at += 4 * nuniq
    order = seg = uniq = dev[:1]
    if not ident:
        if work.vals is not None:
            n_o, n_s = work.order.shape[0], work.seg.shape[0]
            order, seg = dev[at:at + n_o], dev[at + n_o:at + n_o + n_s]
            at += n_o + n_s
        uniq = dev[at:at + nuniq]
    return order, seg, uniq, dcoef, dhyper


# ---------------------------------------------------------------------- backend

class CudaBackend(Backend):
    """Runs optimizer steps on device arrays with ``cuda.jit`` kernels; provides the
    array methods of :class:`fastopt.backends.base.Backend` for device arrays.  Every
    feature of :data:`fastopt.backends.base.FEATURES`."""

    name = "cuda"
    memory = "device"

    def __init__(self):
        _load()

    # -------------------------------------------------------------- arrays
    def as_param(self, obj, where):
        """View ``obj`` as a device array that can be updated in place, or raise."""
        if isinstance(obj, (list, tuple)) or np.isscalar(obj) or obj is None:
            raise TypeError(f"{where}: expected an array, got {type(obj).__name__}")
        if not is_device(obj):
            raise TypeError(f"{where}: backend 'cuda' updates device arrays in place (objects "
                            "with __cuda_array_interface__: numba device arrays, CuPy arrays, "
                            f"torch CUDA tensors); got host {type(obj).__name__}. Move it to "
                            "the GPU or use a CPU backend")
        shape, dt, contig, readonly, _, _ = _describe(obj)
        if dt not in FLOAT_DTYPES or not dt.isnative:
            raise TypeError(f"{where}: dtype {dt} is not supported "
                            "(float32 or float64, native byte order)")
        if readonly:
            raise ValueError(f"{where}: the array is read-only; an optimizer updates it in place")
        if not contig:
            raise ValueError(f"{where}: the array is not C-contiguous; fastopt updates "
                             "contiguous memory in place, pass a contiguous array")
        return _import_device(obj)

    def _convert(self, g, p):
        """A contiguous device copy of device array ``g`` in ``p``'s dtype."""
        d = _import_device(g)
        out = cuda.device_array(p.shape, dtype=p.dtype)
        if out.size:
            if out.ndim == 0:
                out = cuda.to_device(np.asarray(d.copy_to_host(), dtype=p.dtype))
            else:
                out[:] = d          # numba's assignment kernel: strided read, cast
        return out

    def check_grads(self, dense, plist, active):
        """Check every gradient (type, shape, dtype) and convert where needed: device
        gradients of another float dtype or layout are converted on the device, host
        gradients are checked as on the CPU and copied over.  Returns (arrays,
        int64 addresses); writes no parameter or state.  Streams named by the
        gradients are synchronized (once each) before returning."""
        out = list(dense)
        addr = np.empty(len(dense), dtype=np.int64)
        streams = set()
        for k, (g, p) in enumerate(zip(dense, plist)):
            where = f"gradient {active[k]}"
            if not is_device(g):
                d = cuda.to_device(as_grad(g, p, where))
                out[k], addr[k] = d, _address(d)
                continue
            shape, dt, contig, _, ptr, stream = _describe(g)
            if dt.kind != "f":
                raise TypeError(f"{where}: gradient dtype {dt} is not a float dtype")
            if tuple(shape) != tuple(p.shape):
                raise ValueError(f"{where}: gradient shape {tuple(shape)} does not match "
                                 f"parameter shape {tuple(p.shape)}")
            if stream not in (None, 1, 2):
                streams.add(stream)
            if dt != p.dtype or not contig:
                out[k] = self._convert(g, p)
                ptr = _address(out[k])
            elif not hasattr(g, "reshape"):
                out[k] = _import_device(g)
            addr[k] = ptr
        for s in streams:
            cuda.external_stream(s).synchronize()
        return out, addr

    def all_finite(self, arrays, grad_scale=None):
        """True when no array (divided by ``grad_scale``, in its dtype) holds an Inf or
        NaN: device arrays by the ``finite`` kernel (one int64 counter, read back once),
        host arrays (sparse values) by the base class, on the CPU."""
        on_host = [a for a in arrays if not is_device(a)]
        if on_host and not super().all_finite(on_host, grad_scale):
            return False
        count = None
        for a in arrays:
            if not is_device(a):
                continue
            d = _import_device(a)
            shape, dt, contig, _, _, _ = _describe(d)
            n = int(np.prod(shape, dtype=np.int64))
            if not n:
                continue
            if not contig:
                flat = cuda.device_array(shape, dtype=dt)
                flat[:] = d
                d = flat
            if count is None:
                count = cuda.to_device(np.zeros(1, dtype=np.int64))
            scale = dt.type(1.0 if grad_scale is None else grad_scale)
            kernel_for("finite", None)[_blocks(n, BLOCK_SIZE), BLOCK_SIZE](
                d.reshape(n), scale, count)
        return count is None or int(count.copy_to_host()[0]) == 0

    def full(self, shape, value, dtype):
        out = cuda.device_array(shape, dtype=dtype)
        n = int(np.prod(shape, dtype=np.int64))
        if n:
            out.reshape(n)[:] = value
        return out

    def address(self, a):
        """The data address of a device array (of a host array: its host address;
        with unified virtual addressing the two never overlap)."""
        if isinstance(a, np.ndarray):
            return int(a.ctypes.data)
        return _address(a)

    def to_host(self, a):
        return _import_device(a).copy_to_host()

    def from_host(self, a, like):
        return cuda.to_device(np.ascontiguousarray(a, dtype=like.dtype))

    def _device_rows(self, a, D, dtype):
        """Gradient rows as a device (n, D) array: host arrays are copied over."""
        if is_device(a):
            d = _import_device(a)
            return d.reshape(int(np.prod(_describe(d)[0], dtype=np.int64)) // D, D)
        h = np.ascontiguousarray(a, dtype=dtype)
        return cuda.to_device(h.reshape(h.size // D, D))

    # --------------------------------------------------------------- steps
    def run_dense(self, work):
        """A dense step of an element-wise rule over a bucket: one launch."""
        if not work.nelem:
            return
        plan = _dense_plan(work)
        plan.tab[:, :TAB_COLS - 1] = work.ptrs
        plan.hyper[:] = work.hyper
        plan.dev.copy_to_device(plan.host)
        kernel = kernel_for("dense", work.config)
        kernel[_blocks(plan.nchunks), BLOCK_SIZE](plan.dtab, plan.chunks, plan.dhyper)

    def run_rows(self, work):
        """The row step of one parameter (a row-sparse gradient, a dense step of a
        row-wise rule or of a max_norm group, or exact mode's catch-up): one launch
        (two with max_norm).  Indices were validated and the coalescing plan computed
        on the host by the planner."""
        cfg = work.config
        if work.catch is not None and work.catch.coef is None:
            raise ValueError("exact-mode work without its catch-up maps")
        p = work.param
        shape = _describe(p)[0]
        nrows = shape[0]
        D = int(np.prod(shape[1:], dtype=np.int64))
        nuniq = int(work.uniq.shape[0])
        if nuniq == 0 or D == 0:
            return
        P = _import_device(p).reshape(nrows, D)
        stepping = work.vals is not None
        catch = work.catch is not None
        ident = stepping and work.order is work.uniq and nuniq == nrows
        order, seg, uniq, coef, hyper = _rows_plan(work, nuniq, ident, catch)
        vals = self._device_rows(work.vals, D, P.dtype) if stepping else P
        if cfg.rule.layout == "rowwise":
            if not stepping:
                return                       # no closed form: never a catch-up here
            dups = not ident and work.order.shape[0] > nuniq
            pre_on = cfg.switches[0] or cfg.switches[1]
            scratch = cuda.device_array((nuniq if (dups or pre_on) else 1, D), dtype=P.dtype)
            S0 = _import_device(work.slots[0]).reshape(nrows)
            kernel_for("rowwise", cfg)[_blocks(nuniq, BLOCK_SIZE), BLOCK_SIZE](
                P, S0, vals, order, seg, uniq, scratch, hyper, nuniq, ident)
            return
        S = [_import_device(s).reshape(nrows, D) if s is not None else P for s in work.slots]
        kernel_for("rows", cfg, catch, stepping)[_blocks(nuniq * D, BLOCK_SIZE), BLOCK_SIZE](
            P, S[0], S[1], S[2], vals, order, seg, uniq, coef, hyper, nuniq, ident)
        if stepping and cfg.switches[5]:
            kernel_for("renorm", cfg)[_blocks(nuniq, BLOCK_SIZE), BLOCK_SIZE](
                P, uniq, hyper, nuniq, ident)


_BACKEND = None


def register_backend():
    """Register ``"cuda"`` with :mod:`fastopt.backends` (idempotent).

    Available when numba-cuda imports and ``numba.cuda.is_available()`` (a GPU with a
    driver, or the simulator under ``NUMBA_ENABLE_CUDASIM=1``); otherwise the reason
    is recorded, so that ``backend="cuda"`` raises a clear error.  Returns the
    backend or None.
    """
    global _BACKEND
    if _BACKEND is None:
        try:
            cu = _load()
        except ImportError as exc:
            _backends().register("cuda", reason=(
                f"numba-cuda is not installed ({exc}); install it with "
                "pip install 'fastopt[cuda]' (or pip install numba-cuda)"))
            return None
        except Exception as exc:     # noqa: BLE001 (a broken install: say so, do not crash)
            _backends().register("cuda", reason=f"numba-cuda failed to load: "
                                             f"{type(exc).__name__}: {exc}")
            return None
        if not cu.is_available():
            why = ""
            try:
                err = cu.cuda_error()
                why = f" ({' '.join(str(err).split())})" if err else ""
            except Exception:        # noqa: BLE001 (only decorates the message)
                pass
            _backends().register("cuda", reason=(
                "numba-cuda found no usable CUDA GPU or driver on this machine"
                f"{why}; set NUMBA_ENABLE_CUDASIM=1 before importing numba.cuda to run "
                "the CUDA kernels in numba's simulator (slow, for testing)"))
            return None
        _BACKEND = CudaBackend()
    _backends().register("cuda", _BACKEND)
    return _BACKEND


class _LazyBackends(dict):
    """``fastopt.backends._BACKENDS`` with the CUDA backend registered on first
    request (``resolve``, ``available``, ``in``), so that ``import fastopt`` does not
    import numba.cuda (about 0.3 s)."""

    _tried = False

    def _load_cuda(self):
        if not self._tried:
            self._tried = True
            register_backend()

    def __missing__(self, key):
        if key == "cuda" and not self._tried:
            self._load_cuda()
            if dict.__contains__(self, key):
                return dict.__getitem__(self, key)
        raise KeyError(key)

    def __contains__(self, key):
        if key == "cuda":
            self._load_cuda()
        return dict.__contains__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __iter__(self):
        self._load_cuda()
        return dict.__iter__(self)

    def keys(self):
        self._load_cuda()
        return dict.keys(self)


def register_lazily():
    """What ``import fastopt`` calls: without numba-cuda, record the reason at once
    (cheap); with it, register on first request (see :class:`_LazyBackends`)."""
    if importlib.util.find_spec("numba_cuda") is None:
        _backends().register("cuda", reason=(
            "numba-cuda is not installed; install it with pip install 'fastopt[cuda]' "
            "(or pip install numba-cuda)"))
        return
    if not isinstance(_backends()._BACKENDS, _LazyBackends):
        _backends()._BACKENDS = _LazyBackends(_backends()._BACKENDS)


def _backends():
    from .. import backends
    return backends
