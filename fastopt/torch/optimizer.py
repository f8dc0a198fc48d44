"""The facade: a ``torch.optim.Optimizer`` over one fastopt engine.

:class:`TorchOptimizer` owns one core optimizer (``self.engine``, of the rule's
class in :data:`fastopt.CLASSES`) whose param groups *are* torch's ``param_groups``
(dicts holding the tensors; the engine sees NumPy or device views of them through
the :class:`~fastopt.torch.store.TensorStore`) and whose state *is* torch's
``state`` (tensors sharing the engine's arrays).  The engine does everything a step
means: group validation (scheduler edits included), gradient, state and alias
checks, allocation, planning, exact mode, ``grad_scale``/``skip_nonfinite``,
strict state loading.  This module translates torch's conventions: ``p.grad``,
closures, hooks, torch-only flags, torch's state_dict layout, autograd version
counters, CUDA streams.
"""

import math
import numbers
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter

import numpy as np
import torch
from torch.optim import optimizer as _topt

from .. import optimizers, state_io
from . import views
from .store import ParamState, State, TensorStore

_GRAD = attrgetter("grad")
_PARAMS = itemgetter("params")
_PTR = torch.Tensor.data_ptr
_MAX_STEP = 2 ** 53

#: torch-only arguments fastopt cannot honour: key -> message (any value but False/None)
REFUSED = {
    "capturable": "capturable=True (CUDA-graph capturable step) is not supported: fastopt "
                  "computes its per-step scalars on the host; use capturable=False",
    "differentiable": "differentiable=True is not supported: fastopt's kernels update "
                      "parameters in place outside autograd; use differentiable=False",
    "decoupled_weight_decay": "Adam(decoupled_weight_decay=True) is not supported; use "
                              "fastopt.torch.AdamW (the same update)",
}
#: torch-only arguments accepted and ignored (the step is always one fused pass)
NO_OP = ("foreach", "fused")
#: fastopt's own keyword arguments, with their defaults
OPTIONS = {"backend": "auto", "sparse_mode": "lazy", "state_bits": None,
           "bf16_update": None, "seed": 0}


