"""The machine's memory bandwidth, measured once per run (STREAM-like).

Three kernels over float64 arrays far larger than the last-level cache, parallel
over Numba's threads (the threads fastopt's kernels use):

* ``copy``:  ``b[i] = a[i]``          16 bytes per element (read a, write b);
* ``triad``: ``a[i] = b[i] + s c[i]`` 24 bytes per element (read b, c, write a);
* ``update``: ``a[i] = a[i] + b[i]``   24 bytes per element (read a and b, write a in
  place: the access pattern of an optimizer step, whose streams are read and
  written back where they are).

Bytes are counted as STREAM counts them (no write-allocate traffic).  The best of
``repeats`` runs of each is reported; the bound the report divides each step's
bytes by is the fastest of the three (``bound``), so that it is an upper limit for
every access pattern a step has, not the speed of one of them.
"""

import time

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, nogil=True)
def _copy(a, b):
    for i in prange(a.shape[0]):
        b[i] = a[i]


@njit(parallel=True, cache=True, nogil=True)
def _triad(a, b, c, s):
    for i in prange(a.shape[0]):
        a[i] = b[i] + s * c[i]


@njit(parallel=True, cache=True, nogil=True)
def _update(a, b):
    for i in prange(a.shape[0]):
        a[i] = a[i] + b[i]


def last_level_cache():
    """Bytes of the largest CPU cache Linux reports (0 when unknown)."""
    import glob
    best = 0
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            pass
    return best


def measure(nbytes=None, repeats=20):
    """``{"copy", "triad", "update", "bound": GB/s, "array_bytes": ...}`` (best of
    ``repeats`` each; ``bound`` the fastest).
    ``nbytes``: bytes per array (default: 8x the last-level cache, at least 256 MiB)."""
    if nbytes is None:
        nbytes = max(256 * 2 ** 20, 8 * last_level_cache())
    n = nbytes // 8
    a = np.ones(n)
    b = np.full(n, 2.0)
    c = np.full(n, 0.5)
    _copy(a, b)
    _triad(a, b, c, 3.0)
    _update(c, b)
    out = {}
    for name, fn, per in (("copy", lambda: _copy(a, b), 16),
                          ("triad", lambda: _triad(a, b, c, 3.0), 24),
                          ("update", lambda: _update(c, b), 24)):
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = per * n / best / 1e9
    out["bound"] = max(out["copy"], out["triad"], out["update"])
    out["array_bytes"] = int(n * 8)
    return out
