"""The norm pass of per-tensor rules (``Rule.layout == "tensor"``: LAMB, LARS) on the
Numba CPU backend.

:func:`make_norms_driver` loops over a dense bucket's chunks like the update driver
(one parallel region, ``prange`` over chunks) and, per element, applies the fused
pre-processing of the gradient (``grad_scale``, ``clip_value``) and the rule's
``norms`` function, which returns the two quantities whose L2 norms the rule needs
(computed from the same inputs, in the same dtype, as its update).  Their squares
are summed in float64, per chunk in element order; the chunk sums are then added
per tensor in chunk order, serially: the result is the same whatever the number of
threads.  Nothing is written but the (tensors, 2) float64 result.
"""

import numpy as np

from numba import carray, prange

from ..rules.fused import pre
from .element import scalar_loader
from .numba_cpu import _compile, _stamp, _voidptr

_NORMS = {}


def make_norms_driver(config, parallel):
    """The norm-pass driver of one configuration (a closure over the rule's
    ``norms``, the dtype, the used slots and the gradient switches)."""
    NORMS = config.rule.norms
    LOAD = scalar_loader(config.rule.Scalars, config.dtype, config.fixed)
    DT = np.dtype(config.dtype).type
    ITEM = np.dtype(config.dtype).itemsize
    U0, U1, U2 = (bool(u) for u in config.uses)
    SC, CL = bool(config.switches[0]), bool(config.switches[1])
    STAMP = _stamp(NORMS)
    PARALLEL = bool(parallel)

    def norms_driver(ptrs, chunks, hyper, hidx, out):
        stamp = STAMP  # noqa: F841  (the rule's source hash, in the cache key)
        par = PARALLEL  # noqa: F841
        nc = chunks.shape[0]
        part = np.zeros((nc, 2), dtype=np.float64)
        zero = DT(0)
        for ci in prange(nc):
            t = chunks[ci, 0]
            lo = chunks[ci, 1]
            n = chunks[ci, 2] - lo
            c = LOAD(hyper, hidx[t])
            off = lo * ITEM
            P = carray(_voidptr(ptrs[t, 0] + off), (n,), DT)
            G = carray(_voidptr(ptrs[t, 1] + off), (n,), DT)
            S0 = carray(_voidptr(ptrs[t, 2] + off), (n,), DT)
            S1 = carray(_voidptr(ptrs[t, 3] + off), (n,), DT)
            S2 = carray(_voidptr(ptrs[t, 4] + off), (n,), DT)
            a = 0.0
            b = 0.0
            for i in range(n):
                s0 = S0[i] if U0 else zero
                s1 = S1[i] if U1 else zero
                s2 = S2[i] if U2 else zero
                g = pre(G[i], c, SC, CL)
                x, y = NORMS(P[i], g, s0, s1, s2, c)
                fx = np.float64(x)
                fy = np.float64(y)
                a += fx * fx
                b += fy * fy
            part[ci, 0] = a
            part[ci, 1] = b
        out[:, :] = 0.0
        for ci in range(nc):
            t = chunks[ci, 0]
            out[t, 0] += part[ci, 0]
            out[t, 1] += part[ci, 1]

    return _compile(norms_driver, parallel)


def run_norms(work, chunks, parallel):
    """The per-tensor sums of squares of a :class:`~fastopt.backends.base.DenseWork`
    over its element chunk table ``chunks`` (``Backend.element_chunks``)."""
    out = np.zeros((len(work.params), 2), dtype=np.float64)
    if work.nelem:
        key = (work.config, bool(parallel))
        d = _NORMS.get(key)
        if d is None:
            d = _NORMS[key] = make_norms_driver(work.config, parallel)
        d(work.ptrs, chunks, work.hyper, work.hidx, out)
    return out
