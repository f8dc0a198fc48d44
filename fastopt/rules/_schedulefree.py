"""What the two schedule-free rules share (the ``schedulefree`` package 1.4.1's
``AdamWScheduleFree`` and ``SGDScheduleFree``): the per-step schedule (warmup,
``lr_max``, the average's weights, ``ckp1``), the train/eval mode switch, and the
checks.  See :mod:`fastopt.rules.adamw_schedulefree` for the equations and the
choices (where the package's per-group scalars live, the mode flag, the start of
``z``)."""

import math

import numpy as np

from . import hyperparams as hp


def schedule(group, step, host):
    """The package's per-step scalars at ``step`` (its ``k + 1``): ``(lr, ckp1)`` and
    the new host state ``{"lr_max", "weight_sum"}``."""
    k = step - 1
    warmup = group["warmup_steps"]
    sched = (k + 1) / warmup if k < warmup else 1.0
    lr = group["lr"] * sched
    lr_max = max(lr, host["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = host["weight_sum"] + weight
    try:
        ckp1 = weight / weight_sum
    except ZeroDivisionError:
        ckp1 = 0
    return lr, ckp1, {"lr_max": lr_max, "weight_sum": weight_sum}


def lerp_scalars(ckp1):
    """torch's lerp by a scalar weight: ``a + w (b - a)`` for ``w < 0.5``, else
    ``b - (b - a)(1 - w)`` (both forms exact at their end)."""
    return dict(ckp1=ckp1, one_minus_ckp1=1.0 - ckp1, lerp_high=ckp1 >= 0.5)


def lerp(a, b, w):
    """torch's ``a.lerp_(b, w)`` for a Python float ``w``, in place, in ``a``'s dtype."""
    w = float(w)
    if abs(w) < 0.5:
        a += w * (b - a)
    else:
        a[...] = b - (b - a) * (1.0 - w)
    return a


def start_z(param, z):
    """``z`` starts as the parameter (the package clones it on a parameter's first
    step): slots start NaN, and the elements still NaN take the parameter's value."""
    fresh = np.isnan(z)
    if fresh.any():
        z[fresh] = param[fresh]


def host_check(name, value):
    """A saved ``lr_max`` is finite (the package starts it at -1.0), ``weight_sum``
    finite and >= 0."""
    v = float(value)
    if name == "weight_sum":
        return None if math.isfinite(v) and v >= 0.0 else "a finite number >= 0"
    return None if math.isfinite(v) and v >= -1.0 else "a finite number >= -1"


def step_reason(group):
    """A step is refused in eval mode (the parameters hold x, not y), as the package
    refuses it."""
    mode = group.get("train_mode", True)
    if mode not in (True, False):
        return f"its 'train_mode' must be True or False, got {mode!r}"
    if not mode:
        return ("the optimizer is in eval mode (the parameters hold the averaged x); "
                "call optimizer.train() before stepping, as with the schedulefree package")
    return None


def low_state_reason(group):
    """``z`` is the base iterate, not a moment: ``z -= lr g`` adds increments of
    ``lr |g|`` to a value of the parameter's size, and 16-bit state is stored
    round-to-nearest (bfloat16: a step below 2**-9 of ``|z|`` is lost), so once
    ``lr |g|`` falls below that (a small ``lr``, a late warm-down of the gradient)
    ``z``, and the averaged ``x`` that ``eval()`` reads from it, stop moving, as
    ASGD's average does; 8-bit codes are far coarser.  Measured (numpy backend,
    (1, 8192) float32, 300 steps of N(0.3, 1) gradients with every 7th element 1e-4
    of that, then ``eval()``): bfloat16 state drifted AdamWScheduleFree's
    parameters 0.0045 (mean 0.0008) from float32 state, which moved them 0.19, and
    SGDScheduleFree's (lr 0.1) 0.18 (mean 0.028) of 8.4: 2% after 300 steps, and
    growing with ``|z| / (lr |g|)``."""
    return ("z is the base iterate (z -= lr g): increments below the 16-bit or 8-bit "
            "store's rounding step of |z| are lost and x stops moving; use state_bits=32")


def bf16_reason():
    """Why bfloat16 parameters are refused.  ``z`` would be float32 state (as every
    rule's state of a bfloat16 parameter), so the steps themselves are sound; the
    train()/eval() switch is not: it rewrites the parameter (``x = lerp(y, z, 1 -
    1/beta1)``, then ``y = lerp(x, z, 1 - beta1)``), so with bfloat16 parameters it
    would run through the parameter's format.  Only ``bf16_update="split"`` (the
    parameter and ``master_low`` are a float32 master) switches without loss;
    "kahan", "nearest" and "stochastic" round ``x``, then ``y`` again, so each
    eval()/train() pair moves ``y`` by up to one bfloat16 step (2**-8 of ``|y|``)
    where the package's float32 parameters move by float32 rounding, and a
    checkpoint saved after eval() holds the rounded ``x``.  A switch through the
    split master (and a CUDA twin) is not built: refused for every mode."""
    return ("eval() rewrites the parameter to the average x = lerp(y, z, 1 - 1/beta1) "
            "(SGDScheduleFree: momentum) and train() back to y; in bfloat16 each switch rounds the parameter (kahan, nearest, "
            "stochastic: y moves by up to one bfloat16 step per eval()/train() pair; only "
            "split's float32 master could switch exactly, and that switch is not built): "
            "use float32 parameters (z is float32 state either way)")


def momentum_check(name, value):
    """In (0, 1): ``eval()`` divides by it."""
    value = hp.unit_half_open(name, value)
    if value == 0.0:
        raise ValueError(f"Invalid {name}: {value!r} (must be in (0, 1): eval() sets "
                         "p = lerp(p, z, 1 - 1/momentum))")
    return value


def betas_check(name, value):
    b1, b2 = hp.betas_half_open(name, value)
    if b1 == 0.0:
        raise ValueError(f"Invalid {name}[0]: {b1!r} (must be in (0, 1): eval() sets "
                         "p = lerp(p, z, 1 - 1/beta1))")
    return (b1, b2)


def non_negative_int(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer >= 0)")
    return int(value)


def _switch(opt, to_train, beta1_of):
    """Move every group that is not in the wanted mode: ``p = lerp(p, z, w)`` for each
    of its parameters that has a ``z`` (``w = 1 - beta1`` to train, ``1 - 1/beta1``
    to eval, the package's), then set the group's ``train_mode``."""
    moves = []
    for group in opt.param_groups:
        mode = group.get("train_mode", True)
        if mode not in (True, False):
            raise ValueError(f"param group 'train_mode' must be True or False, got {mode!r}")
        moves.append(mode is not to_train)
    bk = opt.backend
    k = 0
    for group, move in zip(opt.param_groups, moves):
        n = len(group["params"])
        if move:
            b1 = beta1_of(group)
            w = 1.0 - b1 if to_train else 1.0 - 1.0 / b1
            for i in range(k, k + n):
                st = opt._state[i]
                if "z" not in st:
                    continue
                p, z = opt._params[i], st["z"]
                if bk.memory == "device":
                    ph, zh = bk.to_host(p), bk.to_host(z)
                    start_z(ph, zh)
                    p.copy_to_device(lerp(ph, zh, w))
                else:
                    start_z(p, z)        # (elements never stepped: z = p, x = y = p)
                    lerp(p, z, w)
            group["train_mode"] = to_train
        k += n
    opt.invalidate()


def methods(beta1_of):
    def train(self):
        """Switch the parameters to ``y`` (where gradients are taken):
        ``p = lerp(p, z, 1 - beta1)`` for every group in eval mode; a no-op for a
        group in train mode.  Call before training steps (schedulefree's ``train()``)."""
        _switch(self, True, beta1_of)

    def eval(self):
        """Switch the parameters to the averaged ``x`` (what to evaluate and save):
        ``p = lerp(p, z, 1 - 1/beta1)`` for every group in train mode; a no-op for a
        group in eval mode.  Steps are refused until :meth:`train` (schedulefree's
        ``eval()``)."""
        _switch(self, False, beta1_of)

    return (train, eval)



#: the package's per-group entries that fastopt keeps elsewhere (per parameter) or
#: not at all (``scheduled_lr`` is for logging, ``foreach`` an implementation switch)
PACKAGE_GROUP_KEYS = ("k", "lr_max", "weight_sum", "scheduled_lr", "foreach")


def torch_state_out(sd):
    """The drop-in's state dict, loadable by the package too: each group also gets
    the package's ``k``, ``lr_max``, ``weight_sum`` (those of its first parameter
    with state, which every parameter of the group shares when each had a gradient
    at every step), ``scheduled_lr`` and ``foreach=True``; the per-parameter entries
    stay (the package ignores them)."""
    groups = []
    for group in sd["param_groups"]:
        group = dict(group)
        first = next((sd["state"][k] for k in group["params"] if k in sd["state"]), None)
        k = int(first["step"]) if first is not None else 0
        group.update(k=k, lr_max=float(first["lr_max"]) if first is not None else -1.0,
                 weight_sum=float(first["weight_sum"]) if first is not None else 0.0,
                 foreach=group.get("foreach", True))
        warmup = group["warmup_steps"]
        group["scheduled_lr"] = group["lr"] * (k / warmup if k <= warmup and warmup else 1.0) \
            if k else 0.0
        groups.append(group)
    return {**sd, "param_groups": groups}


def torch_state_in(sd):
    """A state dict of the package (groups with ``k``, ``lr_max``, ``weight_sum``;
    parameters with ``z``, ``exp_avg_sq`` and no ``step``) in the drop-in's layout:
    each parameter with state takes its group's ``k`` as its step and the group's
    ``lr_max``, ``weight_sum``.  The package-only group entries are dropped (a
    parameter's own ``step``, ``lr_max``, ``weight_sum``, when present, win)."""
    groups, state = [], dict(sd["state"])
    for group in sd["param_groups"]:
        if not isinstance(group, dict):
            return sd                     # (the drop-in's own checks name the problem)
        for key in group.get("params", ()):
            st = state.get(key)
            if isinstance(st, dict) and st and "k" in group:
                st = dict(st)
                st.setdefault("step", group["k"])
                st.setdefault("lr_max", group.get("lr_max", -1.0))
                st.setdefault("weight_sum", group.get("weight_sum", 0.0))
                state[key] = st
        groups.append({k: v for k, v in group.items() if k not in PACKAGE_GROUP_KEYS})
    return {**sd, "state": state, "param_groups": groups}
