"""The optimizer class: a facade over param groups, the step planner, the exact-mode
tracker and state_dict.

Every optimizer class is :class:`Optimizer` bound to one rule of
:mod:`fastopt.rules`.  A step is done in two phases so that bad input changes
nothing:

1. *check*: hyperparameters of every group (edits included), gradient count/keys,
   every gradient's type, shape and dtype (other float dtypes and non-contiguous
   gradients are converted into contiguous arrays of the parameter's dtype), sparse
   indices, aliasing between gradients and parameters or state, the backend's
   capabilities, ``grad_scale``, and the non-finite scan of ``skip_nonfinite``;
2. *apply*: allocate missing state, compute the per-step float64 scalars, run the
   backend over the planned work, then advance step counts and host scalars.

Nothing in phase 1 writes to a parameter or to the state; nothing in phase 2 can
fail on user input.  A facade whose users hold other objects than arrays (torch
tensors) passes a state store (:mod:`fastopt.state_store`) that translates them.  One optimizer is stepped by one thread at a time: concurrent
calls of ``step``/``flush``/``load_state_dict`` are serialized by a lock.
"""

import threading
from bisect import bisect_left
from struct import pack_into

import numpy as np

from . import backends, factored, matrix_phase, planner, state_io, storage
from .exact_mode import ExactTracker
from .param_groups import ParamGroups
from .state_store import ArrayStore
from .rules import fused
from .sparse import checked_rows, is_sparse

STATE_DICT_VERSION = state_io.STATE_DICT_VERSION


class _FastPath:
    """Buffers of :meth:`Optimizer._step_fast` (for ``n`` parameters)."""

    __slots__ = ("gptr", "all", "everyone", "plan", "lean", "launch")

    def __init__(self, n):
        self.gptr = np.empty((n, 1), dtype=np.int64)
        self.all = list(range(n))
        self.everyone = tuple(self.all)
        self.plan = None         # the cached dense plan last seen, and whether it can be
        self.lean = False        # launched directly (native formats, no grad_scale)
        self.launch = None       # its launch handle (:meth:`Optimizer._launch_handle`)


