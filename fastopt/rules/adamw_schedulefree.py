"""Schedule-free AdamW (Defazio et al. 2024, "The Road Less Scheduled") as the
``schedulefree`` package's ``AdamWScheduleFree`` (1.4.1).

Equations (state ``z``, the base iterate, and ``exp_avg_sq`` v; the parameter holds
``y`` while training; ``t = k + 1`` the step, from 1)::

    lr_t    = lr * min(1, t / warmup_steps)                     (lr when warmup_steps = 0)
    lr_max  = max(lr_max, lr_t)                                 (starts at -1)
    weight  = t^r * lr_max^weight_lr_power
    weight_sum = weight_sum + weight                            (starts at 0)
    ckp1    = weight / weight_sum                               (0 when weight_sum = 0)
    v  = beta2 v + (1 - beta2) g^2
    gn = g / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * y
    y  = lerp(y, z, ckp1) + lr_t (beta1 (1 - ckp1) - 1) gn
    z  = z - lr_t gn

The averaged point the package evaluates is ``x = lerp(y, z, 1 - 1/beta1)``:
``eval()`` rewrites each parameter to it, ``train()`` back to
``y = lerp(x, z, 1 - beta1)``; ``z`` starts as the parameter on its first step.

Choices (documented here, tested in tests/test_new_rules_schedulefree.py):

* **The package's per-group scalars** ``k``, ``lr_max``, ``weight_sum`` are kept per
  parameter, as fastopt keeps every rule's host scalars (NAdam's ``mu_product``,
  ASGD's ``eta``): ``k`` is the parameter's step count less one, ``lr_max`` and
  ``weight_sum`` are host scalars in its state (they travel in ``state_dict`` and a
  checkpoint round trip resumes bit for bit).  They equal the package's per-group
  values whenever every parameter of a group has a gradient at every step (the
  package advances ``k`` and ``weight_sum`` for the whole group even for a parameter
  without a gradient).
* **State dicts with the package**: the torch drop-in's ``state_dict()`` also gives
  each group the package's ``k``, ``lr_max``, ``weight_sum`` (its first stepped
  parameter's), ``scheduled_lr`` and ``foreach``, so the package's class loads it;
  a state dict of the package loads into the drop-in (each parameter takes its
  group's values; ``Rule.torch_state_out`` / ``torch_state_in``).  Both continue on
  the same trajectory (tested, in either mode).
* **The mode** is the group entry ``train_mode`` (the package's name), saved and
  loaded with the groups, so a checkpoint resumes in the mode it was saved in and
  ``train()`` / ``eval()`` switch it either way.  fastopt's groups start in train
  mode (the package's start in eval mode and refuse a step until ``train()``; as no
  ``z`` exists before the first step, ``train()`` there only sets the flag, so the
  trajectories agree).  A step of any group in eval mode is refused before anything
  changes (the package checks the first group only).
* **z starts as the parameter**: ``z`` slots start as NaN, and the element math
  takes ``z = p`` where ``z`` is NaN.  On a dense step that is the package's clone;
  under row-sparse lazy steps the rows a step does not touch keep ``z = NaN`` until
  their first step (for them ``x = y = z = p``, which ``train()`` / ``eval()`` keep).
  A NaN that reached ``z`` through the math (a NaN gradient) made ``y`` NaN in the
  same step, so taking ``z = p`` there changes nothing.
* **Variant**: the package's default ``foreach`` path and its per-tensor path are the
  same equations; the order here is theirs (``v`` scaled then ``addcmul``, ``denom =
  sqrt(v / bc2) + eps``, torch's two-sided ``lerp``); the schedule is computed in
  float64 on the host, as the package computes it in Python floats.
* Low-precision state (8- and 16-bit) is refused: ``z`` is an iterate, not a moment
  (:func:`fastopt.rules._schedulefree.low_state_reason`); bfloat16 parameters too:
  the train()/eval() switch would round the parameter at every switch
  (:func:`fastopt.rules._schedulefree.bf16_reason`).
"""

import numpy as np

from .._jit import register_jitable

from . import _schedulefree as sf
from . import hyperparams as hp
from .base import Rule, scalars_type

Scalars = scalars_type("AdamWScheduleFreeScalars", (
    "lr", "ckp1", "one_minus_ckp1", "lerp_high", "y_coef", "beta2", "one_minus_beta2",
    "bc2", "eps", "weight_decay"))


