"""Gradient clipping in place on NumPy arrays (torch.nn.utils.clip_grad_norm_ /
clip_grad_value_).

``grads`` is one ndarray or an iterable of ndarrays (a list, a tuple, a dict's
values; a dict itself is taken by its values); ``None`` entries are skipped.  Every
array is checked before any is changed: it must be a writeable ndarray of a
floating dtype (``TypeError`` for other types and dtypes, ``ValueError`` for a
read-only array).

Norms are computed in float64 with a fixed reduction order (each array's norm,
then those norms combined in list order), so the result does not depend on
threading or on how the arrays are grouped.
"""

import math
import numbers

import numpy as np

__all__ = ["clip_grad_norm_", "clip_grad_value_"]

#: elements per float64 temporary when reducing float32/float16 arrays
_CHUNK = 1 << 18


def _arrays(grads, what):
    if isinstance(grads, np.ndarray):
        items = [grads]
    elif isinstance(grads, dict):
        items = list(grads.values())
    else:
        try:
            items = list(grads)
        except TypeError:
            raise TypeError(f"{what}: expected an ndarray or an iterable of ndarrays, got "
                            f"{type(grads).__name__}") from None
    out = []
    for i, g in enumerate(items):
        if g is None:
            continue
        if not isinstance(g, np.ndarray):
            raise TypeError(f"{what}: gradient {i} is a {type(g).__name__}, not an ndarray")
        if g.dtype.kind != "f":
            raise TypeError(f"{what}: gradient {i} has dtype {g.dtype}; a floating dtype is "
                            "required")
        if not g.flags.writeable:
            raise ValueError(f"{what}: gradient {i} is read-only; it must be changed in place")
        out.append(g)
    return out


def _limit(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    value = float(value)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be finite and >= 0)")
    return value


def _norm_type(norm_type):
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, numbers.Real):
        raise ValueError(f"Invalid norm_type: {norm_type!r} (expected a number or 'inf')")
    p = float(norm_type)
    if not p > 0.0:  # also refuses nan
        raise ValueError(f"Invalid norm_type: {norm_type!r} (must be > 0 or inf)")
    return p


def _array_norm(g, p):
    """p-norm of one array in float64 (chunked so float32 arrays need no full copy)."""
    flat = g.reshape(-1)  # a view when possible; a copy for non-contiguous arrays
    if flat.size == 0:
        return 0.0
    if g.dtype == np.float64:
        return float(np.linalg.norm(flat, ord=p))
    if p == math.inf:
        return float(np.abs(flat).max())  # exact in the array's own dtype
    acc = 0.0
    for start in range(0, flat.size, _CHUNK):
        c = flat[start:start + _CHUNK].astype(np.float64)
        if p == 2.0:
            acc += float(np.dot(c, c))
        elif p == 1.0:
            acc += float(np.abs(c).sum())
        else:
            acc += float((np.abs(c) ** p).sum())
    if p == 2.0:
        return math.sqrt(acc)
    if p == 1.0:
        return acc
    return acc ** (1.0 / p)


def _combine(norms, p):
    if not norms:
        return 0.0
    return float(np.linalg.norm(np.array(norms, dtype=np.float64), ord=p))


def clip_grad_norm_(grads, max_norm, norm_type=2.0, error_if_nonfinite=False):
    r"""Scale ``grads`` in place so that their joint p-norm is at most ``max_norm``.

    ``total = || (||g_1||_p, ||g_2||_p, ...) ||_p`` (the norm of all gradients seen
    as one vector; ``p = inf``: the largest absolute value), computed in float64.
    Every gradient is multiplied by ``clip_coef = min(max_norm / (total + 1e-6), 1)``
    -- torch's coefficient, so a norm just below ``max_norm`` is also scaled by a
    factor within 1e-6 of one, and nothing is written when the coefficient is 1.

    Args:
        grads: an ndarray or an iterable of ndarrays (``None`` entries skipped).
        max_norm: the largest allowed norm (finite, >= 0).
        norm_type: ``p`` > 0 (1, 2, 3, ...) or ``inf`` / ``'inf'``.  Default 2.
        error_if_nonfinite: raise ``RuntimeError`` (as torch) when the total norm is
            nan or inf; otherwise, as torch, the gradients are scaled by the
            resulting coefficient (0 for inf, nan for nan).

    Returns the total norm (before clipping) as a Python float; torch returns a
    0-d tensor.  No gradients gives 0.0.
    """
    max_norm = _limit("max_norm", max_norm)
    p = _norm_type(norm_type)
    arrays = _arrays(grads, "clip_grad_norm_")
    with np.errstate(over="ignore", invalid="ignore"):  # inf/nan norms are results here
        total = _combine([_array_norm(g, p) for g in arrays], p)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so "
            "it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`")
    clip_coef = max_norm / (total + 1e-6)
    if not clip_coef >= 1.0:  # clamp(max=1.0); a nan coefficient is applied, as torch
        with np.errstate(invalid="ignore"):  # inf * 0 -> nan, silently as torch
            for g in arrays:
                np.multiply(g, clip_coef, out=g, casting="same_kind")
    return total


def clip_grad_value_(grads, clip_value):
    """Clamp every gradient element into ``[-clip_value, clip_value]`` in place
    (torch.nn.utils.clip_grad_value_; nan stays nan).  ``clip_value`` must be finite
    and >= 0.  Returns None, as torch."""
    clip_value = _limit("clip_value", clip_value)
    for g in _arrays(grads, "clip_grad_value_"):
        np.clip(g, -clip_value, clip_value, out=g)
