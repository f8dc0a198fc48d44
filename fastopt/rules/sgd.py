"""SGD with momentum, dampening, Nesterov and L2 weight decay (torch.optim.SGD).

Equations (``g`` the gradient, ``buf`` the state ``momentum_buffer``)::

    g = -g if maximize;  g = g + weight_decay * p
    buf = g                                     (first step with momentum)
    buf = momentum * buf + (1 - dampening) * g  (later steps)
    g = g + momentum * buf if nesterov else buf
    p = p - lr * g

Defaults as torch, except ``lr=1e-3`` (torch requires it).  The EMA form of
momentum (``v = b v + (1 - b) g``) is ``SGD(momentum=b, dampening=b)``.  Nesterov
needs ``momentum > 0`` and ``dampening == 0``.

Exact sparse mode: with a zero data gradient a step is linear in ``(p, buf)``
(``g = wd * p``; maximize flips only the data gradient).  Without momentum
``p <- (1 - lr wd) p``.  With momentum ``mu`` and ``c = (1 - dampening) wd``::

    buf' = c p + mu buf
    p'   = (1 - lr c) p - lr mu buf                    (heavy ball)
    p'   = (1 - lr wd - lr mu c) p - lr mu^2 buf        (Nesterov)

and on the buffer's first step (torch sets ``buf = g``) ``buf' = wd p``,
``p' = (1 - lr wd (1 + mu [nesterov])) p``.
"""

from .._jit import register_jitable

from . import hyperparams as hp
from ._math import matpow
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("SGDScalars", (
    "lr", "weight_decay", "momentum", "one_minus_dampening", "nesterov", "maximize",
    "first", "has_momentum"))


def host_scalars(group, step, host, fresh):
    return dict(lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                one_minus_dampening=1.0 - group["dampening"], nesterov=group["nesterov"],
                maximize=group["maximize"], first="momentum_buffer" in fresh,
                has_momentum=group["momentum"] != 0.0), host


@register_jitable
def element(p, g, buf, s1, s2, c):
    if c.maximize:
        g = -g
    if c.weight_decay:
        g = g + c.weight_decay * p
    if c.has_momentum:
        if c.first:
            buf = g
        else:
            buf = c.momentum * buf + c.one_minus_dampening * g
        if c.nesterov:
            g = g + c.momentum * buf
        else:
            g = buf
    p = p - c.lr * g
    return p, buf, s1, s2


def reference(param, grad, state, group, step, fresh=()):
    g = l2(signed_grad(grad, group), param, group["weight_decay"])
    momentum = group["momentum"]
    if momentum != 0:
        buf = state["momentum_buffer"]
        if "momentum_buffer" in fresh:
            buf[...] = g
        else:
            buf[...] = momentum * buf + (1 - group["dampening"]) * g
        g = g + momentum * buf if group["nesterov"] else buf
    param -= group["lr"] * g


@register_jitable
def catch_up(k, first, h):
    lr, wd, mom = h.lr, h.weight_decay, h.momentum
    if not h.has_momentum:
        return matpow(1.0 - lr * wd, 0.0, 0.0, 1.0, k)
    c = h.one_minus_dampening * wd
    if h.nesterov:
        a, b = 1.0 - lr * wd - lr * mom * c, -lr * mom * mom
    else:
        a, b = 1.0 - lr * c, -lr * mom
    if not first:
        return matpow(a, b, c, mom, k)
    fa = 1.0 - lr * wd * (1.0 + mom) if h.nesterov else 1.0 - lr * wd
    ra, rb, rc, re = matpow(a, b, c, mom, k - 1)
    # (M^(k-1)) @ F with F = (fa 0; wd 0)
    return ra * fa + rb * wd, 0.0, rc * fa + re * wd, 0.0


def _cross_check(group):
    if group["nesterov"] and (group["momentum"] <= 0.0 or group["dampening"] != 0.0):
        raise ValueError(
            f"Invalid nesterov=True with momentum={group['momentum']!r}, "
            f"dampening={group['dampening']!r}: Nesterov momentum requires a momentum "
            "and zero dampening")


RULE = Rule(
    name="SGD",
    doc="""Stochastic gradient descent with momentum (torch.optim.SGD).

        ``g = -g`` if maximize; ``g += weight_decay * p``; with momentum ``b``:
        ``buf = g`` on its first step, then ``buf = b * buf + (1 - dampening) * g``;
        ``g = g + b * buf`` (nesterov) or ``g = buf``; ``p -= lr * g``.
        The EMA form ``v = b v + (1 - b) g`` is ``SGD(momentum=b, dampening=b)``.
        Nesterov needs ``momentum > 0`` and ``dampening == 0``.
        """,
    defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                  nesterov=False, maximize=False),
    checks=dict(lr=hp.non_negative, momentum=hp.non_negative, dampening=hp.unit_closed,
                weight_decay=hp.non_negative, nesterov=hp.boolean, maximize=hp.boolean),
    slots=("momentum_buffer",),
    uses_slots=lambda group: (group["momentum"] != 0.0, False, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    cross_check=_cross_check,
    flags=("nesterov", "maximize", "has_momentum"),
    zero_switches=("weight_decay",),
    catch_up=catch_up,
    exact_reason=lambda group: None,
    variants=({"lr": 0.01}, {"lr": 0.01, "momentum": 0.9},
              {"lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 1e-2},
              {"lr": 0.01, "momentum": 0.9, "nesterov": True, "maximize": True}),
)
