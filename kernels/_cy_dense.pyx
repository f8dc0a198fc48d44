# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# distutils: extra_compile_args = -ffp-contract=off -fno-math-errno -fno-trapping-math
"""Cython drivers (compiled into ``fastopt._cy_dense``): the Numba CPU drivers' twin.

Three entry points, each the twin of a driver of ``fastopt/backends/numba_cpu.py``
(same tables, same loops, same operations in the same order and dtype, so the
results are bit-identical):

* :func:`run_dense` (``make_dense_driver``): a bucket of tensors described by

  - ``ptrs``   int64 (T, 2 + NSLOTS): data addresses of param, grad and the state
    slots (an unused slot holds the param's address and is never read or written);
  - ``chunks`` int64 (C, 3): ``(tensor, start, stop)`` element ranges;
  - ``hyper``  float64 (R, NSCALARS): per-step scalars, one row per (group, step),
    columns = the fields of the rule's ``Scalars`` (``_cy_scalars.pxi``);
  - ``hidx``   int64 (T,): the ``hyper`` row of each tensor;

* :func:`run_rows` (``make_rows_driver``): the touched rows of one parameter of an
  element-wise rule, with duplicate gradient rows summed, optionally caught up
  first over skipped steps (exact sparse mode) or only caught up (flush), and
  ``max_norm`` applied to each row right after its update;
* :func:`run_rowwise` (``make_rowwise_driver``): a row-wise rule (one state value
  per row) on the rows of a plan.

Parallelism as in Numba: one OpenMP parallel region (``prange`` over chunks or
rows, GIL released) at or above ``parallel_min`` elements, a serial loop (GIL
released) below.  Each row/element is written by one thread only, so the result
does not depend on the thread count or the schedule.

Specialization is done with fused types, so there is one element loop written
once: the dtype (``floating``), the rule (a fused set of empty tag structs) and
whether each state slot is used (fused ``Yes``/``No`` tags) are compile-time
constants inside every specialized loop, as Numba's closure constants are; a
runtime dispatch on (rule id, used-slot code, dtype) picks the loop once per
chunk or row.  Unused slots are passed to the math as zero and their results
dropped, exactly as in Numba.

Fused options (``opts``: a bit mask, ``OPT_*`` in ``_cy_rules.pxd``, in the order
of ``fastopt.rules.fused.SWITCHES``): without any, a chunk or row runs the element
loop alone, as before options existed.  With some, it is cut into
blocks of ``BLOCK`` elements, and each block runs three passes while it is in
cache: ``pre_pass`` (``g / grad_scale``, clip) of the gradients into a stack
buffer, the same element loop, ``post_pass`` (L1, clamps) of the parameters;
``max_norm`` then renormalizes the whole row.  Each element goes through the same
operations in the same order as in Numba's fused element step, and every pass
vectorizes (see ``_cy_rules.pxd``).

Rule ids: the index in :data:`MATH_NAMES` (element-wise) or :data:`ROWWISE_NAMES`
(row-wise) of the rule module's name (``fastopt/rules/<name>.py``);
:data:`MATH_SCALARS` / :data:`ROWWISE_SCALARS` say whose ``Scalars`` columns each
math reads, :data:`COLUMNS` the column of every constant this build was compiled
with; the backend (``fastopt/backends/cython.py``) checks all three against the
registry when it loads.

Compiled with ``-ffp-contract=off`` (no FMA contraction, so results match the
Python rule math and Numba bit for bit on every CPU), ``-fno-math-errno``
(``sqrt`` needs no ``errno`` branch and vectorizes) and ``-fno-trapping-math``
(selects on floating-point comparisons if-convert, so the option passes
vectorize); the last two change no value, only ``errno`` and the floating-point
exception flags, which nothing reads (LLVM, under Numba, assumes the same).  No
fast-math flags.  The tables and plans are checked here (cheap O(T + C) and
O(nnz) loops); the addresses are trusted: the Python layer validates shapes,
dtypes and contiguity.
"""

from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t, intptr_t
from libc.stdlib cimport free, malloc
cimport openmp

from cython cimport floating
from _cy_rules cimport (
    NSCALARS, F_GRAD_SCALE, F_CLIP_VALUE, F_L1_THRESHOLD, F_PARAM_MIN, F_PARAM_MAX,
    F_MAX_NORM, OPT_GRAD_SCALE, OPT_CLIP, OPT_L1, OPT_MIN, OPT_MAX, OPT_MAX_NORM,
    OPT_PRE, OPT_POST, OPT_ELEMENT, pre_pass, post_pass, renorm_row)
# (each rule's math is cimported by the generated _cy_dispatch.pxi below)
cimport _cy_rules as K

cdef enum:
    NSLOTS = 3             # fastopt.rules.NSLOTS (checked by the backend)
    NCOLS = 2 + NSLOTS     # param, grad, state slots
    BLOCK = 512            # elements per block of the option passes (2-4 KiB a buffer)

