"""Adamax (torch.optim.Adamax), Adam with the infinity norm.

Equations (state ``exp_avg`` m, ``exp_inf`` u)::

    g = -g if maximize;  g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    u = max(beta2 * u, |g| + eps)
    p = p - clr * m / u,     clr = lr / (1 - beta1^t)

``max`` propagates NaN like ``torch.maximum``.  Default ``lr=2e-3`` (torch's).
"""

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._math import nanmax
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("AdamaxScalars", (
    "clr", "beta1", "one_minus_beta1", "beta2", "eps", "weight_decay", "maximize"))


def host_scalars(group, step, host, fresh):
    b1, b2 = group["betas"]
    return dict(clr=group["lr"] / (1.0 - b1 ** step), beta1=b1, one_minus_beta1=1.0 - b1,
                beta2=b2, eps=group["eps"], weight_decay=group["weight_decay"],
                maximize=group["maximize"]), host


@register_jitable
def element(p, g, m, u, s2, c):
    if c.maximize:
        g = -g
    if c.weight_decay:
        g = g + c.weight_decay * p
    m = c.beta1 * m + c.one_minus_beta1 * g
    u = nanmax(c.beta2 * u, np.abs(g) + c.eps)
    p = p - c.clr * (m / u)
    return p, m, u, s2


def reference(param, grad, state, group, step, fresh=()):
    b1, b2 = group["betas"]
    g = l2(signed_grad(grad, group), param, group["weight_decay"])
    m, u = state["exp_avg"], state["exp_inf"]
    m[...] = b1 * m + (1 - b1) * g
    np.maximum(b2 * u, np.abs(g) + group["eps"], out=u)
    param -= (group["lr"] / (1 - b1 ** step)) * (m / u)


RULE = Rule(
    name="Adamax",
    doc="""Adamax (torch.optim.Adamax): ``u = max(b2 u, |g| + eps)``,
        ``p -= lr / (1 - b1^t) * m / u``.
        """,
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    checks=dict(lr=hp.non_negative, betas=hp.betas_half_open, eps=hp.non_negative,
                weight_decay=hp.non_negative, maximize=hp.boolean),
    slots=("exp_avg", "exp_inf"),
    nonnegative_slots=("exp_inf",),
    uses_slots=lambda group: (True, True, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    flags=("maximize",),
    zero_switches=("weight_decay",),
    variants=({}, {"weight_decay": 1e-2, "maximize": True, "betas": (0.8, 0.99)}),
)
