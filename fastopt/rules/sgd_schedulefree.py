"""Schedule-free SGD (Defazio et al. 2024) as the ``schedulefree`` package's
``SGDScheduleFree`` (1.4.1).

Equations (state ``z``; the parameter holds ``y`` while training; ``t`` the step)::

    lr_t, ckp1 as AdamWScheduleFree (warmup, lr_max, weight, weight_sum)
    g = g + weight_decay * y
    y = lerp(y, z, ckp1) + lr_t (momentum (1 - ckp1) - 1) g
    z = z - lr_t g

``eval()``: ``p = lerp(p, z, 1 - 1/momentum)``; ``train()``:
``p = lerp(p, z, 1 - momentum)``.  The choices (per-parameter ``lr_max`` and
``weight_sum``, the group's ``train_mode``, ``z`` starting as the parameter through
NaN slots, refused low-precision state) are AdamWScheduleFree's: see
:mod:`fastopt.rules.adamw_schedulefree`.
"""

from .._jit import register_jitable

from . import _schedulefree as sf
from . import hyperparams as hp
from .base import Rule, scalars_type

Scalars = scalars_type("SGDScheduleFreeScalars", (
    "lr", "ckp1", "one_minus_ckp1", "lerp_high", "y_coef", "weight_decay"))


def host_scalars(group, step, host, fresh):
    lr, ckp1, new_host = sf.schedule(group, step, host)
    return dict(lr=lr, y_coef=lr * (group["momentum"] * (1 - ckp1) - 1),
                weight_decay=group["weight_decay"], **sf.lerp_scalars(ckp1)), new_host


@register_jitable
def element(p, g, z, s1, s2, c):
    if z != z:                       # not started: z is the parameter
        z = p
    if c.weight_decay:
        g = g + c.weight_decay * p
    if c.lerp_high:
        p = z - (z - p) * c.one_minus_ckp1
    else:
        p = p + c.ckp1 * (z - p)
    p = p + c.y_coef * g
    z = z - c.lr * g
    return p, z, s1, s2


def reference(param, grad, state, group, step, fresh=()):
    """The package's per-tensor (non-foreach) step."""
    momentum = group["momentum"]
    lr, ckp1, host = sf.schedule(group, step, state)
    state.update(host)
    z = state["z"]
    sf.start_z(param, z)
    if group["weight_decay"] != 0:
        grad = grad + group["weight_decay"] * param
    sf.lerp(param, z, ckp1)
    param += lr * (momentum * (1 - ckp1) - 1) * grad
    z -= lr * grad


def _momentum(group):
    return group["momentum"]


RULE = Rule(
    name="SGDScheduleFree",
    doc="""Schedule-free SGD (Defazio et al. 2024) as the schedulefree package's
        SGDScheduleFree: the parameters hold ``y`` while training, and ``eval()`` /
        ``train()`` switch them to the averaged ``x`` and back.

        ``lr_t``, ``c`` as AdamWScheduleFree; ``g = g + wd y``;
        ``y = lerp(y, z, c) + lr_t (momentum (1 - c) - 1) g``; ``z -= lr_t g``.
        ``eval()``: ``p = lerp(p, z, 1 - 1/momentum)``; ``train()``:
        ``p = lerp(p, z, 1 - momentum)``.  State ``z`` (starts as the parameter);
        ``lr_max`` and ``weight_sum`` per parameter (host); the group's ``train_mode``.
        """,
    defaults=dict(lr=1.0, momentum=0.9, weight_decay=0.0, warmup_steps=0, r=0.0,
                  weight_lr_power=2.0),
    checks=dict(lr=hp.non_negative, momentum=sf.momentum_check,
                weight_decay=hp.non_negative, warmup_steps=sf.non_negative_int, r=hp.real,
                weight_lr_power=hp.non_negative),
    slots=("z",),
    uses_slots=lambda group: (True, False, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    host_init=lambda group: {"lr_max": -1.0, "weight_sum": 0.0},
    host_check=sf.host_check,
    slot_init=lambda group, name: float("nan"),
    zero_switches=("weight_decay",),
    low_state_reason=sf.low_state_reason,
    bf16_reason=sf.bf16_reason,
    group_keys={"train_mode": True},
    step_reason=sf.step_reason,
    torch_state_out=sf.torch_state_out,
    torch_state_in=sf.torch_state_in,
    methods=sf.methods(_momentum),
    variants=({}, {"lr": 0.5, "momentum": 0.5, "weight_decay": 1e-2, "warmup_steps": 4,
                   "r": 0.5, "weight_lr_power": 0.0}),
)
