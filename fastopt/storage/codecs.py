"""The codecs of the storage formats as Numba jitable functions (CPU and CUDA).

Each function is the scalar twin of one function of
:mod:`fastopt.storage.reference`, which defines the format; the tests check them
bit for bit.  Codec arithmetic is float32 (a float64 value is converted first).

bfloat16 (``u``: the uint16 bits)::

    widen(u)           = float32 with bits u << 16                        (exact)
    round_nearest(x)   = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16      (NaN: quiet NaN)
    round_stochastic(x, r) = (bits + r) >> 16,  r uniform in [0, 2**16)   (NaN: quiet NaN)
    split(x)           = (bits >> 16, bits & 0xFFFF)  (NaN: high part made a quiet NaN)
    bracket(t, x)      = t held between x's two bfloat16 neighbours (the Kahan store)

The random 16 bits of element ``e`` under stream key ``k`` (:func:`random16`) are the
top half of a 32-bit integer hash (the "lowbias32" finalizer) of
``e_lo * 0x9E3779B1 + e_hi * 0x85EBCA77 + k``.

8-bit codes relative to the block scale ``s`` (the largest finite magnitude of the
block; ``inv = min(1 / s, FLT_MAX)``): a square-root code for slots that can be
negative and a fourth-root code for non-negative ones (second moments span many
more decades; the fourth root keeps values down to 2e-10 of the block's largest)::

    signed:    q = min(floor(sqrt(|x| inv) * 126 + 0.5), 126), stored as the byte of
               sign(x) q;  x = (q |q|) / 126**2 * s;   NaN 128, +Inf 127, -Inf 129
    unsigned:  q = min(max(floor(sqrt(sqrt(x inv)) * 253 + 0.5), 1), 253) for x > 0;
               x = (q q)(q q) / 253**4 * s;             NaN 255, +Inf 254, x <= 0: 0

The unsigned code never rounds a positive value to 0: a value below half the
smallest code is stored as the smallest code (``s / 253**4``).  Every unsigned slot
is a denominator (Adam's ``exp_avg_sq``, Adagrad's ``sum``, RMSprop's
``square_avg``, Adamax's ``exp_inf``), so rounding up is the safe direction: a
flushed second moment beside a first moment that still carries its history made
the update ``m / eps`` for the neighbours of one outlier gradient (the outlier
sets the block scale; its second moment decays by beta2 per step, the
neighbours' stayed 0 for thousands of steps).  A floored moment overestimates,
which shrinks the step (bitsandbytes' dynamic code errs the same way).

Encoding is a few arithmetic operations and a compare (no table search), so it
vectorizes inside the fused pass; ``encode(decode(q)) == q`` for every code.
The codes were chosen by measurement (docs/low-precision.md).
"""

import numpy as np

from .._jit import numba as _numba, register_jitable

_numba()   # a kernel module: numba now (and the registrations pending in fastopt._jit)

K2 = np.float32(1.0 / (126.0 * 126.0))
K4 = np.float32(1.0 / (253.0 ** 4))
FLT_MAX = np.float32(3.4028234663852886e38)
_M32 = 0xFFFFFFFF


@register_jitable
def bits32(x):
    return np.float32(x).view(np.uint32)


@register_jitable
def widen(u):
    """bfloat16 bits -> float32."""
    return np.uint32(np.uint32(u) << np.uint32(16)).view(np.float32)


@register_jitable
def round_nearest(x):
    """float32 -> bfloat16 bits, round to nearest even (NaN stays a quiet NaN)."""
    b = bits32(x)
    hi = b >> np.uint32(16)
    if x != x:
        return np.uint16(hi | np.uint32(0x40))
    return np.uint16((b + np.uint32(0x7FFF) + (hi & np.uint32(1))) >> np.uint32(16))


@register_jitable
def round_stochastic(x, r):
    """float32 -> bfloat16 bits, rounded up with probability (distance / ulp)."""
    b = bits32(x)
    if x != x:
        return np.uint16((b >> np.uint32(16)) | np.uint32(0x40))
    return np.uint16((b + np.uint32(r)) >> np.uint32(16))


@register_jitable
def split_high(x):
    """The high 16 bits of the float32 master (a NaN master: a quiet NaN)."""
    b = bits32(x)
    hi = b >> np.uint32(16)
    if x != x:
        hi = hi | np.uint32(0x40)
    return np.uint16(hi)


@register_jitable
def split_low(x):
    return np.uint16(bits32(x) & np.uint32(0xFFFF))


@register_jitable
def join(hi, lo):
    """The float32 master from its high and low 16 bits."""
    return np.uint32((np.uint32(hi) << np.uint32(16)) | np.uint32(lo)).view(np.float32)


