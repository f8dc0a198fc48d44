"""The ``"numpy"`` backend: the reference semantics, run with whole-array NumPy.

Slow and obviously right: each tensor goes through its rule's NumPy reference
(``rule.reference``) with the fused options applied around it
(:func:`fastopt.rules.fused.np_pre` / :func:`~fastopt.rules.fused.np_post`).  A
sparse step coalesces the gradient rows and runs the reference on the touched rows
only (lazy); exact mode *defines* the catch-up by running the skipped steps with
zero gradients through the dense reference, step by step (no closed form), so it
is the oracle the compiled backends' closed forms are tested against.
"""

from dataclasses import replace

import numpy as np

from .. import storage
from ..rules import fused
from ..sparse import coalesce
from ..storage import reference as fmt
from .base import FMT_BASE, FMT_KEY, Backend


class NumpyBackend(Backend):
    name = "numpy"
    #: the work items carry (group, step, state dict, fresh) for the references
    wants_reference_args = True

    def run_dense(self, work):
        if not work.config.storage.native:
            self._run_stored_dense(work)
            return
        rule = work.config.rule
        with np.errstate(all="ignore"):   # NaN/Inf propagate silently, as in the kernels
            for p, g, (group, step, state, fresh) in zip(work.params, work.grads, work.ref):
                rule.reference(p, fused.np_pre(g, group, work.grad_scale), state, group,
                               step, fresh)
                fused.np_post(p, group)

    def _catch_up(self, work):
        rule = work.config.rule
        ct = work.catch
        p = work.param
        nrows = p.shape[0]
        p2 = _rows2d(p, nrows)
        names = [n for n, u in zip(rule.slots, work.config.uses) if u]
        arrays = {n: _rows2d(s, nrows)
                  for n, s in zip(rule.slots, work.slots) if s is not None}
        for last in np.unique(ct.last):
            rows = work.uniq[ct.last == last]
            sub = p2[rows]
            st = {n: arrays[n][rows] for n in names}
            zero = np.zeros_like(sub)
            with np.errstate(all="ignore"):
                for step in range(int(last) + 1, ct.t_end + 1):
                    fresh = {"momentum_buffer"} if step == ct.buffer_start else set()
                    rule.reference(sub, zero, st, ct.group, step, fresh)
            p2[rows] = sub
            for n in names:
                arrays[n][rows] = st[n]

    def run_rows(self, work):
        """Catch up (exact mode), then coalesce and apply the dense reference to the
        touched rows (and their state) only."""
        if not work.config.storage.native:
            self._run_stored_rows(work)
            return
        if work.catch is not None:
            self._catch_up(work)
        if work.vals is None:
            return
        rule = work.config.rule
        nrows = work.param.shape[0]
        uniq, summed = coalesce(work.idx, work.vals, nrows)
        group, step, state, fresh = work.ref
        p2 = _rows2d(work.param, nrows)
        rows = p2[uniq]
        st = {k: (_rows2d(v, nrows)[uniq] if isinstance(v, np.ndarray) else v)
              for k, v in state.items()}
        with np.errstate(all="ignore"):
            rule.reference(rows, fused.np_pre(summed, group, work.grad_scale), st, group, step,
                           fresh)
            fused.np_post(rows, group)
        p2[uniq] = rows
        for k, v in state.items():
            if isinstance(v, np.ndarray):
                _rows2d(v, nrows)[uniq] = st[k]
            else:
                state[k] = st[k]

    # ------------------------------------------------------------ stored formats
    #
    # A stored format is defined by decoding everything into the compute dtype,
    # running the float reference above, and encoding what the step changed
    # (fastopt.storage.reference defines each encoding).

    def _run_stored_dense(self, work):
        cfg = work.config
        for t, (p, g, (group, step, state, fresh)) in enumerate(
                zip(work.params, work.grads, work.ref)):
            key = int(work.fmt[t, FMT_KEY])
            base = int(work.fmt[t, FMT_BASE])
            extras = work.extras[t]
            P, dec = _decode(cfg, p, extras, state)
            old = P.copy()
            G = fmt.widen(fmt.bits(g)) if g.dtype.itemsize == 2 else g
            G = G.astype(P.dtype)
            if cfg.storage.param == "bfloat16":
                group = storage.bf16_group(group, cfg.storage.update)
            work1 = replace(work, params=[P], grads=[G], ref=[(group, step, dec, fresh)],
                            config=replace(cfg, storage=storage.NATIVE, dtype=P.dtype))
            self.run_dense(work1)
            _encode(cfg, p, extras, state, P, old, dec, key, None, base)

    def _run_stored_rows(self, work):
        cfg = work.config
        group, step, state, fresh = work.ref
        if cfg.storage.param == "bfloat16":
            group = storage.bf16_group(group, cfg.storage.update)
        P, dec = _decode(cfg, work.param, work.extras, state)
        old = P.copy()
        slots = [dec[n] if u else None for n, u in
                 zip(cfg.rule.slots + (None,) * (3 - len(cfg.rule.slots)), cfg.uses)]
        vals = work.vals.astype(P.dtype) if work.vals is not None else None
        work1 = replace(work, param=P, slots=slots, vals=vals, ref=(group, step, dec, fresh),
                        config=replace(cfg, storage=storage.NATIVE, dtype=P.dtype))
        self.run_rows(work1)
        _encode(cfg, work.param, work.extras, state, P, old, dec, work.key, work.uniq,
                work.base)