class Optimizer:
    """Base class; see the concrete classes (:class:`fastopt.Adam`, ...)."""

    rule = None  # set by subclasses

    def __init__(self, params, backend="auto", sparse_mode="lazy", state_bits=None,
                 bf16_update=None, seed=0, store=None, **hyper):
        rule = self.rule
        if sparse_mode not in ("lazy", "exact"):
            raise ValueError(f"Invalid sparse_mode: {sparse_mode!r} (use 'lazy' or 'exact')")
        self.sparse_mode = sparse_mode
        self.state_bits, self.bf16_update, self.seed = storage.check_options(
            state_bits, bf16_update, seed)
        self._storage = []
        self._seeds = []            # per parameter: its group's stochastic-rounding seed
        self._bases = []            # per parameter: its element base (set_row_range)
        unknown = set(hyper) - set(rule.defaults)
        if unknown:
            raise TypeError(f"{rule.name}: unexpected hyperparameter(s) {sorted(unknown)}")
        self.defaults = rule.check_group({**rule.defaults, **hyper})
        self.backend = backends.resolve(backend, sample=_first_array(params))
        self._check_backend(self.defaults)
        self._require_state_bits(self.state_bits)
        #: how the engine sees the facade's objects (:mod:`fastopt.state_store`)
        self._store = store if store is not None else ArrayStore()
        self._store.attach(self)
        self._groups = ParamGroups(rule, self.backend, self.defaults, self._check_group,
                                   self._group_storage, storage.OPTIONS,
                                   view=self._store.param, keep_objects=self._store.converts,
                                   check_raw=getattr(self._store, "check_group", None),
                                   watched=getattr(self._store, "group_keys", ()))
        self._names = None
        if isinstance(params, dict):
            if not params:
                raise ValueError(f"{rule.name}: got an empty parameter dict")
            self._names = []                   # filled by add_param_group
            groups = [{"params": dict(params)}]
        else:
            params = list(params)
            if not params:
                raise ValueError(f"{rule.name}: got an empty parameter list")
            groups = params if isinstance(params[0], dict) else [{"params": params}]
        self._state = []
        self._steps = self._store.counts(np.zeros(0, dtype=np.int64), 0)
        for g in groups:
            self.add_param_group(g)
        if bf16_update is not None and not any(s.param == "bfloat16" for s in self._storage):
            raise ValueError(f"bf16_update={bf16_update!r} applies to bfloat16 parameters, "
                             "and none was given")
        self._host_keys = tuple(rule.host_init(self.defaults))
        self._exact = ExactTracker()
        self._plan = None
        self._plan_version = 0
        self._alias = None
        self._alias_ok = None
        self._fast = None
        self._lock = threading.Lock()
        #: per-tensor rules (LAMB, LARS): None, or ``reduce(indices, sums) -> sums``
        #: called between the norm pass and the update pass with, per bucket, the
        #: parameter indices and the float64 (tensors, 2) sums of squares of this
        #: process's part of each tensor (ShardedOptimizer adds the shards' parts)
        self.norm_reducer = None

    # ------------------------------------------------------------------ groups
    @property
    def param_groups(self):
        """The groups as in torch: a list of dicts, editable between steps."""
        return self._groups.groups

    @property
    def _params(self):
        return self._groups.params

    @property
    def param_objects(self):
        """The flat list of the parameters as the user gave them (the arrays, or a
        facade's objects such as torch tensors)."""
        return self._groups.objects

    def refresh_params(self):
        """The memory behind some parameter objects moved (a facade's objects, such as
        torch's ``p.data = ...``): view them again and re-plan.  Raises, changing
        nothing, when a new array does not match its parameter's shape and dtype."""
        with self._lock:
            if self._groups.refresh():
                self.invalidate()

    def invalidate(self):
        """Forget the cached plan: the next step re-validates the groups and re-plans
        (the result is the same, bit for bit)."""
        self._groups.invalidate()
        self._plan = None
        self._plan_version += 1
        self._fast = None

    def allocate_state(self, indices=None):
        """Create now the state that the parameters ``indices`` (default: all) would
        get on their first step (torch's Adagrad has its state from construction)."""
        with self._lock:
            specs, owner = self._groups.validated()
            active = range(len(self._params)) if indices is None else indices
            self._allocate_state(list(active), specs, owner)

    def add_param_group(self, group):
        """Add a group dict ``{"params": [...], **hyperparameters}`` (as in torch).

        Hyperparameters not given take the optimizer's defaults.  Other keys (such as
        a scheduler's ``initial_lr``) are kept as they are and saved in state_dict.
        """
        names = None
        if self._names is not None:
            group, names = self._named_group(group)
        if self.rule.group_keys and isinstance(group, dict):
            group = {**self.rule.group_keys, **group}
        added = self._groups.add(group, self._check_params)
        self._fast = None
        if names is not None:
            self._names.extend(names)
        g = self.param_groups[-1]
        self._state.extend({} for _ in added)
        self._storage.extend(storage.storage_for(self.rule, self._params[i], g["state_bits"],
                                                 g["bf16_update"]) for i in added)
        self._seeds.extend(g["seed"] for _ in added)
        self._bases.extend(0 for _ in added)
        self._steps = self._store.counts(self._steps, len(self._params))
        self._plan_version = getattr(self, "_plan_version", 0) + 1

    def _named_group(self, group):
        """An optimizer built from a dict of named parameters takes new groups with
        ``params`` a dict of new names (gradients are then given by name)."""
        if not isinstance(group, dict) or not isinstance(group.get("params"), dict):
            raise TypeError("the parameters were given by name (a dict): give the new "
                            "group's 'params' as a dict name -> array too, so that "
                            "gradients can be passed by name")
        names = list(group["params"])
        taken = set(map(str, self._names))
        clash = [k for k in names if str(k) in taken]
        if clash or len(set(map(str, names))) != len(names):
            raise ValueError(f"parameter names {clash or names} are already taken "
                             "(names must be unique)")
        return {**group, "params": list(group["params"].values())}, names

    def _require_state_bits(self, state_bits):
        if state_bits == 16:
            self.backend.require("state16", "state_bits=16")
        elif state_bits == 8:
            self.backend.require("state8", "state_bits=8")

    def _group_storage(self, group, arrays):
        """The storage options of a new group (``storage.OPTIONS``): its own entries,
        else the optimizer's.  They are fixed once the group is added (an edit is
        refused by :class:`ParamGroups`)."""
        given = {k: group[k] for k in storage.OPTIONS if k in group}
        opts = dict(zip(storage.OPTIONS, storage.check_options(
            given.get("state_bits", self.state_bits),
            given.get("bf16_update", self.bf16_update), given.get("seed", self.seed))))
        self._require_state_bits(opts["state_bits"])
        # a bf16_update other than the optimizer's on a group without bfloat16
        # parameters would do nothing: a mistake (a copied group, carrying the
        # optimizer's own value, passes)
        if given.get("bf16_update") not in (None, self.bf16_update) and arrays \
                and not any(storage.is_bf16(a.dtype) for a in arrays):
            raise ValueError(f"param group bf16_update={given['bf16_update']!r} applies to "
                             "bfloat16 parameters, and the group has none")
        return opts

    def _check_backend(self, group):
        """Refuse, at construction or when a group changes, what the backend lacks."""
        require_features(self.backend, self.rule, group, self.sparse_mode)

    def _check_params(self, arrays):
        """Storage checks of new parameters (before the group is added)."""
        if self.rule.param_reason is not None:
            for a in arrays:
                why = self.rule.param_reason(a.shape)
                if why is not None:
                    raise ValueError(why)
        if any(storage.is_bf16(a.dtype) for a in arrays):
            self.backend.require("bfloat16", "bfloat16 parameters")
            if self.rule.bf16_reason is not None:
                raise ValueError(f"{self.rule.name}: bfloat16 parameters are not possible: "
                                 f"{self.rule.bf16_reason()}")
            if self.rule.per_tensor or self.rule.matrix is not None:
                self.backend.require("stored_passes", f"{self.rule.name} with bfloat16 "
                                     "parameters")

    def _check_group(self, group):
        self._check_backend(group)
        bits = group.get("state_bits", self.state_bits)
        if bits in (8, 16):
            if self.rule.per_tensor or self.rule.matrix is not None:
                self.backend.require("stored_passes", f"{self.rule.name} with "
                                     f"state_bits={bits}")
            reason = self.rule.low_state_reason(group)
            if reason is None and bits == 8:
                reason = self.rule.q8_reason(group)
            if reason is not None:
                raise ValueError(f"{self.rule.name}: state_bits={bits} is not "
                                 f"possible for this configuration: {reason}")
        if self.sparse_mode != "exact":
            return
        reason = self.rule.exact_reason(group) if self.rule.catch_up is not None else \
            "it has no closed form for skipped steps"
        reason = reason or fused.exact_reason(group)
        if reason is not None:
            raise ValueError(f"{self.rule.name}: sparse_mode='exact' is not possible for this "
                             f"configuration: {reason}; use sparse_mode='lazy'")

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
        if type(grads) is list:
            out = grads
        elif isinstance(grads, tuple):
            out = list(grads)
        elif n == 1 and (grads is None or is_sparse(grads) or hasattr(grads, "shape")
                         or hasattr(grads, "__array_interface__")):
            out = [grads]
        else:
            raise TypeError(f"gradients must be a list (or tuple) aligned with the {n} "
                            f"parameters, or a dict keyed like them; got "
                            f"{type(grads).__name__}" + (
                                " (a single array is accepted only when there is one "
                                "parameter)" if hasattr(grads, "shape") else ""))
        if len(out) != n:
            raise ValueError(f"got {len(out)} gradients for {n} parameters")
        return out

    def step(self, grads, grad_scale=None, skip_nonfinite=False):
        """Apply one update in place.  ``grads`` mirrors the parameters: a list
        aligned with them, or a dict with the same keys; ``None`` skips a parameter
        (its step count does not advance).

        ``grad_scale``: the gradients are divided by it inside the update pass (loss
        scaling).  ``skip_nonfinite``: first check every gradient (divided by
        ``grad_scale``) for Inf/NaN and, if any is found, skip the whole step
        (parameters, state and step counts untouched).  Returns True when the step
        was applied, False when skipped.
        """
        with self._lock:
            if self.rule.step_reason is not None:
                for gi, g in enumerate(self.param_groups):
                    why = self.rule.step_reason(g)
                    if why is not None:
                        raise RuntimeError(f"{self.rule.name}: param group {gi} cannot "
                                           f"step: {why}")
            return self._step(grads, grad_scale, skip_nonfinite)

    def _step(self, grads, grad_scale, skip_nonfinite):
        if grad_scale is None and skip_nonfinite is False and self._fast is not None \
                and type(grads) is list and self._step_fast(grads):
            return True
        grads = self._align_grads(grads)
        specs, owner = self._groups.validated()
        params = self._params
        if self._store.converts:
            grads = self._store.grads(grads, params)
        bk = self.backend
        n = len(grads)
        dense_i, sparse_i = [], []
        for i in range(n):
            g = grads[i]
            if g is None:
                continue
            if type(g) is not np.ndarray and is_sparse(g):
                sparse_i.append(i)
            else:
                dense_i.append(i)
        # phase 1: check (and where needed convert) everything
        if skip_nonfinite not in (True, False):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        gs = fused.check_grad_scale(grad_scale)
        if gs is not None:
            if self.rule.matrix is not None:
                raise ValueError(f"{self.rule.name}: step(grad_scale=...) is not supported: "
                                 "the update pass reads the orthogonalized matrix in the "
                                 "gradient's place (unscale the gradients before the step)")
            bk.require("grad_scale", "step(grad_scale=...)")
            fused.check_grad_scale_dtypes(gs, {storage.compute_dtype(params[i].dtype)
                                               for i in dense_i + sparse_i})
        if skip_nonfinite:
            bk.require("skip_nonfinite", "step(skip_nonfinite=True)")
        if self.rule.factored:
            factored.check_step(self.rule, gs, sparse_i)
        rows = self._check_sparse(grads, sparse_i)
        for i in dense_i:
            if specs[owner[i]].by_rows:
                self._check_row_layout(i, "max_norm")
        everyone = len(dense_i) == n
        dense = grads if everyone else [grads[i] for i in dense_i]
        plist = params if everyone else [params[i] for i in dense_i]
        dense, gptr = bk.check_grads(dense, plist, dense_i)
        self._refuse_aliases(dense_i, gptr, rows)
        if skip_nonfinite and not (bk.all_finite(dense, gs)
                                   and bk.all_finite([v for _, _, v in rows], gs)):
            return False
        # phase 2: nothing below fails on user input
        moved = [k for k, i in enumerate(dense_i) if specs[owner[i]].by_rows]
        if moved:
            rows += [(dense_i[k], None, dense[k]) for k in moved]
            keep = [k for k, i in enumerate(dense_i) if not specs[owner[i]].by_rows]
            everyone = False
            dense_i = [dense_i[k] for k in keep]
            dense = [dense[k] for k in keep]
            gptr = gptr[keep]
        if rows:
            self._step_rows(rows, specs, owner, gs)
        if dense_i:
            self._step_dense(dense_i, dense, gptr, specs, owner, gs, everyone)
        if len(dense_i) + len(rows) != n:
            # some step counts advanced and others did not: the cached plan's rows of
            # shared scalars (one per group and step count) no longer hold
            self._plan_version += 1
        elif everyone and gs is None and bk.memory == "host" \
                and not any(s.by_rows for s in specs):
            self._fast = _FastPath(n)             # the next such step can skip the above
        return True

    def _step_fast(self, grads):
        """The common step: every gradient a dense ndarray of its parameter's shape,
        dtype and layout, no options of the step, param groups unchanged, gradient
        addresses as last time (so the alias check holds).  Checks everything the
        full path checks for such a step, in C where it can, before writing;
        returns False (nothing done) to hand anything else to the full path."""
        fast = self._fast
        params = self._params
        if len(grads) != len(params) or not self._groups._unchanged():
            return False
        if self._store.gather(grads, params, fast.gptr, 0) >= 0:
            return False                          # None, sparse, or needs converting
        gptr = fast.gptr[:, 0]
        alias = self._alias
        if alias is None or alias[0] != (self._plan_version, self._groups.spec_version) \
                or self._alias_ok is None or self._alias_ok[2] != gptr.tobytes() \
                or self._alias_ok[1] != fast.everyone or self._alias_ok[3]:
            self._refuse_aliases(fast.all, gptr, [])
        specs, owner = self._groups._cache
        plan = self._plan
        if plan is None or self._exact or plan[0] != (None, self._plan_version,
                                                      self._groups.spec_version):
            if self._store.converts:
                return False      # the full path converts the facade's gradients
            self._step_dense(fast.all, grads, gptr, specs, owner, None, True)
            return True
        if fast.plan is not plan:
            fast.plan = plan
            fast.lean = not getattr(self.backend, "wants_reference_args", False) \
                and not self.rule.whole_tensor and all(
                b.config.storage.native and not b.config.switches[0]
                and list(b.pos) == fast.all
                for b in plan[1])
            fast.launch = self._launch_handle(plan, specs, owner) if fast.lean else None
        if not fast.lean:
            if self._store.converts:
                return False
            self._step_dense(fast.all, grads, gptr, specs, owner, None, True)
            return True
        # the cached plan, launched as _step_dense would: one scalar row per group of
        # tensors sharing it (the rule's host scalars packed after the group's fixed
        # fused fields, straight into the bucket's table), the gradient addresses,
        # one native call per bucket
        new_host = None
        run = self.backend.run_dense
        host_scalars, own_values = self.rule.host_scalars, self.rule._own_values
        steps = self._steps
        states = self._state
        for b, rows in fast.launch:
            hyper = b.hyper
            for fmt, offset, members, i, group, fused_row, host_keys in rows:
                st = states[i]
                own, host2 = host_scalars(group, int(steps[i]) + 1,
                                          {k: st[k] for k in host_keys}, ())
                pack_into(fmt, hyper, offset, *fused_row, *own_values(own))
                if host2:
                    new_host = (new_host or []) + [(members, host2)]
            b.ptrs[:, 1] = gptr
            b.grads = grads
            b.grad_scale = None
            run(b)
        steps += 1
        if new_host:
            for members, host2 in new_host:
                for i in members:
                    self._state[i].update(host2)
                self._store.host(members, host2)
        return True

    def _launch_handle(self, plan, specs, owner):
        """How :meth:`_step_fast` launches a lean cached plan: per bucket, per scalar
        row, the ``struct`` format and byte offset of the row in the bucket's table,
        its members, the parameter whose step count and host scalars it takes, the
        group, the group's fused fields (fixed while the group is unchanged) and the
        host-scalar keys."""
        out = []
        for b in plan[1]:
            width = b.hyper.shape[1] * b.hyper.itemsize
            rows = []
            for r, members in enumerate(b.row_members):
                i = members[0]
                spec = specs[owner[i]]
                n = len(spec.fused_row) + self.rule.nscalars - len(fused.FIELDS)
                rows.append((f"={n}d", r * width, members, i, spec.group, spec.fused_row,
                             self._host_keys))
            out.append((b, rows))
        return out

    def _check_sparse(self, grads, sparse_i):
        """Validate the row-sparse gradients; returns [(i, idx, vals)].  An empty one
        is kept: it is a step that touches no row (torch's SparseAdam and Adagrad
        count it), so the state is created, the step count advances and, in exact
        mode, every row falls one step behind."""
        out = []
        if sparse_i and self.rule.whole_tensor:
            raise ValueError(f"gradient {sparse_i[0]}: " + self.rule.tensor_refusal(
                "a row-sparse gradient" if self.rule.matrix is not None else
                "a row-sparse gradient (it would update some rows with norms of others)"))
        for i in sparse_i:
            idx, vals = checked_rows(grads[i], self._params[i], f"gradient {i}")
            self._check_row_layout(i, "a row-sparse gradient")
            out.append((i, idx, vals))
        return out

    def _check_row_layout(self, i, what):
        """8-bit state of a 1-D parameter is quantized in blocks of consecutive
        elements: a step by rows of one element would requantize elements it does not
        touch."""
        if self._storage[i].state == "q8" and self._params[i].ndim <= 1:
            raise ValueError(
                f"parameter {i}: {what} updates a 1-D parameter element by element, but its "
                f"8-bit state is quantized in blocks of {storage.Q8_BLOCK} elements; use "
                f"state_bits=16 (or 32) for it (a param group of its own)")

    def _alias_table(self):
        """Sorted byte ranges of every parameter and state array (cached per plan)."""
        version = (self._plan_version, self._groups.spec_version)
        if self._alias is None or self._alias[0] != version:
            spans = []
            for i, p in enumerate(self._params):
                arrays = [(p, f"parameter {i}")] + [
                    (v, f"state {k!r} of parameter {i}") for k, v in self._state[i].items()
                    if not isinstance(v, float)]
                for a, what in arrays:
                    nb = a.size * a.dtype.itemsize
                    if nb:
                        lo = self.backend.address(a)
                        spans.append((lo, lo + nb, what))
            spans.sort()
            self._alias = (version,
                           np.array([s[0] for s in spans], dtype=np.int64),
                           np.array([s[1] for s in spans], dtype=np.int64),
                           [s[2] for s in spans])
        return self._alias[1:]

    def _refuse_aliases(self, dense_i, gptr, rows):
        """A gradient must not share memory with a parameter or a state array: the
        update would read what it writes (and, in parallel, race).  The same
        gradient buffers as last step (a training loop that reuses them) were
        checked then."""
        starts, ends, what = self._alias_table()
        if not len(starts):
            return
        key = (self._alias[0], tuple(dense_i), gptr.tobytes(),
               tuple((i, self.backend.address(v), v.nbytes) for i, _, v in rows))
        if key == self._alias_ok:
            return
        self._check_aliases(dense_i, gptr, rows, starts, ends, what)
        self._alias_ok = key

    def _check_aliases(self, dense_i, gptr, rows, starts, ends, what):
        """Each gradient span ``[lo, hi)`` against the sorted, disjoint spans of the
        parameters and state (the last one starting below ``hi`` is the only one it
        can overlap): NumPy for many gradients, plain Python for a few (a sparse
        step's one or two, where a dozen small NumPy calls cost more than the
        search)."""
        sizes = [self._params[i].nbytes for i in dense_i]
        lo = gptr.reshape(-1).tolist() + [self.backend.address(v) for _, _, v in rows]
        hi = [a + s for a, s in zip(lo, sizes)] + [
            a + v.nbytes for a, (_, _, v) in zip(lo[len(sizes):], rows)]
        names = dense_i + [i for i, _, _ in rows]
        bad = None
        if len(lo) <= 16:
            st, en = starts.tolist(), ends.tolist()
            for j in range(len(lo)):
                k = bisect_left(st, hi[j]) - 1
                if hi[j] > lo[j] and k >= 0 and en[k] > lo[j]:
                    bad = j, k
                    break
        else:
            lo = np.asarray(lo, dtype=np.int64)
            hi = np.asarray(hi, dtype=np.int64)
            k = np.searchsorted(starts, hi, side="left") - 1
            ok = k >= 0
            hit = np.zeros(len(lo), dtype=bool)
            hit[ok] = ends[k[ok]] > lo[ok]
            hit &= hi > lo
            if hit.any():
                j = int(np.flatnonzero(hit)[0])
                bad = j, int(k[j])
        if bad is not None:
            j, k = bad
            raise ValueError(f"gradient {names[j]} shares memory with {what[k]}; the update "
                             "would read what it writes. Pass a separate gradient array "
                             "(e.g. grad.copy())")

    def _row(self, i, spec, fresh, gs):
        st = self._state[i]
        host = {k: st[k] for k in self._host_keys}
        fused_row = spec.fused_row
        if (spec.switches[3] or spec.switches[4] or spec.switches[5]) \
                and self._storage[i].param == "bfloat16":
            fused_row = storage.bf16_fused_row(fused.scalars(spec.group, gs),
                                               self._storage[i].update)
            gs = None                     # it is in the row
        return self.rule.row(spec.group, int(self._steps[i]) + 1, host, fresh, gs,
                             fused_row)

    def _step_dense(self, active, dense, gptr, specs, owner, gs, everyone):
        if self.rule.factored:                 # its own passes (fastopt/factored.py)
            return factored.step(self, active, dense, specs, owner, gptr)
        if self._exact:
            for i in active:
                self._flush_param(i)
        key = (None if everyone else tuple(active), self._plan_version, self._groups.spec_version)
        plan = self._plan if self._plan is not None and self._plan[0] == key else None
        fresh = {}
        if plan is None:
            fresh = self._allocate_state(active, specs, owner)
            tensors = []
            for i in active:
                spec = specs[owner[i]]
                st = self._state[i]
                tensors.append((self._params[i], planner.slot_list(self.rule, st, spec.uses),
                                spec, (owner[i], int(self._steps[i]),
                                       tuple(st[k] for k in self._host_keys),
                                       fresh.get(i, ()),
                                       i if self.rule.per_tensor else None),
                                self._storage[i], self._extras(i, spec.uses),
                                self._bases[i]))
            buckets = planner.dense_buckets(self.rule, self.backend, tensors)
            plan = (key, buckets)
            if not fresh:
                self._plan = plan
        new_host = []
        works = []
        ref = getattr(self.backend, "wants_reference_args", False)
        for b in plan[1]:
            scal = []
            for members in b.row_members:
                i = active[members[0]]
                row, host2 = self._row(i, specs[owner[i]], fresh.get(i, ()), gs)
                scal.append(row)
                if host2:
                    new_host.append(([active[m] for m in members], host2))
            keys = None
            if b.fmt is not None and b.config.storage.stochastic:
                keys = [self._key(active[k]) for k in b.pos]
            work = planner.fill_bucket(b, gptr, dense, scal, gs, all_active=len(b.pos) ==
                                       len(active), keys=keys)
            if ref:
                work.ref = [(specs[owner[i]].group, int(self._steps[i]) + 1,
                             self._ref_state(i, specs[owner[i]].uses), fresh.get(i, ()))
                            for i in (active[k] for k in b.pos)]
            works.append(work)
        if self.rule.per_tensor and not ref:
            members = [[active[k] for k in b.pos] for b in plan[1]]
            planner.tensor_scalars(
                self.rule, self.backend, works,
                [[specs[owner[i]].group for i in m] for m in members],
                None if self.norm_reducer is None else
                lambda sums: self.norm_reducer(members, sums))
        if self.rule.matrix is not None and not ref:
            matrix_phase.run(self.backend, works, [[specs[owner[active[k]]].group
                                                    for k in b.pos] for b in plan[1]])
        for work in works:
            self.backend.run_dense(work)
        if everyone:
            self._steps += 1
        else:
            self._steps[active] += 1
        for members, host2 in new_host:
            for i in members:
                self._state[i].update(host2)
            self._store.host(members, host2)
        if self._exact:
            for i in active:
                self._exact.mark_all(i, int(self._steps[i]), specs[owner[i]])

    def _step_rows(self, rows, specs, owner, gs):
        """Row steps: sparse gradients (touched rows only; in exact mode each touched
        row is first caught up over the steps it missed), and dense gradients of
        parameters updated row by row (row-wise rules, max_norm)."""
        rule = self.rule
        active = [i for i, _, _ in rows]
        if self.sparse_mode == "exact":
            self._flush_changed(active, specs, owner)
        fresh = self._allocate_state(active, specs, owner)
        ref = getattr(self.backend, "wants_reference_args", False)
        for i, idx, vals in rows:
            spec = specs[owner[i]]
            st = self._state[i]
            step = int(self._steps[i]) + 1
            fr = fresh.get(i, ())
            row, host2 = self._row(i, spec, fr, gs)
            p = self._params[i]
            exact = None
            if self.sparse_mode == "exact" and idx is not None:
                ex = self._exact.info(i, p.shape[0], step - 1, spec)
                if "momentum_buffer" in fr:
                    ex["buffer_start"] = step
                exact = self._exact.pending(i, step - 1, self._skipped_scalars)
            elif self._exact and idx is None:
                self._flush_param(i)
            if idx is not None and not idx.shape[0]:
                pass              # a step that touches no row: only the counts advance
            elif p.size:
                work = planner.rows_work(
                    rule, spec, p, planner.slot_list(rule, st, spec.uses), row, idx, vals, gs,
                    exact=exact,
                    ref=(spec.group, step, self._ref_state(i, spec.uses), fr) if ref else None,
                    storage=self._storage[i], extras=self._extras(i, spec.uses),
                    key=self._key(i, step), base=self._bases[i],
                    inverse=self.backend.plan_inverse)
                self.backend.run_rows(work)
                if exact is not None:
                    self._exact.mark(i, work.uniq, step)
            elif self._exact and idx is None:
                self._exact.mark_all(i, step)
            self._steps[i] += 1
            st.update(host2)
            if host2:
                self._store.host([i], host2)

    # -------------------------------------------------- engine, for facades
    @property
    def params(self):
        """The parameter arrays in order (the engine's own list: read it, do not
        modify it; groups are added with :meth:`add_param_group`)."""
        return self._groups.params

    @property
    def param_names(self):
        """The parameter names (a new list) when the parameters were given as a dict,
        else None."""
        return None if self._names is None else list(self._names)

    def align_grads(self, grads):
        """``grads`` as :meth:`step` takes them (a list or tuple aligned with the
        parameters, a dict keyed by name, a single array for a single parameter) as a
        list aligned with :attr:`params`; the errors :meth:`step` raises for them."""
        return self._align_grads(grads)

    def check_param_groups(self):
        """Validate the edits of ``param_groups`` as a step does (ValueError naming a
        bad edit; nothing changes) and return their version, a number that changes
        whenever the validated hyperparameters may have changed."""
        self._groups.validated()
        return self._groups.spec_version

    def param_groups_restored(self):
        """Group dicts were rewritten in place (a rollback to saved values): the next
        step or :meth:`check_param_groups` validates them again."""
        self._groups.invalidate()

    def set_row_range(self, i, full_shape, first_row):
        """Declare parameter ``i`` to be rows ``[first_row, first_row + rows)`` of a
        larger tensor of shape ``full_shape`` (the same dtype and trailing shape),
        before it has state: a facade that steps the tensor in pieces (the sharded
        optimizer) gets the whole tensor's result.  Its storage format is chosen for
        the whole tensor (8-bit state or not by the whole tensor's size), and
        stochastic rounding draws the whole tensor's random stream (element indices
        offset by ``first_row`` times the row length).  A 1-D piece with 8-bit state
        that is not empty must start at a multiple of ``storage.Q8_BLOCK`` (the
        tensor's block boundaries).  ValueError on a piece that does not fit or has state."""
        p = self._params[i]
        full_shape = tuple(int(d) for d in full_shape)
        first_row = int(first_row)
        rows = p.shape[0] if p.ndim else 1
        total = full_shape[0] if full_shape else 1
        fits = tuple(p.shape[1:]) == full_shape[1:] if p.ndim else full_shape == ()
        if not fits or not 0 <= first_row <= total - rows:
            raise ValueError(f"parameter {i} of shape {p.shape} is not rows [{first_row}, "
                             f"{first_row + rows}) of a tensor of shape {full_shape}")
        if self._steps[i] or self._state[i]:
            raise ValueError(f"parameter {i} has state: set_row_range comes before its "
                             "first step")
        g = self._group_of(i)
        stg = storage.storage_for(self.rule, _Shape(full_shape, p.dtype), g["state_bits"],
                                  g["bf16_update"])
        if stg.state == "q8" and len(full_shape) <= 1 and rows and first_row % storage.Q8_BLOCK:
            raise ValueError(f"parameter {i}: a piece of a 1-D tensor with 8-bit state must "
                             f"start at a multiple of {storage.Q8_BLOCK} elements, not at "
                             f"{first_row}")
        width = int(np.prod(full_shape[1:], dtype=np.int64)) if len(full_shape) > 1 else 1
        self._storage[i] = stg
        self._bases[i] = first_row * width
        self._plan_version += 1
        self._fast = None

    def _group_of(self, i):
        k = 0
        for g in self.param_groups:
            k += len(g["params"])
            if i < k:
                return g
        raise IndexError(i)

    # ------------------------------------------------------------ exact mode
    def _skipped_scalars(self, group, t_end):
        return self.rule.row(group, t_end, self.rule.host_init(group), ())[0]

    def _flush_param(self, i):
        t = int(self._steps[i])
        rows = self._exact.behind(i, t)
        if rows.shape[0] == 0:
            return
        ex = self._exact.rows[i]
        spec = ex["spec"]
        p = self._params[i]
        work = planner.rows_work(
            self.rule, spec, p, planner.slot_list(self.rule, self._state[i], spec.uses),
            self._skipped_scalars(spec.group, t), rows=rows,
            exact=self._exact.pending(i, t, self._skipped_scalars),
            ref=(spec.group, t, self._ref_state(i, spec.uses), ()) if getattr(
                self.backend, "wants_reference_args", False) else None,
            storage=self._storage[i], extras=self._extras(i, spec.uses), key=self._key(i, t),
            base=self._bases[i])
        self.backend.run_rows(work)
        self._exact.mark(i, rows, t)

    def _flush_changed(self, params, specs, owner):
        """Exact mode: parameters whose hyperparameters changed since their pending
        rows were left behind are brought up to date with the old ones first."""
        for i in params:
            ex = self._exact.rows.get(i)
            if ex is not None and ex["spec"].group != specs[owner[i]].group:
                self._flush_param(i)
                ex["spec"] = specs[owner[i]]

    def flush(self):
        """Exact sparse mode: bring every row of every parameter up to date, as if the
        skipped steps had been dense steps with zero gradient on those rows.  Call it
        before evaluating or exporting parameters; ``state_dict()`` calls it.  A no-op
        in lazy mode."""
        with self._lock:
            self._flush_all()

    def _flush_all(self):
        for i in list(self._exact.rows):
            self._flush_param(i)

    # ------------------------------------------------------------------ state
    def _extras(self, i, uses):
        """[aux, scale0, scale1, scale2] of a stored format (None where absent), or
        None for float32/float64 storage."""
        stg = self._storage[i]
        if stg.native:
            return None
        st = self._state[i]
        names = self.rule.slots + (None,) * (len(uses) - len(self.rule.slots))
        return [st.get(stg.aux) if stg.aux else None] + [
            st.get(n + storage.SCALE_SUFFIX) if (u and n) else None
            for n, u in zip(names, uses)]

    def _key(self, i, step=None):
        """The stochastic-rounding stream key of parameter ``i`` at ``step`` (default:
        the coming step)."""
        if not self._storage[i].stochastic:
            return 0
        if step is None:
            step = int(self._steps[i]) + 1
        return storage.stream_key(self._seeds[i], i, step)

    def _ref_state(self, i, uses):
        st = self._state[i]
        out = {n: st[n] for n, u in zip(self.rule.slots, uses) if u}
        out.update({k: st[k] for k in self._host_keys})
        return out

    def _allocate_state(self, active, specs, owner):
        """Create the state a parameter's group needs; returns {i: fresh slot names}."""
        fresh = {}
        rule = self.rule
        published = []
        for i in active:
            st = self._state[i]
            spec = specs[owner[i]]
            size = len(st)
            for k, v in rule.host_init(spec.group).items():
                st.setdefault(k, v)
            stg = self._storage[i]
            p = self._params[i]
            mine = rule.slots_of(p.shape)
            for name, used in zip(rule.slots, spec.uses):
                if used and name not in st and name in mine:
                    if stg.native:
                        st[name] = self.backend.full(rule.slot_shape(p.shape, name),
                                                     rule.slot_init(spec.group, name), p.dtype)
                    else:
                        st.update(storage.initial_arrays(rule, stg, spec.group, p.shape,
                                                         p.dtype, [name], self.backend.full))
                    fresh.setdefault(i, set()).add(name)
            if stg.aux is not None and stg.aux not in st:
                st.update(storage.initial_arrays(rule, stg, spec.group, p.shape, p.dtype, [],
                                                 self.backend.full))
            if len(st) != size:
                published.append(i)
        for i in published:
            self._store.published(i, self._state[i])
        if fresh:
            self._plan_version += 1
        return {i: tuple(sorted(v)) for i, v in fresh.items()}

    @property
    def state(self):
        """Per-parameter state, keyed by parameter index (read-only view)."""
        return {i: {"step": int(self._steps[i]), **st} for i, st in enumerate(self._state)
                if self._steps[i] or st}

    def state_dict(self):
        """A plain dict in torch's layout plus a format version and the optimizer name.

        ``{"version": 1, "optimizer": "Adam", "state": {index: {"step": int,
        "exp_avg": ndarray, ...}}, "param_groups": [{..., "params": [indices]}]}``
        (and ``"param_names"`` when the parameters were given as a dict).  Arrays
        are copies.  In exact sparse mode the optimizer is flushed first (every row
        brought up to date), so the saved state needs no per-row bookkeeping.
        """
        with self._lock:
            self._groups.validated()      # a bad edit of param_groups is refused here too
            self._flush_all()
            return state_io.state_dict(self)

    def load_state_dict(self, state_dict, *, keep_pending=False):
        """Load a :meth:`state_dict`.  Everything is checked before anything changes:
        optimizer name, version, group structure, hyperparameters, parameter names
        (state is matched by name when both sides have names), state names (every
        slot the configuration uses and every host scalar must be present), shapes
        and dtypes (state arrays must have the parameter's dtype: no downcast), step
        counts and host scalars.  With ``keep_pending`` (a facade loading the state
        its user edited in place), exact mode's pending rows of the parameters that
        keep a state stay pending (their state arrays still lag by those rows).
        """
        with self._lock:
            state_io.load_state_dict(self, state_dict)
            if keep_pending:
                for i in [i for i in self._exact.rows if not self._state[i]]:
                    del self._exact.rows[i]
            else:
                self._exact.clear()
            self._groups.invalidate()
            self._plan = None
            self._plan_version += 1

    def _capture(self):
        """A private, non-flushing copy of everything a step changes (checkpoint
        rollback)."""
        import copy
        with self._lock:
            return (copy.deepcopy(self._state), self._steps.copy(),
                    copy.deepcopy(self._exact.rows),
                    [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups],
                    [self.backend.to_host(p) for p in self._params])

    def _restore(self, captured):
        state, steps, exact, groups, params = captured
        with self._lock:
            for p, saved in zip(self._params, params):
                p[...] = saved
            self._state = state
            self._steps = self._store.counts(steps, len(steps))
            self._exact.rows = exact
            self._store.replaced(self._state)
            for g, h in zip(self.param_groups, groups):
                ps = g["params"]
                g.clear()
                g.update({**h, "params": ps})
            self._groups.invalidate()
            self._plan = None
            self._plan_version += 1

    def __repr__(self):
        lines = [f"{self.rule.name} (backend={self.backend.name})"]
        for gi, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v!r}" for k, v in g.items() if k != "params")
            lines.append(f"  group {gi}: {len(g['params'])} params, {hyper}")
        return "\n".join(lines)


class _Shape:
    """What :func:`storage.storage_for` reads of a parameter: shape and dtype."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = shape, dtype


def require_features(bk, rule, group, sparse_mode):
    """Refuse what backend ``bk`` lacks for ``rule`` with ``group``'s options in
    ``sparse_mode`` (the capability table, before anything is written)."""
    if rule.layout == "rowwise":
        bk.require("rowwise", f"the row-wise rule {rule.name}")
    if rule.per_tensor:
        bk.require("tensor_norms", f"the per-tensor rule {rule.name}")
    if rule.matrix is not None:
        bk.require("matrix", f"the matrix rule {rule.name}")
    if rule.factored:
        bk.require("factored", f"the factored rule {rule.name}")
    if any(fused.flags(group)[1:]):
        bk.require("fused_options")
    bk.require("sparse_exact" if sparse_mode == "exact" else "sparse_lazy")


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
