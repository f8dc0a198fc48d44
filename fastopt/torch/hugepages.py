"""Huge pages for large tables that take row-sparse gradients (Linux).

A sparse step touches a few thousand rows scattered over a table of hundreds of MB:
with 4 KiB pages nearly every row is a TLB miss and a page walk, with 2 MiB pages
the walks mostly hit the cache.  NumPy asks for transparent huge pages
(``madvise(MADV_HUGEPAGE)``) on its large allocations, so fastopt's state arrays and
NumPy tables get them when the kernel's THP mode is ``madvise``; torch's CPU
allocator does not (unless ``THP_MEM_ALLOC_ENABLE=1``), so an
``nn.Embedding(sparse=True)`` weight stepped through :mod:`fastopt.torch` would pay
the page walks the core does not.

:func:`advise` marks the 2 MiB-aligned part of an array's memory
``MADV_HUGEPAGE`` and asks the kernel to back it with huge pages now
(``MADV_COLLAPSE``, Linux 6.1+; the kernel copies the pages, the contents do not
change).  It is a hint: any failure (another OS, an older kernel, THP disabled,
no free huge pages) leaves the memory as it was and is ignored.  The torch adapter
calls it once per parameter memory of at least :data:`MIN_BYTES` the first time it
receives a sparse gradient; ``FASTOPT_HUGEPAGES=0`` turns it off.
"""

import ctypes
import os
import sys

#: parameters smaller than this are left alone (a few MB fit the TLB's reach anyway)
MIN_BYTES = 32 << 20
HUGE = 1 << 21
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25

_DONE = set()
_LAST = [None]      # the array advised (or found advised) last
_LIBC = []


def enabled():
    return sys.platform.startswith("linux") and os.environ.get("FASTOPT_HUGEPAGES", "1") != "0"


def _madvise():
    if not _LIBC:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _LIBC.append(fn)
    return _LIBC[0]


def advise(addr, nbytes):
    """Ask for huge pages on ``[addr, addr + nbytes)`` (its 2 MiB-aligned part);
    returns True when the kernel accepted the collapse."""
    fn = _madvise() if enabled() else None
    lo = (addr + HUGE - 1) & ~(HUGE - 1)
    hi = (addr + nbytes) & ~(HUGE - 1)
    if fn is None or hi <= lo:
        return False
    if fn(lo, hi - lo, MADV_HUGEPAGE) != 0:
        return False
    return fn(lo, hi - lo, MADV_COLLAPSE) == 0


def advise_once(array):
    """:func:`advise` a host array's memory the first time it is seen (arrays under
    :data:`MIN_BYTES` are skipped)."""
    if array is _LAST[0]:            # the same table as last step: nothing to look up
        return
    nbytes = array.nbytes
    if nbytes < MIN_BYTES:
        return
    key = (array.__array_interface__["data"][0], nbytes)
    if key not in _DONE:
        _DONE.add(key)
        advise(*key)
    _LAST[0] = array
