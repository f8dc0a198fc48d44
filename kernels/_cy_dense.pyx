# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# distutils: extra_compile_args = -ffp-contract=off -fno-math-errno -fno-trapping-math
"""Cython drivers (compiled into ``fastopt._cy_dense``): the Numba CPU drivers' twin.

Three entry points (``_cy_storage.pxi``), each the twin of a driver of
``fastopt/backends/numba_cpu.py`` (same tables, same loops, same operations in the
same order and dtype, so the results are bit-identical), for every storage format:
float32/float64 parameters and state are the format updated in place, bfloat16
parameters and 16/8-bit state are loaded into compute-dtype buffers and stored
back around the same element loop:

* :func:`run_stored_dense` (``make_stored_dense_driver``): a bucket of tensors
  described by

  - ``ptrs``   int64 (T, 2 + NSLOTS): data addresses of param, grad and the state
    slots (an unused slot holds the param's address and is never read or written);
  - ``fmt``    int64 (T, 10): the format table (aux and 8-bit scale addresses, size,
    row length, blocks per row, stream key, element base: ``FMT_COLUMNS``);
  - ``chunks`` int64 (C, 3): ``(tensor, first block, end block)`` block ranges;
  - ``hyper``  float64 (R, NSCALARS): per-step scalars, one row per (group, step),
    columns = the fields of the rule's ``Scalars`` (``_cy_scalars.pxi``);
  - ``hidx``   int64 (T,): the ``hyper`` row of each tensor;

* :func:`run_stored_rows` (``make_stored_rows_driver``): the touched rows of one
  parameter of an element-wise rule, with duplicate gradient rows summed,
  optionally caught up first over skipped steps (exact sparse mode) or only caught
  up (flush), and ``max_norm`` applied to each row right after its update; the
  rows ``PREFETCH_AHEAD`` unique rows ahead are prefetched;
* :func:`run_stored_rowwise` (``make_stored_rowwise_driver``): a row-wise rule (one
  state value per row) on the rows of a plan.

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


# ------------------------------------------------------------- checks
cdef int _check_common(str who, int rule_id, int nrules, int dtype_code, int opts,
                       Py_ssize_t ncols, bint rows) except -1:
    if not 0 <= rule_id < nrules:
        raise ValueError(f"{who}: unknown rule id {rule_id} (0..{nrules - 1})")
    if dtype_code not in (0, 1):
        raise ValueError(f"{who}: unknown dtype code {dtype_code} (0 float32, 1 float64)")
    if opts & ~(OPT_ELEMENT | OPT_MAX_NORM):
        raise ValueError(f"{who}: unknown option bits in {opts:#x}")
    if (opts & OPT_MAX_NORM) and not rows:
        raise ValueError(f"{who}: max_norm needs whole rows (run_stored_rows)")
    if ncols != NSCALARS:
        raise ValueError(f"{who}: hyper has {ncols} columns, this build reads "
                         f"NSCALARS = {NSCALARS} (rebuild the extension after changing "
                         f"the rules' Scalars)")
    return 0


# ------------------------------------------------------- row helpers

cdef inline double _term(double k, double x) noexcept nogil:
    """``element._term``: ``k * x``, where a zero coefficient contributes an exact zero
    (an Inf or NaN the skipped steps never mixed in cannot leak through ``0 * x``)."""
    if k == 0.0:
        return 0.0
    return k * x


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


cdef int _check_inverse(str who, Py_ssize_t nnz, const int64_t[::1] order,
                        const int64_t[::1] seg, Py_ssize_t nuniq,
                        const int64_t[::1] inverse) except -1:
    """``inverse`` (nnz,) agrees with a checked plan: ``inverse[order[k]] == u`` for
    every position ``k`` of segment ``u``."""
    cdef Py_ssize_t u, bad = -1
    cdef int64_t k
    if inverse.shape[0] != nnz:
        raise ValueError(f"{who}: inverse has {inverse.shape[0]} entries, expected {nnz}")
    with nogil:
        for u in range(nuniq):
            for k in range(seg[u], seg[u + 1]):
                if inverse[order[k]] != u:
                    bad = order[k]
                    break
            if bad >= 0:
                break
    if bad >= 0:
        raise IndexError(f"{who}: inverse[{bad}] = {inverse[bad]} does not match the plan")
    return 0


#: the cost of updating one unique row, in gradient rows summed (the split of a
#: fused row step between tasks; any value gives the same results)
cdef enum:
    UNIQUE_ROW_COST = 2


# ------------------------------------------------- single elements (tests)

def math_elem(int rule_id, p, g, s0, s1, s2, c, dtype, int opts=0):
    """One element through the element loop of :func:`run_stored_dense` (rule ``rule_id``,
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
include "_cy_factored.pxi"
