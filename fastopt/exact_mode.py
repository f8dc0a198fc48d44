"""The exact-mode tracker: which rows of which parameters are behind, and by how much.

In ``sparse_mode="exact"`` a sparse step must give the result of a dense step
whose gradient is zero on the untouched rows.  Rather than touching every row,
the optimizer records per parameter the step each row is up to date with; when a
row is next touched (or on :meth:`flush`) it is brought up to date by the rule's
closed form for the skipped steps (``rule.catch_up``: a 2x2 linear map of
``(param, slot 0)`` raised to the number of skipped steps, formed in float64),
fused into the row driver right before the row's update.

The hyperparameters must stay fixed between a row's updates: when they change,
every pending row is first brought up to date with the old ones (a dense pass), so
a per-step scheduler makes exact mode as expensive as a dense step.  The result
equals the dense trajectory up to floating-point rounding.
"""

import numpy as np

from .backends.base import CatchUp


class ExactTracker:
    def __init__(self):
        self.rows = {}     # param index -> {"row_step", "buffer_start", "spec", "scalars"}

    def __bool__(self):
        return bool(self.rows)

    def info(self, i, nrows, step, spec):
        ex = self.rows.get(i)
        if ex is None:
            ex = self.rows[i] = {"row_step": np.full(nrows, step, np.int64),
                                 "buffer_start": 0, "spec": spec}
        return ex

    def pending(self, i, t_end, scalars_fn):
        """A callable ``uniq -> CatchUp or None`` for the rows of parameter ``i``
        that are behind step ``t_end``; ``scalars_fn(group, t_end)`` gives the float64
        scalar row of the skipped steps."""
        ex = self.rows.get(i)

        def catch(uniq):
            if ex is None:
                return None
            last = ex["row_step"][uniq]
            if not (last < t_end).any():
                return None
            group = ex["spec"].group
            return CatchUp(last=last, t_end=int(t_end), buffer_start=ex["buffer_start"],
                           group=group, scalars=scalars_fn(group, t_end))
        return catch

    def behind(self, i, t_end):
        """Rows of parameter ``i`` behind step ``t_end`` (int64), or an empty array."""
        ex = self.rows.get(i)
        if ex is None:
            return np.zeros(0, np.int64)
        return np.flatnonzero(ex["row_step"] < t_end).astype(np.int64)

    def mark(self, i, rows, step):
        self.rows[i]["row_step"][rows] = step

    def mark_all(self, i, step, spec=None):
        ex = self.rows.get(i)
        if ex is not None:
            ex["row_step"][:] = step
            if spec is not None:
                ex["spec"] = spec

    def clear(self):
        self.rows = {}
