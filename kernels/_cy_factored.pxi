# The passes of factored rules (Adafactor): the twin of
# fastopt/backends/numba_factored.py, included by _cy_dense.pyx.  The element math
# below is the deliberate second copy of fastopt/rules/adafactor.py (sq, lerp,
# factored_v, update, apply).
#
# The same operations in the same order and dtype as Numba's drivers: per row (and
# per vector chunk of CHUNK elements) the float64 sums in AF_LANES lanes (element j
# to lane j % 8 over the first C - C % 8 elements), the lanes added in order, then
# the tail in element order (the lanes: kernels/fastopt_af_lanes.h, one vector loop);
# per block of FACTOR_ROWS rows the column partial sums,
# added block by block in order; the rows and chunks added in order.  Every order is fixed by the shape, so the result
# is the same for any thread count, bit for bit Numba's.

from libc.math cimport fabs, sqrt

cdef extern from "fastopt_af_lanes.h" nogil:
    void fastopt_af_lanes_f32(const float* x, Py_ssize_t nvec, double* acc)
    void fastopt_af_lanes_f64(const double* x, Py_ssize_t nvec, double* acc)

#: rows per block of the column partial sums (fastopt.rules.adafactor.FACTOR_ROWS)
FACTOR_ROWS_BUILT = 64
cdef enum:
    AF_ROWS = 64
    AF_CHUNK = 32768
    AF_LANES = 8        # float64 accumulators: element j to lane j % 8 (numba's LANES)
    AF_UBUF = 256       # elements of U per buffer of the RMS passes (a multiple of 8)


cdef inline void _af_lanes(const floating* x, Py_ssize_t nvec, double* acc) noexcept nogil:
    """acc[q] += x[8 i + q]^2 in float64 for i < nvec, in order (the C helper's
    vector loop; numba: _sq_lanes)."""
    if floating is float:
        fastopt_af_lanes_f32(x, nvec, acc)
    else:
        fastopt_af_lanes_f64(x, nvec, acc)


cdef inline floating _af_lerp(floating a, floating b, floating w, floating omw) noexcept nogil:
    if fabs(w) < 0.5:
        return a + w * (b - a)
    return b - (b - a) * omw


cdef inline floating _af_update(floating g, floating v, floating e2,
                                floating one) noexcept nogil:
    if v < e2:
        v = e2
    return (one / <floating>sqrt(v)) * g


cdef inline floating _af_v(floating r, floating c, floating m) noexcept nogil:
    return (r * c) / m


cdef inline floating _af_apply(floating p, floating u, floating decay,
                               floating step) noexcept nogil:
    return p * decay + step * u


