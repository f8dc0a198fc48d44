"""Row-sparse gradients: the type, its validation and its coalescing.

``RowSparse(indices, values)`` stands for a gradient that is zero except on the
rows ``indices`` of a parameter: ``indices`` is int32 or int64 of shape (nnz,),
``values`` has shape ``(nnz, *param.shape[1:])`` (for a 1-D parameter each index is
one element and ``values`` has shape (nnz,)).  Repeated indices are allowed and are
summed ("coalesced") before the update, deterministically: rows are ordered by a
stable radix sort on the index and each row's values are added in the order they
appear, so the result is identical from run to run and for any thread count, and
equals the dense update with the summed gradient.

scipy.sparse matrices and arrays (CSR, CSC, COO, ...) are accepted for 2-D
parameters: the rows that hold at least one stored entry (explicit zeros included)
are the touched rows, with their dense contents as values.

Validation happens before anything is written: indices must be integers in
``[0, nrows)`` (IndexError otherwise, naming the offending index), values must have
the right shape (ValueError) and a float dtype (TypeError; other float dtypes are
converted to the parameter's).  An empty sparse gradient (no rows) is a step that
touches no row, as torch's SparseAdam and Adagrad count it: the parameter's state is
created and its step count advances (lazy mode: nothing else changes; exact mode:
every row falls one step behind, caught up later).
"""

import numpy as np

from ._jit import njit, register_jitable
from .storage import is_bf16

__all__ = ["RowSparse", "is_sparse", "checked_rows"]


class RowSparse:
    """A gradient that is non-zero only on some rows of a parameter."""

    __slots__ = ("indices", "values")

    def __init__(self, indices, values):
        indices = np.asarray(indices)
        values = np.asarray(values)
        if indices.ndim != 1:
            raise ValueError(f"RowSparse indices must be 1-D, got shape {indices.shape}")
        if indices.dtype not in (np.dtype(np.int32), np.dtype(np.int64)):
            raise TypeError(f"RowSparse indices must be int32 or int64, got {indices.dtype}")
        if values.ndim < 1 or values.shape[0] != indices.shape[0]:
            raise ValueError(f"RowSparse values must have shape (nnz, ...) with nnz = "
                             f"{indices.shape[0]}, got {values.shape}")
        self.indices = indices
        self.values = values

    @property
    def nnz(self):
        return self.indices.shape[0]

    def __repr__(self):
        return f"RowSparse(nnz={self.nnz}, row_shape={self.values.shape[1:]})"

    @classmethod
    def from_scipy(cls, matrix):
        """The touched rows of a scipy.sparse matrix/array with their dense values."""
        csr = matrix.tocsr()
        counts = np.diff(csr.indptr)
        rows = np.flatnonzero(counts).astype(np.int64)
        values = csr[rows].toarray() if rows.size else np.zeros((0, csr.shape[1]), csr.dtype)
        return cls(rows, np.ascontiguousarray(values))


def _is_scipy_sparse(obj):
    mod = type(obj).__module__
    return mod.startswith("scipy.sparse") and hasattr(obj, "tocsr")


def is_sparse(obj):
    return isinstance(obj, RowSparse) or _is_scipy_sparse(obj)


def checked_rows(grad, param, where):
    """Validate a sparse gradient against its parameter.

    Returns ``(indices int64 (nnz,), values (nnz, D) C-contiguous in the param's
    dtype)`` where ``D`` is the number of elements in a row; raises before anything
    is written.
    """
    if _is_scipy_sparse(grad):
        if param.ndim != 2:
            raise ValueError(f"{where}: a scipy.sparse gradient needs a 2-D parameter, "
                             f"got shape {param.shape}")
        if tuple(grad.shape) != tuple(param.shape):
            raise ValueError(f"{where}: sparse gradient shape {tuple(grad.shape)} does not "
                             f"match parameter shape {param.shape}")
        grad = RowSparse.from_scipy(grad)
    if param.ndim == 0:
        raise ValueError(f"{where}: a 0-d parameter cannot take a row-sparse gradient")
    idx, vals = grad.indices, grad.values
    row_shape = param.shape[1:]
    if vals.shape[1:] != row_shape:
        raise ValueError(f"{where}: RowSparse values shape {vals.shape} does not match "
                         f"(nnz, *param.shape[1:]) = ({idx.shape[0]}, "
                         f"{', '.join(map(str, row_shape))})")
    if vals.dtype.kind != "f" and not is_bf16(vals.dtype):
        raise TypeError(f"{where}: RowSparse values dtype {vals.dtype} is not a float dtype")
    nrows = param.shape[0]
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= nrows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{where}: sparse index {bad} is out of range for a parameter "
                             f"with {nrows} rows")
    idx = idx.astype(np.int64, copy=False)
    row_size = int(np.prod(row_shape, dtype=np.int64))
    # bfloat16 parameters: values widened to float32 (the compute dtype) once here
    vdt = np.float32 if is_bf16(param.dtype) else param.dtype
    vals = np.ascontiguousarray(vals, dtype=vdt).reshape(idx.shape[0], row_size)
    return idx, vals


