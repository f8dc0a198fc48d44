"""What a rule is: the :class:`Rule` record and its named per-step scalars.

A rule module (``fastopt/rules/adam.py``, ...) holds one rule's whole definition:

* ``Scalars``: the per-step scalars its element math reads, **by name**, declared
  once with :func:`scalars_type`.  Every ``Scalars`` type starts with the fused
  options' fields (:data:`fastopt.rules.fused.FIELDS`: ``grad_scale``,
  ``clip_value``, ``l1_threshold``, ``param_min``, ``param_max``, ``max_norm``) so
  that the option code reads the same names for every rule; the rule's own fields
  follow.  The column of a field in the float64 scalar table the drivers receive is
  its position in the tuple; nothing else in the package knows a column number
  (the Cython copy includes the generated ``kernels/_cy_scalars.pxi``, checked
  against this declaration by a test).
* ``host_scalars(group, step, host, fresh)``: the rule's fields for one step,
  computed on the host in float64 (bias corrections, effective learning rates,
  option flags as 0/1), returned as a dict by field name, plus new host state
  (NAdam's ``mu_product``);
* ``math``: the per-element update (a Numba ``register_jitable`` function of
  scalars), ``reference``: the NumPy whole-array oracle, and where it exists
  ``catch_up``: the closed form of skipped steps for ``sparse_mode="exact"``.

Drivers (:mod:`fastopt.backends`) load a row of the scalar table into the rule's
``Scalars`` tuple in the parameter's dtype, with the fields that are fixed for a
configuration (``Rule.flags`` and zero ``Rule.zero_switches``) compiled in as
constants, so an option flag costs no branch in the element loop.
"""

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Tuple

from . import fused

#: state slots every element math receives (unused ones are passed as zero)
NSLOTS = 3


def scalars_type(name, fields):
    """A NamedTuple class named ``name`` with the fused fields, then ``fields``.

    Bind it to the name ``Scalars`` in the rule's module: the class then pickles by
    reference (``module.Scalars``), which keeps Numba's on-disk cache keys stable
    from one process to the next."""
    import sys
    cls = NamedTuple(name, [(f, float) for f in fused.FIELDS + tuple(fields)])
    cls.__module__ = sys._getframe(1).f_globals["__name__"]
    cls.__qualname__ = "Scalars"
    return cls


def unit_host_check(name, value):
    """The default check of a saved host scalar (NAdam's ``mu_product``): None when
    ``value`` is a finite number in (0, 1], else what it must be."""
    v = float(value)
    return None if math.isfinite(v) and 0.0 < v <= 1.0 else "a finite number in (0, 1]"


def per_tensor_checks(name):
    """``cross_check``, ``low_state_reason`` and ``bf16_reason`` of a per-tensor rule
    ``name``: its update runs by whole tensors (a norm pass, then the update pass),
    so the row renorm ``max_norm`` (a row-driver option) is refused, with the
    reason.  8/16-bit state and bfloat16 parameters are possible: the norm pass
    reads them through the storage formats (the values the update pass sees)."""
    def cross_check(group):
        if group.get("max_norm") is not None:
            raise ValueError(f"{name}: max_norm renormalizes rows in the row drivers, and "
                             f"{name} updates whole tensors (a norm pass, then the update "
                             "pass); clip with clip_value, or renormalize the rows after "
                             "the step")

    def low_state_reason(group):
        return None
    return cross_check, low_state_reason, None


