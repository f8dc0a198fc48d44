# cython: language_level=3, boundscheck=False, wraparound=False
"""Fast per-step bookkeeping for the Python layer (compiled into ``fastopt._cy_util``).

``gather_grads`` checks that every gradient is an ndarray with its parameter's
shape and dtype and C-contiguous, and writes its data address into a column of the
pointer table, in one C loop.  It stops at the first gradient that needs the slow
path (conversion or an error message) and returns its position; -1 means all done.
"""

cimport numpy as cnp

cnp.import_array()


def gather_grads(list grads, list params, cnp.int64_t[:, ::1] ptrs, Py_ssize_t col):
    cdef Py_ssize_t i, d, n = len(grads)
    cdef cnp.ndarray g, p
    if len(params) != n or ptrs.shape[0] < n or not 0 <= col < ptrs.shape[1]:
        raise ValueError("gather_grads: inconsistent sizes")
    for i in range(n):
        obj = grads[i]
        if not cnp.PyArray_CheckExact(obj):
            return i
        g = <cnp.ndarray>obj
        p = <cnp.ndarray>params[i]
        if cnp.PyArray_TYPE(g) != cnp.PyArray_TYPE(p) or not cnp.PyArray_ISCARRAY_RO(g):
            return i
        if cnp.PyArray_NDIM(g) != cnp.PyArray_NDIM(p):
            return i
        for d in range(cnp.PyArray_NDIM(g)):
            if cnp.PyArray_DIM(g, d) != cnp.PyArray_DIM(p, d):
                return i
        if not cnp.PyArray_ISNOTSWAPPED(g):
            return i
        ptrs[i, col] = <cnp.int64_t>cnp.PyArray_DATA(g)
    return -1


def data_address(cnp.ndarray a):
    """The address of ``a``'s first element."""
    return <cnp.int64_t>cnp.PyArray_DATA(a)
