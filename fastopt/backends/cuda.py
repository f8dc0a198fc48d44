"""The ``"cuda"`` backend: optimizer steps on NVIDIA GPUs with Numba ``cuda.jit`` kernels.

Every feature of :data:`fastopt.backends.base.FEATURES`: dense multi-tensor steps,
row-sparse steps (lazy and exact), row-wise rules, the fused options (clipping, L1,
clamps, max-norm), ``grad_scale`` and ``skip_nonfinite``, float32 and float64, and
the stored formats of :mod:`fastopt.storage` (``state_bits=16`` and ``8``; float32
state of float64 parameters; bfloat16 parameters, uint16 device arrays marked with
:func:`bfloat16`), see "Stored formats" below.

Arrays
------
Parameters are *device* arrays updated in place: anything with
``__cuda_array_interface__`` (numba device arrays, CuPy arrays, torch CUDA tensors)
is viewed without a copy, and must be float32 or float64 (or bfloat16 bits marked
with :func:`bfloat16`), C-contiguous and writeable.  State is allocated on the
same device.  Gradients may be device arrays (used in place; another float dtype
or a non-contiguous one is converted on the device into a new array) or host
arrays (NumPy, CPU torch tensors), checked like the CPU backends check them and
copied to the device on every step: correct, but the copy costs more than the
update, so keep gradients on the device.  The values of a row-sparse gradient are
host arrays (copied with the step's plan).
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
``np.sqrt`` and ``np.abs`` that :mod:`fastopt.rules` uses, nor ``np.floor`` that the
8-bit codecs use (numba-cuda 0.30: a ``KeyError`` while compiling).
:func:`_ensure_scalar_ufuncs` adds the float32 / float64 loops, implemented by the
target's own ``math.sqrt`` / ``math.fabs`` / ``math.floor`` (IEEE ``sqrt.rn``, ``abs``,
``floor``), when they are missing.

Stored formats
--------------
The state may be stored in another format than the parameter's dtype
(:mod:`fastopt.storage`): bfloat16 (``state_bits=16``), block-wise 8-bit
(``state_bits=8``: uint8 codes and float32 ``<slot>_absmax`` block scales), or float32
for float64 and bfloat16 parameters.  Features ``state16``, ``state8`` and
``bfloat16``.  bfloat16 *state* lives on the device as uint16 arrays of the bits,
allocated by :meth:`CudaBackend.full` (asked for ``ml_dtypes.bfloat16`` by
:func:`fastopt.storage.initial_arrays`) and marked as bfloat16 (:func:`is_bf16_state`),
so ``to_host`` (``state_dict``) returns ``ml_dtypes.bfloat16`` arrays, as the CPU
backends store, and ``from_host`` with a bfloat16 ``like`` uploads the bits.

bfloat16 *parameters*: numba device arrays cannot hold ``ml_dtypes.bfloat16``, torch
refuses ``__cuda_array_interface__`` for bfloat16 tensors, and a bare uint16 device
array is ambiguous (it is also valid data of its own).  So a uint16 device array is a
bfloat16 parameter only when the user marks it: :func:`bfloat16` takes anything with
``__cuda_array_interface__`` (or a numba device array) of dtype uint16 or int16,
C-contiguous (``bfloat16(torch_bf16.view(torch.int16))``, a CuPy or numba uint16
array) and returns a numba uint16 device view of the same memory marked the way
bfloat16 state is.  Unmarked uint16 / int16 arrays and float16 are refused by
:meth:`CudaBackend.as_param`, with a message naming :func:`bfloat16`.  The optimizer
holds a marked parameter as a :class:`_BF16Param` (``dtype`` ``ml_dtypes.bfloat16``,
so the planner picks the same bfloat16 formats as on the CPU; ``bits``: the uint16
array the kernels update in place).  All ``bf16_update`` modes: ``"split"`` (aux
``master_low``, uint16), ``"kahan"`` (aux ``kahan_comp``, bfloat16 state),
``"stochastic"`` (the counter-based stream of ``(seed, parameter, step, element)``:
the planner's key, indexed by the element's flat index in the tensor plus its
element base, so results do not depend on the launch shape or on sharding) and ``"nearest"``; the format's load/store functions
are those of :mod:`fastopt.storage.io` the CPU drivers use.  Gradients of a bfloat16
parameter: marked bfloat16 device arrays or float32 device arrays (other float
dtypes are converted to float32 on the device), or host bfloat16 / float32 arrays;
where one step has both bfloat16 and float32 gradients of bfloat16 parameters, the
bfloat16 ones are widened to float32 (``widen`` kernel, exact) so each bucket reads
one gradient dtype, as the CPU planner does.  Row kernels read gradient rows in
float32 (dense bfloat16 rows of ``max_norm`` and row-wise steps are widened first),
and ``skip_nonfinite`` scans bfloat16 gradients widened.  ``state_dict`` gives the
CPU backends' arrays and dtypes (``master_low`` uint16, ``kahan_comp``
``ml_dtypes.bfloat16``, bfloat16 / uint8 / float32 slots), ``to_host`` of a parameter
gives an ``ml_dtypes.bfloat16`` array, and checkpoints move between backends.

The kernels are the Numba CPU stored drivers
(:func:`fastopt.backends.numba_cpu.make_stored_dense_driver` and friends) with their
loops split over threads: the same jitable load/store functions of
:mod:`fastopt.storage.io` and codecs of :mod:`fastopt.storage.codecs` around the
same element step, in the same order, so the results equal the CPU backend's (bit
for bit in the simulator, ``tests/test_cuda_storage.py``; on a GPU to FMA
contraction, as above: an 8-bit code may then differ by one step at a rounding tie).

* ``stored_dense`` (:func:`make_stored_dense_kernel`): the planner's format table
  ``fmt`` travels with the pointer table and scalars in one copy per step.  Without
  8-bit state one thread per element (chunks of :data:`CHUNK` elements); with 8-bit
  state one thread per 8-bit block of :data:`fastopt.storage.Q8_BLOCK` elements
  (chunks of :data:`BLOCK_SIZE` blocks): it steps the block's elements, keeps the
  new state values in a local buffer and their largest finite magnitude, writes
  that as the block's scale and encodes the buffer.  No atomics, no reduction across
  threads.
* ``stored_rows`` (:func:`make_stored_rows_kernel`): row steps of element-wise rules
  (lazy and exact, catch-up-only flushes); units are elements, 8-bit blocks of a
  touched row, or with ``max_norm`` whole rows (stepped into a compute-dtype row
  buffer, renormalized, then stored).
* ``stored_rowwise`` (:func:`make_stored_rowwise_kernel`): row-wise rules with
  bfloat16 parameters or float32 per-row state of float64 parameters, one thread
  per touched row.
* ``widen`` (:func:`make_widen_kernel`): bfloat16 bits to float32, for gradients.

A thread per 8-bit block (and per row with ``max_norm``) is the simple, correct
first version: its memory accesses are not coalesced.  A faster layout would give
each 8-bit block a thread block (a thread per element, a shared-memory max
reduction, which is exact in any order).

Importing this module imports numba, not numba.cuda (that happens on first use);
``import fastopt`` does not import it (:mod:`fastopt.backends` loads it on the first
request for the backend, when numba-cuda is installed).
"""

