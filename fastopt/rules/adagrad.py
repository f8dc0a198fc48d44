"""Adagrad (torch.optim.Adagrad).

Equations (state ``sum``, starting at ``initial_accumulator_value``)::

    clr = lr / (1 + (step - 1) * lr_decay)
    g = -g if maximize;  g = g + weight_decay * p
    sum = sum + g * g
    p = p - clr * g / (sqrt(sum) + eps)

Exact sparse mode (no weight decay): a zero-gradient step changes nothing, so
skipped steps need no catch-up beyond the step count (``clr`` uses the global step).
"""

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._math import identity_catch_up
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("AdagradScalars", ("clr", "weight_decay", "eps", "maximize"))

DEFAULTS = dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                eps=1e-10, maximize=False)
CHECKS = dict(lr=hp.non_negative, lr_decay=hp.non_negative, weight_decay=hp.non_negative,
              initial_accumulator_value=hp.non_negative, eps=hp.non_negative,
              maximize=hp.boolean)


def host_scalars(group, step, host, fresh):
    clr = group["lr"] / (1.0 + (step - 1) * group["lr_decay"])
    return dict(clr=clr, weight_decay=group["weight_decay"], eps=group["eps"],
                maximize=group["maximize"]), host


@register_jitable
def element(p, g, acc, s1, s2, c):
    if c.maximize:
        g = -g
    if c.weight_decay:
        g = g + c.weight_decay * p
    acc = acc + g * g
    p = p - c.clr * g / (np.sqrt(acc) + c.eps)
    return p, acc, s1, s2


def reference(param, grad, state, group, step, fresh=()):
    g = l2(signed_grad(grad, group), param, group["weight_decay"])
    clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
    s = state["sum"]
    s += g * g
    param -= clr * g / (np.sqrt(s) + group["eps"])


def exact_reason(group):
    if group["weight_decay"] != 0.0:
        return "weight_decay must be 0 (a decayed row's accumulator has no closed form)"
    if group["eps"] == 0.0 and group["initial_accumulator_value"] == 0.0:
        return "eps or initial_accumulator_value must be > 0 (0/0 on a zero row)"
    return None


RULE = Rule(
    name="Adagrad",
    doc="""Adagrad (torch.optim.Adagrad).

        ``clr = lr / (1 + (t - 1) * lr_decay)``; ``g += weight_decay * p``;
        ``sum += g^2`` (starting at ``initial_accumulator_value``);
        ``p -= clr * g / (sqrt(sum) + eps)``.
        """,
    defaults=DEFAULTS,
    checks=CHECKS,
    slots=("sum",),
    nonnegative_slots=("sum",),
    uses_slots=lambda group: (True, False, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    slot_init=lambda group, name: group["initial_accumulator_value"],
    flags=("maximize",),
    zero_switches=("weight_decay",),
    catch_up=identity_catch_up,
    exact_reason=exact_reason,
    variants=({}, {"lr_decay": 0.01, "weight_decay": 1e-2, "initial_accumulator_value": 0.1},
              {"maximize": True, "eps": 1e-6}),
)
