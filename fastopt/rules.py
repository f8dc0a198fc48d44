"""Per-element update math: each rule written once.

Every function here maps one element to its new value and is compiled by every
backend that needs it: the Numba CPU driver (``fastopt._numba_cpu``), the CUDA
driver (as a device function) and, in spirit, the Cython copy in ``kernels/``
(tested for parity against these functions).

Calling convention, shared by every rule::

    new_p, new_s0, new_s1, new_s2 = rule(p, g, s0, s1, s2, c)

* ``p``, ``g``: parameter and gradient element (the parameter's dtype).
* ``s0, s1, s2``: the rule's state slots in registry order (unused slots are
  passed as zero by the drivers and their results discarded).
* ``c``: a tuple of ``fastopt.registry.NSCALARS`` per-step scalars, already cast to
  the parameter's dtype.  They are computed once per step on the host in float64
  by the rule's ``scalars`` function (bias corrections, effective learning rate,
  ``1/sqrt(bc2)``, option flags as 0/1), so no element pays a ``pow``.

The arithmetic stays in the parameter's dtype (no Python float literals, which
would promote float32 to float64).  NaN and Inf propagate as IEEE arithmetic says;
the maximum used by AMSGrad and Adamax propagates NaN like ``torch.maximum``.
"""

import numpy as np
from numba.extending import register_jitable


@register_jitable
def _nanmax(a, b):
    """max(a, b) that returns NaN when either argument is NaN (like torch.maximum)."""
    if a > b or a != a:
        return a
    return b


@register_jitable
def _sign(x, one, zero):
    """sign(x) in x's dtype; NaN stays NaN (like torch.sign)."""
    if x > zero:
        return one
    if x < zero:
        return -one
    if x == zero:
        return zero
    return x


@register_jitable
def sgd(p, g, buf, s1, s2, c):
    """SGD with optional momentum, dampening, Nesterov, L2 weight decay.

    Slots: ``s0 = momentum_buffer``.  Scalars: ``(lr, weight_decay, momentum,
    1 - dampening, nesterov, maximize, first, has_momentum)``.  As torch.optim.SGD::

        g = -g if maximize;  g = g + weight_decay * p
        buf = g                                   (first step with momentum)
        buf = momentum * buf + (1 - dampening) * g (later steps)
        g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    """
    lr, wd, mom, omd = c[0], c[1], c[2], c[3]
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
    return p, buf, s1, s2


@register_jitable
def adagrad(p, g, acc, s1, s2, c):
    """Adagrad.  Slots: ``s0 = sum``.  Scalars: ``(clr, weight_decay, eps, maximize)``
    with ``clr = lr / (1 + (step - 1) * lr_decay)``.  As torch.optim.Adagrad::

        g = -g if maximize;  g = g + weight_decay * p
        sum = sum + g * g
        p = p - clr * g / (sqrt(sum) + eps)
    """
    clr, wd, eps = c[0], c[1], c[2]
    if c[3]:
        g = -g
    if wd:
        g = g + wd * p
    acc = acc + g * g
    p = p - clr * g / (np.sqrt(acc) + eps)
    return p, acc, s1, s2


@register_jitable
def rmsprop(p, g, sq, gavg, buf, c):
    """RMSprop.  Slots: ``square_avg, grad_avg, momentum_buffer``.  Scalars:
    ``(lr, weight_decay, alpha, 1 - alpha, eps, momentum, centered, has_momentum,
    maximize)``.  As torch.optim.RMSprop::

        g = -g if maximize;  g = g + weight_decay * p
        square_avg = alpha * square_avg + (1 - alpha) * g * g
        centered:  grad_avg = alpha * grad_avg + (1 - alpha) * g
                   avg = sqrt(square_avg - grad_avg^2) + eps
        else:      avg = sqrt(square_avg) + eps
        momentum > 0:  buf = momentum * buf + g / avg;  p = p - lr * buf
        else:          p = p - lr * g / avg
    """
    lr, wd, alpha, oma, eps, mom = c[0], c[1], c[2], c[3], c[4], c[5]
    if c[8]:
        g = -g
    if wd:
        g = g + wd * p
    sq = alpha * sq + oma * g * g
    if c[6]:
        gavg = alpha * gavg + oma * g
        avg = np.sqrt(sq - gavg * gavg) + eps
    else:
        avg = np.sqrt(sq) + eps
    if c[7]:
        buf = mom * buf + g / avg
        p = p - lr * buf
    else:
        p = p - lr * (g / avg)
    return p, sq, gavg, buf