#: width of the scalar table this build reads (``fastopt.rules.NSCALARS``)
NSCALARS_BUILT = NSCALARS
#: state slots per element (``fastopt.rules.NSLOTS``)
NSLOTS_BUILT = NSLOTS

#: the option bits, in the order of ``fastopt.rules.fused.SWITCHES``
OPTION_BITS = (OPT_GRAD_SCALE, OPT_CLIP, OPT_L1, OPT_MIN, OPT_MAX, OPT_MAX_NORM)

# ---------------------- rule ids, names, tags, the dispatches on them (generated)
# kernels/_cy_dispatch.pxi is written by fastopt.rules.cython_dispatch_pxi() from
# the rule registry (tests/test_layout.py keeps it current)
include "_cy_dispatch.pxi"

#: dtype codes of the entry points
DTYPE_CODES = {"float32": 0, "float64": 1}

# ------------------------------------------------- used-slot tags (fused)
cdef struct Yes:
    char _
cdef struct No:
    char _

ctypedef fused U0:
    Yes
    No

ctypedef fused U1:
    Yes
    No

ctypedef fused U2:
    Yes
    No

cdef Yes YES
cdef No NO


# ------------------------------------------------------------- the one loop
cdef void _loop(RuleTag tag, U0 u0, U1 u1, U2 u2, floating* P, const floating* G,
                floating* S0, floating* S1, floating* S2, Py_ssize_t n,
                const floating* c) noexcept nogil:
    """The element loop of one chunk, row or block, specialized on rule, dtype and
    used slots.

    The scalars are copied into a local array first: the compiler then knows no
    store to the tensors can change them, keeps them in registers, and can
    if-convert the rule's flag tests and vectorize the loop.
    """
    cdef Py_ssize_t i
    cdef int k
    cdef floating p, s0, s1, s2
    cdef floating zero = 0
    cdef floating cl[NSCALARS]
    for k in range(NSCALARS):
        cl[k] = c[k]
    for i in range(n):
        p = P[i]
        if U0 is Yes:
            s0 = S0[i]
        else:
            s0 = zero
        if U1 is Yes:
            s1 = S1[i]
        else:
            s1 = zero
        if U2 is Yes:
            s2 = S2[i]
        else:
            s2 = zero
        _math(tag, &p, G[i], &s0, &s1, &s2, cl)
        P[i] = p
        if U0 is Yes:
            S0[i] = s0
        if U1 is Yes:
            S1[i] = s1
        if U2 is Yes:
            S2[i] = s2


cdef void _by_uses(RuleTag tag, int ucode, floating* P, const floating* G, floating* S0,
                   floating* S1, floating* S2, Py_ssize_t n,
                   const floating* c) noexcept nogil:
    """Dispatch on the used-slot code (bit k set: slot k used)."""
    if ucode == 0:
        _loop(tag, NO, NO, NO, P, G, S0, S1, S2, n, c)
    elif ucode == 1:
        _loop(tag, YES, NO, NO, P, G, S0, S1, S2, n, c)
    elif ucode == 2:
        _loop(tag, NO, YES, NO, P, G, S0, S1, S2, n, c)
    elif ucode == 3:
        _loop(tag, YES, YES, NO, P, G, S0, S1, S2, n, c)
    elif ucode == 4:
        _loop(tag, NO, NO, YES, P, G, S0, S1, S2, n, c)
    elif ucode == 5:
        _loop(tag, YES, NO, YES, P, G, S0, S1, S2, n, c)
    elif ucode == 6:
        _loop(tag, NO, YES, YES, P, G, S0, S1, S2, n, c)
    else:
        _loop(tag, YES, YES, YES, P, G, S0, S1, S2, n, c)


cdef void _step(floating zero, int rule, int ucode, int opts, floating* P, const floating* G,
                floating* S0, floating* S1, floating* S2, Py_ssize_t n,
                const floating* c) noexcept nogil:
    """``n`` elements through Numba's element step: ``pre``, the rule's math,
    ``post`` (the element-wise bits of ``opts``).  Without options, the element
    loop alone; with some, blocks of ``BLOCK`` elements, each through the three
    passes while it is in cache."""
    cdef floating buf[BLOCK]
    cdef const floating* g
    cdef Py_ssize_t i, m
    if not (opts & OPT_ELEMENT):
        _by_rule(rule, ucode, P, G, S0, S1, S2, n, c)
        return
    i = 0
    while i < n:
        m = min(<Py_ssize_t>BLOCK, n - i)
        g = G + i
        if opts & OPT_PRE:
            pre_pass(buf, g, m, c, opts)
            g = buf
        _by_rule(rule, ucode, P + i, g, S0 + i, S1 + i, S2 + i, m, c)
        if opts & OPT_POST:
            post_pass(P + i, m, c, zero, opts)
        i += m


