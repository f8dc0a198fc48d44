"""The optimizer base class: param groups, validation, state, state_dict, step.

Every optimizer class is this class plus a registry :class:`~fastopt.registry.Rule`.
A step is done in two phases so that bad input changes nothing:

1. *check*: hyperparameters of every group, gradient count/keys, every gradient's
   type, shape and dtype (converting other float dtypes and non-contiguous
   gradients into contiguous arrays of the parameter's dtype);
2. *apply*: allocate missing state, compute per-step host scalars (float64), run
   the backend over each bucket, then advance step counts and host scalars.

Nothing in phase 1 writes to a parameter or to the state; nothing in phase 2 can
fail on user input.
"""

import dataclasses

import numpy as np

from . import _numba_cpu, backends, fused
from .registry import NSCALARS, NSLOTS
from .sparse import checked_rows, coalesce_plan, is_sparse

STATE_DICT_VERSION = 1
_NUMPY = backends.resolve("numpy")



class Optimizer:
    """Base class; see the concrete classes (:class:`fastopt.Adam`, ...)."""

    rule = None  # set by subclasses

    def __init__(self, params, backend="auto", sparse_mode="lazy", **hyper):
        rule = self.rule
        if sparse_mode not in ("lazy", "exact"):
            raise ValueError(f"Invalid sparse_mode: {sparse_mode!r} (use 'lazy' or 'exact')")
        self.sparse_mode = sparse_mode
        self._exact = {}    # exact mode: param index -> {row_step, buffer_start, group}
        unknown = set(hyper) - set(rule.defaults)
        if unknown:
            raise TypeError(f"{rule.name}: unexpected hyperparameter(s) {sorted(unknown)}")
        self.defaults = rule.check_group({**rule.defaults, **hyper})
        self.backend = backends.resolve(backend, sample=_first_array(params))
        self._names = None           # parameter names when params was a dict
        self._params = []            # flat list of ndarrays
        self.param_groups = []
        if isinstance(params, dict):
            self._names = list(params)
            groups = [{"params": list(params.values())}]
        else:
            params = list(params)
            if not params:
                raise ValueError(f"{rule.name}: got an empty parameter list")
            groups = params if isinstance(params[0], dict) else [{"params": params}]
        for g in groups:
            self.add_param_group(g)
        self._state = [self._empty_state(i) for i in range(len(self._params))]
        self._steps = np.zeros(len(self._params), dtype=np.int64)
        self._host_keys = tuple(rule.host_init(self.defaults))
        self._check_keys = tuple(rule.checks)
        self._group_snapshot = None
        self._plan = None
        self._version = 0

    # ------------------------------------------------------------------ groups
    def add_param_group(self, group):
        """Add a group dict ``{"params": [...], **hyperparameters}`` (as in torch).

        Hyperparameters not given take the optimizer's defaults.  Other keys (such as
        a scheduler's ``initial_lr``) are kept as they are and saved in state_dict.
        """
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        arrays = group["params"]
        if isinstance(arrays, dict):
            raise TypeError("a param group's 'params' must be a list of arrays")
        if not isinstance(arrays, (list, tuple)):
            arrays = [arrays]
        start = len(self._params)
        checked = [self.backend.as_param(a, f"parameter {start + k}")
                   for k, a in enumerate(arrays)]
        _refuse_overlaps(self._params + checked, self.backend, start)
        if self.rule.layout == "rowwise" and any(a.ndim == 0 for a in checked):
            raise ValueError(f"{self.rule.name} keeps one accumulator per row: parameters "
                             "need at least one dimension")
        hyper = self.rule.check_group({**self.defaults, **group})
        self._check_exact(hyper)
        extras = {k: v for k, v in group.items() if k not in hyper and k != "params"}
        self.param_groups.append({**extras, **hyper, "params": checked})
        self._params.extend(checked)
        if hasattr(self, "_state"):
            self._state.extend(self._empty_state(i) for i in range(start, len(self._params)))
            self._steps = np.concatenate([self._steps, np.zeros(len(checked), np.int64)])
            self._version += 1

    def _check_exact(self, group):
        if self.sparse_mode != "exact":
            return
        reason = self.rule.exact_reason(group) if self.rule.catch_up is not None else \
            "it has no closed form for skipped steps"
        reason = reason or fused.exact_reason(group)
        if reason is not None:
            raise ValueError(f"{self.rule.name}: sparse_mode='exact' is not possible for this "
                             f"configuration: {reason}; use sparse_mode='lazy'")

    def _empty_state(self, i):
        return {}

    def _validated_groups(self):
        """Validated copies of the groups' hyperparameters and their slot usage.

        Users may edit ``param_groups`` between steps; the check is redone only when
        a value changed (compared against the last validated snapshot).
        """
        keys = self._check_keys
        snap = [tuple([g.get(k) for k in keys]) + (len(g["params"]),) for g in self.param_groups]
        if snap != self._group_snapshot:
            groups = [self.rule.check_group(g) for g in self.param_groups]
            owner = []
            for gi, g in enumerate(self.param_groups):
                owner.extend([gi] * len(g["params"]))
            if len(owner) != len(self._params):
                raise RuntimeError("param_groups' 'params' lists must not be edited; "
                                   "use add_param_group")
            flags = [fused.flags(g) for g in groups]
            if any(any(f) for f in flags):
                self._require_fused()
            spec = tuple((self.rule.uses_slots(g), fused.with_flags(self.rule.constants(g), f))
                         for g, f in zip(groups, flags))
            # parameters updated row by row: row-wise rules, and max_norm groups
            self._by_rows = frozenset(i for i, gi in enumerate(owner)
                                      if self.rule.layout == "rowwise" or flags[gi][5])
            self._group_cache = (groups, spec, owner)
            self._group_snapshot = snap
        return self._group_cache

    def _require_fused(self):
        if not getattr(self.backend, "fuses_options", False):
            raise NotImplementedError(
                f"backend {self.backend.name!r} does not fuse the options of "
                "fastopt.fused (grad_scale, clip_value, l1, param_min, param_max, "
                "max_norm); use backend='numba' (or 'numpy')")

    # ------------------------------------------------------------------- step
    def _align_grads(self, grads):
        n = len(self._params)
        if isinstance(grads, dict):
            if self._names is None:
                raise TypeError("gradients given as a dict, but the parameters were a list; "
                                "pass a list aligned with the parameters")
            if set(grads) != set(self._names):
                missing = sorted(set(self._names) - set(grads), key=str)
                extra = sorted(set(grads) - set(self._names), key=str)
                raise KeyError(f"gradient keys do not match the parameters: "
                               f"missing {missing}, unexpected {extra}")
            return [grads[k] for k in self._names]
        if isinstance(grads, np.ndarray) or not hasattr(grads, "__len__"):
            grads = [grads] if n == 1 else grads
        grads = list(grads)
        if len(grads) != n:
            raise ValueError(f"got {len(grads)} gradients for {n} parameters")
        return grads

    def step(self, grads, grad_scale=None, skip_nonfinite=False):
        """Apply one update in place.  ``grads`` mirrors the parameters: a list
        aligned with them, or a dict with the same keys; ``None`` skips a parameter
        (its step count does not advance).

        ``grad_scale``: the gradients are divided by it inside the update pass (loss
        scaling).  ``skip_nonfinite``: first check every gradient for Inf/NaN and,
        if any is found, skip the whole step (parameters, state and step counts
        untouched).  Returns True when the step was applied, False when skipped.
        """
        grads = self._align_grads(grads)
        gs = fused.check_grad_scale(grad_scale)
        if gs is not None:
            self._require_fused()
        groups, uses, owner = self._validated_groups()
        n = len(grads)
        active, sparse = [], []
        for i in range(n):
            g = grads[i]
            if g is None:
                continue
            if type(g) is not np.ndarray and is_sparse(g):
                sparse.append(i)
            else:
                active.append(i)
        # phase 1: check (and where needed convert) every gradient
        rows = self._check_sparse(grads, sparse) if sparse else []
        everyone = len(active) == n
        dense = grads if everyone else [grads[i] for i in active]
        plist = self._params if everyone else [self._params[i] for i in active]
        dense, gptr = self.backend.check_grads(dense, plist, active)
        if skip_nonfinite:
            finite = getattr(self.backend, "all_finite", None)
            if finite is None:
                raise NotImplementedError(f"backend {self.backend.name!r} cannot check "
                                          "gradients for skip_nonfinite")
            if not (finite(dense) and finite([v for _, _, v in rows])):
                return False
        by_rows = self._by_rows
        if by_rows and active:
            moved = [k for k, i in enumerate(active) if i in by_rows]
            if moved:
                rows += [(active[k], None, dense[k]) for k in moved]
                keep = [k for k, i in enumerate(active) if i not in by_rows]
                everyone = False
                active = [active[k] for k in keep]
                dense = [dense[k] for k in keep]
                gptr = gptr[keep]
        if rows:
            self._step_rows(rows, groups, uses, owner, gs)
        if not active:
            return True
        if self._exact:
            exact_dense = [i for i in active if i in self._exact]
            for i in exact_dense:
                self._flush_param(i)
        # phase 2: nothing below fails on user input
        key = (None if everyone else tuple(active), uses, self._version)
        plan = self._plan if self._plan is not None and self._plan[0] == key else None
        if plan is None:
            fresh = self._allocate_state(active, owner, groups, uses)
            plan = (key, self._build_plan(active, owner, uses, fresh))
            self._plan = plan if not fresh else None
        buckets = plan[1]
        rule = self.rule
        new_host = []
        for b in buckets:
            fusing = gs is not None or (b.const and b.const[-1][0] == "fused")
            b.ptrs[:, 1] = gptr[b.pos]
            b.grads = dense if b.all_active else [dense[k] for k in b.pos]
            for r, (gi, rep, fresh) in enumerate(b.rows):
                st = self._state[rep]
                host = {k: st[k] for k in self._host_keys}
                scal, host2 = rule.scalars(groups[gi], int(self._steps[rep]) + 1, host, fresh)
                b.hyper[r] = scal
                if fusing:          # columns read only by drivers with a fused option on
                    b.hyper[r, fused.BASE:] = fused.scalars(groups[gi], gs)
                if host2:
                    new_host.append((b.row_members[r], host2))
            if self.backend is _NUMPY:
                b.ref_args = [(groups[owner[i]], int(self._steps[i]) + 1,
                               self._ref_state(i, b.uses), b.fresh_of.get(i, ()))
                              for i in b.index]
            if gs is None:
                self.backend.run(rule, b)
            else:
                self.backend.run(rule, dataclasses.replace(
                    b, grad_scale=gs, const=fused.with_flags(
                        b.const, (True,) + fused.split(b.const)[1][1:])))
        if everyone:
            self._steps += 1
        else:
            self._steps[active] += 1
        if self._exact:
            for i in exact_dense:
                self._exact[i]["row_step"][:] = self._steps[i]
                self._exact[i]["group"] = groups[owner[i]]
        for members, host2 in new_host:
            for i in members:
                self._state[i].update(host2)
        return True

    def _check_sparse(self, grads, sparse):
        """Validate the row-sparse gradients; returns [(i, idx, vals)] (empty ones
        dropped: an empty sparse gradient is a no-op)."""
        if not hasattr(self.backend, "run_rows") or (
                self.sparse_mode == "exact" and not hasattr(self.backend, "run_catch_up")):
            raise NotImplementedError(f"backend {self.backend.name!r} does not take sparse "
                                      f"gradients in {self.sparse_mode} mode yet; "
                                      "use backend='numba'")
        if self.sparse_mode == "exact":
            for g in self._validated_groups()[0]:
                self._check_exact(g)
        out = []
        for i in sparse:
            idx, vals = checked_rows(grads[i], self._params[i], f"gradient {i}")
            if idx.shape[0]:
                out.append((i, idx, vals))
        return out

    def _step_rows(self, rows, groups, uses, owner, gs=None):
        """Apply the validated row-sparse gradients: touched rows only (lazy); in exact
        mode the touched rows are first caught up over the steps they missed."""
        rule = self.rule
        active = [i for i, _, _ in rows]
        if self.sparse_mode == "exact":
            self._flush_changed(active, groups, owner)
        fresh = self._allocate_state(active, owner, groups, uses)
        for i, idx, vals in rows:
            gi = owner[i]
            use, const = uses[gi]
            st = self._state[i]
            step = int(self._steps[i]) + 1
            host = {k: st[k] for k in self._host_keys}
            fr = fresh.get(i, ())
            scal, host2 = rule.scalars(groups[gi], step, host, fr)
            p = self._params[i]
            if idx is None:         # a dense gradient of a row-wise rule: every row once
                if p.size == 0:     # nothing to update (a row of zero elements has no mean)
                    self._steps[i] += 1
                    st.update(host2)
                    continue
                idx = order = uniq = np.arange(p.shape[0], dtype=np.int64)
                seg = np.arange(p.shape[0] + 1, dtype=np.int64)
                vals = vals.reshape(p.shape[0], -1)
            else:
                order, seg, uniq = coalesce_plan(idx, p.shape[0])
            slots = [st[name] if u else None
                     for name, u in zip(rule.slots + (None,) * NSLOTS, use)]
            if self.sparse_mode == "exact":
                ex = self._exact_info(i, groups[gi], use)
                if "momentum_buffer" in fr:
                    ex["buffer_start"] = step
                self._catch_up(i, uniq, step - 1)
                ex["row_step"][uniq] = step
            hyper = np.array([scal], dtype=np.float64)
            hyper[0, fused.BASE:] = fused.scalars(groups[gi], gs)
            if gs is not None:
                const = fused.with_flags(const, (True,) + fused.split(const)[1][1:])
            work = backends.RowsWork(param=p, slots=slots, vals=vals, idx=idx, order=order,
                                     seg=seg, uniq=uniq, uses=use, const=const, hyper=hyper,
                                     ref_args=(groups[gi], step, self._ref_state(i, use), fr),
                                     grad_scale=gs)
            self.backend.run_rows(rule, work)
            self._steps[i] += 1
            st.update(host2)
        self._plan = None if fresh else self._plan

    # ------------------------------------------------------------ exact mode
    def _exact_info(self, i, group, uses):
        ex = self._exact.get(i)
        if ex is None:
            ex = self._exact[i] = {
                "row_step": np.full(self._params[i].shape[0], self._steps[i], np.int64),
                "buffer_start": 0, "group": group, "uses": uses}
        return ex

    def _catch_up(self, i, rows, t_end):
        """Bring ``rows`` of parameter ``i`` up to step ``t_end`` (zero gradients)."""
        ex = self._exact[i]
        last = ex["row_step"][rows]
        pending = last < t_end
        if not pending.any():
            return
        rows, last = rows[pending], last[pending]
        st = self._state[i]
        group, uses = ex["group"], ex["uses"]
        scal, _ = self.rule.scalars(group, t_end, {k: st[k] for k in self._host_keys}, ())
        slots = [st[n] if u and n in st else None for n, u in zip(self.rule.slots, uses)]
        self.backend.run_catch_up(self.rule, backends.CatchUpWork(
            param=self._params[i], slots=slots, rows=rows, last=last, t_end=int(t_end),
            buffer_start=ex["buffer_start"], scalars=scal, group=group, uses=uses))
        ex["row_step"][rows] = t_end

    def _flush_param(self, i):
        ex = self._exact.get(i)
        if ex is not None:
            rows = np.flatnonzero(ex["row_step"] < self._steps[i])
            self._catch_up(i, rows, int(self._steps[i]))

    def _flush_changed(self, params, groups, owner):
        """Exact mode: parameters whose hyperparameters changed since their pending
        rows were left behind are brought up to date with the old ones first."""
        for i in params:
            ex = self._exact.get(i)
            if ex is not None and ex["group"] != groups[owner[i]]:
                self._flush_param(i)
                ex["group"] = groups[owner[i]]
                ex["uses"] = self._validated_groups()[1][owner[i]][0]

    def flush(self):
        """Exact sparse mode: bring every row of every parameter up to date, as if the
        skipped steps had been dense steps with zero gradient on those rows.  Call it
        before evaluating or exporting parameters; ``state_dict()`` calls it.  A no-op
        in lazy mode."""
        for i in list(self._exact):
            self._flush_param(i)

    def _ref_state(self, i, uses):
        st = self._state[i]
        out = {n: st[n] for n, u in zip(self.rule.slots, uses) if u}
        out.update({k: st[k] for k in self._host_keys})
        return out

    def _allocate_state(self, active, owner, groups, uses):
        """Create the state a parameter's group needs; returns {i: fresh slot names}."""
        fresh = {}
        rule = self.rule
        for i in active:
            st = self._state[i]
            g = groups[owner[i]]
            for k, v in rule.host_init(g).items():
                st.setdefault(k, v)
            for name, used in zip(rule.slots, uses[owner[i]][0]):
                if used and name not in st:
                    p = self._params[i]
                    st[name] = self.backend.full(rule.slot_shape(p.shape),
                                                 rule.slot_init(g, name), p.dtype)
                    fresh.setdefault(i, set()).add(name)
        if fresh:
            self._version += 1
        return {i: tuple(sorted(v)) for i, v in fresh.items()}

    def _build_plan(self, active, owner, uses, fresh):
        """Buckets (dtype x slot usage) with their pointer, chunk and row tables."""
        by_key = {}
        for pos, i in enumerate(active):
            by_key.setdefault((self._params[i].dtype.str, uses[owner[i]]), []).append((pos, i))
        buckets = []
        for (dt, (use, const)), members in by_key.items():
            idx = [i for _, i in members]
            ptrs = np.zeros((len(idx), 2 + NSLOTS), dtype=np.int64)
            slots = []
            rows, row_of, row_members = [], {}, []
            hidx = np.empty(len(idx), dtype=np.int64)
            for t, i in enumerate(idx):
                st = self._state[i]
                ptrs[t, 0] = self.backend.address(self._params[i])
                slots.append([st[name] if used else None
                              for name, used in zip(self.rule.slots + (None,) * NSLOTS, use)])
                for s, arr in enumerate(slots[-1]):
                    if arr is not None:
                        ptrs[t, 2 + s] = self.backend.address(arr)
                for s in range(NSLOTS):
                    if ptrs[t, 2 + s] == 0:
                        ptrs[t, 2 + s] = ptrs[t, 0]
                fr = fresh.get(i, ())
                rkey = (owner[i], int(self._steps[i]),
                        tuple(st[k] for k in self._host_keys), fr)
                r = row_of.get(rkey)
                if r is None:
                    r = row_of[rkey] = len(rows)
                    rows.append((owner[i], i, fr))
                    row_members.append([])
                row_members[r].append(i)
                hidx[t] = r
            sizes = [self._params[i].size for i in idx]
            b = backends.Bucket(dtype=np.dtype(dt), uses=use, const=const, index=idx,
                                params=[self._params[i] for i in idx], ptrs=ptrs,
                                chunks=_numba_cpu.make_chunks(sizes),
                                hyper=np.zeros((len(rows), NSCALARS)), hidx=hidx,
                                nelem=int(sum(sizes)))
            b.slots = slots
            b.pos = np.array([pos for pos, _ in members], dtype=np.int64)
            b.all_active = len(members) == len(active)
            b.rows, b.row_members = rows, row_members
            b.fresh_of = {i: fresh[i] for i in idx if i in fresh}
            buckets.append(b)
        return buckets

    # -------------------------------------------------------------- state_dict
    @property
    def state(self):
        """Per-parameter state, keyed by parameter index (read-only view)."""
        return {i: {"step": int(self._steps[i]), **st} for i, st in enumerate(self._state)
                if self._steps[i] or st}

    def state_dict(self):
        """A plain dict in torch's layout plus a format version and the optimizer name.

        ``{"version": 1, "optimizer": "Adam", "state": {index: {"step": int,
        "exp_avg": ndarray, ...}}, "param_groups": [{..., "params": [indices]}]}``.
        Arrays are copies.  In exact sparse mode the optimizer is flushed first (every
        row brought up to date), so the saved state needs no per-row bookkeeping.
        """
        self.flush()
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        state = {}
        for i, st in enumerate(self._state):
            if self._steps[i] == 0 and not st:
                continue
            state[i] = {"step": int(self._steps[i])}
            state[i].update({k: (self.backend.to_host(v) if not isinstance(v, float) else v)
                             for k, v in st.items()})
        out = {"version": STATE_DICT_VERSION, "optimizer": self.rule.name,
               "state": state, "param_groups": groups}
        if self._names is not None:
            out["param_names"] = list(self._names)
        return out

    def load_state_dict(self, state_dict):
        """Load a :meth:`state_dict`.  Everything is checked before anything changes:
        optimizer name, version, group structure, hyperparameters, state names, shapes
        and dtypes (state arrays must have the parameter's dtype: no downcast).
        """
        sd = state_dict
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            raise ValueError("not an optimizer state_dict")
        if sd.get("optimizer") != self.rule.name:
            raise ValueError(f"state_dict is for optimizer {sd.get('optimizer')!r}, "
                             f"not {self.rule.name!r}")
        if sd.get("version") != STATE_DICT_VERSION:
            raise ValueError(f"unsupported state_dict version {sd.get('version')!r}")
        if len(sd["param_groups"]) != len(self.param_groups):
            raise ValueError("state_dict has a different number of param groups")
        new_groups = []
        for gi, (g_new, g_old) in enumerate(zip(sd["param_groups"], self.param_groups)):
            if len(g_new.get("params", ())) != len(g_old["params"]):
                raise ValueError(f"param group {gi} has a different number of parameters")
            hyper = {k: v for k, v in g_new.items() if k != "params"}
            checked = self.rule.check_group({**self.defaults, **hyper})
            extras = {k: v for k, v in hyper.items() if k not in checked}
            new_groups.append({**extras, **checked})
        new_state = [self._empty_state(i) for i in range(len(self._params))]
        new_steps = np.zeros(len(self._params), dtype=np.int64)
        allowed = set(self.rule.slots)
        for key, st in sd["state"].items():
            i = int(key)
            if not 0 <= i < len(self._params):
                raise ValueError(f"state_dict has state for parameter {key!r}, "
                                 f"but there are {len(self._params)} parameters")
            p = self._params[i]
            step = st.get("step", 0)
            if isinstance(step, (bool, float)) or not isinstance(step, (int, np.integer)) \
                    or step < 0:
                raise ValueError(f"state of parameter {i}: invalid step {step!r}")
            new_steps[i] = int(step)
            out = {}
            for name, v in st.items():
                if name == "step":
                    continue
                if name in allowed:
                    v = np.asarray(v)
                    if v.shape != self.rule.slot_shape(p.shape):
                        raise ValueError(f"state {name!r} of parameter {i} has shape {v.shape}, "
                                         f"expected {self.rule.slot_shape(p.shape)}")
                    if v.dtype != p.dtype:
                        raise ValueError(f"state {name!r} of parameter {i} has dtype {v.dtype}, "
                                         f"expected {p.dtype} (fastopt never casts state)")
                    out[name] = self.backend.from_host(v, p)
                elif name in self.rule.host_init(new_groups[0]):
                    if not isinstance(v, (float, int, np.floating)) or isinstance(v, bool):
                        raise ValueError(f"state {name!r} of parameter {i} must be a number")
                    out[name] = float(v)
                else:
                    raise ValueError(f"state_dict has unknown state {name!r} for "
                                     f"{self.rule.name}")
            new_state[i] = out
        # all checked: commit
        for g, hyper in zip(self.param_groups, new_groups):
            params = g["params"]
            g.clear()
            g.update({**hyper, "params": params})
        self._state = new_state
        self._steps = new_steps
        self._exact = {}
        self._group_snapshot = None
        self._plan = None
        self._version += 1

    def __repr__(self):
        lines = [f"{self.rule.name} (backend={self.backend.name})"]
        for gi, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v!r}" for k, v in g.items() if k != "params")
            lines.append(f"  group {gi}: {len(g['params'])} params, {hyper}")
        return "\n".join(lines)



def _first_array(params):
    """The first parameter array in any of the accepted ``params`` forms (or None)."""
    try:
        if isinstance(params, dict):
            return next(iter(params.values()), None)
        first = params[0]
        if isinstance(first, dict):
            ps = first.get("params")
            return ps[0] if isinstance(ps, (list, tuple)) and ps else ps
        return first
    except (TypeError, IndexError, KeyError):
        return None


def _refuse_overlaps(params, backend, start):
    """Raise if two parameters share memory (an update would be applied twice).

    Sorts the parameters' byte ranges and compares neighbours: O(n log n).
    """
    spans = []
    for k, p in enumerate(params):
        nbytes = p.size * p.dtype.itemsize
        if nbytes:
            lo = backend.address(p)
            spans.append((lo, lo + nbytes, k))
    spans.sort()
    for (lo1, hi1, k1), (lo2, hi2, k2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            k = max(k1, k2)
            raise ValueError(f"parameter {k} appears twice or overlaps parameter "
                             f"{min(k1, k2)}")
