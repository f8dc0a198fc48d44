"""Rprop (Riedmiller & Braun 1993), resilient backpropagation, as torch.optim.Rprop.

Equations (state ``prev`` q, the previous step's gradient; ``step_size`` s, one
step size per element, initialized to ``lr``)::

    g = -g if maximize
    x = g * q
    f = etaplus   if x > 0       (same sign: grow)
    f = etaminus  if x < 0       (sign change: shrink, and skip this step: g = 0)
    f = 1         otherwise      (x == 0, or NaN)
    s = clamp(s * f, step_size_min, step_size_max)
    p = p - sign(g) * s
    q = g

``(etaminus, etaplus) = etas``, ``(step_size_min, step_size_max) = step_sizes``;
``clamp(x, lo, hi) = min(max(x, lo), hi)`` (NaN stays NaN, as ``torch.clamp``).

NaN and zero, as torch 2.13 (CPU) does them: ``torch.sign`` is ``(0 < x) - (x <
0)``, so ``sign(NaN) = 0`` (and ``sign(-0.0) = 0``).  A NaN product (a NaN
gradient or ``prev``, or ``0 * inf``) therefore leaves the step size as it is,
and a NaN gradient leaves the parameter as it is (``p - 0 * s``) but is kept in
``prev`` (whose NaN products then count as "no sign information" until a finite
gradient replaces it).  So, unlike the other rules, a NaN gradient does not turn
the parameter into NaN.  ``lr`` is read only when the state is created (the
initial step size), as in torch.

Formulation: torch computes ``sign(g * q)``, substitutes the factors in place and
zeroes ``g`` where the factor equals ``etaminus``; here the comparisons pick the
factor directly (the same elements, as ``etaminus < 1 < etaplus``; torch compares
in the parameter's dtype, so an ``etaminus`` within 2**-25 of 1 would differ in
float32).  No weight decay (torch's Rprop has none).
"""

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from ._reference import signed_grad
from .base import Rule, scalars_type

Scalars = scalars_type("RpropScalars", (
    "etaminus", "etaplus", "step_size_min", "step_size_max", "one", "zero", "maximize"))


def host_scalars(group, step, host, fresh):
    etaminus, etaplus = group["etas"]
    lo, hi = group["step_sizes"]
    return dict(etaminus=etaminus, etaplus=etaplus, step_size_min=lo, step_size_max=hi,
                one=1.0, zero=0.0, maximize=group["maximize"]), host


@register_jitable
def clamp(x, lo, hi):
    """min(max(x, lo), hi); NaN stays NaN (like torch.clamp)."""
    if x < lo:
        x = lo
    if x > hi:
        x = hi
    return x


@register_jitable
def sign0(x, one, zero):
    """torch.sign: (0 < x) - (x < 0) in x's dtype; NaN gives 0."""
    if x > zero:
        return one
    if x < zero:
        return -one
    return zero


@register_jitable
def element(p, g, prev, s, s2, c):
    if c.maximize:
        g = -g
    x = g * prev
    if x > c.zero:
        f = c.etaplus
    elif x < c.zero:
        f = c.etaminus
        g = c.zero
    else:
        f = c.one
    s = clamp(s * f, c.step_size_min, c.step_size_max)
    p = p - sign0(g, c.one, c.zero) * s
    return p, g, s, s2


def _torch_sign(x):
    """torch.sign on the CPU: (0 < x) - (x < 0); NaN gives 0 (np.sign gives NaN)."""
    return (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)


def reference(param, grad, state, group, step, fresh=()):
    """torch's single-tensor code, step by step."""
    etaminus, etaplus = group["etas"]
    lo, hi = group["step_sizes"]
    g = signed_grad(grad, group).copy()
    prev, step_size = state["prev"], state["step_size"]
    sgn = _torch_sign(g * prev)
    sgn[sgn > 0] = etaplus
    sgn[sgn < 0] = etaminus
    sgn[sgn == 0] = 1
    step_size[...] = np.minimum(np.maximum(step_size * sgn, lo), hi)
    g[sgn == sgn.dtype.type(etaminus)] = 0
    param -= _torch_sign(g) * step_size
    prev[...] = g


def _etas(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (expected a pair (etaminus, etaplus))")
    lo, hi = hp.non_negative(f"{name}[0]", value[0]), hp.non_negative(f"{name}[1]", value[1])
    if not 0.0 < lo < 1.0 < hi:
        raise ValueError(f"Invalid {name}: {value!r} (must be 0 < etaminus < 1 < etaplus)")
    return (lo, hi)


def _step_sizes(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Invalid {name}: {value!r} (expected a pair (min, max))")
    return (hp.non_negative(f"{name}[0]", value[0]), hp.non_negative(f"{name}[1]", value[1]))


def q8_reason(group):
    """Only the sign of ``prev`` matters, and whether it is zero: the 8-bit signed
    code rounds magnitudes below 1/63504 of the block's largest to 0, which turns a
    sign change (shrink, skip) or a kept sign (grow) into "no information" (factor
    1); and the step sizes of a block span decades (each grows and shrinks
    geometrically on its own), where the code near the bottom of a block's range
    is coarser than one ``etaplus`` growth, so small step sizes stop growing.
    Measured (200 steps of N(0.3, 1) gradients, every 7th element 1e-4 of that, a
    (1, 4096) parameter): 8-bit state drifted 1.67 from float32 state, which moved
    1.92; bfloat16 state drifted 0.007."""
    return ("prev's sign is lost where the 8-bit code rounds it to 0, and small step "
            "sizes cannot grow by etaplus within the code's resolution; use "
            "state_bits=16 or 32")


RULE = Rule(
    name="Rprop",
    doc="""Rprop (Riedmiller & Braun 1993) as torch.optim.Rprop: one step size per
        element, initialized to ``lr``, adapted by the sign of ``g * prev``.

        ``g * prev > 0``: ``s *= etaplus``; ``< 0``: ``s *= etaminus`` and ``g = 0``
        (the step is skipped); ``s = clamp(s, *step_sizes)``; ``p -= sign(g) * s``;
        ``prev = g``.  NaN as in torch, whose ``sign(NaN)`` is 0: a NaN gradient
        leaves the parameter and its step size unchanged.
        """,
    defaults=dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), maximize=False),
    checks=dict(lr=hp.non_negative, etas=_etas, step_sizes=_step_sizes,
                maximize=hp.boolean),
    slots=("prev", "step_size"),
    nonnegative_slots=("step_size",),
    uses_slots=lambda group: (True, True, False),
    slot_init=lambda group, name: group["lr"] if name == "step_size" else 0.0,
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    flags=("maximize",),
    q8_reason=q8_reason,
    variants=({}, {"lr": 0.02, "etas": (0.3, 1.5), "step_sizes": (1e-4, 0.05),
                   "maximize": True}),
)