@register_jitable
def bracket(t, x):
    """The bfloat16 bits ``t`` held between the two bfloat16 neighbours of float32
    ``x`` (Kahan's ``rn(p + y)`` carries the compensation and may land one step
    past them: clamped or renormalized ``x`` must stay inside the bounds).  A NaN
    ``x`` or ``t`` passes through."""
    b = bits32(x)
    lo = b >> np.uint32(16)                                   # toward zero
    hi = lo + (np.uint32(1) if (b & np.uint32(0xFFFF)) != np.uint32(0) else np.uint32(0))
    a = widen(lo)
    c = widen(hi)
    v = widen(t)
    down, up = (lo, hi) if a <= c else (hi, lo)
    t = np.uint16(down) if v < min(a, c) else t
    t = np.uint16(up) if v > max(a, c) else t
    return t


@register_jitable
def random16(key, e):
    """16 random bits of element ``e`` (int64) in stream ``key`` (uint32), in 32-bit
    arithmetic throughout (each product truncated to uint32: Numba would widen it to
    64 bits, which halves the vector width)."""
    U = np.uint32
    lo = U(e & 0xFFFFFFFF)
    hi = U(e >> 32)
    h = U(U(lo * U(0x9E3779B1)) + U(hi * U(0x85EBCA77)) + U(key))
    h = U(h ^ (h >> U(16)))
    h = U(h * U(0x7FEB352D))
    h = U(h ^ (h >> U(15)))
    h = U(h * U(0x846CA68B))
    h = U(h ^ (h >> U(16)))
    return U(h >> U(16))


@register_jitable
def random16_at(key, e0, i):
    """``random16(key, e0 + i)`` for a block starting at element ``e0`` (int64,
    >= 0) and an offset ``0 <= i < 2**32 - 1``, in 32-bit lanes only: with
    ``l0 = lo(e0)``, the hash input of ``e0 + i`` is ``h0 + i * 0x9E3779B1``
    (mod 2**32), ``h0`` the input of ``e0``, plus ``0x85EBCA77`` where the low
    word carries into the high one (``i >= 2**32 - l0``).  The per-block terms
    are loop-invariant (hoisted) and the per-element ones 32-bit, so LLVM keeps
    16 lanes per AVX-512 vector (a 64-bit element index halved them): the
    stochastic store of the dense blocks costs 0.09 instead of 0.14 ns per element
    (docs/low-precision.md).  Bit for bit ``random16``."""
    U = np.uint32
    l0 = U(e0 & 0xFFFFFFFF)
    h0 = U(U(U(l0 * U(0x9E3779B1)) + U(U(e0 >> 32) * U(0x85EBCA77))) + U(key))
    iw = min(np.int64(0x100000000) - np.int64(l0), np.int64(0xFFFFFFFF))
    h = U(h0 + U(U(i) * U(0x9E3779B1)))
    h = U(h + (U(0x85EBCA77) if U(i) >= U(iw) else U(0)))
    h = U(h ^ (h >> U(16)))
    h = U(h * U(0x7FEB352D))
    h = U(h ^ (h >> U(15)))
    h = U(h * U(0x846CA68B))
    h = U(h ^ (h >> U(16)))
    return U(h >> U(16))


@register_jitable
def scale_inverse(s):
    """``min(1 / s, FLT_MAX)`` (``FLT_MAX`` for a zero scale)."""
    s = np.float32(s)
    if not s > 0:
        return FLT_MAX
    inv = np.float32(1.0) / s
    if inv > FLT_MAX:
        inv = FLT_MAX
    return inv


@register_jitable
def magnitude(x):
    """|x| as float32 when finite, else 0 (for the block's largest magnitude)."""
    a = abs(np.float32(x))
    if a > FLT_MAX:
        return np.float32(0.0)
    if a != a:
        return np.float32(0.0)
    return a


@register_jitable
def magnitude_bits(x):
    """The bits of |x| as float32 (an int32) when finite, else 0: for non-negative
    floats the bit patterns order like the values, so a block's largest magnitude
    is a signed integer max (which vectorizes; a float max with NaN rules does
    not)."""
    b = np.int32(bits32(x) & np.uint32(0x7FFFFFFF))
    return b if b < np.int32(0x7F800000) else np.int32(0)


@register_jitable
def from_bits(b):
    return np.int32(b).view(np.float32)


# The 8-bit codecs are written as straight-line code with selects (no early
# returns): LLVM vectorizes them inside the driver loops.