def host_scalars(group, step, host, fresh):
    b1, b2 = group["betas"]
    lr, ckp1, new_host = sf.schedule(group, step, host)
    return dict(lr=lr, y_coef=lr * (b1 * (1 - ckp1) - 1), beta2=b2, one_minus_beta2=1.0 - b2,
                bc2=1.0 - b2 ** step, eps=group["eps"], weight_decay=group["weight_decay"],
                **sf.lerp_scalars(ckp1)), new_host


@register_jitable
def element(p, g, z, v, s2, c):
    if z != z:                       # not started: z is the parameter
        z = p
    v = v * c.beta2 + c.one_minus_beta2 * g * g
    gn = g / (np.sqrt(v / c.bc2) + c.eps)
    if c.weight_decay:
        gn = gn + c.weight_decay * p
    if c.lerp_high:
        p = z - (z - p) * c.one_minus_ckp1
    else:
        p = p + c.ckp1 * (z - p)
    p = p + c.y_coef * gn
    z = z - c.lr * gn
    return p, z, v, s2


def reference(param, grad, state, group, step, fresh=()):
    """The package's per-tensor (non-foreach) step, with its scalars from the host
    state ``lr_max``, ``weight_sum`` in ``state``."""
    beta1, beta2 = group["betas"]
    lr, ckp1, host = sf.schedule(group, step, state)
    state.update(host)
    z, exp_avg_sq = state["z"], state["exp_avg_sq"]
    sf.start_z(param, z)
    bias_correction2 = 1 - beta2 ** step
    exp_avg_sq *= beta2
    exp_avg_sq += (1 - beta2) * grad * grad
    denom = np.sqrt(exp_avg_sq / bias_correction2) + group["eps"]
    grad_normalized = grad / denom
    if group["weight_decay"] != 0:
        grad_normalized = grad_normalized + group["weight_decay"] * param
    sf.lerp(param, z, ckp1)
    param += lr * (beta1 * (1 - ckp1) - 1) * grad_normalized
    z -= lr * grad_normalized


def _beta1(group):
    return group["betas"][0]


RULE = Rule(
    name="AdamWScheduleFree",
    doc="""Schedule-free AdamW (Defazio et al. 2024) as the schedulefree package's
        AdamWScheduleFree: no learning-rate schedule; the parameters hold ``y`` while
        training, and ``eval()`` / ``train()`` switch them to the averaged ``x`` and back.

        ``lr_t = lr min(1, t / warmup_steps)``; ``lr_max = max(lr_max, lr_t)``;
        ``c = t^r lr_max^weight_lr_power / sum of those``;
        ``v = b2 v + (1 - b2) g^2``; ``gn = g / (sqrt(v / (1 - b2^t)) + eps) + wd y``;
        ``y = lerp(y, z, c) + lr_t (b1 (1 - c) - 1) gn``; ``z -= lr_t gn``.
        ``eval()``: ``p = lerp(p, z, 1 - 1/b1)``; ``train()``: ``p = lerp(p, z, 1 - b1)``.
        State ``z`` (starts as the parameter), ``exp_avg_sq``; ``lr_max`` and
        ``weight_sum`` per parameter (host); the group's ``train_mode``.
        """,
    defaults=dict(lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, warmup_steps=0,
                  r=0.0, weight_lr_power=2.0),
    checks=dict(lr=hp.non_negative, betas=sf.betas_check, eps=hp.non_negative,
                weight_decay=hp.non_negative, warmup_steps=sf.non_negative_int, r=hp.real,
                weight_lr_power=hp.non_negative),
    slots=("z", "exp_avg_sq"),
    nonnegative_slots=("exp_avg_sq",),
    uses_slots=lambda group: (True, True, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    host_init=lambda group: {"lr_max": -1.0, "weight_sum": 0.0},
    host_check=sf.host_check,
    slot_init=lambda group, name: float("nan") if name == "z" else 0.0,
    zero_switches=("weight_decay",),
    low_state_reason=sf.low_state_reason,
    bf16_reason=sf.bf16_reason,
    group_keys={"train_mode": True},
    step_reason=sf.step_reason,
    torch_state_out=sf.torch_state_out,
    torch_state_in=sf.torch_state_in,
    methods=sf.methods(_beta1),
    variants=({}, {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 1e-2, "warmup_steps": 5,
                   "r": 1.0, "weight_lr_power": 1.0, "eps": 1e-6}),
)
