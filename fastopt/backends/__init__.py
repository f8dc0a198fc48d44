"""Backends: who runs a step, and the one table of what each can do.

========  =======  =====================================================================
name      memory   how
========  =======  =====================================================================
numpy     host     the reference: whole-array NumPy, one tensor at a time (the oracle)
numba     host     Numba ``njit(parallel=True)`` drivers around the one element step
cython    host     the compiled extension ``fastopt._cy_dense`` (OpenMP), the second copy
cuda      device   Numba ``cuda.jit`` kernels around the same element step
========  =======  =====================================================================

Each backend is a :class:`~fastopt.backends.base.Backend` subclass in its own module
and declares its features (:data:`~fastopt.backends.base.FEATURES`);
:func:`capabilities` is the table, :func:`resolve` turns a user's ``backend=`` into a
backend object.  ``"auto"`` picks ``cuda`` for device arrays (anything with
``__cuda_array_interface__``), else :data:`AUTO_CPU`.  A backend named explicitly
that is not available raises with the reason; there is no silent fallback.

The optional backends register themselves: ``cython`` when its extension imports,
``cuda`` on first request (so ``import fastopt`` does not import numba.cuda).
"""

from .base import FEATURES, Backend, Config, DenseWork, RowsWork, CatchUp  # noqa: F401
from .numba_cpu import NumbaBackend
from .numpy_ref import NumpyBackend

_BACKENDS = {"numba": NumbaBackend(), "numpy": NumpyBackend()}
#: the CPU backend "auto" picks (see README: measured per case)
AUTO_CPU = "numba"
_UNAVAILABLE = {}   # name -> reason, filled by optional backends that failed to load
KNOWN = ("auto", "numba", "cython", "cuda", "numpy")


def register(name, backend=None, reason=None):
    """Make an optional backend available (or record why it is not)."""
    if backend is not None:
        _BACKENDS[name] = backend
        _UNAVAILABLE.pop(name, None)
    else:
        _UNAVAILABLE[name] = reason


def available():
    """Names of the backends that can run on this machine."""
    return sorted(_BACKENDS)


def unavailable():
    """name -> why it cannot run here."""
    available()          # give the lazily registered ones their chance
    return dict(_UNAVAILABLE)


def capabilities():
    """The capability table: backend name -> sorted features (available backends)."""
    return {n: sorted(_BACKENDS[n].features) for n in available()}


def capable(feature):
    """Available backends that have ``feature``."""
    return [n for n in available() if feature in _BACKENDS[n].features]


def is_device_array(obj):
    """A CUDA device array: ``__cuda_array_interface__`` (CuPy, torch, numba) or a
    numba device array of the CUDA simulator (``__cuda_ndarray__``)."""
    import numpy as np
    if isinstance(obj, np.ndarray):
        return False
    return hasattr(obj, "__cuda_array_interface__") or bool(getattr(obj, "__cuda_ndarray__", False))


def resolve(name, sample=None):
    """The backend object for a name given by the user.

    ``"auto"``: ``cuda`` when ``sample`` (the first parameter) is a device array,
    else the fastest CPU backend.
    """
    if isinstance(name, Backend):
        return name
    if name not in KNOWN:
        raise ValueError(f"unknown backend {name!r}; choose one of {KNOWN}")
    if name == "auto":
        name = "cuda" if sample is not None and is_device_array(sample) else AUTO_CPU
    try:
        return _BACKENDS[name]
    except KeyError:
        why = _UNAVAILABLE.get(name, "it is not built into this version of fastopt")
        raise RuntimeError(f"backend {name!r} is not available: {why}") from None


def _register_optional():
    from . import cuda, cython
    cython.register_backend()
    cuda.register_lazily()       # numba.cuda is imported on first request, not here


_register_optional()
