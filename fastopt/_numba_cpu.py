"""Numba CPU driver: one parallel region over tensor-chunks for all parameters.

A launch receives

* ``ptrs``   int64 (T, 2 + NSLOTS): data addresses of param, grad and state slots of
  the T tensors in this launch (unused slots hold the param's address and are
  never touched);
* ``chunks`` int64 (C, 3): ``(tensor, start, stop)`` element ranges of at most
  ``CHUNK`` elements; ``prange`` runs over chunks, so 1,000 small tensors cost one
  parallel region, not 1,000 calls;
* ``hyper``  float64 (R, NSCALARS): per-step host scalars, one row per distinct
  (group, step) and ``hidx`` int64 (T,): the row of each tensor.

The driver is a closure over the rule's math (a ``register_jitable`` function),
the dtype and which slots are used; Numba folds those constants, so each rule gets
a specialized, vectorized loop.  Closures whose cells hold only picklable constants
are cached on disk by Numba (``cache=True``; Numba falls back to a per-user cache
directory when the package directory is read-only).  ``error_model="numpy"`` keeps
IEEE division (and lets LLVM vectorize); no fastmath flags, so NaN/Inf propagate.

Addresses are validated by the Python layer (shapes, dtypes, contiguity, sizes)
before a launch: the kernels do no bounds checks.
"""

import hashlib
import inspect

import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .registry import NSCALARS, NSLOTS

#: Elements per chunk: big enough to amortize the per-chunk setup, small enough to
#: balance 1,000 mid-size tensors over the threads.
CHUNK = 1 << 15
#: Below this many elements in a step, a serial driver is used (a parallel region
#: costs more than it saves).
PARALLEL_MIN = 1 << 15

assert NSCALARS == 12 and NSLOTS == 3


@intrinsic
def _voidptr(typingctx, addr):
    """Reinterpret an integer address as a ``void*`` (for ``numba.carray``)."""
    sig = types.voidptr(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


def _stamp(fn):
    """A number that changes when the rule's source changes (part of the cache key)."""
    src = inspect.getsource(getattr(fn, "py_func", fn))
    return int(hashlib.sha256(src.encode()).hexdigest()[:15], 16)


def make_driver(math, dtype, uses, const, parallel):
    """Compile (or load from cache) the chunked driver for one rule configuration.

    ``const``: ``((index, value), ...)`` per-step scalars that are fixed for this
    configuration (option flags, zero weight decay); they become compile-time
    constants, so the branches they control vanish from the vectorized loop.
    """
    MATH = math
    DT = np.dtype(dtype).type
    ITEM = np.dtype(dtype).itemsize
    U0, U1, U2 = (bool(u) for u in uses)
    STAMP = _stamp(math)
    fixed = dict(const)
    F0, F1, F2, F3, F4, F5, F6, F7, F8, F9, F10, F11 = (k in fixed for k in range(NSCALARS))
    K0, K1, K2, K3, K4, K5, K6, K7, K8, K9, K10, K11 = (DT(fixed.get(k, 0.0))
                                                       for k in range(NSCALARS))

    def driver(ptrs, chunks, hyper, hidx):
        stamp = STAMP  # noqa: F841  (keeps the rule's source hash in the cache key)
        zero = DT(0)
        for ci in prange(chunks.shape[0]):
            t = chunks[ci, 0]
            lo = chunks[ci, 1]
            n = chunks[ci, 2] - lo
            r = hidx[t]
            c = (K0 if F0 else DT(hyper[r, 0]), K1 if F1 else DT(hyper[r, 1]),
                 K2 if F2 else DT(hyper[r, 2]), K3 if F3 else DT(hyper[r, 3]),
                 K4 if F4 else DT(hyper[r, 4]), K5 if F5 else DT(hyper[r, 5]),
                 K6 if F6 else DT(hyper[r, 6]), K7 if F7 else DT(hyper[r, 7]),
                 K8 if F8 else DT(hyper[r, 8]), K9 if F9 else DT(hyper[r, 9]),
                 K10 if F10 else DT(hyper[r, 10]), K11 if F11 else DT(hyper[r, 11]))
            off = lo * ITEM
            P = carray(_voidptr(ptrs[t, 0] + off), (n,), DT)
            G = carray(_voidptr(ptrs[t, 1] + off), (n,), DT)
            S0 = carray(_voidptr(ptrs[t, 2] + off), (n,), DT)
            S1 = carray(_voidptr(ptrs[t, 3] + off), (n,), DT)
            S2 = carray(_voidptr(ptrs[t, 4] + off), (n,), DT)
            for i in range(n):
                s0 = S0[i] if U0 else zero
                s1 = S1[i] if U1 else zero
                s2 = S2[i] if U2 else zero
                p, s0, s1, s2 = MATH(P[i], G[i], s0, s1, s2, c)
                P[i] = p
                if U0:
                    S0[i] = s0
                if U1:
                    S1[i] = s1
                if U2:
                    S2[i] = s2

    return njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)(driver)


_DRIVERS = {}


def driver_for(math, dtype, uses, const, parallel):
    key = (math, np.dtype(dtype).str, tuple(bool(u) for u in uses), const, bool(parallel))
    d = _DRIVERS.get(key)
    if d is None:
        d = _DRIVERS[key] = make_driver(math, dtype, uses, const, parallel)
    return d


def launch(math, dtype, uses, const, ptrs, chunks, hyper, hidx, nelem):
    """Run one driver over the given chunk table (serial below PARALLEL_MIN)."""
    driver_for(math, dtype, uses, const, nelem >= PARALLEL_MIN)(ptrs, chunks, hyper, hidx)


def make_chunks(sizes, chunk=CHUNK):
    """Chunk table (tensor, start, stop) for tensors of the given element counts."""
    rows = []
    for t, n in enumerate(sizes):
        for lo in range(0, n, chunk):
            rows.append((t, lo, min(lo + chunk, n)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)
