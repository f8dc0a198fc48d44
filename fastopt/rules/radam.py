"""RAdam (Liu et al. 2020), rectified Adam, as torch.optim.RAdam.

Equations (state ``exp_avg`` m, ``exp_avg_sq`` v; ``t`` the step, from 1)::

    g = -g if maximize;  g = g + l2 * p;  p = decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    rho_inf = 2 / (1 - beta2) - 1
    rho_t   = rho_inf - 2 t beta2^t / (1 - beta2^t)
    r_t     = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
    p = p - step_size * m / (sqrt(v) + eps)    if rho_t > 5   (step_size = lr r_t sqrt(bc2) / bc1)
    p = p - step_size * m                      otherwise      (step_size = lr / bc1)

with ``bc1 = 1 - beta1^t``, ``bc2 = 1 - beta2^t``.  ``decoupled_weight_decay``
chooses ``l2 = 0, decay = 1 - lr wd`` (RAdamW) over ``l2 = wd, decay = 1``.

Formulation: torch computes ``(m / bc1) * lr * (sqrt(bc2) / (sqrt(v) + eps)) * r_t``
element by element; here the step-dependent factors are folded into one host
scalar ``step_size`` (float64), so the element math is Adam's with ``eps`` added to
the raw square root (as torch does, not to the bias-corrected one).  The switch
``rho_t > 5`` depends only on the step and ``beta2``: the host passes it as the
per-step scalar ``adaptive`` (a uniform branch, not a compiled-in flag).  With
``beta2 <= 2/3`` (``rho_inf <= 5``) the update is never adaptive, as in torch.
"""

import math

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("RAdamScalars", (
    "step_size", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "l2",
    "decay", "adaptive", "maximize"))


def rectification(beta2, step):
    """``(rho_t > 5, r_t)`` of torch's RAdam at ``step`` (``r_t`` is 0 when not)."""
    bc2 = 1.0 - beta2 ** step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2 ** step / bc2
    if rho_t > 5.0:
        return True, math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf
                               / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t))
    return False, 0.0


def host_scalars(group, step, host, fresh):
    b1, b2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    l2_, decay = (0.0, 1.0 - lr * wd) if group["decoupled_weight_decay"] else (wd, 1.0)
    adaptive, rect = rectification(b2, step)
    bc1 = 1.0 - b1 ** step
    if adaptive:
        step_size = lr * rect * math.sqrt(1.0 - b2 ** step) / bc1
    else:
        step_size = lr / bc1
    return dict(step_size=step_size, beta1=b1, one_minus_beta1=1.0 - b1, beta2=b2,
                one_minus_beta2=1.0 - b2, eps=group["eps"], l2=l2_, decay=decay,
                adaptive=adaptive, maximize=group["maximize"]), host


@register_jitable
def element(p, g, m, v, s2, c):
    if c.maximize:
        g = -g
    if c.l2:
        g = g + c.l2 * p
    p = p * c.decay
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    if c.adaptive:
        p = p - c.step_size * (m / (np.sqrt(v) + c.eps))
    else:
        p = p - c.step_size * m
    return p, m, v, s2


def reference(param, grad, state, group, step, fresh=()):
    """torch's equations as written (bias-corrected m, then the adaptive term)."""
    b1, b2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    g = signed_grad(grad, group)
    if group["decoupled_weight_decay"]:
        param *= 1 - lr * wd
    else:
        g = l2(g, param, wd)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    bias_correction1 = 1 - b1 ** step
    bias_correction2 = 1 - b2 ** step
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * step * b2 ** step / bias_correction2
    if rho_t > 5.0:
        rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf
                         / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        adaptive_lr = math.sqrt(bias_correction2) / (np.sqrt(v) + group["eps"])
        param -= (m / bias_correction1) * lr * adaptive_lr * rect
    else:
        param -= (m / bias_correction1) * lr


RULE = Rule(
    name="RAdam",
    doc="""RAdam (Liu et al. 2020) as torch.optim.RAdam: Adam whose adaptive step is
        switched on, and rectified, once the variance estimate is tractable.

        ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
        ``rho_inf = 2 / (1 - b2) - 1``, ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``;
        if ``rho_t > 5``: ``p -= lr r_t sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``
        with ``r_t = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))``,
        else ``p -= lr / (1 - b1^t) * m``.  Weight decay is L2 (added to the
        gradient), or ``p *= 1 - lr * weight_decay`` with ``decoupled_weight_decay``.
        """,
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, maximize=False),
    checks=dict(lr=hp.non_negative, betas=hp.betas_half_open, eps=hp.non_negative,
                weight_decay=hp.non_negative, decoupled_weight_decay=hp.boolean,
                maximize=hp.boolean),
    slots=("exp_avg", "exp_avg_sq"),
    nonnegative_slots=("exp_avg_sq",),
    uses_slots=lambda group: (True, True, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    flags=("maximize",),
    zero_switches=("l2",),
    variants=({}, {"weight_decay": 1e-2, "maximize": True, "betas": (0.8, 0.99)},
              {"weight_decay": 1e-2, "decoupled_weight_decay": True, "eps": 1e-6}),
)
