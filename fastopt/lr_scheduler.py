"""Learning-rate schedulers with torch.optim.lr_scheduler's names, arguments and values.

Every scheduler works on any optimizer that exposes ``param_groups`` (a list of
dicts with an ``"lr"`` entry, plus ``"momentum"`` or ``"betas"`` for momentum
cycling) -- the fastopt optimizers, or anything shaped like ``torch.optim``.

Conventions (as in torch):

* Constructing a scheduler with ``last_epoch=-1`` sets ``group["initial_lr"]``
  (``setdefault``: an earlier scheduler's value is kept) and performs the initial
  step, so ``group["lr"]`` right after construction is the epoch-0 value.  With
  ``last_epoch >= 0`` (resuming) every group must already have ``"initial_lr"``
  (``KeyError`` otherwise, as torch).
* ``step()`` advances ``last_epoch`` by one and writes the new rates into the
  groups; call it after ``optimizer.step``.  ``ReduceLROnPlateau.step(metric)``
  takes the monitored value instead.
* ``get_last_lr()`` returns the list of the rates the last step wrote.
* ``state_dict()`` returns a plain dict (lists, numbers, strings; no callables and
  no optimizer), ``load_state_dict()`` validates its keys and restores it.  As in
  torch, plain functions and lambdas (``LambdaLR``'s ``lr_lambda``, ``CyclicLR``'s
  ``scale_fn``) are not saved; for callable *objects* their ``__dict__`` is.

The update formulas are torch's own chainable (recursive) forms, evaluated with
the same Python float operations in the same order, so the rates are bit-for-bit
torch's for the same inputs (the tests check ~1e-12 over hundreds of steps).

Differences from torch: no ``epoch`` argument to ``step()`` (deprecated in
torch), ``optimizer.step`` is not wrapped to warn about call order, arguments are
validated more strictly (``ValueError`` naming the value), and ``CyclicLR`` /
``OneCycleLR`` keep their bounds (``max_lr``, ``min_lr``, ``base_momentum``,
``max_momentum``) in the scheduler and its ``state_dict`` instead of adding
them to the param groups (only ``"initial_lr"`` is added to the groups).
"""

import math
import numbers
import types
import warnings
from bisect import bisect_right
from collections import Counter

__all__ = ["LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR",
           "CosineAnnealingLR", "LinearLR", "CyclicLR", "OneCycleLR", "SequentialLR",
           "ReduceLROnPlateau"]


# ----------------------------------------------------------------------------- checks

def _real(name, value, *, lo=None, hi=None, lo_open=False, hi_open=False):
    """A finite real number (bool refused) within optional bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
    if not math.isfinite(float(value)):
        raise ValueError(f"Invalid {name}: {value!r} (must be finite)")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'>' if lo_open else '>='} {lo})")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"Invalid {name}: {value!r} (must be {'<' if hi_open else '<='} {hi})")
    return value


def _int(name, value, lo):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer)")
    if value < lo:
        raise ValueError(f"Invalid {name}: {value!r} (must be >= {lo})")
    return int(value)


def _check_optimizer(optimizer):
    groups = getattr(optimizer, "param_groups", None)
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise TypeError(f"{type(optimizer).__name__} is not an optimizer "
                        "(no list of param_groups dicts)")
    for i, g in enumerate(groups):
        if "lr" not in g:
            raise KeyError(f"param_groups[{i}] has no 'lr'")
    return optimizer


def _per_group(name, optimizer, value, check):
    """A scalar for every group, or a list/tuple with one value per group (torch's
    ``_format_param``)."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have the same length as optimizer.param_groups. "
                             f"{name} has {len(value)} values, param_groups has {n}.")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check(name, value)] * n


def _momentum_key(optimizer):
    """'betas' (Adam family: cycle beta1), 'momentum' (SGD, RMSprop) or None."""
    defaults = getattr(optimizer, "defaults", None)
    keys = defaults if isinstance(defaults, dict) else optimizer.param_groups[0]
    if "betas" in keys:
        return "betas"
    if "momentum" in keys:
        return "momentum"
    return None


def _set_momentum(group, use_beta1, value):
    if use_beta1:
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


def _copy(value):
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _callable_state(fn):
    """torch's rule: plain functions/lambdas are not saved, callable objects' __dict__ is."""
    if fn is None or isinstance(fn, types.FunctionType) or not hasattr(fn, "__dict__"):
        return None
    return dict(fn.__dict__)


# -------------------------------------------------------------------------- base class

