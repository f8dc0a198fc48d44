"""LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning"): Adam's
direction scaled per tensor by a trust ratio of norms.

Equations (state ``exp_avg`` m, ``exp_avg_sq`` v; step ``t``), per tensor::

    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * p
    r = ||p|| / ||u||   when both norms are > 0, else 1;   r = min(r, trust_clip)
    p = p - lr * r * u

Defaults ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0,
trust_clip=None`` (no clamp).  The norms are L2 norms over the whole tensor (not
per row), accumulated in float64.  A NaN or Inf in ``u`` makes ``||u||`` NaN or
Inf: with NaN, ``r`` is 1 (the comparison fails) and the NaN elements stay NaN;
with Inf, ``r`` is 0 and the finite elements do not move.

Formulation: a *per-tensor* rule (``layout="tensor"``).  The drivers run two
passes over each tensor: a norm pass (:func:`norms`: the moments and ``u`` from the
same inputs as the update, nothing stored; sums of squares per chunk in float64,
added in chunk order, so the result does not depend on the thread count) and the
update pass (:func:`element`), whose ``lr_trust`` scalar (``lr * r``, formed in
float64) is the tensor's own.  The norm pass reads p, g, m, v (16 bytes per float32
element); the update pass reads them and writes p, m, v (28 bytes).  Storing ``u``
in the first pass would save its recomputation but not bytes.  The bias
corrections are per-step scalars formed on the host in float64, ``1 / (1 - beta1^t)``
and ``1 / sqrt(1 - beta2^t)``, and multiplied in (as Adam's), so an element costs one
division and one square root: the norm pass is bound by them, not by memory.
"""

import math

import numpy as np

from .._jit import register_jitable
from . import hyperparams as hp
from .base import Rule, per_tensor_checks, scalars_type

Scalars = scalars_type("LAMBScalars", (
    "lr_trust", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "rbc1",
    "rsqrt_bc2", "eps", "weight_decay"))


def host_scalars(group, step, host, fresh):
    b1, b2 = group["betas"]
    return dict(lr_trust=group["lr"], beta1=b1, one_minus_beta1=1.0 - b1, beta2=b2,
                one_minus_beta2=1.0 - b2, rbc1=1.0 / (1.0 - b1 ** step),
                rsqrt_bc2=1.0 / math.sqrt(1.0 - b2 ** step),
                eps=group["eps"], weight_decay=group["weight_decay"]), host


def trust_ratio(p_norm, u_norm, trust_clip):
    """``||p|| / ||u||`` when both are > 0, else 1; at most ``trust_clip``."""
    r = p_norm / u_norm if p_norm > 0.0 and u_norm > 0.0 else 1.0
    if trust_clip is not None:
        r = min(r, trust_clip)
    return r


def tensor_scalars(group, p_norm, u_norm):
    return {"lr_trust": group["lr"] * trust_ratio(p_norm, u_norm, group["trust_clip"])}


@register_jitable
def direction(p, g, m, v, c):
    """The new moments and the update direction ``u`` of one element."""
    m = c.beta1 * m + c.one_minus_beta1 * g
    v = c.beta2 * v + c.one_minus_beta2 * g * g
    u = (m * c.rbc1) / (np.sqrt(v) * c.rsqrt_bc2 + c.eps)
    if c.weight_decay:
        u = u + c.weight_decay * p
    return m, v, u


@register_jitable
def norms(p, g, m, v, unused, c):
    m, v, u = direction(p, g, m, v, c)
    return p, u


@register_jitable
def element(p, g, m, v, unused, c):
    m, v, u = direction(p, g, m, v, c)
    p = p - c.lr_trust * u
    return p, m, v, unused


def l2_norm(a):
    """The L2 norm of an array, accumulated in float64."""
    x = np.asarray(a, dtype=np.float64).ravel()
    return math.sqrt(float(np.dot(x, x)))


def reference(param, grad, state, group, step, fresh=()):
    b1, b2 = group["betas"]
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = b1 * m + (1 - b1) * grad
    v[...] = b2 * v + (1 - b2) * grad * grad
    u = (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + group["eps"])
    if group["weight_decay"]:
        u = u + group["weight_decay"] * param
    r = trust_ratio(l2_norm(param), l2_norm(u), group["trust_clip"])
    param -= group["lr"] * r * u


def _trust_clip(name, value):
    return None if value is None else hp.positive(name, value)


_CHECKS = per_tensor_checks("LAMB")

RULE = Rule(
    name="LAMB",
    doc="""LAMB (You et al. 2020): Adam's bias-corrected direction plus decoupled weight
        decay, scaled per tensor by the trust ratio ``||p|| / ||u||``.

        ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
        ``u = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) + weight_decay p``;
        ``r = ||p|| / ||u||`` when both are > 0, else 1, at most ``trust_clip``;
        ``p -= lr r u``.  Norms over the whole tensor, in float64, of the values the
        update pass computes with (a norm pass, then the update pass).  Dense
        gradients; float32/float64/bfloat16 parameters, 32/16/8-bit state.
        """,
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, trust_clip=None),
    checks=dict(lr=hp.non_negative, betas=hp.betas_half_open, eps=hp.non_negative,
                weight_decay=hp.non_negative, trust_clip=_trust_clip),
    slots=("exp_avg", "exp_avg_sq"),
    nonnegative_slots=("exp_avg_sq",),
    uses_slots=lambda group: (True, True, False),
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
    norm_reads=2,
    zero_switches=("weight_decay",),
    variants=({}, {"weight_decay": 1e-2, "trust_clip": 10.0},
              {"betas": (0.5, 0.9), "eps": 1e-4, "lr": 1e-2}),
)
