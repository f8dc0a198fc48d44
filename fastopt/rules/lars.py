"""LARS (You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
Networks"): SGD with momentum whose step is scaled per tensor by a local learning
rate made of the norms of the weights and the gradient.

Equations (state ``momentum_buffer`` buf, zero before the first step), per tensor::

    local = trust_coefficient * ||p|| / (||g|| + weight_decay * ||p|| + eps)
            when ||p|| > 0 and ||g|| > 0, else 1
    d = local * (g + weight_decay * p)
    buf = momentum * buf + d
    p = p - lr * buf                       (nesterov: p = p - lr * (d + momentum * buf))

Defaults ``lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3,
eps=1e-8, nesterov=False``.  The paper gives no default learning rate; with
``lr=1.0`` the step is ``trust_coefficient * ||p|| / ||g||`` times the gradient
(the trust coefficient sets the scale).  Norms are L2 norms over the whole tensor,
accumulated in float64; a NaN norm makes ``local`` 1 (the comparison fails).
Layers usually excluded from adaptation (biases, normalization) go in a param group
of their own with another rule, or with ``trust_coefficient`` chosen for them.

Formulation: a per-tensor rule (``layout="tensor"``): a norm pass over p and g
(8 bytes per float32 element), then the update pass with the tensor's ``local``.
"""

import numpy as np

from .._jit import register_jitable
from . import hyperparams as hp
from .base import Rule, per_tensor_checks, scalars_type
from .lamb import l2_norm

Scalars = scalars_type("LARSScalars", (
    "lr", "momentum", "weight_decay", "local", "nesterov"))


def host_scalars(group, step, host, fresh):
    return dict(lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                local=1.0, nesterov=group["nesterov"]), host


def local_lr(group, p_norm, g_norm):
    """``trust_coefficient * ||p|| / (||g|| + weight_decay ||p|| + eps)`` when both
    norms are > 0, else 1."""
    if p_norm > 0.0 and g_norm > 0.0:
        return group["trust_coefficient"] * p_norm / (
            g_norm + group["weight_decay"] * p_norm + group["eps"])
    return 1.0


def tensor_scalars(group, p_norm, g_norm):
    return {"local": local_lr(group, p_norm, g_norm)}


@register_jitable
def norms(p, g, buf, unused1, unused2, c):
    return p, g


@register_jitable
def element(p, g, buf, unused1, unused2, c):
    if c.weight_decay:
        g = g + c.weight_decay * p
    d = c.local * g
    buf = c.momentum * buf + d
    if c.nesterov:
        p = p - c.lr * (d + c.momentum * buf)
    else:
        p = p - c.lr * buf
    return p, buf, unused1, unused2


def reference(param, grad, state, group, step, fresh=()):
    local = local_lr(group, l2_norm(param), l2_norm(grad))
    g = grad + group["weight_decay"] * param if group["weight_decay"] else grad
    d = local * g
    buf = state["momentum_buffer"]
    buf[...] = group["momentum"] * buf + d
    if group["nesterov"]:
        param -= group["lr"] * (d + group["momentum"] * buf)
    else:
        param -= group["lr"] * buf


_CHECKS = per_tensor_checks("LARS")

RULE = Rule(
    name="LARS",
    doc="""LARS (You et al. 2017): momentum SGD with a per-tensor local learning rate
        ``local = trust_coefficient ||p|| / (||g|| + weight_decay ||p|| + eps)`` (1 when
        a norm is 0).

        ``d = local (g + weight_decay p)``; ``buf = momentum buf + d``;
        ``p -= lr buf`` (nesterov: ``p -= lr (d + momentum buf)``).  ``lr`` defaults to
        1.0 (the paper gives none; the trust coefficient sets the scale).  Norms over
        the whole tensor, in float64, of the values the update pass computes with (a
        norm pass, then the update pass).  Dense gradients; float32/float64/bfloat16
        parameters, 32/16/8-bit state.
        """,
    defaults=dict(lr=1.0, momentum=0.9, weight_decay=0.0, trust_coefficient=1e-3, eps=1e-8,
                  nesterov=False),
    checks=dict(lr=hp.non_negative, momentum=hp.non_negative, weight_decay=hp.non_negative,
                trust_coefficient=hp.non_negative, eps=hp.non_negative, nesterov=hp.boolean),
    slots=("momentum_buffer",),
    uses_slots=lambda group: (True, False, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    layout="tensor",
    cross_check=_CHECKS[0],
    low_state_reason=_CHECKS[1],
    bf16_reason=_CHECKS[2],
    norms=norms,
    tensor_scalars=tensor_scalars,
    flags=("nesterov",),
    zero_switches=("weight_decay",),
    variants=({}, {"weight_decay": 1e-4, "nesterov": True},
              {"momentum": 0.0, "trust_coefficient": 0.02, "lr": 0.5}),
)
