"""The one registry of update rules.

A :class:`Rule` says everything the API, the backends, the tests and the
benchmarks need to know about an optimizer: its hyperparameters (defaults and
checks, in torch.optim's names), its state slots (torch's state keys), which slots
a given configuration uses, how the per-step host scalars are computed, the
per-element math (:mod:`fastopt.rules`) and the NumPy reference
(:mod:`fastopt.reference`).  Nothing else in the package keeps a list of rules.
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Tuple

from . import exact, fused
from . import hyperparams as hp
from . import reference, rules

#: Length of the per-step scalar tuple every rule math receives: the rule's own
#: scalars in columns 0..11, the fused options' (fastopt.fused) in 12..17.
NSCALARS = 18
#: Number of state slots every rule math receives.
NSLOTS = 3


@dataclass(frozen=True)
class Rule:
    name: str                      # the optimizer class name, e.g. "Adam"
    defaults: Dict[str, object]    # hyperparameter -> default (torch's)
    checks: Dict[str, Callable]    # hyperparameter -> check(name, value) -> value
    slots: Tuple[str, ...]         # state names in slot order (torch's keys)
    uses_slots: Callable           # group -> tuple of NSLOTS bools
    scalars: Callable              # (group, step, host, fresh) -> (tuple, new host)
    math: Callable                 # per-element function (fastopt.rules)
    reference: Callable            # whole-array NumPy reference (fastopt.reference)
    host_init: Callable = lambda group: {}      # per-parameter host scalars (NAdam)
    slot_init: Callable = lambda group, name: 0.0  # initial value of a state slot
    cross_check: Callable = lambda group: None  # checks spanning hyperparameters
    #: scalar indices that are option flags (0/1): drivers specialize on their values
    flags: Tuple[int, ...] = ()
    #: scalar indices (weight decay) whose zero value drivers specialize on
    zero_switches: Tuple[int, ...] = ()
    #: sparse_mode="exact": closed-form catch-up (fastopt.exact) or None
    catch_up: Callable = None
    #: group -> None when exact mode is possible for it, else the reason
    exact_reason: Callable = lambda group: "no closed form for skipped steps"
    #: "elementwise" (state has the parameter's shape) or "rowwise" (one state value
    #: per row of the first axis; such rules run through the row drivers)
    layout: str = "elementwise"
    #: configurations that together exercise every option (tests and benchmarks use them)
    variants: Tuple[dict, ...] = ({},)

    def __post_init__(self):
        # every rule also takes the fused options (fastopt.fused), off by default
        object.__setattr__(self, "defaults", {**self.defaults, **fused.DEFAULTS})
        object.__setattr__(self, "checks", {**self.checks, **fused.CHECKS})

    def check_group(self, group):
        """Validate and normalize the hyperparameters of one param group (a dict).

        Returns a new dict; raises ValueError naming the bad value.
        """
        out = {}
        for key, check in self.checks.items():
            out[key] = check(key, group.get(key, self.defaults[key]))
        self.cross_check(out)
        fused.cross_check(out)
        return out

    def slot_shape(self, param_shape):
        """Shape of a state slot for a parameter of ``param_shape``."""
        if self.layout == "rowwise":
            return tuple(param_shape[:1])
        return tuple(param_shape)

    def constants(self, group):
        """The per-step scalars that are fixed for a group: ``((index, value), ...)``.

        Option flags keep their value; a zero weight decay is fixed at zero.  Kernels
        compile these in, so a flag costs no branch in the element loop.
        """
        scal, _ = self.scalars(group, 1, self.host_init(group), ())
        fixed = [(k, scal[k]) for k in self.flags]
        fixed += [(k, 0.0) for k in self.zero_switches if scal[k] == 0.0]
        return tuple(sorted(fixed))


def torch_defaults(rule):
    """The rule's own hyperparameters (torch's names), without the fused options."""
    return {k: v for k, v in rule.defaults.items() if k not in fused.DEFAULTS}


def _pad(values):
    values = tuple(float(v) for v in values)
    assert len(values) <= fused.BASE
    return values + (0.0,) * (NSCALARS - len(values))


# --------------------------------------------------------------------------- SGD

def _sgd_cross(g):
    if g["nesterov"] and (g["momentum"] <= 0.0 or g["dampening"] != 0.0):
        raise ValueError(
            f"Invalid nesterov=True with momentum={g['momentum']!r}, "
            f"dampening={g['dampening']!r}: Nesterov momentum requires a momentum "
            "and zero dampening")


def _sgd_scalars(g, step, host, fresh):
    has_mom = g["momentum"] != 0.0
    return _pad((g["lr"], g["weight_decay"], g["momentum"], 1.0 - g["dampening"],
                 g["nesterov"], g["maximize"], "momentum_buffer" in fresh, has_mom)), host


SGD = Rule(
    name="SGD",
    defaults=dict(lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                  nesterov=False, maximize=False),
    checks=dict(lr=hp.non_negative, momentum=hp.non_negative, dampening=hp.unit_closed,
                weight_decay=hp.non_negative, nesterov=hp.boolean, maximize=hp.boolean),
    slots=("momentum_buffer",),
    uses_slots=lambda g: (g["momentum"] != 0.0, False, False),
    scalars=_sgd_scalars,
    math=rules.sgd,
    flags=(4, 5, 7),
    zero_switches=(1,),
    variants=({"lr": 0.01}, {"lr": 0.01, "momentum": 0.9},
              {"lr": 0.01, "momentum": 0.9, "dampening": 0.9, "weight_decay": 1e-2},
              {"lr": 0.01, "momentum": 0.9, "nesterov": True, "maximize": True}),
    reference=reference.sgd,
    cross_check=_sgd_cross,
    catch_up=exact.sgd,
    exact_reason=exact.sgd_reason,
)

# ----------------------------------------------------------------------- Adagrad


def _adagrad_scalars(g, step, host, fresh):
    clr = g["lr"] / (1.0 + (step - 1) * g["lr_decay"])
    return _pad((clr, g["weight_decay"], g["eps"], g["maximize"])), host


Adagrad = Rule(
    name="Adagrad",
    defaults=dict(lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                  eps=1e-10, maximize=False),
    checks=dict(lr=hp.non_negative, lr_decay=hp.non_negative, weight_decay=hp.non_negative,
                initial_accumulator_value=hp.non_negative, eps=hp.non_negative,
                maximize=hp.boolean),
    slots=("sum",),
    uses_slots=lambda g: (True, False, False),
    scalars=_adagrad_scalars,
    math=rules.adagrad,
    flags=(3,),
    zero_switches=(1,),
    variants=({}, {"lr_decay": 0.01, "weight_decay": 1e-2, "initial_accumulator_value": 0.1},
              {"maximize": True, "eps": 1e-6}),
    reference=reference.adagrad,
    slot_init=lambda g, name: g["initial_accumulator_value"],
    catch_up=exact.identity,
    exact_reason=exact.adagrad_reason,
)

# ----------------------------------------------------------------------- RMSprop


def _rmsprop_scalars(g, step, host, fresh):
    a = g["alpha"]
    return _pad((g["lr"], g["weight_decay"], a, 1.0 - a, g["eps"], g["momentum"],
                 g["centered"], g["momentum"] > 0.0, g["maximize"])), host


RMSprop = Rule(
    name="RMSprop",
    defaults=dict(lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                  centered=False, maximize=False),
    checks=dict(lr=hp.non_negative, alpha=hp.unit_closed, eps=hp.non_negative,
                weight_decay=hp.non_negative, momentum=hp.non_negative,
                centered=hp.boolean, maximize=hp.boolean),
    slots=("square_avg", "grad_avg", "momentum_buffer"),
    uses_slots=lambda g: (True, g["centered"], g["momentum"] > 0.0),
    scalars=_rmsprop_scalars,
    math=rules.rmsprop,
    catch_up=exact.rmsprop,
    exact_reason=exact.rmsprop_reason,
    flags=(6, 7, 8),
    zero_switches=(1,),
    variants=({}, {"centered": True}, {"momentum": 0.9, "weight_decay": 1e-2},
              {"centered": True, "momentum": 0.5, "maximize": True, "alpha": 0.9}),
    reference=reference.rmsprop,
)

# ------------------------------------------------------------------ Adam / AdamW


def _adam_scalars_for(decoupled):
    def scalars(g, step, host, fresh):
        b1, b2 = g["betas"]
        lr, wd = g["lr"], g["weight_decay"]
        bc1 = 1.0 - b1 ** step
        bc2 = 1.0 - b2 ** step
        l2, decay = (0.0, 1.0 - lr * wd) if decoupled else (wd, 1.0)
        return _pad((lr / bc1, b1, 1.0 - b1, b2, 1.0 - b2, g["eps"], 1.0 / math.sqrt(bc2),
                     l2, decay, g["amsgrad"], g["maximize"])), host
    return scalars


_ADAM_CHECKS = dict(lr=hp.non_negative, betas=hp.betas_half_open, eps=hp.non_negative,
                    weight_decay=hp.non_negative, amsgrad=hp.boolean, maximize=hp.boolean)
_ADAM_SLOTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

Adam = Rule(
    name="Adam",
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  amsgrad=False, maximize=False),
    checks=_ADAM_CHECKS,
    slots=_ADAM_SLOTS,
    uses_slots=lambda g: (True, True, g["amsgrad"]),
    scalars=_adam_scalars_for(decoupled=False),
    math=rules.adam,
    flags=(9, 10),
    zero_switches=(7,),
    reference=reference.adam,
    variants=({}, {"amsgrad": True}, {"weight_decay": 1e-2, "maximize": True},
              {"amsgrad": True, "weight_decay": 1e-2, "betas": (0.5, 0.9), "eps": 1e-6}),
)

AdamW = Rule(
    name="AdamW",
    defaults=dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                  amsgrad=False, maximize=False),
    checks=_ADAM_CHECKS,
    slots=_ADAM_SLOTS,
    uses_slots=lambda g: (True, True, g["amsgrad"]),
    scalars=_adam_scalars_for(decoupled=True),
    math=rules.adam,
    flags=(9, 10),
    zero_switches=(7,),
    reference=reference.adamw,
    variants=({}, {"amsgrad": True, "weight_decay": 0.1}, {"maximize": True}),
)

# ------------------------------------------------------------------------ Adamax


def _adamax_scalars(g, step, host, fresh):
    b1, b2 = g["betas"]
    return _pad((g["lr"] / (1.0 - b1 ** step), b1, 1.0 - b1, b2, g["eps"],
                 g["weight_decay"], g["maximize"])), host


Adamax = Rule(
    name="Adamax",
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    checks=dict(lr=hp.non_negative, betas=hp.betas_half_open, eps=hp.non_negative,
                weight_decay=hp.non_negative, maximize=hp.boolean),
    slots=("exp_avg", "exp_inf"),
    uses_slots=lambda g: (True, True, False),
    scalars=_adamax_scalars,
    math=rules.adamax,
    flags=(6,),
    zero_switches=(5,),
    variants=({}, {"weight_decay": 1e-2, "maximize": True, "betas": (0.8, 0.99)}),
    reference=reference.adamax,
)

# ------------------------------------------------------------------------- NAdam


def nadam_mu(beta1, momentum_decay, step):
    """torch's NAdam momentum schedule mu_t = beta1 (1 - 0.5 * 0.96^(t psi))."""
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def _nadam_scalars(g, step, host, fresh):
    b1, b2 = g["betas"]
    lr, wd, psi = g["lr"], g["weight_decay"], g["momentum_decay"]
    mu = nadam_mu(b1, psi, step)
    mu_next = nadam_mu(b1, psi, step + 1)
    mu_product = host["mu_product"] * mu
    mu_product_next = mu_product * mu_next
    bc2 = 1.0 - b2 ** step
    l2, decay = (0.0, 1.0 - lr * wd) if g["decoupled_weight_decay"] else (wd, 1.0)
    cg = lr * (1.0 - mu) / (1.0 - mu_product)
    cm = lr * mu_next / (1.0 - mu_product_next)
    return (_pad((cg, cm, b1, 1.0 - b1, b2, 1.0 - b2, g["eps"], 1.0 / math.sqrt(bc2),
                  l2, decay, g["maximize"])),
            {"mu_product": mu_product})


