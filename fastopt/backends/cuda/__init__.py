"""The ``"cuda"`` backend: optimizer steps on NVIDIA GPUs with Numba ``cuda.jit`` kernels.

Every feature of :data:`fastopt.backends.base.FEATURES`: dense multi-tensor steps,
row-sparse steps (lazy and exact), row-wise rules, per-tensor rules, Muon's matrix
phase and Adafactor's factored passes, the fused options (clipping, L1,
clamps, max-norm), ``grad_scale`` and ``skip_nonfinite``, float32 and float64, and
the stored formats of :mod:`fastopt.storage` (``state_bits=16`` and ``8``; float32
state of float64 parameters; bfloat16 parameters, uint16 device arrays marked with
:func:`bfloat16`).

The package, one concern a module:

* this module: the launch settings, loading numba.cuda (:func:`_load`), the backend
  class :class:`CudaBackend` (array methods and the steps) and its registration
  (:func:`register_backend`); the names other code uses are re-exported here;
* :mod:`~fastopt.backends.cuda.arrays`: viewing and describing device arrays
  (``__cuda_array_interface__``, the simulator's arrays);
* :mod:`~fastopt.backends.cuda.bf16_arrays`: bfloat16 state and parameters as marked uint16
  device arrays (:func:`bfloat16`, :func:`is_bf16_state`);
* :mod:`~fastopt.backends.cuda.kernels`: the plain kernels (float32 / float64 in
  their own dtype: dense multi-tensor, rows, renorm, row-wise, non-finite count,
  widen);
* :mod:`~fastopt.backends.cuda.stored`: their stored-format twins (bfloat16
  parameters, 16- and 8-bit state);
* :mod:`~fastopt.backends.cuda.stored_passes`: the passes before the update of
  LAMB / LARS (the norm pass) and Muon (element phase 1) in a stored format;
* :mod:`~fastopt.backends.cuda.factored`: Adafactor's passes (row and column sums,
  the factors, the ``U^2`` sum, the update; the vector path), the work between them
  on the device too;
* :mod:`~fastopt.backends.cuda.matrix`: Muon's matrix phase (element phase 1,
  Newton-Schulz through a tiled GEMM kernel or the caller's torch / CuPy matmul);
* :mod:`~fastopt.backends.cuda.launch`: the kernel cache (:func:`kernel_for`),
  launch geometry, and the device tables of a bucket, prepared once per work item
  and launched per step with one copy of the step's gradient addresses and scalars.

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

Gradients of a bfloat16 parameter: marked bfloat16 device arrays or float32 device
arrays (other float dtypes are converted to float32 on the device), or host bfloat16
/ float32 arrays; where one step has both bfloat16 and float32 gradients of bfloat16
parameters, the bfloat16 ones are widened to float32 (``widen`` kernel, exact) so
each bucket reads one gradient dtype, as the CPU planner does.  Row kernels read
gradient rows in float32 (dense bfloat16 rows of ``max_norm`` and row-wise steps are
widened first), and ``skip_nonfinite`` scans bfloat16 gradients widened.  All
``bf16_update`` modes: ``"split"`` (aux ``master_low``, uint16), ``"kahan"`` (aux
``kahan_comp``, bfloat16 state), ``"stochastic"`` (the counter-based stream of
``(seed, parameter, step, element)``: the planner's key, indexed by the element's
flat index in the tensor plus its element base, so results do not depend on the
launch shape or on sharding) and ``"nearest"``.  ``state_dict`` gives the CPU
backends' arrays and dtypes (``master_low`` uint16, ``kahan_comp``
``ml_dtypes.bfloat16``, bfloat16 / uint8 / float32 slots), ``to_host`` of a parameter
gives an ``ml_dtypes.bfloat16`` array, and checkpoints move between backends.

Launch settings (module attributes of this package, read at every launch):
:data:`BLOCK_SIZE`, :data:`CHUNK`, :data:`MAX_BLOCKS` (``None``: 32 blocks per
multiprocessor).  The 8-bit kernels run a thread block per 8-bit block, of
:data:`fastopt.backends.cuda.stored.Q8_THREADS` (= ``Q8_BLOCK``, 256) threads
whatever ``BLOCK_SIZE`` is, over dense chunks of ``CHUNK // Q8_BLOCK`` blocks.
Tests set a small block size and grid so that several blocks run and the
grid-stride loops wrap.

Importing this package imports numba, not numba.cuda (that happens on first use);
``import fastopt`` does not import it (:mod:`fastopt.backends` loads it on the first
request for the backend, when numba-cuda is installed).
"""

import importlib.util

import numpy as np