class TorchOptimizer(torch.optim.Optimizer):
    """Base of the ``fastopt.torch`` classes (see :mod:`fastopt.torch`)."""

    rule = None
    #: torch-only keys of the group dicts, with torch's defaults
    torch_flags = {}
    #: torch keeps a ``step`` tensor in the state
    stepful = True
    #: torch creates the state at construction (Adagrad)
    eager_state = False

    # ------------------------------------------------------------ construction
    def _fo_init(self, params, args):
        rule = self.rule
        hyper = {k: args[k] for k in rule.defaults if k in args}
        flags = {k: args[k] for k in self.torch_flags}
        self._fo_options = {k: args[k] for k in OPTIONS}
        self._fo_sdt = torch.float64 if torch.get_default_dtype() == torch.float64 \
            else torch.float32
        self._fo_check({**hyper, **flags}, "the arguments")
        self._fo_new_store()
        torch.optim.Optimizer.__init__(self, params, {**hyper, **flags})
        self._fo_ready()

    def _fo_new_store(self):
        self._fo_engine = None
        self._fo_ptrs = None
        self._fo_store = TensorStore(self, self.stepful, self._fo_sdt, self._fo_check,
                                     tuple(self.torch_flags))

    def _fo_ready(self):
        self.state = State()
        if self.eager_state:
            self._fo_engine.allocate_state()
        self._fo_store.mark()

    @property
    def engine(self):
        """The core optimizer that runs every step (:class:`fastopt.Optimizer`)."""
        return self._fo_engine

    @property
    def backend(self):
        return self._fo_engine.backend

    def _fo_check(self, group, where):
        """torch's conventions in a group dict (the engine checks the rule's values):
        no tensor-valued hyperparameters, refused torch flags, no-op flags."""
        name = f"fastopt.torch.{type(self).__name__}"
        for k in chain(self.rule.defaults, self.torch_flags):
            v = group.get(k)
            if isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list)) and any(
                    isinstance(x, torch.Tensor) for x in v)):
                raise ValueError(f"{name}: {k} as a Tensor is not supported ({where}); pass "
                                 "a Python number")
        for k in self.torch_flags:
            v = group.get(k)
            if k in REFUSED and v not in (False, None):
                raise ValueError(f"{name}: {REFUSED[k]} ({where})")
            if k in NO_OP and v not in (None, True, False):
                raise ValueError(f"{name}: Invalid {k}: {v!r} (True, False or None; fastopt "
                                 f"ignores it) ({where})")

    def add_param_group(self, param_group):
        """torch's ``add_param_group``, checked by the engine (tensor dtype, device,
        layout, overlaps, hyperparameters); nothing is added when a check fails."""
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        group = dict(param_group)
        ps = group["params"]
        if isinstance(ps, torch.Tensor):
            ps = [ps]
        elif isinstance(ps, set):
            raise TypeError("optimizer parameters need to be organized in ordered "
                            "collections, but the ordering of tensors in sets will change "
                            "between runs. Please use a list instead.")
        else:
            ps = list(ps)
        if ps and isinstance(ps[0], tuple):
            group["param_names"] = [n for n, _ in ps]
            ps = [t for _, t in ps]
        group["params"] = ps
        for k, v in self.defaults.items():
            group.setdefault(k, v)
        if self._fo_engine is None:
            o = self._fo_options
            cls = optimizers.CLASSES[self.rule.name]
            self._fo_engine = cls([group], backend=o["backend"], sparse_mode=o["sparse_mode"],
                                  state_bits=o["state_bits"], bf16_update=o["bf16_update"],
                                  seed=o["seed"], store=self._fo_store,
                                  **{k: v for k, v in self.defaults.items()
                                     if k in self.rule.defaults})
            self.param_groups = self._fo_engine.param_groups
            return
        start = len(self._fo_engine.param_objects)
        self._fo_engine.add_param_group(group)
        if self.eager_state:
            self._fo_engine.allocate_state(range(start, len(self._fo_engine.param_objects)))
        self._fo_store.mark()

    # ------------------------------------------------------------------- step
    def step(self, closure=None, *, grad_scale=None, skip_nonfinite=False):
        """One update of every parameter that has a gradient (``p.grad``); returns the
        closure's loss (the closure runs under ``torch.enable_grad()``).

        ``grad_scale``: the gradients are divided by it inside the update pass (a
        number or a one-element tensor).  ``skip_nonfinite``: if any gradient (divided
        by ``grad_scale``) holds Inf/NaN, nothing changes; ``self.last_step_applied``
        says whether the step was applied.
        """
        if self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks \
                or _topt._global_optimizer_pre_hooks or _topt._global_optimizer_post_hooks \
                or _profiling():
            # torch's wrapper: hooks and the profiler's label (skipped when unused: it
            # costs more than a small step)
            return _HOOKED(self, closure, grad_scale=grad_scale,
                           skip_nonfinite=skip_nonfinite)
        return self._fo_step(closure, grad_scale, skip_nonfinite)

    step.hooked = True           # torch's __init__ does not wrap it again

    def _fo_step(self, closure=None, grad_scale=None, skip_nonfinite=False):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        engine, store = self._fo_engine, self._fo_store
        if store.edited():
            self._fo_import()
        tensors = list(chain.from_iterable(map(_PARAMS, self.param_groups)))
        ptrs = list(map(_PTR, tensors))
        if ptrs != self._fo_ptrs:            # new tensors, or p.data = ... (new memory)
            engine.refresh_params()
            self._fo_ptrs = ptrs
        grads = list(map(_GRAD, tensors))
        if isinstance(grad_scale, torch.Tensor):
            grad_scale = grad_scale.item()
        stream = None
        if engine.backend.memory == "device" and torch.cuda.is_available():
            cur = torch.cuda.current_stream()     # fastopt runs on the legacy default
            if cur != torch.cuda.default_stream(cur.device):   # stream, as torch's default
                stream = cur
                stream.synchronize()
        try:
            applied = engine.step(grads, grad_scale=grad_scale, skip_nonfinite=skip_nonfinite)
        finally:
            store.mark()
        if stream is not None:
            from numba import cuda
            cuda.default_stream().synchronize()
        self.last_step_applied = applied
        if applied:
            if any(map(is_, grads, repeat(None))):
                tensors = [p for p, g in zip(tensors, grads) if g is not None]
            torch.autograd.graph.increment_version(tensors)
        return loss

    def flush(self):
        """``sparse_mode="exact"``: bring every row of every parameter up to date, as
        if the skipped steps had been dense steps with zero gradient on those rows.
        Call it before evaluating or exporting parameters; ``state_dict()`` calls it.
        A no-op in lazy mode."""
        self._fo_engine.flush()
        if self.sparse_mode == "exact":
            torch.autograd.graph.increment_version(list(self._fo_engine.param_objects))

    @property
    def sparse_mode(self):
        return self._fo_engine.sparse_mode

    # ------------------------------------------------------------- state dict
    def state_dict(self):
        """torch's ``state_dict()`` (after :meth:`flush` in exact mode): torch tensors
        under torch's state names (plus the low-precision storage's own entries, see
        docs/torch.md), loadable by the matching ``torch.optim`` class when
        ``state_bits`` is None and the parameters are float32/float64.  As torch's, it
        holds references to the live state tensors; copy it (``copy.deepcopy``,
        ``torch.save``) to keep a snapshot."""
        self.flush()
        sd = super().state_dict()
        if isinstance(sd, dict) and isinstance(sd.get("state"), dict):
            sd["state"] = {k: dict(v) if type(v) is ParamState else v
                           for k, v in sd["state"].items()}
        if self.rule.torch_state_out is not None:   # the peer's layout (schedule-free)
            sd = self.rule.torch_state_out(sd)
        return sd

    def load_state_dict(self, state_dict):
        """Load a ``torch.optim`` or ``fastopt.torch`` state dict (torch's hooks run as
        in torch).  The engine checks it before anything changes: hyperparameters,
        storage options, state names, shapes, dtypes, step counts."""
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError("not an optimizer state_dict (a dict with 'state' and "
                             "'param_groups')")
        if "optimizer" in state_dict and "version" in state_dict:
            raise ValueError(f"this is a fastopt.{state_dict['optimizer']} state_dict (NumPy "
                             "state); load it with that class, not with fastopt.torch")
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = hook(self, state_dict)
            if out is not None:
                state_dict = out
        if self.rule.torch_state_in is not None:    # a peer's layout (schedule-free)
            state_dict = self.rule.torch_state_in(state_dict)
        groups, saved = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError("loaded state dict contains a parameter group that doesn't "
                             "match the size of optimizer's group")
        where = {k: i for i, k in enumerate(chain.from_iterable(map(_PARAMS, saved)))}
        objs = self._fo_engine.param_objects
        state = {}
        for k, st in state_dict["state"].items():
            if k in where:       # (state of unknown keys is dropped)
                i = where[k]
                state[i] = self._fo_state_in(i, objs[i], st, cast=True)
        new_groups = []
        for gi, (g, s) in enumerate(zip(groups, saved)):
            ng = {k: v for k, v in s.items() if k != "params"}
            for k, v in self.defaults.items():
                ng.setdefault(k, v)       # keys a torch.optim state dict lacks
            if "param_names" in g and "param_names" not in ng:
                ng["param_names"] = g["param_names"]
            self._fo_check(ng, f"param group {gi} of the state_dict")
            new_groups.append(ng)
        self._fo_load(state, new_groups)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _fo_state_in(self, i, p, st, cast=False, steps=None):
        """One parameter's torch state as the engine's state_dict holds it (arrays on
        the host, ``step`` an int, host scalars floats); the engine checks the rest."""
        if not isinstance(st, dict):
            raise ValueError(f"state of parameter {i} is not a dict")
        native = self._fo_engine.state_bits in (None, 32) and p.dtype != torch.bfloat16
        host_keys = set(self.rule.host_init(self.rule.defaults))
        out = {}
        for k, v in st.items():
            if v is None:
                continue
            if k == "step" or k in host_keys:
                out[k] = _scalar_value(k, v, i)
            elif isinstance(v, torch.Tensor):
                if cast and native and v.is_floating_point():
                    v = v.to(dtype=p.dtype)      # torch's load casts state as well
                out[k] = views.host_array(v.detach().cpu().contiguous())
            elif isinstance(v, np.ndarray):
                raise TypeError(f"state {k!r} of parameter {i} is a NumPy array; expected "
                                "a torch.Tensor")
            else:
                out[k] = v
        if not self.stepful:                  # torch keeps no step: the engine's count
            out["step"] = steps.get(i, {}).get("step", 0) if steps is not None else 0
        return out

    def _fo_import(self):
        """A user replaced state (``opt.state[p] = ...``, ``opt.state.clear()``, a
        tensor in ``opt.state[p]``): load torch's state into the engine, checked."""
        engine = self._fo_engine
        objs = engine.param_objects
        index = {id(p): i for i, p in enumerate(objs)}
        steps = engine.state
        if not isinstance(self.state, State):
            self.state = State(self.state)
        state = {}
        for p, st in self.state.items():
            i = index.get(id(p)) if isinstance(p, torch.Tensor) else None
            if i is not None and st:
                state[i] = self._fo_state_in(i, p, st, steps=steps)
        # exact mode: the edited state lags by the rows it lagged by (a parameter whose
        # state was removed starts afresh)
        self._fo_load(state, [{k: v for k, v in g.items() if k != "params"}
                              for g in self.param_groups], keep_pending=True)

    def _fo_load(self, state, groups, keep_pending=False):
        engine = self._fo_engine
        sizes = [len(g["params"]) for g in self.param_groups]
        starts = np.cumsum([0] + sizes)
        sd = {"version": state_io.STATE_DICT_VERSION, "optimizer": self.rule.name,
              "state": state, "storage": state_io.storage_options(engine),
              "param_groups": [{**g, "params": list(range(starts[k], starts[k + 1]))}
                               for k, g in enumerate(groups)]}
        try:
            engine.load_state_dict(sd, keep_pending=keep_pending)
        finally:
            self._fo_store.mark()

    # -------------------------------------------------------------- pickling
    def __getstate__(self):
        self.flush()
        return {"defaults": self.defaults, "state": self.state,
                "param_groups": [dict(g) for g in self.param_groups],
                "_fo_config": (self._fo_options, self._fo_sdt)}

    def __setstate__(self, state):
        self._fo_options, self._fo_sdt = state["_fo_config"]
        saved_state, groups = state["state"], state["param_groups"]
        super().__setstate__({"defaults": state["defaults"], "state": {},
                              "param_groups": []})
        self._fo_new_store()
        for g in groups:
            self.add_param_group(g)
        self._fo_ready()
        self.state = State(saved_state)
        self._fo_import()


_HOOKED = torch.optim.Optimizer.profile_hook_step(TorchOptimizer._fo_step)
_profiling = torch._C._autograd._profiler_enabled


def _scalar_value(name, v, i):
    """A saved ``step`` (an integer count) or host scalar (``mu_product``, in (0, 1])."""
    where = f"state {name!r} of parameter {i}"
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"{where} has {v.numel()} elements; expected a scalar")
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"{where}: invalid value {v!r}")
    if name == "step":
        if float(v) != int(v) or not 0 <= v <= _MAX_STEP:
            raise ValueError(f"{where}: invalid step {v!r} (an integer in [0, 2**53])")
        return int(v)
    return float(v)
