"""Drop-in ``torch.optim`` optimizers that run fastopt's kernels.

::

    import torch
    import fastopt.torch

    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3)     # was torch.optim.AdamW
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()

Classes: :class:`SGD`, :class:`Adam`, :class:`AdamW`, :class:`RMSprop`,
:class:`Adagrad`, :class:`Adamax`, :class:`NAdam` (torch's constructor signatures and
defaults), :class:`Lion` and :class:`RowWiseAdagrad` (fastopt's defaults).  Each is a
``torch.optim.Optimizer`` subclass, so ``zero_grad``, step and state_dict hooks,
``param_groups`` edits, ``add_param_group`` and every ``torch.optim.lr_scheduler``
work as with torch's own classes.  Extra keyword arguments:

* ``backend``: ``"auto"`` (CUDA tensors -> ``"cuda"``, CPU tensors -> the fastest
  CPU backend), ``"numba"``, ``"cython"``, ``"numpy"`` (the reference), ``"cuda"``;
* ``sparse_mode``: ``"lazy"`` (default; a sparse gradient updates only the rows it
  touches, state included, like ``torch.optim.SparseAdam``) or ``"exact"`` (rows
  are caught up in closed form, see :mod:`fastopt.exact_mode`; call
  :meth:`~_Optimizer.flush` before reading the parameters; ``state_dict()`` does);
* the fused options ``clip_value``, ``l1``, ``param_min``, ``param_max``,
  ``max_norm`` (per group, off by default; see :mod:`fastopt.rules.fused`).

Semantics
---------
* ``step(closure=None)`` reads ``p.grad``: dense, or sparse COO with one sparse
  dimension (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``,
  coalesced or not; read as :class:`fastopt.RowSparse` without densifying; duplicate
  rows are summed deterministically).  A parameter whose ``grad`` is ``None`` is
  skipped and its state is not touched.  A sparse ``grad`` with no rows (an empty
  batch) is a step that touches no row, as torch's SparseAdam and Adagrad count it:
  the state is created if missing and ``step`` advances (lazy mode: nothing else
  changes; exact mode: every row falls one step behind, to be caught up).  The
  closure runs under ``torch.enable_grad()`` and its loss is returned.
* Parameters must be contiguous float32 or float64 tensors; they are updated in
  place (CPU tensors through NumPy views of their memory, CUDA tensors through
  ``numba.cuda.as_cuda_array``), with their autograd version counters bumped as an
  in-place torch op would.  bfloat16/float16 parameters are refused (the
  low-precision formats of fastopt.storage are not wired into this adapter yet).
* State lives in ``self.state[p]`` as torch tensors under torch's names
  (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``,
  ``sum``, ``square_avg``, ``grad_avg``, ``exp_inf``, ``mu_product``), so
  ``state_dict()`` is torch's format and loads into the matching ``torch.optim``
  class (and a ``torch.optim`` state dict loads here).  ``step`` and
  ``mu_product`` are 0-d tensors of torch's scalar dtype (float32, or float64 when
  that is the default dtype), as torch keeps them; they are views of one buffer per
  optimizer, so one vectorized add advances every step count.  RowWiseAdagrad's
  ``sum`` has shape ``(param.shape[0],)``; SGD and Lion keep no ``step``.
  Loading is checked before anything changes: unknown state names, wrong shapes,
  bad step counts, unsupported flags raise ``ValueError`` naming them.
* Refused torch arguments (``ValueError`` naming them): ``capturable=True``,
  ``differentiable=True``, ``Adam(decoupled_weight_decay=True)`` (use
  :class:`AdamW`), tensor-valued hyperparameters.  ``foreach`` and ``fused`` are
  accepted and ignored (the step is always one fused multi-tensor pass).
  ``maximize`` and ``amsgrad`` are supported.  Sparse gradients are accepted by
  every class (torch's Adam/AdamW/... refuse them).

Design
------
The adapter keeps torch's state (tensors in ``self.state``) as the only copy and
hands fastopt's planner (:mod:`fastopt.planner`) NumPy (or device) views of the
parameters and state tensors.  The dense tensors of a step are planned once into
multi-tensor buckets (:func:`fastopt.planner.dense_buckets`: pointer, chunk and
scalar-row tables) and the plan is reused while nothing changed: the step's
fast path reads every ``p.grad`` and its data pointer with C-level ``map`` calls
(no per-parameter Python statements), checks the gradient's dtype, size and
contiguity, the parameters' data pointers and the identity of every state tensor,
then writes one gradient column and one scalar row per bucket and launches one
kernel.  Anything different (a ``None`` gradient appearing, a replaced state
tensor, a new group, ``p.data = ...``) falls back to the full path, which
re-validates and re-plans.  Hyperparameter edits (schedulers) are re-checked per
group and only change the scalar rows.

A state tensor's *memory* is assumed not to move behind its tensor object
(``state["exp_avg"].data = ...`` is not detected; replacing the tensor,
``opt.state[p] = {}`` or ``opt.state.clear()`` is).
"""

import bisect
import collections
import math
import numbers
from operator import attrgetter

import numpy as np
import torch

from . import backends, planner
from . import rules as registry
from .exact_mode import ExactTracker
from .param_groups import refuse_overlaps
from .storage import OPTIONS as _STORAGE_OPTIONS
from .optimizer import require_features
from .rules import fused
from .sparse import RowSparse, checked_rows

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "Lion",
           "RowWiseAdagrad", "CLASSES"]

_T = torch.Tensor
_GRAD = attrgetter("grad")
_NBYTES = attrgetter("nbytes")
_PTR = _T.data_ptr
_CONTIG = _T.is_contiguous
_STRIDED = torch.strided
_SPARSE = torch.sparse_coo
_NP_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}
_MAX_STEP = 2 ** 53

#: torch-only arguments fastopt cannot honour: key -> (refused value test, message)
_REFUSED = {
    "capturable": "capturable=True (CUDA-graph capturable step) is not supported: fastopt "
                  "computes its per-step scalars on the host; use capturable=False",
    "differentiable": "differentiable=True is not supported: fastopt's kernels update "
                      "parameters in place outside autograd; use differentiable=False",
    "decoupled_weight_decay": "Adam(decoupled_weight_decay=True) is not supported; use "
                              "fastopt.torch.AdamW (the same update)",
}
_NO_OP = ("foreach", "fused")


class _ParamState(dict):
    """One parameter's state dict.  Every write bumps the class-wide counter
    ``_ParamState.writes``, so that a step can tell in O(1) that no state tensor was
    replaced since the plan was made.  ``state_dict()`` hands out plain dicts."""

    writes = 0

    def __setitem__(self, key, value):
        _ParamState.writes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        _ParamState.writes += 1
        super().__delitem__(key)

    def clear(self):
        _ParamState.writes += 1
        super().clear()

    def pop(self, *args):
        _ParamState.writes += 1
        return super().pop(*args)

    def popitem(self):
        _ParamState.writes += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        _ParamState.writes += 1
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        _ParamState.writes += 1
        super().update(*args, **kwargs)

    def __ior__(self, other):
        _ParamState.writes += 1
        return super().__ior__(other)

    def __reduce__(self):
        return (_ParamState, (dict(self),))