cdef inline void _load_scalars(floating* c, const double* h) noexcept nogil:
    """A row of the float64 table in the dtype (the Numba loader's ``DT(hyper[r, k])``)."""
    cdef int k
    for k in range(NSCALARS):
        c[k] = <floating>h[k]


# ------------------------------------------------------------- dense driver
cdef void _chunk(floating zero, int rule, int ucode, int opts, const int64_t* ptrs,
                 const int64_t* chunk, const double* hyper,
                 const int64_t* hidx) noexcept nogil:
    """Run one chunk row ``(tensor, start, stop)``; ``zero`` only selects the dtype."""
    cdef int64_t t = chunk[0]
    cdef int64_t lo = chunk[1]
    cdef Py_ssize_t n = <Py_ssize_t>(chunk[2] - lo)
    cdef const int64_t* row = ptrs + t * NCOLS
    cdef floating c[NSCALARS]
    _load_scalars(c, hyper + hidx[t] * NSCALARS)
    _step(zero, rule, ucode, opts,
          (<floating*><intptr_t>row[0]) + lo,
          (<const floating*><intptr_t>row[1]) + lo,
          (<floating*><intptr_t>row[2]) + lo,
          (<floating*><intptr_t>row[3]) + lo,
          (<floating*><intptr_t>row[4]) + lo,
          n, c)


cdef inline void _run_chunk(int dtype_code, int rule, int ucode, int opts, const int64_t* ptrs,
                            const int64_t* chunk, const double* hyper,
                            const int64_t* hidx) noexcept nogil:
    if dtype_code == 0:
        _chunk(<float>0, rule, ucode, opts, ptrs, chunk, hyper, hidx)
    else:
        _chunk(<double>0, rule, ucode, opts, ptrs, chunk, hyper, hidx)


cdef int _check_common(str who, int rule_id, int nrules, int dtype_code, int opts,
                       Py_ssize_t ncols, bint rows) except -1:
    if not 0 <= rule_id < nrules:
        raise ValueError(f"{who}: unknown rule id {rule_id} (0..{nrules - 1})")
    if dtype_code not in (0, 1):
        raise ValueError(f"{who}: unknown dtype code {dtype_code} (0 float32, 1 float64)")
    if opts & ~(OPT_ELEMENT | OPT_MAX_NORM):
        raise ValueError(f"{who}: unknown option bits in {opts:#x}")
    if (opts & OPT_MAX_NORM) and not rows:
        raise ValueError(f"{who}: max_norm needs whole rows (run_rows)")
    if ncols != NSCALARS:
        raise ValueError(f"{who}: hyper has {ncols} columns, this build reads "
                         f"NSCALARS = {NSCALARS} (rebuild the extension after changing "
                         f"the rules' Scalars)")
    return 0


def run_dense(int rule_id, int dtype_code, bint uses0, bint uses1, bint uses2, int opts,
              const int64_t[:, ::1] ptrs, const int64_t[:, ::1] chunks,
              const double[:, ::1] hyper, const int64_t[::1] hidx,
              Py_ssize_t nelem, Py_ssize_t parallel_min):
    """Run rule ``rule_id`` (index in :data:`MATH_NAMES`) over every chunk.

    ``dtype_code``: 0 float32, 1 float64 (:data:`DTYPE_CODES`).  ``uses0..2``: which
    state slots this bucket's configuration uses.  ``opts``: the element-wise
    option bits (:data:`OPTION_BITS` but max_norm).  A parallel region (``prange``,
    static schedule) is used when ``nelem >= parallel_min``, else a serial loop; the
    GIL is released either way.  The tables are validated (shapes, tensor and row
    indices, chunk bounds); the addresses in ``ptrs`` are trusted.
    """
    cdef Py_ssize_t T = ptrs.shape[0], C = chunks.shape[0], R = hyper.shape[0]
    cdef Py_ssize_t ci, t, bad = -1
    cdef int ucode = (1 if uses0 else 0) | (2 if uses1 else 0) | (4 if uses2 else 0)
    _check_common("run_dense", rule_id, R_COUNT, dtype_code, opts, hyper.shape[1], False)
    if ptrs.shape[1] != NCOLS or chunks.shape[1] != 3:
        raise ValueError(f"run_dense: tables must be ptrs (T, {NCOLS}), chunks (C, 3)")
    if hidx.shape[0] != T:
        raise ValueError(f"run_dense: hidx has {hidx.shape[0]} rows for {T} tensors")
    if C == 0:
        return
    with nogil:
        for t in range(T):
            if not 0 <= hidx[t] < R:
                bad = t
                break
    if bad >= 0:
        raise IndexError(f"run_dense: hidx[{bad}] = {hidx[bad]} is not a row of hyper "
                         f"({R} rows)")
    with nogil:
        for ci in range(C):
            if not (0 <= chunks[ci, 0] < T and 0 <= chunks[ci, 1] <= chunks[ci, 2]):
                bad = ci
                break
    if bad >= 0:
        raise IndexError(f"run_dense: bad chunk row {bad}: "
                         f"{(chunks[bad, 0], chunks[bad, 1], chunks[bad, 2])} ({T} tensors)")

    cdef const int64_t* pp = &ptrs[0, 0]
    cdef const int64_t* cp = &chunks[0, 0]
    cdef const double* hp = &hyper[0, 0]
    cdef const int64_t* ip = &hidx[0]
    if nelem >= parallel_min:
        for ci in prange(C, nogil=True, schedule="static"):
            _run_chunk(dtype_code, rule_id, ucode, opts, pp, cp + 3 * ci, hp, ip)
    else:
        with nogil:
            for ci in range(C):
                _run_chunk(dtype_code, rule_id, ucode, opts, pp, cp + 3 * ci, hp, ip)


