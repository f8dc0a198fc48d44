"""Load and store functions of a :class:`~fastopt.storage.Storage`, for the Numba
drivers (CPU and CUDA): chosen once per configuration, so a format costs no branch
in the element loop.  All work on flat arrays and a flat element index ``e``.

* ``load_param(P, A, e)`` -> the parameter in the compute dtype (``A``: the aux
  array, ``master_low`` or ``kahan_comp``);
* ``store_param(P, A, e, x, old, key)`` writes ``x`` (``old``: the loaded value,
  for Kahan; ``key``: the stochastic-rounding stream);
* ``store_param_at(P, A, i, x, old, key, e)``: the same on views of a block
  (``P[i]`` is element ``e`` of the tensor: the random stream is indexed by ``e``).
  The CPU drivers index views of a block from 0, which lets LLVM vectorize (an
  index ``lo + i`` of unknown sign keeps Numba's negative-index wraparound in the
  loop, and the loop scalar);
* ``store_param_block(P, A, i, x, old, key, e0)``: the same with the block's first
  element ``e0`` (the random bits of ``e0 + i`` drawn in 32-bit lanes);
* ``load_grad(G, e)``;
* per state slot ``load_state(S, e, scale)`` and ``store_state(S, e, x)``;
  8-bit slots are stored block by block by the driver with ``encode(x, inv)``.
"""

import numpy as np

from .._jit import numba as _numba, register_jitable

_numba()   # a kernel module: numba now (and the registrations pending in fastopt._jit)

from . import codecs as C
from . import kernel_dtypes


def _native_param():
    @register_jitable
    def load(P, A, e):
        return P[e]

    @register_jitable
    def store(P, A, e, x, old, key):
        P[e] = x
    return load, store


def _bf16_param(update, CT):
    @register_jitable
    def load_widen(P, A, e):
        return CT(C.widen(P[e]))

    if update == "split":
        @register_jitable
        def load(P, A, e):
            return CT(C.join(P[e], A[e]))

        @register_jitable
        def store(P, A, e, x, old, key):
            P[e] = C.split_high(x)
            A[e] = C.split_low(x)
        return load, store
    if update == "kahan":
        @register_jitable
        def store(P, A, e, x, old, key):
            u = np.float32(x) - np.float32(old)
            y = C.widen(A[e]) + u
            t = C.bracket(C.round_nearest(np.float32(old) + y), np.float32(x))
            P[e] = t
            A[e] = C.round_nearest(y - (C.widen(t) - np.float32(old)))
        return load_widen, store
    if update == "stochastic":
        @register_jitable
        def store(P, A, e, x, old, key):
            P[e] = C.round_stochastic(x, C.random16(key, e))
        return load_widen, store
    if update == "nearest":
        @register_jitable
        def store(P, A, e, x, old, key):
            P[e] = C.round_nearest(x)
        return load_widen, store
    raise ValueError(update)


def param_io(storage, CT):
    if storage.param == "bfloat16":
        return _bf16_param(storage.update, CT)
    return _native_param()


def param_store_at(storage, CT):
    """``store_param_at(P, A, i, x, old, key, e)`` (see the module docstring)."""
    if storage.param == "bfloat16" and storage.update == "stochastic":
        @register_jitable
        def store_at(P, A, i, x, old, key, e):
            P[i] = C.round_stochastic(x, C.random16(key, e))
        return store_at
    STORE = param_io(storage, CT)[1]

    @register_jitable
    def store_at(P, A, i, x, old, key, e):
        STORE(P, A, i, x, old, key)
    return store_at


def param_store_block(storage, CT):
    """``store_param_block(P, A, i, x, old, key, e0)``: ``store_param_at`` for
    element ``i`` of a block view whose first element is element ``e0`` of the
    tensor (the CPU dense blocks): the stochastic stream is drawn with
    :func:`~fastopt.storage.codecs.random16_at` (32-bit lanes, bit for bit the
    stream of ``e0 + i``)."""
    if storage.param == "bfloat16" and storage.update == "stochastic":
        @register_jitable
        def store_block(P, A, i, x, old, key, e0):
            P[i] = C.round_stochastic(x, C.random16_at(key, e0, i))
        return store_block
    STORE = param_io(storage, CT)[1]

    @register_jitable
    def store_block(P, A, i, x, old, key, e0):
        STORE(P, A, i, x, old, key)
    return store_block


def grad_loader(kind, CT):
    """``kind``: "native" (the compute dtype), "float32" or "bfloat16"."""
    if kind == "bfloat16":
        @register_jitable
        def load(G, e):
            return CT(C.widen(G[e]))
    else:
        @register_jitable
        def load(G, e):
            return CT(G[e])
    return load


def state_io(storage, slot, CT):
    """(load, store, encode) of state slot ``slot``; ``encode`` only for 8-bit."""
    kind = storage.state
    if kind in ("native", "float32"):
        @register_jitable
        def load(S, e, scale):
            return CT(S[e])

        @register_jitable
        def store(S, e, x):
            S[e] = x
        return load, store, None
    if kind == "bfloat16":
        @register_jitable
        def load(S, e, scale):
            return CT(C.widen(S[e]))

        @register_jitable
        def store(S, e, x):
            S[e] = C.round_nearest(x)
        return load, store, None
    load, _, encode, _, _ = q8_pieces(storage, slot, CT)

    @register_jitable
    def store(S, e, x):          # never called: 8-bit blocks are encoded by the driver
        pass
    return load, store, encode


#: element dtypes of (param, grad, state, aux) arrays as the kernels see them
dtypes = kernel_dtypes


def q8_pieces(storage, slot, CT):
    """The 8-bit pieces of state slot ``slot``: ``(load, load_finite, encode,
    encode_finite, is_special)`` (see :mod:`fastopt.storage.codecs`)."""
    signed = storage.signed[slot] if slot < len(storage.signed) else True
    DEC = C.decode_signed if signed else C.decode_unsigned
    DECF = C.decode_signed_finite if signed else C.decode_unsigned_finite

    @register_jitable
    def load(S, e, scale):
        return CT(DEC(S[e], scale))

    @register_jitable
    def load_finite(S, e, scale):
        return CT(DECF(S[e], scale))
    return (load, load_finite,
            C.encode_signed if signed else C.encode_unsigned,
            C.encode_signed_finite if signed else C.encode_unsigned_finite,
            C.special_signed if signed else C.special_unsigned)