class LRScheduler:
    """Base class (torch.optim.lr_scheduler.LRScheduler).

    Subclasses implement :meth:`get_lr` (the rates for the current
    ``last_epoch``, usually from the current ``group["lr"]``: torch's chainable
    form) and optionally ``_get_closed_form_lr`` (from ``base_lrs``).
    ``_state_keys`` lists the attributes :meth:`state_dict` saves.
    """

    _state_keys = ("base_lrs", "last_epoch", "_step_count", "_last_lr")
    _get_lr_called_within_step = False
    _is_initial = False

    def __init__(self, optimizer, last_epoch=-1):
        _check_optimizer(optimizer)
        last_epoch = _int("last_epoch", last_epoch, -1)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] "
                                   "when resuming a scheduler with last_epoch >= 0")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self._initial_step()

    def _initial_step(self):
        """Reset the step count and perform the initial step (as torch)."""
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    def get_lr(self):
        """The rates for the current ``last_epoch`` (call :meth:`get_last_lr` to read
        the current rates; like torch this warns when called outside :meth:`step`)."""
        raise NotImplementedError

    def _warn_outside_step(self):
        if not self._get_lr_called_within_step:
            warnings.warn("To get the last learning rate computed by the scheduler, "
                          "please use `get_last_lr()`.", UserWarning, stacklevel=3)

    def get_last_lr(self):
        """The list of rates (one per param group) written by the last step."""
        return list(self._last_lr)

    def step(self):
        """Advance ``last_epoch`` by one and set every group's ``"lr"``."""
        self._step_count += 1
        self._update_lr()

    def _update_lr(self, epoch=None):
        self._get_lr_called_within_step = True
        try:
            if epoch is None:
                self.last_epoch += 1
                values = self.get_lr()
            else:
                self.last_epoch = epoch
                closed = getattr(self, "_get_closed_form_lr", None)
                values = closed() if closed is not None else self.get_lr()
        finally:
            self._get_lr_called_within_step = False
        groups = self.optimizer.param_groups
        if len(values) != len(groups):
            raise RuntimeError(f"{type(self).__name__}: {len(values)} rates for "
                               f"{len(groups)} param groups")
        for group, lr in zip(groups, values):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in groups]

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """A plain dict with the scheduler's state (never the optimizer)."""
        return {k: _copy(getattr(self, k)) for k in self._state_keys}

    def _check_state_dict(self, state_dict):
        if not isinstance(state_dict, dict):
            raise TypeError(f"{type(self).__name__}.load_state_dict expects a dict, "
                            f"got {type(state_dict).__name__}")
        missing = sorted(set(self._state_keys) - set(state_dict))
        extra = sorted(set(state_dict) - set(self._state_keys))
        if missing or extra:
            raise ValueError(f"{type(self).__name__} state_dict mismatch: missing keys "
                             f"{missing}, unexpected keys {extra}")
        n = len(self.optimizer.param_groups)
        for k in ("base_lrs", "_last_lr", "max_lrs", "base_momentums", "max_momentums",
                  "lr_lambdas"):
            v = state_dict.get(k)
            if k in ("base_momentums", "max_momentums") and v is None:
                continue
            if k in state_dict and (not isinstance(v, (list, tuple)) or len(v) != n):
                raise ValueError(f"{type(self).__name__} state_dict entry {k!r} must be a "
                                 f"list with one value per param group ({n})")
        le = state_dict.get("last_epoch")
        if isinstance(le, bool) or not isinstance(le, numbers.Integral):
            raise ValueError(f"invalid last_epoch {le!r} in state_dict")

    def load_state_dict(self, state_dict):
        """Restore a :meth:`state_dict` (checked first: nothing changes on error)."""
        self._check_state_dict(state_dict)
        for k in self._state_keys:
            setattr(self, k, _copy(state_dict[k]))


# ------------------------------------------------------------------ simple schedules

class LambdaLR(LRScheduler):
    """``lr = initial_lr * lr_lambda(last_epoch)`` (torch.optim.lr_scheduler.LambdaLR).

    ``lr_lambda``: a function of the integer epoch, or a list with one function per
    param group.  ``state_dict`` stores ``None`` for plain functions/lambdas (they
    are not saved, as in torch) and the ``__dict__`` of callable objects.
    """

    _state_keys = LRScheduler._state_keys + ("lr_lambdas",)

    def __init__(self, optimizer, lr_lambda, last_epoch=-1):
        _check_optimizer(optimizer)
        n = len(optimizer.param_groups)
        if isinstance(lr_lambda, (list, tuple)):
            if len(lr_lambda) != n:
                raise ValueError(f"Expected {n} lr_lambdas, but got {len(lr_lambda)}")
            fns = list(lr_lambda)
        else:
            fns = [lr_lambda] * n
        for f in fns:
            if not callable(f):
                raise TypeError(f"lr_lambda must be callable, got {f!r}")
        self.lr_lambdas = fns
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        return [base_lr * fn(self.last_epoch) for fn, base_lr in zip(self.lr_lambdas,
                                                                      self.base_lrs)]

    def state_dict(self):
        sd = {k: _copy(getattr(self, k)) for k in LRScheduler._state_keys}
        sd["lr_lambdas"] = [_callable_state(fn) for fn in self.lr_lambdas]
        return sd

    def load_state_dict(self, state_dict):
        self._check_state_dict(state_dict)
        for i, d in enumerate(state_dict["lr_lambdas"]):
            if d is not None and not isinstance(d, dict):
                raise ValueError(f"lr_lambdas[{i}] in state_dict must be None or a dict")
        for k in LRScheduler._state_keys:
            setattr(self, k, _copy(state_dict[k]))
        for fn, d in zip(self.lr_lambdas, state_dict["lr_lambdas"]):
            if d is not None:
                fn.__dict__.update(d)


