# The passes of factored rules (Adafactor): the twin of
# fastopt/backends/numba_factored.py, included by _cy_dense.pyx.  The element math
# below is the deliberate second copy of fastopt/rules/adafactor.py (sq, lerp,
# factored_v, update, apply).
#
# The same operations in the same order and dtype as Numba's drivers: per row (and
# per vector chunk of CHUNK elements) the float64 sums in AF_LANES lanes (element j
# to lane j % 8 over the first C - C % 8 elements), the lanes added in order, then
# the tail in element order; per block of FACTOR_ROWS rows the column partial sums,
# added block by block in order; the rows and chunks added in order.  Every order is fixed by the shape, so the result
# is the same for any thread count, bit for bit Numba's.

from libc.math cimport fabs, sqrt

#: rows per block of the column partial sums (fastopt.rules.adafactor.FACTOR_ROWS)
FACTOR_ROWS_BUILT = 64
cdef enum:
    AF_ROWS = 64
    AF_CHUNK = 32768
    AF_LANES = 8        # float64 accumulators: element j to lane j % 8 (numba's LANES)


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
    cdef Py_ssize_t r, j, j0, j0b, q, base, body = C - C % AF_LANES
    cdef double s, sp, x, y
    cdef double acc[AF_LANES]
    cdef double accp[AF_LANES]
    cdef double* pc = part + k * C
    for j in range(C):
        pc[j] = 0.0
    for r in range(r0, r1):
        base = (b * R + r) * C
        for q in range(AF_LANES):
            acc[q] = 0.0
            accp[q] = 0.0
        for j0b in range(body // AF_LANES):
            j0 = j0b * AF_LANES
            for q in range(AF_LANES):
                x = <double>G[base + j0 + q] * <double>G[base + j0 + q]
                acc[q] = acc[q] + x
                pc[j0 + q] = pc[j0 + q] + x
                y = <double>P[base + j0 + q]
                accp[q] = accp[q] + y * y
        s = 0.0
        sp = 0.0
        for q in range(AF_LANES):
            s = s + acc[q]
            sp = sp + accp[q]
        for j in range(body, C):
            x = <double>G[base + j] * <double>G[base + j]
            s = s + x
            pc[j] = pc[j] + x
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
    cdef Py_ssize_t b = k // R, j, j0, j0b, q, base = k * C, body = C - C % AF_LANES
    cdef floating r = rv[k], mb = m[b], u
    cdef double s = 0.0, x
    cdef double acc[AF_LANES]
    for q in range(AF_LANES):
        acc[q] = 0.0
    for j0b in range(body // AF_LANES):
        j0 = j0b * AF_LANES
        for q in range(AF_LANES):
            u = _af_update(G[base + j0 + q] * sign, _af_v(r, cv[b * C + j0 + q], mb), e2,
                           one)
            x = <double>u
            acc[q] = acc[q] + x * x
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
    cdef Py_ssize_t lo = k * AF_CHUNK, hi = min(n, lo + AF_CHUNK), i, i0, i0b, q
    cdef Py_ssize_t body = hi - (hi - lo) % AF_LANES
    cdef floating g
    cdef double sp = 0.0, y
    cdef double acc[AF_LANES]
    for q in range(AF_LANES):
        acc[q] = 0.0
    for i0b in range((body - lo) // AF_LANES):
        i0 = lo + i0b * AF_LANES
        for q in range(AF_LANES):
            g = G[i0 + q] * sign
            V[i0 + q] = _af_lerp(V[i0 + q], g * g, w, omw)
            y = <double>P[i0 + q]
            acc[q] = acc[q] + y * y
    for q in range(AF_LANES):
        sp = sp + acc[q]
    for i in range(body, hi):
        g = G[i] * sign
        V[i] = _af_lerp(V[i], g * g, w, omw)
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
    cdef Py_ssize_t lo = k * AF_CHUNK, hi = min(n, lo + AF_CHUNK), i, i0, i0b, q
    cdef Py_ssize_t body = hi - (hi - lo) % AF_LANES
    cdef double s = 0.0, x
    cdef double acc[AF_LANES]
    for q in range(AF_LANES):
        acc[q] = 0.0
    for i0b in range((body - lo) // AF_LANES):
        i0 = lo + i0b * AF_LANES
        for q in range(AF_LANES):
            x = <double>_af_update(G[i0 + q] * sign, V[i0 + q], e2, one)
            acc[q] = acc[q] + x * x
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