# ------------------------------------------------------- row-sparse driver
#
# Twin of ``numba_cpu.make_rows_driver``: one task per unique row ``uniq[u]``:
#
# 1. exact mode: catch up over the skipped steps with row ``u`` of ``coef``
#    (``(a, b, c, e)``, float64): ``p, s0 = DT(a p + b s0), DT(c p + e s0)`` per
#    element, formed in double with zero-coefficient terms left out (``s0`` is zero,
#    not stored, when slot 0 is unused), as ``element.apply_catch_up``; a row whose
#    map is the identity is skipped;
# 2. the step (not for a flush): the gradient rows ``vals[order[seg[u]:seg[u + 1]]]``
#    (one used in place; duplicates summed into a scratch row, the first copied and
#    the others added one by one in order of appearance) through the element loop;
# 3. ``max_norm``: the row renormalized right after its update, while in cache.
#
# Rows are distinct (``uniq`` strictly increasing, checked) and each is written by
# exactly one thread: no atomics, no dependence on the thread count or schedule.
# The scratch is one row per thread (not per unique row as in Numba: same values).

cdef inline double _term(double k, double x) noexcept nogil:
    """``element._term``: ``k * x``, where a zero coefficient contributes an exact zero
    (an Inf or NaN the skipped steps never mixed in cannot leak through ``0 * x``)."""
    if k == 0.0:
        return 0.0
    return k * x


cdef inline void _catch_row(floating* P, floating* S, Py_ssize_t D, const double* k,
                            bint u0, floating zero) noexcept nogil:
    """``element.apply_catch_up`` over a row; a row whose map is exactly the identity
    is left as it is (not rewritten)."""
    cdef double a = k[0], b = k[1], c = k[2], e = k[3]
    cdef double p, s
    cdef Py_ssize_t j
    if a == 1.0 and b == 0.0 and c == 0.0 and e == 1.0:
        return
    if u0:
        for j in range(D):
            p = P[j]
            s = S[j]
            P[j] = <floating>(_term(a, p) + _term(b, s))
            S[j] = <floating>(_term(c, p) + _term(e, s))
    else:
        s = zero
        for j in range(D):
            P[j] = <floating>(_term(a, P[j]) + _term(b, s))


cdef inline void _one_row(floating zero, int rule, int ucode, int opts, bint stepping,
                          floating* P, const floating* V, floating* S0, floating* S1,
                          floating* S2, Py_ssize_t D, const int64_t* order, const int64_t* seg,
                          Py_ssize_t u, int64_t r, const double* coef, floating* buf,
                          const floating* c, floating eps) noexcept nogil:
    cdef const floating* G
    cdef const floating* row
    cdef int64_t k, a, b
    cdef Py_ssize_t j
    cdef int64_t off = r * D
    if coef != NULL:
        _catch_row(P + off, S0 + off, D, coef + 4 * u, ucode & 1, zero)
    if not stepping:
        return
    a = seg[u]
    b = seg[u + 1]
    G = V + order[a] * D
    if b - a > 1:           # duplicates: sum whole rows, in order of appearance
        for j in range(D):
            buf[j] = G[j]
        for k in range(a + 1, b):
            row = V + order[k] * D
            for j in range(D):
                buf[j] = buf[j] + row[j]
        G = buf
    _step(zero, rule, ucode, opts, P + off, G, S0 + off, S1 + off, S2 + off, D, c)
    if opts & OPT_MAX_NORM:
        renorm_row(P + off, D, c, zero, eps)


cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define FASTOPT_PREFETCH(p) __builtin_prefetch((const void*)(p), 1, 3)
    #else
    #define FASTOPT_PREFETCH(p) ((void)0)
    #endif
    """
    void FASTOPT_PREFETCH(const void* p) noexcept nogil


#: unique rows ahead whose lines are prefetched (as fastopt.backends.prefetch)
cdef enum:
    PREFETCH_AHEAD = 2


cdef inline void _prefetch_row(const char* row, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t off = 0
    while off < nbytes:
        FASTOPT_PREFETCH(row + off)
        off += 64
    if nbytes:
        FASTOPT_PREFETCH(row + nbytes - 1)


cdef inline void _prefetch_ahead(floating zero, int ucode, bint stepping, floating* P,
                                 const floating* V, floating* S0, floating* S1,
                                 floating* S2, Py_ssize_t D, const int64_t* order,
                                 const int64_t* seg, const int64_t* uniq, Py_ssize_t u,
                                 Py_ssize_t nuniq) noexcept nogil:
    """The twin of the Numba row driver's prefetch: the parameter and used state rows
    of unique row ``u + PREFETCH_AHEAD``, and its gradient row when it is alone (a
    hint only: it never faults and changes no value)."""
    cdef Py_ssize_t v = u + PREFETCH_AHEAD
    cdef int64_t off
    cdef Py_ssize_t nbytes = D * sizeof(floating)
    if v >= nuniq:
        return
    off = uniq[v] * D
    _prefetch_row(<const char*>(P + off), nbytes)
    if ucode & 1:
        _prefetch_row(<const char*>(S0 + off), nbytes)
    if ucode & 2:
        _prefetch_row(<const char*>(S1 + off), nbytes)
    if ucode & 4:
        _prefetch_row(<const char*>(S2 + off), nbytes)
    if stepping and seg[v + 1] - seg[v] == 1:
        _prefetch_row(<const char*>(V + order[seg[v]] * D), nbytes)


cdef void _rows(floating zero, int rule, int ucode, int opts, bint stepping,
                const int64_t* addrs, Py_ssize_t D, const int64_t* order, const int64_t* seg,
                const int64_t* uniq, Py_ssize_t nuniq, const double* h, const double* coef,
                double renorm_eps, char* scratch, Py_ssize_t stride,
                bint parallel) noexcept nogil:
    """All unique rows; ``zero`` only selects the dtype.  ``scratch``: one row of
    ``stride`` bytes per OpenMP thread (thread 0's row for the serial loop)."""
    cdef floating* P = <floating*><intptr_t>addrs[0]
    cdef const floating* V = <const floating*><intptr_t>addrs[1]
    cdef floating* S0 = <floating*><intptr_t>addrs[2]
    cdef floating* S1 = <floating*><intptr_t>addrs[3]
    cdef floating* S2 = <floating*><intptr_t>addrs[4]
    cdef floating c[NSCALARS]
    cdef floating eps = <floating>renorm_eps
    cdef Py_ssize_t u
    _load_scalars(c, h)
    if parallel:
        # dynamic: the rows with many duplicates (hot ids) are adjacent in ``uniq``
        for u in prange(nuniq, schedule="dynamic", chunksize=16):
            _prefetch_ahead(zero, ucode, stepping, P, V, S0, S1, S2, D, order, seg, uniq, u,
                            nuniq)
            _one_row(zero, rule, ucode, opts, stepping, P, V, S0, S1, S2, D, order, seg, u,
                     uniq[u], coef, <floating*>(scratch + threadid() * stride), c, eps)
    else:
        for u in range(nuniq):
            _prefetch_ahead(zero, ucode, stepping, P, V, S0, S1, S2, D, order, seg, uniq, u,
                            nuniq)
            _one_row(zero, rule, ucode, opts, stepping, P, V, S0, S1, S2, D, order, seg, u,
                     uniq[u], coef, <floating*>scratch, c, eps)


cdef int _check_uniq(str who, Py_ssize_t nrows, const int64_t[::1] uniq) except -1:
    """``uniq`` strictly increasing in [0, nrows)."""
    cdef Py_ssize_t i, bad = -1, nuniq = uniq.shape[0]
    with nogil:
        for i in range(nuniq):
            if not 0 <= uniq[i] < nrows or (i > 0 and uniq[i] <= uniq[i - 1]):
                bad = i
                break
    if bad >= 0:
        raise IndexError(f"{who}: bad plan entry {bad}: uniq {uniq[bad]} (nrows {nrows}; "
                         f"uniq must be strictly increasing)")
    return 0


cdef int _check_plan(str who, Py_ssize_t nrows, Py_ssize_t D, Py_ssize_t nnz,
                     const int64_t[::1] order, const int64_t[::1] seg,
                     const int64_t[::1] uniq) except -1:
    """Validate sizes and a coalescing plan: ``order`` in [0, nnz), non-empty
    increasing segments within [0, nnz], ``uniq`` strictly increasing in [0, nrows).
    Returns 0 when there is nothing to do (no rows or empty rows), else 1."""
    cdef Py_ssize_t nuniq = uniq.shape[0]
    cdef Py_ssize_t i, bad = -1
    if nrows < 0 or D < 0 or nnz < 0:
        raise ValueError(f"{who}: negative size (nrows={nrows}, D={D}, nnz={nnz})")
    if order is None or seg is None:
        raise ValueError(f"{who}: a step needs its plan (order and seg)")
    if order.shape[0] != nnz or seg.shape[0] != nuniq + 1:
        raise ValueError(f"{who}: plan sizes order {order.shape[0]}, seg {seg.shape[0]}, "
                         f"uniq {nuniq} do not fit nnz = {nnz}")
    if nuniq == 0 or D == 0:
        return 0
    with nogil:
        for i in range(nnz):
            if not 0 <= order[i] < nnz:
                bad = i
                break
    if bad >= 0:
        raise IndexError(f"{who}: order[{bad}] = {order[bad]} is not in [0, {nnz})")
    with nogil:
        for i in range(nuniq):
            if not 0 <= seg[i] < seg[i + 1] <= nnz:
                bad = i
                break
    if bad >= 0:
        raise IndexError(f"{who}: bad plan entry {bad}: segment [{seg[bad]}, {seg[bad + 1]}) "
                         f"(nnz {nnz}; segments must be non-empty and increasing)")
    _check_uniq(who, nrows, uniq)
    return 1


cdef char* _scratch_rows(str who, int dtype_code, Py_ssize_t D, bint parallel,
                         Py_ssize_t* stride) except NULL:
    """One cache-line-aligned row of D elements per OpenMP thread (one when serial);
    the caller frees it.  ``stride[0]`` receives the row size in bytes."""
    cdef Py_ssize_t item = 4 if dtype_code == 0 else 8
    cdef Py_ssize_t nthreads = openmp.omp_get_max_threads() if parallel else 1
    stride[0] = (D * item + 127) // 128 * 128
    cdef char* scratch = <char*>malloc(max(nthreads * stride[0], 1))
    if scratch == NULL:
        raise MemoryError(f"{who}: no memory for the scratch rows")
    return scratch


def run_rows(int rule_id, int dtype_code, bint uses0, bint uses1, bint uses2, int opts,
             const int64_t[::1] addrs, Py_ssize_t nrows, Py_ssize_t D, Py_ssize_t nnz,
             const int64_t[::1] order, const int64_t[::1] seg, const int64_t[::1] uniq,
             const double[:, ::1] hyper, const double[:, ::1] coef, bint step,
             double renorm_eps, Py_ssize_t parallel_min):
    """Row step of element-wise rule ``rule_id`` on the rows ``uniq`` only.

    ``addrs`` int64 (2 + NSLOTS,): data addresses of the parameter viewed as (nrows,
    D), the gradient rows ``vals`` (nnz, D), and the state slots (an unused slot
    holds the parameter's address and is never read or written), all C-contiguous
    in the dtype of ``dtype_code``.  ``order, seg, uniq``: the coalescing plan of
    ``fastopt.sparse.coalesce_plan``; ``hyper`` row 0: the step's scalars; ``opts``:
    the option bits (:data:`OPTION_BITS`), ``renorm_eps``: max-norm's epsilon
    (``fused.RENORM_EPS``, cast to the dtype).  ``coef`` (len(uniq), 4) float64 or
    None: exact mode's catch-up map of each row, applied first.  ``step=False``:
    catch-up only (``coef`` required; ``order``, ``seg`` and ``vals`` unused, may be
    None / any address).  A parallel region (dynamic schedule) is used when
    ``len(uniq) * D >= parallel_min``, else a serial loop; the GIL is released
    either way.  The plan is validated (sizes, ``order`` in [0, nnz), non-empty
    increasing segments, ``uniq`` strictly increasing in [0, nrows)), the
    addresses are trusted.
    """
    cdef Py_ssize_t nuniq = uniq.shape[0]
    cdef int ucode = (1 if uses0 else 0) | (2 if uses1 else 0) | (4 if uses2 else 0)
    cdef Py_ssize_t stride
    cdef char* scratch
    cdef bint parallel
    cdef const double* kp = NULL
    _check_common("run_rows", rule_id, R_COUNT, dtype_code, opts, hyper.shape[1], True)
    if addrs.shape[0] != NCOLS or hyper.shape[0] < 1:
        raise ValueError(f"run_rows: addrs must have {NCOLS} entries and hyper at least one row")
    if coef is not None and (coef.shape[0] != nuniq or coef.shape[1] != 4):
        raise ValueError(f"run_rows: coef has shape ({coef.shape[0]}, {coef.shape[1]}), "
                         f"expected ({nuniq}, 4)")
    if step:
        if _check_plan("run_rows", nrows, D, nnz, order, seg, uniq) == 0:
            return
    else:
        if coef is None:
            raise ValueError("run_rows: step=False (catch-up only) needs coef")
        if nrows < 0 or D < 0:
            raise ValueError(f"run_rows: negative size (nrows={nrows}, D={D})")
        if nuniq == 0 or D == 0:
            return
        _check_uniq("run_rows", nrows, uniq)
    if coef is not None:
        kp = &coef[0, 0]
    parallel = nuniq * D >= parallel_min
    scratch = _scratch_rows("run_rows", dtype_code, D, parallel, &stride)
    cdef const int64_t* ap = &addrs[0]
    cdef const int64_t* op = &order[0] if step else NULL
    cdef const int64_t* sp = &seg[0] if step else NULL
    cdef const int64_t* up = &uniq[0]
    cdef const double* hp = &hyper[0, 0]
    try:
        with nogil:
            if dtype_code == 0:
                _rows(<float>0, rule_id, ucode, opts, step, ap, D, op, sp, up, nuniq, hp, kp,
                      renorm_eps, scratch, stride, parallel)
            else:
                _rows(<double>0, rule_id, ucode, opts, step, ap, D, op, sp, up, nuniq, hp, kp,
                      renorm_eps, scratch, stride, parallel)
    finally:
        free(scratch)


# --------------------------------------------------------- row-wise driver
#
# Twin of ``numba_cpu.make_rowwise_driver``: a row-wise rule keeps one state value
# per row (``S0`` has ``nrows`` entries) and its math takes the whole row.  The
# gradient side of the options (``g / grad_scale``, clip) goes into a scratch row
# (in place over the summed duplicates), the parameter side (L1, clamps) and
# max-norm follow the row's update.  Same plan, duplicate summation and
# thread-independence as :func:`run_rows`; dense steps of a row-wise rule come
# here with every row touched once.

cdef inline void _rowwise_one(floating inv_d, floating zero, int opts, floating* P,
                              const floating* V, floating* S0, Py_ssize_t D,
                              const int64_t* order, int64_t a, int64_t b, int64_t r,
                              floating* buf, const floating* c, floating eps) noexcept nogil:
    cdef const floating* G = V + order[a] * D
    cdef const floating* row
    cdef floating* prow = P + r * D
    cdef int64_t k
    cdef Py_ssize_t j
    if b - a > 1:
        for j in range(D):
            buf[j] = G[j]
        for k in range(a + 1, b):
            row = V + order[k] * D
            for j in range(D):
                buf[j] = buf[j] + row[j]
        G = buf
    if opts & OPT_PRE:
        pre_pass(buf, G, D, c, opts)
        G = buf
    S0[r] = rowwise_adagrad(prow, G, S0[r], inv_d, D, c)
    if opts & OPT_POST:
        post_pass(prow, D, c, zero, opts)
    if opts & OPT_MAX_NORM:
        renorm_row(prow, D, c, zero, eps)


cdef void _rowwise(floating zero, int opts, const int64_t* addrs, Py_ssize_t D,
                   const int64_t* order, const int64_t* seg, const int64_t* uniq,
                   Py_ssize_t nuniq, const double* h, double renorm_eps, char* scratch,
                   Py_ssize_t stride, bint parallel) noexcept nogil:
    cdef floating* P = <floating*><intptr_t>addrs[0]
    cdef const floating* V = <const floating*><intptr_t>addrs[1]
    cdef floating* S0 = <floating*><intptr_t>addrs[2]
    cdef floating c[NSCALARS]
    cdef floating inv_d = (<floating>1) / (<floating>D)
    cdef floating eps = <floating>renorm_eps
    cdef Py_ssize_t u
    _load_scalars(c, h)
    if parallel:
        for u in prange(nuniq, schedule="dynamic", chunksize=16):
            _rowwise_one(inv_d, zero, opts, P, V, S0, D, order, seg[u], seg[u + 1], uniq[u],
                         <floating*>(scratch + threadid() * stride), c, eps)
    else:
        for u in range(nuniq):
            _rowwise_one(inv_d, zero, opts, P, V, S0, D, order, seg[u], seg[u + 1], uniq[u],
                         <floating*>scratch, c, eps)


def run_rowwise(int rule_id, int dtype_code, int opts, const int64_t[::1] addrs,
                Py_ssize_t nrows, Py_ssize_t D, Py_ssize_t nnz, const int64_t[::1] order,
                const int64_t[::1] seg, const int64_t[::1] uniq,
                const double[:, ::1] hyper, double renorm_eps, Py_ssize_t parallel_min):
    """Step of row-wise rule ``rule_id`` (index in :data:`ROWWISE_NAMES`) on the rows
    of the plan.  ``addrs`` int64 (3,): the parameter viewed as (nrows, D), the
    gradient rows (nnz, D) and the per-row state (nrows,), all C-contiguous in the
    dtype of ``dtype_code``.  Options, plan and parallel threshold as :func:`run_rows`."""
    cdef Py_ssize_t nuniq = uniq.shape[0]
    cdef Py_ssize_t stride
    cdef char* scratch
    cdef bint parallel
    _check_common("run_rowwise", rule_id, len(ROWWISE_NAMES), dtype_code, opts,
                  hyper.shape[1], True)
    if addrs.shape[0] != 3 or hyper.shape[0] < 1:
        raise ValueError("run_rowwise: addrs must have 3 entries and hyper at least one row")
    if _check_plan("run_rowwise", nrows, D, nnz, order, seg, uniq) == 0:
        return
    parallel = nuniq * D >= parallel_min
    scratch = _scratch_rows("run_rowwise", dtype_code, D, parallel, &stride)
    cdef const int64_t* ap = &addrs[0]
    cdef const int64_t* op = &order[0]
    cdef const int64_t* sp = &seg[0]
    cdef const int64_t* up = &uniq[0]
    cdef const double* hp = &hyper[0, 0]
    try:
        with nogil:
            if dtype_code == 0:
                _rowwise(<float>0, opts, ap, D, op, sp, up, nuniq, hp, renorm_eps, scratch,
                         stride, parallel)
            else:
                _rowwise(<double>0, opts, ap, D, op, sp, up, nuniq, hp, renorm_eps, scratch,
                         stride, parallel)
    finally:
        free(scratch)


# ------------------------------------------------- single elements (tests)

def math_elem(int rule_id, p, g, s0, s1, s2, c, dtype, int opts=0):
    """One element through the element loop of :func:`run_dense` (rule ``rule_id``,
    option bits ``opts``, all slots used, so the given slot values reach the math
    unchanged), in ``dtype`` (float32 or float64): returns ``(new_p, s0, s1, s2)``
    as NumPy scalars.  The inputs and the NSCALARS scalars ``c`` are cast to
    ``dtype`` (as the drivers cast the float64 table).  For parity tests against
    the rules' Python functions."""
    import numpy as np
    dt = np.dtype(dtype)
    _check_common("math_elem", rule_id, R_COUNT, 0, opts, len(c), False)
    if dt == np.float32:
        return tuple(np.float32(v) for v in _elem(<float>0, rule_id, opts, p, g, s0, s1, s2, c))
    if dt == np.float64:
        return tuple(np.float64(v) for v in _elem(<double>0, rule_id, opts, p, g, s0, s1, s2, c))
    raise TypeError(f"math_elem: dtype {dt} is not float32 or float64")


cdef tuple _elem(floating zero, int rule_id, int opts, p, g, s0, s1, s2, c):
    cdef floating P = p, G = g, S0 = s0, S1 = s1, S2 = s2
    cdef floating cc[NSCALARS]
    cdef int k
    for k in range(NSCALARS):
        cc[k] = <floating>c[k]
    _step(zero, rule_id, 7, opts, &P, &G, &S0, &S1, &S2, 1, cc)
    return (P, S0, S1, S2)


def math_row(int rule_id, prow, grow, acc, c):
    """One row through the Cython math of row-wise rule ``rule_id`` (parity tests):
    ``prow`` (a C-contiguous float32/float64 array) is updated in place, ``grow`` is
    a C-contiguous array of the same dtype and length, ``c`` the NSCALARS scalars
    (cast to the dtype); returns the new accumulator as a NumPy scalar."""
    import numpy as np
    _check_common("math_row", rule_id, len(ROWWISE_NAMES), 0, 0, len(c), True)
    dt = prow.dtype
    if grow.dtype != dt or grow.shape != prow.shape or prow.ndim != 1:
        raise ValueError("math_row: prow and grow must be 1-D arrays of one dtype and length")
    if dt == np.float32:
        return np.float32(_row32(prow, grow, acc, c))
    if dt == np.float64:
        return np.float64(_row64(prow, grow, acc, c))
    raise TypeError(f"math_row: dtype {dt} is not float32 or float64")


cdef float _row32(float[::1] p, const float[::1] g, float acc, c) except? -1:
    cdef float cc[NSCALARS]
    cdef int k
    for k in range(NSCALARS):
        cc[k] = <float>c[k]
    if p.shape[0] == 0:
        return acc
    cdef float inv_d = (<float>1) / (<float>p.shape[0])
    return rowwise_adagrad(&p[0], &g[0], acc, inv_d, p.shape[0], cc)


cdef double _row64(double[::1] p, const double[::1] g, double acc, c) except? -1:
    cdef double cc[NSCALARS]
    cdef int k
    for k in range(NSCALARS):
        cc[k] = <double>c[k]
    if p.shape[0] == 0:
        return acc
    cdef double inv_d = 1.0 / (<double>p.shape[0])
    return rowwise_adagrad(&p[0], &g[0], acc, inv_d, p.shape[0], cc)


def openmp_max_threads():
    """``omp_get_max_threads()`` as this extension's OpenMP runtime sees it."""
    return openmp.omp_get_max_threads()


# ------------------------------------------------------------ stored formats

include "_cy_storage.pxi"
include "_cy_norms.pxi"