class StepLR(LRScheduler):
    """Multiply the rate by ``gamma`` every ``step_size`` epochs
    (torch.optim.lr_scheduler.StepLR); closed form
    ``lr = initial_lr * gamma ** (last_epoch // step_size)``.  Default gamma 0.1.
    """

    _state_keys = LRScheduler._state_keys + ("step_size", "gamma")

    def __init__(self, optimizer, step_size, gamma=0.1, last_epoch=-1):
        self.step_size = _int("step_size", step_size, 1)
        self.gamma = _real("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return [g["lr"] for g in self.optimizer.param_groups]
        return [g["lr"] * self.gamma for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [b * self.gamma ** (self.last_epoch // self.step_size) for b in self.base_lrs]


class MultiStepLR(LRScheduler):
    """Multiply the rate by ``gamma`` at each milestone epoch
    (torch.optim.lr_scheduler.MultiStepLR); a milestone listed ``n`` times
    multiplies by ``gamma ** n``.  Closed form
    ``lr = initial_lr * gamma ** bisect_right(sorted(milestones), last_epoch)``.
    ``state_dict`` stores the milestones as a sorted list (torch: a Counter).
    """

    _state_keys = LRScheduler._state_keys + ("milestones", "gamma")

    def __init__(self, optimizer, milestones, gamma=0.1, last_epoch=-1):
        try:
            ms = list(milestones)
        except TypeError:
            raise ValueError(f"Invalid milestones: {milestones!r} (expected a list of "
                             "integers)") from None
        self.milestones = Counter(_int("milestone", m, 0) for m in ms)
        self.gamma = _real("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self.last_epoch not in self.milestones:
            return [g["lr"] for g in self.optimizer.param_groups]
        return [g["lr"] * self.gamma ** self.milestones[self.last_epoch]
                for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        ms = sorted(self.milestones.elements())
        return [b * self.gamma ** bisect_right(ms, self.last_epoch) for b in self.base_lrs]

    def state_dict(self):
        sd = super().state_dict()
        sd["milestones"] = sorted(self.milestones.elements())
        return sd

    def load_state_dict(self, state_dict):
        self._check_state_dict(state_dict)
        ms = Counter(_int("milestone", m, 0) for m in state_dict["milestones"])
        super().load_state_dict(state_dict)
        self.milestones = ms


class ExponentialLR(LRScheduler):
    """``lr = initial_lr * gamma ** last_epoch`` (torch.optim.lr_scheduler.ExponentialLR),
    applied recursively: each step multiplies the current rate by ``gamma``."""

    _state_keys = LRScheduler._state_keys + ("gamma",)

    def __init__(self, optimizer, gamma, last_epoch=-1):
        self.gamma = _real("gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        if self._is_initial:
            return [g["lr"] for g in self.optimizer.param_groups]
        return [g["lr"] * self.gamma for g in self.optimizer.param_groups]

    def _get_closed_form_lr(self):
        return [b * self.gamma ** self.last_epoch for b in self.base_lrs]


class CosineAnnealingLR(LRScheduler):
    r"""Cosine annealing without restarts (torch.optim.lr_scheduler.CosineAnnealingLR).

    Closed form ``lr_t = eta_min + (initial_lr - eta_min) * (1 + cos(pi t / T_max)) / 2``;
    like torch the rate is updated with the recursive form
    ``lr_{t} = eta_min + (lr_{t-1} - eta_min) * (1 + cos(pi t / T_max)) / (1 + cos(pi (t-1) / T_max))``
    (and its special case at ``t - 1 - T_max = 0 mod 2 T_max``), so past ``T_max``
    the rate rises again (a period of ``2 T_max``), as torch.  Default eta_min 0.
    """

    _state_keys = LRScheduler._state_keys + ("T_max", "eta_min")

    def __init__(self, optimizer, T_max, eta_min=0.0, last_epoch=-1):
        self.T_max = _real("T_max", T_max, lo=0, lo_open=True)
        self.eta_min = _real("eta_min", eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        groups = self.optimizer.param_groups
        if self._is_initial:
            return [g["lr"] for g in groups]
        if self._step_count == 1 and self.last_epoch > 0:
            return [self.eta_min + (b - self.eta_min)
                    * (1 + math.cos(self.last_epoch * math.pi / self.T_max)) / 2
                    for b in self.base_lrs]
        if (self.last_epoch - 1 - self.T_max) % (2 * self.T_max) == 0:
            return [g["lr"] + (b - self.eta_min) * (1 - math.cos(math.pi / self.T_max)) / 2
                    for b, g in zip(self.base_lrs, groups)]
        return [(1 + math.cos(math.pi * self.last_epoch / self.T_max))
                / (1 + math.cos(math.pi * (self.last_epoch - 1) / self.T_max))
                * (g["lr"] - self.eta_min) + self.eta_min
                for g in groups]

    def _get_closed_form_lr(self):
        return [self.eta_min + (b - self.eta_min)
                * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
                for b in self.base_lrs]


class LinearLR(LRScheduler):
    """Linear warm-up/decay of a multiplicative factor (torch.optim.lr_scheduler.LinearLR).

    Closed form ``lr = initial_lr * (start_factor + (end_factor - start_factor)
    * min(total_iters, last_epoch) / total_iters)``, applied with torch's
    recursive form.  Defaults: start_factor 1/3 (in (0, 1]), end_factor 1.0 (in
    [0, 1]), total_iters 5.
    """

    _state_keys = LRScheduler._state_keys + ("start_factor", "end_factor", "total_iters")

    def __init__(self, optimizer, start_factor=1.0 / 3, end_factor=1.0, total_iters=5,
                 last_epoch=-1):
        self.start_factor = _real("start_factor", start_factor, lo=0, lo_open=True, hi=1.0)
        self.end_factor = _real("end_factor", end_factor, lo=0, hi=1.0)
        self.total_iters = _int("total_iters", total_iters, 1)
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        self._warn_outside_step()
        groups = self.optimizer.param_groups
        if self.last_epoch == 0:
            return [g["lr"] * self.start_factor for g in groups]
        if self._is_initial or self.last_epoch > self.total_iters:
            return [g["lr"] for g in groups]
        return [g["lr"] * (1.0 + (self.end_factor - self.start_factor)
                           / (self.total_iters * self.start_factor
                              + (self.last_epoch - 1) * (self.end_factor - self.start_factor)))
                for g in groups]

    def _get_closed_form_lr(self):
        return [b * (self.start_factor + (self.end_factor - self.start_factor)
                     * min(self.total_iters, self.last_epoch) / self.total_iters)
                for b in self.base_lrs]


# -------------------------------------------------------------------------- cyclic

class CyclicLR(LRScheduler):
    r"""Cyclical learning rate (Smith 2017; torch.optim.lr_scheduler.CyclicLR).

    With ``t = last_epoch``, ``T = step_size_up + step_size_down``,
    ``cycle = floor(1 + t / T)``, ``x = 1 + t / T - cycle`` and
    ``r = step_size_up / T``, the position in the cycle is
    ``s = x / r`` when ``x <= r`` else ``(x - 1) / (r - 1)`` and::

        lr       = base_lr      + (max_lr - base_lr) * s * scale
        momentum = max_momentum - (max_momentum - base_momentum) * s * scale

    where ``scale = scale_fn(cycle)`` (``scale_mode='cycle'``) or
    ``scale_fn(t)`` (``'iterations'``).  Built-in modes: ``triangular``
    (scale 1), ``triangular2`` (``1 / 2 ** (cycle - 1)``), ``exp_range``
    (``gamma ** t``, iterations).  A custom ``scale_fn`` overrides ``mode``.
    With ``cycle_momentum=True`` (default) the optimizer's ``"momentum"`` (SGD,
    RMSprop) or ``betas[0]`` (Adam family) is cycled inversely to the rate.

    Defaults as torch: step_size_up 2000, step_size_down None (= up),
    mode 'triangular', gamma 1.0, scale_mode 'cycle', base_momentum 0.8,
    max_momentum 0.9.  Construction (``last_epoch=-1``) sets every group's rate to
    ``base_lr`` and its momentum to ``max_momentum``.
    """

    _state_keys = LRScheduler._state_keys + (
        "max_lrs", "total_size", "step_ratio", "mode", "gamma", "scale_mode",
        "cycle_momentum", "use_beta1", "base_momentums", "max_momentums", "_scale_fn_custom")

    def __init__(self, optimizer, base_lr, max_lr, step_size_up=2000, step_size_down=None,
                 mode="triangular", gamma=1.0, scale_fn=None, scale_mode="cycle",
                 cycle_momentum=True, base_momentum=0.8, max_momentum=0.9, last_epoch=-1):
        _check_optimizer(optimizer)
        last_epoch = _int("last_epoch", last_epoch, -1)
        nonneg = lambda n, v: float(_real(n, v, lo=0))  # noqa: E731
        base_lrs = _per_group("base_lr", optimizer, base_lr, nonneg)
        max_lrs = _per_group("max_lr", optimizer, max_lr, nonneg)
        up = float(_real("step_size_up", step_size_up, lo=0, lo_open=True))
        down = (float(_real("step_size_down", step_size_down, lo=0, lo_open=True))
                if step_size_down is not None else up)
        if scale_fn is None and mode not in ("triangular", "triangular2", "exp_range"):
            raise ValueError(f"Invalid mode: {mode!r} (expected 'triangular', 'triangular2' "
                             "or 'exp_range') and scale_fn is None")
        if scale_fn is not None and not callable(scale_fn):
            raise TypeError(f"scale_fn must be callable, got {scale_fn!r}")
        if scale_mode not in ("cycle", "iterations"):
            raise ValueError(f"Invalid scale_mode: {scale_mode!r} (expected 'cycle' or "
                             "'iterations')")
        gamma = _real("gamma", gamma)
        if not isinstance(cycle_momentum, bool):
            raise ValueError(f"Invalid cycle_momentum: {cycle_momentum!r} (expected a bool)")
        if cycle_momentum:
            key = _momentum_key(optimizer)
            if key is None:
                raise ValueError("optimizer must support momentum or beta1 with "
                                 "`cycle_momentum` option enabled")
            unit = lambda n, v: float(_real(n, v, lo=0, hi=1))  # noqa: E731
            base_moms = _per_group("base_momentum", optimizer, base_momentum, unit)
            max_moms = _per_group("max_momentum", optimizer, max_momentum, unit)
            for i, g in enumerate(optimizer.param_groups):
                if key not in g:
                    raise KeyError(f"param_groups[{i}] has no {key!r} to cycle")
        if last_epoch >= 0:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] "
                                   "when resuming a scheduler with last_epoch >= 0")
        # all checked: from here on the optimizer is modified (in torch's order)
        self.optimizer = optimizer
        if last_epoch == -1:
            for lr, group in zip(base_lrs, optimizer.param_groups):
                group["lr"] = lr
        self.max_lrs = max_lrs
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        self.mode = mode
        self.gamma = gamma
        self._scale_fn_custom = scale_fn
        self.scale_mode = scale_mode
        self._init_scale_fn()
        self.cycle_momentum = cycle_momentum
        self.use_beta1 = False
        self.base_momentums = None
        self.max_momentums = None
        if cycle_momentum:
            self.use_beta1 = key == "betas"
            self.base_momentums = base_moms
            self.max_momentums = max_moms
            if last_epoch == -1:
                for m, group in zip(max_moms, optimizer.param_groups):
                    _set_momentum(group, self.use_beta1, m)
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def _init_scale_fn(self):
        if self._scale_fn_custom is not None:
            return
        if self.mode == "triangular":
            self._scale_fn_ref = self._triangular_scale_fn
            self.scale_mode = "cycle"
        elif self.mode == "triangular2":
            self._scale_fn_ref = self._triangular2_scale_fn
            self.scale_mode = "cycle"
        elif self.mode == "exp_range":
            gamma = self.gamma
            self._scale_fn_ref = lambda x: gamma ** x
            self.scale_mode = "iterations"

    def scale_fn(self, x):
        """The amplitude scale at cycle number / iteration ``x``."""
        if self._scale_fn_custom is not None:
            return self._scale_fn_custom(x)
        return self._scale_fn_ref(x)

    @staticmethod
    def _triangular_scale_fn(x):
        return 1.0

    @staticmethod
    def _triangular2_scale_fn(x):
        return 1 / (2.0 ** (x - 1))

    def get_lr(self):
        self._warn_outside_step()
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
        arg = cycle if self.scale_mode == "cycle" else self.last_epoch
        lrs = []
        for base_lr, max_lr in zip(self.base_lrs, self.max_lrs):
            base_height = (max_lr - base_lr) * scale_factor
            lrs.append(base_lr + base_height * self.scale_fn(arg))
        if self.cycle_momentum:
            for group, bm, mm in zip(self.optimizer.param_groups, self.base_momentums,
                                     self.max_momentums):
                base_height = (mm - bm) * scale_factor
                _set_momentum(group, self.use_beta1, mm - base_height * self.scale_fn(arg))
        return lrs

    def state_dict(self):
        sd = {k: _copy(getattr(self, k)) for k in self._state_keys if k != "_scale_fn_custom"}
        sd["_scale_fn_custom"] = _callable_state(self._scale_fn_custom)
        return sd

    def load_state_dict(self, state_dict):
        self._check_state_dict(state_dict)
        fn = state_dict["_scale_fn_custom"]
        if fn is not None and not isinstance(fn, dict):
            raise ValueError("_scale_fn_custom in state_dict must be None or a dict")
        for k in self._state_keys:
            if k != "_scale_fn_custom":
                setattr(self, k, _copy(state_dict[k]))
        if fn is not None and self._scale_fn_custom is not None:
            self._scale_fn_custom.__dict__.update(fn)
        self._init_scale_fn()


class OneCycleLR(LRScheduler):
    r"""The 1cycle policy (Smith & Topin 2018; torch.optim.lr_scheduler.OneCycleLR).

    ``initial_lr = max_lr / div_factor``, ``min_lr = initial_lr / final_div_factor``.
    Two phases (default): ``initial_lr -> max_lr`` over steps ``0 .. pct_start*N - 1``,
    then ``max_lr -> min_lr`` until step ``N - 1``; with ``three_phase=True``:
    ``initial_lr -> max_lr -> initial_lr`` (symmetric about ``pct_start*N``) then
    ``initial_lr -> min_lr``.  Within a phase from ``a`` to ``b`` at fraction
    ``p``: ``cos``: ``b + (a - b) / 2 * (cos(pi p) + 1)``; ``linear``:
    ``(b - a) p + a``.  Momentum (``"momentum"`` or ``betas[0]``) goes the other
    way between ``max_momentum`` and ``base_momentum``.  ``N = total_steps`` or
    ``epochs * steps_per_epoch``; stepping past ``N`` raises ``ValueError``.

    Defaults as torch: pct_start 0.3, anneal_strategy 'cos', cycle_momentum True,
    base_momentum 0.85, max_momentum 0.95, div_factor 25, final_div_factor 1e4,
    three_phase False.  The per-group bounds are kept in the scheduler
    (``group_bounds``), not added to the param groups.
    """

    _state_keys = LRScheduler._state_keys + (
        "total_steps", "_schedule_phases", "_anneal_func_type", "cycle_momentum",
        "use_beta1", "group_bounds")

    def __init__(self, optimizer, max_lr, total_steps=None, epochs=None, steps_per_epoch=None,
                 pct_start=0.3, anneal_strategy="cos", cycle_momentum=True,
                 base_momentum=0.85, max_momentum=0.95, div_factor=25.0,
                 final_div_factor=1e4, three_phase=False, last_epoch=-1):
        _check_optimizer(optimizer)
        last_epoch = _int("last_epoch", last_epoch, -1)
        if total_steps is not None:
            total = _int("total_steps", total_steps, 1)
        elif epochs is not None and steps_per_epoch is not None:
            total = _int("epochs", epochs, 1) * _int("steps_per_epoch", steps_per_epoch, 1)
        else:
            raise ValueError("You must define either total_steps OR (epochs AND "
                             "steps_per_epoch)")
        pct_start = float(_real("pct_start", pct_start, lo=0, hi=1))
        if anneal_strategy not in ("cos", "linear"):
            raise ValueError(f"anneal_strategy must be one of 'cos' or 'linear', "
                             f"instead got {anneal_strategy!r}")
        div_factor = _real("div_factor", div_factor, lo=0, lo_open=True)
        final_div_factor = _real("final_div_factor", final_div_factor, lo=0, lo_open=True)
        if not isinstance(three_phase, bool):
            raise ValueError(f"Invalid three_phase: {three_phase!r} (expected a bool)")
        if not isinstance(cycle_momentum, bool):
            raise ValueError(f"Invalid cycle_momentum: {cycle_momentum!r} (expected a bool)")
        max_lrs = _per_group("max_lr", optimizer, max_lr,
                             lambda n, v: float(_real(n, v, lo=0)))
        bounds = []
        for m in max_lrs:
            initial = m / div_factor
            bounds.append({"initial_lr": initial, "max_lr": m,
                           "min_lr": initial / final_div_factor})
        if cycle_momentum:
            key = _momentum_key(optimizer)
            if key is None:
                raise ValueError("optimizer must support momentum or beta1 with "
                                 "`cycle_momentum` option enabled")
            unit = lambda n, v: float(_real(n, v, lo=0, hi=1))  # noqa: E731
            max_moms = _per_group("max_momentum", optimizer, max_momentum, unit)
            base_moms = _per_group("base_momentum", optimizer, base_momentum, unit)
            for i, (g, b, mm, bm) in enumerate(zip(optimizer.param_groups, bounds, max_moms,
                                                   base_moms)):
                if key not in g:
                    raise KeyError(f"param_groups[{i}] has no {key!r} to cycle")
                b["max_momentum"], b["base_momentum"] = mm, bm
        if last_epoch >= 0:
            for i, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(f"param 'initial_lr' is not specified in param_groups[{i}] "
                                   "when resuming a scheduler with last_epoch >= 0")
        if three_phase:
            phases = [
                {"end_step": float(pct_start * total) - 1, "start_lr": "initial_lr",
                 "end_lr": "max_lr", "start_momentum": "max_momentum",
                 "end_momentum": "base_momentum"},
                {"end_step": float(2 * pct_start * total) - 2, "start_lr": "max_lr",
                 "end_lr": "initial_lr", "start_momentum": "base_momentum",
                 "end_momentum": "max_momentum"},
                {"end_step": total - 1, "start_lr": "initial_lr", "end_lr": "min_lr",
                 "start_momentum": "max_momentum", "end_momentum": "max_momentum"},
            ]
        else:
            phases = [
                {"end_step": float(pct_start * total) - 1, "start_lr": "initial_lr",
                 "end_lr": "max_lr", "start_momentum": "max_momentum",
                 "end_momentum": "base_momentum"},
                {"end_step": total - 1, "start_lr": "max_lr", "end_lr": "min_lr",
                 "start_momentum": "base_momentum", "end_momentum": "max_momentum"},
            ]
        self._schedule_phases = phases
        self.total_steps = total
        self._locate(last_epoch + 1)  # the initial step must be computable
        # all checked: modify the optimizer (torch's order)
        self.optimizer = optimizer
        self._anneal_func_type = anneal_strategy
        self.group_bounds = bounds
        self.cycle_momentum = cycle_momentum
        self.use_beta1 = False
        if last_epoch == -1:
            for b, group in zip(bounds, optimizer.param_groups):
                group["initial_lr"] = b["initial_lr"]
        if cycle_momentum:
            self.use_beta1 = key == "betas"
            if last_epoch == -1:
                for b, group in zip(bounds, optimizer.param_groups):
                    _set_momentum(group, self.use_beta1, b["max_momentum"])
        super().__init__(optimizer, last_epoch)

    @staticmethod
    def _annealing_cos(start, end, pct):
        cos_out = math.cos(math.pi * pct) + 1
        return end + (start - end) / 2.0 * cos_out

    @staticmethod
    def _annealing_linear(start, end, pct):
        return (end - start) * pct + start

    def _anneal(self, start, end, pct):
        if self._anneal_func_type == "cos":
            return self._annealing_cos(start, end, pct)
        return self._annealing_linear(start, end, pct)

    def _locate(self, step_num):
        """(phase, pct) of step ``step_num``; ValueError past the end or in an empty
        phase (where torch divides by zero, e.g. ``pct_start * total_steps == 1``)."""
        if step_num > self.total_steps:
            raise ValueError(f"Tried to step {step_num} times. The specified number of "
                             f"total steps is {self.total_steps}")
        start_step = 0.0
        phases = self._schedule_phases
        for i, phase in enumerate(phases):
            end_step = phase["end_step"]
            if step_num <= end_step or i == len(phases) - 1:
                if end_step == start_step:
                    raise ValueError(f"OneCycleLR: step {step_num} falls in an empty phase "
                                     f"(total_steps={self.total_steps}); change pct_start")
                return phase, (step_num - start_step) / (end_step - start_step)
            start_step = phase["end_step"]

    def step(self):
        self._locate(self.last_epoch + 1)  # raise before anything changes
        super().step()

    def get_lr(self):
        self._warn_outside_step()
        phase, pct = self._locate(self.last_epoch)
        lrs = []
        for group, bounds in zip(self.optimizer.param_groups, self.group_bounds):
            lr = self._anneal(bounds[phase["start_lr"]], bounds[phase["end_lr"]], pct)
            if self.cycle_momentum:
                mom = self._anneal(bounds[phase["start_momentum"]],
                                   bounds[phase["end_momentum"]], pct)
            lrs.append(lr)
            if self.cycle_momentum:
                _set_momentum(group, self.use_beta1, mom)
        return lrs

    def _check_state_dict(self, state_dict):
        super()._check_state_dict(state_dict)
        gb = state_dict["group_bounds"]
        if not isinstance(gb, (list, tuple)) or len(gb) != len(self.optimizer.param_groups):
            raise ValueError("OneCycleLR state_dict entry 'group_bounds' must have one "
                             "entry per param group")
        if state_dict["_anneal_func_type"] not in ("cos", "linear"):
            raise ValueError(f"invalid anneal strategy {state_dict['_anneal_func_type']!r}")


# --------------------------------------------------------------------- composition

class SequentialLR(LRScheduler):
    """Run ``schedulers[i]`` between ``milestones[i-1]`` and ``milestones[i]``
    (torch.optim.lr_scheduler.SequentialLR).

    At a milestone the next scheduler restarts from its epoch 0 (its closed form
    at epoch 0, as torch).  Construction resets every group's rate to
    ``initial_lr``, undoes the sub-schedulers' initial steps and performs the
    first scheduler's initial step.  ``state_dict`` nests the sub-schedulers'.
    """

    _state_keys = ("_milestones", "last_epoch", "_last_lr", "_schedulers")

    def __init__(self, optimizer, schedulers, milestones, last_epoch=-1):
        _check_optimizer(optimizer)
        last_epoch = _int("last_epoch", last_epoch, -1)
        schedulers = list(schedulers)
        if len(schedulers) < 1:
            raise ValueError("SequentialLR expects at least one scheduler, but got no "
                             "scheduler.")
        for i, s in enumerate(schedulers):
            if not hasattr(s, "optimizer"):
                raise TypeError(f"SequentialLR at index {i} should have `optimizer` as its "
                                "attribute.")
            if isinstance(s, ReduceLROnPlateau):
                raise ValueError("SequentialLR does not support `ReduceLROnPlateau` scheduler "
                                 f"(got one at index {i})")
            if s.optimizer is not optimizer:
                raise ValueError(f"SequentialLR expects all schedulers to belong to the same "
                                 f"optimizer, but scheduler {type(s).__name__} at index {i} "
                                 "has another one")
        milestones = [_int("milestone", m, 0) for m in milestones]
        if len(milestones) != len(schedulers) - 1:
            raise ValueError("Sequential Schedulers expects number of schedulers provided to be "
                             "one more than the number of milestone points, but got number of "
                             f"schedulers {len(schedulers)} and the number of milestones to be "
                             f"equal to {len(milestones)}")
        if milestones != sorted(milestones):
            raise ValueError(f"Invalid milestones: {milestones!r} (must be sorted)")
        for i, group in enumerate(optimizer.param_groups):
            if "initial_lr" not in group:
                raise KeyError(f"param_groups[{i}] has no 'initial_lr'")
        self._schedulers = schedulers
        self._milestones = milestones
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        self.recursive_undo()
        idx = bisect_right(self._milestones, 0)
        self._schedulers[idx]._initial_step()
        self._last_lr = schedulers[idx].get_last_lr()

    def recursive_undo(self, sched=None):
        """Undo the initial step of every (nested) sub-scheduler (torch)."""
        scheds = self if sched is None else sched
        if hasattr(scheds, "_schedulers"):
            for s in scheds._schedulers:
                self.recursive_undo(s)
        elif hasattr(scheds, "last_epoch"):
            scheds.last_epoch -= 1

    def step(self):
        self.last_epoch += 1
        idx = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[idx]
        if idx > 0 and self._milestones[idx - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._last_lr = scheduler.get_last_lr()

    def state_dict(self):
        return {"_milestones": list(self._milestones), "last_epoch": self.last_epoch,
                "_last_lr": list(self._last_lr),
                "_schedulers": [s.state_dict() for s in self._schedulers]}

    def load_state_dict(self, state_dict):
        self._check_state_dict(state_dict)
        subs = state_dict["_schedulers"]
        if not isinstance(subs, (list, tuple)) or len(subs) != len(self._schedulers):
            raise ValueError(f"SequentialLR state_dict has {len(subs)} sub-scheduler states "
                             f"for {len(self._schedulers)} schedulers")
        for s, sd in zip(self._schedulers, subs):
            s._check_state_dict(sd)
        self._milestones = list(state_dict["_milestones"])
        self.last_epoch = state_dict["last_epoch"]
        self._last_lr = list(state_dict["_last_lr"])
        for s, sd in zip(self._schedulers, subs):
            s.load_state_dict(sd)


# ------------------------------------------------------------------------- plateau

class ReduceLROnPlateau(LRScheduler):
    """Reduce the rate when a metric stops improving
    (torch.optim.lr_scheduler.ReduceLROnPlateau); ``step(metric)``.

    A value ``a`` improves on the best ``b`` when (mode, threshold_mode):
    min/rel ``a < b (1 - threshold)``, min/abs ``a < b - threshold``,
    max/rel ``a > b (1 + threshold)``, max/abs ``a > b + threshold``.  After more
    than ``patience`` consecutive non-improving steps (not counted during
    ``cooldown`` steps after a reduction) every group's rate becomes
    ``max(lr * factor, min_lr)``, skipped when the change is ``<= eps``.
    Defaults as torch: mode 'min', factor 0.1, patience 10, threshold 1e-4,
    threshold_mode 'rel', cooldown 0, min_lr 0 (scalar or one per group),
    eps 1e-8.  Does not set ``initial_lr`` and does not step at construction
    (as torch).
    """

    _state_keys = ("factor", "default_min_lr", "min_lrs", "patience", "cooldown", "eps",
                   "last_epoch", "_last_lr", "mode", "threshold", "threshold_mode",
                   "mode_worse", "best", "cooldown_counter", "num_bad_epochs")

    def __init__(self, optimizer, mode="min", factor=0.1, patience=10, threshold=1e-4,
                 threshold_mode="rel", cooldown=0, min_lr=0, eps=1e-8):
        _check_optimizer(optimizer)
        factor = _real("factor", factor, lo=0, hi=1.0, hi_open=True)
        n = len(optimizer.param_groups)
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != n:
                raise ValueError(f"expected {n} min_lrs, got {len(min_lr)}")
            default_min_lr = None
            min_lrs = [_real(f"min_lr[{i}]", v, lo=0) for i, v in enumerate(min_lr)]
        else:
            default_min_lr = _real("min_lr", min_lr, lo=0)
            min_lrs = [default_min_lr] * n
        patience = _int("patience", patience, 0)
        cooldown = _int("cooldown", cooldown, 0)
        eps = _real("eps", eps, lo=0)
        threshold = _real("threshold", threshold, lo=0)
        if mode not in ("min", "max"):
            raise ValueError(f"mode {mode!r} is unknown! (expected 'min' or 'max')")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold mode {threshold_mode!r} is unknown! "
                             "(expected 'rel' or 'abs')")
        self.optimizer = optimizer
        self.factor = factor
        self.default_min_lr = default_min_lr
        self.min_lrs = min_lrs
        self.patience = patience
        self.cooldown = cooldown
        self.eps = eps
        self.last_epoch = 0
        self._last_lr = [g["lr"] for g in optimizer.param_groups]
        self.mode = mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.mode_worse = math.inf if mode == "min" else -math.inf
        self._reset()

    def _reset(self):
        self.best = self.mode_worse
        self.cooldown_counter = 0
        self.num_bad_epochs = 0

    @property
    def in_cooldown(self):
        return self.cooldown_counter > 0

    def is_better(self, a, best):
        """Whether ``a`` improves on ``best`` (see the class docstring)."""
        if self.mode == "min" and self.threshold_mode == "rel":
            return a < best * (1.0 - self.threshold)
        if self.mode == "min" and self.threshold_mode == "abs":
            return a < best - self.threshold
        if self.mode == "max" and self.threshold_mode == "rel":
            return a > best * (self.threshold + 1.0)
        return a > best + self.threshold

    def step(self, metrics):
        """Record one value of the monitored metric (anything ``float()`` accepts)."""
        try:
            current = float(metrics)
        except (TypeError, ValueError):
            raise ValueError(f"Invalid metrics: {metrics!r} (expected a number)") from None
        self.last_epoch += 1
        if self.is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def _reduce_lr(self):
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(f"The number of param groups in the optimizer "
                                   f"({len(groups)}) differs from when ReduceLROnPlateau was "
                                   f"initialized ({len(self.min_lrs)}); update `min_lrs`.")
            self.min_lrs = [self.default_min_lr] * len(groups)
        for i, group in enumerate(groups):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, self.min_lrs[i])
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def _check_state_dict(self, state_dict):
        super()._check_state_dict(state_dict)
        if state_dict["mode"] not in ("min", "max"):
            raise ValueError(f"invalid mode {state_dict['mode']!r} in state_dict")
        if state_dict["threshold_mode"] not in ("rel", "abs"):
            raise ValueError(f"invalid threshold_mode {state_dict['threshold_mode']!r}")
