"""AdEMAMix (Pagliardini et al. 2024, arXiv 2409.03137) as bitsandbytes'
``AdEMAMix`` (32-bit state): Adam whose first moment mixes a fast and a slow
exponential moving average of the gradient.

Equations (state ``m1`` the fast EMA, ``m2`` the slow EMA, ``nu`` the second
moment; ``t`` the step, from 1)::

    alpha_t = min(t alpha / t_alpha, alpha)                    (alpha if t_alpha is None)
    s       = t / t_beta3
    beta3_t = min(exp(ln b1 ln b3 / ((1 - s) ln b3 + s ln b1)), b3)   (b3 if t_beta3 is None)
    m1 = b1 m1 + (1 - b1) g
    m2 = beta3_t m2 + (1 - beta3_t) g
    nu = b2 nu + (1 - b2) g^2
    p  = p (1 - lr wd)                                         (only when wd > 0)
    p  = p - lr (m1 / bc1 + alpha_t m2) / (sqrt(nu) / sqrt(bc2) + eps)

with ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t``.  The weight decay is decoupled
(AdamW's), as bitsandbytes' kernels apply it; the slow EMA ``m2`` has no bias
correction (the paper's choice: its warm-ups ``t_alpha``, ``t_beta3`` stand in).

Formulation: the order of operations is bitsandbytes' CPU kernel
(``bitsandbytes/backends/cpu/ops.py``, ``optimizer_name == "ademamix"``), with
the schedules, both corrections and the decay factor computed on the host in
float64 (per-step scalars ``alpha``, ``beta3``, ``one_minus_beta3``, ``bc1``,
``sqrt_bc2``, ``decay``), so the warm-ups cost the element loop nothing.
bitsandbytes applies the schedules only when ``t_alpha`` / ``t_beta3`` are
truthy (``0`` acts as ``None`` there, while its reference class divides by it);
fastopt takes ``None`` or an integer >= 1.  The beta3 warm-up takes logarithms of
``b1`` and ``b3``: with ``t_beta3`` set both must be > 0.

State names: bitsandbytes stacks ``m1`` and ``m2`` in one ``(2, *shape)`` buffer
(``state1``, its reference class ``m1_m2``) and calls ``nu`` ``state2``; fastopt
keeps three slots named ``m1``, ``m2``, ``nu``.

Low-precision state: bfloat16 state (``state_bits=16``) is sound; 8-bit state is
refused, :func:`q8_reason` (``m2``'s increments are below the code's step).
"""

import math

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp
from .base import Rule, scalars_type

Scalars = scalars_type("AdEMAMixScalars", (
    "lr", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3",
    "one_minus_beta3", "alpha", "bc1", "sqrt_bc2", "eps", "decay"))


def schedules(group, step):
    """``(alpha_t, beta3_t)`` of bitsandbytes' warm-ups at ``step`` (from 1)."""
    b1, _, b3 = group["betas"]
    alpha, t_alpha, t_beta3 = group["alpha"], group["t_alpha"], group["t_beta3"]
    if t_alpha is not None:
        alpha = min(step * alpha / t_alpha, alpha)
    if t_beta3 is not None:
        ln_b1, ln_b3 = math.log(b1), math.log(b3)
        s = step / t_beta3
        b3 = min(math.exp((ln_b1 * ln_b3) / (((1 - s) * ln_b3) + (s * ln_b1))), b3)
    return alpha, b3


def host_scalars(group, step, host, fresh):
    b1, b2, _ = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    alpha, b3 = schedules(group, step)
    return dict(lr=lr, beta1=b1, one_minus_beta1=1.0 - b1, beta2=b2, one_minus_beta2=1.0 - b2,
                beta3=b3, one_minus_beta3=1.0 - b3, alpha=alpha, bc1=1.0 - b1 ** step,
                sqrt_bc2=math.sqrt(1.0 - b2 ** step), eps=group["eps"],
                decay=1.0 - lr * wd if wd > 0.0 else 1.0), host


@register_jitable
def element(p, g, m1, m2, nu, c):
    m1 = c.beta1 * m1 + c.one_minus_beta1 * g
    m2 = c.beta3 * m2 + c.one_minus_beta3 * g
    nu = c.beta2 * nu + c.one_minus_beta2 * g * g
    p = p * c.decay
    p = p - c.lr * ((m1 / c.bc1 + c.alpha * m2) / (np.sqrt(nu) / c.sqrt_bc2 + c.eps))
    return p, m1, m2, nu


