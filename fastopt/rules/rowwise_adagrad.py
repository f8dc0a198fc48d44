"""Row-wise Adagrad: one accumulator per row (first axis), as large embedding
trainers (FBGEMM, TorchRec) use.  The state ``sum`` has shape ``(nrows,)``, a
quarter to a hundredth of Adagrad's.

Equations (per row ``r`` of ``D`` elements)::

    clr = lr / (1 + (step - 1) * lr_decay)
    g = -g if maximize;  g = g + weight_decay * p        (per element)
    sum_r = sum_r + mean_j(g_rj^2)
    p_rj = p_rj - clr * g_rj / (sqrt(sum_r) + eps)

The element math works on a whole row (:func:`element_row`); the mean's sum is
added in a fixed order (:func:`row_sumsq`), so results do not depend on the thread
count or the vector width, and the Cython copy adds in the same order.  Dense and
sparse steps run through the row drivers, every row once for a dense gradient.
"""

import numpy as np
from .._jit import register_jitable

from . import adagrad
from ._reference import l2, signed_grad
from .base import Rule

Scalars = adagrad.Scalars


@register_jitable
def row_sumsq(prow, grow, wd, maximize, zero):
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
def element_row(prow, grow, acc, inv_d, zero, c):
    """One row: ``prow`` is updated in place, the new accumulator returned
    (``inv_d = 1 / D``)."""
    clr, wd, eps = c.clr, c.weight_decay, c.eps
    acc = acc + row_sumsq(prow, grow, wd, c.maximize, zero) * inv_d
    denom = np.sqrt(acc) + eps
    for j in range(prow.shape[0]):
        g = -grow[j] if c.maximize else grow[j]
        if wd:
            g = g + wd * prow[j]
        prow[j] = prow[j] - clr * g / denom
    return acc


def reference(param, grad, state, group, step, fresh=()):
    if param.size == 0:
        return
    nrows = param.shape[0]
    p2 = param.reshape(nrows, -1)
    g = l2(signed_grad(grad.reshape(nrows, -1), group), p2, group["weight_decay"])
    clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
    s = state["sum"].reshape(-1)
    s += np.mean(g * g, axis=1)
    p2 -= clr * g / (np.sqrt(s)[:, None] + group["eps"])


RULE = Rule(
    name="RowWiseAdagrad",
    doc="""Row-wise Adagrad: one accumulator per row (first axis) instead of per element,
        the memory-saving variant large embedding trainers use (FBGEMM's
        ``rowwise_adagrad``).  Same hyperparameters as :class:`Adagrad`::

            g = -g if maximize;  g += weight_decay * p
            sum[r] += mean_j(g[r, j]^2)
            p[r, :] -= clr * g[r, :] / (sqrt(sum[r]) + eps)

        with ``clr = lr / (1 + (t - 1) * lr_decay)``.  State ``sum`` has shape
        ``(param.shape[0],)``.  For a 1-D parameter every element is a row, which is
        plain Adagrad.  Every backend, dense and sparse.
        """,
    defaults=dict(adagrad.DEFAULTS),
    checks=dict(adagrad.CHECKS),
    slots=("sum",),
    nonnegative_slots=("sum",),
    uses_slots=lambda group: (True, False, False),
    Scalars=Scalars,
    host_scalars=adagrad.host_scalars,
    math=element_row,
    reference=reference,
    layout="rowwise",
    # no compiled-in flags: they are tested once per row, and constant-folding
    # weight_decay = 0 made LLVM vectorize the partial sums 4x slower (measured)
    slot_init=lambda group, name: group["initial_accumulator_value"],
    variants=({}, {"lr_decay": 0.01, "weight_decay": 1e-2, "initial_accumulator_value": 0.1},
              {"maximize": True, "eps": 1e-6}),
)
