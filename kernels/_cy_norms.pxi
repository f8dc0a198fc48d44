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


# The norm pass of a stored format (bfloat16 parameters, float32/bfloat16/8-bit state,
# bfloat16/float32 gradients): the twin of numba_norms.make_stored_norms_driver.  Over
# the update pass's own tables (block chunks, ``fmt``), each element is loaded with
# the stored driver's loads (_sload_p / _sload_g / _sload_s of _cy_storage.pxi: the
# values the update pass computes with), SBLK at a time; the squares of a block go to
# the lanes by their index in the block (SBLK % NORM_LANES == 0), each lane in element
# order, blocks in order; chunk sums added per tensor in chunk order.

cdef void _snorms_chunk(floating zero, int rule, int ucode, int opts, const SFmt* fbase,
                        const int64_t* prow, const int64_t* frow, const int64_t* chunk,
                        Py_ssize_t blk, const double* hyper, double* part) noexcept nogil:
    cdef SFmt f = fbase[0]
    cdef floating buf[6 * SBLK]        # parameters, gradients, pre-pass, 3 state slots
    cdef const floating* P
    cdef const floating* G
    cdef const floating* S[3]
    cdef floating c[NSCALARS]
    cdef floating x, y, s0, s1, s2
    cdef double la[NORM_LANES]
    cdef double lb[NORM_LANES]
    cdef int64_t kb, r, j0, lo, D = frow[5], nb = frow[6], q
    cdef Py_ssize_t m, n, j, k
    cdef int s
    for k in range(NORM_LANES):
        la[k] = 0.0
        lb[k] = 0.0
    _load_scalars(c, hyper)
    f.P = <char*><intptr_t>prow[0]
    f.G = <const char*><intptr_t>prow[1]
    f.A = <char*><intptr_t>frow[0]
    for s in range(3):
        f.S[s] = <char*><intptr_t>prow[2 + s]
        f.C[s] = <float*><intptr_t>frow[1 + s]
    x = zero
    y = zero
    for kb in range(chunk[1], chunk[2]):
        r = kb // nb
        j0 = (kb - r * nb) * blk
        lo = r * D + j0
        n = <Py_ssize_t>min(<int64_t>blk, D - j0)
        q = 0
        while q < n:
            m = min(<Py_ssize_t>SBLK, n - q)
            if f.pkind == PK_NATIVE:
                P = (<const floating*>f.P) + lo + q
            else:
                _sload_p(buf, &f, lo + q, m)
                P = buf
            if f.gkind == GK_NATIVE:
                G = (<const floating*>f.G) + lo + q
            else:
                _sload_g(buf + SBLK, f.G, f.gkind, lo + q, m)
                G = buf + SBLK
            if opts & OPT_PRE:
                pre_pass(buf + 2 * SBLK, G, m, c, opts)
                G = buf + 2 * SBLK
            for s in range(3):
                if f.skind == SK_NATIVE:
                    S[s] = (<const floating*>f.S[s]) + lo + q
                else:
                    S[s] = buf + (3 + s) * SBLK
                    if ucode & (1 << s):
                        _sload_s(buf + (3 + s) * SBLK, &f, s, lo + q, m, kb)
            for j in range(m):
                s0 = S[0][j] if ucode & 1 else zero
                s1 = S[1][j] if ucode & 2 else zero
                s2 = S[2][j] if ucode & 4 else zero
                _norms_by_rule(rule, P[j], G[j], s0, s1, s2, c, &x, &y)
                k = j % NORM_LANES
                la[k] = la[k] + <double>x * <double>x
                lb[k] = lb[k] + <double>y * <double>y
            q += m
    part[0] = _lane_total(la)
    part[1] = _lane_total(lb)


