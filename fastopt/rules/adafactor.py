"""Adafactor (Shazeer and Stern 2018, "Adafactor: Adaptive Learning Rates with
Sublinear Memory Cost"), as ``torch.optim.Adafactor`` computes it.

Equations (step ``t``; hyperparameters ``lr``, ``beta2_decay`` (tau), ``eps =
(eps1, eps2)``, ``d``, ``weight_decay`` (lambda), ``maximize``), per tensor::

    G      = -grad if maximize else grad
    w      = t ** tau                          (the lerp weight, 1 - beta2_t)
    rho    = min(lr, 1 / sqrt(t))
    alpha  = max(eps2, RMS(p)) * rho           (p before the weight decay)
    p      = p * (1 - lr * lambda)             (when lambda != 0)
    2 or more dimensions (factored over the last two, batched over the leading ones;
    state ``row_var`` of shape (..., R, 1), ``col_var`` of shape (..., 1, C)):
        row_var = lerp(row_var, mean(G^2, dim=-1), w)
        col_var = lerp(col_var, mean(G^2, dim=-2), w)
        V       = row_var @ col_var / max(mean(row_var, dim=-2), eps1)
    fewer dimensions (vectors and 0-d tensors; state ``variance``, p's shape):
        variance = lerp(variance, G^2, w);   V = variance
    U      = G * rsqrt(max(V, eps1^2))
    p      = p - alpha / max(1, RMS(U) / d) * U

``eps1=None`` is the machine epsilon of the parameter's dtype.  ``RMS(x) =
||x||_2 / sqrt(numel)``.  ``lerp(a, b, w)`` is torch's: ``a + w (b - a)`` when
``|w| < 0.5``, else ``b - (b - a)(1 - w)`` (so the first step, ``w = 1``, stores the
means exactly).  The host-side maxima are Python's ``max`` as torch uses them: a NaN
``RMS(p)`` gives ``alpha = eps2 * rho`` and a NaN ``RMS(U)`` gives a divisor of 1;
the clamps of the tensors propagate NaN (a NaN gradient element makes its row and
column of the factors NaN, and through the mean of ``row_var`` the whole update of
that matrix, as in torch).  Tensors with no element are skipped (torch divides by
zero there).

Formulation: a *factored* rule (``layout="factored"``, :mod:`fastopt.factored`).
Each tensor of two or more dimensions takes three passes, each a parallel driver
(Numba, its Cython twin), with small host work between them:

1. the *sums pass* (:func:`sq`) reads p and G: per row the sum of ``G^2`` and of
   ``p^2`` (float64, in 8 lanes: element j to lane j % 8, the lanes then the tail
   added in order) and, per block of ``FACTOR_ROWS`` rows,
   column partial sums of ``G^2`` (float64), added block by block in order: every
   sum has a fixed order that depends on the shape only, never on the thread count;
2. host: the means, the lerps of ``row_var`` and ``col_var`` (in the parameter's
   dtype, torch's formula), ``max(mean(row_var), eps1)``, ``alpha``;
3. the *RMS pass* (:func:`update`) reads G and the factors: the sum of ``U^2``
   (per row in float64, rows added in order);
4. host: the divisor ``max(1, RMS(U)/d)``; the *update pass* (:func:`apply`) reads
   p, G and the factors and writes p.

On the numba and cython backends the tensors of a step below
``fastopt.factored.PARALLEL_MIN`` elements take all of the above in one driver call
(the grouped step: each tensor's passes and host work compiled, one thread per
tensor, the same operations in the same orders, so the same bits).

Vectors: the first pass lerps ``variance`` in place and sums ``p^2`` per chunk of
``CHUNK`` elements, the chunks added in order; then the RMS and update passes as
above with ``V = variance``.  ``U`` is recomputed in the update pass rather than
stored (no tensor-sized temporary, as Adafactor is used where memory is short).
The passes read 8 + 4 + 12 bytes per float32 element and write 4.

Refused: row-sparse gradients, ``sparse_mode="exact"``, the fused options
(``clip_value``, ``l1``, ``param_min``/``param_max``, ``max_norm``) and
``step(grad_scale=...)``, bfloat16 parameters and 8/16-bit state (the passes read
float32/float64 parameters and state; torch's Adafactor keeps state in the
parameter's dtype).
"""

import math

import numpy as np

from .._jit import register_jitable
from . import fused
from . import hyperparams as hp
from .base import Rule, scalars_type

#: rows per block of the column partial sums (a fixed number: the summation order
#: depends on the shape only)
FACTOR_ROWS = 64

