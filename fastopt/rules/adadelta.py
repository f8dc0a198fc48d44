"""Adadelta (Zeiler 2012) as torch.optim.Adadelta.

Equations (state ``square_avg`` v, ``acc_delta`` u)::

    g = -g if maximize;  g = g + weight_decay * p
    v = rho * v + (1 - rho) * g * g
    d = sqrt(u + eps) / sqrt(v + eps) * g
    u = rho * u + (1 - rho) * d * d
    p = p - lr * d

``eps`` inside both square roots, as torch.  Default ``lr=1.0`` (torch's: the
step is already in the parameter's units).  Nothing depends on the step count,
so there is no host computation beyond the hyperparameters.

8-bit state is refused (:func:`q8_reason`); bfloat16 state is sound (the same
outlier run drifts 0.0017 from float32 state where float32 state moved 0.21).
"""

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("AdadeltaScalars", (
    "lr", "rho", "one_minus_rho", "eps", "weight_decay", "maximize"))


def host_scalars(group, step, host, fresh):
    return dict(lr=group["lr"], rho=group["rho"], one_minus_rho=1.0 - group["rho"], eps=group["eps"],
                weight_decay=group["weight_decay"], maximize=group["maximize"]), host


@register_jitable
def element(p, g, v, u, s2, c):
    if c.maximize:
        g = -g
    if c.weight_decay:
        g = g + c.weight_decay * p
    v = c.rho * v + c.one_minus_rho * g * g
    d = np.sqrt(u + c.eps) / np.sqrt(v + c.eps) * g
    u = c.rho * u + c.one_minus_rho * d * d
    p = p - c.lr * d
    return p, v, u, s2


def reference(param, grad, state, group, step, fresh=()):
    rho, eps = group["rho"], group["eps"]
    g = l2(signed_grad(grad, group), param, group["weight_decay"])
    v, u = state["square_avg"], state["acc_delta"]
    v[...] = rho * v + (1 - rho) * g * g
    std = np.sqrt(v + eps)
    delta = np.sqrt(u + eps) / std * g
    u[...] = rho * u + (1 - rho) * delta * delta
    param -= group["lr"] * delta


def q8_reason(group):
    """``u`` feeds itself: ``u' = rho u + (1 - rho) (u + eps) / (v + eps) g^2``
    grows by ``rho + (1 - rho) g^2 / v`` per step wherever ``v`` underestimates
    ``g^2``.  In a block whose scale an outlier set, the 8-bit code of ``v`` has a
    relative resolution near 100% at its neighbours (codes 1-5 of 253), so some
    are underestimated for many steps and their ``acc_delta`` grows geometrically:
    one 1e6 gradient made the neighbours drift 4.0 from float32 state, which moved
    0.12 (tests/test_q8_outliers.py's run)."""
    return ("acc_delta grows geometrically wherever the 8-bit code of square_avg "
            "underestimates it (the neighbours of an outlier gradient); use "
            "state_bits=16 or 32")


RULE = Rule(
    name="Adadelta",
    doc="""Adadelta (Zeiler 2012) as torch.optim.Adadelta.

        ``v = rho v + (1 - rho) g^2``; ``d = sqrt(u + eps) / sqrt(v + eps) * g``;
        ``u = rho u + (1 - rho) d^2``; ``p -= lr * d`` (state ``square_avg`` v,
        ``acc_delta`` u; L2 weight decay added to the gradient).
        """,
    defaults=dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    checks=dict(lr=hp.non_negative, rho=hp.unit_closed, eps=hp.non_negative,
                weight_decay=hp.non_negative, maximize=hp.boolean),
    slots=("square_avg", "acc_delta"),
    nonnegative_slots=("square_avg", "acc_delta"),
    uses_slots=lambda group: (True, True, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    flags=("maximize",),
    zero_switches=("weight_decay",),
    q8_reason=q8_reason,
    variants=({}, {"weight_decay": 1e-2, "maximize": True, "rho": 0.5, "lr": 0.5,
                   "eps": 1e-4}),
)