class _State(collections.defaultdict):
    """``optimizer.state``: torch's ``defaultdict(dict)`` whose values are
    :class:`_ParamState` dicts and which counts changes of its own entries, so that
    a step can tell in O(1) that no parameter's state dict was added, replaced or
    removed."""

    def __init__(self, data=()):
        super().__init__(_ParamState, data)
        self.changes = 0

    def __setitem__(self, key, value):
        self.changes += 1
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.changes += 1
        super().__delitem__(key)

    def clear(self):
        self.changes += 1
        super().clear()

    def pop(self, *args):
        self.changes += 1
        return super().pop(*args)

    def popitem(self):
        self.changes += 1
        return super().popitem()

    def setdefault(self, key, default=None):
        self.changes += 1
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        self.changes += 1
        super().update(*args, **kwargs)

    def __ior__(self, other):
        self.changes += 1
        return super().__ior__(other)

    def __reduce__(self):
        return (_State, (), None, None, iter(self.items()))


def _frozen(v):
    if isinstance(v, (list, tuple)):
        return (type(v),) + tuple(_frozen(x) for x in v)
    try:
        hash(v)
    except TypeError:
        return (type(v), id(v))
    return (type(v), v)


def _first_tensor(params):
    for x in params:
        if isinstance(x, dict):
            ps = x.get("params")
            if isinstance(ps, _T):
                return ps
            for y in (ps or ()):
                t = y[1] if isinstance(y, tuple) else y
                if isinstance(t, _T):
                    return t
        elif isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], _T):
            return x[1]
        elif isinstance(x, _T):
            return x
    return None


def _group_tensors(ps):
    if isinstance(ps, _T):
        return [ps]
    if isinstance(ps, set):
        raise TypeError("optimizer parameters need to be organized in ordered collections, "
                        "but the ordering of tensors in sets will change between runs. "
                        "Please use a list instead.")
    return [x[1] if isinstance(x, tuple) else x for x in ps]


def _cuda_simulator():
    from .backends import cuda as cb
    return bool(cb.cuda is not None and cb._SIM)


class _HostCAI:
    """Numba's CUDA simulator only: a CPU tensor's memory shown through
    ``__cuda_array_interface__`` (the simulator's device pointers are host
    pointers), so the CUDA backend's plumbing can be tested without a GPU."""

    def __init__(self, t):
        self._t = t
        self.__cuda_array_interface__ = {
            "data": (t.data_ptr(), False), "shape": tuple(t.shape), "strides": None,
            "typestr": np.dtype(t.numpy().dtype).str, "version": 2}


class _Plan:
    """A reusable dense plan and the identities it was built for."""
    __slots__ = ("dense_idx", "dense_arr", "all_params", "buckets", "rows", "nbytes",
                 "state_obj", "state_changes", "param_writes", "active", "pptrs", "starts",
                 "ends", "what", "last_gptr", "starts_list", "ends_list", "by_rows",
                 "sparse_idx", "none_idx", "nb_arr")


