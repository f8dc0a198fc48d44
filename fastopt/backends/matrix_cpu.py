"""The matrix phase of the matrix rules on host arrays (every CPU backend): element
phase 1 on whole NumPy arrays, then ``rule.matrix`` (Muon: Newton-Schulz through
NumPy's matmul, i.e. BLAS), one tensor at a time (BLAS threads within each matrix).
See :mod:`fastopt.matrix_phase`.

Stored formats (bfloat16 parameters, 16/8-bit state): phase 1 decodes the gradient
(bfloat16 gradients widened) and the momentum buffer (bfloat16 widened; 8-bit codes
with their block scales) with the formats' NumPy definitions
(:mod:`fastopt.storage.reference`), computes in the compute dtype (float32, or
float64 for float64 parameters) and encodes the new buffer back (round to nearest
even; 8-bit: new block scales, then codes); the matrix phase's output is a scratch
array in the compute dtype.  Phase 2 (the stored dense driver) loads the buffer it
does not change and stores it again: decoding and encoding an encoded value gives
it back (bfloat16 exactly; 8-bit: the block's largest code decodes to its scale,
so the scale and every code come back), so the buffer is quantized once per step,
as in the reference.  The parameter is loaded and stored in phase 2 with its
``bf16_update`` mode.
"""

import numpy as np

from .base import data_address


def _decode(storage, a, scale, ct):
    """A state array of ``storage`` as an array of the compute dtype ``ct``."""
    from ..storage import reference as R
    if storage.state == "q8":
        return R.q8_decode(a, scale, a.shape, storage.signed[0]).astype(ct, copy=False)
    if storage.state == "bfloat16":
        return R.widen(R.bits(a)).reshape(a.shape).astype(ct, copy=False)
    return np.asarray(a, dtype=ct)


def _encode(storage, a, scale, x):
    """Store ``x`` into the state array ``a`` (and its 8-bit block ``scale``)."""
    from ..storage import reference as R
    if storage.state == "q8":
        codes, s = R.q8_encode(x, a.shape, storage.signed[0])
        a[...] = codes
        scale[...] = s
    elif storage.state == "bfloat16":
        R.bits(a)[...] = R.round_nearest(np.asarray(x, dtype=np.float32))
    else:
        a[...] = x


def run_matrix(work, groups):
    rule = work.config.rule
    st = work.config.storage
    stored = not st.native
    dt = np.dtype(work.config.compute_dtype)
    t_ = dt.type
    n = len(rule.Scalars._fields)
    out = []
    with np.errstate(all="ignore"):       # NaN/Inf propagate silently, as in the kernels
        for t, g in enumerate(work.grads):
            c = rule.Scalars(*(t_(v) for v in work.hyper[work.hidx[t]][:n].tolist()))
            buf = work.slots[t][0]
            if stored:
                from ..storage import reference as R
                scale = work.extras[t][1] if work.extras[t] is not None else None
                if g.dtype.itemsize == 2:           # bfloat16 gradient bits, widened
                    g = R.widen(R.bits(g)).reshape(g.shape)
                g = np.asarray(g, dtype=dt)
                b = _decode(st, buf, scale, dt)
                new_buf, u = rule.phase1(g, b, c)
                _encode(st, buf, scale, new_buf)
                u = new_buf if u is new_buf else u
            else:
                new_buf, u = rule.phase1(g, buf, c)
                buf[...] = new_buf
                u = buf if u is new_buf else u
            o = rule.matrix(np.asarray(u, dtype=dt), groups[t], dt)
            out.append(o)
            work.ptrs[t, 1] = data_address(o)
    work.grads = out
    if stored and out:
        # phase 2 reads o, in the compute dtype, in the gradient's place
        from ..planner import grad_kind
        work.config = work.config.with_grad(grad_kind(st, out[0]))
