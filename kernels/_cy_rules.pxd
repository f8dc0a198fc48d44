# cython: language_level=3
"""Per-element update math for the Cython backend: the one deliberate second copy.

Each rule function here is a faithful transcription of the ``element`` function of
the rule's module (``fastopt/rules/<module>.py``, the function's name here): the
same operations in the same order, the same NaN-propagating ``_nanmax`` and
``_sign``, and every scalar read **by name**: ``c[ADAM_STEP_SIZE]`` is the
``step_size`` field of ``fastopt.rules.adam.Scalars``.  The column constants come
from ``_cy_scalars.pxi``, generated from the ``Scalars`` declarations by
``fastopt.rules.cython_pxi()`` (never edited by hand), and included here so that
every module that cimports this file sees them (``from _cy_rules cimport
NSCALARS, F_CLIP_VALUE, ...``); no column number is written anywhere else.

The fused options (``fastopt/rules/fused.py``) are here too: :func:`pre_pass`
(``g / grad_scale``, clip), :func:`post_pass` (L1 soft-threshold, clamps), as
passes over a block of elements, and :func:`renorm_row` (row max-norm), with the
switches as a runtime bit mask (``OPT_*``, the order of ``fused.SWITCHES``).

Calling convention (the Python functions return a 4-tuple; here the values are
updated in place through pointers)::

    rule(&p, g, &s0, &s1, &s2, c)      # c: NSCALARS scalars in p's dtype

* every value, scalar and intermediate is of the fused type ``floating`` (the
  parameter's dtype): no literals, no promotion, so float32 arithmetic stays float32;
* ``sqrt``/``fabs`` are the float (``sqrtf``/``fabsf``) or double versions, both
  correctly rounded as IEEE 754 requires;
* ``cdivision``: plain C division (IEEE: x/0 gives +-Inf or NaN, no exception);
* the including module compiles with ``-ffp-contract=off`` (no fused multiply-add)
  and without any fast-math flag, so NaN checks and rounding are as written.

A slot that a rule does not use is left untouched (as the Python function returns
it unchanged); which slots a configuration uses is the driver's business.
"""

include "_cy_scalars.pxi"

cimport cython
from cython cimport floating
from libc.math cimport INFINITY, fabs, fabsf, sqrt, sqrtf

# the fused switches as bits of one mask, in the order of fastopt.rules.fused.SWITCHES
cdef enum:
    OPT_GRAD_SCALE = 1
    OPT_CLIP = 2
    OPT_L1 = 4
    OPT_MIN = 8
    OPT_MAX = 16
    OPT_MAX_NORM = 32
    OPT_PRE = 3             # the gradient side (fused.pre)
    OPT_POST = 28           # the parameter side (fused.post)
    OPT_ELEMENT = 31        # the element-wise ones (max_norm needs whole rows)


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
    """rules._math.nanmax: NaN when either argument is NaN (like torch.maximum)."""
    if a > b or a != a:
        return a
    return b


cdef inline floating _sign(floating x, floating one, floating zero) noexcept nogil:
    """rules._math.sign: sign(x) in x's dtype; NaN stays NaN (like torch.sign)."""
    if x > zero:
        return one
    if x < zero:
        return -one
    if x == zero:
        return zero
    return x


# ------------------------------------------------------------ fused options
#
# ``fused.pre`` and ``fused.post`` as passes over a block of elements: the drivers
# run ``pre`` over a block of gradients into a buffer, the rule's element loop over
# the block, then ``post`` over the block of parameters (still in cache).  Each
# element sees the same operations in the same order as Numba's fused element step
# (``pre``, the rule's math, ``post``), and each pass is a simple loop the compiler
# vectorizes (one fused loop with five runtime switches did not vectorize, and five
# compile-time switches would multiply the number of specialized loops by 32).  The
# selects are written with every comparison evaluated, so that they if-convert
# (the module is compiled with ``-fno-trapping-math``: no value changes, only the
# floating-point exception flags are not kept, as in Numba/LLVM's default
# floating-point environment).

