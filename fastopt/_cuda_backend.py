"""The ``"cuda"`` backend: optimizer steps on NVIDIA GPUs with Numba ``cuda.jit`` kernels.

Arrays
------
Parameters are *device* arrays updated in place: anything with
``__cuda_array_interface__`` (numba device arrays, CuPy arrays, torch CUDA tensors)
is viewed without a copy, and must be float32 or float64, C-contiguous and
writeable.  State is allocated on the same device.  Gradients may be device arrays
(used in place; another float dtype or a non-contiguous one is converted on the
device into a new array) or host arrays (NumPy, CPU torch tensors), checked like the
CPU backends check them and copied to the device on every step: correct, but the
copy costs more than the update, so keep gradients on the device.  ``state_dict()``
returns host NumPy copies and ``load_state_dict`` copies host arrays to the device,
so checkpoints move freely between the CPU and CUDA backends.

Kernels run on numba's default stream.  A gradient whose
``__cuda_array_interface__`` names another stream has that stream synchronized once
per step before the launch (work on the legacy default stream is ordered anyway).

Kernels
-------
The per-element math is the rule's function in :mod:`fastopt.rules` (a
``register_jitable`` function, compiled as a device function), the same function
the Numba CPU driver calls.  Each kernel is a closure over the math, the dtype, the
used state slots and the fixed scalars (option flags, zero weight decay) of a bucket:
those are compile-time constants, so unused slots are never loaded and flags cost no
branch.  Compiled kernels are kept in :data:`_KERNELS`.

* Dense, element-wise rules (:func:`make_dense_kernel`), the multi-tensor launch:
  one launch per bucket (all tensors of one dtype and slot usage), whatever the
  number of tensors.  Like the CPU driver it reads a pointer table ``tab`` int64
  (T, 6) = (param, grad, slot 0, slot 1, slot 2 addresses, scalar row) and a chunk
  table ``chunks`` int64 (C, 3) = (tensor, start, stop) of at most :data:`CHUNK`
  elements.  Blocks grid-stride over chunks (``chunk = blockIdx.x, += gridDim.x``),
  the threads of a block stride over the chunk's elements (``i = start +
  threadIdx.x, += blockDim.x``, coalesced).  1,000 tensors of 100K cost one launch,
  balanced over the GPU like one tensor of 100M.  Per step the host writes the
  gradient addresses and the per-step scalars (float64, one row per distinct
  (group, step)) into one pinned-size host buffer and copies it to the device in
  one transfer; the chunk table stays on the device while the optimizer's plan is
  unchanged.
* Row-sparse steps of element-wise rules (:func:`make_rows_kernel`): one launch per
  sparse parameter, a grid-stride loop over the ``nuniq * D`` touched elements
  (thread ``e``: unique row ``e // D``, column ``e % D``).  The host validates the
  indices (IndexError before any write) and computes the deterministic coalescing
  plan (:func:`fastopt.sparse.coalesce_plan`); each thread sums a row's duplicate
  values in their order of appearance, exactly as the CPU driver does, then applies
  the rule.  No atomics; the result does not depend on the launch shape.
* Row-wise rules (``rule.layout == "rowwise"``, RowWiseAdagrad), dense or sparse
  (:func:`make_rowwise_kernel`): one thread per touched row, grid-stride over rows;
  the thread sums duplicates into a scratch row (same order as the CPU) and calls
  the rule's row function, which reduces the row in its own fixed order.  Threads
  read their rows sequentially (uncoalesced; L1 absorbs part of it): correct and
  deterministic first, not yet bandwidth-optimal.

``error_model`` and fastmath are numba-cuda's defaults (no fast-math flags: IEEE
``sqrt.rn`` and ``div.rn``, NaN/Inf propagate).  The CUDA compiler contracts
``a * b + c`` into FMA, so results agree with the CPU backends to rounding, not
bit for bit.  Launch settings (module attributes, read at every launch):
:data:`BLOCK_SIZE`, :data:`CHUNK`, :data:`MAX_BLOCKS` (``None``: 32 blocks per
multiprocessor).  Tests set a small block size and grid so that several blocks run
and the grid-stride loops wrap.

Known numba-cuda gap: its CUDA target has no lowering for the NumPy scalar ufuncs
``np.sqrt`` and ``np.abs`` that :mod:`fastopt.rules` uses (numba-cuda 0.30: a
``KeyError`` while compiling).  :func:`_ensure_scalar_ufuncs` adds the float32 /
float64 loops, implemented by the target's own ``math.sqrt`` / ``math.fabs`` (IEEE
``sqrt.rn`` and ``abs``), when they are missing.

Exact sparse mode (``sparse_mode="exact"``) is not implemented on this backend: the
optimizer refuses it with NotImplementedError naming ``backend='numba'``.

Importing this module is cheap (numba.cuda is imported on first use);
:func:`register_lazily` is what ``import fastopt`` calls.
"""

