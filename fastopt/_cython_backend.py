"""The ``"cython"`` backend: dense steps run by the compiled extension ``fastopt._cy_dense``.

:class:`CythonBackend` runs a :class:`fastopt.backends.Bucket` with the same tables
and the same semantics as the Numba driver (``fastopt._numba_cpu``): one OpenMP
parallel region over the bucket's chunks, or a serial loop below
``_numba_cpu.PARALLEL_MIN`` elements.  Its per-element math is the Cython copy of
:mod:`fastopt.rules` in ``kernels/_cy_rules.pxd``.

Rule ids: the extension numbers its math functions by ``fastopt.rules`` function
name (``_cy_dense.MATH_NAMES``); :data:`RULE_IDS` maps every registry rule, in
registry order, to the id of its math (Adam and AdamW share one).  A rule whose
math has no Cython copy is refused with ``NotImplementedError`` before anything is
written.

:func:`register_backend` makes the backend available as ``backend="cython"`` (or
records why the extension could not be imported); calling it again is harmless.
"""

import numpy as np

from . import _numba_cpu, backends, registry


def _rule_ids(math_names):
    """Registry rule name -> Cython rule id, in registry order (None: no Cython copy)."""
    return {name: (math_names.index(rule.math.__name__)
                   if getattr(rule.math, "__name__", None) in math_names else None)
            for name, rule in registry.RULES.items()}


class CythonBackend(backends.HostArrays):
    """Runs a bucket through ``fastopt._cy_dense.run_dense`` (host arrays, as numba)."""

    name = "cython"

    def __init__(self):
        from . import _cy_dense
        if (_cy_dense.SHAPES["nscalars"] != registry.NSCALARS
                or _cy_dense.SHAPES["ncols"] != 2 + registry.NSLOTS):
            raise ImportError(f"fastopt._cy_dense was built for tables {_cy_dense.SHAPES}, "
                              f"the registry has NSCALARS={registry.NSCALARS}, "
                              f"NSLOTS={registry.NSLOTS}: rebuild the extension")
        self._ext = _cy_dense
        self._dtype_codes = {np.dtype(k): v for k, v in _cy_dense.DTYPE_CODES.items()}
        self.math_names = tuple(_cy_dense.MATH_NAMES)
        self.rule_ids = _rule_ids(self.math_names)

    def rule_id(self, rule):
        """The extension's id for ``rule``'s math, or NotImplementedError."""
        rid = self.rule_ids.get(rule.name)
        if rid is None or registry.RULES.get(rule.name) is not rule:
            name = getattr(rule.math, "__name__", None)
            if name not in self.math_names:
                raise NotImplementedError(
                    f"backend 'cython' has no kernel for rule {rule.name!r} "
                    f"(math {name!r}); use backend='numba'")
            rid = self.math_names.index(name)
        return rid

    def run(self, rule, bucket):
        if not bucket.nelem:
            return
        code = self._dtype_codes.get(np.dtype(bucket.dtype))
        if code is None:
            raise TypeError(f"backend 'cython': dtype {bucket.dtype} is not supported")
        u0, u1, u2 = (bool(u) for u in bucket.uses)
        self._ext.run_dense(self.rule_id(rule), code, u0, u1, u2, bucket.ptrs, bucket.chunks,
                            bucket.hyper, bucket.hidx, bucket.nelem, _numba_cpu.PARALLEL_MIN)


_BACKEND = None


def register_backend():
    """Register ``"cython"`` with :mod:`fastopt.backends` (idempotent).

    If the extension cannot be imported (not built, built for another table
    layout), the backend is recorded as unavailable with the reason, so that
    ``backend="cython"`` raises a clear error.  Returns the backend or None.
    """
    global _BACKEND
    if _BACKEND is None:
        try:
            _BACKEND = CythonBackend()
        except ImportError as exc:
            backends.register("cython", reason=f"the compiled extension fastopt._cy_dense "
                                               f"could not be loaded ({exc})")
            return None
    backends.register("cython", _BACKEND)
    return _BACKEND