@cython.cdivision(True)
cdef inline void pre_pass(floating* out, const floating* G, Py_ssize_t n, const floating* c,
                          int opts) noexcept nogil:
    """``out[j] = fused.pre(G[j])``: ``g / grad_scale``, then clip to
    ``[-clip_value, clip_value]`` (NaN stays NaN).  ``out`` may be ``G``; ``opts``
    has at least one of the two bits."""
    cdef floating s = c[F_GRAD_SCALE], hi = c[F_CLIP_VALUE]
    cdef floating lo = -c[F_CLIP_VALUE]
    cdef floating g
    cdef Py_ssize_t j
    if (opts & OPT_GRAD_SCALE) and (opts & OPT_CLIP):
        for j in range(n):
            g = G[j] / s
            out[j] = hi if g > hi else (lo if g < lo else g)
    elif opts & OPT_GRAD_SCALE:
        for j in range(n):
            out[j] = G[j] / s
    elif opts & OPT_CLIP:
        for j in range(n):
            g = G[j]
            out[j] = hi if g > hi else (lo if g < lo else g)


cdef inline void post_pass(floating* P, Py_ssize_t n, const floating* c, floating zero,
                           int opts) noexcept nogil:
    """``P[j] = fused.post(P[j])``: soft-threshold by ``l1_threshold``, then clamp to
    ``[param_min, param_max]``.  NaN stays NaN.  One loop: a clamp that is off
    clamps to -Inf / +Inf, which changes no value (NaN included)."""
    cdef floating t = c[F_L1_THRESHOLD], mt = -c[F_L1_THRESHOLD]
    cdef floating lo = c[F_PARAM_MIN] if opts & OPT_MIN else -INFINITY
    cdef floating hi = c[F_PARAM_MAX] if opts & OPT_MAX else INFINITY
    cdef floating p, a, b, r
    cdef Py_ssize_t j
    if opts & OPT_L1:
        for j in range(n):
            p = P[j]
            a = p - t
            b = p + t
            # p > t: p - t;  p < -t: p + t;  else zero (NaN stays NaN)
            r = zero if p == p else p
            r = b if p < mt else r
            r = a if p > t else r
            r = lo if r < lo else r
            P[j] = hi if r > hi else r
    else:
        for j in range(n):
            p = P[j]
            p = lo if p < lo else p
            P[j] = hi if p > hi else p


@cython.cdivision(True)
cdef inline void renorm_row(floating* prow, Py_ssize_t n, const floating* c, floating zero,
                            floating eps) noexcept nogil:
    """fused.renorm_row: squares summed in element order, in the dtype; a row whose
    norm exceeds ``max_norm`` is scaled by ``max_norm / (norm + eps)``."""
    cdef floating ss = zero
    cdef floating norm, scale
    cdef Py_ssize_t j
    for j in range(n):
        ss += prow[j] * prow[j]
    norm = _sqrt(ss)
    if norm > c[F_MAX_NORM]:
        scale = c[F_MAX_NORM] / (norm + eps)
        for j in range(n):
            prow[j] = prow[j] * scale


# ----------------------------------------------------------- element rules

@cython.cdivision(True)
cdef inline void sgd(floating* p_, floating g, floating* buf_, floating* s1_, floating* s2_,
                     const floating* c) noexcept nogil:
    """rules.sgd.element."""
    cdef floating p = p_[0]
    cdef floating buf = buf_[0]
    if c[SGD_MAXIMIZE]:
        g = -g
    if c[SGD_WEIGHT_DECAY]:
        g = g + c[SGD_WEIGHT_DECAY] * p
    if c[SGD_HAS_MOMENTUM]:
        if c[SGD_FIRST]:
            buf = g
        else:
            buf = c[SGD_MOMENTUM] * buf + c[SGD_ONE_MINUS_DAMPENING] * g
        if c[SGD_NESTEROV]:
            g = g + c[SGD_MOMENTUM] * buf
        else:
            g = buf
    p = p - c[SGD_LR] * g
    p_[0] = p
    buf_[0] = buf


@cython.cdivision(True)
cdef inline void adagrad(floating* p_, floating g, floating* acc_, floating* s1_, floating* s2_,
                         const floating* c) noexcept nogil:
    """rules.adagrad.element."""
    cdef floating p = p_[0]
    cdef floating acc = acc_[0]
    if c[ADAGRAD_MAXIMIZE]:
        g = -g
    if c[ADAGRAD_WEIGHT_DECAY]:
        g = g + c[ADAGRAD_WEIGHT_DECAY] * p
    acc = acc + g * g
    p = p - c[ADAGRAD_CLR] * g / (_sqrt(acc) + c[ADAGRAD_EPS])
    p_[0] = p
    acc_[0] = acc


