"""The ``"cython"`` backend: dense steps run by the compiled extension ``fastopt._cy_dense``.

:class:`CythonBackend` runs a :class:`fastopt.backends.Bucket` with the same tables
and the same semantics as the Numba driver (``fastopt._numba_cpu``): one OpenMP
parallel region over the bucket's chunks, or a serial loop below
``_numba_cpu.PARALLEL_MIN`` elements.  Its per-element math is the Cython copy of
:mod:`fastopt.rules` in ``kernels/_cy_rules.pxd``.

Row-sparse (lazy) steps: :meth:`CythonBackend.run_rows` takes a
:class:`fastopt.backends.RowsWork` and runs ``_cy_dense.run_rows``, the twin of the
Numba rows driver (``_numba_cpu.make_rows_driver``): parallel over unique rows
(serial below ``_numba_cpu.PARALLEL_MIN`` touched elements), duplicates summed
whole-row in order of appearance, the same element loop and math as dense steps,
untouched rows and unused slots never read or written.  Bit-identical to Numba.

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


def _rule_ids(math_names, rowwise_names=()):
    """Registry rule name -> Cython rule id, in registry order (None: no Cython copy).

    Element-wise rules are numbered by ``math_names`` (``_cy_dense.MATH_NAMES``),
    row-wise rules by ``rowwise_names`` (``_cy_dense.ROWWISE_NAMES``)."""
    ids = {}
    for name, rule in registry.RULES.items():
        names = rowwise_names if rule.layout == "rowwise" else math_names
        fn = getattr(rule.math, "__name__", None)
        ids[name] = names.index(fn) if fn in names else None
    return ids


class CythonBackend(backends.HostArrays):
    """Runs a bucket through ``fastopt._cy_dense.run_dense`` and a row-sparse step
    through ``fastopt._cy_dense.run_rows`` (host arrays, as numba)."""

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
        self.rowwise_names = tuple(_cy_dense.ROWWISE_NAMES)
        self.rule_ids = _rule_ids(self.math_names, self.rowwise_names)

    def rule_id(self, rule):
        """The extension's id for ``rule``'s math, or NotImplementedError."""
        rid = self.rule_ids.get(rule.name)
        if rid is None or registry.RULES.get(rule.name) is not rule:
            name = getattr(rule.math, "__name__", None)
            names = self.rowwise_names if rule.layout == "rowwise" else self.math_names
            if name not in names:
                raise NotImplementedError(
                    f"backend 'cython' has no kernel for rule {rule.name!r} "
                    f"(math {name!r}); use backend='numba'")
            rid = names.index(name)
        return rid

    def _run_rowwise(self, rule, w, rid, code):
        """Row-wise rule (one accumulator per row): ``_cy_dense.run_rowwise``."""
        p = w.param
        nrows = p.shape[0]
        D = int(np.prod(p.shape[1:], dtype=np.int64))
        P = _as_rows(p, p, nrows, D, "parameter")
        acc = w.slots[0]
        if (not isinstance(acc, np.ndarray) or acc.dtype != p.dtype
                or acc.shape not in ((nrows,), (nrows, 1)) or not acc.flags.c_contiguous):
            raise ValueError(f"backend 'cython': the row state of {rule.name} must be a "
                             f"C-contiguous {p.dtype} array of shape ({nrows},)")
        vals = self._check_vals(w.vals, p.dtype, D)
        addrs = np.array([self.address(P), self.address(vals), self.address(acc)],
                         dtype=np.int64)
        self._ext.run_rowwise(rid, code, addrs, nrows, D, vals.shape[0],
                              np.ascontiguousarray(w.order, dtype=np.int64),
                              np.ascontiguousarray(w.seg, dtype=np.int64),
                              np.ascontiguousarray(w.uniq, dtype=np.int64),
                              np.ascontiguousarray(w.hyper, dtype=np.float64),
                              _numba_cpu.PARALLEL_MIN)

    @staticmethod
    def _check_vals(vals, dt, D):
        if (not isinstance(vals, np.ndarray) or vals.dtype != dt or vals.ndim != 2
                or vals.shape[1] != D or not vals.flags.c_contiguous):
            raise ValueError(f"backend 'cython': sparse values must be a C-contiguous "
                             f"{dt} array of shape (nnz, {D}), got "
                             f"{getattr(vals, 'dtype', type(vals))} "
                             f"{getattr(vals, 'shape', '')}")
        return vals

    def run_rows(self, rule, w):
        """Lazy row-sparse step of one parameter (see :class:`backends.RowsWork`).

        Checks (before anything is written) that the parameter, the used state slots
        and ``vals`` are C-contiguous arrays of one supported dtype with matching
        row sizes; the extension checks the coalescing plan.  ``w.const`` is not
        needed: the flags it fixes are also in ``w.hyper`` (as for dense steps).
        """
        p = w.param
        dt = np.dtype(p.dtype)
        code = self._dtype_codes.get(dt)
        if code is None:
            raise TypeError(f"backend 'cython': dtype {dt} is not supported")
        rid = self.rule_id(rule)
        if p.ndim == 0:
            raise ValueError("backend 'cython': a 0-d parameter has no rows")
        if rule.layout == "rowwise":
            return self._run_rowwise(rule, w, rid, code)
        nrows = p.shape[0]
        D = int(np.prod(p.shape[1:], dtype=np.int64))
        P = _as_rows(p, p, nrows, D, "parameter")
        addrs = np.empty(2 + registry.NSLOTS, dtype=np.int64)
        addrs[0] = self.address(P)
        for k, (s, used) in enumerate(zip(w.slots, w.uses)):
            if not used:
                addrs[2 + k] = addrs[0]          # never read or written
            elif s is None:
                raise ValueError(f"backend 'cython': state slot {k} is used but missing")
            else:
                addrs[2 + k] = self.address(_as_rows(s, p, nrows, D, f"state slot {k}"))
        vals = self._check_vals(w.vals, dt, D)
        addrs[1] = self.address(vals)
        u0, u1, u2 = (bool(u) for u in w.uses)
        self._ext.run_rows(rid, code, u0, u1, u2, addrs, nrows, D, vals.shape[0],
                           np.ascontiguousarray(w.order, dtype=np.int64),
                           np.ascontiguousarray(w.seg, dtype=np.int64),
                           np.ascontiguousarray(w.uniq, dtype=np.int64),
                           np.ascontiguousarray(w.hyper, dtype=np.float64),
                           _numba_cpu.PARALLEL_MIN)

    def run(self, rule, bucket):
        if not bucket.nelem:
            return
        code = self._dtype_codes.get(np.dtype(bucket.dtype))
        if code is None:
            raise TypeError(f"backend 'cython': dtype {bucket.dtype} is not supported")
        u0, u1, u2 = (bool(u) for u in bucket.uses)
        self._ext.run_dense(self.rule_id(rule), code, u0, u1, u2, bucket.ptrs, bucket.chunks,
                            bucket.hyper, bucket.hidx, bucket.nelem, _numba_cpu.PARALLEL_MIN)


def _as_rows(a, like, nrows, D, what):
    """``a`` (shaped like the parameter ``like``) as a C-contiguous (nrows, D) view."""
    if (not isinstance(a, np.ndarray) or a.dtype != like.dtype or a.shape != like.shape
            or not a.flags.c_contiguous):
        raise ValueError(f"backend 'cython': the {what} must be a C-contiguous "
                         f"{like.dtype} array of shape {like.shape}")
    return a.reshape(nrows, D)


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
