"""Parameter initialisation in place on NumPy arrays (torch.nn.init's names and math).

Every function fills a writeable float32/float64 ndarray in place and returns it.
``rng`` is a :class:`numpy.random.Generator` (``None``: a fresh
``np.random.default_rng()``); the same seed gives the same values (for a given
dtype: float32 arrays are drawn in float32).  torch's ``generator=`` argument is
``rng=`` here; the draws are NumPy's, so the values differ from torch's while the
distributions are the same.

Fans (torch's ``_calculate_fan_in_and_fan_out``): for an array with ``ndim >= 2``,
``receptive = prod(shape[2:])``, ``fan_in = shape[1] * receptive``,
``fan_out = shape[0] * receptive`` (the layout of torch's ``Linear.weight``
``[out, in]`` and ``Conv.weight`` ``[out, in, *kernel]``); fewer than 2 dimensions
raise ``ValueError``.
"""

import math
import numbers
import warnings

import numpy as np

__all__ = ["calculate_gain", "uniform_", "normal_", "zeros_", "ones_", "xavier_uniform_",
           "xavier_normal_", "kaiming_uniform_", "kaiming_normal_"]

_LINEAR = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
           "conv_transpose3d")


def calculate_gain(nonlinearity, param=None):
    """The recommended gain for a nonlinearity (torch.nn.init.calculate_gain).

    ========================= ==========================================
    nonlinearity              gain
    ========================= ==========================================
    linear / conv* / sigmoid  1
    tanh                      5/3
    relu                      sqrt(2)
    leaky_relu                sqrt(2 / (1 + negative_slope**2)), slope = param (default 0.01)
    selu                      3/4
    ========================= ==========================================

    Anything else raises ``ValueError``, as does a non-numeric ``param`` for
    leaky_relu.
    """
    if nonlinearity in _LINEAR or nonlinearity == "sigmoid":
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            negative_slope = 0.01
        elif not isinstance(param, bool) and isinstance(param, numbers.Real) \
                and math.isfinite(param):
            negative_slope = param
        else:
            raise ValueError(f"negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + negative_slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"Unsupported nonlinearity {nonlinearity}")


# ----------------------------------------------------------------------------- helpers

def _target(array, name):
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name}: expected a numpy.ndarray, got {type(array).__name__}")
    if array.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name}: array dtype {array.dtype} is not float32 or float64")
    if not array.flags.writeable:
        raise ValueError(f"{name}: the array is read-only")
    return array


def _generator(rng, name):
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name}: rng must be a numpy.random.Generator or None, "
                        f"got {type(rng).__name__}")
    return rng


def _finite(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite real number)")
    return float(value)


def _fill_uniform(array, low, high, rng):
    """array <- U[low, high), drawn in the array's dtype."""
    if array.size == 0:
        return array
    if array.flags.c_contiguous:
        rng.random(out=array, dtype=array.dtype)
    else:
        array[...] = rng.random(array.shape, dtype=array.dtype)
    array *= array.dtype.type(high - low)
    array += array.dtype.type(low)
    # float rounding of low + (high - low) * u can land on high; keep [low, high]
    np.clip(array, low, high, out=array)
    return array


def _fill_normal(array, mean, std, rng):
    """array <- N(mean, std**2), drawn in the array's dtype."""
    if array.size == 0:
        return array
    if array.flags.c_contiguous:
        rng.standard_normal(out=array, dtype=array.dtype)
    else:
        array[...] = rng.standard_normal(array.shape, dtype=array.dtype)
    array *= array.dtype.type(std)
    array += array.dtype.type(mean)
    return array


def _calculate_fan_in_and_fan_out(array):
    """(fan_in, fan_out) exactly as torch.nn.init._calculate_fan_in_and_fan_out."""
    if array.ndim < 2:
        raise ValueError("Fan in and fan out can not be computed for tensor with fewer than "
                         f"2 dimensions (got shape {array.shape})")
    receptive = 1
    for s in array.shape[2:]:
        receptive *= int(s)
    return int(array.shape[1]) * receptive, int(array.shape[0]) * receptive


def _calculate_correct_fan(array, mode):
    m = mode.lower() if isinstance(mode, str) else mode
    if m not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of ['fan_in', 'fan_out']")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(array)
    return fan_in if m == "fan_in" else fan_out