Scalars = scalars_type("AdafactorScalars", (
    "lr", "rho", "beta2_weight", "decay", "eps1", "eps2", "d", "maximize"))


def host_scalars(group, step, host, fresh):
    """The step's scalars (float64): ``rho = min(lr, 1/sqrt(t))`` and the lerp weight
    ``t ** beta2_decay`` as torch forms them; ``eps1`` is -1 for "the dtype's
    machine epsilon" (resolved by :func:`eps1_of`)."""
    t = float(step)
    lr = group["lr"]
    eps1, eps2 = group["eps"]
    return dict(lr=lr, rho=min(lr, 1 / (t ** 0.5)), beta2_weight=t ** group["beta2_decay"],
                decay=1 - lr * group["weight_decay"],
                eps1=-1.0 if eps1 is None else eps1, eps2=eps2, d=group["d"],
                maximize=group["maximize"]), host


def eps1_of(group, dtype):
    """``eps1``, or the machine epsilon of ``dtype`` when it is None (torch)."""
    e = group["eps"][0]
    return float(np.finfo(dtype).eps) if e is None else float(e)


def factored(shape):
    """Whether a parameter of ``shape`` keeps factored state (2 or more dims)."""
    return len(shape) >= 2


def param_slots(shape):
    """The state slots a parameter of ``shape`` has (torch's keys)."""
    return ("row_var", "col_var") if factored(shape) else ("variance",)


def slot_shape(shape, name):
    """torch's keepdim shapes: ``row_var`` (..., R, 1), ``col_var`` (..., 1, C)."""
    shape = tuple(shape)
    if name == "row_var":
        return shape[:-1] + (1,)
    if name == "col_var":
        return shape[:-2] + (1,) + shape[-1:]
    return shape


def py_max(a, b):
    """Python's ``max(a, b)`` (a NaN ``b`` gives ``a``), as torch applies it to the
    host scalars."""
    return b if b > a else a


def alpha_of(c_rho, eps2, psq, n):
    """``max(eps2, RMS(p)) * rho`` from the float64 sum of squares of p."""
    return py_max(eps2, math.sqrt(psq) / (n ** 0.5)) * c_rho


def divisor_of(usq, n, d):
    """``max(1, RMS(U) / d)`` from the float64 sum of squares of U."""
    return py_max(1.0, math.sqrt(usq) / ((n ** 0.5) * d))


def lerp_host(a, b, w):
    """torch's ``a.lerp_(b, w)`` on arrays of one dtype, in that dtype."""
    w = a.dtype.type(w)
    one = a.dtype.type(1)
    if abs(w) < 0.5:
        a[...] = a + w * (b - a)
    else:
        a[...] = b - (b - a) * (one - w)


# ------------------------------------------------------------ element math (jitable)
@register_jitable
def lerp(a, b, w, omw):
    """torch's lerp of one element (``w`` and ``omw = 1 - w`` in the element's
    dtype)."""
    if abs(w) < 0.5:
        return a + w * (b - a)
    return b - (b - a) * omw


@register_jitable
def sq(g):
    """The square of a gradient element, in float64 (the sums pass)."""
    x = np.float64(g)
    return x * x


@register_jitable
def update(g, v, eps1sq, one):
    """One element of ``U = G * rsqrt(max(V, eps1^2))`` (``g`` already negated under
    maximize; ``one`` is 1 in the dtype); the clamp keeps a NaN ``v``."""
    if v < eps1sq:
        v = eps1sq
    return (one / np.sqrt(v)) * g


@register_jitable
def factored_v(r, c, m):
    """One element of ``row_var @ col_var / max(mean(row_var), eps1)`` (``m`` is the
    clamped mean)."""
    return (r * c) / m


@register_jitable
def apply(p, u, decay, step):
    """``p * (1 - lr weight_decay) + step * U`` (``step = -alpha / divisor``)."""
    return p * decay + step * u


# ---------------------------------------------------------------- NumPy reference
def _rms(a):
    x = np.asarray(a, dtype=np.float64).ravel()
    return math.sqrt(float(np.dot(x, x))) / (x.size ** 0.5)