import importlib.util
import math

import numpy as np

from . import _numba_cpu, backends
from .arrays import FLOAT_DTYPES, as_grad
from .registry import NSLOTS

#: threads per block
BLOCK_SIZE = 256
#: elements per chunk of the dense multi-tensor launch
CHUNK = 1 << 13
#: most blocks in one launch (grid-stride loops cover the rest); None: 32 per SM
MAX_BLOCKS = None

cuda = None          # numba.cuda, set by _load()
_SIM = False         # running under NUMBA_ENABLE_CUDASIM=1
_KERNELS = {}        # (kind, math, dtype, uses, const) -> cuda.jit kernel
_VIEWS = {}          # dtype -> device function: address -> pointer / array
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
        import ctypes
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


def make_dense_kernel(math_fn, dtype, uses, const):
    """The multi-tensor kernel of an element-wise rule configuration.

    ``kernel[blocks, BLOCK_SIZE](tab, chunks, hyper)`` with ``tab`` int64 (T, 6):
    param, grad, slot 0..2 addresses (unused slots: any address, never touched) and
    the tensor's scalar row; ``chunks`` int64 (C, 3): (tensor, start, stop);
    ``hyper`` float64 (R, NSCALARS).  For every element ``i`` of every chunk::

        p[i], s0[i], s1[i], s2[i] = math(p[i], g[i], s0[i], s1[i], s2[i], c)

    with ``c`` the tensor's scalar row cast to ``dtype`` (fixed entries compiled in).
    """
    _load()
    _ensure_scalar_ufuncs()
    MATH = math_fn
    LOAD = _numba_cpu.scalar_loader(dtype, const)
    VIEW = _view_fn(dtype)
    DT = np.dtype(dtype).type
    U0, U1, U2 = (bool(u) for u in uses)

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
                q, s0, s1, s2 = MATH(P[i], G[i], s0, s1, s2, c)
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


def make_rows_kernel(math_fn, dtype, uses, const):
    """The row-sparse kernel of an element-wise rule configuration.

    ``kernel[blocks, BLOCK_SIZE](P, S0, S1, S2, vals, order, seg, uniq, nuniq, ident,
    hyper)``: ``P`` and the slots (nrows, D) (unused slots: ``P``, never touched),
    ``vals`` (nnz, D) gradient rows; row ``uniq[u]`` takes the sum of
    ``vals[order[seg[u]:seg[u + 1]]]`` added in that order (``ident``: row ``u``
    takes ``vals[u]``, and order/seg/uniq are not read).  Grid-stride over the
    ``nuniq * D`` touched elements.
    """
    _load()
    _ensure_scalar_ufuncs()
    MATH = math_fn
    LOAD = _numba_cpu.scalar_loader(dtype, const)
    DT = np.dtype(dtype).type
    U0, U1, U2 = (bool(u) for u in uses)

    def rows_kernel(P, S0, S1, S2, vals, order, seg, uniq, nuniq, ident, hyper):
        zero = DT(0)
        c = LOAD(hyper, 0)
        D = P.shape[1]
        e = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        stride = cuda.gridDim.x * cuda.blockDim.x
        while e < nuniq * D:
            u = e // D
            j = e - u * D
            if ident:
                r = u
                g = vals[u, j]
            else:
                r = uniq[u]
                a = seg[u]
                g = vals[order[a], j]
                for k in range(a + 1, seg[u + 1]):
                    g += vals[order[k], j]
            s0 = S0[r, j] if U0 else zero
            s1 = S1[r, j] if U1 else zero
            s2 = S2[r, j] if U2 else zero
            q, s0, s1, s2 = MATH(P[r, j], g, s0, s1, s2, c)
            P[r, j] = q
            if U0:
                S0[r, j] = s0
            if U1:
                S1[r, j] = s1
            if U2:
                S2[r, j] = s2
            e += stride

    return cuda.jit(rows_kernel)


