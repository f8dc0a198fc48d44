"""Adam and AdamW (torch.optim.Adam / AdamW): one element math, two rules.

Equations (state ``exp_avg`` m, ``exp_avg_sq`` v, ``max_exp_avg_sq`` with amsgrad)::

    g = -g if maximize;  g = g + l2 * p;  p = decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    vmax = max(vmax, v) if amsgrad;  vhat = vmax if amsgrad else v
    p = p - step_size * m / (sqrt(vhat) / sqrt(bc2) + eps)

with ``step_size = lr / (1 - beta1^t)``, ``bc2 = 1 - beta2^t``.  Adam:
``l2 = weight_decay, decay = 1`` (L2 added to the gradient); AdamW:
``l2 = 0, decay = 1 - lr * weight_decay`` (decoupled).  ``eps`` is added after the
bias-corrected square root, as torch does; ``max`` propagates NaN like
``torch.maximum``.  AdamW's default weight decay is 1e-2 (torch's).
"""

import math

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._math import nanmax
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("AdamScalars", (
    "step_size", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps",
    "rsqrt_bc2", "l2", "decay", "amsgrad", "maximize"))


def _host_scalars_for(decoupled):
    def host_scalars(group, step, host, fresh):
        b1, b2 = group["betas"]
        lr, wd = group["lr"], group["weight_decay"]
        l2_, decay = (0.0, 1.0 - lr * wd) if decoupled else (wd, 1.0)
        return dict(step_size=lr / (1.0 - b1 ** step), beta1=b1, one_minus_beta1=1.0 - b1,
                    beta2=b2, one_minus_beta2=1.0 - b2, eps=group["eps"],
                    rsqrt_bc2=1.0 / math.sqrt(1.0 - b2 ** step), l2=l2_, decay=decay,
                    amsgrad=group["amsgrad"], maximize=group["maximize"]), host
    return host_scalars


@register_jitable
def element(p, g, m, v, vmax, c):
    if c.maximize:
        g = -g
    if c.l2:
        g = g + c.l2 * p
    p = p * c.decay
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    if c.amsgrad:
        vmax = nanmax(vmax, v)
        denom = np.sqrt(vmax) * c.rsqrt_bc2 + c.eps
    else:
        denom = np.sqrt(v) * c.rsqrt_bc2 + c.eps
    p = p - c.step_size * (m / denom)
    return p, m, v, vmax


def _reference(param, grad, state, group, step, decoupled):
    b1, b2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    g = signed_grad(grad, group)
    if decoupled:
        param *= 1 - lr * wd
    else:
        g = l2(g, param, wd)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    bias_correction1 = 1 - b1 ** step
    bias_correction2 = 1 - b2 ** step
    if group["amsgrad"]:
        vmax = state["max_exp_avg_sq"]
        np.maximum(vmax, v, out=vmax)
        vhat = vmax
    else:
        vhat = v
    denom = np.sqrt(vhat) / math.sqrt(bias_correction2) + group["eps"]
    param -= (lr / bias_correction1) * (m / denom)


def reference_adam(param, grad, state, group, step, fresh=()):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam)."""
    _reference(param, grad, state, group, step, decoupled=False)


def reference_adamw(param, grad, state, group, step, fresh=()):
    """Adam with decoupled weight decay p <- p (1 - lr wd) (torch.optim.AdamW)."""
    _reference(param, grad, state, group, step, decoupled=True)


CHECKS = dict(lr=hp.non_negative, betas=hp.betas_half_open, eps=hp.non_negative,
              weight_decay=hp.non_negative, amsgrad=hp.boolean, maximize=hp.boolean)
SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _uses(group):
    return (True, True, group["amsgrad"])


ADAM = Rule(
    name="Adam",
    doc="""Adam (Kingma & Ba 2015) as torch.optim.Adam: L2 weight decay added to the
        gradient, eps added after the bias-corrected square root, optional AMSGrad.

        ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
        ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``
        (``v`` replaced by ``max(vmax, v)`` with amsgrad).
        """,
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  amsgrad=False, maximize=False),
    checks=CHECKS,
    slots=SLOTS,
    nonnegative_slots=("exp_avg_sq", "max_exp_avg_sq"),
    uses_slots=_uses,
    Scalars=Scalars,
    host_scalars=_host_scalars_for(decoupled=False),
    math=element,
    reference=reference_adam,
    flags=("amsgrad", "maximize"),
    zero_switches=("l2",),
    variants=({}, {"amsgrad": True}, {"weight_decay": 1e-2, "maximize": True},
              {"amsgrad": True, "weight_decay": 1e-2, "betas": (0.5, 0.9), "eps": 1e-6}),
)

ADAMW = Rule(
    name="AdamW",
    doc="""AdamW (Loshchilov & Hutter 2019) as torch.optim.AdamW: decoupled weight decay
        ``p *= 1 - lr * weight_decay`` before the Adam update (default 1e-2).
        """,
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                  amsgrad=False, maximize=False),
    checks=CHECKS,
    slots=SLOTS,
    nonnegative_slots=("exp_avg_sq", "max_exp_avg_sq"),
    uses_slots=_uses,
    Scalars=Scalars,
    host_scalars=_host_scalars_for(decoupled=True),
    math=element,
    reference=reference_adamw,
    flags=("amsgrad", "maximize"),
    zero_switches=("l2",),
    variants=({}, {"amsgrad": True, "weight_decay": 0.1}, {"maximize": True}),
)
