"""The matrix phase of the matrix rules on host arrays (every CPU backend): element
phase 1 on whole NumPy arrays, then ``rule.matrix`` (Muon: Newton-Schulz through
NumPy's matmul, i.e. BLAS), one tensor at a time (BLAS threads within each matrix).
See :mod:`fastopt.matrix_phase`."""

import numpy as np

from .base import data_address


def run_matrix(work, groups):
    rule = work.config.rule
    dt = np.dtype(work.config.dtype)
    t_ = dt.type
    n = len(rule.Scalars._fields)
    out = []
    with np.errstate(all="ignore"):       # NaN/Inf propagate silently, as in the kernels
        for t, g in enumerate(work.grads):
            c = rule.Scalars(*(t_(v) for v in work.hyper[work.hidx[t]][:n].tolist()))
            buf = work.slots[t][0]
            new_buf, u = rule.phase1(g, buf, c)
            buf[...] = new_buf
            o = rule.matrix(np.asarray(buf if u is new_buf else u, dtype=dt),
                            groups[t], dt)
            out.append(o)
            work.ptrs[t, 1] = data_address(o)
    work.grads = out