@register_jitable
def _bits(n):
    """Bits needed to write the numbers below ``n`` (at least 1)."""
    bits = 1
    while (1 << bits) < n:
        bits += 1
    return bits


@register_jitable
def _radix_plan(idx, nrows, inverse, packed_bits=62):
    """The plan of :func:`coalesce_plan`; ``inverse`` (nnz,) receives the unique row
    of each gradient row when it is not empty.

    Each id and its position are packed into one int64 (``idx << pbits | i``) and
    the packed keys radix-sorted on the id bits: one array scattered per pass, not
    two.  Where ids and positions do not fit ``packed_bits`` (62) bits together
    (tables of billions of rows) NumPy's stable merge sort takes the place of the
    radix sort: the same plan."""
    n = idx.shape[0]
    rbits = _bits(nrows)
    pbits = _bits(n)
    pmask = (1 << pbits) - 1
    order = np.empty(n, dtype=np.int64)
    starts = np.empty(n, dtype=np.int64)      # where each run of equal ids starts
    nuniq = 0
    inv = inverse.shape[0] > 0
    if rbits + pbits <= packed_bits:
        passes = (rbits + 11) // 12
        width = (rbits + passes - 1) // passes
        mask = (1 << width) - 1
        a = np.empty(n, dtype=np.int64)
        b = np.empty(n, dtype=np.int64)
        count = np.zeros((passes, mask + 2), dtype=np.int64)
        for i in range(n):                    # pack, and count every pass's digits
            x = (idx[i] << pbits) | i
            a[i] = x
            for q in range(passes):
                count[q, ((x >> (pbits + q * width)) & mask) + 1] += 1
        for q in range(passes):
            shift = pbits + q * width
            c = count[q]
            for d in range(mask + 1):
                c[d + 1] += c[d]
            for i in range(n):
                x = a[i]
                d = (x >> shift) & mask
                j = c[d]
                b[j] = x
                c[d] = j + 1
            a, b = b, a
        prev = -1
        for i in range(n):                    # unpack, and find the segments
            k = a[i] >> pbits
            o = a[i] & pmask
            order[i] = o
            if k != prev:
                starts[nuniq] = i
                a[nuniq] = k                  # a[:i] is read: the unique ids go there
                nuniq += 1
                prev = k
            if inv:
                inverse[o] = nuniq - 1
        key = a
    else:
        order[:] = np.argsort(idx, kind="mergesort")
        key = np.empty(n, dtype=np.int64)
        for i in range(n):
            k = idx[order[i]]
            if i == 0 or k != key[nuniq - 1]:
                starts[nuniq] = i
                key[nuniq] = k
                nuniq += 1
            if inv:
                inverse[order[i]] = nuniq - 1
    seg = np.empty(nuniq + 1, dtype=np.int64)
    seg[:nuniq] = starts[:nuniq]
    seg[nuniq] = n
    return order, seg, key[:nuniq].copy()


@njit(cache=True, nogil=True)
def coalesce_plan(idx, nrows):
    """Stable radix argsort of row indices and the segments of equal rows.

    Returns ``(order, seg, uniq)``: ``idx[order]`` is sorted (ties in their original
    order), rows ``uniq[u]`` own positions ``order[seg[u]:seg[u + 1]]``.  An LSD
    radix sort of (index, position) pairs packed into one int64 each: as few passes
    of at most 12 bits as ``nrows`` needs (two for up to 16M rows), every pass's
    digits counted in the packing loop, each pass one scatter, the segments found
    while unpacking; O(nnz) per pass, no atomics, deterministic.
    """
    return _radix_plan(idx, nrows, np.empty(0, dtype=np.int64))


@njit(cache=True, nogil=True)
def row_plan(idx, nrows):
    """:func:`coalesce_plan` and ``inverse`` (nnz,) int64, the unique row of each
    gradient row (``uniq[inverse[i]] == idx[i]``), in the same pass over the sorted
    ids: the row drivers read the gradient rows in their own order through it."""
    inverse = np.empty(idx.shape[0], dtype=np.int64)
    order, seg, uniq = _radix_plan(idx, nrows, inverse)
    return order, seg, uniq, inverse


def coalesce(idx, vals, nrows):
    """Unique sorted rows and their summed values (the reference of coalescing)."""
    order, seg, uniq = coalesce_plan(idx, nrows)
    summed = np.empty((uniq.shape[0], vals.shape[1]), dtype=vals.dtype)
    for u in range(uniq.shape[0]):
        rows = order[seg[u]:seg[u + 1]]
        acc = vals[rows[0]].copy()
        for r in rows[1:]:
            acc += vals[r]
        summed[u] = acc
    return uniq, summed
