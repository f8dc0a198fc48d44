"""The optimizer classes: torch.optim's names, arguments and defaults.

Each class is :class:`fastopt.optimizer.Optimizer` bound to one registry rule,
generated from it (:func:`make_class`): the rule's hyperparameters with torch's
names and defaults in the signature (so ``help()`` and ``inspect.signature`` show
them), the rule's ``doc`` as the docstring.  Common to all:

* ``params``: a list of arrays, a dict name -> array, or a list of param-group
  dicts (``{"params": [...], "lr": 0.1}``) with per-group hyperparameters.
* keyword-only ``backend``: ``"auto" | "numba" | "cython" | "cuda" | "numpy"``.
* keyword-only ``sparse_mode``: ``"lazy"`` (default) or ``"exact"``, for row-sparse
  gradients (:class:`fastopt.RowSparse`, scipy.sparse); see :mod:`fastopt.sparse`.
* keyword-only storage options ``state_bits``, ``bf16_update``, ``seed``; see
  :mod:`fastopt.storage`.
* ``**fused_options``: ``clip_value``, ``l1``, ``param_min``, ``param_max``,
  ``max_norm`` (off by default), applied in the update pass; see :mod:`fastopt.fused`.
* ``step(grads, grad_scale=None, skip_nonfinite=False)`` updates in place and
  returns True, or False when ``skip_nonfinite`` found an Inf/NaN gradient and
  skipped the step; ``state_dict()`` / ``load_state_dict()``.

Example::

    import numpy as np, fastopt
    w = np.zeros(3, dtype=np.float32)
    opt = fastopt.Adam([w], lr=0.1)
    for _ in range(100):
        opt.step([2 * (w - 1)])          # gradient of |w - 1|^2
"""

from . import rules as registry
from .optimizer import Optimizer

#: the keyword-only options every class takes after the rule's hyperparameters
OPTIONS = dict(sparse_mode="lazy", backend="auto", state_bits=None, bf16_update=None, seed=0)


def make_class(rule):
    """The optimizer class of registry rule ``rule``: ``__init__(self, params,
    <the rule's hyperparameters, torch's order and defaults>, *, sparse_mode,
    backend, state_bits, bf16_update, seed, **fused_options)``, a real signature
    (``help()``, ``__defaults__``); the docstring is ``rule.doc``."""
    own = registry.torch_defaults(rule)
    args = ", ".join(f"{k}=_d[{k!r}]" for k in own)
    opts = ", ".join(f"{k}=_o[{k!r}]" for k in OPTIONS)
    passed = ", ".join(f"{k}={k}" for k in list(own) + list(OPTIONS))
    src = (f"def __init__(self, params, {args}, *, {opts}, **fused_options):\n"
           f"    _Optimizer.__init__(self, params, {passed}, **fused_options)\n")
    ns = {"_d": own, "_o": OPTIONS, "_Optimizer": Optimizer}
    exec(src, ns)
    init = ns["__init__"]
    init.__qualname__ = f"{rule.name}.__init__"
    init.__module__ = __name__
    ns = {"rule": rule, "__init__": init, "__doc__": rule.doc or None,
          "__module__": __name__}
    for fn in rule.methods:                 # rule-specific methods (schedule-free's train)
        ns[fn.__name__] = fn
    return type(rule.name, (Optimizer,), ns)


#: rule name -> class, for every rule of the registry
CLASSES = {name: make_class(rule) for name, rule in registry.RULES.items()}
globals().update(CLASSES)

__all__ = ["CLASSES", "OPTIONS", "make_class"] + list(CLASSES)
