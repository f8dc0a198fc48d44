"""bfloat16 on the CUDA backend: marked uint16 device arrays.

bfloat16 *state* lives on the device as uint16 arrays of the bits, allocated by
:meth:`fastopt.backends.cuda.CudaBackend.full` (asked for ``ml_dtypes.bfloat16`` by
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
bfloat16 state is.  The optimizer holds a marked parameter as a :class:`_BF16Param`
(``dtype`` ``ml_dtypes.bfloat16``, so the planner picks the same bfloat16 formats as
on the CPU; ``bits``: the uint16 array the kernels update in place).  Gradients that
must be float32 are widened by the ``widen`` kernel (:func:`_widen`).
"""

import numpy as np

from ...storage import bf16
from .. import cuda as _pkg
from . import launch
from .arrays import _describe, _import_device, is_device


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


def _widen(d):
    """A new float32 device array of the values of the bfloat16 bits in uint16 device
    array ``d`` (any shape, C-contiguous)."""
    shape = tuple(_describe(d)[0])
    n = int(np.prod(shape, dtype=np.int64))
    out = _pkg.cuda.device_array(shape, dtype=np.float32)
    if n:
        bs = _pkg.BLOCK_SIZE
        launch.kernel_for("widen", None)[launch._blocks(n, bs), bs](
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
    _pkg._load()
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

