"""fastopt: neural-network optimizer update rules at the speed of memory.

Quick start::

    import numpy as np, fastopt
    w = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
    opt = fastopt.Adam([w], lr=1e-3)
    opt.step([grad_w])                 # in place

See :mod:`fastopt.optimizers` for the classes, :mod:`fastopt.functional` for the
stateless layer and :mod:`fastopt.registry` for the rules.
"""

from . import backends, checkpoint, clip, functional, fused, init, lr_scheduler, registry
from .checkpoint import load, save
from .clip import clip_grad_norm_, clip_grad_value_
from ._cuda_backend import register_lazily as _register_cuda
from ._cython_backend import register_backend as _register_cython
from .optimizer import Optimizer
from .sparse import RowSparse
from .optimizers import (CLASSES, SGD, Adagrad, Adam, Adamax, AdamW, Lion, NAdam,
                         RMSprop, RowWiseAdagrad)

__version__ = "0.1.0"

_register_cython()
_register_cuda()      # numba.cuda is imported on first request, not here


def available_backends():
    """Names of the backends usable on this machine."""
    return backends.available()


__all__ = ["Optimizer", "RowSparse", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax", "NAdam",
           "Lion", "RowWiseAdagrad", "CLASSES", "available_backends", "functional", "registry", "backends",
           "fused", "lr_scheduler", "init", "checkpoint", "clip", "save", "load",
           "clip_grad_norm_", "clip_grad_value_"]
