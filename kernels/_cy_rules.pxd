# cython: language_level=3
"""Per-element update math for the Cython backend: the one deliberate second copy.

Each function here is a faithful transcription of the function of the same name in
``fastopt/rules.py`` (the definition of every rule's math): the same operations in
the same order, the same flags read from the same scalar positions, the same
NaN-propagating ``_nanmax`` and ``_sign``.  ``tests/test_cython_parity.py`` checks
them bit for bit against the Python functions, for both dtypes, on awkward inputs.

Calling convention (``rules.py`` returns a 4-tuple; here the values are updated in
place through pointers)::

    rule(&p, g, &s0, &s1, &s2, c)      # c: NSCALARS (18) scalars in p's dtype

* every value, scalar and intermediate is of the fused type ``floating`` (the
  parameter's dtype): no literals, no promotion, so float32 arithmetic stays float32;
* ``sqrt``/``fabs`` are the float (``sqrtf``/``fabsf``) or double versions, both
  correctly rounded as IEEE 754 requires;
* ``cdivision``: plain C division (IEEE: x/0 gives +-Inf or NaN, no exception);
* the including module compiles with ``-ffp-contract=off`` (no fused multiply-add)
  and without any fast-math flag, so NaN checks and rounding are as written.

A slot that a rule does not use is left untouched (as ``rules.py`` returns it
unchanged); which slots a configuration uses is the driver's business.
"""

cimport cython
from cython cimport floating
from libc.math cimport fabs, fabsf, sqrt, sqrtf


cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline floating _fabs(floating x) noexcept nogil:
    if floating is float:
        return fabsf(x)
    else:
        return fabs(x)


cdef inline floating _nanmax(floating a, floating b) noexcept nogil:
    """max(a, b) that returns NaN when either argument is NaN (like torch.maximum)."""
    if a > b or a != a:
        return a
    return b


cdef inline floating _sign(floating x, floating one, floating zero) noexcept nogil:
    """sign(x) in x's dtype; NaN stays NaN (like torch.sign)."""
    if x > zero:
        return one
    if x < zero:
        return -one
    if x == zero:
        return zero
    return x


@cython.cdivision(True)
cdef inline void sgd(floating* p_, floating g, floating* buf_, floating* s1_, floating* s2_,
                     const floating* c) noexcept nogil:
    """rules.sgd: scalars (lr, weight_decay, momentum, 1 - dampening, nesterov,
    maximize, first, has_momentum)."""
    cdef floating p = p_[0]
    cdef floating buf = buf_[0]
    cdef floating lr = c[0], wd = c[1], mom = c[2], omd = c[3]
    if c[5]:
        g = -g
    if wd:
        g = g + wd * p
    if c[7]:
        if c[6]:
            buf = g
        else:
            buf = mom * buf + omd * g
        if c[4]:
            g = g + mom * buf
        else:
            g = buf
    p = p - lr * g
    p_[0] = p
    buf_[0] = buf


@cython.cdivision(True)
cdef inline void adagrad(floating* p_, floating g, floating* acc_, floating* s1_, floating* s2_,
                         const floating* c) noexcept nogil:
    """rules.adagrad: scalars (clr, weight_decay, eps, maximize)."""
    cdef floating p = p_[0]
    cdef floating acc = acc_[0]
    cdef floating clr = c[0], wd = c[1], eps = c[2]
    if c[3]:
        g = -g
    if wd:
        g = g + wd * p
    acc = acc + g * g
    p = p - clr * g / (_sqrt(acc) + eps)
    p_[0] = p
    acc_[0] = acc


@cython.cdivision(True)
cdef inline void rmsprop(floating* p_, floating g, floating* sq_, floating* gavg_, floating* buf_,
                         const floating* c) noexcept nogil:
    """rules.rmsprop: scalars (lr, weight_decay, alpha, 1 - alpha, eps, momentum,
    centered, has_momentum, maximize)."""
    cdef floating p = p_[0]
    cdef floating sq = sq_[0], gavg = gavg_[0], buf = buf_[0]
    cdef floating lr = c[0], wd = c[1], alpha = c[2], oma = c[3], eps = c[4], mom = c[5]
    cdef floating avg
    if c[8]:
        g = -g
    if wd:
        g = g + wd * p
    sq = alpha * sq + oma * g * g
    if c[6]:
        gavg = alpha * gavg + oma * g
        avg = _sqrt(sq - gavg * gavg) + eps
    else:
        avg = _sqrt(sq) + eps
    if c[7]:
        buf = mom * buf + g / avg
        p = p - lr * buf
    else:
        p = p - lr * (g / avg)
    p_[0] = p
    sq_[0] = sq
    gavg_[0] = gavg
    buf_[0] = buf


@cython.cdivision(True)
cdef inline void adam(floating* p_, floating g, floating* m_, floating* v_, floating* vmax_,
                      const floating* c) noexcept nogil:
    """rules.adam (Adam and AdamW): scalars (step_size, beta1, 1 - beta1, beta2,
    1 - beta2, eps, 1/sqrt(bc2), l2, decay, amsgrad, maximize)."""
    cdef floating p = p_[0]
    cdef floating m = m_[0], v = v_[0], vmax = vmax_[0]
    cdef floating step_size = c[0], b1 = c[1], omb1 = c[2], b2 = c[3], omb2 = c[4]
    cdef floating eps = c[5], rbc2 = c[6], l2 = c[7], decay = c[8]
    cdef floating denom
    if c[10]:
        g = -g
    if l2:
        g = g + l2 * p
    p = p * decay
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * g * g
    if c[9]:
        vmax = _nanmax(vmax, v)
        denom = _sqrt(vmax) * rbc2 + eps
    else:
        denom = _sqrt(v) * rbc2 + eps
    p = p - step_size * (m / denom)
    p_[0] = p
    m_[0] = m
    v_[0] = v
    vmax_[0] = vmax


