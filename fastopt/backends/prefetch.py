"""Software prefetch for the row drivers (LLVM's ``llvm.prefetch`` from Numba).

A sparse step touches rows scattered over tables much larger than the caches: the
parameter row and each used state row of every unique index, and the gradient rows
in the order the coalescing plan visits them.  Each is a cache miss the hardware
prefetcher cannot predict, and a loop that waits for them one row at a time runs
at memory latency, not bandwidth.  Issuing the loads of the row ``PREFETCH_AHEAD``
iterations ahead overlaps them with the current row's arithmetic (measured with a
standalone row kernel on the 2-core EPYC, one thread, CPU time: a lazy Adam step on
a 1M x 64 table with a fresh Zipf batch, 3.3 ms without and 2.7 ms with; see the
README's "Sparse at memory speed").

A prefetch is only a hint: it never faults and never changes a value, so results
are unchanged (and bounds-checked builds see no access).
"""

from .._jit import numba as _numba, register_jitable

_numba()   # a kernel module: numba now (and the registrations pending in fastopt._jit)
from llvmlite import binding, ir  # noqa: E402
from numba import types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic  # noqa: E402

#: unique rows ahead of the current one whose loads are issued.  Measured on the
#: 2-core EPYC (idle, lazy Adam, 1M x 64 table, fresh 16K Zipf batches, 2 threads,
#: medians of 720 interleaved steps): 0.547 ms with 2, 0.518 with 4, 0.517 with 8,
#: 0.516 with 16 (an earlier, slower host measured 2 best of 2, 4 and 8)
PREFETCH_AHEAD = 8
#: gradient rows ahead of the one being added whose loads are issued while a
#: repeated row's gradient rows are summed (``numba_cpu.summed_row``): 0.543 ms with
#: 12 against 0.569 ms without (the same run)
GATHER_AHEAD = 12
#: bytes per cache line
LINE = 64
#: the intrinsic's name: pointer-typed before LLVM 15's opaque pointers
_NAME = "llvm.prefetch.p0" if binding.llvm_version_info >= (15,) else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, arr, i, j):
    """Prefetch (for writing, into all cache levels) the line holding ``arr[i, j]``."""
    if not (isinstance(arr, types.Array) and arr.ndim == 2):
        return None
    return types.void(arr, i, j), _codegen


@intrinsic
def _prefetch1(typingctx, arr, i):
    """Prefetch (for writing, into all cache levels) the line holding ``arr[i]``."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1):
        return None
    return types.void(arr, i), _codegen


def _codegen(context, builder, signature, args):

    aryty = signature.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    idx = [context.cast(builder, a, t, types.intp)
           for a, t in zip(args[1:], signature.args[1:])]
    ptr = cgutils.get_item_pointer(context, builder, aryty, ary, idx, wraparound=False)
    i8p = ir.IntType(8).as_pointer()
    i32 = ir.IntType(32)
    fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
    fn = cgutils.get_or_insert_function(builder.module, fnty, _NAME)
    # rw = 1 (write), locality = 3 (keep in all levels), cache type = 1 (data)
    builder.call(fn, [builder.bitcast(ptr, i8p), i32(1), i32(3), i32(1)])
    return context.get_dummy_value()


@register_jitable
def prefetch_row(A, r):
    """Prefetch every cache line of row ``r`` of the 2-D C-contiguous array ``A``."""
    D = A.shape[1]
    step = max(1, LINE // A.itemsize)
    for j in range(0, D, step):
        _prefetch(A, r, j)
    if D:
        _prefetch(A, r, D - 1)   # a row that does not start on a line boundary


@register_jitable
def prefetch_span(A, lo, n):
    """Prefetch every cache line of ``A[lo:lo + n]`` (``A`` 1-D C-contiguous)."""
    step = max(1, LINE // A.itemsize)
    for j in range(lo, lo + n, step):
        _prefetch1(A, j)
    if n:
        _prefetch1(A, lo + n - 1)   # a span that does not start on a line boundary