cdef void _af_sums_block(const floating* P, const floating* G, Py_ssize_t R, Py_ssize_t C,
                         Py_ssize_t k, Py_ssize_t nb, double* rows, double* prow,
                         double* part) noexcept nogil:
    cdef Py_ssize_t b = k // nb
    cdef Py_ssize_t r0 = (k % nb) * AF_ROWS
    cdef Py_ssize_t r1 = min(R, r0 + AF_ROWS)
    cdef Py_ssize_t r, j, q, base, body = C - C % AF_LANES
    cdef double s, sp, x, y
    cdef double acc[AF_LANES]
    cdef double accp[AF_LANES]
    cdef double* pc = part + k * C
    for j in range(C):
        pc[j] = 0.0
    for r in range(r0, r1):
        base = (b * R + r) * C
        for j in range(C):
            x = <double>G[base + j] * <double>G[base + j]
            pc[j] = pc[j] + x
        for q in range(AF_LANES):
            acc[q] = 0.0
            accp[q] = 0.0
        _af_lanes(G + base, body // AF_LANES, acc)
        _af_lanes(P + base, body // AF_LANES, accp)
        s = 0.0
        sp = 0.0
        for q in range(AF_LANES):
            s = s + acc[q]
            sp = sp + accp[q]
        for j in range(body, C):
            x = <double>G[base + j] * <double>G[base + j]
            s = s + x
            y = <double>P[base + j]
            sp = sp + y * y
        rows[b * R + r] = s
        prow[b * R + r] = sp


def factored_sums(const floating[::1] P, const floating[::1] G, Py_ssize_t B, Py_ssize_t R,
                  Py_ssize_t C, double[::1] rows, double[::1] prow, double[:, ::1] part,
                  double[::1] cols, Py_ssize_t parallel_min):
    """Row sums of G^2 and p^2 (``rows``, ``prow``: B*R), column sums of G^2
    (``cols``: B*C) via the block partials ``part`` (B*nb, C); returns the sum of
    p^2."""
    cdef Py_ssize_t nb = (R + AF_ROWS - 1) // AF_ROWS
    cdef Py_ssize_t k, q, blk, b, j
    cdef double a, tot = 0.0
    if P.shape[0] != B * R * C or G.shape[0] != B * R * C or rows.shape[0] != B * R \
            or prow.shape[0] != B * R or part.shape[0] != B * nb or part.shape[1] != C \
            or cols.shape[0] != B * C:
        raise ValueError("factored_sums: array sizes do not match B, R, C")
    if B * R * C == 0:
        return 0.0
    cdef const floating* pp = &P[0]
    cdef const floating* gp = &G[0]
    cdef double* rp = &rows[0]
    cdef double* qp = &prow[0]
    cdef double* tp = &part[0, 0]
    if B * R * C >= parallel_min:
        for k in prange(B * nb, nogil=True, schedule="static"):
            _af_sums_block(pp, gp, R, C, k, nb, rp, qp, tp)
    else:
        with nogil:
            for k in range(B * nb):
                _af_sums_block(pp, gp, R, C, k, nb, rp, qp, tp)
    with nogil:
        for q in range(B * C):
            b = q // C
            j = q % C
            a = 0.0
            for blk in range(nb):
                a = a + tp[(b * nb + blk) * C + j]
            cols[q] = a
        for k in range(B * R):
            tot = tot + qp[k]
    return tot


cdef void _af_usq_row(const floating* G, const floating* rv, const floating* cv,
                      const floating* m, Py_ssize_t R, Py_ssize_t C, Py_ssize_t k,
                      floating e2, floating sign, floating one, double* rows) noexcept nogil:
    cdef Py_ssize_t b = k // R, j, j0, cnt, q, base = k * C, body = C - C % AF_LANES
    cdef floating r = rv[k], mb = m[b], u
    cdef double s = 0.0, x
    cdef double acc[AF_LANES]
    cdef floating ub[AF_UBUF]
    for q in range(AF_LANES):
        acc[q] = 0.0
    j0 = 0
    while j0 < body:
        cnt = min(<Py_ssize_t>AF_UBUF, body - j0)
        for j in range(cnt):
            ub[j] = _af_update(G[base + j0 + j] * sign, _af_v(r, cv[b * C + j0 + j], mb),
                               e2, one)
        _af_lanes(ub, cnt // AF_LANES, acc)
        j0 = j0 + cnt
    for q in range(AF_LANES):
        s = s + acc[q]
    for j in range(body, C):
        u = _af_update(G[base + j] * sign, _af_v(r, cv[b * C + j], mb), e2, one)
        x = <double>u
        s = s + x * x
    rows[k] = s


def factored_usq(const floating[::1] G, const floating[::1] rv, const floating[::1] cv,
                 const floating[::1] m, Py_ssize_t B, Py_ssize_t R, Py_ssize_t C,
                 floating e2, floating sign, floating one, double[::1] rows,
                 Py_ssize_t parallel_min):
    """The sum of U^2 (per row in ``rows``, the rows added in order)."""
    cdef Py_ssize_t k
    cdef double tot = 0.0
    if G.shape[0] != B * R * C or rv.shape[0] != B * R or cv.shape[0] != B * C \
            or m.shape[0] != B or rows.shape[0] != B * R:
        raise ValueError("factored_usq: array sizes do not match B, R, C")
    if B * R * C == 0:
        return 0.0
    cdef const floating* gp = &G[0]
    cdef const floating* rp = &rv[0]
    cdef const floating* cp = &cv[0]
    cdef const floating* mp = &m[0]
    cdef double* op = &rows[0]
    if B * R * C >= parallel_min:
        for k in prange(B * R, nogil=True, schedule="static"):
            _af_usq_row(gp, rp, cp, mp, R, C, k, e2, sign, one, op)
    else:
        with nogil:
            for k in range(B * R):
                _af_usq_row(gp, rp, cp, mp, R, C, k, e2, sign, one, op)
    with nogil:
        for k in range(B * R):
            tot = tot + op[k]
    return tot


cdef void _af_apply_row(floating* P, const floating* G, const floating* rv,
                        const floating* cv, const floating* m, Py_ssize_t R, Py_ssize_t C,
                        Py_ssize_t k, floating e2, floating sign, floating one,
                        floating decay, floating step) noexcept nogil:
    cdef Py_ssize_t b = k // R, j, base = k * C
    cdef floating r = rv[k], mb = m[b], u
    for j in range(C):
        u = _af_update(G[base + j] * sign, _af_v(r, cv[b * C + j], mb), e2, one)
        P[base + j] = _af_apply(P[base + j], u, decay, step)


def factored_apply(floating[::1] P, const floating[::1] G, const floating[::1] rv,
                   const floating[::1] cv, const floating[::1] m, Py_ssize_t B, Py_ssize_t R,
                   Py_ssize_t C, floating e2, floating sign, floating one, floating decay,
                   floating step, Py_ssize_t parallel_min):
    """The update pass: ``P = P decay + step U``."""
    cdef Py_ssize_t k
    if P.shape[0] != B * R * C or G.shape[0] != B * R * C or rv.shape[0] != B * R \
            or cv.shape[0] != B * C or m.shape[0] != B:
        raise ValueError("factored_apply: array sizes do not match B, R, C")
    if B * R * C == 0:
        return
    cdef floating* pp = &P[0]
    cdef const floating* gp = &G[0]
    cdef const floating* rp = &rv[0]
    cdef const floating* cp = &cv[0]
    cdef const floating* mp = &m[0]
    if B * R * C >= parallel_min:
        for k in prange(B * R, nogil=True, schedule="static"):
            _af_apply_row(pp, gp, rp, cp, mp, R, C, k, e2, sign, one, decay, step)
    else:
        with nogil:
            for k in range(B * R):
                _af_apply_row(pp, gp, rp, cp, mp, R, C, k, e2, sign, one, decay, step)


cdef void _af_vsums_chunk(const floating* P, const floating* G, floating* V, Py_ssize_t n,
                          Py_ssize_t k, floating w, floating omw, floating sign,
                          double* part) noexcept nogil:
    cdef Py_ssize_t lo = k * AF_CHUNK, hi = min(n, lo + AF_CHUNK), i, q
    cdef Py_ssize_t body = hi - (hi - lo) % AF_LANES
    cdef floating g
    cdef double sp = 0.0, y
    cdef double acc[AF_LANES]
    for i in range(lo, hi):
        g = G[i] * sign
        V[i] = _af_lerp(V[i], g * g, w, omw)
    for q in range(AF_LANES):
        acc[q] = 0.0
    _af_lanes(P + lo, (body - lo) // AF_LANES, acc)
    for q in range(AF_LANES):
        sp = sp + acc[q]
    for i in range(body, hi):
        y = <double>P[i]
        sp = sp + y * y
    part[k] = sp


def vector_sums(const floating[::1] P, const floating[::1] G, floating[::1] V, floating w,
                floating omw, floating sign, double[::1] part, Py_ssize_t parallel_min):
    """``V = lerp(V, G^2, w)`` in place; returns the sum of p^2 (per chunk in
    ``part``, the chunks in order)."""
    cdef Py_ssize_t n = P.shape[0], nc = (n + AF_CHUNK - 1) // AF_CHUNK, k
    cdef double tot = 0.0
    if G.shape[0] != n or V.shape[0] != n or part.shape[0] != nc:
        raise ValueError("vector_sums: array sizes do not match")
    if n == 0:
        return 0.0
    cdef const floating* pp = &P[0]
    cdef const floating* gp = &G[0]
    cdef floating* vp = &V[0]
    cdef double* op = &part[0]
    if n >= parallel_min:
        for k in prange(nc, nogil=True, schedule="static"):
            _af_vsums_chunk(pp, gp, vp, n, k, w, omw, sign, op)
    else:
        with nogil:
            for k in range(nc):
                _af_vsums_chunk(pp, gp, vp, n, k, w, omw, sign, op)
    with nogil:
        for k in range(nc):
            tot = tot + op[k]
    return tot


cdef void _af_vusq_chunk(const floating* G, const floating* V, Py_ssize_t n, Py_ssize_t k,
                         floating e2, floating sign, floating one,
                         double* part) noexcept nogil:
    cdef Py_ssize_t lo = k * AF_CHUNK, hi = min(n, lo + AF_CHUNK), i, i0, q
    cdef Py_ssize_t body = hi - (hi - lo) % AF_LANES
    cdef double s = 0.0, x
    cdef double acc[AF_LANES]
    cdef floating ub[AF_UBUF]
    cdef Py_ssize_t cnt
    for q in range(AF_LANES):
        acc[q] = 0.0
    i0 = lo
    while i0 < body:
        cnt = min(<Py_ssize_t>AF_UBUF, body - i0)
        for i in range(cnt):
            ub[i] = _af_update(G[i0 + i] * sign, V[i0 + i], e2, one)
        _af_lanes(ub, cnt // AF_LANES, acc)
        i0 = i0 + cnt
    for q in range(AF_LANES):
        s = s + acc[q]
    for i in range(body, hi):
        x = <double>_af_update(G[i] * sign, V[i], e2, one)
        s = s + x * x
    part[k] = s


def vector_usq(const floating[::1] G, const floating[::1] V, floating e2, floating sign,
               floating one, double[::1] part, Py_ssize_t parallel_min):
    """The sum of U^2 of a vector (per chunk, the chunks in order)."""
    cdef Py_ssize_t n = G.shape[0], nc = (n + AF_CHUNK - 1) // AF_CHUNK, k
    cdef double tot = 0.0
    if V.shape[0] != n or part.shape[0] != nc:
        raise ValueError("vector_usq: array sizes do not match")
    if n == 0:
        return 0.0
    cdef const floating* gp = &G[0]
    cdef const floating* vp = &V[0]
    cdef double* op = &part[0]
    if n >= parallel_min:
        for k in prange(nc, nogil=True, schedule="static"):
            _af_vusq_chunk(gp, vp, n, k, e2, sign, one, op)
    else:
        with nogil:
            for k in range(nc):
                _af_vusq_chunk(gp, vp, n, k, e2, sign, one, op)
    with nogil:
        for k in range(nc):
            tot = tot + op[k]
    return tot


cdef void _af_vapply_chunk(floating* P, const floating* G, const floating* V, Py_ssize_t n,
                           Py_ssize_t k, floating e2, floating sign, floating one,
                           floating decay, floating step) noexcept nogil:
    cdef Py_ssize_t lo = k * AF_CHUNK, hi = min(n, lo + AF_CHUNK), i
    for i in range(lo, hi):
        P[i] = _af_apply(P[i], _af_update(G[i] * sign, V[i], e2, one), decay, step)


def vector_apply(floating[::1] P, const floating[::1] G, const floating[::1] V, floating e2,
                 floating sign, floating one, floating decay, floating step,
                 Py_ssize_t parallel_min):
    """The update pass of a vector."""
    cdef Py_ssize_t n = P.shape[0], nc = (n + AF_CHUNK - 1) // AF_CHUNK, k
    if G.shape[0] != n or V.shape[0] != n:
        raise ValueError("vector_apply: array sizes do not match")
    if n == 0:
        return
    cdef floating* pp = &P[0]
    cdef const floating* gp = &G[0]
    cdef const floating* vp = &V[0]
    if n >= parallel_min:
        for k in prange(nc, nogil=True, schedule="static"):
            _af_vapply_chunk(pp, gp, vp, n, k, e2, sign, one, decay, step)
    else:
        with nogil:
            for k in range(nc):
                _af_vapply_chunk(pp, gp, vp, n, k, e2, sign, one, decay, step)


# ------------------------------------------------------------------ the grouped step
# The twin of fastopt/backends/numba_factored_group.py: one call steps every tensor of
# a group plan (fastopt.factored.group_plan), each tensor by one thread from start to
# end with the per-tensor passes above, the host work of fastopt.factored.run_tensor
# compiled in between (the same operations, orders and dtypes, so the bits are the
# per-tensor path's and Numba's).

cdef enum:
    AF_PW_BLOCK = 128   # NumPy's pairwise summation block (PW_BLOCKSIZE)
    AF_SC_W = 0
    AF_SC_RHO = 1
    AF_SC_DECAY = 2
    AF_SC_EPS1 = 3
    AF_SC_EPS2 = 4
    AF_SC_D = 5
    AF_SC_MAX = 6
    AF_NSCAL = 7


cdef double _af_pairwise(const floating* a, Py_ssize_t n) noexcept nogil:
    """NumPy's pairwise_sum of a[:n] in float64."""
    cdef Py_ssize_t i, n2
    cdef double res, r0, r1, r2, r3, r4, r5, r6, r7
    if n < 8:
        res = 0.0
        for i in range(n):
            res = res + <double>a[i]
        return res
    if n <= AF_PW_BLOCK:
        r0 = <double>a[0]
        r1 = <double>a[1]
        r2 = <double>a[2]
        r3 = <double>a[3]
        r4 = <double>a[4]
        r5 = <double>a[5]
        r6 = <double>a[6]
        r7 = <double>a[7]
        i = 8
        while i < n - n % 8:
            r0 = r0 + <double>a[i]
            r1 = r1 + <double>a[i + 1]
            r2 = r2 + <double>a[i + 2]
            r3 = r3 + <double>a[i + 3]
            r4 = r4 + <double>a[i + 4]
            r5 = r5 + <double>a[i + 5]
            r6 = r6 + <double>a[i + 6]
            r7 = r7 + <double>a[i + 7]
            i = i + 8
        res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < n:
            res = res + <double>a[i]
            i = i + 1
        return res
    n2 = n // 2
    n2 = n2 - n2 % 8
    return _af_pairwise(a, n2) + _af_pairwise(a + n2, n - n2)


cdef double _af_np_sum(const floating* a, Py_ssize_t n, Py_ssize_t bufsize) noexcept nogil:
    """np.add.reduce(a[:n], dtype=float64): 0.0 plus the pairwise sums of spans of
    ``bufsize`` elements in order (NumPy's cast buffer for float32)."""
    cdef double res = 0.0
    cdef Py_ssize_t s = 0
    while s < n:
        res = res + _af_pairwise(a + s, min(bufsize, n - s))
        s = s + bufsize
    return res


cdef inline double _af_py_max(double a, double b) noexcept nogil:
    return b if b > a else a


cdef int _af_matrix_step(floating* P, const floating* G, floating* rv, floating* cv,
                         Py_ssize_t B, Py_ssize_t R, Py_ssize_t C, double sqn,
                         const double* sc, Py_ssize_t bufsize) noexcept nogil:
    """One tensor's whole step (numba_factored_group._matrix_step); -1 when out of
    memory (nothing written then)."""
    cdef floating one = 1, w = <floating>sc[AF_SC_W], omw, eps1 = <floating>sc[AF_SC_EPS1]
    cdef floating e2 = <floating>(sc[AF_SC_EPS1] * sc[AF_SC_EPS1])
    cdef floating sign = -one if sc[AF_SC_MAX] != 0 else one
    cdef floating decay = <floating>sc[AF_SC_DECAY], dC = <floating>C, dR = <floating>R
    cdef floating x, mb, step
    cdef Py_ssize_t nb = (R + AF_ROWS - 1) // AF_ROWS, k, b, j, blk
    cdef double a, psq = 0.0, usq = 0.0, alpha
    omw = one - w
    cdef double* rows = <double*>malloc(B * R * sizeof(double))
    cdef double* prow = <double*>malloc(B * R * sizeof(double))
    cdef double* part = <double*>malloc(B * nb * C * sizeof(double))
    cdef double* cols = <double*>malloc(C * sizeof(double))
    cdef floating* m = <floating*>malloc(B * sizeof(floating))
    if rows == NULL or prow == NULL or part == NULL or cols == NULL or m == NULL:
        free(rows)
        free(prow)
        free(part)
        free(cols)
        free(m)
        return -1
    for k in range(B * nb):
        _af_sums_block(P, G, R, C, k, nb, rows, prow, part)
    for k in range(B * R):
        psq = psq + prow[k]
    for b in range(B):
        for j in range(C):
            a = 0.0
            for blk in range(nb):
                a = a + part[(b * nb + blk) * C + j]
            cols[j] = a
        for k in range(b * R, (b + 1) * R):
            x = <floating>sqrt(rows[k])
            rv[k] = _af_lerp(rv[k], x * x / dC, w, omw)
        for j in range(C):
            x = <floating>sqrt(cols[j])
            cv[b * C + j] = _af_lerp(cv[b * C + j], x * x / dR, w, omw)
        mb = <floating>(_af_np_sum(rv + b * R, R, bufsize) / <double>R)
        if mb < eps1:
            mb = eps1
        m[b] = mb
    alpha = _af_py_max(sc[AF_SC_EPS2], sqrt(psq) / sqn) * sc[AF_SC_RHO]
    for k in range(B * R):
        _af_usq_row(G, rv, cv, m, R, C, k, e2, sign, one, rows)
    for k in range(B * R):
        usq = usq + rows[k]
    step = <floating>(-alpha / _af_py_max(1.0, sqrt(usq) / (sqn * sc[AF_SC_D])))
    for k in range(B * R):
        _af_apply_row(P, G, rv, cv, m, R, C, k, e2, sign, one, decay, step)
    free(rows)
    free(prow)
    free(part)
    free(cols)
    free(m)
    return 0


cdef int _af_vector_step(floating* P, const floating* G, floating* V, Py_ssize_t n,
                         double sqn, const double* sc) noexcept nogil:
    """One vector's whole step (numba_factored_group._vector_step)."""
    cdef floating one = 1, w = <floating>sc[AF_SC_W], omw
    cdef floating e2 = <floating>(sc[AF_SC_EPS1] * sc[AF_SC_EPS1])
    cdef floating sign = -one if sc[AF_SC_MAX] != 0 else one
    cdef floating decay = <floating>sc[AF_SC_DECAY], step
    cdef Py_ssize_t nc = (n + AF_CHUNK - 1) // AF_CHUNK, k
    cdef double psq = 0.0, usq = 0.0, alpha
    omw = one - w
    cdef double* part = <double*>malloc(nc * sizeof(double))
    if part == NULL:
        return -1
    for k in range(nc):
        _af_vsums_chunk(P, G, V, n, k, w, omw, sign, part)
    for k in range(nc):
        psq = psq + part[k]
    alpha = _af_py_max(sc[AF_SC_EPS2], sqrt(psq) / sqn) * sc[AF_SC_RHO]
    for k in range(nc):
        _af_vusq_chunk(G, V, n, k, e2, sign, one, part)
    for k in range(nc):
        usq = usq + part[k]
    step = <floating>(-alpha / _af_py_max(1.0, sqrt(usq) / (sqn * sc[AF_SC_D])))
    for k in range(nc):
        _af_vapply_chunk(P, G, V, n, k, e2, sign, one, decay, step)
    free(part)
    return 0


def factored_group(const int64_t[:, ::1] ptrs, const int64_t[:, ::1] dims,
                   const double[::1] sqn, const int64_t[::1] sidx, const double[:, ::1] scal,
                   const floating[::1] like, Py_ssize_t bufsize, bint parallel):
    """Step the plan's tensors (``ptrs`` (T, 4) addresses of param, grad, row_var or
    variance, col_var; ``dims`` (T, 4) ``B, R, C, n`` with ``B = 0`` for a vector;
    ``sqn`` ``n ** 0.5``; ``scal[sidx[t]]`` the tensor's scalars); ``like``, an array
    of the parameters' dtype, selects the dtype.  The addresses are the caller's to
    check (fastopt.factored.group_plan)."""
    cdef Py_ssize_t T = ptrs.shape[0], t
    cdef floating one = 1
    cdef int bad = 0
    if ptrs.shape[1] != 4 or dims.shape[0] != T or dims.shape[1] != 4 or sqn.shape[0] != T \
            or sidx.shape[0] != T or scal.shape[1] != AF_NSCAL:
        raise ValueError("factored_group: table sizes do not match")
    for t in range(T):
        if sidx[t] < 0 or sidx[t] >= scal.shape[0] or dims[t, 3] <= 0:
            raise ValueError("factored_group: a scalar row or size out of range")
    if bufsize <= 0:
        raise ValueError("factored_group: bufsize must be positive")
    if T == 0:
        return
    if parallel:
        for t in prange(T, nogil=True, schedule="dynamic"):
            bad += _af_group_one(&ptrs[0, 0], &dims[0, 0], &sqn[0], &sidx[0], &scal[0, 0],
                                 t, bufsize, one) != 0
    else:
        with nogil:
            for t in range(T):
                bad += _af_group_one(&ptrs[0, 0], &dims[0, 0], &sqn[0], &sidx[0],
                                     &scal[0, 0], t, bufsize, one) != 0
    if bad:
        raise MemoryError("factored_group: out of memory for a tensor's scratch")


cdef int _af_group_one(const int64_t* ptrs, const int64_t* dims, const double* sqn,
                       const int64_t* sidx, const double* scal, Py_ssize_t t,
                       Py_ssize_t bufsize, floating one) noexcept nogil:
    cdef Py_ssize_t B = dims[4 * t], R = dims[4 * t + 1], C = dims[4 * t + 2]
    cdef Py_ssize_t n = dims[4 * t + 3]
    cdef floating* P = <floating*><intptr_t>ptrs[4 * t]
    cdef const floating* G = <const floating*><intptr_t>ptrs[4 * t + 1]
    cdef floating* S0 = <floating*><intptr_t>ptrs[4 * t + 2]
    cdef floating* S1 = <floating*><intptr_t>ptrs[4 * t + 3]
    cdef const double* sc = scal + AF_NSCAL * sidx[t]
    if B == 0:
        return _af_vector_step(P, G, S0, n, sqn[t], sc)
    return _af_matrix_step(P, G, S0, S1, B, R, C, sqn[t], sc, bufsize)