# ------------------------------------------------------------------------ functions

def uniform_(array, a=0.0, b=1.0, rng=None):
    """Fill with U(a, b) (torch.nn.init.uniform_; defaults a=0, b=1; a <= b)."""
    _target(array, "uniform_")
    a, b = _finite("a", a), _finite("b", b)
    if a > b:
        raise ValueError(f"uniform_ expects a <= b, got a={a!r} > b={b!r}")
    return _fill_uniform(array, a, b, _generator(rng, "uniform_"))


def normal_(array, mean=0.0, std=1.0, rng=None):
    """Fill with N(mean, std**2) (torch.nn.init.normal_; defaults 0 and 1; std >= 0)."""
    _target(array, "normal_")
    mean, std = _finite("mean", mean), _finite("std", std)
    if std < 0:
        raise ValueError(f"Invalid std: {std!r} (must be >= 0)")
    return _fill_normal(array, mean, std, _generator(rng, "normal_"))


def zeros_(array):
    """Fill with 0 (torch.nn.init.zeros_)."""
    _target(array, "zeros_")
    array[...] = 0
    return array


def ones_(array):
    """Fill with 1 (torch.nn.init.ones_)."""
    _target(array, "ones_")
    array[...] = 1
    return array


def xavier_uniform_(array, gain=1.0, rng=None):
    r"""Glorot/Xavier uniform (torch.nn.init.xavier_uniform_):
    U(-a, a) with ``a = gain * sqrt(6 / (fan_in + fan_out))``.  Default gain 1."""
    _target(array, "xavier_uniform_")
    gain = _finite("gain", gain)
    if gain < 0:
        raise ValueError(f"Invalid gain: {gain!r} (must be >= 0)")
    rng = _generator(rng, "xavier_uniform_")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(array)
    if array.size == 0:
        return array
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    bound = math.sqrt(3.0) * std
    return _fill_uniform(array, -bound, bound, rng)


def xavier_normal_(array, gain=1.0, rng=None):
    r"""Glorot/Xavier normal (torch.nn.init.xavier_normal_):
    N(0, std**2) with ``std = gain * sqrt(2 / (fan_in + fan_out))``.  Default gain 1."""
    _target(array, "xavier_normal_")
    gain = _finite("gain", gain)
    if gain < 0:
        raise ValueError(f"Invalid gain: {gain!r} (must be >= 0)")
    rng = _generator(rng, "xavier_normal_")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(array)
    if array.size == 0:
        return array
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return _fill_normal(array, 0.0, std, rng)


def _kaiming(array, a, mode, nonlinearity, rng, name):
    _target(array, name)
    rng = _generator(rng, name)
    if 0 in array.shape:
        warnings.warn("Initializing zero-element tensors is a no-op", stacklevel=3)
        return None, rng
    fan = _calculate_correct_fan(array, mode)
    gain = calculate_gain(nonlinearity, a)
    return gain / math.sqrt(fan), rng


def kaiming_uniform_(array, a=0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    r"""He/Kaiming uniform (torch.nn.init.kaiming_uniform_): U(-bound, bound) with
    ``bound = gain * sqrt(3 / fan)``, ``gain = calculate_gain(nonlinearity, a)``,
    ``fan`` = fan_in (default) or fan_out.  Defaults: a=0, mode='fan_in',
    nonlinearity='leaky_relu' (so gain = sqrt(2 / (1 + a**2))).  Zero-element
    arrays: a warning and no change, as torch."""
    std, rng = _kaiming(array, a, mode, nonlinearity, rng, "kaiming_uniform_")
    if std is None:
        return array
    bound = math.sqrt(3.0) * std
    return _fill_uniform(array, -bound, bound, rng)


def kaiming_normal_(array, a=0, mode="fan_in", nonlinearity="leaky_relu", rng=None):
    r"""He/Kaiming normal (torch.nn.init.kaiming_normal_): N(0, std**2) with
    ``std = gain / sqrt(fan)``; arguments and defaults as :func:`kaiming_uniform_`."""
    std, rng = _kaiming(array, a, mode, nonlinearity, rng, "kaiming_normal_")
    if std is None:
        return array
    return _fill_normal(array, 0.0, std, rng)
