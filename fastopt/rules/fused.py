"""Options fused into the update pass, for every rule: loss scaling, gradient value
clipping, L1 / elastic net, weight clipping and row max-norm.

They are per-group hyperparameters (defaults: off) that every optimizer class takes
beside its own, plus the per-step ``grad_scale`` argument of ``step()``::

    g = g / grad_scale                        step(grads, grad_scale=s)
    g = clip(g, -clip_value, clip_value)      clip_value=None      (NaN stays NaN)
    p, state = rule(p, g, state)              the rule's own update
    p = sign(p) * max(|p| - lr * l1, 0)       l1=0.0  (proximal soft-threshold:
                                              weights reach exact zeros; with
                                              weight_decay > 0 this is elastic net)
    p = min(max(p, param_min), param_max)     param_min=None, param_max=None
    row = row * max_norm / (|row| + 1e-7)     max_norm=None: rows (first axis) whose
          if |row| > max_norm                 L2 norm exceeds max_norm, as torch's
                                              embedding max_norm renormalizes them

The threshold of the L1 step is the group's ``lr`` times ``l1`` (for Adagrad, the
undecayed ``lr``).  A NaN parameter stays NaN through the L1 step and the clamps.
For a 1-D parameter a "row" is one element (as for sparse gradients).

Kernels: the element operations are the jitable functions :func:`pre` and
:func:`post`, wrapped around the rule's math inside the Numba drivers, whose
on/off switches (:func:`flags`) are compile-time constants, so an option that is
off costs nothing.  Their scalars are the first fields of every rule's named
scalars (:data:`FIELDS`; :func:`scalars` computes them).  ``max_norm`` needs whole rows: a
parameter with it goes through the row driver (every row once for a dense
gradient), which renormalizes each row right after updating it, while it is in
cache: one pass over memory.  Sparse steps apply the options to the touched rows
only (lazy); ``sparse_mode="exact"`` refuses ``l1``, the clamps and ``max_norm``
(no closed form for the skipped steps) and accepts scaling and clipping (a zero
gradient stays zero).

Backends: ``numba`` and ``cuda`` wrap the same jitable :func:`pre` and
:func:`post` around the rule math (one element step, ``fastopt.backends.element``);
``cython`` has its second copy in ``kernels/``; ``numpy`` (the reference) applies
the same equations with whole-array NumPy (:func:`np_pre`, :func:`np_post`).
"""

import math

import numpy as np
from .._jit import register_jitable

from . import hyperparams as hp

#: the fused options' per-step scalars, the first fields of every rule's Scalars
#: (``l1_threshold`` is ``lr * l1``)
FIELDS = ("grad_scale", "clip_value", "l1_threshold", "param_min", "param_max", "max_norm")
COUNT = len(FIELDS)
#: names of the on/off switches, in the order of :func:`flags`
SWITCHES = ("grad_scale", "clip_value", "l1", "param_min", "param_max", "max_norm")
#: the flag tuple meaning "no fused option"
OFF = (False,) * COUNT
#: torch's embedding renorm adds this to the norm
RENORM_EPS = 1e-7


def _optional(check):
    def opt(name, value):
        return None if value is None else check(name, value)
    return opt


def _positive(name, value):
    value = hp.non_negative(name, value)
    if value == 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be > 0, or None for off)")
    return value


DEFAULTS = dict(clip_value=None, l1=0.0, param_min=None, param_max=None, max_norm=None)
CHECKS = dict(clip_value=_optional(_positive), l1=hp.non_negative,
              param_min=_optional(hp._number), param_max=_optional(hp._number),
              max_norm=_optional(_positive))


def cross_check(group):
    lo, hi = group.get("param_min"), group.get("param_max")
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"Invalid param_min={lo!r} > param_max={hi!r}")


def check_grad_scale(grad_scale):
    if grad_scale is None:
        return None
    value = hp._number("grad_scale", grad_scale)
    if value <= 0.0:
        raise ValueError(f"Invalid grad_scale: {grad_scale!r} (must be > 0)")
    return value