def reference(param, grad, state, group, step, fresh=()):
    """The oracle: torch's single-tensor algorithm in whole-array NumPy."""
    if param.size == 0:
        return
    dt = param.dtype.type
    g = -grad if group["maximize"] else grad
    t = float(step)
    lr = group["lr"]
    eps1 = eps1_of(group, param.dtype)
    eps2 = group["eps"][1]
    w = t ** group["beta2_decay"]
    rho = min(lr, 1 / (t ** 0.5))
    alpha = py_max(eps2, _rms(param)) * rho
    if group["weight_decay"] != 0:
        param *= dt(1 - lr * group["weight_decay"])
    if param.ndim >= 2:
        g64 = g.astype(np.float64)
        row_mean = ((g64 * g64).sum(axis=-1, keepdims=True) / g.shape[-1]).astype(dt)
        col_mean = ((g64 * g64).sum(axis=-2, keepdims=True) / g.shape[-2]).astype(dt)
        row_var, col_var = state["row_var"], state["col_var"]
        lerp_host(row_var, row_mean, w)
        lerp_host(col_var, col_mean, w)
        m = row_var.mean(axis=-2, keepdims=True, dtype=np.float64).astype(dt)
        m = np.where(m < dt(eps1), dt(eps1), m)
        v = (row_var * col_var) / m
    else:
        var = state["variance"]
        lerp_host(var, g * g, w)
        v = var.copy()
    e2 = dt(eps1 * eps1)
    v = np.where(v < e2, e2, v)
    u = (dt(1) / np.sqrt(v)) * g
    denom = py_max(1.0, _rms(u) / group["d"])
    param += dt(-alpha / denom) * u


# ------------------------------------------------------------------- the rule
def _eps(name, value):
    try:
        e1, e2 = value
    except (TypeError, ValueError):
        raise ValueError(f"Invalid {name}: {value!r} (a pair (eps1 or None, eps2))") from None
    if e1 is not None:
        e1 = hp.non_negative("epsilon1", e1)
    return (e1, hp.non_negative("epsilon2", e2))


def _beta2_decay(name, value):
    v = hp.real(name, value)
    if not v <= 0.0:
        raise ValueError(f"beta2_decay should be <= 0 but is: {value}")
    return v


def _d(name, value):
    v = hp.real(name, value)
    if not 1.0 <= v:
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {value}")
    return v


def _cross_check(group):
    on = [k for k, v in fused.DEFAULTS.items() if group.get(k, v) != v]
    if on:
        raise ValueError(f"Adafactor: the fused options {on} are not supported (its update "
                         "runs by whole tensors: the row and column sums, then the RMS of "
                         "the update, then the update pass)")


def _low_state_reason(group):
    return ("a matrix's state is its factors, R + C numbers (32 KiB in float32 for a "
            "(4096, 4096) weight), so 8- or 16-bit codes would save nothing worth their "
            "rounding; torch keeps Adafactor's state in the parameter's dtype, and so does "
            "fastopt (a vector's variance included): use state_bits=32")


def _bf16_reason():
    return ("its passes read float32/float64 parameters; the bfloat16 storage formats are "
            "not built for the factored rules")


RULE = Rule(
    name="Adafactor",
    doc="""Adafactor (Shazeer and Stern 2018), as ``torch.optim.Adafactor``: the second
        moment of a tensor of 2 or more dimensions kept factored over its last two
        (``row_var`` (..., R, 1), ``col_var`` (..., 1, C)), of a vector in full
        (``variance``).

        ``w = t^beta2_decay``; ``rho = min(lr, 1/sqrt(t))``;
        ``alpha = max(eps2, RMS(p)) rho``; ``p *= 1 - lr weight_decay``;
        ``row_var = lerp(row_var, mean(G^2, -1), w)``, ``col_var`` likewise over -2;
        ``V = row_var @ col_var / max(mean(row_var), eps1)`` (vectors: ``V = variance =
        lerp(variance, G^2, w)``); ``U = G rsqrt(max(V, eps1^2))``;
        ``p -= alpha / max(1, RMS(U)/d) U``.  ``eps1=None``: the dtype's machine
        epsilon.  Sums in float64 in a fixed order.  Dense gradients and
        float32/float64 parameters; no fused options.
        """,
    defaults=dict(lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0,
                  maximize=False),
    checks=dict(lr=hp.non_negative, beta2_decay=_beta2_decay, eps=_eps, d=_d,
                weight_decay=hp.non_negative, maximize=hp.boolean),
    slots=("row_var", "col_var", "variance"),
    nonnegative_slots=("row_var", "col_var", "variance"),
    uses_slots=lambda group: (True, True, True),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=apply,
    reference=reference,
    layout="factored",
    param_slots=param_slots,
    factored_shape=slot_shape,
    cross_check=_cross_check,
    low_state_reason=_low_state_reason,
    bf16_reason=_bf16_reason,
    flags=("maximize",),
    variants=({}, {"lr": 0.05, "weight_decay": 0.1, "maximize": True},
              {"beta2_decay": -0.5, "eps": (1e-5, 1e-2), "d": 2.0, "lr": 0.1}),
)
