"""ASGD (Polyak & Juditsky 1992, as torch.optim.ASGD): SGD with a decaying step
and a running average of the parameter.

Equations (state ``ax``, the averaged parameter; the host scalars ``eta``, the
step size, ``lr`` when the state is created, and ``mu``, the averaging weight,
1.0, are kept per parameter; ``t`` the step, from 1)::

    g = -g if maximize;  g = g + weight_decay * p
    p = p * (1 - lambd * eta)
    p = p - eta * g
    ax = p                          if mu == 1
    ax = ax + (p - ax) * mu         otherwise
    eta = lr / (1 + lambd * lr * t)^alpha       (for the next step)
    mu  = 1 / max(1, t - t0)

As torch, ``eta`` and ``mu`` are updated after the step with the group's current
``lr``, so a changed ``lr`` acts from the step after next; averaging starts once
``t > t0 + 1`` (``t0=1e6`` by default: until then ``ax`` is a copy of ``p``).

Formulation: torch keeps ``eta`` and ``mu`` as 0-d tensors of its default scalar
dtype (float32 unless ``torch.set_default_dtype(torch.float64)``), so it rounds
them to float32; fastopt keeps them as float64 host scalars (the kernels read
them in the parameter's dtype), which for float64 parameters differs from
torch's float32 default by float32 rounding of the step size.  ``mu == 1`` is
decided in float64 (torch: after rounding to float32; they differ only for a
``t0`` within 2**-24 of an integer).  ``lambd`` must be >= 0 (torch does not
check it; ``1 + lambd lr t`` would go negative and ``eta`` complex).
"""

import math

from .._jit import register_jitable

from . import hyperparams as hp
from ._reference import l2, signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("ASGDScalars", (
    "eta", "decay", "mu", "copy", "weight_decay", "maximize"))


def next_host(group, step):
    """``eta`` and ``mu`` after ``step`` (torch's formulas)."""
    lr = group["lr"]
    return {"eta": lr / ((1.0 + group["lambd"] * lr * step) ** group["alpha"]),
            "mu": 1.0 / max(1.0, step - group["t0"])}


def host_scalars(group, step, host, fresh):
    eta, mu = host["eta"], host["mu"]
    return (dict(eta=eta, decay=1.0 - group["lambd"] * eta, mu=mu, copy=mu == 1.0,
                 weight_decay=group["weight_decay"], maximize=group["maximize"]),
            next_host(group, step))


@register_jitable
def element(p, g, ax, s1, s2, c):
    if c.maximize:
        g = -g
    if c.weight_decay:
        g = g + c.weight_decay * p
    p = p * c.decay
    p = p - c.eta * g
    if c.copy:
        ax = p
    else:
        ax = ax + (p - ax) * c.mu
    return p, ax, s1, s2


def reference(param, grad, state, group, step, fresh=()):
    """torch's single-tensor code, step by step (``eta``, ``mu`` in ``state``)."""
    lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
    g = l2(signed_grad(grad, group), param, group["weight_decay"])
    eta, mu = state["eta"], state["mu"]
    param *= 1 - lambd * eta
    param -= eta * g
    ax = state["ax"]
    if mu != 1:
        ax += (param - ax) * mu
    else:
        ax[...] = param
    state["eta"] = lr / ((1 + lambd * lr * step) ** alpha)
    state["mu"] = 1 / max(1, step - t0)


def host_check(name, value):
    """A saved ``eta`` is a finite number >= 0, ``mu`` one in (0, 1]."""
    v = float(value)
    if name == "eta":
        return None if math.isfinite(v) and v >= 0.0 else "a finite number >= 0"
    return None if math.isfinite(v) and 0.0 < v <= 1.0 else "a finite number in (0, 1]"


def low_state_reason(group):
    """``ax`` is a running mean: ``ax += (p - ax) mu`` with ``mu = 1 / (t - t0)``
    adds ever smaller increments, which a rounded store loses as soon as they fall
    below half a step of the stored value (bfloat16's 8-bit mantissa: once ``mu |p
    - ax|`` is below about 2**-9 ``|ax|``; 8-bit codes, far coarser), so the average
    stops moving; and before averaging ``ax`` is the parameter itself, which 8-bit
    codes round to 1/126^2 of its block's largest magnitude."""
    return ("ax is a running mean whose ever smaller increments (mu = 1/(t - t0)) "
            "are lost below the storage's rounding step; use state_bits=32")


RULE = Rule(
    name="ASGD",
    doc="""Averaged SGD (Polyak & Juditsky 1992) as torch.optim.ASGD.

        ``p *= 1 - lambd * eta``; ``p -= eta * g``; ``ax = p`` while ``mu == 1``,
        else ``ax += (p - ax) * mu``; then ``eta = lr / (1 + lambd lr t)^alpha``,
        ``mu = 1 / max(1, t - t0)``.  ``ax`` (state) is the averaged parameter;
        ``eta`` and ``mu`` are kept per parameter (state keys, host scalars).
        """,
    defaults=dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0,
                  maximize=False),
    checks=dict(lr=hp.non_negative, lambd=hp.non_negative, alpha=hp.real, t0=hp.real,
                weight_decay=hp.non_negative, maximize=hp.boolean),
    slots=("ax",),
    uses_slots=lambda group: (True, False, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    host_init=lambda group: {"eta": group["lr"], "mu": 1.0},
    host_check=host_check,
    flags=("maximize",),
    zero_switches=("weight_decay",),
    low_state_reason=low_state_reason,
    variants=({}, {"lr": 0.05, "lambd": 1e-2, "alpha": 0.5, "t0": 5.0, "weight_decay": 1e-2,
                   "maximize": True}),
)