def make_rowwise_kernel(math_fn, dtype, uses, const):
    """The kernel of a row-wise rule (one state value per row), dense or sparse.

    ``kernel[blocks, BLOCK_SIZE](P, S0, vals, order, seg, uniq, nuniq, ident, scratch,
    hyper)``: one thread per touched row ``r`` (grid-stride), with ``G`` the row's
    summed gradient (duplicates added in order into ``scratch[u]``)::

        S0[r, 0] = math(P[r], G, S0[r, 0], 1 / D, 0, c)      # updates P[r] in place
    """
    _load()
    _ensure_scalar_ufuncs()
    MATH = math_fn
    LOAD = _numba_cpu.scalar_loader(dtype, const)
    DT = np.dtype(dtype).type

    def rowwise_kernel(P, S0, vals, order, seg, uniq, nuniq, ident, scratch, hyper):
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
                        row = vals[order[k]]
                        for j in range(D):
                            G[j] += row[j]
                else:
                    G = vals[order[a]]
            S0[r, 0] = MATH(P[r], G, S0[r, 0], inv_d, zero, c)
            u += stride

    return cuda.jit(rowwise_kernel)


_FACTORIES = {"dense": make_dense_kernel, "rows": make_rows_kernel,
              "rowwise": make_rowwise_kernel}


def kernel_for(kind, math_fn, dtype, uses, const):
    """The compiled kernel of ``kind`` ("dense", "rows", "rowwise") for a rule
    configuration (cached)."""
    key = (kind, math_fn, np.dtype(dtype).str, tuple(bool(u) for u in uses), tuple(const),
           _SIM)
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = _FACTORIES[kind](math_fn, dtype, uses, const)
    return k


class _DensePlan:
    """Device tables of one bucket: chunk table (fixed), and a buffer holding the
    pointer table and the per-step scalars, refreshed by one copy per step."""

    def __init__(self, bucket):
        T, (R, NS) = bucket.ptrs.shape[0], bucket.hyper.shape
        self.key = (id(bucket.ptrs), T, R, CHUNK)
        sizes = [int(np.prod(p.shape, dtype=np.int64)) for p in bucket.params]
        chunks = _numba_cpu.make_chunks(sizes, CHUNK)
        self.nchunks = chunks.shape[0]
        self.chunks = cuda.to_device(chunks) if self.nchunks else None
        self.host = np.zeros(T * TAB_COLS + R * NS, dtype=np.int64)
        self.tab = self.host[:T * TAB_COLS].reshape(T, TAB_COLS)
        self.tab[:, TAB_COLS - 1] = bucket.hidx
        self.hyper = self.host[T * TAB_COLS:].view(np.float64).reshape(R, NS)
        self.dev = cuda.device_array(self.host.shape, dtype=np.int64)
        self.dtab = self.dev[:T * TAB_COLS].reshape(T, TAB_COLS)
        self.dhyper = self.dev[T * TAB_COLS:].view(np.float64).reshape(R, NS)


def _dummy_index():
    return cuda.to_device(np.zeros(1, dtype=np.int64))


def _refuse_fused(const, grad_scale):
    """The per-group fused options (gradient scaling, clipping, L1, clamping) are not
    compiled into the CUDA kernels: refuse them before a launch."""
    fused = [k for k in const if not isinstance(k[0], (int, np.integer))]
    on = any(any(v) if isinstance(v, tuple) else bool(v) for _, v in fused)
    if on or grad_scale is not None:
        raise NotImplementedError("backend 'cuda' does not support the fused per-group "
                                  "options (gradient scaling, clipping, L1, clamping) yet; "
                                  "use backend='numba'")


# ---------------------------------------------------------------------- backend