class _Optimizer(torch.optim.Optimizer):
    """Base of the ``fastopt.torch`` classes (see the module docstring)."""

    rule = None
    #: torch-only keys of the group dicts, with their defaults
    _torch_flags = {}
    #: torch keeps a ``step`` tensor in the state
    _stepful = True
    #: torch creates the state at construction (Adagrad)
    _eager_state = False

    # ------------------------------------------------------------ construction
    def _fo_setup(self, params, hyper, flags, fused_opts, backend, sparse_mode):
        rule = self.rule
        if sparse_mode not in ("lazy", "exact"):
            raise ValueError(f"Invalid sparse_mode: {sparse_mode!r} (use 'lazy' or 'exact')")
        self.sparse_mode = sparse_mode
        defaults = {**hyper, **flags, **fused_opts}
        if isinstance(params, _T):
            raise TypeError("params argument given to the optimizer should be an iterable of "
                            "Tensors or dicts, but got " + torch.typename(params))
        params = list(params)
        sample = _first_tensor(params)
        self._fo_backend = self._fo_resolve(backend, sample)
        self._fo_keys = tuple(k for k in defaults)
        self._fo_sdt = torch.float64 if torch.get_default_dtype() == torch.float64 \
            else torch.float32
        self._fo_init_caches()
        self.defaults = defaults          # _fo_check_hyper reads them
        self._fo_check_hyper(defaults, "the arguments")
        super().__init__(params, defaults)
        self.state = _State(self.state)
        if self._eager_state:
            self._fo_eager_init(range(len(self.param_groups)))

    def _fo_init_caches(self):
        self._fo_plan = None
        self._fo_snap = None
        self._fo_specs = None
        self._fo_params = []
        self._fo_arrays = []
        self._fo_owner = []
        self._fo_views = {}          # id(param) -> (tensor, data_ptr, shape, dtype, array)
        self._fo_sviews = {}         # the same for the state tensors of the last full step
        self._fo_exact = ExactTracker()
        self._fo_scalars = {}        # name -> (torch buffer, numpy view, [0-d views])
        self._fo_slots = {}          # flat index -> {slot name: array view} (active params)
        self._fo_host_keys = tuple(self.rule.host_init(self.rule.defaults))

    def _fo_resolve(self, name, sample):
        if isinstance(name, str) and name == "auto":
            name = "cuda" if (sample is not None and sample.is_cuda) else backends.AUTO_CPU
        bk = backends.resolve(name)
        return bk

    def _fo_check_hyper(self, group, where):
        """Validate one group's values (torch flags, rule hyperparameters, fused
        options); returns the checked rule/fused values.  Raises naming the value."""
        name = type(self).__name__
        for k in _STORAGE_OPTIONS:
            if k in group:
                raise ValueError(f"fastopt.torch.{name}: {k!r} in a param group is not "
                                 f"supported by fastopt.torch yet (it would be ignored); the "
                                 f"NumPy optimizer classes take it ({where})")
        merged = {**self.defaults, **group}
        for k in self._fo_keys:
            v = merged.get(k)
            if isinstance(v, _T) or (isinstance(v, (tuple, list))
                                     and any(isinstance(x, _T) for x in v)):
                raise ValueError(f"fastopt.torch.{name}: {k} as a Tensor is not supported "
                                 f"({where}); pass a Python number")
        for k in self._torch_flags:
            v = merged.get(k)
            if k in _REFUSED:
                if v not in (False, None):
                    raise ValueError(f"fastopt.torch.{name}: {_REFUSED[k]} ({where})")
            elif k in _NO_OP and v not in (None, True, False):
                raise ValueError(f"fastopt.torch.{name}: Invalid {k}: {v!r} (True, False or "
                                 f"None; fastopt ignores it) ({where})")
        rule = self.rule
        try:
            checked = rule.check_group({k: merged[k] for k in rule.defaults if k in merged})
        except ValueError as exc:
            raise ValueError(f"fastopt.torch.{name}: {exc} ({where})") from None
        self._fo_check_backend(checked)
        if self.sparse_mode == "exact":
            reason = rule.exact_reason(checked) if rule.catch_up is not None else \
                "it has no closed form for skipped steps"
            reason = reason or fused.exact_reason(checked)
            if reason is not None:
                raise ValueError(f"fastopt.torch.{name}: sparse_mode='exact' is not possible "
                                 f"for this configuration: {reason}; use sparse_mode='lazy' "
                                 f"({where})")
        return checked

    def _fo_check_backend(self, checked):
        require_features(self._fo_backend, self.rule, checked, self.sparse_mode)

    def _fo_array(self, t, where):
        """The NumPy (or device) array viewing parameter tensor ``t`` (cached)."""
        if not isinstance(t, _T):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is "
                            + torch.typename(t))
        hit = self._fo_views.get(id(t))
        ptr = t.data_ptr() if t.layout is _STRIDED else None
        if hit is not None and hit[0] is t and hit[1] == ptr and hit[2] == t.shape \
                and hit[3] == t.dtype:
            return hit[4]
        arr = self._fo_view_of(t, where)
        self._fo_views[id(t)] = (t, ptr, t.shape, t.dtype, arr)
        return arr

    def _fo_view_of(self, t, where, kind="parameter"):
        if t.layout is not _STRIDED:
            raise TypeError(f"{where}: a {t.layout} tensor; fastopt updates dense (strided) "
                            "tensors")
        if t.dtype not in _NP_DTYPES:
            if t.dtype == torch.bfloat16:
                raise TypeError(f"{where}: bfloat16 {kind}s are not supported yet by "
                                "fastopt.torch; use float32 or float64 (fastopt's optimizer "
                                "classes take bfloat16 NumPy arrays, state_bits=16/8 and "
                                "bf16_update: see docs/low-precision.md)")
            raise TypeError(f"{where}: dtype {t.dtype} is not supported (float32 or float64)")
        if not t.is_contiguous():
            raise ValueError(f"{where}: the tensor is not contiguous (strides {t.stride()}); "
                             "fastopt updates contiguous memory in place")
        bk = self._fo_backend
        t = t.detach()
        if bk.memory == "device":
            if t.is_cuda:
                return bk.as_param(t, where)
            if t.device.type == "cpu" and _cuda_simulator():
                return bk.as_param(_HostCAI(t), where)
            raise TypeError(f"{where}: a {t.device} tensor, but backend 'cuda' updates CUDA "
                            "tensors; move the model to the GPU or use a CPU backend")
        if t.device.type != "cpu":
            raise TypeError(f"{where}: a {t.device} tensor needs backend='cuda' (or 'auto'); "
                            f"backend {bk.name!r} runs on the CPU")
        return bk.as_param(t.numpy(), where)

    def add_param_group(self, param_group):
        """torch's ``add_param_group``, after fastopt's checks (tensor dtype, device,
        layout, overlaps, hyperparameters); nothing is added when a check fails."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        tensors = _group_tensors(param_group["params"])
        gi = len(self.param_groups)
        where = f"param group {gi}"
        self._fo_check_hyper({k: v for k, v in param_group.items() if k != "params"}, where)
        start = sum(len(g["params"]) for g in self.param_groups)
        arrays = [self._fo_array(t, f"parameter {start + k}") for k, t in enumerate(tensors)]
        existing = [self._fo_array(p, f"parameter {k}")
                    for k, p in enumerate(p for g in self.param_groups for p in g["params"])]
        refuse_overlaps(existing + arrays, self._fo_backend)
        super().add_param_group(param_group)
        self._fo_snap = None
        self._fo_plan = None
        if self._eager_state and "_fo_ready" in self.__dict__:
            self._fo_eager_init([gi])

    # ------------------------------------------------------------------ groups
    def _fo_groups(self):
        """``(specs, owner)`` for the current groups; re-checks what changed and
        raises (changing nothing) on a bad edit."""
        groups = self.param_groups
        snap = self._fo_snap
        if snap is not None and len(snap) == len(groups):
            keys = self._fo_keys
            changed = []
            for gi, (g, (vals, mut, ids)) in enumerate(zip(groups, snap)):
                if list(map(id, g["params"])) != ids:
                    return self._fo_revalidate()
                get = g.get
                if not (all(get(k) is v for k, v in zip(keys, vals))
                        and all(_frozen(vals[i]) == f for i, f in mut)):
                    changed.append(gi)
            if not changed:
                return self._fo_specs, self._fo_owner
            specs = list(self._fo_specs)
            for gi in changed:        # check every changed group before keeping any
                specs[gi] = planner.group_spec(
                    self.rule, self._fo_check_hyper(groups[gi], f"param group {gi}"))
            new_snap = list(snap)
            for gi in changed:
                old = self._fo_specs[gi]
                if (old.uses, old.fixed, old.switches, old.by_rows) != \
                        (specs[gi].uses, specs[gi].fixed, specs[gi].switches, specs[gi].by_rows):
                    self._fo_plan = None
                new_snap[gi] = self._fo_snapshot(groups[gi])
            self._fo_specs = specs
            self._fo_snap = new_snap
            return specs, self._fo_owner
        return self._fo_revalidate()

    def _fo_snapshot(self, g):
        vals = tuple(g.get(k) for k in self._fo_keys)
        mut = tuple((i, _frozen(v)) for i, v in enumerate(vals) if isinstance(v, (list, dict)))
        return vals, mut, list(map(id, g["params"]))

    def _fo_revalidate(self):
        specs, flat, arrays, owner = [], [], [], []
        for gi, g in enumerate(self.param_groups):
            specs.append(planner.group_spec(
                self.rule, self._fo_check_hyper(g, f"param group {gi}")))
            for p in _group_tensors(g["params"]):
                arrays.append(self._fo_array(p, f"parameter {len(flat)}"))
                flat.append(p)
                owner.append(gi)
        refuse_overlaps(arrays, self._fo_backend)
        if [id(p) for p in flat] != [id(p) for p in self._fo_params]:
            live = {id(p) for p in flat}
            self._fo_views = {k: v for k, v in self._fo_views.items() if k in live}
            if self._fo_exact:               # pending rows, under the old indices
                self._fo_flush_all()
            self._fo_exact.clear()
            self._fo_scalars = {}            # fresh buffers; values are adopted again
            self._fo_slots = {}
        self._fo_params, self._fo_arrays, self._fo_owner = flat, arrays, owner
        self._fo_specs = specs
        self._fo_snap = [self._fo_snapshot(g) for g in self.param_groups]
        self._fo_plan = None
        return specs, owner

    # ----------------------------------------------------------- scalar state
    def _fo_scalar_names(self):
        return (("step",) if self._stepful else ()) + self._fo_host_keys

    def _fo_buffer(self, name):
        """(buffer tensor, NumPy view, list of 0-d views) of a per-parameter scalar
        (``step``, ``mu_product``), one element per parameter.  Internal step counts
        are kept for SGD and Lion too (exact mode needs them) but not exposed."""
        n = len(self._fo_params)
        buf = self._fo_scalars.get(name)
        if buf is None or buf[1].shape[0] < n:
            t = torch.zeros(max(n, 1), dtype=self._fo_sdt)
            buf = self._fo_scalars[name] = (t, t.numpy(), [None] * max(n, 1))
        return buf

    def _fo_scalar_view(self, name, i):
        t, _, views = self._fo_buffer(name)
        v = views[i]
        if v is None:
            v = views[i] = t[i]
        return v

    def _fo_host(self, i):
        if not self._fo_host_keys:
            return {}
        return {k: float(self._fo_scalars[k][1][i]) for k in self._fo_host_keys}

    # ------------------------------------------------------------------ state
    def _fo_state_arrays(self, i, p, spec, st, adopt, cache):
        """Phase 1 of a full step for parameter ``i``: check its existing state
        (tensor type, shape, dtype, device, contiguity, scalar values) and return
        ``{slot: array}``; scalars to adopt into the buffers go to ``adopt``."""
        rule = self.rule
        out = {}
        shape = rule.slot_shape(tuple(p.shape))
        for name, used in zip(rule.slots, spec.uses):
            t = st.get(name)
            if t is None or not used:
                continue
            where = f"state {name!r} of parameter {i}"
            if not isinstance(t, _T):
                raise TypeError(f"{where} is a {type(t).__name__}; expected a torch.Tensor")
            if tuple(t.shape) != shape or t.dtype != p.dtype or t.device != p.device:
                raise ValueError(f"{where} has shape {tuple(t.shape)}, dtype {t.dtype} on "
                                 f"{t.device}; expected {shape}, {p.dtype} on {p.device}")
            out[name] = self._fo_state_array(t, where, cache)
        step = None
        for name in self._fo_scalar_names():
            v = st.get(name)
            if v is None:
                continue
            if v is not self._fo_scalar_view(name, i):
                value = _scalar_value(name, v, i)
                adopt.append((i, name, value))
            else:
                value = float(self._fo_scalars[name][1][i])
            if name == "step":
                step = value
        if self._stepful:
            held = [n for n in rule.slots + self._fo_host_keys if st.get(n) is not None]
            if step is None and held:
                raise ValueError(f"state of parameter {i} has {held} but no 'step'")
            missing = [n for n in self._fo_host_keys if st.get(n) is None]
            if step and missing:
                raise ValueError(f"state of parameter {i} (step {step:g}) is missing {missing}")
        return out

    def _fo_state_array(self, t, where, cache=None):
        hit = self._fo_sviews.get(id(t))
        ptr = t.data_ptr()
        if hit is None or hit[0] is not t or hit[1] != ptr:
            hit = (t, ptr, t.shape, t.dtype, self._fo_view_of(t, where, kind="state tensor"))
        if cache is not None:
            cache[id(t)] = hit
        return hit[4]

    def _fo_allocate(self, i, p, spec, st, arrays):
        """Phase 2: create the state the group's configuration uses and is missing
        (torch's layout); returns the fresh slot names."""
        rule = self.rule
        fresh = []
        for name in self._fo_scalar_names():
            if st.get(name) is None:        # a new state (phase 1 refused a partial one)
                init = 0.0 if name == "step" else rule.host_init(spec.group)[name]
                self._fo_buffer(name)[1][i] = init
                st[name] = self._fo_scalar_view(name, i)
        for name, used in zip(rule.slots, spec.uses):
            if used and name not in arrays:
                init = rule.slot_init(spec.group, name)
                with torch.no_grad():
                    if rule.layout == "rowwise":
                        t = torch.full(rule.slot_shape(tuple(p.shape)), init, dtype=p.dtype,
                                       device=p.device)
                    else:
                        t = torch.full_like(p, init, memory_format=torch.contiguous_format)
                st[name] = t
                arrays[name] = self._fo_state_array(t, f"state {name!r}", self._fo_sviews)
                fresh.append(name)
        return tuple(sorted(fresh))

    def _fo_eager_init(self, group_indices):
        """Adagrad's state exists from construction, as torch's does."""
        specs, owner = self._fo_groups()
        gis = set(group_indices)
        for i, p in enumerate(self._fo_params):
            if owner[i] in gis and not self.state.get(p):
                self._fo_allocate(i, p, specs[owner[i]], self.state[p], {})
        self._fo_ready = True
        self._fo_plan = None

    # ------------------------------------------------------------------- step
    def step(self, closure=None):
        """One update of every parameter that has a gradient; returns the closure's
        loss (the closure runs under ``torch.enable_grad()``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._fo_backend.memory == "device":
            self._fo_device_step()
        else:
            self._fo_step()
        return loss

    def _fo_device_step(self):
        """CUDA: fastopt's kernels run on numba's default stream, the legacy default
        stream, which torch's default stream also is; work queued on another torch
        stream (``torch.cuda.stream(s)``, non-blocking) is waited for before the step
        and the step is waited for after it."""
        stream = None
        if torch.cuda.is_available():
            cur = torch.cuda.current_stream()
            if cur != torch.cuda.default_stream(cur.device):
                stream = cur
                stream.synchronize()
        self._fo_step()
        if stream is not None:
            from numba import cuda
            cuda.default_stream().synchronize()

    def _fo_step(self):
        specs, owner = self._fo_groups()
        params = self._fo_params
        grads = list(map(_GRAD, params))
        plan = self._fo_plan
        matched = self._fo_match(plan, grads) if plan is not None else None
        if matched is None:
            return self._fo_full_step(specs, owner, grads)
        gptr, bg = matched
        # fast path: the plan holds; only the non-bucket gradients are read one by one
        rows = self._fo_rows(grads, plan.by_rows, plan.sparse_idx)
        self._fo_refuse_aliases(plan, gptr, rows)
        if rows:
            self._fo_run_rows(rows, specs, owner, {})
        if plan.dense_idx:
            self._fo_run_dense(plan, gptr, bg, specs, owner, {})
        torch.autograd.graph.increment_version(plan.active)

    def _fo_match(self, plan, grads):
        """The bucket gradients' addresses when the plan still holds, else None."""
        st = self.state
        if st is not plan.state_obj or getattr(st, "changes", None) != plan.state_changes \
                or _ParamState.writes != plan.param_writes:
            return None
        try:
            if list(map(_PTR, plan.active)) != plan.pptrs:
                return None
            bg = grads if plan.all_params else [grads[i] for i in plan.dense_idx]
            # the size in bytes and contiguity (torch's grad setter checks the dtype;
            # a same-size non-float dtype cannot be a gradient)
            if list(map(_NBYTES, bg)) != plan.nbytes or not all(map(_CONTIG, bg)):
                return None
            gptr = np.fromiter(map(_PTR, bg), np.int64, len(bg))
        except (AttributeError, TypeError, RuntimeError):
            return None               # a None, sparse or storage-less gradient
        for i in plan.by_rows:
            g = grads[i]
            if g is None or g.layout is not _STRIDED:
                return None
        for i in plan.sparse_idx:
            g = grads[i]
            if g is None or g.layout is not _SPARSE:
                return None
        for i in plan.none_idx:
            if grads[i] is not None:
                return None
        return gptr, bg

    def _fo_dense_grad(self, i, p, g):
        """A dense gradient checked against its parameter (a contiguous copy when it
        is not contiguous)."""
        if g.dtype != p.dtype:
            raise TypeError(f"gradient {i}: dtype {g.dtype} does not match the parameter's "
                            f"{p.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"gradient {i}: shape {tuple(g.shape)} does not match the "
                             f"parameter's {tuple(p.shape)}")
        if g.device != p.device:
            raise ValueError(f"gradient {i} is on {g.device}, the parameter on {p.device}")
        if not g.is_contiguous():
            with torch.no_grad():
                g = g.contiguous()
        return g

    def _fo_rows(self, grads, by_rows, sparse_idx):
        """Validated row work items ``(i, idx or None, values, keep-alive)`` of the
        sparse gradients and of the dense gradients of row-updated parameters: one
        per index of ``sparse_idx`` and ``by_rows``, in that order.  A sparse gradient
        with no rows is kept (``idx`` of length 0): it is a step that touches no row,
        as torch's SparseAdam and Adagrad count it, so the parameter is active (its
        state exists and its step count advances) like any other with a gradient."""
        rows = []
        params, arrays = self._fo_params, self._fo_arrays
        for i in sparse_idx:
            rows.append(self._fo_sparse_rows(i, params[i], arrays[i], grads[i]))
        for i in by_rows:
            g = self._fo_dense_grad(i, params[i], grads[i])
            rows.append((i, None, self._fo_grad_array(g, arrays[i]), g))
        return rows

    def _fo_grad_array(self, g, like):
        g = g.detach()
        if self._fo_backend.memory == "device":
            return self._fo_device(g, "gradient")
        return g.numpy().reshape(like.shape)

    def _fo_device(self, t, where):
        bk = self._fo_backend
        if t.is_cuda:
            return bk.as_param(t, where) if t.numel() else bk.full(tuple(t.shape), 0, t.dtype)
        return bk.as_param(_HostCAI(t), where)

    def _fo_sparse_rows(self, i, p, arr, g):
        where = f"gradient {i}"
        if g.dtype != p.dtype:
            raise TypeError(f"{where}: dtype {g.dtype} does not match the parameter's {p.dtype}")
        if g.sparse_dim() != 1 or tuple(g.shape) != tuple(p.shape):
            raise ValueError(f"{where}: a sparse COO gradient of shape {tuple(g.shape)} with "
                             f"sparse_dim={g.sparse_dim()}; fastopt takes row-sparse gradients "
                             f"(sparse_dim=1, the parameter's shape {tuple(p.shape)}), as "
                             "nn.Embedding(sparse=True) produces")
        g = g.detach()
        idx_t, vals_t = g._indices()[0], g._values()
        if not vals_t.is_contiguous():
            vals_t = vals_t.contiguous()
        if self._fo_backend.memory == "device":
            idx = idx_t.cpu().numpy()
            nnz = idx.shape[0]
            if nnz:
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= p.shape[0]:
                    bad = lo if lo < 0 else hi
                    raise IndexError(f"{where}: sparse index {bad} is out of range for a "
                                     f"parameter with {p.shape[0]} rows")
            D = int(np.prod(tuple(p.shape[1:]), dtype=np.int64))
            vals = self._fo_device(vals_t.reshape(nnz, D), where) if nnz else None
            return (i, idx.astype(np.int64, copy=False), vals, (idx_t, vals_t))
        idx, vals = checked_rows(RowSparse(idx_t.numpy(), vals_t.numpy()), arr, where)
        return (i, idx, vals, (idx_t, vals_t))

    def _fo_full_step(self, specs, owner, grads):
        """Classify and check everything, allocate state, plan, run; caches the
        plan for the next steps when nothing was freshly allocated."""
        if not isinstance(self.state, _State):
            self.state = _State(self.state)
        rule = self.rule
        params, arrays = self._fo_params, self._fo_arrays
        # ---- phase 1: checks (nothing is written) ----
        arrays = self._fo_arrays = [self._fo_array(p, f"parameter {i}")
                                    for i, p in enumerate(params)]
        refuse_overlaps(arrays, self._fo_backend)
        dense_i, dense_g, by_rows, sparse_idx, none_idx = [], [], [], [], []
        for i, (p, g) in enumerate(zip(params, grads)):
            if g is None:
                none_idx.append(i)
            elif g.layout is _STRIDED:
                if specs[owner[i]].by_rows:
                    by_rows.append(i)
                else:
                    dense_i.append(i)
                    dense_g.append(self._fo_dense_grad(i, p, g))
            elif g.layout is _SPARSE:
                sparse_idx.append(i)
            else:
                raise TypeError(f"gradient {i}: layout {g.layout} is not supported (dense, "
                                "or sparse COO with one sparse dimension)")
        rows = self._fo_rows(grads, by_rows, sparse_idx)
        # every parameter with a gradient is active (an empty sparse one included), so
        # the parameters the plan lists (dense_idx, sparse_idx, by_rows) are exactly
        # those whose state is allocated, checked and kept in _fo_slots below
        active = dense_i + sparse_idx + by_rows
        state = self.state
        adopt, st_arrays, cache = [], {}, {}
        for i in active:
            p = params[i]
            st = state.get(p)
            st_arrays[i] = self._fo_state_arrays(i, p, specs[owner[i]], st, adopt, cache) \
                if st else {}
        gptr = np.array([g.data_ptr() for g in dense_g], dtype=np.int64)
        plan = _Plan()
        plan.dense_idx = dense_i
        plan.active = [params[i] for i in active]
        self._fo_set_spans(plan, active, st_arrays)
        self._fo_refuse_aliases(plan, gptr, rows)
        # ---- phase 2: nothing below fails on user input ----
        # views are kept for the state in use only (replaced tensors are let go)
        self._fo_sviews = cache
        keep = set(active) | set(self._fo_exact.rows)
        self._fo_slots = {i: a for i, a in self._fo_slots.items() if i in keep}
        for name in self._fo_scalar_names():
            self._fo_buffer(name)
        for i, name, value in adopt:
            self._fo_scalars[name][1][i] = value
        for i, name, _ in adopt:
            state[params[i]][name] = self._fo_scalar_view(name, i)
        fresh = {}
        for i in active:
            p = params[i]
            st = state.get(p)
            new = st is None
            if new or type(st) is not _ParamState:    # track writes from now on
                st = _ParamState(st or {})
            fr = self._fo_allocate(i, p, specs[owner[i]], st, st_arrays[i])
            if st and state.get(p) is not st:  # (torch creates no entry for stateless SGD)
                state[p] = st
            if fr:
                fresh[i] = fr
        for i in active:
            self._fo_slots[i] = st_arrays[i]
        if rows:
            self._fo_run_rows(rows, specs, owner, fresh)
        tensors = []
        for i in dense_i:
            spec = specs[owner[i]]
            host = self._fo_host(i)
            tensors.append((arrays[i], planner.slot_list(rule, st_arrays[i], spec.uses), spec,
                            (owner[i], int(self._fo_buffer("step")[1][i]) if self._stepful
                             else 0, tuple(host.values()), fresh.get(i, ()))))
        plan.buckets = planner.dense_buckets(rule, self._fo_backend, tensors)
        plan.rows = [[(dense_i[m[0]], owner[dense_i[m[0]]],
                       np.array([dense_i[k] for k in m], dtype=np.int64)) for m in b.row_members]
                     for b in plan.buckets]
        plan.dense_arr = np.array(dense_i, dtype=np.int64)
        plan.all_params = len(dense_i) == len(params)
        if dense_i:
            self._fo_run_dense(plan, gptr, dense_g, specs, owner, fresh)
        torch.autograd.graph.increment_version(plan.active)
        if fresh or self._fo_backend.name == "numpy":
            self._fo_plan = None
            return
        # remember what this plan was built for
        plan.nbytes = [params[i].nbytes for i in dense_i]
        plan.by_rows = by_rows
        plan.sparse_idx = sparse_idx
        plan.none_idx = none_idx
        plan.state_obj = state
        plan.state_changes = state.changes
        plan.param_writes = _ParamState.writes
        plan.pptrs = list(map(_PTR, plan.active))
        self._fo_plan = plan

    # ---------------------------------------------------------------- aliasing
    def _fo_set_spans(self, plan, active, st_arrays):
        bk = self._fo_backend
        spans = []
        for i in active:
            for a, what in [(self._fo_arrays[i], f"parameter {i}")] + [
                    (v, f"state {k!r} of parameter {i}") for k, v in st_arrays[i].items()]:
                nb = a.size * a.dtype.itemsize
                if nb:
                    lo = bk.address(a)
                    spans.append((lo, lo + nb, what))
        spans.sort()
        plan.starts_list = [s[0] for s in spans]
        plan.ends_list = [s[1] for s in spans]
        plan.starts = np.array(plan.starts_list, dtype=np.int64)
        plan.ends = np.array(plan.ends_list, dtype=np.int64)
        plan.what = [s[2] for s in spans]
        plan.last_gptr = None
        plan.nb_arr = np.array([self._fo_params[i].nbytes for i in plan.dense_idx],
                               dtype=np.int64)

    def _fo_refuse_aliases(self, plan, gptr, rows):
        """A gradient must not share memory with a parameter or state array of this
        step (the update would read what it writes).  The spans of parameters and
        state do not overlap each other, so each gradient is compared with the span
        that starts last before its end.  The dense gradients' check is skipped when
        their addresses are the previous step's."""
        if not plan.starts_list:
            return
        hit = None
        key = gptr.tobytes()
        if key != plan.last_gptr and gptr.shape[0]:
            hi = gptr + plan.nb_arr
            k = np.searchsorted(plan.starts, hi, side="left") - 1
            bad = (k >= 0) & (plan.ends[np.maximum(k, 0)] > gptr) & (hi > gptr)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                hit = (plan.dense_idx[j], int(k[j]))
            else:
                plan.last_gptr = key
        if hit is None:
            bk = self._fo_backend
            for i, _, vals, _ in rows:
                if vals is None or not vals.size:
                    continue
                lo = bk.address(vals)
                hi = lo + vals.size * vals.dtype.itemsize
                k = bisect.bisect_left(plan.starts_list, hi) - 1
                if k >= 0 and plan.ends_list[k] > lo:
                    hit = (i, k)
                    break
        if hit is not None:
            raise ValueError(f"gradient {hit[0]} shares memory with {plan.what[hit[1]]}; the "
                             "update would read what it writes. Pass a separate gradient "
                             "tensor (e.g. grad.clone())")

    # ------------------------------------------------------------------ runs
    def _fo_run_dense(self, plan, gptr, grads, specs, owner, fresh):
        rule = self.rule
        bk = self._fo_backend
        steps = self._fo_buffer("step")[1]
        ref = getattr(bk, "wants_reference_args", False)
        n = len(plan.dense_idx)
        if self._fo_exact:
            for i in plan.dense_idx:
                self._fo_flush_param(i)
        new_host = []
        for b, rows in zip(plan.buckets, plan.rows):
            scal = []
            for i, gi, members in rows:
                row, host2 = rule.row(specs[gi].group, int(steps[i]) + 1, self._fo_host(i),
                                      fresh.get(i, ()))
                scal.append(row)
                if host2:
                    new_host.append((members, host2))
            work = planner.fill_bucket(b, gptr, grads, scal, None, all_active=len(b.pos) == n)
            if ref:
                work.grads = [self._fo_grad_array(grads[k], self._fo_arrays[plan.dense_idx[k]])
                              for k in b.pos]
                work.ref = [self._fo_ref(i, specs[owner[i]], fresh)
                            for i in (plan.dense_idx[k] for k in b.pos)]
            bk.run_dense(work)
        if plan.all_params:
            steps[:n] += 1
        else:
            steps[plan.dense_arr] += 1
        for members, host2 in new_host:
            for k, v in host2.items():
                self._fo_scalars[k][1][members] = v
        if self._fo_exact:
            for i in plan.dense_idx:
                self._fo_exact.mark_all(i, int(steps[i]), specs[owner[i]])

    def _fo_ref(self, i, spec, fresh):
        st = {n: a for n, a in self._fo_slots[i].items()}
        st.update(self._fo_host(i))
        return (spec.group, int(self._fo_buffer("step")[1][i]) + 1, st, fresh.get(i, ()))

    def _fo_run_rows(self, rows, specs, owner, fresh):
        """Row steps (mirrors :meth:`fastopt.Optimizer._step_rows`): sparse gradients
        (touched rows; in exact mode first caught up) and dense gradients of
        row-updated parameters."""
        rule = self.rule
        bk = self._fo_backend
        steps = self._fo_buffer("step")[1]
        exact_mode = self.sparse_mode == "exact"
        tracker = self._fo_exact
        ref = getattr(bk, "wants_reference_args", False)
        if exact_mode:
            for i, _, _, _ in rows:
                ex = tracker.rows.get(i)
                if ex is not None and ex["spec"].group != specs[owner[i]].group:
                    self._fo_flush_param(i)
                    ex["spec"] = specs[owner[i]]
        for i, idx, vals, _keep in rows:
            spec = specs[owner[i]]
            step = int(steps[i]) + 1
            fr = fresh.get(i, ())
            row, host2 = rule.row(spec.group, step, self._fo_host(i), fr)
            arr = self._fo_arrays[i]
            exact = None
            if exact_mode and idx is not None:
                ex = tracker.info(i, arr.shape[0], step - 1, spec)
                if "momentum_buffer" in fr:
                    ex["buffer_start"] = step
                exact = tracker.pending(i, step - 1, self._fo_skipped_scalars)
            elif tracker and idx is None:
                self._fo_flush_param(i)
            if idx is not None and not idx.shape[0]:
                pass          # a step with no touched row: only the counts advance
            elif arr.size:
                work = planner.rows_work(
                    rule, spec, arr, planner.slot_list(rule, self._fo_slots[i], spec.uses),
                    row, idx, vals, None, exact=exact,
                    ref=self._fo_ref(i, spec, fresh) if ref else None)
                bk.run_rows(work)
                if exact is not None:
                    tracker.mark(i, work.uniq, step)
            elif tracker and idx is None:
                tracker.mark_all(i, step)
            steps[i] += 1
            for k, v in host2.items():
                self._fo_scalars[k][1][i] = v

    # ------------------------------------------------------------ exact mode
    def _fo_skipped_scalars(self, group, t_end):
        return self.rule.row(group, t_end, self.rule.host_init(group), ())[0]

    def _fo_flush_param(self, i):
        tracker = self._fo_exact
        t = int(self._fo_buffer("step")[1][i])
        rows = tracker.behind(i, t)
        if rows.shape[0] == 0:
            return
        spec = tracker.rows[i]["spec"]
        work = planner.rows_work(
            self.rule, spec, self._fo_arrays[i],
            planner.slot_list(self.rule, self._fo_slots[i], spec.uses),
            self._fo_skipped_scalars(spec.group, t), rows=rows,
            exact=tracker.pending(i, t, self._fo_skipped_scalars))
        self._fo_backend.run_rows(work)
        tracker.mark(i, rows, t)

    def _fo_flush_all(self):
        if self._fo_exact:
            for i in list(self._fo_exact.rows):
                self._fo_flush_param(i)
            torch.autograd.graph.increment_version(
                [self._fo_params[i] for i in self._fo_exact.rows])

    def flush(self):
        """``sparse_mode="exact"``: bring every row of every parameter up to date, as
        if the skipped steps had been dense steps with zero gradient on those rows.
        Call it before evaluating or exporting parameters; ``state_dict()`` calls it.
        A no-op in lazy mode."""
        self._fo_flush_all()

    # ------------------------------------------------------------- state dict
    def state_dict(self):
        """torch's ``state_dict()`` (after :meth:`flush` in exact mode): torch tensors
        under torch's state names, loadable by the matching ``torch.optim`` class.
        As torch's, it holds references to the live state tensors (``step`` and
        ``mu_product`` are 0-d views of one buffer); copy it (``copy.deepcopy``, or
        ``torch.save``) to keep a snapshot."""
        self._fo_flush_all()
        sd = super().state_dict()
        if isinstance(sd, dict) and isinstance(sd.get("state"), dict):
            sd["state"] = {k: dict(v) if type(v) is _ParamState else v
                           for k, v in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict):
        """torch's ``load_state_dict`` (a ``torch.optim`` or ``fastopt.torch`` state
        dict), checked before anything changes: hyperparameters, unsupported torch
        flags, state names, tensor shapes, step counts."""
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict (a dict with 'state' and "
                             "'param_groups')")
        if "optimizer" in state_dict and "version" in state_dict:
            raise ValueError(f"this is a fastopt.{state_dict['optimizer']} state_dict (NumPy "
                             "state); load it with that class, not with fastopt.torch")
        for k, st in state_dict["state"].items():
            if not isinstance(st, dict):
                raise ValueError(f"state of parameter {k!r} is not a dict")
            for name, v in st.items():
                if isinstance(v, np.ndarray):
                    raise TypeError(f"state {name!r} of parameter {k!r} is a NumPy array; "
                                    "expected a torch.Tensor")
        super().load_state_dict(state_dict)

    def _fo_check_loaded(self, state, groups):
        """Check what torch's load_state_dict is about to install (state keyed by
        parameter, groups with their parameters); returns them, completed with this
        optimizer's defaults for keys the saved groups lack (fastopt's fused options
        in a torch.optim state dict)."""
        rule = self.rule
        filled, specs = [], []
        for gi, g in enumerate(groups):
            g = {**{k: v for k, v in self.defaults.items() if k not in g}, **g}
            specs.append(planner.group_spec(
                rule, self._fo_check_hyper(g, f"param group {gi} of the state_dict")))
            filled.append(g)
        allowed = set(rule.slots) | set(self._fo_scalar_names())
        out = _State()
        flat = [(p, gi) for gi, g in enumerate(filled) for p in g["params"]]
        for i, (p, gi) in enumerate(flat):
            if p not in state:
                continue
            st = state[p]
            if not isinstance(st, dict):
                raise ValueError(f"state of parameter {i} is not a dict")
            st = {k: v for k, v in st.items() if v is not None}
            unknown = sorted(set(st) - allowed, key=str)
            if unknown:
                raise ValueError(f"state_dict has unknown state {unknown} for "
                                 f"{type(self).__name__} (parameter {i}); its state names "
                                 f"are {sorted(allowed)}")
            values = {n: _scalar_value(n, st[n], i) for n in self._fo_scalar_names() if n in st}
            for n, v in values.items():      # a plain number (SparseAdam's int step):
                if not isinstance(st[n], _T):  # a 0-d tensor, as torch's Adam loads it
                    st[n] = torch.tensor(v, dtype=self._fo_sdt)
            shape = rule.slot_shape(tuple(p.shape))
            for name in rule.slots:
                t = st.get(name)
                if t is None:
                    continue
                where = f"state {name!r} of parameter {i}"
                if not isinstance(t, _T):
                    raise TypeError(f"{where} is a {type(t).__name__}; expected a torch.Tensor")
                if tuple(t.shape) != shape or t.dtype != p.dtype:
                    raise ValueError(f"{where} has shape {tuple(t.shape)} and dtype {t.dtype}; "
                                     f"expected {shape} and {p.dtype}")
                if not t.is_contiguous():
                    st[name] = t.contiguous()
            if self._stepful:
                held = [n for n in st if n != "step"]
                if held and "step" not in st:
                    raise ValueError(f"state of parameter {i} has {sorted(held)} but no 'step'")
                if values.get("step", 0) > 0:
                    need = [n for n, u in zip(rule.slots, specs[gi].uses) if u]
                    missing = [n for n in need + list(self._fo_host_keys) if n not in st]
                    if missing:
                        raise ValueError(f"state of parameter {i} (step {values['step']:g}) is "
                                         f"missing {missing}")
            out[p] = _ParamState(st)
        for k, v in state.items():          # state of unknown keys is kept, as torch does
            if not isinstance(k, _T):
                out[k] = v
        return out, filled

    def __setstate__(self, state):
        if "_fo_backend" not in self.__dict__:        # unpickling (copy.deepcopy, pickle)
            config = state.pop("_fo_config", ("numba", "lazy"))
            super().__setstate__(state)
            self._fo_backend = backends.resolve(config[0])
            self.sparse_mode = config[1]
            self._fo_keys = tuple(self.defaults)
            self._fo_sdt = config[2] if len(config) > 2 else torch.float32
            self._fo_init_caches()
            self.state = _State(self.state)
            self._fo_ready = True
            return
        # torch's load_state_dict hands over the new state and groups: check first
        new_state, groups = self._fo_check_loaded(state["state"], state["param_groups"])
        super().__setstate__({"state": new_state, "param_groups": groups})
        self._fo_exact.clear()
        self._fo_scalars = {}
        self._fo_slots = {}
        self._fo_sviews = {}
        self._fo_snap = None
        self._fo_plan = None

    def __getstate__(self):
        self._fo_flush_all()
        out = super().__getstate__()
        out["_fo_config"] = (self._fo_backend.name, self.sparse_mode, self._fo_sdt)
        return out


def _scalar_value(name, v, i):
    """A saved ``step`` (an integer count) or ``mu_product`` (in (0, 1]) as a float."""
    where = f"state {name!r} of parameter {i}"
    if isinstance(v, _T):
        if v.numel() != 1:
            raise ValueError(f"{where} has {v.numel()} elements; expected a scalar")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{where}: invalid value {v!r}")
    v = float(v)
    if name == "step":
        if v != int(v) or not 0 <= v <= _MAX_STEP:
            raise ValueError(f"{where}: invalid step {v!r} (an integer in [0, 2**53])")
    elif not 0.0 < v <= 1.0:
        raise ValueError(f"{where} must be a finite number in (0, 1], got {v!r}")
    return v


# --------------------------------------------------------------------- classes

_FUSED_DOC = """
    fastopt's extra keyword arguments: ``backend`` ("auto", "numba", "cython",
    "numpy", "cuda"), ``sparse_mode`` ("lazy" or "exact") and the fused options
    ``clip_value``, ``l1``, ``param_min``, ``param_max``, ``max_norm``
    (see :mod:`fastopt.torch`)."""


class SGD(_Optimizer):
    __doc__ = ("torch.optim.SGD running fastopt's kernels (momentum, dampening, Nesterov, "
               "L2 weight decay, maximize); no ``step`` in the state, as torch." + _FUSED_DOC)
    rule = registry.SGD
    _torch_flags = dict(foreach=None, differentiable=False, fused=None)
    _stepful = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, backend="auto", sparse_mode="lazy", clip_value=None, l1=0.0,
                 param_min=None, param_max=None, max_norm=None):
        self._fo_setup(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                    weight_decay=weight_decay, nesterov=nesterov,
                                    maximize=maximize),
                       dict(foreach=foreach, differentiable=differentiable, fused=fused),
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


