"""The ``fastopt.torch`` classes, generated from the rule registry.

Every rule of :data:`fastopt.rules.RULES` gets a :class:`TorchOptimizer` subclass.
Where ``torch.optim`` has a class of that name, the constructor's signature is
torch's (names, defaults, positional order, keyword-only markers), so ``help()`` and
``inspect.signature`` show what torch shows; the rule's hyperparameters that torch
lacks (the fused options) and fastopt's options follow as keyword-only arguments.
torch's arguments that are not the rule's hyperparameters are torch flags
(:data:`~fastopt.torch.optimizer.REFUSED` or :data:`~fastopt.torch.optimizer.NO_OP`).
Other rules take the registry's defaults.
"""

import inspect

import torch

from .. import optimizers, rules as registry
from .optimizer import OPTIONS, TorchOptimizer

#: torch keeps no ``step`` in these optimizers' state
STEPLESS = ("SGD", "Lion")
#: torch creates these optimizers' state at construction
EAGER = ("Adagrad", "RowWiseAdagrad")

_P = inspect.Parameter


def _signature(rule):
    """The constructor's parameters after ``params``: ``[(name, kind, default)]``,
    and the torch flags."""
    theirs = getattr(torch.optim, rule.name, None)
    out, flags = [], {}
    if theirs is not None:
        for p in list(inspect.signature(theirs.__init__).parameters.values())[2:]:
            out.append((p.name, p.kind, p.default))
            if p.name not in rule.defaults:
                flags[p.name] = p.default
    else:
        out = [(k, _P.POSITIONAL_OR_KEYWORD, v)
               for k, v in registry.torch_defaults(rule).items()]
    named = {n for n, _, _ in out}
    out += [(k, _P.KEYWORD_ONLY, v) for k, v in rule.defaults.items() if k not in named]
    out += [(k, _P.KEYWORD_ONLY, v) for k, v in OPTIONS.items()]
    return out, flags


def make_class(rule):
    params, flags = _signature(rule)
    defaults = [d for _, _, d in params]
    parts, star = [], False
    for k, (name, kind, _) in enumerate(params):
        if kind == _P.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(f"{name}=_d[{k}]")
    args = ", ".join(f"{n!r}: {n}" for n, _, _ in params)
    src = (f"def __init__(self, params, {', '.join(parts)}):\n"
           f"    self._fo_init(params, {{{args}}})\n")
    ns = {"_d": defaults}
    exec(src, ns)                      # a real signature: help(), __defaults__
    init = ns["__init__"]
    init.__qualname__ = f"{rule.name}.__init__"
    theirs = f"``torch.optim.{rule.name}``" if hasattr(torch.optim, rule.name) else \
        "fastopt's " + rule.name
    doc = (f"{theirs} as a ``torch.optim.Optimizer`` running fastopt's kernels (see "
           f":mod:`fastopt.torch`): the same arguments and defaults, plus the rule's "
           f"fused options and fastopt's ``backend``, ``sparse_mode``, ``state_bits``, "
           f"``bf16_update`` and ``seed``.\n\n" + (optimizers.CLASSES[rule.name].__doc__ or ""))
    ns = {"rule": rule, "torch_flags": flags, "stepful": rule.name not in STEPLESS,
          "eager_state": rule.name in EAGER, "__init__": init, "__doc__": doc,
          "__module__": "fastopt.torch"}
    for fn in rule.methods:                 # rule-specific methods, run on the engine
        ns[fn.__name__] = _on_engine(fn)
    return type(rule.name, (TorchOptimizer,), ns)


def _on_engine(fn):
    """A rule method of the drop-in: ``fn`` on the engine (whose arrays are the
    tensors' memory), then autograd's version bump of every parameter, as after a
    step (the method may rewrite parameters in place)."""
    def method(self, *args, **kwargs):
        out = fn(self.engine, *args, **kwargs)
        torch.autograd.graph.increment_version(list(self.engine.param_objects))
        return out
    method.__name__ = fn.__name__
    method.__qualname__ = fn.__name__
    method.__doc__ = fn.__doc__
    return method


#: rule name -> class
CLASSES = {name: make_class(rule) for name, rule in registry.RULES.items()}
