"""fastopt: neural-network optimizer update rules at the speed of memory.

Quick start::

    import numpy as np, fastopt
    w = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
    opt = fastopt.Adam([w], lr=1e-3)
    opt.step([grad_w])                 # in place

Layout: :mod:`fastopt.rules` (one module per rule: named scalars, element math,
NumPy reference, closed form; the registry), :mod:`fastopt.backends` (one module
per backend and the capability table), the optimizer API (:mod:`fastopt.optimizers`,
:mod:`fastopt.functional`, :mod:`fastopt.planner`) and the training-loop toolkit
(:mod:`fastopt.lr_scheduler`, :mod:`fastopt.clip`, :mod:`fastopt.init`,
:mod:`fastopt.checkpoint`, :mod:`fastopt.benchmark`).

``import fastopt`` imports neither numba nor ml_dtypes: numba is imported when a
Numba-backed feature is first used (the ``numba`` backend, ``"auto"`` on host arrays,
``clip_grad_norm_``, sparse coalescing; :mod:`fastopt._jit`), ml_dtypes when a
bfloat16 array or option appears.  A source tree without the compiled extensions
imports too (the ``cython`` backend is then unavailable, saying how to build it).
"""

from ._version import __version__
from . import backends, checkpoint, clip, functional, init, lr_scheduler, rules
from .checkpoint import load, save
from .clip import clip_grad_norm_, clip_grad_value_
from .optimizer import Optimizer
from .sparse import RowSparse
from .optimizers import (CLASSES, SGD, Adadelta, Adagrad, Adam, Adamax, AdamW, Lion,
                         NAdam, RAdam, RMSprop, RowWiseAdagrad, Rprop, ASGD,
                         AdEMAMix, AdamWScheduleFree, SGDScheduleFree, LAMB, LARS, Muon,
                         Adafactor)
from .muon_groups import muon_param_groups
from .rules import fused





def available_backends():
    """Names of the backends usable on this machine."""
    return backends.available()


__all__ = ["Optimizer", "RowSparse", "SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adamax",
           "NAdam", "Lion", "RowWiseAdagrad", "RAdam",
           "Adadelta", "Rprop", "ASGD", "AdEMAMix", "AdamWScheduleFree",
           "SGDScheduleFree", "LAMB", "LARS", "Muon", "Adafactor", "muon_param_groups",
           "CLASSES", "available_backends", "functional",
           "rules", "backends", "fused", "lr_scheduler", "init", "checkpoint",
           "clip", "save", "load", "clip_grad_norm_", "clip_grad_value_", "__version__"]
