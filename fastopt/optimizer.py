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

import numpy as np

from . import _numba_cpu, backends
from .arrays import as_grad, as_param
from .registry import NSCALARS, NSLOTS

STATE_DICT_VERSION = 1

from ._cy_util import data_address, gather_grads


class Optimizer:
    """Base class; see the concrete classes (:class:`fastopt.Adam`, ...)."""

    rule = None  # set by subclasses

    def __init__(self, params, backend="auto", **hyper):
        rule = self.rule
        unknown = set(hyper) - set(rule.defaults)
        if unknown:
            raise TypeError(f"{rule.name}: unexpected hyperparameter(s) {sorted(unknown)}")
        self.defaults = rule.check_group({**rule.defaults, **hyper})
        self.backend = backends.resolve(backend)
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
        self._plans = {}
        self._version = 0

    # ------------------------------------------------------------------ groups
    def add_param_group(self, group):
        """Add a group dict ``{"params": [...], **hyperparameters}`` (as in torch)."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        unknown = set(group) - set(self.rule.defaults) - {"params"}
        if unknown:
            raise TypeError(f"{self.rule.name}: unexpected hyperparameter(s) {sorted(unknown)}")
        arrays = group["params"]
        if isinstance(arrays, dict):
            raise TypeError("a param group's 'params' must be a list of arrays")
        if not isinstance(arrays, (list, tuple)):
            arrays = [arrays]
        start = len(self._params)
        checked = [as_param(a, f"parameter {start + k}") for k, a in enumerate(arrays)]
        seen = {id(p) for p in self._params}
        for k, a in enumerate(checked):
            if id(a) in seen or any(np.shares_memory(a, p) for p in self._params[-64:]):
                raise ValueError(f"parameter {start + k} appears twice or overlaps another one")
            seen.add(id(a))
        hyper = self.rule.check_group({**self.defaults, **group})
        self.param_groups.append({**hyper, "params": checked})
        self._params.extend(checked)
        if hasattr(self, "_state"):
            self._state.extend(self._empty_state(i) for i in range(start, len(self._params)))
            self._version += 1

    def _empty_state(self, i):
        return {"step": 0}

    def _checked_groups(self):
        """Validated copies of the groups' hyperparameters (users may edit them)."""
        out = []
        for g in self.param_groups:
            out.append(self.rule.check_group(g))
        return out

    def _group_of(self):
        """Parameter index -> group index."""
        owner = []
        for gi, g in enumerate(self.param_groups):
            owner.extend([gi] * len(g["params"]))
        if len(owner) != len(self._params):
            raise RuntimeError("param_groups' 'params' lists must not be edited; "
                               "use add_param_group")
        return owner

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

    def step(self, grads):
        """Apply one update in place.  ``grads`` mirrors the parameters: a list
        aligned with them, or a dict with the same keys; ``None`` skips a parameter
        (its step count does not advance).  Returns True (the step was applied).
        """
        grads = self._align_grads(grads)
        groups = self._checked_groups()
        owner = self._group_of()
        active = [i for i, g in enumerate(grads) if g is not None]
        if not active:
            return True
        params = self._params
        # phase 1: check every gradient (fast C loop, slow path for the rest)
        dense = grads if len(active) == len(grads) else [grads[i] for i in active]
        plist = params if len(active) == len(grads) else [params[i] for i in active]
        dense = list(dense)
        gptr = np.empty((len(dense), 1), dtype=np.int64)
        start = 0
        while start < len(dense):
            bad = gather_grads(dense[start:], plist[start:], gptr[start:], 0)
            if bad < 0:
                break
            k = start + bad
            dense[k] = as_grad(dense[k], plist[k], f"gradient {active[k]}")
            gptr[k, 0] = data_address(dense[k])
            start = k + 1
        # phase 2: state, scalars, kernels
        uses = [self.rule.uses_slots(g) for g in groups]
        fresh = self._allocate_state(active, owner, groups, uses)
        buckets = self._buckets(active, owner, uses)
        new_host = {}
        for key, members in buckets.items():
            b = self._fill_bucket(key, members, active, dense, gptr[:, 0], owner, groups,
                                  fresh, new_host)
            self.backend.run(self.rule, b)
        for i in active:
            st = self._state[i]
            st["step"] += 1
            if i in new_host:
                st.update(new_host[i])
        return True

    def _allocate_state(self, active, owner, groups, uses):
        """Create the state slots a parameter's group needs; returns {i: fresh names}."""
        fresh = {}
        rule = self.rule
        for i in active:
            st = self._state[i]
            g = groups[owner[i]]
            if st["step"] == 0 and not any(k in st for k in rule.host_init(g)):
                st.update(rule.host_init(g))
            for name, used in zip(rule.slots, uses[owner[i]]):
                if used and name not in st:
                    p = self._params[i]
                    st[name] = np.full(p.shape, rule.slot_init(g, name), dtype=p.dtype)
                    fresh.setdefault(i, set()).add(name)
                    self._version += 1
        return fresh

    def _buckets(self, active, owner, uses):
        buckets = {}
        for pos, i in enumerate(active):
            key = (self._params[i].dtype.str, uses[owner[i]])
            buckets.setdefault(key, []).append(pos)
        return buckets

    def _fill_bucket(self, key, members, active, dense, gptr, owner, groups, fresh, new_host):
        dtype, uses = np.dtype(key[0]), key[1]
        rule = self.rule
        idx = [active[pos] for pos in members]
        b = backends.Bucket(dtype=dtype, uses=uses, index=idx,
                            params=[self._params[i] for i in idx],
                            grads=[dense[pos] for pos in members])
        b.ptrs, b.chunks, b.nelem = self._tables(key, idx)
        b.ptrs = b.ptrs.copy()
        b.ptrs[:, 1] = gptr if len(members) == len(gptr) else gptr[members]
        rows, hidx, ref = {}, np.empty(len(idx), dtype=np.int64), []
        for t, i in enumerate(idx):
            st = self._state[i]
            gi = owner[i]
            host = {k: st[k] for k in rule.host_init(groups[gi])}
            fr = fresh.get(i, ())
            rkey = (gi, st["step"] + 1, tuple(sorted(host.items())), tuple(sorted(fr)))
            row = rows.get(rkey)
            if row is None:
                scal, host2 = rule.scalars(groups[gi], st["step"] + 1, host, fr)
                row = rows[rkey] = (len(rows), scal, host2)
            hidx[t] = row[0]
            if row[2]:
                new_host[i] = row[2]
            if isinstance(self.backend, backends.NumpyBackend):
                state = {n: st[n] for n, u in zip(rule.slots, uses) if u}
                state.update(host)
                ref.append((groups[gi], st["step"] + 1, state, fr))
        b.hyper = np.array([r[1] for r in sorted(rows.values())], dtype=np.float64)
        b.hidx, b.ref_args = hidx, ref
        return b

    def _tables(self, key, idx):
        """Pointer table (param and state columns) and chunk table, cached."""
        ck = (key, tuple(idx), self._version)
        hit = self._plans.get(ck)
        if hit is None:
            if len(self._plans) > 64:
                self._plans.clear()
            uses = key[1]
            ptrs = np.zeros((len(idx), 2 + NSLOTS), dtype=np.int64)
            for t, i in enumerate(idx):
                p = self._params[i]
                ptrs[t, 0] = data_address(p)
                for s, (name, used) in enumerate(zip(self.rule.slots + (None,) * NSLOTS, uses)):
                    ptrs[t, 2 + s] = data_address(self._state[i][name]) if used else ptrs[t, 0]
            sizes = [self._params[i].size for i in idx]
            hit = self._plans[ck] = (ptrs, _numba_cpu.make_chunks(sizes), int(sum(sizes)))
        return hit

    # -------------------------------------------------------------- state_dict
    @property
    def state(self):
        """Per-parameter state, keyed by parameter index (read-only view)."""
        return {i: st for i, st in enumerate(self._state) if st["step"] or len(st) > 1}

    def state_dict(self):
        """A plain dict in torch's layout plus a format version and the optimizer name.

        ``{"version": 1, "optimizer": "Adam", "state": {index: {"step": int,
        "exp_avg": ndarray, ...}}, "param_groups": [{..., "params": [indices]}]}``.
        Arrays are copies.
        """
        groups, start = [], 0
        for g in self.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        state = {}
        for i, st in enumerate(self._state):
            if st["step"] == 0 and len(st) == 1:
                continue
            state[i] = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
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
            unknown = set(hyper) - set(self.rule.defaults)
            if unknown:
                raise ValueError(f"state_dict group {gi} has unknown hyperparameters "
                                 f"{sorted(unknown)}")
            new_groups.append(self.rule.check_group({**self.defaults, **hyper}))
        new_state = [self._empty_state(i) for i in range(len(self._params))]
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
            out = {"step": int(step)}
            for name, v in st.items():
                if name == "step":
                    continue
                if name in allowed:
                    v = np.asarray(v)
                    if v.shape != p.shape:
                        raise ValueError(f"state {name!r} of parameter {i} has shape {v.shape}, "
                                         f"expected {p.shape}")
                    if v.dtype != p.dtype:
                        raise ValueError(f"state {name!r} of parameter {i} has dtype {v.dtype}, "
                                         f"expected {p.dtype} (fastopt never casts state)")
                    out[name] = np.array(v, dtype=p.dtype, order="C", copy=True)
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
            g.update(hyper)
        self._state = new_state
        self._plans.clear()
        self._version += 1

    def __repr__(self):
        lines = [f"{self.rule.name} (backend={self.backend.name})"]
        for gi, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v!r}" for k, v in g.items() if k != "params")
            lines.append(f"  group {gi}: {len(g['params'])} params, {hyper}")
        return "\n".join(lines)

