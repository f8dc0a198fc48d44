"""The ``"numba"`` backend: Numba ``njit(parallel=True)`` drivers around the element step.

Dense steps (:func:`make_dense_driver`): one parallel region over the tensor-chunks
of a bucket (:class:`~fastopt.backends.base.DenseWork`):

* ``ptrs``   int64 (T, 2 + NSLOTS): data addresses of param, grad and state slots
  (unused slots hold the param's address and are never touched);
* ``chunks`` int64 (C, 3): ``(tensor, start, stop)`` ranges of at most ``CHUNK``
  elements; ``prange`` runs over chunks, so 1,000 small tensors cost one parallel
  region, not 1,000 calls;
* ``hyper``  float64 (R, NSCALARS) scalar rows and ``hidx`` int64 (T,) the row of
  each tensor.

Row steps (:func:`make_rows_driver`): parallel over the unique touched rows of one
parameter; duplicates are summed in their order of appearance (deterministic);
in exact sparse mode each row is first caught up over its skipped steps (or only
caught up, for ``flush``); ``max_norm`` renormalizes each row right after its
update, while it is in cache.  Row-wise rules (:func:`make_rowwise_driver`) take
whole rows.

Every driver is a closure over the configuration (rule math, dtype, used slots,
fixed scalars, fused switches, serial or parallel), compiled once per
configuration and cached on disk by Numba (``cache=True``; the closure's cell
values are part of Numba's cache key, so ``PARALLEL`` and the rule's source stamp
are kept there: a serial build can never be loaded for a parallel driver).
``error_model="numpy"`` keeps IEEE division (and lets LLVM vectorize); no fastmath
flags, so NaN/Inf propagate.  Addresses, shapes and indices are validated by the
Python layer before a launch: the kernels do no bounds checks.
"""

import hashlib
import inspect

import numba
import numpy as np
from numba import carray, njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, register_jitable

from ..rules.fused import RENORM_EPS, renorm_row
from .base import Backend, may_use_threads
from .element import apply_catch_up, element_step, scalar_loader
from .prefetch import PREFETCH_AHEAD, prefetch_row

#: Elements per chunk: big enough to amortize the per-chunk setup, small enough to
#: balance 1,000 mid-size tensors over the threads.
CHUNK = 1 << 15
#: Below this many elements in a step, a serial driver is used (a parallel region
#: costs more than it saves).
PARALLEL_MIN = 1 << 15


@intrinsic
def _voidptr(typingctx, addr):
    """Reinterpret an integer address as a ``void*`` (for ``numba.carray``)."""
    sig = types.voidptr(types.intp)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


def _stamp(*fns):
    """A number that changes when the given functions' source changes (it is kept in
    a closure cell, so it is part of Numba's cache key)."""
    h = hashlib.sha256()
    for fn in fns:
        h.update(inspect.getsource(getattr(fn, "py_func", fn)).encode())
    return int(h.hexdigest()[:15], 16)


def _compile(fn, parallel):
    return njit(parallel=parallel, error_model="numpy", cache=True, nogil=True)(fn)


def make_dense_driver(config, parallel):
    """The chunked dense driver of one configuration."""
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    ITEM = np.dtype(config.dtype).itemsize
    U0, U1, U2 = (bool(u) for u in config.uses)
    assert not config.switches[5], "max_norm runs through the row driver"
    STAMP = _stamp(config.rule.math)
    PARALLEL = bool(parallel)

    def dense_driver(ptrs, chunks, hyper, hidx):
        stamp = STAMP  # noqa: F841  (the rule's source hash, in the cache key)
        par = PARALLEL  # noqa: F841  (serial and parallel builds never share a cache entry)
        zero = DT(0)
        for ci in prange(chunks.shape[0]):
            t = chunks[ci, 0]
            lo = chunks[ci, 1]
            n = chunks[ci, 2] - lo
            c = LOAD(hyper, hidx[t])
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
                p, s0, s1, s2 = STEP(P[i], G[i], s0, s1, s2, c, zero)
                P[i] = p
                if U0:
                    S0[i] = s0
                if U1:
                    S1[i] = s1
                if U2:
                    S2[i] = s2

    return _compile(dense_driver, parallel)


@register_jitable
def summed_row(vals, order, a, b, scratch, u):
    """The gradient of one touched row: ``vals[order[a]]`` or, with duplicates, the
    sum of ``vals[order[a:b]]`` added in order of appearance (deterministic) into
    ``scratch[u]`` (only then is ``scratch`` indexed)."""
    G = vals[order[a]]
    if b - a > 1:
        row = scratch[u]
        row[:] = G
        for k in range(a + 1, b):
            more = vals[order[k]]
            for j in range(row.shape[0]):
                row[j] += more[j]
        G = row
    return G


