"""Gradient clipping in place on NumPy arrays (torch.nn.utils.clip_grad_norm_ /
clip_grad_value_).

``grads`` is one ndarray or an iterable of ndarrays (a list, a tuple, a dict's
values; a dict itself is taken by its values); ``None`` entries are skipped.  Every
array is checked before any is changed: it must be a writeable ndarray of a
floating dtype or ``ml_dtypes.bfloat16`` (``TypeError`` for other types and dtypes,
``ValueError`` for a read-only array).  bfloat16 gradients, as the optimizers take
them: norms in float64, scaling in float32 rounded to nearest, and
``clip_grad_value_`` clamps to the bound rounded inward to a bfloat16 value (so
every element ends inside it).

Norms are computed in float64 with a fixed reduction order (each array's norm,
then those norms combined in list order), so the result does not depend on
threading or on how the arrays are grouped.
"""

import math
import numbers

import numpy as np

from ._jit import njit, prange, register_jitable
from .storage import bf16_toward, is_bf16

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
        if g.dtype.kind != "f" and not is_bf16(g.dtype):
            raise TypeError(f"{what}: gradient {i} has dtype {g.dtype}; a floating dtype "
                            "(or ml_dtypes.bfloat16) is required")
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


def _make_block_sums(parallel):
    """The block-sum kernel, parallel or serial.  A closure over ``PARALLEL``: the cell
    is part of Numba's cache key, so the two builds never share a cache entry (two
    ``njit`` wrappers of one function share its entries whatever their options: a
    serial caller could load the parallel build, which aborts in a forked child).
    Compiled (or loaded from the cache) on first call: ``import fastopt`` does not
    import numba (:mod:`fastopt._jit`)."""
    PARALLEL = bool(parallel)

    def block_sums(a, p):
        par = PARALLEL  # noqa: F841  (in the cache key)
        return _block_sums_body(a, p)
    return njit(parallel=PARALLEL, cache=True, nogil=True)(block_sums)


@register_jitable(inline="always")
def _block_sums_body(a, p):
    """Per block of ``_CHUNK`` elements, the float64 sum of ``|x|^p`` (p = 1, 2 or
    other), each block added in element order with four interleaved partial sums
    combined as ``(s0 + s1) + (s2 + s3)``.  The blocks depend only on the size, so
    the result does not depend on the thread count."""
    n = a.shape[0]
    nb = (n + _CHUNK - 1) // _CHUNK
    out = np.empty(nb, dtype=np.float64)
    for b in prange(nb):
        lo = b * _CHUNK
        hi = min(lo + _CHUNK, n)
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        m = lo + (hi - lo) // 4 * 4
        for i in range(lo, m, 4):
            x0, x1, x2, x3 = (abs(np.float64(a[i])), abs(np.float64(a[i + 1])),
                              abs(np.float64(a[i + 2])), abs(np.float64(a[i + 3])))
            if p == 2.0:
                s0 += x0 * x0
                s1 += x1 * x1
                s2 += x2 * x2
                s3 += x3 * x3
            elif p == 1.0:
                s0 += x0
                s1 += x1
                s2 += x2
                s3 += x3
            else:
                s0 += x0 ** p
                s1 += x1 ** p
                s2 += x2 ** p
                s3 += x3 ** p
        for i in range(m, hi):
            x = abs(np.float64(a[i]))
            s0 += x * x if p == 2.0 else (x if p == 1.0 else x ** p)
        out[b] = (s0 + s1) + (s2 + s3)
    return out


_block_sums = _make_block_sums(True)
_block_sums_serial = _make_block_sums(False)


def _array_norm(g, p):
    """p-norm of one array, accumulated in float64 in a fixed order (no BLAS, whose
    reduction order changes with its thread count)."""
    flat = g.reshape(-1)  # a view when possible; a copy for non-contiguous arrays
    if flat.size == 0:
        return 0.0
    if p == math.inf:
        return float(np.abs(flat).max())  # exact in the array's own dtype
    if flat.dtype not in (np.float32, np.float64):
        flat = flat.astype(np.float64)
    acc = 0.0
    from .backends.base import may_use_threads
    sums = _block_sums if may_use_threads() and flat.size > _CHUNK else _block_sums_serial
    for part in sums(np.ascontiguousarray(flat), p):   # blocks added in order
        acc += part
    if p == 2.0:
        return math.sqrt(acc)
    if p == 1.0:
        return acc
    return acc ** (1.0 / p)


def _combine(norms, p):
    """The p-norm of the per-array norms, added in list order."""
    if not norms:
        return 0.0
    if p == math.inf:
        return max(norms) if not any(math.isnan(x) for x in norms) else math.nan
    acc = 0.0
    for x in norms:
        try:
            acc += x * x if p == 2.0 else (x if p == 1.0 else x ** p)
        except OverflowError:
            acc = math.inf
    if p == 2.0:
        return math.sqrt(acc)
    if p == 1.0:
        return acc
    return acc ** (1.0 / p)


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
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 -> nan, as torch
            for g in arrays:
                if is_bf16(g.dtype):          # in float32, rounded to nearest
                    g[...] = (g.astype(np.float32) * np.float32(clip_coef)).astype(g.dtype)
                else:
                    np.multiply(g, clip_coef, out=g, casting="same_kind")
    return total


def clip_grad_value_(grads, clip_value):
    """Clamp every gradient element into ``[-clip_value, clip_value]`` in place
    (torch.nn.utils.clip_grad_value_; nan stays nan).  ``clip_value`` must be finite
    and >= 0.  Returns None, as torch."""
    clip_value = _limit("clip_value", clip_value)
    for g in _arrays(grads, "clip_grad_value_"):
        if is_bf16(g.dtype):
            # the bounds rounded inward to bfloat16 values: every element ends inside
            c = bf16_toward(clip_value, down=True)
            g[...] = np.clip(g.astype(np.float32), -c, c).astype(g.dtype)
        else:
            np.clip(g, -clip_value, clip_value, out=g)
