"""The NumPy definition of every storage format: whole-array encode and decode.

These functions *define* the formats (the jitable twins in
:mod:`fastopt.storage.codecs` and the Cython copy are tested against them bit for
bit).  Arrays of bfloat16 are handled through their uint16 bits.
"""

import numpy as np

from . import Q8_BLOCK, is_bf16, q8_blocks

F32 = np.float32
K2 = F32(1.0 / (126.0 * 126.0))
K4 = F32(1.0 / (253.0 ** 4))
FLT_MAX = F32(3.4028234663852886e38)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint16) if is_bf16(a.dtype) else a


def widen(u):
    """bfloat16 bits (uint16 array) -> float32 array (exact)."""
    return (u.astype(np.uint32) << np.uint32(16)).view(F32)


def round_nearest(x):
    """float32 array -> bfloat16 bits, round to nearest even; NaN -> quiet NaN."""
    b = np.asarray(x, dtype=F32).view(np.uint32)
    hi = b >> np.uint32(16)
    out = (b + np.uint32(0x7FFF) + (hi & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(x)
    out = np.where(nan, hi | np.uint32(0x40), out)
    return out.astype(np.uint16)


def round_stochastic(x, r):
    b = np.asarray(x, dtype=F32).view(np.uint32)
    out = (b + r.astype(np.uint32)) >> np.uint32(16)
    out = np.where(np.isnan(x), (b >> np.uint32(16)) | np.uint32(0x40), out)
    return out.astype(np.uint16)


def split(x):
    """(high bits, low bits) of a float32 master array."""
    b = np.asarray(x, dtype=F32).view(np.uint32)
    hi = b >> np.uint32(16)
    hi = np.where(np.isnan(x), hi | np.uint32(0x40), hi)
    return hi.astype(np.uint16), (b & np.uint32(0xFFFF)).astype(np.uint16)


def bracket(t, x):
    """bfloat16 bits ``t`` held between the two bfloat16 neighbours of float32 ``x``
    (the Kahan store; NaN passes through)."""
    b = np.asarray(x, dtype=F32).view(np.uint32)
    lo = b >> np.uint32(16)
    hi = lo + ((b & np.uint32(0xFFFF)) != 0).astype(np.uint32)
    lo16, hi16 = lo.astype(np.uint16), hi.astype(np.uint16)
    a, c, v = widen(lo16), widen(hi16), widen(t)
    down = np.where(a <= c, lo16, hi16)
    up = np.where(a <= c, hi16, lo16)
    with np.errstate(invalid="ignore"):
        t = np.where(v < np.minimum(a, c), down, t)
        t = np.where(v > np.maximum(a, c), up, t)
    return t.astype(np.uint16)


def join(hi, lo):
    return ((hi.astype(np.uint32) << np.uint32(16)) | lo.astype(np.uint32)).view(F32)


def random16(key, e):
    """16 random bits for element indices ``e`` (int64 array) in stream ``key``."""
    e = e.astype(np.uint64)
    m = np.uint64(0xFFFFFFFF)
    h = ((e & m) * np.uint64(0x9E3779B1) + (e >> np.uint64(32)) * np.uint64(0x85EBCA77)
         + np.uint64(key)) & m
    h ^= h >> np.uint64(16)
    h = (h * np.uint64(0x7FEB352D)) & m
    h ^= h >> np.uint64(15)
    h = (h * np.uint64(0x846CA68B)) & m
    h ^= h >> np.uint64(16)
    return (h >> np.uint64(16)).astype(np.uint32)


# ------------------------------------------------------------------- 8-bit

def q8_init_code(v0, signed):
    """The code of a block whose every element is ``v0`` (scale ``|v0|``)."""
    if v0 == 0.0:
        return 0
    if signed:
        return 126 if v0 > 0 else 130
    return 253


def _blocked(a, shape):
    """View a flat tensor of ``shape`` as (rows*blocks, Q8_BLOCK), zero-padded."""
    r, nb, d = q8_blocks(shape)
    x = a.reshape(r, d)
    pad = nb * Q8_BLOCK - d
    if pad:
        x = np.concatenate([x, np.zeros((r, pad), dtype=x.dtype)], axis=1)
    return x.reshape(r * nb, Q8_BLOCK), (r, nb, d)


def _unblocked(xb, dims, shape):
    r, nb, d = dims
    return xb.reshape(r, nb * Q8_BLOCK)[:, :d].reshape(shape)


def q8_scales(x, shape):
    """The block scales (largest finite magnitude per block) of float array x."""
    xb, _ = _blocked(np.asarray(x, dtype=F32), shape)
    a = np.abs(xb)
    a = np.where(np.isfinite(a), a, F32(0))
    return a.max(axis=1).astype(F32)


def q8_encode(x, shape, signed):
    """float array of ``shape`` -> (uint8 codes, float32 scales)."""
    x = np.asarray(x, dtype=F32)
    s = q8_scales(x, shape)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        inv = np.minimum(F32(1.0) / s, FLT_MAX).astype(F32)
        xb, dims = _blocked(x, shape)
        a = np.abs(xb) * inv[:, None]
        if signed:
            q = np.minimum(np.floor(np.sqrt(a) * F32(126.0) + F32(0.5)), F32(126.0))
            k = q.astype(np.int32)
            k = np.where(xb < 0, (256 - k) & 255, k)
            k = np.where(np.isnan(xb), 128, np.where(xb == np.inf, 127,
                                                      np.where(xb == -np.inf, 129, k)))
        else:
            q = np.clip(np.floor(np.sqrt(np.sqrt(a)) * F32(253.0) + F32(0.5)), F32(1.0), F32(253.0))
            k = np.where(xb > 0, q, F32(0)).astype(np.int32)
            k = np.where(np.isnan(xb), 255, np.where(xb == np.inf, 254, k))
    return _unblocked(k.astype(np.uint8), dims, shape), s


def q8_decode(codes, scales, shape, signed):
    """uint8 codes and float32 scales -> float32 array of ``shape``."""
    cb, dims = _blocked(codes.reshape(-1), shape)
    s = scales.astype(F32)[:, None]
    c = cb.astype(np.int32)
    if signed:
        k = np.where(c >= 128, c - 256, c).astype(F32)
        x = (k * np.abs(k)) * K2 * s
        x = np.where(c == 128, F32(np.nan), np.where(c == 127, F32(np.inf),
                                                       np.where(c == 129, F32(-np.inf), x)))
    else:
        w = c.astype(F32)
        w2 = w * w
        x = (w2 * w2) * K4 * s
        x = np.where(c == 255, F32(np.nan), np.where(c == 254, F32(np.inf), x))
    return _unblocked(x.astype(F32), dims, shape)
