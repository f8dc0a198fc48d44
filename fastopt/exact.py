"""Closed forms for ``sparse_mode="exact"``: catching a row up over skipped steps.

In exact mode a sparse step must give the same result as a dense step whose
gradient is zero on the untouched rows.  On such a row, a step with zero data
gradient is a linear map of ``x = (param, slot 0)`` for the rules below, so ``k``
skipped steps are its ``k``-th power, applied when the row is next touched (or by
``flush()``).  Each function returns the 2x2 matrix ``(a, b, c, e)`` in float64 with
``param' = a param + b s0``, ``s0' = c param + e s0``, computed from the rule's
per-step scalars ``h`` (the same tuple the rule math receives) by repeated squaring.

* SGD (``h = (lr, wd, momentum, 1 - dampening, nesterov, maximize, first,
  has_momentum)``): the data gradient is zero, so ``g = wd * p`` (maximize flips
  only the data gradient).  Without momentum ``p <- (1 - lr wd) p``.  With
  momentum ``mu`` and ``c = (1 - dampening) wd``::

      buf' = c p + mu buf
      p'   = (1 - lr c) p - lr mu buf                    (heavy ball)
      p'   = (1 - lr wd - lr mu c) p - lr mu^2 buf        (Nesterov)

  and on the momentum buffer's first step (torch sets ``buf = g``)
  ``buf' = wd p``, ``p' = (1 - lr wd (1 + mu [nesterov])) p``.
* RMSprop without centering, momentum or weight decay: ``square_avg <- alpha
  square_avg``, the parameter does not move (``0 / (sqrt(v) + eps) = 0``).
* Adagrad without weight decay: nothing changes.

Requirements (``Rule.exact_reason`` says which is missing): the hyperparameters must
stay fixed between a row's updates; when they change, the optimizer first brings
every row up to date with the old ones (a dense pass), so a per-step scheduler makes
exact mode as expensive as a dense step.  The result equals the dense trajectory up
to floating-point rounding (the powers are formed in float64).
"""

from numba.extending import register_jitable


@register_jitable
def _matpow(a, b, c, e, n):
    """(a b; c e)^n by repeated squaring, float64."""
    ra, rb, rc, re = 1.0, 0.0, 0.0, 1.0
    while n > 0:
        if n & 1:
            ra, rb, rc, re = ra * a + rb * c, ra * b + rb * e, rc * a + re * c, rc * b + re * e
        a, b, c, e = a * a + b * c, a * b + b * e, c * a + e * c, c * b + e * e
        n >>= 1
    return ra, rb, rc, re


@register_jitable
def sgd(k, first, h):
    lr, wd, mom, omd, nest, has_mom = h[0], h[1], h[2], h[3], h[4], h[7]
    if not has_mom:
        return _matpow(1.0 - lr * wd, 0.0, 0.0, 1.0, k)
    c = omd * wd
    if nest:
        a, b = 1.0 - lr * wd - lr * mom * c, -lr * mom * mom
    else:
        a, b = 1.0 - lr * c, -lr * mom
    if not first:
        return _matpow(a, b, c, mom, k)
    fa = 1.0 - lr * wd * (1.0 + mom) if nest else 1.0 - lr * wd
    ra, rb, rc, re = _matpow(a, b, c, mom, k - 1)
    # (M^(k-1)) @ F with F = (fa 0; wd 0)
    return ra * fa + rb * wd, 0.0, rc * fa + re * wd, 0.0


@register_jitable
def rmsprop(k, first, h):
    return _matpow(1.0, 0.0, 0.0, h[2], k)


@register_jitable
def identity(k, first, h):
    return 1.0, 0.0, 0.0, 1.0


def sgd_reason(group):
    return None


def adagrad_reason(group):
    if group["weight_decay"] != 0.0:
        return "weight_decay must be 0 (a decayed row's accumulator has no closed form)"
    if group["eps"] == 0.0 and group["initial_accumulator_value"] == 0.0:
        return "eps or initial_accumulator_value must be > 0 (0/0 on a zero row)"
    return None


def rmsprop_reason(group):
    if group["centered"] or group["momentum"] != 0.0 or group["weight_decay"] != 0.0:
        return "centered=False, momentum=0 and weight_decay=0 are required"
    if group["eps"] == 0.0:
        return "eps must be > 0 (0/0 on a zero row)"
    return None
