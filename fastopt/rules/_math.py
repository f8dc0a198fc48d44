"""Scalar helpers shared by the rules' element math and closed forms (jitable)."""

import numpy as np  # noqa: F401  (rule modules use np.sqrt / np.abs on scalars)
from .._jit import register_jitable


@register_jitable
def nanmax(a, b):
    """max(a, b) that returns NaN when either argument is NaN (like torch.maximum)."""
    if a > b or a != a:
        return a
    return b


@register_jitable
def sign(x, one, zero):
    """sign(x) in x's dtype; NaN stays NaN, so a NaN gradient shows in the
    parameter (torch 2.13's ``torch.sign`` returns 0 for NaN on the CPU; Rprop, which
    follows torch there, handles NaN itself)."""
    if x > zero:
        return one
    if x < zero:
        return -one
    if x == zero:
        return zero
    return x


@register_jitable
def matpow(a, b, c, e, n):
    """(a b; c e)^n by repeated squaring, float64 (closed forms of exact mode)."""
    ra, rb, rc, re = 1.0, 0.0, 0.0, 1.0
    while n > 0:
        if n & 1:
            ra, rb, rc, re = ra * a + rb * c, ra * b + rb * e, rc * a + re * c, rc * b + re * e
        a, b, c, e = a * a + b * c, a * b + b * e, c * a + e * c, c * b + e * e
        n >>= 1
    return ra, rb, rc, re


@register_jitable
def identity_catch_up(k, first, h):
    """Closed form of rules whose zero-gradient step changes nothing."""
    return 1.0, 0.0, 0.0, 1.0
