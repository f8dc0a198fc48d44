"""Pure-Python twins of ``fastopt._cy_util`` (``kernels/_cy_util.pyx``), used when the
compiled extensions are not built (a source checkout that was not installed): the
same results, slower per gradient.  ``pip install .`` (or ``pip install -e .``)
builds the compiled versions."""

import numpy as np


def gather_grads(grads, params, ptrs, col):
    """Check that every gradient is an ndarray (exactly) with its parameter's shape and
    dtype, C-contiguous, aligned and in native byte order, and write its data address
    into column ``col`` of ``ptrs``.  Stops at the first gradient that needs the slow
    path and returns its position; -1 means all done."""
    n = len(grads)
    if len(params) != n or ptrs.shape[0] < n or not 0 <= col < ptrs.shape[1]:
        raise ValueError("gather_grads: inconsistent sizes")
    for i in range(n):
        g = grads[i]
        if type(g) is not np.ndarray:
            return i
        p = params[i]
        if (g.dtype.num != p.dtype.num or not g.flags.c_contiguous
                or not g.flags.aligned or g.shape != p.shape or not g.dtype.isnative):
            return i
        ptrs[i, col] = g.__array_interface__["data"][0]
    return -1


def data_address(a):
    """The address of ``a``'s first element."""
    if not isinstance(a, np.ndarray):
        raise TypeError(f"data_address: expected an ndarray, got {type(a).__name__}")
    return a.__array_interface__["data"][0]