@register_jitable
def adam(p, g, m, v, vmax, c):
    """Adam / AdamW (one math, two registry entries).  Slots: ``exp_avg,
    exp_avg_sq, max_exp_avg_sq``.  Scalars: ``(step_size, beta1, 1 - beta1, beta2,
    1 - beta2, eps, 1/sqrt(bc2), l2, decay, amsgrad, maximize)`` with
    ``step_size = lr / (1 - beta1^t)``, ``bc2 = 1 - beta2^t``; Adam: ``l2 =
    weight_decay, decay = 1``; AdamW: ``l2 = 0, decay = 1 - lr * weight_decay``.
    As torch.optim.Adam/AdamW::

        g = -g if maximize;  g = g + l2 * p;  p = decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        vmax = max(vmax, v) if amsgrad;  vhat = vmax if amsgrad else v
        p = p - step_size * m / (sqrt(vhat) / sqrt(bc2) + eps)
    """
    step_size, b1, omb1, b2, omb2, eps, rbc2, l2, decay = (
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8])
    if c[10]:
        g = -g
    if l2:
        g = g + l2 * p
    p = p * decay
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * g * g
    if c[9]:
        vmax = _nanmax(vmax, v)
        denom = np.sqrt(vmax) * rbc2 + eps
    else:
        denom = np.sqrt(v) * rbc2 + eps
    p = p - step_size * (m / denom)
    return p, m, v, vmax


@register_jitable
def adamax(p, g, m, u, s2, c):
    """Adamax.  Slots: ``exp_avg, exp_inf``.  Scalars: ``(clr, beta1, 1 - beta1,
    beta2, eps, weight_decay, maximize)`` with ``clr = lr / (1 - beta1^t)``.
    As torch.optim.Adamax::

        g = -g if maximize;  g = g + weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        u = max(beta2 * u, |g| + eps)
        p = p - clr * m / u
    """
    clr, b1, omb1, b2, eps, wd = c[0], c[1], c[2], c[3], c[4], c[5]
    if c[6]:
        g = -g
    if wd:
        g = g + wd * p
    m = b1 * m + omb1 * g
    u = _nanmax(b2 * u, np.abs(g) + eps)
    p = p - clr * (m / u)
    return p, m, u, s2


@register_jitable
def nadam(p, g, m, v, s2, c):
    """NAdam (Dozat 2016, torch's momentum-decay schedule).  Slots: ``exp_avg,
    exp_avg_sq``; the scalar ``mu_product`` lives on the host.  Scalars:
    ``(cg, cm, beta1, 1 - beta1, beta2, 1 - beta2, eps, 1/sqrt(bc2), l2, decay,
    maximize)`` with ``mu_t = beta1 (1 - 0.5 * 0.96^(t psi))``,
    ``cg = lr (1 - mu_t) / (1 - prod_{i<=t} mu_i)``,
    ``cm = lr mu_{t+1} / (1 - prod_{i<=t+1} mu_i)``.  As torch.optim.NAdam::

        g = -g if maximize;  g = g + l2 * p;  p = decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        d = sqrt(v) / sqrt(bc2) + eps
        p = p - cg * g / d - cm * m / d
    """
    cg, cm, b1, omb1, b2, omb2, eps, rbc2, l2, decay = (
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9])
    if c[10]:
        g = -g
    if l2:
        g = g + l2 * p
    p = p * decay
    m = b1 * m + omb1 * g
    v = b2 * v + omb2 * g * g
    d = np.sqrt(v) * rbc2 + eps
    p = p - cg * (g / d) - cm * (m / d)
    return p, m, v, s2


