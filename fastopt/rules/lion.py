"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Equations (state ``exp_avg`` m)::

    g = -g if maximize
    u = beta1 * m + (1 - beta1) * g
    p = (1 - lr * weight_decay) * p - lr * sign(u)
    m = beta2 * m + (1 - beta2) * g

Decoupled weight decay; ``sign`` keeps NaN (like ``torch.sign``).  Defaults
``lr=1e-4, betas=(0.9, 0.99)`` (the paper's).  ``one`` and ``zero`` are scalars so
that ``sign`` stays in the parameter's dtype.
"""

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._math import sign
from ._reference import signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("LionScalars", (
    "lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "decay", "maximize", "one",
    "zero"))


def host_scalars(group, step, host, fresh):
    b1, b2 = group["betas"]
    return dict(lr=group["lr"], beta1=b1, one_minus_beta1=1.0 - b1, beta2=b2,
                one_minus_beta2=1.0 - b2, decay=1.0 - group["lr"] * group["weight_decay"],
                maximize=group["maximize"], one=1.0, zero=0.0), host


@register_jitable
def element(p, g, m, s1, s2, c):
    if c.maximize:
        g = -g
    u = c.beta1 * m + c.one_minus_beta1 * g
    p = p * c.decay - c.lr * sign(u, c.one, c.zero)
    m = c.beta2 * m + c.one_minus_beta2 * g
    return p, m, s1, s2


def reference(param, grad, state, group, step, fresh=()):
    b1, b2 = group["betas"]
    lr = group["lr"]
    g = signed_grad(grad, group)
    m = state["exp_avg"]
    update = b1 * m + (1 - b1) * g
    param *= 1 - lr * group["weight_decay"]
    param -= lr * np.sign(update)
    m[...] = b2 * m + (1 - b2) * g


RULE = Rule(
    name="Lion",
    doc="""Lion (Chen et al. 2023): ``u = b1 m + (1 - b1) g``;
        ``p = p (1 - lr wd) - lr sign(u)``; ``m = b2 m + (1 - b2) g``.
        Use a learning rate 3-10x smaller than Adam's (default 1e-4).
        """,
    defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    checks=dict(lr=hp.non_negative, betas=hp.betas_closed, weight_decay=hp.non_negative,
                maximize=hp.boolean),
    slots=("exp_avg",),
    uses_slots=lambda group: (True, False, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    flags=("maximize", "one", "zero"),
    variants=({}, {"weight_decay": 0.1, "maximize": True, "betas": (0.95, 0.98)}),
)