from ..._jit import numba as _numba

_numba()   # a kernel package: numba now (and the registrations pending in fastopt._jit)

#: threads per block (the 8-bit kernels: always ``stored.Q8_THREADS``)
BLOCK_SIZE = 256
#: elements per chunk of the dense multi-tensor launch (8-bit state: ``CHUNK //
#: Q8_BLOCK`` 8-bit blocks)
CHUNK = 1 << 13
#: most blocks in one launch (grid-stride loops cover the rest); None: 32 per SM
MAX_BLOCKS = None

cuda = None          # numba.cuda, set by _load()
_SIM = False         # running under NUMBA_ENABLE_CUDASIM=1


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


# the submodules read the settings and numba.cuda above through this package
from ...arrays import FLOAT_DTYPES, as_grad  # noqa: E402
from ...storage import bf16, is_bf16  # noqa: E402
from ..base import FEATURES, Backend  # noqa: E402
from . import (arrays, bf16_arrays, factored, kernels, launch, matrix, stored,  # noqa: E402,F401
               stored_passes)
from .arrays import _address, _describe, _import_device, _packed, is_device  # noqa: E402
from .bf16_arrays import _BF16Param, _mark_bf16, _widen, bfloat16, is_bf16_state  # noqa: E402,F401
from .kernels import (TAB_COLS, make_count_kernel, make_dense_kernel,  # noqa: E402,F401
                      make_norms_kernel, make_renorm_kernel, make_rows_kernel, make_rowwise_kernel,
                      make_widen_kernel)
from .launch import _KERNELS, kernel_for  # noqa: E402,F401
from .stored import (make_stored_dense_kernel, make_stored_rows_kernel,  # noqa: E402,F401
                     make_stored_rowwise_kernel)


# ---------------------------------------------------------------------- backend

class CudaBackend(Backend):
    """Runs optimizer steps on device arrays with ``cuda.jit`` kernels; provides the
    array methods of :class:`fastopt.backends.base.Backend` for device arrays.  Every
    feature of :data:`fastopt.backends.base.FEATURES` (bfloat16 parameters: uint16
    device arrays marked with :func:`bfloat16`), Muon's matrix phase and Adafactor's
    factored passes included."""

    name = "cuda"
    #: every feature (``matrix``: :mod:`.matrix`; ``factored``: :mod:`.factored`;
    #: ``stored_passes``: :mod:`.stored_passes`); bfloat16 parameters are uint16
    #: device arrays marked with :func:`bfloat16` (see "Stored formats" in the module
    #: docstring)
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
            launch.kernel_for("finite", None)[launch._blocks(n, BLOCK_SIZE), BLOCK_SIZE](
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


    # --------------------------------------------------------------- steps
    def run_dense(self, work):
        """A dense step of a bucket: one launch over the bucket's device tables
        (prepared on its first launch; :func:`fastopt.backends.cuda.launch.run_dense`)."""
        launch.run_dense(work)

    def run_norms(self, work):
        """The norm pass of a per-tensor rule over a bucket: one launch, the chunk
        sums added on the host (:func:`fastopt.backends.cuda.launch.run_norms`)."""
        return launch.run_norms(work)

    def run_matrix(self, work, groups):
        """The matrix phase of a matrix rule (Muon) over a bucket on the device: element
        phase 1, then Newton-Schulz batched per tensor
        (:func:`fastopt.backends.cuda.matrix.run_matrix`)."""
        matrix.run_matrix(work, groups)

    # the passes of factored rules (Adafactor; fastopt/factored.py): device arrays,
    # :mod:`fastopt.backends.cuda.factored`
    def factored_tensor(self, rule, group, step, p, g, state):
        """One tensor's step of a factored rule, every pass and the work between them
        on the device (:func:`fastopt.backends.cuda.factored.run_tensor`)."""
        factored.run_tensor(rule, group, step, p, g, state)

    def factored_sums(self, *a):
        return factored.factored_sums(*a)

    def factored_usq(self, *a):
        return factored.factored_usq(*a)

    def factored_apply(self, *a):
        factored.factored_apply(*a)

    def vector_sums(self, *a):
        return factored.vector_sums(*a)

    def vector_usq(self, *a):
        return factored.vector_usq(*a)

    def vector_apply(self, *a):
        factored.vector_apply(*a)

    def run_rows(self, work):
        """The row step of one parameter (a row-sparse gradient, a dense step of a
        row-wise rule or of a max_norm group, or exact mode's catch-up): one launch
        (two with max_norm; :func:`fastopt.backends.cuda.launch.run_rows`)."""
        launch.run_rows(work)


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
    from ... import backends
    return backends