@register_jitable
def lion(p, g, m, s1, s2, c):
    """Lion (Chen et al. 2023).  Slots: ``exp_avg``.  Scalars: ``(lr, beta1,
    1 - beta1, beta2, 1 - beta2, decay, maximize, one, zero)`` with
    ``decay = 1 - lr * weight_decay``::

        g = -g if maximize
        u = beta1 * m + (1 - beta1) * g
        p = decay * p - lr * sign(u)
        m = beta2 * m + (1 - beta2) * g
    """
    lr, b1, omb1, b2, omb2, decay = c[0], c[1], c[2], c[3], c[4], c[5]
    if c[6]:
        g = -g
    u = b1 * m + omb1 * g
    p = p * decay - lr * _sign(u, c[7], c[8])
    m = b2 * m + omb2 * g
    return p, m, s1, s2


@register_jitable
def _row_sumsq(prow, grow, wd, maximize, zero):
    """Sum over a row of ``g_j^2`` with ``g = (-grad if maximize else grad) + wd * p``,
    in a fixed order that does not wait on one chain of additions: eight partial
    sums, lane ``k`` taking elements ``j = k (mod 8)`` of the first ``n - n % 8``;
    the last ``n % 8`` elements are added to lane 0 in order; then
    ``((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7))``.  Deterministic (no thread-count or
    vector-width dependence); the Cython copy adds in the same order.  The flags
    are tested once per row, not per element (testing them per element measured about 9x slower)."""
    n = grow.shape[0]
    n8 = n - n % 8
    mx = maximize != zero
    decay = wd != zero
    l0 = zero
    l1 = zero
    l2 = zero
    l3 = zero
    l4 = zero
    l5 = zero
    l6 = zero
    l7 = zero
    for j in range(0, n8, 8):
        a0, a1, a2, a3 = grow[j], grow[j + 1], grow[j + 2], grow[j + 3]
        a4, a5, a6, a7 = grow[j + 4], grow[j + 5], grow[j + 6], grow[j + 7]
        if decay:
            if mx:
                a0, a1, a2, a3, a4, a5, a6, a7 = -a0, -a1, -a2, -a3, -a4, -a5, -a6, -a7
            a0 = a0 + wd * prow[j]
            a1 = a1 + wd * prow[j + 1]
            a2 = a2 + wd * prow[j + 2]
            a3 = a3 + wd * prow[j + 3]
            a4 = a4 + wd * prow[j + 4]
            a5 = a5 + wd * prow[j + 5]
            a6 = a6 + wd * prow[j + 6]
            a7 = a7 + wd * prow[j + 7]
        l0 += a0 * a0
        l1 += a1 * a1
        l2 += a2 * a2
        l3 += a3 * a3
        l4 += a4 * a4
        l5 += a5 * a5
        l6 += a6 * a6
        l7 += a7 * a7
    for j in range(n8, n):
        a = -grow[j] if mx else grow[j]
        if decay:
            a = a + wd * prow[j]
        l0 += a * a
    return ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))


@register_jitable
def rowwise_adagrad(prow, grow, acc, inv_d, zero, c):
    """Row-wise Adagrad (one accumulator per row, as large embedding trainers use).
    Works on a whole row: ``prow`` is updated in place, the new accumulator returned.
    Scalars: ``(clr, weight_decay, eps, maximize)`` as Adagrad; ``inv_d = 1 / D``::

        g = -g if maximize;  g = g + weight_decay * p        (per element)
        sum_row = sum_row + sum_j(g_j^2) * inv_d    (sum: see _row_sumsq)
        p_j = p_j - clr * g_j / (sqrt(sum_row) + eps)
    """
    clr, wd, eps = c[0], c[1], c[2]
    acc = acc + _row_sumsq(prow, grow, wd, c[3], zero) * inv_d
    denom = np.sqrt(acc) + eps
    for j in range(prow.shape[0]):
        g = -grow[j] if c[3] else grow[j]
        if wd:
            g = g + wd * prow[j]
        prow[j] = prow[j] - clr * g / denom
    return acc