def check_grad_scale_dtypes(grad_scale, dtypes):
    """The update pass divides in the parameter's dtype: refuse a ``grad_scale`` that
    is zero or infinite there (``1e-50`` in float32), naming both."""
    for dt in dtypes:
        v = np.dtype(dt).type(grad_scale)
        if not np.isfinite(v) or v == 0:
            raise ValueError(f"Invalid grad_scale: {grad_scale!r} is {v} in {np.dtype(dt)}, "
                             f"the dtype the gradients are divided in")


def flags(group, grad_scale=None):
    """Which fused operations are on: (scale, clip, l1, min, max, max_norm)."""
    return (grad_scale is not None, group.get("clip_value") is not None,
            group.get("l1", 0.0) > 0.0, group.get("param_min") is not None,
            group.get("param_max") is not None, group.get("max_norm") is not None)


def scalars(group, grad_scale=None):
    """The six fused scalars (unused ones are placeholders), in :data:`FIELDS` order."""
    def v(x, default):
        return float(default if x is None else x)
    return (v(grad_scale, 1.0), v(group.get("clip_value"), math.inf),
            float(group["lr"]) * float(group.get("l1", 0.0)),
            v(group.get("param_min"), -math.inf), v(group.get("param_max"), math.inf),
            v(group.get("max_norm"), math.inf))


def exact_reason(group):
    """None when exact sparse mode is compatible with the group's fused options."""
    on = [k for k in ("l1", "param_min", "param_max", "max_norm")
          if group.get(k) not in (None, 0.0)]
    if on:
        return f"the fused option(s) {on} have no closed form over skipped steps"
    return None


# ------------------------------------------------------------------ jitable

@register_jitable
def pre(g, c, SCALE, CLIP):
    """Gradient side: ``g / grad_scale``, then clip to ``[-clip, clip]``."""
    if SCALE:
        g = g / c.grad_scale
    if CLIP:
        if g > c.clip_value:
            g = c.clip_value
        elif g < -c.clip_value:
            g = -c.clip_value
    return g


@register_jitable
def post(p, c, zero, L1, LO, HI):
    """Parameter side: soft-threshold by ``lr * l1``, then clamp.  NaN stays NaN."""
    if L1:
        t = c.l1_threshold
        if p > t:
            p = p - t
        elif p < -t:
            p = p + t
        elif p == p:
            p = zero
    if LO:
        if p < c.param_min:
            p = c.param_min
    if HI:
        if p > c.param_max:
            p = c.param_max
    return p


@register_jitable
def renorm_row(prow, c, zero, eps):
    """Scale a row whose L2 norm exceeds ``max_norm`` by ``max_norm / (norm + eps)``
    (squares summed in element order; ``eps`` is ``RENORM_EPS`` in the dtype)."""
    ss = zero
    for j in range(prow.shape[0]):
        ss += prow[j] * prow[j]
    norm = np.sqrt(ss)
    if norm > c.max_norm:
        scale = c.max_norm / (norm + eps)
        for j in range(prow.shape[0]):
            prow[j] = prow[j] * scale


# -------------------------------------------------------------------- NumPy

def np_pre(g, group, grad_scale):
    """The reference of :func:`pre` (returns a new array, or ``g`` when off)."""
    if grad_scale is not None:
        g = g / g.dtype.type(grad_scale)
    if group.get("clip_value") is not None:
        v = g.dtype.type(group["clip_value"])
        g = np.where(g > v, v, np.where(g < -v, -v, g))
    return g


def np_post(p, group):
    """The reference of :func:`post` and :func:`renorm_row`, in place on ``p``."""
    dt = p.dtype.type
    if group.get("l1", 0.0) > 0.0:
        t = dt(dt(group["lr"] * group["l1"]))
        p[...] = np.where(p > t, p - t, np.where(p < -t, p + t,
                                                  np.where(np.isnan(p), p, dt(0))))
    if group.get("param_min") is not None:
        lo = dt(group["param_min"])
        p[...] = np.where(p < lo, lo, p)
    if group.get("param_max") is not None:
        hi = dt(group["param_max"])
        p[...] = np.where(p > hi, hi, p)
    if group.get("max_norm") is not None and p.size:
        rows = p.reshape(p.shape[0] if p.ndim else 1, -1)
        norm = np.sqrt((rows.astype(np.float64) ** 2).sum(axis=1)).astype(p.dtype)
        m = dt(group["max_norm"])
        over = norm > m
        rows[over] *= (m / (norm[over] + dt(RENORM_EPS)))[:, None]