class Adam(_Optimizer):
    __doc__ = ("torch.optim.Adam running fastopt's kernels (L2 weight decay, amsgrad, "
               "maximize)." + _FUSED_DOC)
    rule = registry.Adam
    _torch_flags = dict(foreach=None, capturable=False, differentiable=False, fused=None,
                        decoupled_weight_decay=False)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 backend="auto", sparse_mode="lazy", clip_value=None, l1=0.0, param_min=None,
                 param_max=None, max_norm=None):
        self._fo_setup(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                    amsgrad=amsgrad, maximize=maximize),
                       dict(foreach=foreach, capturable=capturable,
                            differentiable=differentiable, fused=fused,
                            decoupled_weight_decay=decoupled_weight_decay),
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


class AdamW(_Optimizer):
    __doc__ = ("torch.optim.AdamW running fastopt's kernels (decoupled weight decay, "
               "default 1e-2)." + _FUSED_DOC)
    rule = registry.AdamW
    _torch_flags = dict(foreach=None, capturable=False, differentiable=False, fused=None)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, backend="auto", sparse_mode="lazy",
                 clip_value=None, l1=0.0, param_min=None, param_max=None, max_norm=None):
        self._fo_setup(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                    amsgrad=amsgrad, maximize=maximize),
                       dict(foreach=foreach, capturable=capturable,
                            differentiable=differentiable, fused=fused),
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