@cython.cdivision(True)
cdef inline void rmsprop(floating* p_, floating g, floating* sq_, floating* gavg_, floating* buf_,
                         const floating* c) noexcept nogil:
    """rules.rmsprop.element."""
    cdef floating p = p_[0]
    cdef floating sq = sq_[0], gavg = gavg_[0], buf = buf_[0]
    cdef floating avg
    if c[RMSPROP_MAXIMIZE]:
        g = -g
    if c[RMSPROP_WEIGHT_DECAY]:
        g = g + c[RMSPROP_WEIGHT_DECAY] * p
    sq = c[RMSPROP_ALPHA] * sq + c[RMSPROP_ONE_MINUS_ALPHA] * g * g
    if c[RMSPROP_CENTERED]:
        gavg = c[RMSPROP_ALPHA] * gavg + c[RMSPROP_ONE_MINUS_ALPHA] * g
        avg = _sqrt(sq - gavg * gavg) + c[RMSPROP_EPS]
    else:
        avg = _sqrt(sq) + c[RMSPROP_EPS]
    if c[RMSPROP_HAS_MOMENTUM]:
        buf = c[RMSPROP_MOMENTUM] * buf + g / avg
        p = p - c[RMSPROP_LR] * buf
    else:
        p = p - c[RMSPROP_LR] * (g / avg)
    p_[0] = p
    sq_[0] = sq
    gavg_[0] = gavg
    buf_[0] = buf


@cython.cdivision(True)
cdef inline void adam(floating* p_, floating g, floating* m_, floating* v_, floating* vmax_,
                      const floating* c) noexcept nogil:
    """rules.adam.element (Adam and AdamW)."""
    cdef floating p = p_[0]
    cdef floating m = m_[0], v = v_[0], vmax = vmax_[0]
    cdef floating denom
    if c[ADAM_MAXIMIZE]:
        g = -g
    if c[ADAM_L2]:
        g = g + c[ADAM_L2] * p
    p = p * c[ADAM_DECAY]
    m = c[ADAM_BETA1] * m + c[ADAM_ONE_MINUS_BETA1] * g
    v = c[ADAM_BETA2] * v + c[ADAM_ONE_MINUS_BETA2] * g * g
    if c[ADAM_AMSGRAD]:
        vmax = _nanmax(vmax, v)
        denom = _sqrt(vmax) * c[ADAM_RSQRT_BC2] + c[ADAM_EPS]
    else:
        denom = _sqrt(v) * c[ADAM_RSQRT_BC2] + c[ADAM_EPS]
    p = p - c[ADAM_STEP_SIZE] * (m / denom)
    p_[0] = p
    m_[0] = m
    v_[0] = v
    vmax_[0] = vmax


@cython.cdivision(True)
cdef inline void adamax(floating* p_, floating g, floating* m_, floating* u_, floating* s2_,
                        const floating* c) noexcept nogil:
    """rules.adamax.element."""
    cdef floating p = p_[0]
    cdef floating m = m_[0], u = u_[0]
    if c[ADAMAX_MAXIMIZE]:
        g = -g
    if c[ADAMAX_WEIGHT_DECAY]:
        g = g + c[ADAMAX_WEIGHT_DECAY] * p
    m = c[ADAMAX_BETA1] * m + c[ADAMAX_ONE_MINUS_BETA1] * g
    u = _nanmax(c[ADAMAX_BETA2] * u, _fabs(g) + c[ADAMAX_EPS])
    p = p - c[ADAMAX_CLR] * (m / u)
    p_[0] = p
    m_[0] = m
    u_[0] = u


@cython.cdivision(True)
cdef inline void nadam(floating* p_, floating g, floating* m_, floating* v_, floating* s2_,
                       const floating* c) noexcept nogil:
    """rules.nadam.element."""
    cdef floating p = p_[0]
    cdef floating m = m_[0], v = v_[0]
    cdef floating d
    if c[NADAM_MAXIMIZE]:
        g = -g
    if c[NADAM_L2]:
        g = g + c[NADAM_L2] * p
    p = p * c[NADAM_DECAY]
    m = c[NADAM_BETA1] * m + c[NADAM_ONE_MINUS_BETA1] * g
    v = c[NADAM_BETA2] * v + c[NADAM_ONE_MINUS_BETA2] * g * g
    d = _sqrt(v) * c[NADAM_RSQRT_BC2] + c[NADAM_EPS]
    p = p - c[NADAM_CG] * (g / d) - c[NADAM_CM] * (m / d)
    p_[0] = p
    m_[0] = m
    v_[0] = v


