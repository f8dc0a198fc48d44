"""RMSprop (torch.optim.RMSprop).

Equations (state ``square_avg``, ``grad_avg`` when centered, ``momentum_buffer``
when momentum > 0)::

    g = -g if maximize;  g = g + weight_decay * p
    square_avg = alpha * square_avg + (1 - alpha) * g * g
    centered:  grad_avg = alpha * grad_avg + (1 - alpha) * g
               avg = sqrt(square_avg - grad_avg^2) + eps
    else:      avg = sqrt(square_avg) + eps
    momentum > 0:  buf = momentum * buf + g / avg;  p = p - lr * buf
    else:          p = p - lr * g / avg

``eps`` is added outside the square root, as torch does.  Exact sparse mode (plain
RMSprop: not centered, no momentum, no weight decay): a zero-gradient step is
``square_avg <- alpha square_avg`` and the parameter does not move.
"""

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._math import matpow
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("RMSpropScalars", (
    "lr", "weight_decay", "alpha", "one_minus_alpha", "eps", "momentum", "centered",
    "has_momentum", "maximize"))


def host_scalars(group, step, host, fresh):
    a = group["alpha"]
    return dict(lr=group["lr"], weight_decay=group["weight_decay"], alpha=a, one_minus_alpha=1.0 - a,
                eps=group["eps"], momentum=group["momentum"], centered=group["centered"],
                has_momentum=group["momentum"] > 0.0, maximize=group["maximize"]), host


@register_jitable
def element(p, g, sq, gavg, buf, c):
    if c.maximize:
        g = -g
    if c.weight_decay:
        g = g + c.weight_decay * p
    sq = c.alpha * sq + c.one_minus_alpha * g * g
    if c.centered:
        gavg = c.alpha * gavg + c.one_minus_alpha * g
        avg = np.sqrt(sq - gavg * gavg) + c.eps
    else:
        avg = np.sqrt(sq) + c.eps
    if c.has_momentum:
        buf = c.momentum * buf + g / avg
        p = p - c.lr * buf
    else:
        p = p - c.lr * (g / avg)
    return p, sq, gavg, buf


def reference(param, grad, state, group, step, fresh=()):
    g = l2(signed_grad(grad, group), param, group["weight_decay"])
    alpha, eps = group["alpha"], group["eps"]
    sq = state["square_avg"]
    sq[...] = alpha * sq + (1 - alpha) * g * g
    if group["centered"]:
        ga = state["grad_avg"]
        ga[...] = alpha * ga + (1 - alpha) * g
        avg = np.sqrt(sq - ga * ga) + eps
    else:
        avg = np.sqrt(sq) + eps
    if group["momentum"] > 0:
        buf = state["momentum_buffer"]
        buf[...] = group["momentum"] * buf + g / avg
        param -= group["lr"] * buf
    else:
        param -= group["lr"] * (g / avg)


@register_jitable
def catch_up(k, first, h):
    return matpow(1.0, 0.0, 0.0, h.alpha, k)


def exact_reason(group):
    if group["centered"] or group["momentum"] != 0.0 or group["weight_decay"] != 0.0:
        return "centered=False, momentum=0 and weight_decay=0 are required"
    if group["eps"] == 0.0:
        return "eps must be > 0 (0/0 on a zero row)"
    return None


def low_state_reason(group):
    """Centered RMSprop divides by ``sqrt(square_avg - grad_avg^2)``: two moments
    rounded separately (8-bit codes relative to a block scale, or bfloat16's 8-bit
    mantissa) leave their difference as rounding noise wherever the gradient's
    variance is small against its mean, and it goes negative (NaN parameters)."""
    if group["centered"]:
        return ("centered=True subtracts two separately rounded moments "
                "(square_avg - grad_avg^2), which 8- and 16-bit state turn negative "
                "(NaN); use state_bits=32 or centered=False")
    return None


RULE = Rule(
    name="RMSprop",
    doc="""RMSprop (torch.optim.RMSprop), eps added outside the square root.

        ``v = alpha v + (1 - alpha) g^2``; centered: ``a = alpha a + (1 - alpha) g``,
        ``d = sqrt(v - a^2) + eps``, else ``d = sqrt(v) + eps``; with momentum ``b``:
        ``buf = b buf + g / d``, ``p -= lr buf``; else ``p -= lr g / d``.
        """,
    defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                  centered=False, maximize=False),
    checks=dict(lr=hp.non_negative, alpha=hp.unit_closed, eps=hp.non_negative,
                weight_decay=hp.non_negative, momentum=hp.non_negative,
                centered=hp.boolean, maximize=hp.boolean),
    slots=("square_avg", "grad_avg", "momentum_buffer"),
    nonnegative_slots=("square_avg",),
    uses_slots=lambda group: (True, group["centered"], group["momentum"] > 0.0),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    flags=("centered", "has_momentum", "maximize"),
    zero_switches=("weight_decay",),
    catch_up=catch_up,
    exact_reason=exact_reason,
    low_state_reason=low_state_reason,
    variants=({}, {"centered": True}, {"momentum": 0.9, "weight_decay": 1e-2},
              {"centered": True, "momentum": 0.5, "maximize": True, "alpha": 0.9}),
)