class RMSprop(_Optimizer):
    __doc__ = "torch.optim.RMSprop running fastopt's kernels." + _FUSED_DOC
    rule = registry.RMSprop
    _torch_flags = dict(capturable=False, foreach=None, differentiable=False)

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, backend="auto", sparse_mode="lazy", clip_value=None,
                 l1=0.0, param_min=None, param_max=None, max_norm=None):
        self._fo_setup(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                    momentum=momentum, centered=centered, maximize=maximize),
                       dict(capturable=capturable, foreach=foreach,
                            differentiable=differentiable),
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


class Adagrad(_Optimizer):
    __doc__ = ("torch.optim.Adagrad running fastopt's kernels; the state (``step``, "
               "``sum``) exists from construction, as torch's." + _FUSED_DOC)
    rule = registry.Adagrad
    _torch_flags = dict(foreach=None, differentiable=False, fused=None)
    _eager_state = True

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0,
                 initial_accumulator_value=0, eps=1e-10, foreach=None, *, maximize=False,
                 differentiable=False, fused=None, backend="auto", sparse_mode="lazy",
                 clip_value=None, l1=0.0, param_min=None, param_max=None, max_norm=None):
        self._fo_setup(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                    initial_accumulator_value=initial_accumulator_value,
                                    eps=eps, maximize=maximize),
                       dict(foreach=foreach, differentiable=differentiable, fused=fused),
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


