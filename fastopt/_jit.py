"""Numba, imported when a Numba-backed feature is first used, not by ``import fastopt``.

Importing numba costs about 0.2 s; a process that steps on the Cython backend, or
only builds optimizers and schedules, never needs it.  Modules imported by
``import fastopt`` therefore declare their Numba pieces through these helpers
instead of importing numba:

* :func:`register_jitable`: numba's decorator of the same name (same options).  It
  returns the function unchanged (plain Python calls work without numba) and
  registers it with Numba at once when numba is already imported, else when
  :func:`numba` first runs;
* :func:`njit`: ``numba.njit(**options)`` applied on first call (a
  :class:`LazyDispatcher`); the function object handed to numba is the one
  written, so ``cache=True`` keeps its on-disk entries, and closures keep their
  cell values (e.g. ``PARALLEL``) in the cache key;
* :func:`prange`: a stand-in for ``numba.prange`` in the globals of a module that
  uses this helper; :func:`numba` rebinds the name to ``numba.prange`` in every
  module that declared a function here, before anything compiles.

:func:`numba` imports numba and performs the pending registrations; every path that
compiles goes through it (the lazy dispatchers, and the kernel modules, which call
it when they are imported: :mod:`fastopt.backends.numba_cpu`,
:mod:`fastopt.backends.element`, :mod:`fastopt.backends.cuda`,
:mod:`fastopt.storage.codecs`, ...).  Code outside fastopt that compiles its own
``njit`` function calling, say, a rule's ``math`` directly should call
``fastopt._jit.numba()`` first (or import numba before fastopt).
"""

import functools
import sys
import threading

_LOCK = threading.RLock()
_PENDING = []            # (function, register_jitable options) not yet registered
_GLOBALS = {}            # id -> globals dict of a module that declared functions here
_NUMBA = None            # the numba module, once loaded


def prange(*args):
    """``numba.prange`` until numba is loaded (a plain ``range`` in Python)."""
    return range(*args)


def loaded():
    """Whether :func:`numba` has run (numba imported, registrations done)."""
    return _NUMBA is not None


def numba():
    """Import numba (once), perform the pending registrations and bind
    :func:`prange`; returns the numba module."""
    if _NUMBA is not None and not _PENDING:
        return _NUMBA
    with _LOCK:
        import numba as nb
        if _NUMBA is None:
            lock_cache_saves()
            for g in _GLOBALS.values():
                _bind(g, nb)
        if _PENDING:
            from numba.extending import register_jitable as reg
            while _PENDING:
                fn, options = _PENDING[0]
                if options:
                    reg(**options)(fn)
                else:
                    reg(fn)
                del _PENDING[0]          # removed once registered (see the fast path)
        globals()["_NUMBA"] = nb
    return nb


def lock_cache_saves():
    """Serialize the saves of Numba's on-disk cache across processes.

    ``numba.core.caching.IndexDataCacheFile.save`` picks the file of a new entry
    without a lock: it reads the index, takes the first free number, writes the
    index, then the data.  Two processes that compile different specializations of
    one function at the same moment (pytest-xdist workers, MPI ranks on one node)
    can both take number N, and the index can end up mapping one's key to the
    other's machine code, which a later process then loads and runs (numba issues
    #4807 and #10128; seen here as a stored-format kernel giving another
    configuration's results under ``pytest -n 2``).  fastopt's drivers are many
    specializations of a few functions, so each save holds an exclusive ``flock`` on
    ``<index>.lock`` beside the index (POSIX; elsewhere Numba's behaviour is kept).
    Loading needs no lock: a file is written whole, then renamed into place, and a
    number is never reused for another key while the lock is held."""
    try:
        import fcntl
        from numba.core import caching
    except ImportError:            # no fcntl (Windows), or another numba layout
        return False
    cls = caching.IndexDataCacheFile
    if getattr(cls.save, "fastopt_locked", False):
        return True
    unlocked = cls.save

    @functools.wraps(unlocked)
    def save(self, key, data):
        try:
            f = open(self._index_path + ".lock", "a")
        except OSError:            # a read-only cache directory: numba's own path
            return unlocked(self, key, data)
        with f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                return unlocked(self, key, data)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    save.fastopt_locked = True
    cls.save = save
    return True


def _bind(g, nb):
    """Rebind the :func:`prange` stand-in to ``numba.prange`` in globals ``g``."""
    for name, value in list(g.items()):
        if value is prange:
            g[name] = nb.prange


def _note_globals(fn):
    g = getattr(fn, "__globals__", None)
    if g is not None and id(g) not in _GLOBALS:
        _GLOBALS[id(g)] = g
        if _NUMBA is not None:
            _bind(g, _NUMBA)


def register_jitable(*args, **options):
    """``numba.extending.register_jitable``, done when numba is imported (see the
    module docstring).  ``@register_jitable`` or ``@register_jitable(inline="always")``."""
    def wrap(fn):
        with _LOCK:
            _note_globals(fn)
            _PENDING.append((fn, options))
        if _NUMBA is not None or "numba" in sys.modules:
            numba()                      # numba is imported already: register now
        return fn

    if options or not args:
        return wrap
    return wrap(args[0])


class LazyDispatcher:
    """``numba.njit(**options)(py_func)``, compiled (or loaded from Numba's cache) on
    first call.  Other attributes (``signatures``, ``inspect_types``, ...) are the
    dispatcher's."""

    def __init__(self, py_func, options):
        self._dispatcher = None
        self.py_func = py_func
        self._options = dict(options)
        functools.update_wrapper(self, py_func)
        _note_globals(py_func)

    @property
    def dispatcher(self):
        """The numba dispatcher (imports numba and compiles on first use)."""
        d = self._dispatcher
        if d is None:
            nb = numba()
            with _LOCK:
                if self._dispatcher is None:
                    self._dispatcher = nb.njit(**self._options)(self.py_func)
                d = self._dispatcher
        return d

    def __call__(self, *args, **kwargs):
        d = self._dispatcher
        if d is None:
            d = self.dispatcher
        return d(*args, **kwargs)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.dispatcher, name)

    def __repr__(self):
        state = "compiled" if self._dispatcher is not None else "not yet compiled"
        return f"<LazyDispatcher {self.py_func.__qualname__} ({state})>"


def njit(*args, **options):
    """``numba.njit`` applied on first call: ``@njit(cache=True, nogil=True)`` or
    ``njit(parallel=PARALLEL, cache=True)(fn)``; returns a :class:`LazyDispatcher`."""
    if args and callable(args[0]) and not options:
        return LazyDispatcher(args[0], {})
    return lambda fn: LazyDispatcher(fn, options)
