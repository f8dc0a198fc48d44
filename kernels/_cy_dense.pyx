# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# distutils: extra_compile_args = -ffp-contract=off -fno-math-errno
"""Cython dense driver (compiled into ``fastopt._cy_dense``): the Numba CPU driver's twin.

One call, :func:`run_dense`, runs a rule over a bucket of tensors described by the
same tables the Numba driver (``fastopt._numba_cpu``) receives:

* ``ptrs``   int64 (T, 5): data addresses of param, grad and the 3 state slots
  (an unused slot holds the param's address and is never read or written);
* ``chunks`` int64 (C, 3): ``(tensor, start, stop)`` element ranges;
* ``hyper``  float64 (R, NSCALARS = 18): per-step host scalars, one row per (group, step);
* ``hidx``   int64 (T,): the ``hyper`` row of each tensor.

Like the Numba driver, it runs one OpenMP parallel region (``prange`` over chunks,
``schedule(static)``, GIL released) when the step has at least ``parallel_min``
elements, and a serial loop (GIL released, no parallel region) below.  Each chunk
casts its NSCALARS scalars to the param dtype once and runs a loop over its elements that
calls the rule's math from ``_cy_rules.pxd``.

Specialization is done with fused types, so there is one loop written once: the
dtype (``floating``), the rule (a fused set of empty tag structs) and whether each
state slot is used (fused ``Yes``/``No`` tags) are compile-time constants inside
every specialized loop, as Numba's closure constants are; a runtime dispatch on
(rule id, used-slot code, dtype) picks the loop once per chunk.  Unused slots are
passed to the math as zero and their results dropped, exactly as in the Numba
driver.

Rule ids: the index in :data:`MATH_NAMES` of the ``fastopt.rules`` function name;
the Python side (``fastopt._cython_backend``) builds its table from the registry.

A second entry point, :func:`run_rows`, is the twin of the Numba row-sparse driver
(``_numba_cpu.make_rows_driver``): it runs the same element loop over each touched
row of a (nrows, D) parameter (see "Row-sparse driver" below).

Compiled with ``-ffp-contract=off`` (no FMA contraction, so results match the
Python rule math and Numba bit for bit on every CPU) and ``-fno-math-errno``
(``sqrt`` needs no ``errno`` branch and vectorizes; no value changes).  No
fast-math flags.  The tables are checked here (cheap O(T + C) loop); the
addresses are trusted: the Python layer validates shapes, dtypes and contiguity.
"""

from cython.parallel cimport prange, threadid
from libc.stdint cimport int64_t, intptr_t
from libc.stdlib cimport free, malloc
cimport openmp

from cython cimport floating
from _cy_rules cimport adagrad, adam, adamax, lion, nadam, rmsprop, rowwise_adagrad, sgd

cdef enum:
    NSCALARS = 18      # fastopt.registry.NSCALARS (checked by fastopt._cython_backend)
    NCOLS = 5          # param, grad and fastopt.registry.NSLOTS (3) state slots

#: table widths this extension was compiled for (checked against the registry)
SHAPES = {"nscalars": NSCALARS, "ncols": NCOLS}

# ----------------------------------------------------------------- rule ids
cdef enum:
    R_SGD = 0
    R_ADAGRAD = 1
    R_RMSPROP = 2
    R_ADAM = 3
    R_ADAMAX = 4
    R_NADAM = 5
    R_LION = 6
    R_COUNT = 7

#: names of the ``fastopt.rules`` functions that have a Cython copy; id = index
MATH_NAMES = ("sgd", "adagrad", "rmsprop", "adam", "adamax", "nadam", "lion")
assert len(MATH_NAMES) == R_COUNT

#: row-wise rules (one state value per row; :func:`run_rowwise`); id = index
ROWWISE_NAMES = ("rowwise_adagrad",)

#: dtype codes of :func:`run_dense`
DTYPE_CODES = {"float32": 0, "float64": 1}

# ------------------------------------------------- compile-time tags (fused)
cdef struct TSgd:
    char _
cdef struct TAdagrad:
    char _
cdef struct TRmsprop:
    char _
cdef struct TAdam:
    char _
