"""Checks and conversions of user arrays (parameters and dense gradients).

Parameters are updated in place, so they must be writeable, C-contiguous,
native-endian float32/float64 NumPy arrays (or objects NumPy can view without a
copy, such as CPU torch tensors).  Anything else is refused with a clear error:
a silent copy would make the update vanish.

Gradients are read only: a gradient of another float dtype is converted to the
parameter's dtype, a non-contiguous one is copied to a contiguous array; an
integer, complex or object gradient, or one of the wrong shape, is refused.
"""

import numpy as np

from .storage import is_bf16

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def as_param(obj, where, bf16=True):
    """View ``obj`` as an ndarray that can be updated in place, or raise."""
    if isinstance(obj, (list, tuple)) or np.isscalar(obj) or obj is None:
        raise TypeError(f"{where}: expected an array, got {type(obj).__name__}")
    if hasattr(obj, "__cuda_array_interface__") and not hasattr(obj, "__array_interface__"):
        raise TypeError(f"{where}: a device array needs backend='cuda' (or 'auto')")
    arr = obj if isinstance(obj, np.ndarray) else np.asarray(obj)
    if arr.dtype == np.float16:
        raise TypeError(f"{where}: float16 parameters are not supported (their 5-bit exponent "
                        "under- and overflows optimizer updates); use bfloat16 parameters "
                        "(ml_dtypes.bfloat16), or float32 parameters with state_bits=16 or 8")
    if (arr.dtype not in FLOAT_DTYPES and not (bf16 and is_bf16(arr.dtype))) \
            or not arr.dtype.isnative:
        raise TypeError(f"{where}: dtype {arr.dtype} is not supported "
                        "(float32, float64" + (" or bfloat16" if bf16 else "") +
                        ", native byte order)")
    if not arr.flags.writeable:
        raise ValueError(f"{where}: the array is read-only; an optimizer updates it in place")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{where}: the array is not C-contiguous (strides {arr.strides}); "
                         "fastopt updates contiguous memory in place, pass a contiguous array")
    return arr


def as_grad(obj, param, where):
    """Return ``obj`` as a C-contiguous ndarray of ``param``'s dtype and shape, or raise."""
    if isinstance(obj, (list, tuple)) or obj is None:
        raise TypeError(f"{where}: expected an array, got {type(obj).__name__}")
    if not isinstance(obj, np.ndarray) and not (
            hasattr(obj, "__array__") or hasattr(obj, "__array_interface__")
            or hasattr(obj, "__array_struct__") or np.isscalar(obj)):
        raise TypeError(f"{where}: expected an array, got {type(obj).__name__}")
    arr = obj if isinstance(obj, np.ndarray) else np.asarray(obj)
    if arr.dtype.kind != "f" and not is_bf16(arr.dtype):
        raise TypeError(f"{where}: gradient dtype {arr.dtype} is not a float dtype")
    if arr.shape != param.shape:
        raise ValueError(f"{where}: gradient shape {arr.shape} does not match "
                         f"parameter shape {param.shape}")
    target = param.dtype
    if is_bf16(param.dtype) and arr.dtype != param.dtype:
        target = np.dtype(np.float32)      # bfloat16 parameters: bfloat16 or float32 grads
    if arr.dtype != target or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=target)
    return arr