class Adamax(_Optimizer):
    __doc__ = "torch.optim.Adamax running fastopt's kernels." + _FUSED_DOC
    rule = registry.Adamax
    _torch_flags = dict(foreach=None, differentiable=False, capturable=False)

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 foreach=None, *, maximize=False, differentiable=False, capturable=False,
                 backend="auto", sparse_mode="lazy", clip_value=None, l1=0.0, param_min=None,
                 param_max=None, max_norm=None):
        self._fo_setup(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                    maximize=maximize),
                       dict(foreach=foreach, differentiable=differentiable,
                            capturable=capturable),
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


class NAdam(_Optimizer):
    __doc__ = ("torch.optim.NAdam running fastopt's kernels (momentum decay, decoupled "
               "weight decay); ``mu_product`` is a 0-d tensor of torch's scalar dtype."
               + _FUSED_DOC)
    rule = registry.NAdam
    _torch_flags = dict(foreach=None, capturable=False, differentiable=False)

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, backend="auto",
                 sparse_mode="lazy", clip_value=None, l1=0.0, param_min=None, param_max=None,
                 max_norm=None):
        self._fo_setup(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                    momentum_decay=momentum_decay,
                                    decoupled_weight_decay=decoupled_weight_decay,
                                    maximize=maximize),
                       dict(foreach=foreach, capturable=capturable,
                            differentiable=differentiable),
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


