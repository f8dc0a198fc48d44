"""Consolidated state dicts, loading (re-sharding from any world size) and the
rollback hooks of :mod:`fastopt.checkpoint` (see the package docstring,
"Checkpoints")."""

import numbers

import numpy as np

from .. import state_io, storage
from .agreement import _loaded_digests
from .errors import DistributedError, StateDictMismatchError
from .layout import _dtype_of, _dtype_token, _wire

#: largest point-to-point message when consolidating state (bytes)
_CHUNK_BYTES = 1 << 28


class Checkpoints:
    """The state dicts of :class:`~fastopt.distributed.ShardedOptimizer` (a mixin)."""

    def consolidated_state_dict(self, to=0):
        """Collective: the plain class's ``state_dict()`` of the whole optimizer on
        rank ``to`` (None on the other ranks).  In exact sparse mode every row is
        first brought up to date on every rank, as ``state_dict()`` does.  After it,
        ``state_dict()`` on rank ``to`` returns the same dict (for
        :func:`fastopt.save`) until the next step."""
        with self._lock:
            err, digest = None, None
            try:
                if isinstance(to, bool) or not isinstance(to, numbers.Integral) \
                        or not 0 <= to < self._size:
                    raise ValueError(f"Invalid to={to!r}: a rank in [0, {self._size})")
                digest = self._sync_groups()
            except Exception as e:
                err = e
            self._agree("consolidated_state_dict", err, (to if err is None else None, digest))
            return self._consolidate(int(to))

    def _consolidate(self, to):
        comm, me, N = self._comm, self._rank, self._size
        if self.sparse_mode == "exact":
            self._inner.flush()
            self._gather_all_params()
        local = self._inner.state
        meta = {i: {k: (("a", _dtype_token(v.dtype)) if isinstance(v, np.ndarray)
                        else ("s", v))
                    for k, v in st.items()} for i, st in local.items()}
        metas = comm.allgather(meta)
        if any(m != metas[0] for m in metas):
            raise DistributedError("internal error: the ranks' shards of the state are out of "
                                   "step (different step counts or state names)")
        out = {}
        for i in sorted(metas[0]):
            entry = {}
            p = self._params[i]
            for k, (kind, v) in metas[0][i].items():
                if kind == "s":
                    entry[k] = v
                    continue
                shape = self._state_shape(i, k)
                # (a factored rule's slots of a parameter without elements, col_var
                # (1, C) of a (0, C) matrix, are on no rank: the zeros the single
                # process allocates; every other element is received below)
                full = (np.zeros if self.rule.factored else np.empty)(
                    shape, dtype=_dtype_of(v)) if me == to else None
                for r in range(N):
                    lo, hi = self._state_range(i, k, r)
                    if hi == lo:
                        continue
                    if me == to:
                        dst = full.reshape(-1)[lo:hi]
                        if r == me:
                            dst[...] = local[i][k].reshape(-1)
                        else:
                            self._recv_chunks(dst, r)
                    elif r == me:
                        self._send_chunks(local[i][k].reshape(-1), to)
                entry[k] = full
            out[i] = entry
        if me != to:
            return None
        sd = self._state_dict_from(out)
        self._consolidated = (self._version, out)
        return sd

    def _state_kind(self, k):
        """"slot", "scale" (an 8-bit slot's block scales) or "aux" (master_low,
        kahan_comp) of a state array name."""
        if k in (storage.MASTER_LOW, storage.KAHAN_COMP):
            return "aux"
        if k.endswith(storage.SCALE_SUFFIX) and k[:-len(storage.SCALE_SUFFIX)] in \
                self.rule.slots:
            return "scale"
        return "slot"

    def _state_shape(self, i, k):
        """The shape of state array ``k`` of the whole parameter ``i``."""
        p = self._params[i]
        kind = self._state_kind(k)
        if kind == "aux":
            return p.shape
        shape = self.rule.slot_shape(p.shape, k)
        if kind == "scale":
            r, nb, _ = storage.q8_blocks(shape)
            return (r * nb,)
        return shape

    def _state_range(self, i, k, r):
        """``[lo, hi)``: the flat elements of the whole parameter's state array ``k``
        that rank ``r``'s piece holds.  Slots and aux arrays: the piece's rows.
        8-bit scales: the blocks of those rows (a 1-D parameter is one row cut at
        block multiples, so its pieces' blocks are the whole parameter's).  A
        factored rule's slots (``row_var``, ``col_var``, ``variance``, whose shapes
        are not the parameter's): all of them on the rank that owns the whole
        parameter, none elsewhere."""
        b = self._bounds[i]
        r0, r1 = int(b[r]), int(b[r + 1])
        if r1 == r0:
            return 0, 0
        kind = self._state_kind(k)
        shape = self._params[i].shape if kind == "aux" else \
            self.rule.slot_shape(self._params[i].shape, k)
        if self.rule.factored:
            return 0, int(np.prod(shape, dtype=np.int64))
        if kind == "scale":
            if len(shape) <= 1:
                return r0 // storage.Q8_BLOCK, -(-r1 // storage.Q8_BLOCK)
            nb = storage.q8_blocks(shape)[1]
            return r0 * nb, r1 * nb
        per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) else 1
        return r0 * per_row, r1 * per_row

    def _send_chunks(self, a, dest):
        a = _wire(a)
        step = max(1, _CHUNK_BYTES // a.dtype.itemsize)
        for lo in range(0, a.shape[0], step):
            self._comm.Send([a[lo:lo + step], self._mpi(a.dtype)], dest=dest, tag=7)

    def _recv_chunks(self, a, source):
        a = _wire(a)
        step = max(1, _CHUNK_BYTES // a.dtype.itemsize)
        for lo in range(0, a.shape[0], step):
            self._comm.Recv([a[lo:lo + step], self._mpi(a.dtype)], source=source, tag=7)

    def _state_dict_from(self, state):
        groups, start = [], 0
        for g in self._template.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        sd = {"version": state_io.STATE_DICT_VERSION, "optimizer": self.rule.name,
              "state": {i: dict(st) for i, st in state.items()}, "param_groups": groups,
              "storage": state_io.storage_options(self._template)}
        if self._names is not None:
            sd["param_names"] = list(self._names)
        return sd

    def state_dict(self):
        """The full state dict on the rank that last called
        :meth:`consolidated_state_dict` as its ``to`` (if no step came since), so that
        ``fastopt.save(path, opt)`` works there.  With one rank it consolidates
        directly.  Not collective."""
        with self._lock:
            if self._size == 1:
                self._sync_groups()
                return self._consolidate_local()
            c = self._consolidated
            if c is None or c[0] != self._version:
                raise RuntimeError(
                    "ShardedOptimizer.state_dict() returns the state gathered by the last "
                    "consolidated_state_dict(to=rank) on that rank; call "
                    "opt.consolidated_state_dict(to=rank) on every rank first (the state "
                    "changed since, or this rank was not 'to')")
            self._check_group_structure()
            self._template.check_param_groups()
            return self._state_dict_from(c[1])

    def _consolidate_local(self):
        if self.sparse_mode == "exact":
            self._inner.flush()
        out = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
               for i, st in self._inner.state.items()}
        return self._state_dict_from(out)

    def load_state_dict(self, state_dict):
        """Collective: every rank passes the same full state dict (the plain class's
        format, from any world size); each rank keeps its shard.  Checked as the
        plain class checks it (optimizer, groups, names, shapes, dtypes, steps)
        before anything changes on any rank."""
        with self._lock:
            t = self._template
            saved = [{k: v for k, v in g.items() if k != "params"} for g in t.param_groups]
            err, piece_sd, summary, detail = None, None, None, None
            try:
                self._sync_groups()
                t.load_state_dict(state_dict)
                piece_sd = self._pieces_of(t.state)
                if self._size > 1:
                    # what this rank would load (arrays, steps and host scalars,
                    # every group value), canonical after the full check: equal on
                    # every rank, or nothing is loaded anywhere
                    entries, hyper, summary = _loaded_digests(t.state, t.param_groups)
                    detail = (entries, hyper)
            except Exception as e:
                err = e
            try:
                self._agree("load_state_dict", err, summary,
                            lambda sigs: self._describe_load(detail),
                            mismatch=StateDictMismatchError)
            except BaseException:
                self._restore_groups(saved)
                self._clear_template()
                raise
            self._clear_template()
            self._inner.load_state_dict(piece_sd)
            self._spec_seen = None
            self._sync_groups()
            self._version += 1
            self._consolidated = None

    def _describe_load(self, detail):
        """Which part of the state dicts differs (a second allgather: every rank is
        here, since every rank saw the same signatures)."""
        details = self._allgather_object(detail, "load_state_dict")
        e0, h0 = details[0]
        tail = ("; every rank must load the same checkpoint (a stale or partial copy on one "
                "node?); nothing was loaded on any rank")
        for r, (e, h) in enumerate(details):
            if (e, h) == (e0, h0):
                continue
            for gi, (x, y) in enumerate(zip(h0, h)):
                if x != y:
                    mine = ", ".join(f"{k}={v}" for k, _, v in sorted(set(y) - set(x)))
                    zero = ", ".join(f"{k}={v}" for k, _, v in sorted(set(x) - set(y)))
                    return (f"the state dicts differ between ranks: group {gi} has {mine} on "
                            f"rank {r} but {zero} on rank 0{tail}")
            d0 = {(i, k): (kind, v) for i, k, kind, v in e0}
            d = {(i, k): (kind, v) for i, k, kind, v in e}
            for key in sorted(set(d0) | set(d)):
                a, b = d0.get(key), d.get(key)
                if a == b:
                    continue
                i, k = key
                if a is None or b is None:
                    where, other = (r, 0) if a is None else (0, r)
                    why = f"parameter {i} has state {k!r} on rank {where} but not on rank {other}"
                elif a[0] == "array" and b[0] == "array":
                    why = (f"state {k!r} of parameter {i} differs between rank {r} and rank 0 "
                           "(different array contents)")
                else:
                    why = f"state {k!r} of parameter {i} is {b[1]} on rank {r} but {a[1]} on rank 0"
                return f"the state dicts differ between ranks: {why}{tail}"
        return f"the state dicts differ between ranks{tail}"

    def _pieces_of(self, full_state):
        """This rank's shard of a validated full state (the inner state dict)."""
        me = self._rank
        state = {}
        for i, st in full_state.items():
            piece = self._pieces[i]
            d = {}
            for k, v in st.items():
                if isinstance(v, np.ndarray):
                    lo, hi = self._state_range(i, k, me)
                    kind = self._state_kind(k)
                    shape = (hi - lo,) if kind == "scale" else piece.shape if kind == "aux" \
                        else self.rule.slot_shape(piece.shape, k)
                    if hi == lo and int(np.prod(shape, dtype=np.int64)):
                        # a factored slot of a piece without rows (``col_var`` (1, C)
                        # of an empty (0, C) piece: another rank owns the matrix): the
                        # zeros the inner optimizer allocates there, never read
                        d[k] = np.zeros(shape, dtype=v.dtype)
                    else:
                        d[k] = v.reshape(-1)[lo:hi].reshape(shape)
                else:
                    d[k] = v
            state[i] = d
        groups, start = [], 0
        for g in self._template.param_groups:
            n = len(g["params"])
            groups.append(self._inner_group(g, list(range(start, start + n))))
            start += n
        sd = {"version": state_io.STATE_DICT_VERSION, "optimizer": self.rule.name,
              "state": state, "param_groups": groups,
              "storage": state_io.storage_options(self._template)}
        return sd

    def _restore_groups(self, saved):
        for g, h in zip(self._template.param_groups, saved):
            ps = g["params"]
            g.clear()
            g.update({**h, "params": ps})
        self._template.param_groups_restored()

    def _clear_template(self):
        """Drop the state a load left in the full (template) optimizer."""
        t = self._template
        if not t.state:
            return
        groups = state_io.indexed_groups(t.param_groups)
        t.load_state_dict({"version": state_io.STATE_DICT_VERSION, "optimizer": self.rule.name,
                           "state": {}, "param_groups": groups,
                           "storage": state_io.storage_options(t)})

    # checkpoint.load rolls back through these when a scheduler fails to load
    def _capture(self):
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in self._template.param_groups]
        return groups, self._inner._capture(), self._version

    def _restore(self, captured):
        groups, inner, version = captured
        self._restore_groups(groups)
        self._inner._restore(inner)
        self._spec_seen = None
        self._version = version + 1
        self._consolidated = None