NAdam = Rule(
    name="NAdam",
    defaults=dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                  momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False),
    checks=dict(lr=hp.non_negative, betas=hp.betas_half_open, eps=hp.non_negative,
                weight_decay=hp.non_negative, momentum_decay=hp.non_negative,
                decoupled_weight_decay=hp.boolean, maximize=hp.boolean),
    slots=("exp_avg", "exp_avg_sq"),
    uses_slots=lambda g: (True, True, False),
    scalars=_nadam_scalars,
    math=rules.nadam,
    flags=(10,),
    zero_switches=(8,),
    variants=({}, {"weight_decay": 1e-2}, {"weight_decay": 1e-2, "decoupled_weight_decay": True,
                                           "maximize": True, "momentum_decay": 1e-2}),
    reference=reference.nadam,
    host_init=lambda g: {"mu_product": 1.0},
)

# -------------------------------------------------------------------------- Lion


def _lion_scalars(g, step, host, fresh):
    b1, b2 = g["betas"]
    return _pad((g["lr"], b1, 1.0 - b1, b2, 1.0 - b2, 1.0 - g["lr"] * g["weight_decay"],
                 g["maximize"], 1.0, 0.0)), host


Lion = Rule(
    name="Lion",
    defaults=dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    checks=dict(lr=hp.non_negative, betas=hp.betas_closed, weight_decay=hp.non_negative,
                maximize=hp.boolean),
    slots=("exp_avg",),
    uses_slots=lambda g: (True, False, False),
    scalars=_lion_scalars,
    math=rules.lion,
    flags=(6, 7, 8),
    variants=({}, {"weight_decay": 0.1, "maximize": True, "betas": (0.95, 0.98)}),
    reference=reference.lion,
)


# -------------------------------------------------------------- RowWiseAdagrad

RowWiseAdagrad = Rule(
    name="RowWiseAdagrad",
    defaults=dict(Adagrad.defaults),
    checks=dict(Adagrad.checks),
    slots=("sum",),
    uses_slots=lambda g: (True, False, False),
    scalars=_adagrad_scalars,
    math=rules.rowwise_adagrad,
    layout="rowwise",
    # no compiled-in flags: they are tested once per row, and constant-folding
    # weight_decay = 0 made LLVM vectorize the partial sums 4x slower (measured)
    reference=reference.rowwise_adagrad,
    slot_init=lambda g, name: g["initial_accumulator_value"],
    variants=({}, {"lr_decay": 0.01, "weight_decay": 1e-2, "initial_accumulator_value": 0.1},
              {"maximize": True, "eps": 1e-6}),
)


#: name -> Rule, in a stable order.  Tests and benchmarks iterate over this.
RULES = {r.name: r for r in (SGD, Adagrad, RMSprop, Adam, AdamW, Adamax, NAdam, Lion,
                             RowWiseAdagrad)}


def get(name):
    try:
        return RULES[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; known: {sorted(RULES)}") from None