def reference(param, grad, state, group, step, fresh=()):
    """bitsandbytes' reference class (``_ReferenceAdEMAMix``) as written: the update
    with the decay term added to it, then ``p -= lr * update``."""
    b1, b2, b3 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    alpha = group["alpha"]
    if group["t_alpha"] is not None:
        alpha = min(step * alpha / group["t_alpha"], alpha)
    if group["t_beta3"] is not None:
        ln_beta1, ln_beta3 = math.log(b1), math.log(b3)
        step_scale = step / group["t_beta3"]
        b3 = min(math.exp((ln_beta1 * ln_beta3)
                          / (((1 - step_scale) * ln_beta3) + (step_scale * ln_beta1))), b3)
    m1, m2, nu = state["m1"], state["m2"], state["nu"]
    m1[...] = m1 * b1 + (1 - b1) * grad
    m2[...] = m2 * b3 + (1 - b3) * grad
    nu[...] = nu * b2 + (1 - b2) * grad * grad
    bias_correction1 = 1 - b1 ** step
    bias_correction2 = 1 - b2 ** step
    denom = np.sqrt(nu) / (bias_correction2 ** 0.5) + eps
    update = (m1 / bias_correction1 + alpha * m2) / denom
    update = update + wd * param
    param -= lr * update


def _betas3(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"Invalid {name}: {value!r} (expected a triple (beta1, beta2, beta3))")
    return tuple(hp.unit_half_open(f"{name}[{i}]", v) for i, v in enumerate(value))


def cross_check(group):
    b1, _, b3 = group["betas"]
    if group["t_beta3"] is not None and (b1 <= 0.0 or b3 <= 0.0):
        raise ValueError(f"Invalid betas: {group['betas']!r} (the beta3 warm-up t_beta3 "
                         "interpolates log(beta1) and log(beta3): both must be > 0)")


def q8_reason(group):
    """``m2`` is an EMA with ``1 - beta3 = 1e-4`` (the default): each step moves it
    by ``1e-4 (g - m2)``, far below one step of the 8-bit signed code (126
    magnitudes per sign against the block's largest, squared spacing), so the slow
    EMA, weighted by ``alpha = 5`` in the update, follows rounding instead of the
    gradient.  Measured on the reference backend, (1, 8192) float32, 300 steps of
    N(0.3, 1) gradients with every 7th element scaled by 1e-4: 8-bit state drifted
    the parameters up to 0.83 (mean 0.028) from float32 state, which moved them
    0.15; bfloat16 state drifted 0.0017 (mean 0.0003).  With the warm-ups
    (``t_alpha=20, t_beta3=30``) 1.60 against 0.45 moved (bfloat16: 0.012)."""
    return ("m2, the slow EMA (1 - beta3 = 1e-4 per step), moves by less than one "
            "8-bit code step and stops following the gradient; use state_bits=16 or 32")


RULE = Rule(
    name="AdEMAMix",
    doc="""AdEMAMix (Pagliardini et al. 2024) as bitsandbytes' AdEMAMix (32-bit):
        Adam whose first moment mixes a fast and a slow EMA of the gradient.

        ``m1 = b1 m1 + (1 - b1) g``; ``m2 = b3_t m2 + (1 - b3_t) g``;
        ``nu = b2 nu + (1 - b2) g^2``; ``p *= 1 - lr wd`` (when ``wd > 0``);
        ``p -= lr (m1 / (1 - b1^t) + alpha_t m2) / (sqrt(nu) / sqrt(1 - b2^t) + eps)``.
        Warm-ups: ``alpha_t = min(t alpha / t_alpha, alpha)``;
        ``b3_t = min(exp(ln b1 ln b3 / ((1 - s) ln b3 + s ln b1)), b3)`` with
        ``s = t / t_beta3`` (each off when ``None``).  State ``m1``, ``m2``, ``nu``
        (bitsandbytes stacks ``m1``, ``m2`` as ``state1``).
        """,
    defaults=dict(lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                  t_beta3=None, eps=1e-8, weight_decay=1e-2),
    checks=dict(lr=hp.non_negative, betas=_betas3, alpha=hp.real,
                t_alpha=hp.positive_int_or_none, t_beta3=hp.positive_int_or_none,
                eps=hp.non_negative, weight_decay=hp.non_negative),
    slots=("m1", "m2", "nu"),
    nonnegative_slots=("nu",),
    uses_slots=lambda group: (True, True, True),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    cross_check=cross_check,
    q8_reason=q8_reason,
    variants=({}, {"t_alpha": 20, "t_beta3": 30, "alpha": 8.0, "betas": (0.8, 0.99, 0.999),
                   "weight_decay": 0.0, "eps": 1e-6}),
)