class CudaBackend:
    """Runs optimizer steps on device arrays with ``cuda.jit`` kernels; provides the
    array methods of :class:`fastopt.backends.HostArrays` for device arrays."""

    name = "cuda"
    device = "cuda"

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

    def full(self, shape, value, dtype):
        out = cuda.device_array(shape, dtype=dtype)
        n = int(np.prod(shape, dtype=np.int64))
        if n:
            out.reshape(n)[:] = value
        return out

    def address(self, a):
        return _address(a)

    def to_host(self, a):
        return _import_device(a).copy_to_host()

    def from_host(self, a, like):
        return cuda.to_device(np.ascontiguousarray(a, dtype=like.dtype))

    # --------------------------------------------------------------- steps
    def run(self, rule, bucket):
        """A dense step of an element-wise rule over a bucket: one launch."""
        if not bucket.nelem:
            return
        _refuse_fused(bucket.const, getattr(bucket, "grad_scale", None))
        plan = getattr(bucket, "_cuda_plan", None)
        if plan is None or plan.key != (id(bucket.ptrs), bucket.ptrs.shape[0],
                                        bucket.hyper.shape[0], CHUNK):
            plan = bucket._cuda_plan = _DensePlan(bucket)
        plan.tab[:, :TAB_COLS - 1] = bucket.ptrs
        plan.hyper[:] = bucket.hyper
        plan.dev.copy_to_device(plan.host)
        kernel = kernel_for("dense", rule.math, bucket.dtype, bucket.uses, bucket.const)
        kernel[_blocks(plan.nchunks), BLOCK_SIZE](plan.dtab, plan.chunks, plan.dhyper)

    def run_rows(self, rule, w):
        """A row-sparse step (or a dense step of a row-wise rule) of one parameter:
        one launch; indices were validated and the coalescing plan computed on the
        host by the optimizer."""
        _refuse_fused(w.const, getattr(w, "grad_scale", None))
        p = w.param
        nrows = p.shape[0]
        P = p.reshape(nrows, -1)
        D = P.shape[1]
        vals = w.vals if is_device(w.vals) else cuda.to_device(
            np.ascontiguousarray(w.vals, dtype=p.dtype))
        vals = _import_device(vals).reshape(vals.shape[0], D)
        nuniq = int(w.uniq.shape[0])
        if nuniq == 0 or D == 0:
            return
        ident = (w.order is w.uniq and nuniq == nrows == vals.shape[0])
        if ident:
            order = seg = uniq = _dummy_index()
        else:
            # one transfer for the whole plan
            packed = cuda.to_device(np.concatenate([
                np.asarray(w.order, np.int64), np.asarray(w.seg, np.int64),
                np.asarray(w.uniq, np.int64)]))
            n_o, n_s = w.order.shape[0], w.seg.shape[0]
            order, seg, uniq = packed[:n_o], packed[n_o:n_o + n_s], packed[n_o + n_s:]
        hyper = cuda.to_device(np.ascontiguousarray(w.hyper, dtype=np.float64))
        slots = [s.reshape(nrows, -1) if s is not None else P for s in w.slots]
        if rule.layout == "rowwise":
            dups = (not ident) and w.order.shape[0] > nuniq
            scratch = cuda.device_array((nuniq if dups else 1, D), dtype=p.dtype)
            kernel = kernel_for("rowwise", rule.math, p.dtype, w.uses, w.const)
            kernel[_blocks(nuniq, BLOCK_SIZE), BLOCK_SIZE](
                P, slots[0], vals, order, seg, uniq, nuniq, ident, scratch, hyper)
        else:
            kernel = kernel_for("rows", rule.math, p.dtype, w.uses, w.const)
            kernel[_blocks(nuniq * D, BLOCK_SIZE), BLOCK_SIZE](
                P, slots[0], slots[1], slots[2], vals, order, seg, uniq, nuniq, ident, hyper)


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
            backends.register("cuda", reason=(
                f"numba-cuda is not installed ({exc}); install it with "
                "pip install 'fastopt[cuda]' (or pip install numba-cuda)"))
            return None
        except Exception as exc:     # noqa: BLE001 (a broken install: say so, do not crash)
            backends.register("cuda", reason=f"numba-cuda failed to load: "
                                             f"{type(exc).__name__}: {exc}")
            return None
        if not cu.is_available():
            why = ""
            try:
                err = cu.cuda_error()
                why = f" ({' '.join(str(err).split())})" if err else ""
            except Exception:        # noqa: BLE001 (only decorates the message)
                pass
            backends.register("cuda", reason=(
                "numba-cuda found no usable CUDA GPU or driver on this machine"
                f"{why}; set NUMBA_ENABLE_CUDASIM=1 before importing numba.cuda to run "
                "the CUDA kernels in numba's simulator (slow, for testing)"))
            return None
        _BACKEND = CudaBackend()
    backends.register("cuda", _BACKEND)
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
        backends.register("cuda", reason=(
            "numba-cuda is not installed; install it with pip install 'fastopt[cuda]' "
            "(or pip install numba-cuda)"))
        return
    if not isinstance(backends._BACKENDS, _LazyBackends):
        backends._BACKENDS = _LazyBackends(backends._BACKENDS)
