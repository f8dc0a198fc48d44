"""NAdam (Dozat 2016) with torch's momentum-decay schedule (torch.optim.NAdam).

Equations (state ``exp_avg`` m, ``exp_avg_sq`` v; the host scalar ``mu_product``,
1.0 before the first step, is kept per parameter)::

    mu_t = beta1 (1 - 0.5 * 0.96^(t psi))          psi = momentum_decay
    mu_product = mu_product * mu_t
    g = -g if maximize;  g = g + l2 * p;  p = decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    d = sqrt(v) / sqrt(1 - beta2^t) + eps
    p = p - cg * g / d - cm * m / d

with ``cg = lr (1 - mu_t) / (1 - mu_product)``, ``cm = lr mu_{t+1} / (1 -
mu_product mu_{t+1})``; ``decoupled_weight_decay`` chooses ``l2 = 0, decay = 1 - lr
wd`` over ``l2 = wd, decay = 1``.  Default ``lr=2e-3`` (torch's).
"""

import math

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("NAdamScalars", (
    "cg", "cm", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "rsqrt_bc2",
    "l2", "decay", "maximize"))


def mu(beta1, momentum_decay, step):
    """torch's NAdam momentum schedule mu_t = beta1 (1 - 0.5 * 0.96^(t psi))."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def host_scalars(group, step, host, fresh):
    b1, b2 = group["betas"]
    lr, wd, psi = group["lr"], group["weight_decay"], group["momentum_decay"]
    mu_t = mu(b1, psi, step)
    mu_next = mu(b1, psi, step + 1)
    mu_product = host["mu_product"] * mu_t
    mu_product_next = mu_product * mu_next
    l2_, decay = (0.0, 1.0 - lr * wd) if group["decoupled_weight_decay"] else (wd, 1.0)
    return (dict(cg=lr * (1.0 - mu_t) / (1.0 - mu_product),
                 cm=lr * mu_next / (1.0 - mu_product_next), beta1=b1,
                 one_minus_beta1=1.0 - b1, beta2=b2, one_minus_beta2=1.0 - b2, eps=group["eps"],
                 rsqrt_bc2=1.0 / math.sqrt(1.0 - b2 ** step), l2=l2_, decay=decay,
                 maximize=group["maximize"]),
            {"mu_product": mu_product})


@register_jitable
def element(p, g, m, v, s2, c):
    if c.maximize:
        g = -g
    if c.l2:
        g = g + c.l2 * p
    p = p * c.decay
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    d = np.sqrt(v) * c.rsqrt_bc2 + c.eps
    p = p - c.cg * (g / d) - c.cm * (m / d)
    return p, m, v, s2


def reference(param, grad, state, group, step, fresh=()):
    b1, b2 = group["betas"]
    lr, wd, psi = group["lr"], group["weight_decay"], group["momentum_decay"]
    g = signed_grad(grad, group)
    if group["decoupled_weight_decay"]:
        param *= 1 - lr * wd
    else:
        g = l2(g, param, wd)
    mu_t = b1 * (1 - 0.5 * 0.96 ** (step * psi))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((step + 1) * psi))
    mu_product = state["mu_product"] * mu_t
    state["mu_product"] = mu_product
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** step) + group["eps"]
    param -= (lr * (1 - mu_t) / (1 - mu_product)) * (g / denom)
    param -= (lr * mu_next / (1 - mu_product * mu_next)) * (m / denom)


RULE = Rule(
    name="NAdam",
    doc="""NAdam (Dozat 2016) as torch.optim.NAdam, with torch's momentum-decay schedule
        ``mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay))`` and optional decoupled
        weight decay.  The running product of ``mu`` is kept per parameter
        (state key ``mu_product``).
        """,
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False),
    checks=dict(lr=hp.non_negative, betas=hp.betas_half_open, eps=hp.non_negative,
                weight_decay=hp.non_negative, momentum_decay=hp.non_negative,
                decoupled_weight_decay=hp.boolean, maximize=hp.boolean),
    slots=("exp_avg", "exp_avg_sq"),
    nonnegative_slots=("exp_avg_sq",),
    uses_slots=lambda group: (True, True, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    host_init=lambda group: {"mu_product": 1.0},
    flags=("maximize",),
    zero_switches=("l2",),
    variants=({}, {"weight_decay": 1e-2}, {"weight_decay": 1e-2, "decoupled_weight_decay": True,
                                           "maximize": True, "momentum_decay": 1e-2}),
)