class Lion(_Optimizer):
    __doc__ = ("Lion (Chen et al. 2023), fastopt's defaults (lr=1e-4, betas=(0.9, 0.99)); "
               "state ``exp_avg`` only." + _FUSED_DOC)
    rule = registry.Lion
    _stepful = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize=False, backend="auto", sparse_mode="lazy", clip_value=None, l1=0.0,
                 param_min=None, param_max=None, max_norm=None):
        self._fo_setup(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                    maximize=maximize), {},
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


class RowWiseAdagrad(_Optimizer):
    __doc__ = ("Row-wise Adagrad (one accumulator per row; state ``step`` and ``sum`` of "
               "shape ``(param.shape[0],)``), fastopt's defaults; the state exists from "
               "construction, as Adagrad's." + _FUSED_DOC)
    rule = registry.RowWiseAdagrad
    _eager_state = True

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, *, maximize=False, backend="auto",
                 sparse_mode="lazy", clip_value=None, l1=0.0, param_min=None, param_max=None,
                 max_norm=None):
        self._fo_setup(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                    initial_accumulator_value=initial_accumulator_value,
                                    eps=eps, maximize=maximize), {},
                       dict(clip_value=clip_value, l1=l1, param_min=param_min,
                            param_max=param_max, max_norm=max_norm), backend, sparse_mode)


#: rule name -> class
CLASSES = {c.rule.name: c for c in (SGD, Adam, AdamW, RMSprop, Adagrad, Adamax, NAdam, Lion,
                                    RowWiseAdagrad)}