@dataclass(frozen=True, eq=False)   # compared and hashed by identity
class Rule:
    name: str                      # the optimizer class name, e.g. "Adam"
    defaults: Dict[str, object]    # hyperparameter -> default (torch's)
    checks: Dict[str, Callable]    # hyperparameter -> check(name, value) -> value
    slots: Tuple[str, ...]         # state names in slot order (torch's keys)
    uses_slots: Callable           # group -> tuple of NSLOTS bools
    Scalars: type                  # the NamedTuple of per-step scalars (scalars_type)
    host_scalars: Callable         # (group, step, host, fresh) -> (dict by field, new host)
    math: Callable                 # per-element function
    reference: Callable            # whole-array NumPy reference
    host_init: Callable = lambda group: {}      # per-parameter host scalars (NAdam)
    #: (name, value) -> None when a loaded host scalar is possible, else what it must be
    host_check: Callable = unit_host_check
    slot_init: Callable = lambda group, name: 0.0  # initial value of a state slot
    cross_check: Callable = lambda group: None  # checks spanning hyperparameters
    #: Scalars fields that are option flags (0/1): drivers specialize on their values
    flags: Tuple[str, ...] = ()
    #: Scalars fields (weight decay) whose zero value drivers specialize on
    zero_switches: Tuple[str, ...] = ()
    #: sparse_mode="exact": closed form (k, first, scalars) -> (a, b, c, e), or None
    catch_up: Callable = None
    #: group -> None when exact mode is possible for it, else the reason
    exact_reason: Callable = lambda group: "no closed form for skipped steps"
    #: "elementwise" (state has the parameter's shape), "rowwise" (one state value
    #: per row of the first axis; such rules run through the row-wise drivers) or
    #: "tensor" (element-wise state, but the update of each element also reads
    #: per-tensor scalars made from L2 norms of the whole tensor: :attr:`norms`) or
    #: "matrix" (element-wise state; :attr:`phase1`, then a phase on whole matrices,
    #: :attr:`matrix`, then the update pass :attr:`math`)
    layout: str = "elementwise"
    #: layout "factored" (Adafactor): ``shape -> slot names`` a parameter of that shape
    #: has (factored state for 2 or more dimensions, full state for fewer), and
    #: ``(shape, name) -> shape`` of each (torch's keepdim shapes); the steps run
    #: through :mod:`fastopt.factored`
    param_slots: Callable = None
    factored_shape: Callable = None
    #: layout "tensor": the jitable ``norms(p, g, s0, s1, s2, c) -> (x, y)`` giving,
    #: per element, the two quantities whose L2 norms over the tensor the rule needs
    #: (LAMB: the parameter and the Adam direction; LARS: the parameter and the
    #: gradient), computed from the same inputs and in the same dtype as ``math``
    norms: Callable = None
    #: layout "tensor": ``(group, norm_x, norm_y) -> {Scalars field: value}``, the
    #: per-tensor scalars (float64) written into the tensor's own scalar row before
    #: the update pass
    tensor_scalars: Callable = None
    #: layout "tensor": how many state slots (the first ones) the norm pass reads
    #: (LAMB: m and v; LARS: none); the benchmark counts their bytes
    norm_reads: int = 0
    #: layout "matrix" (Muon): ``(u, group, dtype) -> o``, the matrix phase between
    #: the element phases: ``u`` (``[..., M, N]``, from :attr:`phase1`) to the array
    #: the update pass (:attr:`math`) reads in the gradient's place, in ``dtype``
    #: (run by :mod:`fastopt.matrix_phase`)
    matrix: Callable = None
    #: layout "matrix": the jitable ``phase1(g, s0, c) -> (s0, u)`` (element-wise; the
    #: matrix phase calls it on whole arrays)
    phase1: Callable = None
    #: ``shape -> None`` when a parameter of that shape is possible, else the reason
    #: (refused when the parameter is added: Muon's vectors)
    param_reason: Callable = None
    #: state slots that are never negative (8-bit state stores them with the unsigned
    #: code, fastopt.storage.codecs)
    nonnegative_slots: Tuple[str, ...] = ()
    #: group -> None when 8- and 16-bit state keep the math sound, else the reason
    #: (state_bits=8 or 16 is then refused for that configuration)
    low_state_reason: Callable = lambda group: None
    #: group -> None when 8-bit state (codes against a block scale) keeps the math
    #: sound, else the reason (state_bits=8 alone is then refused; checked besides
    #: low_state_reason)
    q8_reason: Callable = lambda group: None
    #: None when bfloat16 parameters are possible, else the reason (a callable of
    #: nothing returning it; they are then refused when a group is added)
    bf16_reason: Callable = None
    #: how close the stored formats (bfloat16 parameters, 16/8-bit state) keep the rule
    #: to float32 where that differs from the element-wise rules' (Muon: a matrix
    #: phase between its element phases), measured; a note of the capability table
    storage_note: str = None
    #: per-group entries that are not hyperparameters (state a group carries, saved and
    #: loaded with the groups), set to these values where a new group lacks them
    #: (schedule-free's ``train_mode``)
    group_keys: Dict[str, object] = field(default_factory=dict)
    #: group -> None when a step of that group is possible now, else the reason (a step
    #: is then refused before anything changes: schedule-free in eval mode)
    step_reason: Callable = None
    #: rule-specific methods of the generated classes (``fastopt.<Name>`` gets each as
    #: it is, ``fastopt.torch.<Name>`` one that calls it on its engine): functions
    #: ``f(optimizer, ...)`` named by their ``__name__`` (schedule-free's ``train``,
    #: ``eval``)
    methods: Tuple[Callable, ...] = ()
    #: (state_dict) -> state_dict: the torch drop-in's ``state_dict()`` in the layout of
    #: the rule's torch-based peer, and a peer's state dict in the drop-in's layout
    #: before it loads (schedule-free: the package keeps ``k``, ``lr_max``,
    #: ``weight_sum`` per group); None: torch.optim's layout as it is
    torch_state_out: Callable = None
    torch_state_in: Callable = None
    #: configurations that together exercise every option (tests and benchmarks use them)
    variants: Tuple[dict, ...] = ({},)
    #: the optimizer class's docstring: what the rule is (torch's name, paper) and its
    #: equations, short (the module docstring has the whole derivation)
    doc: str = field(default="", repr=False)

    def __post_init__(self):
        object.__setattr__(self, "doc", inspect.cleandoc(self.doc))
        # every rule also takes the fused options (fastopt.rules.fused), off by default
        object.__setattr__(self, "defaults", {**self.defaults, **fused.DEFAULTS})
        object.__setattr__(self, "checks", {**self.checks, **fused.CHECKS})
        if (self.layout == "tensor") != (self.norms is not None) \
                or (self.norms is None) != (self.tensor_scalars is None):
            raise ValueError(f"{self.name}: layout 'tensor' goes with norms and tensor_scalars")
        if (self.layout == "matrix") != (self.matrix is not None) \
                or (self.matrix is None) != (self.phase1 is None):
            raise ValueError(f"{self.name}: layout 'matrix' goes with matrix and phase1")
        if (self.layout == "factored") != (self.param_slots is not None) \
                or (self.param_slots is None) != (self.factored_shape is None):
            raise ValueError(f"{self.name}: layout 'factored' goes with param_slots and "
                             "factored_shape")
        own = set(self.Scalars._fields) - set(fused.FIELDS)
        for f in self.flags + self.zero_switches:
            if f not in own:
                raise ValueError(f"{self.name}: {f!r} is not one of its scalar fields")

    @property
    def factored(self):
        """Whether the rule runs by whole tensors through :mod:`fastopt.factored`
        (layout "factored": state whose shapes are not the parameter's)."""
        return self.param_slots is not None

    def slots_of(self, param_shape):
        """The state slots a parameter of ``param_shape`` has (all of them, except
        for a factored rule)."""
        if self.param_slots is None:
            return self.slots
        return self.param_slots(tuple(param_shape))

    @property
    def per_tensor(self):
        """Whether each tensor's update reads norms of the whole tensor (layout
        "tensor": a norm pass, then the update pass with the tensor's own row)."""
        return self.norms is not None

    @property
    def whole_tensor(self):
        """Whether each tensor is updated as a whole (layouts "tensor", "matrix" and
        "factored"): no row steps (sparse gradients, max_norm).  Stored formats: the
        per-tensor and matrix rules read them in their norm pass and matrix phase
        (backend feature ``stored_passes``); the factored rule refuses them."""
        return self.norms is not None or self.matrix is not None or self.factored

    def tensor_refusal(self, what):
        """The message refusing ``what`` (a feature that updates part of a tensor) for
        a per-tensor or matrix rule."""
        if self.matrix is not None:
            return (f"{self.name} orthogonalizes each matrix as a whole (a matrix phase "
                    f"between its element phases); {what} is not supported for it")
        return (f"{self.name} scales each tensor's update by norms of the whole tensor "
                f"(a norm pass, then the update pass); {what} is not supported for it")

    @property
    def nscalars(self):
        return len(self.Scalars._fields)

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

    def exact_refusal(self, group):
        """Why ``sparse_mode="exact"`` is refused for the checked group ``group``
        (no closed form, the rule's :attr:`exact_reason`, then the fused options'),
        or None when it is possible."""
        if self.catch_up is None:
            return "it has no closed form for skipped steps"
        return self.exact_reason(group) or fused.exact_reason(group)

    def exact_possible(self, variant=None):
        """Whether ``sparse_mode="exact"`` takes the configuration ``variant``
        (hyperparameters over the defaults, fused options included)."""
        try:
            group = self.check_group({**self.defaults, **(variant or {})})
        except ValueError:           # a configuration the rule refuses outright
            return False
        return self.exact_refusal(group) is None

    def slot_shape(self, param_shape, name=None):
        """Shape of a state slot (``name``: needed by a factored rule, whose slots
        differ) for a parameter of ``param_shape``."""
        if self.factored_shape is not None:
            return tuple(self.factored_shape(tuple(param_shape), name))
        if self.layout == "rowwise":
            return tuple(param_shape[:1])
        return tuple(param_shape)

    def row(self, group, step, host, fresh, grad_scale=None, fused_row=None):
        """The scalar row of one step (a tuple in ``Scalars`` order: the fused
        fields, then the rule's, by name; bools stand for 0/1) and the new host
        state.  ``fused_row``: ``fused.scalars(group)``, when the caller has it
        (a :class:`~fastopt.planner.GroupSpec` keeps it)."""
        own, new_host = self.host_scalars(group, step, host, fresh)
        if grad_scale is not None or fused_row is None:
            fused_row = fused.scalars(group, grad_scale)
        return fused_row + self._own_values(own), new_host

    @property
    def _own_values(self):
        getter = self.__dict__.get("_getter")
        if getter is None:
            import operator
            names = self.Scalars._fields[len(fused.FIELDS):]
            one = operator.itemgetter(*names)
            getter = (lambda d: (one(d),)) if len(names) == 1 else one
            object.__setattr__(self, "_getter", getter)
        return getter

    def fixed(self, group):
        """Fields whose value is fixed for a group, as ``((field, value), ...)``:
        option flags keep their value, a zero weight decay is fixed at zero.
        Drivers compile these in."""
        own, _ = self.host_scalars(group, 1, self.host_init(group), ())
        fixed = [(k, float(own[k])) for k in self.flags]
        fixed += [(k, 0.0) for k in self.zero_switches if own[k] == 0.0]
        return tuple(sorted(fixed))