@cython.cdivision(True)
cdef inline void lion(floating* p_, floating g, floating* m_, floating* s1_, floating* s2_,
                      const floating* c) noexcept nogil:
    """rules.lion.element."""
    cdef floating p = p_[0]
    cdef floating m = m_[0]
    cdef floating u
    if c[LION_MAXIMIZE]:
        g = -g
    u = c[LION_BETA1] * m + c[LION_ONE_MINUS_BETA1] * g
    p = p * c[LION_DECAY] - c[LION_LR] * _sign(u, c[LION_ONE], c[LION_ZERO])
    m = c[LION_BETA2] * m + c[LION_ONE_MINUS_BETA2] * g
    p_[0] = p
    m_[0] = m


@cython.cdivision(True)
cdef inline void radam(floating* p_, floating g, floating* m_, floating* v_, floating* s2_,
                       const floating* c) noexcept nogil:
    """rules.radam.element."""
    cdef floating p = p_[0]
    cdef floating m = m_[0], v = v_[0]
    if c[RADAM_MAXIMIZE]:
        g = -g
    if c[RADAM_L2]:
        g = g + c[RADAM_L2] * p
    p = p * c[RADAM_DECAY]
    m = c[RADAM_BETA1] * m + c[RADAM_ONE_MINUS_BETA1] * g
    v = c[RADAM_BETA2] * v + c[RADAM_ONE_MINUS_BETA2] * g * g
    if c[RADAM_ADAPTIVE]:
        p = p - c[RADAM_STEP_SIZE] * (m / (_sqrt(v) + c[RADAM_EPS]))
    else:
        p = p - c[RADAM_STEP_SIZE] * m
    p_[0] = p
    m_[0] = m
    v_[0] = v


@cython.cdivision(True)
cdef inline void adadelta(floating* p_, floating g, floating* v_, floating* u_, floating* s2_,
                          const floating* c) noexcept nogil:
    """rules.adadelta.element."""
    cdef floating p = p_[0]
    cdef floating v = v_[0], u = u_[0]
    cdef floating d
    if c[ADADELTA_MAXIMIZE]:
        g = -g
    if c[ADADELTA_WEIGHT_DECAY]:
        g = g + c[ADADELTA_WEIGHT_DECAY] * p
    v = c[ADADELTA_RHO] * v + c[ADADELTA_ONE_MINUS_RHO] * g * g
    d = _sqrt(u + c[ADADELTA_EPS]) / _sqrt(v + c[ADADELTA_EPS]) * g
    u = c[ADADELTA_RHO] * u + c[ADADELTA_ONE_MINUS_RHO] * d * d
    p = p - c[ADADELTA_LR] * d
    p_[0] = p
    v_[0] = v
    u_[0] = u


cdef inline floating _clamp(floating x, floating lo, floating hi) noexcept nogil:
    """rules.rprop.clamp: min(max(x, lo), hi); NaN stays NaN (like torch.clamp)."""
    if x < lo:
        x = lo
    if x > hi:
        x = hi
    return x

cdef inline floating _sign0(floating x, floating one, floating zero) noexcept nogil:
    """rules.rprop.sign0: torch.sign, (0 < x) - (x < 0); NaN gives 0."""
    if x > zero:
        return one
    if x < zero:
        return -one
    return zero

cdef inline void rprop(floating* p_, floating g, floating* prev_, floating* s_, floating* s2_,
                       const floating* c) noexcept nogil:
    """rules.rprop.element."""
    cdef floating p = p_[0]
    cdef floating s = s_[0]
    cdef floating x, f
    if c[RPROP_MAXIMIZE]:
        g = -g
    x = g * prev_[0]
    if x > c[RPROP_ZERO]:
        f = c[RPROP_ETAPLUS]
    elif x < c[RPROP_ZERO]:
        f = c[RPROP_ETAMINUS]
        g = c[RPROP_ZERO]
    else:
        f = c[RPROP_ONE]
    s = _clamp(s * f, c[RPROP_STEP_SIZE_MIN], c[RPROP_STEP_SIZE_MAX])
    p = p - _sign0(g, c[RPROP_ONE], c[RPROP_ZERO]) * s
    p_[0] = p
    prev_[0] = g
    s_[0] = s