def _rows2d(a, nrows):
    """``a`` as (nrows, rest); a parameter with no rows (or no columns) included,
    where ``reshape(nrows, -1)`` cannot infer the rest."""
    return a.reshape(nrows, a.size // nrows if nrows else 0)


def _decode(cfg, p, extras, state):
    """The parameter and the used state slots in the compute dtype (copies)."""
    st = cfg.storage
    ct = np.dtype(cfg.compute_dtype)
    if st.param == "bfloat16":
        if st.update == "split":
            P = fmt.join(fmt.bits(p), extras[0]).reshape(p.shape)
        else:
            P = fmt.widen(fmt.bits(p)).reshape(p.shape)
    else:
        P = p.copy()
    P = P.astype(ct)
    dec = {}
    for k, name in enumerate(cfg.rule.slots):
        if name not in state:
            continue
        a = state[name]
        if st.state == "q8":
            x = fmt.q8_decode(a, extras[1 + k], a.shape, st.signed[k])
        elif st.state == "bfloat16":
            x = fmt.widen(fmt.bits(a)).reshape(a.shape)
        else:
            x = a
        dec[name] = np.array(x, dtype=ct)
    for k, v in state.items():
        if k not in dec:
            dec[k] = v
    return P, dec


def _encode(cfg, p, extras, state, P, old, dec, key, rows, base=0):
    """Store the new parameter ``P`` (``old``: its value before the step) and state
    ``dec`` in their formats; ``rows``: only those rows (first axis) changed;
    ``base``: the element base of stochastic rounding (``DenseWork.fmt``)."""
    st = cfg.storage
    nrows = p.shape[0] if p.ndim else 1
    D = p.size // nrows if nrows else 0

    def sel(a):
        a2 = a.reshape(nrows, D)
        return a2 if rows is None else a2[rows]

    def put(dst, src):
        d2 = _rows2d(dst, nrows)
        if rows is None:
            d2[...] = src.reshape(d2.shape)
        else:
            d2[rows] = src
    new, was = sel(P), sel(old)
    if st.param == "bfloat16":
        pb = fmt.bits(p)
        x = new.astype(np.float32)
        if st.update == "split":
            hi, lo = fmt.split(x)
            put(extras[0], lo)
        elif st.update == "kahan":
            w = was.astype(np.float32)
            comp = fmt.widen(sel(fmt.bits(extras[0])))
            y = comp + (x - w)
            hi = fmt.bracket(fmt.round_nearest(w + y), x)
            put(fmt.bits(extras[0]), fmt.round_nearest(y - (fmt.widen(hi) - w)))
        elif st.update == "stochastic":
            e = np.arange(base, base + nrows * D, dtype=np.int64).reshape(nrows, D)
            e = e if rows is None else e[rows]
            hi = fmt.round_stochastic(x, fmt.random16(key, e))
        else:
            hi = fmt.round_nearest(x)
        put(pb, hi)
    else:
        put(p, new)
    for k, name in enumerate(cfg.rule.slots):
        if name not in state or not isinstance(state[name], np.ndarray):
            continue
        a = state[name]
        if st.state in ("native", "float32"):    # exact round trip: store it all
            a[...] = dec[name].astype(a.dtype)
            continue
        x = sel(dec[name])
        if st.state == "q8":
            nb = storage.q8_blocks(a.shape)[1]
            shape = a.shape if rows is None else (len(rows), D)
            codes, sc = fmt.q8_encode(x.reshape(shape), shape, st.signed[k])
            put(a, codes.reshape(shape[0], D))
            if rows is None:
                extras[1 + k][...] = sc
            else:
                where = (np.asarray(rows)[:, None] * nb + np.arange(nb)).reshape(-1)
                extras[1 + k][where] = sc
        elif st.state == "bfloat16":
            put(fmt.bits(a), fmt.round_nearest(x.astype(np.float32)))