@cython.cdivision(True)
cdef inline void adamax(floating* p_, floating g, floating* m_, floating* u_, floating* s2_,
                        const floating* c) noexcept nogil:
    """rules.adamax: scalars (clr, beta1, 1 - beta1, beta2, eps, weight_decay, maximize)."""
    cdef floating p = p_[0]
    cdef floating m = m_[0], u = u_[0]
    cdef floating clr = c[0], b1 = c[1], omb1 = c[2], b2 = c[3], eps = c[4], wd = c[5]
    if c[6]:
        g = -g
    if wd:
        g = g + wd * p
    m = b1 * m + omb1 * g
    u = _nanmax(b2 * u, _fabs(g) + eps)
    p = p - clr * (m / u)
    p_[0] = p
    m_[0] = m
    u_[0] = u


@cython.cdivision(True)
cdef inline void nadam(floating* p_, floating g, floating* m_, floating* v_, floating* s2_,
                       const floating* c) noexcept nogil:
    """rules.nadam: scalars (cg, cm, beta1, 1 - beta1, beta2, 1 - beta2, eps,
    1/sqrt(bc2), l2, decay, maximize)."""
    cdef floating p = p_[0]
    cdef floating m = m_[0], v = v_[0]
    cdef floating cg = c[0], cm = c[1], b1 = c[2], omb1 = c[3], b2 = c[4], omb2 = c[5]
    cdef floating eps = c[6], rbc2 = c[7], l2 = c[8], decay = c[9]
    cdef floating d
    if c[10]:
        g = -g
    if l2:
        g = g + l2 * p
    p = p * decay
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * g * g
    d = _sqrt(v) * rbc2 + eps
    p = p - cg * (g / d) - cm * (m / d)
    p_[0] = p
    m_[0] = m
    v_[0] = v


@cython.cdivision(True)
cdef inline void lion(floating* p_, floating g, floating* m_, floating* s1_, floating* s2_,
                      const floating* c) noexcept nogil:
    """rules.lion: scalars (lr, beta1, 1 - beta1, beta2, 1 - beta2, decay, maximize,
    one, zero)."""
    cdef floating p = p_[0]
    cdef floating m = m_[0]
    cdef floating lr = c[0], b1 = c[1], omb1 = c[2], b2 = c[3], omb2 = c[4], decay = c[5]
    cdef floating u
    if c[6]:
        g = -g
    u = b1 * m + omb1 * g
    p = p * decay - lr * _sign(u, c[7], c[8])
    m = b2 * m + omb2 * g
    p_[0] = p
    m_[0] = m


# ------------------------------------------------------------ row-wise rules
#
# A row-wise rule keeps one state value per row and works on a whole row:
#
#     acc = rule(prow, grow, acc, inv_d, n, c)      # prow updated in place
#
# (``rules.rowwise_adagrad(prow, grow, acc, inv_d, zero, c)``; ``n`` is the row
# length, the Python version reads it from the array).


cdef inline floating _row_sumsq(const floating* prow, const floating* grow, Py_ssize_t n,
                                floating wd, floating maximize) noexcept nogil:
    """rules._row_sumsq: eight partial sums, the tail into lane 0, the same tree."""
    cdef Py_ssize_t n8 = n - n % 8
    cdef Py_ssize_t j
    cdef bint mx = maximize != 0
    cdef bint decay = wd != 0
    cdef floating l[8]
    cdef floating a[8]
    cdef floating b
    cdef int k
    for k in range(8):
        l[k] = 0
    for j in range(0, n8, 8):
        for k in range(8):
            a[k] = grow[j + k]
        if decay:
            if mx:
                for k in range(8):
                    a[k] = -a[k]
            for k in range(8):
                a[k] = a[k] + wd * prow[j + k]
        for k in range(8):
            l[k] = l[k] + a[k] * a[k]
    for j in range(n8, n):
        b = -grow[j] if mx else grow[j]
        if decay:
            b = b + wd * prow[j]
        l[0] = l[0] + b * b
    return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))


@cython.cdivision(True)
cdef inline floating rowwise_adagrad(floating* prow, const floating* grow, floating acc,
                                     floating inv_d, Py_ssize_t n,
                                     const floating* c) noexcept nogil:
    """rules.rowwise_adagrad: scalars (clr, weight_decay, eps, maximize) as Adagrad;
    the squared gradient is summed as ``_row_sumsq`` does, then scaled by ``inv_d``."""
    cdef floating clr = c[0], wd = c[1], eps = c[2]
    cdef floating g, denom
    cdef Py_ssize_t j
    acc = acc + _row_sumsq(prow, grow, n, wd, c[3]) * inv_d
    denom = _sqrt(acc) + eps
    for j in range(n):
        g = -grow[j] if c[3] else grow[j]
        if wd:
            g = g + wd * prow[j]
        prow[j] = prow[j] - clr * g / denom
    return acc