cdef inline void asgd(floating* p_, floating g, floating* ax_, floating* s1_, floating* s2_,
                      const floating* c) noexcept nogil:
    """rules.asgd.element."""
    cdef floating p = p_[0]
    if c[ASGD_MAXIMIZE]:
        g = -g
    if c[ASGD_WEIGHT_DECAY]:
        g = g + c[ASGD_WEIGHT_DECAY] * p
    p = p * c[ASGD_DECAY]
    p = p - c[ASGD_ETA] * g
    if c[ASGD_COPY]:
        ax_[0] = p
    else:
        ax_[0] = ax_[0] + (p - ax_[0]) * c[ASGD_MU]
    p_[0] = p



@cython.cdivision(True)
cdef inline void ademamix(floating* p_, floating g, floating* m1_, floating* m2_,
                          floating* nu_, const floating* c) noexcept nogil:
    """rules.ademamix.element."""
    cdef floating p = p_[0]
    cdef floating m1 = m1_[0], m2 = m2_[0], nu = nu_[0]
    m1 = c[ADEMAMIX_BETA1] * m1 + c[ADEMAMIX_ONE_MINUS_BETA1] * g
    m2 = c[ADEMAMIX_BETA3] * m2 + c[ADEMAMIX_ONE_MINUS_BETA3] * g
    nu = c[ADEMAMIX_BETA2] * nu + c[ADEMAMIX_ONE_MINUS_BETA2] * g * g
    p = p * c[ADEMAMIX_DECAY]
    p = p - c[ADEMAMIX_LR] * ((m1 / c[ADEMAMIX_BC1] + c[ADEMAMIX_ALPHA] * m2)
                              / (_sqrt(nu) / c[ADEMAMIX_SQRT_BC2] + c[ADEMAMIX_EPS]))
    p_[0] = p
    m1_[0] = m1
    m2_[0] = m2
    nu_[0] = nu


@cython.cdivision(True)
cdef inline void adamw_schedulefree(floating* p_, floating g, floating* z_, floating* v_,
                                    floating* s2_, const floating* c) noexcept nogil:
    """rules.adamw_schedulefree.element."""
    cdef floating p = p_[0]
    cdef floating z = z_[0], v = v_[0], gn
    if z != z:                       # not started: z is the parameter
        z = p
    v = v * c[ADAMWSCHEDULEFREE_BETA2] + c[ADAMWSCHEDULEFREE_ONE_MINUS_BETA2] * g * g
    gn = g / (_sqrt(v / c[ADAMWSCHEDULEFREE_BC2]) + c[ADAMWSCHEDULEFREE_EPS])
    if c[ADAMWSCHEDULEFREE_WEIGHT_DECAY]:
        gn = gn + c[ADAMWSCHEDULEFREE_WEIGHT_DECAY] * p
    if c[ADAMWSCHEDULEFREE_LERP_HIGH]:
        p = z - (z - p) * c[ADAMWSCHEDULEFREE_ONE_MINUS_CKP1]
    else:
        p = p + c[ADAMWSCHEDULEFREE_CKP1] * (z - p)
    p = p + c[ADAMWSCHEDULEFREE_Y_COEF] * gn
    z = z - c[ADAMWSCHEDULEFREE_LR] * gn
    p_[0] = p
    z_[0] = z
    v_[0] = v


cdef inline void sgd_schedulefree(floating* p_, floating g, floating* z_, floating* s1_,
                                  floating* s2_, const floating* c) noexcept nogil:
    """rules.sgd_schedulefree.element."""
    cdef floating p = p_[0]
    cdef floating z = z_[0]
    if z != z:                       # not started: z is the parameter
        z = p
    if c[SGDSCHEDULEFREE_WEIGHT_DECAY]:
        g = g + c[SGDSCHEDULEFREE_WEIGHT_DECAY] * p
    if c[SGDSCHEDULEFREE_LERP_HIGH]:
        p = z - (z - p) * c[SGDSCHEDULEFREE_ONE_MINUS_CKP1]
    else:
        p = p + c[SGDSCHEDULEFREE_CKP1] * (z - p)
    p = p + c[SGDSCHEDULEFREE_Y_COEF] * g
    z = z - c[SGDSCHEDULEFREE_LR] * g
    p_[0] = p
    z_[0] = z

# ------------------------------------------------------------ row-wise rules
#
# A row-wise rule keeps one state value per row and works on a whole row:
#
#     acc = rule(prow, grow, acc, inv_d, n, c)      # prow updated in place
#
# (``rules.rowwise_adagrad.element_row(prow, grow, acc, inv_d, zero, c)``; ``n`` is
# the row length, the Python version reads it from the array).


