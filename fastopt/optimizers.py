"""The optimizer classes: torch.optim's names, arguments and defaults.

Each class is :class:`fastopt.optimizer.Optimizer` bound to one registry rule; the
signature repeats the registry's defaults so that ``help()`` shows them (a test
keeps the two equal).  Common to all:

* ``params``: a list of arrays, a dict name -> array, or a list of param-group
  dicts (``{"params": [...], "lr": 0.1}``) with per-group hyperparameters.
* ``backend``: ``"auto" | "numba" | "cython" | "cuda" | "numpy"``.
* ``sparse_mode``: ``"lazy"`` (default) or ``"exact"``, for row-sparse gradients
  (:class:`fastopt.RowSparse`, scipy.sparse); see :mod:`fastopt.sparse`.
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


class SGD(Optimizer):
    """Stochastic gradient descent with momentum (torch.optim.SGD).

    ``g = -g`` if maximize; ``g += weight_decay * p``; with momentum ``b``:
    ``buf = g`` on its first step, then ``buf = b * buf + (1 - dampening) * g``;
    ``g = g + b * buf`` (nesterov) or ``g = buf``; ``p -= lr * g``.
    The EMA form ``v = b v + (1 - b) g`` is ``SGD(momentum=b, dampening=b)``.
    Nesterov needs ``momentum > 0`` and ``dampening == 0``.
    """

    rule = registry.SGD

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0,
                 nesterov=False, maximize=False, sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr, momentum=momentum,
                         dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize)


class Adagrad(Optimizer):
    """Adagrad (torch.optim.Adagrad).

    ``clr = lr / (1 + (t - 1) * lr_decay)``; ``g += weight_decay * p``;
    ``sum += g^2`` (starting at ``initial_accumulator_value``);
    ``p -= clr * g / (sqrt(sum) + eps)``.
    """

    rule = registry.Adagrad

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False, sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr, lr_decay=lr_decay,
                         weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps,
                         maximize=maximize)


class RMSprop(Optimizer):
    """RMSprop (torch.optim.RMSprop), eps added outside the square root.

    ``v = alpha v + (1 - alpha) g^2``; centered: ``a = alpha a + (1 - alpha) g``,
    ``d = sqrt(v - a^2) + eps``, else ``d = sqrt(v) + eps``; with momentum ``b``:
    ``buf = b buf + g / d``, ``p -= lr buf``; else ``p -= lr g / d``.
    """

    rule = registry.RMSprop

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0,
                 momentum=0.0, centered=False, maximize=False, sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr, alpha=alpha, eps=eps,
                         weight_decay=weight_decay, momentum=momentum, centered=centered,
                         maximize=maximize)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015) as torch.optim.Adam: L2 weight decay added to the
    gradient, eps added after the bias-corrected square root, optional AMSGrad.

    ``m = b1 m + (1 - b1) g``; ``v = b2 v + (1 - b2) g^2``;
    ``p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)``
    (``v`` replaced by ``max(vmax, v)`` with amsgrad).
    """

    rule = registry.Adam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, maximize=False, sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)


class AdamW(Optimizer):
    """AdamW (Loshchilov & Hutter 2019) as torch.optim.AdamW: decoupled weight decay
    ``p *= 1 - lr * weight_decay`` before the Adam update (default 1e-2)."""

    rule = registry.AdamW

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False, sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)


class Adamax(Optimizer):
    """Adamax (torch.optim.Adamax): ``u = max(b2 u, |g| + eps)``,
    ``p -= lr / (1 - b1^t) * m / u``."""

    rule = registry.Adamax

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 maximize=False, sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, maximize=maximize)


class NAdam(Optimizer):
    """NAdam (Dozat 2016) as torch.optim.NAdam, with torch's momentum-decay schedule
    ``mu_t = b1 (1 - 0.5 * 0.96^(t * momentum_decay))`` and optional decoupled
    weight decay.  The running product of ``mu`` is kept per parameter
    (state key ``mu_product``)."""

    rule = registry.NAdam

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False,
                 sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr, betas=betas, eps=eps,
                         weight_decay=weight_decay, momentum_decay=momentum_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)


class Lion(Optimizer):
    """Lion (Chen et al. 2023): ``u = b1 m + (1 - b1) g``;
    ``p = p (1 - lr wd) - lr sign(u)``; ``m = b2 m + (1 - b2) g``.
    Use a learning rate 3-10x smaller than Adam's (default 1e-4)."""

    rule = registry.Lion

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
                 maximize=False, sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr, betas=betas,
                         weight_decay=weight_decay, maximize=maximize)


class RowWiseAdagrad(Optimizer):
    """Row-wise Adagrad: one accumulator per row (first axis) instead of per element,
    the memory-saving variant large embedding trainers use (FBGEMM's
    ``rowwise_adagrad``).  Same hyperparameters as :class:`Adagrad`::

        g = -g if maximize;  g += weight_decay * p
        sum[r] += mean_j(g[r, j]^2)
        p[r, :] -= clr * g[r, :] / (sqrt(sum[r]) + eps)

    with ``clr = lr / (1 + (t - 1) * lr_decay)``.  State ``sum`` has shape
    ``(param.shape[0],)``.  For a 1-D parameter every element is a row, which is
    plain Adagrad.  Every backend, dense and sparse.
    """

    rule = registry.RowWiseAdagrad

    def __init__(self, params, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, maximize=False,
                 sparse_mode="lazy", backend="auto",
                 **fused_options):
        super().__init__(params, backend=backend, sparse_mode=sparse_mode, **fused_options,
                         lr=lr,
                         lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps,
                         maximize=maximize)


def make_class(rule):
    """An optimizer class for a registry rule that has no hand-written class above:
    the signature comes from the rule's defaults (so ``help()`` shows them) and the
    docstring from the rule's module."""
    import inspect
    import sys

    def __init__(self, params, sparse_mode="lazy", backend="auto", **hyper):
        Optimizer.__init__(self, params, backend=backend, sparse_mode=sparse_mode, **hyper)

    P = inspect.Parameter
    sig = [P("self", P.POSITIONAL_OR_KEYWORD), P("params", P.POSITIONAL_OR_KEYWORD)]
    sig += [P(k, P.POSITIONAL_OR_KEYWORD, default=v)
            for k, v in registry.torch_defaults(rule).items()]
    sig += [P("sparse_mode", P.KEYWORD_ONLY, default="lazy"),
            P("backend", P.KEYWORD_ONLY, default="auto"),
            P("fused_options", P.VAR_KEYWORD)]
    __init__.__signature__ = inspect.Signature(sig)
    doc = sys.modules[rule.math.__module__].__doc__
    return type(rule.name, (Optimizer,), {"rule": rule, "__init__": __init__, "__doc__": doc,
                                          "__module__": __name__})


_WRITTEN = (SGD, Adagrad, RMSprop, Adam, AdamW, Adamax, NAdam, Lion, RowWiseAdagrad)

#: rule name -> class, for every rule of the registry (a new rule gets a generated
#: class until someone writes one with a docstring of its own)
CLASSES = {cls.rule.name: cls for cls in _WRITTEN}
CLASSES.update({name: make_class(rule) for name, rule in registry.RULES.items()
                if name not in CLASSES})
