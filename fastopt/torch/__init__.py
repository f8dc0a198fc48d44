"""Drop-in ``torch.optim`` optimizers that run fastopt's kernels.

::

    import torch
    import fastopt.torch

    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    opt = fastopt.torch.AdamW(model.parameters(), lr=1e-3)     # was torch.optim.AdamW
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()

One class per rule of :data:`fastopt.rules.RULES` (:mod:`fastopt.torch.classes`):
:class:`SGD`, :class:`Adam`, :class:`AdamW`, :class:`RMSprop`, :class:`Adagrad`,
:class:`Adamax`, :class:`NAdam` with torch's signatures and defaults, :class:`Lion`
and :class:`RowWiseAdagrad` with fastopt's.  Each is a ``torch.optim.Optimizer``
over one core optimizer (``opt.engine``, :mod:`fastopt.torch.optimizer`), so every
feature of the core reaches torch users: bfloat16 parameters (``bf16_update``,
``seed``), 16/8-bit state (``state_bits``), ``step(grad_scale=...,
skip_nonfinite=...)``, sparse gradients (lazy or exact ``sparse_mode``), the fused
options.  The state lives in ``opt.state[p]`` as tensors under torch's names,
sharing memory with the engine's arrays (:mod:`fastopt.torch.store`); tensors are
viewed as arrays by :mod:`fastopt.torch.views`.  See docs/torch.md.
"""

from .classes import CLASSES
from .optimizer import TorchOptimizer

globals().update(CLASSES)

__all__ = sorted(CLASSES) + ["CLASSES", "TorchOptimizer"]