cdef struct TAdamax:
    char _
cdef struct TNadam:
    char _
cdef struct TLion:
    char _

ctypedef fused RuleTag:
    TSgd
    TAdagrad
    TRmsprop
    TAdam
    TAdamax
    TNadam
    TLion

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

cdef TSgd T_SGD
cdef TAdagrad T_ADAGRAD
cdef TRmsprop T_RMSPROP
cdef TAdam T_ADAM
cdef TAdamax T_ADAMAX
cdef TNadam T_NADAM
cdef TLion T_LION
cdef Yes YES
cdef No NO


# ------------------------------------------------------------- the one loop
cdef inline void _math(RuleTag tag, floating* p, floating g, floating* s0, floating* s1,
                       floating* s2, const floating* c) noexcept nogil:
    if RuleTag is TSgd:
        sgd(p, g, s0, s1, s2, c)
    elif RuleTag is TAdagrad:
        adagrad(p, g, s0, s1, s2, c)
    elif RuleTag is TRmsprop:
        rmsprop(p, g, s0, s1, s2, c)
    elif RuleTag is TAdam:
        adam(p, g, s0, s1, s2, c)
    elif RuleTag is TAdamax:
        adamax(p, g, s0, s1, s2, c)
    elif RuleTag is TNadam:
        nadam(p, g, s0, s1, s2, c)
    else:
        lion(p, g, s0, s1, s2, c)


