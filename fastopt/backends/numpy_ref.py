"""The ``"numpy"`` backend: the reference semantics, run with whole-array NumPy.

Slow and obviously right: each tensor goes through its rule's NumPy reference
(``rule.reference``) with the fused options applied around it
(:func:`fastopt.rules.fused.np_pre` / :func:`~fastopt.rules.fused.np_post`).  A
sparse step coalesces the gradient rows and runs the reference on the touched rows
only (lazy); exact mode *defines* the catch-up by running the skipped steps with
zero gradients through the dense reference, step by step (no closed form), so it
is the oracle the compiled backends' closed forms are tested against.
"""

import numpy as np

from ..rules import fused
from ..sparse import coalesce
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"
    #: the work items carry (group, step, state dict, fresh) for the references
    wants_reference_args = True

    def run_dense(self, work):
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
        p2 = p.reshape(nrows, -1)
        names = [n for n, u in zip(rule.slots, work.config.uses) if u]
        arrays = {n: s.reshape(nrows, -1)
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
        if work.catch is not None:
            self._catch_up(work)
        if work.vals is None:
            return
        rule = work.config.rule
        nrows = work.param.shape[0]
        uniq, summed = coalesce(work.idx, work.vals, nrows)
        group, step, state, fresh = work.ref
        p2 = work.param.reshape(nrows, -1)
        rows = p2[uniq]
        st = {k: (v.reshape(nrows, -1)[uniq] if isinstance(v, np.ndarray) else v)
              for k, v in state.items()}
        with np.errstate(all="ignore"):
            rule.reference(rows, fused.np_pre(summed, group, work.grad_scale), st, group, step,
                           fresh)
            fused.np_post(rows, group)
        p2[uniq] = rows
        for k, v in state.items():
            if isinstance(v, np.ndarray):
                v.reshape(nrows, -1)[uniq] = st[k]
            else:
                state[k] = st[k]
