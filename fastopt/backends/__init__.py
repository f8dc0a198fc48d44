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

The backends that cost an import are loaded on first request (:class:`_Registry`):
``numba`` (importing numba takes about 0.2 s; it is listed by :func:`available` as
soon as numba is importable, and imported when the backend is resolved, ``"auto"``
on host arrays included) and ``cuda`` (numba.cuda, when numba-cuda is installed).
``cython`` registers at import when its extension loads, else records why not
(with the install command).  So ``import fastopt`` imports neither numba nor
numba.cuda.
"""

import importlib.util
import threading

from .base import FEATURES, Backend, Config, DenseWork, RowsWork, CatchUp  # noqa: F401
from .numpy_ref import NumpyBackend


class _Registry(dict):
    """name -> backend object, with the optional backends in ``lazy`` (name ->
    ``(load, probe)``) loaded on first request: ``[]``, ``in``, ``get``, iteration.
    ``load()`` registers the backend or records why it is unavailable
    (:func:`register`); ``probe()`` tells :func:`available` whether to list the backend
    without loading it (True: listed, False: not, None: load it to know)."""

    def __init__(self, ready):
        super().__init__(ready)
        self.lazy = {}

    def load(self, name):
        if name in self.lazy:
            with _LOCK:
                entry = self.lazy.get(name)
                if entry is not None:
                    try:
                        entry[0]()
                    finally:
                        self.lazy.pop(name, None)

    def load_all(self):
        for name in list(self.lazy):
            self.load(name)

    def __missing__(self, key):
        if key in self.lazy:
            self.load(key)
            if dict.__contains__(self, key):
                return dict.__getitem__(self, key)
        raise KeyError(key)

    def __contains__(self, key):
        self.load(key)
        return dict.__contains__(self, key)

    def get(self, key, default=None):
        return self[key] if key in self else default

    def __iter__(self):
        self.load_all()
        return dict.__iter__(self)

    def keys(self):
        self.load_all()
        return dict.keys(self)

    def values(self):
        self.load_all()
        return dict.values(self)

    def items(self):
        self.load_all()
        return dict.items(self)


_LOCK = threading.RLock()
_BACKENDS = _Registry({"numpy": NumpyBackend()})
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
    """Names of the backends that can run on this machine (``numba`` as soon as
    numba is importable, without importing it)."""
    for name, (_, probe) in list(_BACKENDS.lazy.items()):
        if probe is None:
            _BACKENDS.load(name)
    names = set(dict.keys(_BACKENDS))
    names.update(n for n, (_, probe) in list(_BACKENDS.lazy.items()) if probe is not None
                 and probe())
    return sorted(names)


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


def _load_numba():
    try:
        from .numba_cpu import NumbaBackend
    except ImportError as exc:
        register("numba", reason=f"numba could not be imported ({exc}); install it with "
                                 "pip install numba")
        return
    register("numba", NumbaBackend())


def _numba_importable():
    return importlib.util.find_spec("numba") is not None


def _load_cuda():
    from . import cuda
    cuda.register_backend()


def _register_optional():
    from . import cython
    cython.register_backend()
    _BACKENDS.lazy["numba"] = (_load_numba, _numba_importable)
    if importlib.util.find_spec("numba_cuda") is None:
        register("cuda", reason="numba-cuda is not installed; install it with pip install "
                                "'fastopt[cuda]' (or pip install numba-cuda)")
    else:
        _BACKENDS.lazy["cuda"] = (_load_cuda, None)   # numba.cuda on first request


_register_optional()