cdef void _loop(RuleTag tag, U0 u0, U1 u1, U2 u2, floating* P, const floating* G,
                floating* S0, floating* S1, floating* S2, Py_ssize_t n,
                const floating* c) noexcept nogil:
    """The element loop of one chunk, specialized on rule, dtype and used slots.

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


cdef void _by_rule(int rule, int ucode, floating* P, const floating* G, floating* S0,
                   floating* S1, floating* S2, Py_ssize_t n,
                   const floating* c) noexcept nogil:
    """Dispatch on the rule id (validated by the caller)."""
    if rule == R_SGD:
        _by_uses(T_SGD, ucode, P, G, S0, S1, S2, n, c)
    elif rule == R_ADAGRAD:
        _by_uses(T_ADAGRAD, ucode, P, G, S0, S1, S2, n, c)
    elif rule == R_RMSPROP:
        _by_uses(T_RMSPROP, ucode, P, G, S0, S1, S2, n, c)
    elif rule == R_ADAM:
        _by_uses(T_ADAM, ucode, P, G, S0, S1, S2, n, c)
    elif rule == R_ADAMAX:
        _by_uses(T_ADAMAX, ucode, P, G, S0, S1, S2, n, c)
    elif rule == R_NADAM:
        _by_uses(T_NADAM, ucode, P, G, S0, S1, S2, n, c)
    elif rule == R_LION:
        _by_uses(T_LION, ucode, P, G, S0, S1, S2, n, c)


# ------------------------------------------------------------- the driver
cdef void _chunk(floating zero, int rule, int ucode, const int64_t* ptrs,
                 const int64_t* chunk, const double* hyper, const int64_t* hidx) noexcept nogil:
    """Run one chunk row ``(tensor, start, stop)``; ``zero`` only selects the dtype."""
    cdef int64_t t = chunk[0]
    cdef int64_t lo = chunk[1]
    cdef Py_ssize_t n = <Py_ssize_t>(chunk[2] - lo)
    cdef const int64_t* row = ptrs + t * NCOLS
    cdef const double* h = hyper + hidx[t] * NSCALARS
    cdef floating c[NSCALARS]
    cdef int k
    for k in range(NSCALARS):
        c[k] = <floating>h[k]
    _by_rule(rule, ucode,
             (<floating*><intptr_t>row[0]) + lo,
             (<const floating*><intptr_t>row[1]) + lo,
             (<floating*><intptr_t>row[2]) + lo,
             (<floating*><intptr_t>row[3]) + lo,
             (<floating*><intptr_t>row[4]) + lo,
             n, c)


cdef inline void _run_chunk(int dtype_code, int rule, int ucode, const int64_t* ptrs,
                            const int64_t* chunk, const double* hyper,
                            const int64_t* hidx) noexcept nogil:
    if dtype_code == 0:
        _chunk(<float>0, rule, ucode, ptrs, chunk, hyper, hidx)
    else:
        _chunk(<double>0, rule, ucode, ptrs, chunk, hyper, hidx)


def run_dense(int rule_id, int dtype_code, bint uses0, bint uses1, bint uses2,
              const int64_t[:, ::1] ptrs, const int64_t[:, ::1] chunks,
              const double[:, ::1] hyper, const int64_t[::1] hidx,
              Py_ssize_t nelem, Py_ssize_t parallel_min):
    """Run rule ``rule_id`` (index in :data:`MATH_NAMES`) over every chunk.

    ``dtype_code``: 0 float32, 1 float64 (:data:`DTYPE_CODES`).  ``uses0..2``: which
    state slots this bucket's configuration uses.  A parallel region (``prange``,
    static schedule) is used when ``nelem >= parallel_min``, else a serial loop; the
    GIL is released either way.  The tables are validated (shapes, tensor and row
    indices, chunk bounds); the addresses in ``ptrs`` are trusted.
    """
    cdef Py_ssize_t T = ptrs.shape[0], C = chunks.shape[0], R = hyper.shape[0]
    cdef Py_ssize_t ci, t, bad = -1
    cdef int ucode = (1 if uses0 else 0) | (2 if uses1 else 0) | (4 if uses2 else 0)
    if not 0 <= rule_id < R_COUNT:
        raise ValueError(f"run_dense: unknown rule id {rule_id} (0..{R_COUNT - 1})")
    if dtype_code not in (0, 1):
        raise ValueError(f"run_dense: unknown dtype code {dtype_code} (0 float32, 1 float64)")
    if ptrs.shape[1] != NCOLS or chunks.shape[1] != 3 or hyper.shape[1] != NSCALARS:
        raise ValueError("run_dense: tables must be ptrs (T, 5), chunks (C, 3), "
                         "hyper (R, NSCALARS)")
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
        raise IndexError(f"run_dense: bad chunk row {bad}: {(chunks[bad, 0], chunks[bad, 1], chunks[bad, 2])} "
                         f"({T} tensors)")

    cdef const int64_t* pp = &ptrs[0, 0]
    cdef const int64_t* cp = &chunks[0, 0]
    cdef const double* hp = &hyper[0, 0]
    cdef const int64_t* ip = &hidx[0]
    if nelem >= parallel_min:
        for ci in prange(C, nogil=True, schedule="static"):
            _run_chunk(dtype_code, rule_id, ucode, pp, cp + 3 * ci, hp, ip)
    else:
        with nogil:
            for ci in range(C):
                _run_chunk(dtype_code, rule_id, ucode, pp, cp + 3 * ci, hp, ip)


# ------------------------------------------------------- row-sparse driver
#
# Twin of ``_numba_cpu.make_rows_driver``: one task per unique row ``uniq[u]``,
# whose gradient rows are ``vals[order[seg[u]:seg[u + 1]]]``.  A single gradient
# row is used in place; duplicates are summed into a scratch row (the first copied,
# the others added one by one in order of appearance, as in the Numba driver), so
# every element of the sum is the same sequence of IEEE additions.  The touched
# row then goes through the dense element loop (``_by_rule`` -> ``_loop`` -> the
# ``_cy_rules`` math) with D elements.  Each row is written by exactly one thread
# and rows are distinct (``uniq`` strictly increasing, checked), so there are no
# atomics and the result does not depend on the thread count or the schedule.
# The scratch is one row per thread (not per unique row as in Numba: same values).

cdef inline void _one_row(floating zero, int rule, int ucode, floating* P,
                          const floating* V, floating* S0, floating* S1, floating* S2,
                          Py_ssize_t D, const int64_t* order, int64_t a, int64_t b,
                          int64_t r, floating* buf, const floating* c) noexcept nogil:
    cdef const floating* G = V + order[a] * D
    cdef const floating* row
    cdef int64_t k
    cdef Py_ssize_t j
    cdef int64_t off = r * D
    if b - a > 1:           # duplicates: sum whole rows, in order of appearance
        for j in range(D):
            buf[j] = G[j]
        for k in range(a + 1, b):
            row = V + order[k] * D
            for j in range(D):
                buf[j] = buf[j] + row[j]
        G = buf
    _by_rule(rule, ucode, P + off, G, S0 + off, S1 + off, S2 + off, D, c)


cdef void _rows(floating zero, int rule, int ucode, const int64_t* addrs, Py_ssize_t D,
                const int64_t* order, const int64_t* seg, const int64_t* uniq,
                Py_ssize_t nuniq, const double* h, char* scratch, Py_ssize_t stride,
                bint parallel) noexcept nogil:
    """All unique rows; ``zero`` only selects the dtype.  ``scratch``: one row of
    ``stride`` bytes per OpenMP thread (thread 0's row for the serial loop)."""
    cdef floating* P = <floating*><intptr_t>addrs[0]
    cdef const floating* V = <const floating*><intptr_t>addrs[1]
    cdef floating* S0 = <floating*><intptr_t>addrs[2]
    cdef floating* S1 = <floating*><intptr_t>addrs[3]
    cdef floating* S2 = <floating*><intptr_t>addrs[4]
    cdef floating c[NSCALARS]
    cdef Py_ssize_t u
    cdef int k
    for k in range(NSCALARS):
        c[k] = <floating>h[k]
    if parallel:
        # dynamic: the rows with many duplicates (hot ids) are adjacent in ``uniq``
        for u in prange(nuniq, schedule="dynamic", chunksize=16):
            _one_row(zero, rule, ucode, P, V, S0, S1, S2, D, order, seg[u], seg[u + 1],
                     uniq[u], <floating*>(scratch + threadid() * stride), c)
    else:
        for u in range(nuniq):
            _one_row(zero, rule, ucode, P, V, S0, S1, S2, D, order, seg[u], seg[u + 1],
                     uniq[u], <floating*>scratch, c)


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
            if (not 0 <= seg[i] < seg[i + 1] <= nnz or not 0 <= uniq[i] < nrows
                    or (i > 0 and uniq[i] <= uniq[i - 1])):
                bad = i
                break
    if bad >= 0:
        raise IndexError(f"{who}: bad plan entry {bad}: uniq {uniq[bad]}, segment "
                         f"[{seg[bad]}, {seg[bad + 1]}) (nrows {nrows}, nnz {nnz}; uniq "
                         f"must be strictly increasing, segments non-empty)")
    return 1


cdef char* _scratch_rows(str who, int dtype_code, Py_ssize_t D, bint parallel,
                         Py_ssize_t* stride) except NULL:
    """One cache-line-aligned row of D elements per OpenMP thread (one when serial);
    the caller frees it.  ``stride[0]`` receives the row size in bytes."""
    cdef Py_ssize_t item = 4 if dtype_code == 0 else 8
    cdef Py_ssize_t nthreads = openmp.omp_get_max_threads() if parallel else 1
    stride[0] = (D * item + 127) // 128 * 128
    cdef char* scratch = <char*>malloc(nthreads * stride[0])
    if scratch == NULL:
        raise MemoryError(f"{who}: no memory for the scratch rows")
    return scratch


def run_rows(int rule_id, int dtype_code, bint uses0, bint uses1, bint uses2,
             const int64_t[::1] addrs, Py_ssize_t nrows, Py_ssize_t D, Py_ssize_t nnz,
             const int64_t[::1] order, const int64_t[::1] seg, const int64_t[::1] uniq,
             const double[:, ::1] hyper, Py_ssize_t parallel_min):
    """Row-sparse (lazy) step of rule ``rule_id`` on the touched rows only.

    ``addrs`` int64 (5,): data addresses of the parameter viewed as (nrows, D), the
    gradient rows ``vals`` (nnz, D), and the 3 state slots (an unused slot holds the
    parameter's address and is never read or written), all C-contiguous in the
    dtype of ``dtype_code``.  ``order, seg, uniq``: the coalescing plan of
    ``fastopt.sparse.coalesce_plan``; ``hyper`` row 0: the step's scalars.  A
    parallel region (dynamic schedule) is used when ``len(uniq) * D >=
    parallel_min``, else a serial loop; the GIL is released either way.  The plan
    is validated (sizes, ``order`` in [0, nnz), non-empty increasing segments,
    ``uniq`` strictly increasing in [0, nrows)), the addresses are trusted.
    """
    cdef Py_ssize_t nuniq = uniq.shape[0]
    cdef int ucode = (1 if uses0 else 0) | (2 if uses1 else 0) | (4 if uses2 else 0)
    cdef Py_ssize_t stride
    cdef char* scratch
    cdef bint parallel
    if not 0 <= rule_id < R_COUNT:
        raise ValueError(f"run_rows: unknown rule id {rule_id} (0..{R_COUNT - 1})")
    if dtype_code not in (0, 1):
        raise ValueError(f"run_rows: unknown dtype code {dtype_code} (0 float32, 1 float64)")
    if addrs.shape[0] != NCOLS or hyper.shape[1] != NSCALARS or hyper.shape[0] < 1:
        raise ValueError("run_rows: addrs must have 5 entries and hyper shape (R >= 1, NSCALARS)")
    if _check_plan("run_rows", nrows, D, nnz, order, seg, uniq) == 0:
        return

    parallel = nuniq * D >= parallel_min
    scratch = _scratch_rows("run_rows", dtype_code, D, parallel, &stride)
    cdef const int64_t* ap = &addrs[0]
    cdef const int64_t* op = &order[0]
    cdef const int64_t* sp = &seg[0]
    cdef const int64_t* up = &uniq[0]
    cdef const double* hp = &hyper[0, 0]
    try:
        with nogil:
            if dtype_code == 0:
                _rows(<float>0, rule_id, ucode, ap, D, op, sp, up, nuniq, hp, scratch,
                      stride, parallel)
            else:
                _rows(<double>0, rule_id, ucode, ap, D, op, sp, up, nuniq, hp, scratch,
                      stride, parallel)
    finally:
        free(scratch)


# --------------------------------------------------------- row-wise driver
#
# Twin of ``_numba_cpu.make_rowwise_driver``: a row-wise rule keeps one state value
# per row (``S0`` has ``nrows`` entries) and its math takes the whole row.  Same
# plan, duplicate summation and thread-independence as :func:`run_rows`; dense
# steps of a row-wise rule come here with every row touched once.

cdef inline void _rowwise_one(floating inv_d, floating* P, const floating* V,
                              floating* S0, Py_ssize_t D, const int64_t* order, int64_t a,
                              int64_t b, int64_t r, floating* buf,
                              const floating* c) noexcept nogil:
    cdef const floating* G = V + order[a] * D
    cdef const floating* row
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
    S0[r] = rowwise_adagrad(P + r * D, G, S0[r], inv_d, D, c)


cdef void _rowwise(floating zero, const int64_t* addrs, Py_ssize_t D, const int64_t* order,
                   const int64_t* seg, const int64_t* uniq, Py_ssize_t nuniq,
                   const double* h, char* scratch, Py_ssize_t stride,
                   bint parallel) noexcept nogil:
    cdef floating* P = <floating*><intptr_t>addrs[0]
    cdef const floating* V = <const floating*><intptr_t>addrs[1]
    cdef floating* S0 = <floating*><intptr_t>addrs[2]
    cdef floating c[NSCALARS]
    cdef floating inv_d = (<floating>1) / (<floating>D)
    cdef Py_ssize_t u
    cdef int k
    for k in range(NSCALARS):
        c[k] = <floating>h[k]
    if parallel:
        for u in prange(nuniq, schedule="dynamic", chunksize=16):
            _rowwise_one(inv_d, P, V, S0, D, order, seg[u], seg[u + 1], uniq[u],
                         <floating*>(scratch + threadid() * stride), c)
    else:
        for u in range(nuniq):
            _rowwise_one(inv_d, P, V, S0, D, order, seg[u], seg[u + 1], uniq[u],
                         <floating*>scratch, c)


def run_rowwise(int rule_id, int dtype_code, const int64_t[::1] addrs, Py_ssize_t nrows,
                Py_ssize_t D, Py_ssize_t nnz, const int64_t[::1] order,
                const int64_t[::1] seg, const int64_t[::1] uniq,
                const double[:, ::1] hyper, Py_ssize_t parallel_min):
    """Step of row-wise rule ``rule_id`` (index in :data:`ROWWISE_NAMES`) on the rows
    of the plan.  ``addrs`` int64 (3,): the parameter viewed as (nrows, D), the
    gradient rows (nnz, D) and the per-row state (nrows,), all C-contiguous in the
    dtype of ``dtype_code``.  Plan and parallel threshold as :func:`run_rows`."""
    cdef Py_ssize_t nuniq = uniq.shape[0]
    cdef Py_ssize_t stride
    cdef char* scratch
    cdef bint parallel
    if not 0 <= rule_id < len(ROWWISE_NAMES):
        raise ValueError(f"run_rowwise: unknown row-wise rule id {rule_id}")
    if dtype_code not in (0, 1):
        raise ValueError(f"run_rowwise: unknown dtype code {dtype_code}")
    if addrs.shape[0] != 3 or hyper.shape[1] != NSCALARS or hyper.shape[0] < 1:
        raise ValueError("run_rowwise: addrs must have 3 entries and hyper shape (R >= 1, NSCALARS)")
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
                _rowwise(<float>0, ap, D, op, sp, up, nuniq, hp, scratch, stride, parallel)
            else:
                _rowwise(<double>0, ap, D, op, sp, up, nuniq, hp, scratch, stride, parallel)
    finally:
        free(scratch)


def math_row(int rule_id, prow, grow, acc, c):
    """One row through the Cython math of row-wise rule ``rule_id`` (parity tests):
    ``prow`` (a C-contiguous float32/float64 array) is updated in place, ``grow`` is
    a C-contiguous array of the same dtype and length, ``c`` the NSCALARS scalars (cast to
    the dtype); returns the new accumulator as a NumPy scalar."""
    import numpy as np
    if not 0 <= rule_id < len(ROWWISE_NAMES):
        raise ValueError(f"math_row: unknown row-wise rule id {rule_id}")
    if len(c) != NSCALARS:
        raise ValueError(f"math_row: expected {NSCALARS} scalars, got {len(c)}")
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


def math_elem(int rule_id, p, g, s0, s1, s2, c, dtype):
    """One element through the Cython math of rule ``rule_id``, in ``dtype``
    (float32 or float64): returns ``(new_p, s0, s1, s2)`` as NumPy scalars.

    For parity tests against the Python functions of ``fastopt.rules``: the inputs
    are cast to ``dtype`` (as the drivers cast the float64 host scalars) and run
    through the same element loop as :func:`run_dense` (length 1, all slots used, so
    the given slot values reach the math unchanged).
    """
    import numpy as np
    dt = np.dtype(dtype)
    if not 0 <= rule_id < R_COUNT:
        raise ValueError(f"math_elem: unknown rule id {rule_id}")
    if len(c) != NSCALARS:
        raise ValueError(f"math_elem: expected {NSCALARS} scalars, got {len(c)}")
    if dt == np.float32:
        return tuple(np.float32(v) for v in _elem(<float>0, rule_id, p, g, s0, s1, s2, c))
    if dt == np.float64:
        return tuple(np.float64(v) for v in _elem(<double>0, rule_id, p, g, s0, s1, s2, c))
    raise TypeError(f"math_elem: dtype {dt} is not float32 or float64")


cdef tuple _elem(floating zero, int rule_id, p, g, s0, s1, s2, c):
    cdef floating P = p, G = g, S0 = s0, S1 = s1, S2 = s2
    cdef floating cc[NSCALARS]
    cdef int k
    for k in range(NSCALARS):
        cc[k] = <floating>c[k]
    _by_rule(rule_id, 7, &P, &G, &S0, &S1, &S2, 1, cc)
    return (P, S0, S1, S2)


def openmp_max_threads():
    """``omp_get_max_threads()`` as this extension's OpenMP runtime sees it."""
    return openmp.omp_get_max_threads()