import importlib.util
import math
import weakref

import numpy as np

from .._jit import numba as _numba, register_jitable

_numba()   # a kernel module: numba now (and the registrations pending in fastopt._jit)

from ..arrays import FLOAT_DTYPES, as_grad
from ..rules import NSLOTS
from ..rules.fused import RENORM_EPS, post, pre, renorm_row
from ..storage import Q8_BLOCK, bf16, is_bf16
from ..storage.codecs import scale_inverse
from .base import FEATURES, Backend, make_chunks
from .element import apply_catch_up, element_step, scalar_loader

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
    if isinstance(obj, _BF16Param):
        return True
    return not isinstance(obj, np.ndarray) and (
        hasattr(obj, "__cuda_array_interface__") or getattr(obj, "__cuda_ndarray__", False))


def _is_numba(obj):
    return getattr(obj, "__cuda_ndarray__", False)


def _import_device(obj):
    """A numba device array viewing ``obj``'s memory (no copy); a bfloat16 parameter
    gives its (marked) uint16 bits."""
    if isinstance(obj, _BF16Param):
        return obj.bits
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
    read from its ``__cuda_array_interface__`` (or the simulator's array).  A bfloat16
    parameter is described by its uint16 bits."""
    if isinstance(obj, _BF16Param):
        obj = obj.bits
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
    if isinstance(a, _BF16Param):
        a = a.bits
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
    """Give numba-cuda's CUDA target float32/float64 loops for ``np.sqrt``,
    ``np.abs`` and ``np.floor`` (the 8-bit codecs) on scalars when it lacks them (see
    the module docstring)."""
    global _UFUNCS_PATCHED
    if _SIM or _UFUNCS_PATCHED:
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
    if _SIM:
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


def make_norms_kernel(config):
    """The norm pass of a per-tensor rule (LAMB, LARS) over a bucket.

    ``kernel[blocks, BLOCK_SIZE](tab, chunks, hyper, part)``: one thread block per
    chunk (grid-stride); each thread sums, in float64, the squares of the rule's two
    ``norms`` values over its strided elements (after the gradient options), then
    the block adds the threads' sums in a fixed tree in shared memory and thread 0
    writes ``part[ci] = (sum x^2, sum y^2)``.  The host adds the chunks of each
    tensor in chunk order.  Deterministic (fixed block size and tree), but not the
    CPU's summation order: the norms agree with the CPU backends to rounding."""
    _prepare()
    NORMS = config.rule.norms
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    VIEW = _view_fn(config.dtype)
    DT = np.dtype(config.dtype).type
    U0, U1, U2 = (bool(u) for u in config.uses)
    SC, CL = bool(config.switches[0]), bool(config.switches[1])
    NT = BLOCK_SIZE

    def norms_kernel(tab, chunks, hyper, part):
        zero = DT(0)
        sa = cuda.shared.array(NT, np.float64)
        sb = cuda.shared.array(NT, np.float64)
        tid = cuda.threadIdx.x
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
    from ..storage.codecs import widen

    def widen_kernel(bits, out):
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while e < bits.shape[0]:
            out[e] = widen(bits[e])
            e += stride

    return cuda.jit(widen_kernel)


# ------------------------------------------------------------- stored formats
#
# Kernels for state not kept in the parameter's dtype (fastopt.storage): bfloat16
# state (uint16 bits on the device), 8-bit block-quantized state (uint8 codes and
# float32 block scales), float32 state of float64 parameters.  They are the Numba
# CPU stored drivers (fastopt.backends.numba_cpu.make_stored_*_driver) with the
# loops split over threads: the same jitable load/store functions
# (fastopt.storage.io) around the same element step, the same order of
# operations, so results equal the CPU backend's (bit for bit in the simulator).

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
    from ..storage import io
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

    ``kernel[blocks, BLOCK_SIZE](tab, fmt, chunks, hyper)``: ``tab`` as the dense
    kernel's, ``fmt`` int64 (T, FMT_COLS) the planner's format table
    (:data:`fastopt.backends.base.FMT_AUX` ...), ``chunks`` int64 (C, 3) rows
    ``(tensor, lo, hi)``.  Without 8-bit state ``lo:hi`` are elements, one thread per
    element (the format has no block structure).  With 8-bit state they are 8-bit
    blocks (block ``kb``: row ``kb // nb``, elements ``(kb % nb) * Q8_BLOCK`` on of
    that row), one thread per block: it steps the block's elements, keeps the new
    state values in a local buffer and their largest finite magnitude, writes that
    as the block's scale and encodes the buffer (the CPU driver's order)."""
    _prepare()
    from ..storage.codecs import magnitude
    from .base import FMT_AUX, FMT_BASE, FMT_KEY, FMT_N, FMT_NB, FMT_NSCALE, FMT_ROW, FMT_SCALE
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
    FA, FS, FN, FR, FB, FC, FK = FMT_AUX, FMT_SCALE, FMT_N, FMT_ROW, FMT_NB, FMT_NSCALE, FMT_KEY
    FE = FMT_BASE

    def stored_dense_kernel(tab, fmt, chunks, hyper):
        zero = CT(0)
        b0 = cuda.local.array(NBUF, CT)
        b1 = cuda.local.array(NBUF, CT)
        b2 = cuda.local.array(NBUF, CT)
        ci = cuda.blockIdx.x
        while ci < chunks.shape[0]:
            t = chunks[ci, 0]
            hi = chunks[ci, 2]
            n = fmt[t, FN]
            key = np.uint32(fmt[t, FK])
            base = fmt[t, FE]
            c = LOAD(hyper, tab[t, 5])
            P = VP(tab[t, 0], n)
            G = VG(tab[t, 1], n)
            S0 = VS(tab[t, 2], n)
            S1 = VS(tab[t, 3], n)
            S2 = VS(tab[t, 4], n)
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
    from ..storage.codecs import magnitude
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


_FACTORIES = {"dense": make_dense_kernel, "norms": make_norms_kernel,
              "rows": make_rows_kernel,
              "renorm": make_renorm_kernel, "rowwise": make_rowwise_kernel,
              "finite": make_count_kernel, "widen": make_widen_kernel,
              "stored_dense": make_stored_dense_kernel,
              "stored_rows": make_stored_rows_kernel,
              "stored_rowwise": make_stored_rowwise_kernel}


def kernel_for(kind, config, *extra):
    """The compiled kernel of ``kind`` ("dense", "rows", "renorm", "rowwise",
    "finite", "widen", "stored_dense", "stored_rows", "stored_rowwise") for a
    :class:`~fastopt.backends.base.Config` (cached); ``extra``: the rows kernels'
    (catch, step) flags."""
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
        self.host_chunks = chunks
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


class _StoredPlan:
    """Device tables of a stored-format bucket: the chunk table (fixed), and one
    buffer holding the pointer table, the format table and the per-step scalars
    (one copy per step).  Chunks are elements (:data:`CHUNK` a chunk) or, with 8-bit
    state, 8-bit blocks (:data:`BLOCK_SIZE` a chunk: a thread per block)."""

    def __init__(self, work):
        from .base import FMT_COLS, FMT_NSCALE
        T, (R, NS) = work.ptrs.shape[0], work.hyper.shape
        q8 = work.config.storage.state == "q8"
        if q8:
            units = [int(n) for n in work.fmt[:, FMT_NSCALE]]
            per = BLOCK_SIZE
        else:
            units = [int(np.prod(_describe(p)[0], dtype=np.int64)) for p in work.params]
            per = CHUNK
        self.key = (T, R, NS, q8, per, tuple(units))
        chunks = make_chunks(units, per)
        self.nchunks = chunks.shape[0]
        self.chunks = cuda.to_device(chunks) if self.nchunks else None
        nt, nf = T * TAB_COLS, T * FMT_COLS
        self.host = np.zeros(nt + nf + R * NS, dtype=np.int64)
        self.tab = self.host[:nt].reshape(T, TAB_COLS)
        self.tab[:, TAB_COLS - 1] = work.hidx
        self.fmt = self.host[nt:nt + nf].reshape(T, FMT_COLS)
        self.hyper = self.host[nt + nf:].view(np.float64).reshape(R, NS)
        self.dev = cuda.device_array(self.host.shape, dtype=np.int64)
        self.dtab = self.dev[:nt].reshape(T, TAB_COLS)
        self.dfmt = self.dev[nt:nt + nf].reshape(T, FMT_COLS)
        self.dhyper = self.dev[nt + nf:].view(np.float64).reshape(R, NS)


def _stored_plan(work):
    """The device plan of a stored-format bucket (see :func:`_dense_plan`)."""
    ptrs = work.ptrs
    key = ("stored", id(ptrs))
    T, (R, NS) = ptrs.shape[0], work.hyper.shape
    q8 = work.config.storage.state == "q8"
    per = BLOCK_SIZE if q8 else CHUNK
    hit = _PLANS.get(key)
    if hit is not None and hit[0]() is ptrs and hit[1].key[:5] == (T, R, NS, q8, per):
        return hit[1]
    plan = _StoredPlan(work)
    _PLANS[key] = (weakref.ref(ptrs), plan)
    weakref.finalize(ptrs, _forget_plan, key, plan)
    return plan


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


# ------------------------------------------------------- stored-format arrays

def _mark_bf16(d):
    """Mark a uint16 device array as holding bfloat16 values (state_bits=16,
    ``kahan_comp``, parameters and gradients marked by :func:`bfloat16`)."""
    d._fastopt_bfloat16 = True
    return d


def is_bf16_state(a):
    """True for a bfloat16 array of this backend: a uint16 device array made by
    :meth:`CudaBackend.full` or :meth:`CudaBackend.from_host` for bfloat16, or marked
    by :func:`bfloat16`, and a bfloat16 parameter (:class:`_BF16Param`)."""
    return bool(getattr(a, "_fastopt_bfloat16", False))


def _flat(a):
    """A flat (1-D) numba device view of a C-contiguous device array."""
    d = _import_device(a)
    return d.reshape(int(np.prod(_describe(d)[0], dtype=np.int64)))


_DUMMIES = {}


def _dummy(shape, dtype):
    """A small device array standing for an argument a kernel never reads."""
    key = (tuple(shape), np.dtype(dtype).str, _SIM)
    d = _DUMMIES.get(key)
    if d is None:
        d = _DUMMIES[key] = cuda.device_array(shape, dtype=dtype)
    return d


def _check_stored(config):
    """The kernels read a bfloat16 parameter's uint16 bits, float32 or float64
    parameters in their dtype: nothing else reaches them."""
    assert config.storage.param in ("native", "bfloat16"), config.storage


def _packed(d):
    """Device array ``d`` itself when C-contiguous, else a contiguous copy (numba's
    assignment kernel: strided read)."""
    shape, dt, contig = _describe(d)[:3]
    if contig:
        return d
    out = cuda.device_array(tuple(shape), dtype=dt)
    out[:] = d
    return out


def _widen(d):
    """A new float32 device array of the values of the bfloat16 bits in uint16 device
    array ``d`` (any shape, C-contiguous)."""
    shape = tuple(_describe(d)[0])
    n = int(np.prod(shape, dtype=np.int64))
    out = cuda.device_array(shape, dtype=np.float32)
    if n:
        kernel_for("widen", None)[_blocks(n, BLOCK_SIZE), BLOCK_SIZE](
            _import_device(d).reshape(n), out.reshape(n))
    return out


class _BF16Param:
    """A bfloat16 parameter as the optimizer holds it (what :meth:`CudaBackend.as_param`
    returns for an array marked by :func:`bfloat16`): ``dtype`` is
    ``ml_dtypes.bfloat16``, so that the optimizer and the planner choose the bfloat16
    storage formats, and ``bits`` is the marked uint16 numba device array the kernels
    update in place.  Host copies (``copy_to_host``, :meth:`CudaBackend.to_host`) are
    ``ml_dtypes.bfloat16`` arrays; assignment takes values converted to bfloat16
    (round to nearest even)."""

    __slots__ = ("bits", "__weakref__")
    _fastopt_bfloat16 = True

    def __init__(self, bits):
        self.bits = _mark_bf16(bits)

    @property
    def dtype(self):
        return bf16()

    @property
    def shape(self):
        return tuple(_describe(self.bits)[0])

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self):
        return 2 * self.size

    @property
    def itemsize(self):
        return 2

    @property
    def __cuda_array_interface__(self):      # a GPU's uint16 bits (not the simulator)
        return self.bits.__cuda_array_interface__

    def reshape(self, *shape):
        return _BF16Param(self.bits.reshape(*shape))

    def copy_to_host(self):
        return self.bits.copy_to_host().view(bf16())

    def copy_to_device(self, ary):
        self.bits.copy_to_device(np.ascontiguousarray(ary, dtype=bf16()).view(np.uint16))

    def __setitem__(self, idx, value):
        if is_device(value):
            if not is_bf16_state(value):
                raise TypeError("assign bfloat16 device values marked with "
                                "fastopt.backends.cuda.bfloat16(), or host values")
            self.bits[idx] = _import_device(value)
            return
        self.bits[idx] = np.asarray(value, dtype=bf16()).view(np.uint16)

    def __len__(self):
        return self.shape[0]

    def __repr__(self):
        return f"<fastopt CUDA bfloat16 parameter, shape {self.shape}>"


def bfloat16(array):
    """Mark a device array of bfloat16 *bits* as a bfloat16 parameter (or gradient) of
    the CUDA backend.

    ``array``: anything with ``__cuda_array_interface__`` (or a numba device array) of
    dtype uint16 or int16, C-contiguous, e.g. ``torch_bf16.view(torch.int16)`` (torch
    does not export bfloat16 tensors) or a CuPy / numba uint16 array.  Returns a numba
    uint16 device array viewing the same memory (no copy), marked as holding bfloat16
    values (:func:`is_bf16_state`); pass it to an optimizer with ``backend="cuda"``
    (or ``"auto"``).  Unmarked uint16 arrays are refused: they may be data of their own.
    """
    _load()
    if isinstance(array, _BF16Param):
        return array.bits
    if not is_device(array):
        raise TypeError("fastopt.backends.cuda.bfloat16: expected a device array (an object "
                        "with __cuda_array_interface__ or a numba device array) of dtype "
                        f"uint16 or int16 holding bfloat16 bits; got {type(array).__name__}")
    shape, dt, contig, readonly, _, _ = _describe(array)
    if dt not in (np.dtype(np.uint16), np.dtype(np.int16)):
        raise TypeError(f"fastopt.backends.cuda.bfloat16: dtype {dt} is not uint16 or int16 "
                        "(the bits of bfloat16 values; torch: tensor.view(torch.int16))")
    if not contig:
        raise ValueError("fastopt.backends.cuda.bfloat16: the array is not C-contiguous")
    if readonly:
        raise ValueError("fastopt.backends.cuda.bfloat16: the array is read-only")
    return _mark_bf16(_import_device(array).view(np.uint16))


# ---------------------------------------------------------------------- backend

class CudaBackend(Backend):
    """Runs optimizer steps on device arrays with ``cuda.jit`` kernels; provides the
    array methods of :class:`fastopt.backends.base.Backend` for device arrays.  Every
    feature of :data:`fastopt.backends.base.FEATURES` (bfloat16 parameters: uint16
    device arrays marked with :func:`bfloat16`)."""

    name = "cuda"
    #: every feature; bfloat16 parameters are uint16 device arrays marked with
    #: :func:`bfloat16` (see "Stored formats" in the module docstring)
    features = frozenset(FEATURES)
    memory = "device"

    def __init__(self):
        _load()

    # -------------------------------------------------------------- arrays
    def as_param(self, obj, where):
        """View ``obj`` as a device array that can be updated in place, or raise.  A
        uint16 array marked by :func:`bfloat16` gives a :class:`_BF16Param`; unmarked
        uint16 / int16 arrays and float16 are refused."""
        if isinstance(obj, (list, tuple)) or np.isscalar(obj) or obj is None:
            raise TypeError(f"{where}: expected an array, got {type(obj).__name__}")
        if not is_device(obj):
            raise TypeError(f"{where}: backend 'cuda' updates device arrays in place (objects "
                            "with __cuda_array_interface__: numba device arrays, CuPy arrays, "
                            f"torch CUDA tensors); got host {type(obj).__name__}. Move it to "
                            "the GPU or use a CPU backend")
        if isinstance(obj, _BF16Param):
            return obj
        shape, dt, contig, readonly, _, _ = _describe(obj)
        bf = dt == np.uint16 and is_bf16_state(obj)
        if dt == np.float16:
            raise TypeError(f"{where}: dtype float16 is not supported (its 5-bit "
                            "exponent under- and overflows optimizer updates); use bfloat16 "
                            "parameters (mark their bits with fastopt.backends.cuda.bfloat16), "
                            "or float32 parameters with state_bits=16 or 8")
        if dt in (np.dtype(np.uint16), np.dtype(np.int16)) and not bf:
            raise TypeError(f"{where}: dtype {dt} is not supported (float32, float64 or "
                            "bfloat16); if the array holds bfloat16 bits, mark it with "
                            "fastopt.backends.cuda.bfloat16(array) (torch: "
                            "bfloat16(tensor.view(torch.int16)))")
        if not bf and (dt not in FLOAT_DTYPES or not dt.isnative):
            raise TypeError(f"{where}: dtype {dt} is not supported "
                            "(float32, float64, native byte order, or bfloat16 bits marked "
                            "with fastopt.backends.cuda.bfloat16)")
        if readonly:
            raise ValueError(f"{where}: the array is read-only; an optimizer updates it in place")
        if not contig:
            raise ValueError(f"{where}: the array is not C-contiguous; fastopt updates "
                             "contiguous memory in place, pass a contiguous array")
        if bf:
            return _BF16Param(_import_device(obj))
        return _import_device(obj)

    def _convert(self, g, p, dtype=None):
        """A contiguous device copy of device array ``g`` in ``dtype`` (default: ``p``'s
        dtype) and ``p``'s shape.  Marked bfloat16 bits are widened (exact)."""
        dtype = np.dtype(p.dtype if dtype is None else dtype)
        d = _import_device(g)
        shape = tuple(p.shape)
        if _describe(d)[1] == np.uint16 and is_bf16_state(g):
            d = _widen(_packed(d))
            if dtype == np.float32:
                return d
        out = cuda.device_array(shape, dtype=dtype)
        if out.size:
            if out.ndim == 0:
                out = cuda.to_device(np.asarray(d.copy_to_host(), dtype=dtype))
            else:
                out[:] = d          # numba's assignment kernel: strided read, cast
        return out

    def check_grads(self, dense, plist, active):
        """Check every gradient (type, shape, dtype) and convert where needed: device
        gradients of another float dtype or layout are converted on the device, host
        gradients are checked as on the CPU and copied over.  Returns (arrays,
        int64 addresses); writes no parameter or state.  Streams named by the
        gradients are synchronized (once each) before returning.

        Gradients of a bfloat16 parameter: marked bfloat16 device arrays
        (:func:`bfloat16`) or float32 ones (other float dtypes are converted to
        float32), host bfloat16 or float32 arrays (copied over).  When a step has both
        bfloat16 and float32 gradients of bfloat16 parameters, the bfloat16 ones are
        widened to float32 (exact: the same values; a bucket reads one gradient
        dtype).  Marked bfloat16 gradients of float32 / float64 parameters are widened
        (and converted)."""
        out = list(dense)
        addr = np.empty(len(dense), dtype=np.int64)
        streams = set()
        bf_grads = []
        for k, (g, p) in enumerate(zip(dense, plist)):
            where = f"gradient {active[k]}"
            bfp = isinstance(p, _BF16Param)
            if isinstance(g, _BF16Param):
                g = g.bits
            if not is_device(g):
                h = as_grad(g, p, where)
                if is_bf16(h.dtype):
                    d = _mark_bf16(cuda.to_device(h.view(np.uint16)))
                else:
                    d = cuda.to_device(h)
                out[k], addr[k] = d, _address(d)
                if bfp:
                    bf_grads.append(k)
                continue
            shape, dt, contig, _, ptr, stream = _describe(g)
            bfg = dt == np.uint16 and is_bf16_state(g)
            if dt.kind != "f" and not bfg:
                raise TypeError(f"{where}: gradient dtype {dt} is not a float dtype" + (
                    "; mark bfloat16 bits with fastopt.backends.cuda.bfloat16(array)"
                    if dt in (np.dtype(np.uint16), np.dtype(np.int16)) else ""))
            if tuple(shape) != tuple(p.shape):
                raise ValueError(f"{where}: gradient shape {tuple(shape)} does not match "
                                 f"parameter shape {tuple(p.shape)}")
            if stream not in (None, 1, 2):
                streams.add(stream)
            if bfp:
                bf_grads.append(k)
                if bfg and contig:
                    keep = True
                elif bfg:                           # contiguous copy of the bits
                    out[k] = _mark_bf16(_packed(_import_device(g)))
                    ptr = _address(out[k])
                    keep = False
                else:
                    keep = dt == np.float32 and contig
                    if not keep:
                        out[k] = self._convert(g, p, np.float32)
                        ptr = _address(out[k])
            else:
                keep = dt == p.dtype and contig
                if not keep:
                    out[k] = self._convert(g, p)
                    ptr = _address(out[k])
            if keep and not hasattr(g, "reshape"):
                out[k] = _import_device(g)
            elif keep and out[k] is not g:
                out[k] = g
            addr[k] = ptr
        if bf_grads:
            kinds = {_describe(out[k])[1].itemsize for k in bf_grads}
            if len(kinds) > 1:              # bfloat16 and float32 gradients: all float32
                for k in bf_grads:
                    if _describe(out[k])[1] == np.uint16:
                        out[k] = _widen(out[k])
                        addr[k] = _address(out[k])
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
            d = _packed(d)
            if dt == np.uint16:             # bfloat16 bits (check_grads refuses others)
                d, dt = _widen(d), np.dtype(np.float32)
            if count is None:
                count = cuda.to_device(np.zeros(1, dtype=np.int64))
            scale = dt.type(1.0 if grad_scale is None else grad_scale)
            kernel_for("finite", None)[_blocks(n, BLOCK_SIZE), BLOCK_SIZE](
                d.reshape(n), scale, count)
        return count is None or int(count.copy_to_host()[0]) == 0

    def full(self, shape, value, dtype):
        """A device array filled with ``value``.  ``dtype`` bfloat16 (``ml_dtypes``;
        bfloat16 state): a uint16 device array of the bits (``value`` rounded to
        nearest even, as ``np.full`` with bfloat16 rounds), marked as bfloat16 (see
        :func:`is_bf16_state`)."""
        if is_bf16(dtype):
            bits = int(np.array(value, dtype=bf16()).view(np.uint16))
            return _mark_bf16(self.full(shape, bits, np.uint16))
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
        """A host copy; a bfloat16 state array or parameter comes back as
        ``ml_dtypes.bfloat16`` (the dtype the CPU backends store)."""
        h = _import_device(a).copy_to_host()
        return h.view(bf16()) if is_bf16_state(a) else h

    def from_host(self, a, like):
        """A device copy of host array ``a`` in ``like``'s dtype.  A bfloat16 ``like``
        (a host ``ml_dtypes.bfloat16`` array, or a bfloat16 state array of this
        backend) gives a bfloat16 state array (uint16 bits on the device)."""
        dt = getattr(like, "dtype", None)
        if is_bf16_state(like) or (dt is not None and is_bf16(dt)):
            bits = np.ascontiguousarray(np.asarray(a, dtype=bf16())).view(np.uint16)
            return _mark_bf16(cuda.to_device(bits))
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
        if not work.config.storage.native:
            self._run_stored_dense(work)
            return
        plan = _dense_plan(work)
        plan.tab[:, :TAB_COLS - 1] = work.ptrs
        plan.hyper[:] = work.hyper
        plan.dev.copy_to_device(plan.host)
        kernel = kernel_for("dense", work.config)
        kernel[_blocks(plan.nchunks), BLOCK_SIZE](plan.dtab, plan.chunks, plan.dhyper)

    def run_norms(self, work):
        """The norm pass of a per-tensor rule over a bucket: one launch, the chunk
        sums copied back and added per tensor in chunk order (float64)."""
        out = np.zeros((len(work.params), 2), dtype=np.float64)
        if not work.nelem:
            return out
        plan = _dense_plan(work)
        plan.tab[:, :TAB_COLS - 1] = work.ptrs
        plan.hyper[:] = work.hyper
        plan.dev.copy_to_device(plan.host)
        part = cuda.device_array((plan.nchunks, 2), dtype=np.float64)
        kernel_for("norms", work.config)[_blocks(plan.nchunks), BLOCK_SIZE](
            plan.dtab, plan.chunks, plan.dhyper, part)
        host = part.copy_to_host()
        chunks = plan.host_chunks
        for ci in range(plan.nchunks):           # chunk order
            out[chunks[ci, 0]] += host[ci]
        return out

    def run_rows(self, work):
        """The row step of one parameter (a row-sparse gradient, a dense step of a
        row-wise rule or of a max_norm group, or exact mode's catch-up): one launch
        (two with max_norm).  Indices were validated and the coalescing plan computed
        on the host by the planner."""
        cfg = work.config
        if work.catch is not None and work.catch.coef is None:
            raise ValueError("exact-mode work without its catch-up maps")
        if not cfg.storage.native:
            self._run_stored_rows(work)
            return
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


    # ------------------------------------------------------- stored formats
    def _run_stored_dense(self, work):
        """A dense step of a stored-format bucket: one launch (8-bit state: a thread
        per 8-bit block)."""
        _check_stored(work.config)
        plan = _stored_plan(work)
        plan.tab[:, :TAB_COLS - 1] = work.ptrs
        plan.fmt[:] = work.fmt
        plan.hyper[:] = work.hyper
        plan.dev.copy_to_device(plan.host)
        kernel = kernel_for("stored_dense", work.config)
        kernel[_blocks(plan.nchunks), BLOCK_SIZE](plan.dtab, plan.dfmt, plan.chunks,
                                                  plan.dhyper)

    def _run_stored_rows(self, work):
        """The row step of a stored-format parameter: one launch."""
        from ..storage import io
        cfg = work.config
        _check_stored(cfg)
        p = work.param
        shape = _describe(p)[0]
        nrows = shape[0]
        D = int(np.prod(shape[1:], dtype=np.int64))
        nuniq = int(work.uniq.shape[0])
        if nuniq == 0 or D == 0:
            return
        CT = np.dtype(cfg.compute_dtype)
        _, _, SDT, _ = io.dtypes(cfg.storage, "native", CT.type)
        P = _flat(p)
        stepping = work.vals is not None
        catch = work.catch is not None
        ident = stepping and work.order is work.uniq and nuniq == nrows
        order, seg, uniq, coef, hyper = _rows_plan(work, nuniq, ident, catch)
        vals = self._device_rows(work.vals, D, CT) if stepping else _dummy((1, 1), CT)
        if vals.dtype == np.uint16:       # bfloat16 bits (dense rows of a bfloat16 param)
            vals = _widen(vals)
        if vals.dtype != CT:              # device rows of another dtype
            conv = cuda.device_array(vals.shape, dtype=CT)
            conv[:] = vals
            vals = conv
        extras = work.extras or [None] * (1 + NSLOTS)
        A = _flat(extras[0]) if extras[0] is not None else _dummy((1,), np.uint16)
        key = int(work.key) & 0xFFFFFFFF
        if cfg.rule.layout == "rowwise":
            if not stepping:
                return                       # no closed form: never a catch-up here
            bufs = cuda.device_array((2 * nuniq, D), dtype=CT)
            S0 = _import_device(work.slots[0]).reshape(nrows)
            kernel_for("stored_rowwise", cfg)[_blocks(nuniq, BLOCK_SIZE), BLOCK_SIZE](
                P, A, S0, vals, order, seg, uniq, hyper, bufs[:nuniq], bufs[nuniq:], nuniq,
                D, key, int(work.base), ident)
            return
        S = [_flat(s) if s is not None else _dummy((1,), SDT) for s in work.slots]
        C = [_flat(s) if s is not None else _dummy((1,), np.float32) for s in extras[1:]]
        mx = bool(cfg.switches[5])
        prows = cuda.device_array((nuniq, D), dtype=CT) if mx else _dummy((1, 1), CT)
        if mx:
            units = nuniq
        elif cfg.storage.state == "q8":
            units = nuniq * -(-D // Q8_BLOCK)
        else:
            units = nuniq * D
        kernel_for("stored_rows", cfg, catch, stepping)[_blocks(units, BLOCK_SIZE),
                                                        BLOCK_SIZE](
            P, A, S[0], S[1], S[2], C[0], C[1], C[2], vals, order, seg, uniq, coef, hyper,
            prows, nuniq, D, key, int(work.base), ident)


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


def _backends():
    from .. import backends
    return backends