def make_rows_driver(config, parallel, catch, step):
    """The row driver of an element-wise rule: for each unique touched row, catch up
    (``catch``), then the element step with the row's summed gradient (``step``),
    then ``max_norm``.  ``P`` and the slots are (nrows, D) views (unused slots get
    ``P`` and are never touched); ``vals`` (nnz, D) gradient rows; ``coef`` (nuniq,
    4) float64 catch-up maps; ``scratch`` (nuniq, D) and ``inverse`` (nnz,) when
    rows repeat (duplicates are summed first, into ``scratch``), else empty;
    ``parts`` the number of tasks that sum them.  The rows ``PREFETCH_AHEAD`` unique rows ahead are prefetched."""
    STEP = element_step(config.rule.math, config.switches)
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    U0, U1, U2 = (bool(u) for u in config.uses)
    MX = bool(config.switches[5])
    EPS = DT(RENORM_EPS)
    CATCH, STEPPING = bool(catch), bool(step)
    STAMP = _stamp(config.rule.math)
    PARALLEL = bool(parallel)
    AHEAD = PREFETCH_AHEAD

    def rows_driver(P, S0, S1, S2, vals, order, seg, uniq, hyper, scratch, inverse, coef,
                    parts):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        zero = DT(0)
        D = P.shape[1]
        n = uniq.shape[0]
        dups = STEPPING and scratch.shape[0] > 0
        if dups:
            # Duplicates first: scratch[u] = the sum of the gradient rows of each
            # unique row u that repeats, in order of appearance (the first copied,
            # the others added one by one, as summed_row).  The gradient rows are
            # read in their own order (a stream the hardware prefetches) instead of
            # gathered group by group: inverse[i] is the unique row of gradient row
            # i, and each of ``parts`` tasks owns a contiguous range of unique rows
            # (split so that each holds about the same number of gradient rows: hot
            # rows repeat hundreds of times), so every sum is formed by one task in
            # the same order for any thread count.
            for u in prange(n):
                for k in range(seg[u], seg[u + 1]):
                    inverse[order[k]] = u
            nnz = order.shape[0]
            for t in prange(parts):
                # each task owns the unique rows of an equal share of gradient rows
                lo = np.searchsorted(seg, nnz * t // parts)
                hi = np.searchsorted(seg, nnz * (t + 1) // parts) if t + 1 < parts else n
                for i in range(inverse.shape[0]):
                    w = inverse[i]
                    if w < lo or w >= hi or seg[w + 1] - seg[w] == 1:
                        continue
                    row = scratch[w]
                    g = vals[i]
                    if i == order[seg[w]]:
                        for j in range(D):
                            row[j] = g[j]
                    else:
                        for j in range(D):
                            row[j] += g[j]
        for u in prange(n):
            # loaded inside the parallel loop: a NamedTuple that crosses into a parfor
            # cannot be typed by Numba's gufunc builder (and LLVM hoists the loads)
            c = LOAD(hyper, 0)
            if u + AHEAD < n:
                q = uniq[u + AHEAD]
                prefetch_row(P, q)
                if U0:
                    prefetch_row(S0, q)
                if U1:
                    prefetch_row(S1, q)
                if U2:
                    prefetch_row(S2, q)
                if STEPPING:
                    if seg[u + AHEAD + 1] - seg[u + AHEAD] == 1:
                        prefetch_row(vals, order[seg[u + AHEAD]])
            r = uniq[u]
            if CATCH:
                ca, cb, cc, ce = coef[u, 0], coef[u, 1], coef[u, 2], coef[u, 3]
                identity = ca == 1.0 and cb == 0.0 and cc == 0.0 and ce == 1.0
                for j in range(D if not identity else 0):
                    s = S0[r, j] if U0 else zero
                    p, s = apply_catch_up(P[r, j], s, ca, cb, cc, ce, DT)
                    P[r, j] = p
                    if U0:
                        S0[r, j] = s
            if STEPPING:
                a = seg[u]
                G = scratch[u] if dups and seg[u + 1] - a > 1 else vals[order[a]]
                for j in range(D):
                    s0 = S0[r, j] if U0 else zero
                    s1 = S1[r, j] if U1 else zero
                    s2 = S2[r, j] if U2 else zero
                    p, s0, s1, s2 = STEP(P[r, j], G[j], s0, s1, s2, c, zero)
                    P[r, j] = p
                    if U0:
                        S0[r, j] = s0
                    if U1:
                        S1[r, j] = s1
                    if U2:
                        S2[r, j] = s2
                if MX:
                    renorm_row(P[r], c, zero, EPS)

    return _compile(rows_driver, parallel)


def make_rowwise_driver(config, parallel):
    """The driver of a row-wise rule (one state value per row): parallel over the
    touched rows; the rule math works on whole rows, the fused options around it
    (gradient side into a scratch row, parameter side after the row's update)."""
    MATH = config.rule.math
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    SC, CL, L1, LO, HI, MX = (bool(s) for s in config.switches)
    from ..rules.fused import post, pre
    PRE = SC or CL
    POST = L1 or LO or HI
    EPS = DT(RENORM_EPS)
    STAMP = _stamp(MATH)
    PARALLEL = bool(parallel)

    def rowwise_driver(P, S0, vals, order, seg, uniq, hyper, scratch):
        stamp = STAMP  # noqa: F841
        par = PARALLEL  # noqa: F841
        zero = DT(0)
        inv_d = DT(1) / DT(P.shape[1])
        for u in prange(uniq.shape[0]):
            c = LOAD(hyper, 0)        # inside the parallel loop: see rows_driver
            r = uniq[u]
            G = summed_row(vals, order, seg[u], seg[u + 1], scratch, u)
            if PRE:                       # scaled / clipped copy of the gradient row
                buf = scratch[u]
                for j in range(G.shape[0]):
                    buf[j] = pre(G[j], c, SC, CL)
                G = buf
            prow = P[r]
            S0[r] = MATH(prow, G, S0[r], inv_d, zero, c)
            if POST:
                for j in range(prow.shape[0]):
                    prow[j] = post(prow[j], c, zero, L1, LO, HI)
            if MX:
                renorm_row(prow, c, zero, EPS)

    return _compile(rowwise_driver, parallel)


_DRIVERS = {}


def _driver(factory, config, parallel, *extra):
    key = (factory.__name__, config, bool(parallel)) + extra
    d = _DRIVERS.get(key)
    if d is None:
        d = _DRIVERS[key] = factory(config, parallel, *extra)
    return d


def make_chunks(sizes, chunk=CHUNK):
    """Chunk table (tensor, start, stop) for tensors of the given element counts."""
    rows = []
    for t, n in enumerate(sizes):
        for lo in range(0, n, chunk):
            rows.append((t, lo, min(lo + chunk, n)))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


_EMPTY_COEF = np.zeros((0, 4), dtype=np.float64)


def run_rows(work):
    """Run a :class:`~fastopt.backends.base.RowsWork` on the CPU (serial below
    PARALLEL_MIN touched elements)."""
    cfg = work.config
    p = work.param
    nrows = p.shape[0]
    P = p.reshape(nrows, -1)
    D = P.shape[1]
    uniq = work.uniq
    if uniq.shape[0] == 0 or D == 0:
        return
    parallel = uniq.shape[0] * D >= PARALLEL_MIN and may_use_threads()
    dups = work.vals is not None and work.order.shape[0] > uniq.shape[0]
    if cfg.rule.layout == "rowwise":
        pre = cfg.switches[0] or cfg.switches[1]
        scratch = np.empty((uniq.shape[0] if (dups or pre) else 0, D), dtype=p.dtype)
        _driver(make_rowwise_driver, cfg, parallel)(
            P, work.slots[0].reshape(nrows), work.vals, work.order, work.seg, uniq,
            work.hyper, scratch)
        return
    S = [s.reshape(nrows, -1) if s is not None else P for s in work.slots]
    scratch = np.empty((uniq.shape[0] if dups else 0, D), dtype=p.dtype)
    inverse = np.empty(work.order.shape[0] if dups else 0, dtype=np.int64)
    catch = work.catch is not None
    step = work.vals is not None
    vals = work.vals if step else P
    order = work.order if step else uniq
    seg = work.seg if step else uniq
    coef = work.catch.coef if catch else _EMPTY_COEF
    parts = numba.get_num_threads() if parallel else 1
    _driver(make_rows_driver, cfg, parallel, catch, step)(
        P, S[0], S[1], S[2], vals, order, seg, uniq, work.hyper, scratch, inverse, coef,
        parts)


def _count_nonfinite_impl(a, scale):
    n = a.shape[0]
    nblocks = (n + CHUNK - 1) // CHUNK
    bad = 0
    for b in prange(nblocks):
        lo = b * CHUNK
        hi = min(lo + CHUNK, n)
        k = 0
        for i in range(lo, hi):
            x = a[i] / scale
            if x - x != 0:          # Inf - Inf and NaN - NaN are NaN; finite x - x is 0
                k += 1
        bad += k
    return bad


_count_nonfinite = njit(parallel=True, cache=True, nogil=True)(_count_nonfinite_impl)


@njit(cache=True, nogil=True)
def _first_nonfinite(a, scale):
    for i in range(a.shape[0]):
        x = a[i] / scale
        if x - x != 0:
            return i
    return -1


def all_finite(a, grad_scale=None):
    """True when the 1-D array ``a`` divided by ``grad_scale`` (in ``a``'s dtype, as
    the update pass divides) has no Inf/NaN (parallel above PARALLEL_MIN)."""
    scale = a.dtype.type(1.0 if grad_scale is None else grad_scale)
    if a.shape[0] >= PARALLEL_MIN and may_use_threads():
        return _count_nonfinite(a, scale) == 0
    return _first_nonfinite(a, scale) < 0


class NumbaBackend(Backend):
    """Numba CPU drivers; every feature of :data:`fastopt.backends.base.FEATURES`."""

    name = "numba"

    def run_dense(self, work):
        if work.nelem:
            parallel = work.nelem >= PARALLEL_MIN and may_use_threads()
            cached = work.__dict__.get("_numba_driver")
            if cached is None or cached[0] != (work.config, parallel):
                cached = work._numba_driver = ((work.config, parallel), _driver(
                    make_dense_driver, work.config, parallel))
            cached[1](work.ptrs, work.chunks, work.hyper, work.hidx)

    def run_rows(self, work):
        if work.catch is not None and work.catch.coef is None:
            raise ValueError("exact-mode work without its catch-up maps")
        run_rows(work)
