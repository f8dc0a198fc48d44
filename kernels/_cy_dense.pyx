# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False
# distutils: extra_compile_args = -ffp-contract=off -fno-math-errno
"""Cython dense driver (compiled into ``fastopt._cy_dense``): the Numba CPU driver's twin.

One call, :func:`run_dense`, runs a rule over a bucket of tensors described by the
same tables the Numba driver (``fastopt._numba_cpu``) receives:

* ``ptrs``   int64 (T, 5): data addresses of param, grad and the 3 state slots
  (an unused slot holds the param's address and is never read or written);
* ``chunks`` int64 (C, 3): ``(tensor, start, stop)`` element ranges;
* ``hyper``  float64 (R, 12): per-step host scalars, one row per (group, step);
* ``hidx``   int64 (T,): the ``hyper`` row of each tensor.

Like the Numba driver, it runs one OpenMP parallel region (``prange`` over chunks,
``schedule(static)``, GIL released) when the step has at least ``parallel_min``
elements, and a serial loop (GIL released, no parallel region) below.  Each chunk
casts its 12 scalars to the param dtype once and runs a loop over its elements that
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

Compiled with ``-ffp-contract=off`` (no FMA contraction, so results match the
Python rule math and Numba bit for bit on every CPU) and ``-fno-math-errno``
(``sqrt`` needs no ``errno`` branch and vectorizes; no value changes).  No
fast-math flags.  The tables are checked here (cheap O(T + C) loop); the
addresses are trusted: the Python layer validates shapes, dtypes and contiguity.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, intptr_t
cimport openmp

from cython cimport floating
from _cy_rules cimport adagrad, adam, adamax, lion, nadam, rmsprop, sgd

cdef enum:
    NSCALARS = 12      # fastopt.registry.NSCALARS (checked by fastopt._cython_backend)
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
                         "hyper (R, 12)")
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