@register_jitable
def encode_signed(x, inv):
    x = np.float32(x)
    a = abs(x)
    y = np.sqrt(a * inv) * np.float32(126.0)
    q = min(np.floor(y + np.float32(0.5)), np.float32(126.0))
    k = np.int32(q) if a <= FLT_MAX else np.int32(127)      # Inf: 127 (sign below)
    k = -k if x < 0 else k                                    # -Inf: -127 (byte 129)
    k = k if x == x else np.int32(-128)                       # NaN: byte 128
    return np.uint8(k & np.int32(255))


@register_jitable
def decode_signed(c, s):
    k = np.int32(np.int8(c))                  # the byte as a signed code
    w = np.float32(k)
    x = (w * abs(w)) * K2 * np.float32(s)
    x = np.float32(np.inf) if k == np.int32(127) else x
    x = np.float32(-np.inf) if k == np.int32(-127) else x
    x = np.float32(np.nan) if k == np.int32(-128) else x
    return x


@register_jitable
def encode_unsigned(x, inv):
    x = np.float32(x)
    y = np.sqrt(np.sqrt(x * inv)) * np.float32(253.0)
    q = min(max(np.floor(y + np.float32(0.5)), np.float32(1.0)), np.float32(253.0))
    k = np.int32(q) if x > 0 else np.int32(0)                # x <= 0 (and -Inf): 0
    k = np.int32(254) if x > FLT_MAX else k                   # +Inf
    k = k if x == x else np.int32(255)                        # NaN
    return np.uint8(k)


@register_jitable
def decode_unsigned(c, s):
    k = np.int32(c)
    w = np.float32(k)
    w2 = w * w
    x = (w2 * w2) * K4 * np.float32(s)
    x = np.float32(np.inf) if k == np.int32(254) else x
    x = np.float32(np.nan) if k == np.int32(255) else x
    return x


# Finite-only twins of the 8-bit codecs: the same arithmetic without the special
# codes (bit for bit equal to the above on finite values and normal codes).  The
# drivers use them for blocks without non-finite values, which is nearly always:
# the special-code selects cost as much as the rest of the codec.

@register_jitable
def encode_signed_finite(x, inv):
    x = np.float32(x)
    y = np.sqrt(abs(x) * inv) * np.float32(126.0)
    k = np.int32(min(np.floor(y + np.float32(0.5)), np.float32(126.0)))
    k = -k if x < 0 else k
    return np.uint8(k & np.int32(255))


@register_jitable
def decode_signed_finite(c, s):
    w = np.float32(np.int32(np.int8(c)))
    return (w * abs(w)) * K2 * np.float32(s)


@register_jitable
def encode_unsigned_finite(x, inv):
    x = np.float32(x)
    y = np.sqrt(np.sqrt(x * inv)) * np.float32(253.0)
    q = min(max(np.floor(y + np.float32(0.5)), np.float32(1.0)), np.float32(253.0))
    k = np.int32(q) if x > 0 else np.int32(0)
    return np.uint8(k)


@register_jitable
def decode_unsigned_finite(c, s):
    w = np.float32(np.int32(c))
    w2 = w * w
    return (w2 * w2) * K4 * np.float32(s)


@register_jitable
def special_signed(c):
    """A special code (+Inf 127, NaN 128, -Inf 129) of the signed code."""
    return np.int32((np.int32(c) - np.int32(127)) & np.int32(255)) <= np.int32(2)


@register_jitable
def special_unsigned(c):
    return np.int32(c) >= np.int32(254)


# Block scans for special codes as byte min/max reductions (64 codes per AVX-512
# instruction; an int32 compare-and-max per code cost 0.06 ns per element of a
# 2-slot Adam step, a fifth of the codec, measured in docs/low-precision.md):
# a signed code c is special iff the byte (c + 129) mod 256 is below 3
# (127, 128, 129 -> 0, 1, 2); an unsigned code iff c >= 254.

@register_jitable
def special_rank_signed(c):
    """The byte ``(c + 129) mod 256``: below 3 exactly for the special codes."""
    return np.uint8((np.uint32(c) + np.uint32(129)) & np.uint32(255))


@register_jitable
def block_has_special_signed(T, m):
    """Whether the signed codes ``T[:m]`` hold a special code (a byte-min reduction)."""
    k = np.uint8(255)
    for i in range(m):
        k = min(k, special_rank_signed(T[i]))
    return k < np.uint8(3)


@register_jitable
def block_has_special_unsigned(T, m):
    """Whether the unsigned codes ``T[:m]`` hold a special code (a byte-max reduction)."""
    k = np.uint8(0)
    for i in range(m):
        k = max(k, np.uint8(T[i]))
    return k >= np.uint8(254)
