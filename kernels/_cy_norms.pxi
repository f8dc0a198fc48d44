# The norm pass of per-tensor rules (LAMB, LARS): the twin of
# fastopt/backends/numba_norms.py, included by _cy_dense.pyx.
#
# Per chunk ``(tensor, start, stop)`` of a dense bucket: each element's gradient
# through the element-wise ``pre`` options (blocks of BLOCK, as _step), then the
# rule's ``<rule>_norms`` (the copy in _cy_rules.pxd), whose two values are squared
# and summed in double in NORM_LANES fixed lanes (element i of the chunk to lane
# i % NORM_LANES, each lane in element order), the lanes added in a fixed tree at
# the chunk's end (_lane_total); the chunk sums are then added per tensor in chunk
# order, serially.  The same operations in the same order as Numba's
# driver: bit for bit its result, for any thread count.  Nothing is written but
# ``out``.

cdef enum:
    NORM_LANES = 8         # fastopt.backends.numba_norms.LANES


cdef inline double _lane_total(const double* l) noexcept nogil:
    """The chunk's sum from its eight lanes, in numba_norms.lane_total's tree."""
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))


cdef void _norms_chunk(floating zero, int rule, int ucode, int opts, const int64_t* ptrs,
                       const int64_t* chunk, const double* hyper, const int64_t* hidx,
                       double* part) noexcept nogil:
    cdef int64_t t = chunk[0]
    cdef int64_t lo = chunk[1]
    cdef Py_ssize_t n = <Py_ssize_t>(chunk[2] - lo)
    cdef const int64_t* row = ptrs + t * NCOLS
    cdef floating c[NSCALARS]
    cdef floating buf[BLOCK]
    cdef const floating* P = (<const floating*><intptr_t>row[0]) + lo
    cdef const floating* G = (<const floating*><intptr_t>row[1]) + lo
    cdef const floating* S0 = (<const floating*><intptr_t>row[2]) + lo
    cdef const floating* S1 = (<const floating*><intptr_t>row[3]) + lo
    cdef const floating* S2 = (<const floating*><intptr_t>row[4]) + lo
    cdef const floating* g
    cdef floating x, y, s0, s1, s2
    cdef double la[NORM_LANES]
    cdef double lb[NORM_LANES]
    cdef Py_ssize_t i = 0, j, m, k
    for k in range(NORM_LANES):
        la[k] = 0.0
        lb[k] = 0.0
    _load_scalars(c, hyper + hidx[t] * NSCALARS)
    x = zero
    y = zero
    while i < n:
        m = min(<Py_ssize_t>BLOCK, n - i)
        g = G + i
        if opts & OPT_PRE:
            pre_pass(buf, g, m, c, opts)
            g = buf
        for j in range(m):
            s0 = S0[i + j] if ucode & 1 else zero
            s1 = S1[i + j] if ucode & 2 else zero
            s2 = S2[i + j] if ucode & 4 else zero
            _norms_by_rule(rule, P[i + j], g[j], s0, s1, s2, c, &x, &y)
            k = j % NORM_LANES            # BLOCK % NORM_LANES == 0: lane (i + j) % 8
            la[k] = la[k] + <double>x * <double>x
            lb[k] = lb[k] + <double>y * <double>y
        i += m
    part[0] = _lane_total(la)
    part[1] = _lane_total(lb)


cdef inline void _run_norms_chunk(int dtype_code, int rule, int ucode, int opts,
                                  const int64_t* ptrs, const int64_t* chunk,
                                  const double* hyper, const int64_t* hidx,
                                  double* part) noexcept nogil:
    if dtype_code == 0:
        _norms_chunk(<float>0, rule, ucode, opts, ptrs, chunk, hyper, hidx, part)
    else:
        _norms_chunk(<double>0, rule, ucode, opts, ptrs, chunk, hyper, hidx, part)


def run_norms(int rule_id, int dtype_code, bint uses0, bint uses1, bint uses2, int opts,
              const int64_t[:, ::1] ptrs, const int64_t[:, ::1] chunks,
              const double[:, ::1] hyper, const int64_t[::1] hidx, double[:, ::1] out,
              Py_ssize_t nelem, Py_ssize_t parallel_min):
    """The norm pass of per-tensor rule ``rule_id`` (one of :data:`TENSOR_NAMES`)
    over every chunk: ``out[t] = (sum x^2, sum y^2)`` of tensor ``t`` (float64).
    Arguments and checks as :func:`run_dense` (of ``opts``, only the ``pre`` bits
    matter here)."""
    cdef Py_ssize_t T = ptrs.shape[0], C = chunks.shape[0], R = hyper.shape[0]
    cdef Py_ssize_t ci, t, bad = -1
    cdef int ucode = (1 if uses0 else 0) | (2 if uses1 else 0) | (4 if uses2 else 0)
    cdef double* part
    _check_common("run_norms", rule_id, R_COUNT, dtype_code, opts, hyper.shape[1], False)
    if MATH_NAMES[rule_id] not in TENSOR_NAMES:
        raise ValueError(f"run_norms: rule {MATH_NAMES[rule_id]!r} is not a per-tensor rule")
    if ptrs.shape[1] != NCOLS or chunks.shape[1] != 3:
        raise ValueError(f"run_norms: tables must be ptrs (T, {NCOLS}), chunks (C, 3)")
    if hidx.shape[0] != T or out.shape[0] != T or out.shape[1] != 2:
        raise ValueError(f"run_norms: hidx and out must have {T} rows (out: 2 columns)")
    with nogil:
        for t in range(T):
            if not 0 <= hidx[t] < R:
                bad = t
                break
    if bad >= 0:
        raise IndexError(f"run_norms: hidx[{bad}] = {hidx[bad]} is not a row of hyper")
    with nogil:
        for ci in range(C):
            if not (0 <= chunks[ci, 0] < T and 0 <= chunks[ci, 1] <= chunks[ci, 2]):
                bad = ci
                break
    if bad >= 0:
        raise IndexError(f"run_norms: bad chunk row {bad} ({T} tensors)")
    for t in range(T):
        out[t, 0] = 0.0
        out[t, 1] = 0.0
    if C == 0:
        return
    part = <double*>malloc(2 * C * sizeof(double))
    if part == NULL:
        raise MemoryError()
    cdef const int64_t* pp = &ptrs[0, 0]
    cdef const int64_t* cp = &chunks[0, 0]
    cdef const double* hp = &hyper[0, 0]
    cdef const int64_t* ip = &hidx[0]
    try:
        if nelem >= parallel_min:
            for ci in prange(C, nogil=True, schedule="static"):
                _run_norms_chunk(dtype_code, rule_id, ucode, opts, pp, cp + 3 * ci, hp, ip,
                                 part + 2 * ci)
        else:
            with nogil:
                for ci in range(C):
                    _run_norms_chunk(dtype_code, rule_id, ucode, opts, pp, cp + 3 * ci, hp,
                                     ip, part + 2 * ci)
        for ci in range(C):                # chunk order
            t = chunks[ci, 0]
            out[t, 0] = out[t, 0] + part[2 * ci]
            out[t, 1] = out[t, 1] + part[2 * ci + 1]
    finally:
        free(part)
