"""Hyperparameter checks shared by the optimizer classes and the functional layer.

Each check takes the name and the value and returns the normalized value or raises
``ValueError`` naming both.  Non-finite numbers are always refused.
"""

import math
import numbers

import numpy as np


def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    try:
        value = float(value)
    except OverflowError:
        raise ValueError(f"Invalid {name}: {value!r} (too large for a float)") from None
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    return value


def real(name, value):
    """Any finite real number."""
    return _number(name, value)


def non_negative(name, value):
    value = _number(name, value)
    if value < 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= 0)")
    return value


def positive(name, value):
    """A number > 0."""
    value = _number(name, value)
    if not value > 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be > 0)")
    return value


def unit_closed(name, value):
    """A number in [0, 1]."""
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1])")
    return value


def unit_half_open(name, value):
    """A number in [0, 1)."""
    value = _number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in [0, 1))")
    return value


def _pair(check):
    def pair(name, value):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"Invalid {name}: {value!r} (expected a pair (beta1, beta2))")
        return (check(f"{name}[0]", value[0]), check(f"{name}[1]", value[1]))
    return pair


betas_half_open = _pair(unit_half_open)
betas_closed = _pair(unit_closed)


def positive_int_or_none(name, value):
    """None, or an integer >= 1 (a number of steps: AdEMAMix's warm-ups)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (expected None or an integer >= 1)")
    return int(value)


def boolean(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"Invalid {name}: {value!r} (expected True or False)")
    return bool(value)