cdef inline floating _row_sumsq(const floating* prow, const floating* grow, Py_ssize_t n,
                                floating wd, floating maximize) noexcept nogil:
    """rules.rowwise_adagrad.row_sumsq: eight partial sums, the tail into lane 0,
    the same tree."""
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
    """rules.rowwise_adagrad.element_row (Adagrad's scalars): the squared gradient is
    summed as ``row_sumsq`` does, then scaled by ``inv_d``."""
    cdef floating clr = c[ADAGRAD_CLR], wd = c[ADAGRAD_WEIGHT_DECAY], eps = c[ADAGRAD_EPS]
    cdef floating g, denom
    cdef Py_ssize_t j
    acc = acc + _row_sumsq(prow, grow, n, wd, c[ADAGRAD_MAXIMIZE]) * inv_d
    denom = _sqrt(acc) + eps
    for j in range(n):
        g = -grow[j] if c[ADAGRAD_MAXIMIZE] else grow[j]
        if wd:
            g = g + wd * prow[j]
        prow[j] = prow[j] - clr * g / denom
    return acc


# ------------------------------------------------------------ per-tensor rules
# Each has its update (the element math, with the tensor's own scalar row) and its
# norm-pass function ``<rule>_norms(p, g, s0, s1, s2, c, &x, &y)``: the two values
# whose squares the norm pass sums (fastopt.rules.<rule>.norms).

@cython.cdivision(True)
cdef inline void _lamb_direction(floating p, floating g, floating* m, floating* v,
                                 floating* u, const floating* c) noexcept nogil:
    """rules.lamb.direction: the new moments and the direction ``u``."""
    m[0] = c[LAMB_BETA1] * m[0] + c[LAMB_ONE_MINUS_BETA1] * g
    v[0] = c[LAMB_BETA2] * v[0] + c[LAMB_ONE_MINUS_BETA2] * g * g
    u[0] = (m[0] * c[LAMB_RBC1]) / (_sqrt(v[0]) * c[LAMB_RSQRT_BC2] + c[LAMB_EPS])
    if c[LAMB_WEIGHT_DECAY]:
        u[0] = u[0] + c[LAMB_WEIGHT_DECAY] * p


cdef inline void lamb(floating* p_, floating g, floating* m_, floating* v_, floating* s2_,
                      const floating* c) noexcept nogil:
    """rules.lamb.element."""
    cdef floating p = p_[0]
    cdef floating m = m_[0], v = v_[0], u
    _lamb_direction(p, g, &m, &v, &u, c)
    p_[0] = p - c[LAMB_LR_TRUST] * u
    m_[0] = m
    v_[0] = v


cdef inline void lamb_norms(floating p, floating g, floating m, floating v, floating s2,
                            const floating* c, floating* x, floating* y) noexcept nogil:
    """rules.lamb.norms: the parameter and the direction."""
    cdef floating u
    _lamb_direction(p, g, &m, &v, &u, c)
    x[0] = p
    y[0] = u


cdef inline void lars(floating* p_, floating g, floating* buf_, floating* s1_, floating* s2_,
                      const floating* c) noexcept nogil:
    """rules.lars.element."""
    cdef floating p = p_[0]
    cdef floating buf = buf_[0], d
    if c[LARS_WEIGHT_DECAY]:
        g = g + c[LARS_WEIGHT_DECAY] * p
    d = c[LARS_LOCAL] * g
    buf = c[LARS_MOMENTUM] * buf + d
    if c[LARS_NESTEROV]:
        p = p - c[LARS_LR] * (d + c[LARS_MOMENTUM] * buf)
    else:
        p = p - c[LARS_LR] * buf
    p_[0] = p
    buf_[0] = buf


cdef inline void lars_norms(floating p, floating g, floating buf, floating s1, floating s2,
                            const floating* c, floating* x, floating* y) noexcept nogil:
    """rules.lars.norms: the parameter and the gradient."""
    x[0] = p
    y[0] = g


cdef inline void muon(floating* p_, floating o, floating* buf_, floating* s1_, floating* s2_,
                      const floating* c) noexcept nogil:
    """rules.muon.element (phase 2: ``o`` is r * NS(U), in the gradient's place; the
    momentum buffer was updated by the matrix phase and passes through)."""
    p_[0] = p_[0] * c[MUON_DECAY] - c[MUON_LR] * o