def run_stored_norms(int rule_id, int dtype_code, int pkind, int gkind, int skind, int smask,
                     bint uses0, bint uses1, bint uses2, int opts,
                     const int64_t[:, ::1] ptrs, const int64_t[:, ::1] fmt,
                     const int64_t[:, ::1] chunks, const double[:, ::1] hyper,
                     const int64_t[::1] hidx, double[:, ::1] out, Py_ssize_t blk,
                     Py_ssize_t nelem, Py_ssize_t parallel_min):
    """The norm pass of per-tensor rule ``rule_id`` in a stored format (twin of
    ``numba_norms.make_stored_norms_driver``): ``out[t] = (sum x^2, sum y^2)``.
    ``uses*``: the slots the norm pass reads; tables, codes and checks as
    :func:`run_stored_dense` (of ``opts``, only the ``pre`` bits matter)."""
    cdef Py_ssize_t T = ptrs.shape[0], C = chunks.shape[0], R = hyper.shape[0]
    cdef Py_ssize_t ci, t, bad = -1
    cdef int64_t n, D, nb, nsc
    cdef int ucode = (1 if uses0 else 0) | (2 if uses1 else 0) | (4 if uses2 else 0)
    cdef SFmt fb
    cdef double* part
    _check_common("run_stored_norms", rule_id, R_COUNT, dtype_code, opts, hyper.shape[1],
                  False)
    _check_kinds("run_stored_norms", pkind, gkind, skind, dtype_code)
    if MATH_NAMES[rule_id] not in TENSOR_NAMES:
        raise ValueError(f"run_stored_norms: rule {MATH_NAMES[rule_id]!r} is not a "
                         "per-tensor rule")
    if ptrs.shape[1] != NCOLS or chunks.shape[1] != 3 or fmt.shape[1] != 10:
        raise ValueError(f"run_stored_norms: tables must be ptrs (T, {NCOLS}), fmt (T, 10), "
                         f"chunks (C, 3)")
    if hidx.shape[0] != T or fmt.shape[0] != T or out.shape[0] != T or out.shape[1] != 2:
        raise ValueError(f"run_stored_norms: hidx, fmt and out must have {T} rows (out: 2 "
                         "columns)")
    if blk <= 0 or (skind == SK_Q8 and blk != SBLK):
        raise ValueError(f"run_stored_norms: bad block size {blk} (8-bit blocks: {SBLK})")
    for t in range(T):
        out[t, 0] = 0.0
        out[t, 1] = 0.0
        n, D, nb, nsc = fmt[t, 4], fmt[t, 5], fmt[t, 6], fmt[t, 7]
        if not (0 <= hidx[t] < R and n >= 0 and D >= 0 and nb >= 0 and nsc >= 0
                and (nb == 0 or (nsc % nb == 0 and (nsc // nb) * D == n
                                 and (nb - 1) * blk < D <= nb * blk))):
            raise IndexError(f"run_stored_norms: bad table row {t}: hidx {hidx[t]} "
                             f"({R} scalar rows), fmt {tuple(fmt[t, k] for k in range(10))}")
    with nogil:
        for ci in range(C):
            if not (0 <= chunks[ci, 0] < T and 0 <= chunks[ci, 1] <= chunks[ci, 2]
                    <= fmt[chunks[ci, 0], 7]):
                bad = ci
                break
    if bad >= 0:
        raise IndexError(f"run_stored_norms: bad chunk row {bad}: "
                         f"{(chunks[bad, 0], chunks[bad, 1], chunks[bad, 2])} ({T} tensors)")
    if C == 0:
        return
    fb.pkind = pkind
    fb.gkind = gkind
    fb.skind = skind
    fb.smask = smask
    fb.key = 0
    fb.base = 0
    part = <double*>malloc(2 * C * sizeof(double))
    if part == NULL:
        raise MemoryError()
    cdef const int64_t* pp = &ptrs[0, 0]
    cdef const int64_t* fp = &fmt[0, 0]
    cdef const int64_t* cp = &chunks[0, 0]
    cdef const double* hp = &hyper[0, 0]
    cdef const int64_t* ip = &hidx[0]
    cdef const int64_t* ch
    try:
        if nelem >= parallel_min:
            for ci in prange(C, nogil=True, schedule="static"):
                ch = cp + 3 * ci
                if dtype_code == 0:
                    _snorms_chunk(<float>0, rule_id, ucode, opts, &fb, pp + ch[0] * NCOLS,
                                  fp + ch[0] * 10, ch, blk, hp + ip[ch[0]] * NSCALARS,
                                  part + 2 * ci)
                else:
                    _snorms_chunk(<double>0, rule_id, ucode, opts, &fb, pp + ch[0] * NCOLS,
                                  fp + ch[0] * 10, ch, blk, hp + ip[ch[0]] * NSCALARS,
                                  part + 2 * ci)
        else:
            with nogil:
                for ci in range(C):
                    ch = cp + 3 * ci
                    if dtype_code == 0:
                        _snorms_chunk(<float>0, rule_id, ucode, opts, &fb,
                                      pp + ch[0] * NCOLS, fp + ch[0] * 10, ch, blk,
                                      hp + ip[ch[0]] * NSCALARS, part + 2 * ci)
                    else:
                        _snorms_chunk(<double>0, rule_id, ucode, opts, &fb,
                                      pp + ch[0] * NCOLS, fp + ch[0] * 10, ch, blk,
                                      hp + ip[ch[0]] * NSCALARS, part + 2 * ci)
        for ci in range(C):                # chunk order
            t = chunks[ci, 0]
            out[t, 0] = out[t, 0] + part[2 * ci]
            out[t, 1] = out[t, 1] + part[2 * ci + 1]
    finally:
        free(part)
