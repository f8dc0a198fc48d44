"""Device arrays of the CUDA backend: anything with ``__cuda_array_interface__``.

Parameters are *device* arrays updated in place: anything with
``__cuda_array_interface__`` (numba device arrays, CuPy arrays, torch CUDA tensors)
is viewed without a copy (:func:`_import_device`), and described (shape, dtype,
layout, address, stream) from its interface (:func:`_describe`).  In numba's CUDA
simulator, where device memory is host memory, an interface is viewed as a simulated
device array over the same memory (:func:`_sim_from_cai`).  A bfloat16 parameter
(:class:`fastopt.backends.cuda.bf16_arrays._BF16Param`) is handled through its uint16 bits.
"""

import numpy as np

from .. import cuda as _pkg


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
    if not _pkg._SIM:
        return _pkg.cuda.as_cuda_array(obj)
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


def _flat(a):
    """A flat (1-D) numba device view of a C-contiguous device array."""
    d = _import_device(a)
    return d.reshape(int(np.prod(_describe(d)[0], dtype=np.int64)))


_DUMMIES = {}


def _dummy(shape, dtype):
    """A small device array standing for an argument a kernel never reads."""
    key = (tuple(shape), np.dtype(dtype).str, _pkg._SIM)
    d = _DUMMIES.get(key)
    if d is None:
        d = _DUMMIES[key] = _pkg.cuda.device_array(shape, dtype=dtype)
    return d


def _packed(d):
    """Device array ``d`` itself when C-contiguous, else a contiguous copy (numba's
    assignment kernel: strided read)."""
    shape, dt, contig = _describe(d)[:3]
    if contig:
        return d
    out = _pkg.cuda.device_array(tuple(shape), dtype=dt)
    out[:] = d
    return out


from .bf16_arrays import _BF16Param  # noqa: E402  (it builds on the functions above)
