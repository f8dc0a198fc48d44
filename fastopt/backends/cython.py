"""The ``"cython"`` backend: the compiled extension ``fastopt._cy_dense`` (OpenMP).

:class:`CythonBackend` is the second copy of the Numba CPU backend
(:mod:`fastopt.backends.numba_cpu`): the same work items, the same tables, the
same loops and the same operations in the same order and dtype, so its results
are bit-identical to ``backend="numba"`` for every rule, option and mode.  It has
every feature of :data:`fastopt.backends.base.FEATURES`.

One set of drivers for every storage format (``fastopt.storage``: float32/float64
parameters and state, bfloat16 parameters with every ``bf16_update``, float32 /
bfloat16 / 8-bit state, bfloat16 or float32 gradients), the twins of the Numba
drivers (``kernels/_cy_storage.pxi``):

* :meth:`CythonBackend.run_dense` runs a :class:`~fastopt.backends.base.DenseWork`
  bucket through ``_cy_dense.run_stored_dense`` (``make_stored_dense_driver``'s
  twin): one OpenMP parallel region over the bucket's chunks, or a serial loop
  below ``numba_cpu.PARALLEL_MIN`` elements;
* :meth:`CythonBackend.run_rows` runs a :class:`~fastopt.backends.base.RowsWork`
  (sparse gradient, dense step of a ``max_norm`` group, exact-mode catch-up or
  flush) through ``_cy_dense.run_stored_rows`` (``make_stored_rows_driver``'s
  twin), or, for a row-wise rule, ``_cy_dense.run_stored_rowwise``.

Parameters and state kept in the compute dtype (float32/float64) are updated in
place; the others are loaded block by block into compute-dtype buffers, sent
through the same element loop, and stored (8-bit: per block of ``Q8_BLOCK``, the
scale being the block's largest finite magnitude); the codecs are bit-exact C
copies of ``fastopt/storage/codecs.py``.  The row drivers get the gradient rows
in the compute dtype (converted here, as ``numba_cpu.run_stored_rows`` does).

The per-element math is the Cython copy of each rule module's ``element`` in
``kernels/_cy_rules.pxd``, reading the scalars by name through the column
constants generated from the rules' ``Scalars`` declarations
(``kernels/_cy_scalars.pxi``).  The fused switches of the work's configuration
(``Config.switches``) become one option bit mask; ``Config.fixed`` is not needed
(the fixed values are also in the scalar table).

Rule ids: the extension names its math by rule module (``_cy_dense.MATH_NAMES``,
``ROWWISE_NAMES``); :func:`_rule_ids` maps every registry rule to the id of its
module's math (Adam and AdamW share one).  When the extension loads, the backend
checks that it was compiled for the registry's table widths and scalar columns
(``NSCALARS``, ``NSLOTS``, every column constant against the ``Scalars``
declarations, each math's ``Scalars``); a stale build is reported as unavailable
with the reason ("rebuild the extension"), never run; so is a build without the
stored-format entry points or compiled for another ``Q8_BLOCK`` or ``FMT_*``
table.  A rule without a Cython copy is refused with ``NotImplementedError`` before anything is written.

:func:`register_backend` makes the backend available as ``backend="cython"`` (or
records why the extension could not be loaded); calling it again is harmless.
"""

import importlib
import sys

import numpy as np

from .. import rules as registry
from ..rules import fused
from .. import storage
from . import base
from .base import Backend, may_use_threads

#: how to get the compiled extensions (named in the reason the backend is unavailable)
INSTALL_HINT = ("to build it, install fastopt from its source tree with pip install . "
                "(pip install -e . for an editable install), or build the extensions in "
                "place with python setup.py build_ext --inplace")


def scalars_prefix(Scalars):
    """The prefix of a ``Scalars`` type's column constants (``AdamScalars`` ->
    ``ADAM``), as ``fastopt.rules.cython_pxi`` writes them."""
    return Scalars.__name__[:-len("Scalars")].upper()


def math_module(rule):
    """The name of the rule module that defines ``rule.math`` (``"adam"``)."""
    return getattr(rule.math, "__module__", "").rsplit(".", 1)[-1]


def _rule_ids(ext):
    """Registry rule name -> Cython rule id, in registry order (None: no Cython copy).

    Element-wise rules are numbered by ``ext.MATH_NAMES``, row-wise rules by
    ``ext.ROWWISE_NAMES``; a rule maps to the copy of its math's module when that
    copy reads the columns of the rule's ``Scalars``."""
    ids = {}
    for name, rule in registry.RULES.items():
        if rule.layout == "rowwise":
            names, prefixes = ext.ROWWISE_NAMES, ext.ROWWISE_SCALARS
        else:
            names, prefixes = ext.MATH_NAMES, ext.MATH_SCALARS
        mod = math_module(rule)
        rid = names.index(mod) if mod in names else None
        if rid is not None and prefixes[rid] != scalars_prefix(rule.Scalars):
            rid = None
        ids[name] = rid
    return ids


def layout_mismatches(ext):
    """What in the extension's compiled scalar layout disagrees with the registry
    (an empty list when the build is current)."""
    if not hasattr(ext, "COLUMNS"):
        return ["it predates the named scalar columns"]
    bad = []
    if ext.NSCALARS_BUILT != registry.NSCALARS:
        bad.append(f"NSCALARS {ext.NSCALARS_BUILT} != {registry.NSCALARS}")
    if ext.NSLOTS_BUILT != registry.NSLOTS:
        bad.append(f"NSLOTS {ext.NSLOTS_BUILT} != {registry.NSLOTS}")
    if len(ext.OPTION_BITS) != len(fused.SWITCHES):
        bad.append(f"{len(ext.OPTION_BITS)} option bits for {len(fused.SWITCHES)} switches")
    fields = {f"F_{f.upper()}": k for k, f in enumerate(fused.FIELDS)}
    for rule in registry.RULES.values():
        prefix = scalars_prefix(rule.Scalars)
        for k, f in enumerate(rule.Scalars._fields):
            if f not in fused.FIELDS:
                fields[f"{prefix}_{f.upper()}"] = k
    for const, col in ext.COLUMNS.items():
        want = fields.get(const)
        if want != col:
            bad.append(f"{const} = {col}, the Scalars declarations say "
                       f"{'no such field' if want is None else want}")
    return bad


def option_mask(ext, switches):
    """The extension's option bit mask of a configuration's fused switches."""
    mask = 0
    for bit, on in zip(ext.OPTION_BITS, switches):
        if on:
            mask |= bit
    return mask


class CythonBackend(Backend):
    """Runs dense buckets and row work through ``fastopt._cy_dense`` (host arrays,
    as numba); every feature of :data:`fastopt.backends.base.FEATURES`."""

    name = "cython"
    plan_inverse = True
    #: every format, float32/float64 included, runs through the one set of drivers
    plain_layout = False

    def __init__(self):
        # (importlib: a missing module is a ModuleNotFoundError naming it, also while
        # the package is still being imported)
        _cy_dense = importlib.import_module(".._cy_dense", __package__)
        bad = layout_mismatches(_cy_dense)
        if bad:
            raise ImportError("fastopt._cy_dense was compiled for another scalar layout than "
                              "the rules declare (" + "; ".join(bad) + "): rebuild the "
                              "extension (python setup.py build_ext --inplace)")
        if not hasattr(_cy_dense, "run_stored_dense") or \
                _cy_dense.Q8_BLOCK_BUILT != storage.Q8_BLOCK or \
                _cy_dense.FMT_COLUMNS != {n: getattr(base, n) for n in _cy_dense.FMT_COLUMNS}:
            raise ImportError("fastopt._cy_dense predates the storage formats this package "
                              "declares (fastopt.storage.Q8_BLOCK, the FMT_* columns): "
                              "rebuild the extension (python setup.py build_ext --inplace)")
        self._ext = _cy_dense
        self._dtype_codes = {np.dtype(k): v for k, v in _cy_dense.DTYPE_CODES.items()}
        self.rule_ids = _rule_ids(_cy_dense)
        self._masks = {}

    # ------------------------------------------------------------- helpers
    def rule_id(self, rule):
        """The extension's id for ``rule``'s math, or NotImplementedError."""
        rid = self.rule_ids.get(rule.name)
        if rid is None or registry.RULES.get(rule.name) is not rule:
            raise NotImplementedError(f"backend 'cython' has no kernel for rule {rule.name!r}; "
                                      "use backend='numba'")
        return rid

    def _code(self, dtype):
        code = self._dtype_codes.get(np.dtype(dtype))
        if code is None:
            raise TypeError(f"backend 'cython': dtype {np.dtype(dtype)} is not supported")
        return code

    def _opts(self, switches):
        m = self._masks.get(switches)
        if m is None:
            m = self._masks[switches] = option_mask(self._ext, switches)
        return m

    @staticmethod
    def _check_vals(vals, dt, D):
        if (not isinstance(vals, np.ndarray) or vals.dtype != dt or vals.ndim != 2
                or vals.shape[1] != D or not vals.flags.c_contiguous):
            raise ValueError(f"backend 'cython': gradient rows must be a C-contiguous "
                             f"{dt} array of shape (nnz, {D}), got "
                             f"{getattr(vals, 'dtype', type(vals))} "
                             f"{getattr(vals, 'shape', '')}")
        return vals

    # ---------------------------------------------------------------- work
    def run_dense(self, work):
        """A bucket (``work.chunks`` count blocks of the ``fmt`` table's layout):
        ``_cy_dense.run_stored_dense`` (the twin of
        ``numba_cpu.make_stored_dense_driver``)."""
        if not work.nelem:
            return
        cfg = work.config
        cached = work.launch.get("cython")      # the launch handle, kept on the bucket
        if cached is None or cached[0] is not cfg:
            code, pkind, skind, smask = self._formats(cfg)
            u0, u1, u2 = (bool(u) for u in cfg.uses)
            blk = storage.Q8_BLOCK if cfg.storage.state == "q8" else base.CHUNK
            cached = work.launch["cython"] = (cfg, (
                self.rule_id(cfg.rule), code, pkind, self._ext.GRAD_KINDS[cfg.grad], skind,
                smask, u0, u1, u2, self._opts(tuple(cfg.switches))), blk)
        self._ext.run_stored_dense(*cached[1], work.ptrs, work.fmt, work.chunks, work.hyper,
                                   work.hidx, cached[2], work.nelem, _parallel_min())

    # factored rules: the grouped step and the per-tensor passes
    # (``kernels/_cy_factored.pxi``, the twin of fastopt/backends/numba_factored_group.py
    # and numba_factored.py; fastopt/factored.py runs them)
    def factored_group(self, ptrs, dims, sqn, sidx, scal, dtype):
        """One call stepping every tensor of a group plan (one OpenMP thread per
        tensor), bit for bit the Numba grouped step."""
        dtype = np.dtype(dtype)
        # NumPy casts a float32 row_var to float64 through its buffer for the mean
        bufsize = np.getbufsize() if dtype != np.float64 else sys.maxsize
        self._ext.factored_group(ptrs, dims, sqn, sidx, scal, np.ones(1, dtype), bufsize,
                                 may_use_threads() and ptrs.shape[0] > 1)

    def factored_sums(self, P, G, B, R, C):
        nb = -(-R // self._ext.FACTOR_ROWS_BUILT)
        rows = np.empty(B * R, dtype=np.float64)
        prow = np.empty(B * R, dtype=np.float64)
        cols = np.empty(B * C, dtype=np.float64)
        part = np.empty((B * nb, C), dtype=np.float64)
        psq = self._ext.factored_sums(P, G, B, R, C, rows, prow, part, cols,
                                      _factored_parallel_min())
        return rows.reshape(B, R), cols.reshape(B, C), psq

    def factored_usq(self, G, rv, cv, m, B, R, C, e2, sign, one):
        rows = np.empty(B * R, dtype=np.float64)
        return self._ext.factored_usq(G, rv, cv, m, B, R, C, e2, sign, one, rows,
                                      _factored_parallel_min())

    def factored_apply(self, P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step):
        self._ext.factored_apply(P, G, rv, cv, m, B, R, C, e2, sign, one, decay, step,
                                 _factored_parallel_min())

    def vector_sums(self, P, G, V, w, omw, sign):
        part = np.empty(-(-P.size // base.CHUNK), dtype=np.float64)
        return self._ext.vector_sums(P, G, V, w, omw, sign, part,
                                     _factored_parallel_min())

    def vector_usq(self, G, V, e2, sign, one):
        part = np.empty(-(-G.size // base.CHUNK), dtype=np.float64)
        return self._ext.vector_usq(G, V, e2, sign, one, part, _factored_parallel_min())

    def vector_apply(self, P, G, V, e2, sign, one, decay, step):
        self._ext.vector_apply(P, G, V, e2, sign, one, decay, step,
                               _factored_parallel_min())

    def run_norms(self, work):
        """The norm pass of a per-tensor rule (``_cy_dense.run_norms``, the twin of
        :func:`fastopt.backends.numba_norms.make_norms_driver`), over the bucket's
        element chunks."""
        cfg = work.config
        out = np.zeros((len(work.params), 2), dtype=np.float64)
        if work.nelem and not cfg.storage.native:     # the update pass's block tables
            code, pkind, skind, smask = self._formats(cfg)
            u0, u1, u2 = base.norm_uses(cfg)
            self._ext.run_stored_norms(
                self.rule_id(cfg.rule), code, pkind, self._ext.GRAD_KINDS[cfg.grad], skind,
                smask, u0, u1, u2, self._opts(tuple(cfg.switches)), work.ptrs, work.fmt,
                work.chunks, work.hyper, work.hidx, out,
                storage.Q8_BLOCK if cfg.storage.state == "q8" else base.CHUNK, work.nelem,
                _parallel_min())
        elif work.nelem:
            u0, u1, u2 = (bool(u) for u in cfg.uses)
            self._ext.run_norms(self.rule_id(cfg.rule), self._code(cfg.dtype), u0, u1, u2,
                                self._opts(tuple(cfg.switches)), work.ptrs,
                                self.element_chunks(work), work.hyper, work.hidx, out,
                                work.nelem, _parallel_min())
        return out

    def run_rows(self, work):
        """One parameter's row step (see :class:`~fastopt.backends.base.RowsWork`):
        the gradient rows converted to the compute dtype (as
        ``numba_cpu.run_stored_rows``), the parameter, the used state slots and
        the format's arrays checked (C-contiguous, of the format's dtypes and
        sizes) before anything is written, then ``_cy_dense.run_stored_rows`` or,
        for a row-wise rule, ``run_stored_rowwise``; the extension checks the plan
        and the catch-up table.  With the plan's ``inverse`` (``row_plan``) the
        duplicate sums and the updates run in one parallel region, each thread
        summing the gradient rows of its unique rows in their own order, then
        updating them (numba gathers each row's gradient rows just before its
        update instead: the same bits)."""
        if work.catch is not None and work.catch.coef is None:
            raise ValueError("exact-mode work without its catch-up maps")
        cfg = work.config
        rule = cfg.rule
        rid = self.rule_id(rule)
        p = work.param
        if p.ndim == 0:
            raise ValueError("backend 'cython': a 0-d parameter has no rows")
        nrows = p.shape[0]
        D = p.size // nrows if nrows else 0
        uniq = work.uniq
        if uniq.shape[0] == 0 or D == 0:
            return
        code, pkind, skind, smask = self._formats(cfg)
        ct = np.dtype(cfg.compute_dtype)
        PDT, _, SDT, ADT = storage.kernel_dtypes(cfg.storage, "native", ct.type)
        P = _stored(p, PDT, p.shape, "parameter")
        extras = work.extras if work.extras is not None else [None] * 4
        aux = extras[0]
        if cfg.storage.aux is not None:
            A = self.address(_stored(aux, ADT, p.shape, cfg.storage.aux))
        else:
            A = self.address(P)
        opts = self._opts(tuple(cfg.switches))
        step = work.vals is not None
        if step:
            vals = work.vals
            if vals.dtype != ct and cfg.storage.param != "native":
                vals = vals.astype(ct)          # bfloat16 or float32 gradient rows
            vals = self._check_vals(vals, ct, D)
            V, nnz, order, seg = self.address(vals), vals.shape[0], _i64(work.order), \
                _i64(work.seg)
        else:
            V, nnz, order, seg = self.address(P), 0, None, None
        if rule.layout == "rowwise":
            if work.catch is not None or not step:
                raise ValueError(f"backend 'cython': {rule.name} has no exact sparse mode")
            sdt = np.dtype(SDT)
            acc = _stored(work.slots[0], sdt, (nrows,), "row state")
            addrs = np.array([self.address(P), V, self.address(acc), A], dtype=np.int64)
            self._ext.run_stored_rowwise(rid, code, pkind, skind, opts, addrs, nrows, D, nnz,
                                         order, seg, _i64(uniq), _f64(work.hyper),
                                         int(work.key), fused.RENORM_EPS, _parallel_min(),
                                         int(work.base))
            return
        addrs = np.empty(9, dtype=np.int64)
        addrs[0], addrs[1], addrs[5] = self.address(P), V, A
        q8 = cfg.storage.state == "q8"
        nscale = nrows * (-(-D // storage.Q8_BLOCK))
        for k, (s, used) in enumerate(zip(work.slots, cfg.uses)):
            addrs[2 + k] = addrs[0]
            addrs[6 + k] = addrs[0]
            if not used:
                continue
            if s is None:
                raise ValueError(f"backend 'cython': state slot {k} is used but missing")
            addrs[2 + k] = self.address(_stored(s, SDT, p.shape, f"state slot {k}"))
            if q8:
                sc = extras[1 + k]
                if (not isinstance(sc, np.ndarray) or sc.dtype != np.float32
                        or sc.size < nscale or not sc.flags.c_contiguous):
                    raise ValueError(f"backend 'cython': the 8-bit scales of state slot {k} "
                                     f"must be a C-contiguous float32 array of {nscale} "
                                     f"elements")
                addrs[6 + k] = self.address(sc)
        coef = None if work.catch is None else \
            np.ascontiguousarray(work.catch.coef, dtype=np.float64)
        u0, u1, u2 = (bool(u) for u in cfg.uses)
        self._ext.run_stored_rows(rid, code, pkind, skind, smask, u0, u1, u2, opts, addrs,
                                  nrows, D, nnz, order, seg, _i64(uniq), _f64(work.hyper),
                                  coef, step, int(work.key), fused.RENORM_EPS,
                                  _parallel_min(), int(work.base),
                                  _i64(work.inverse) if step and work.inverse is not None
                                  else None)

    def _formats(self, cfg):
        """(compute dtype code, param kind, state kind, signed mask) of a stored
        configuration (``fastopt.storage.Storage``)."""
        st = cfg.storage
        ext = self._ext
        ct = np.dtype(cfg.compute_dtype)
        pkind = ext.PARAM_KINDS["native" if st.param == "native" else st.update]
        skind = ext.STATE_KINDS[st.state]
        smask = 0
        for k, signed in enumerate(st.signed):
            if signed:
                smask |= 1 << k
        return self._code(ct), pkind, skind, smask


def _stored(a, dtype, shape, what):
    """``a`` (a C-contiguous array of ``shape``, for the row state of a row-wise rule
    ``(nrows,)`` or ``(nrows, 1)``, whose elements are ``dtype`` or, for bfloat16,
    2-byte values viewed as uint16) as a flat array of ``dtype``."""
    dt = np.dtype(dtype)
    ok_shape = isinstance(a, np.ndarray) and (
        a.shape == tuple(shape) or (len(shape) == 1 and a.shape == (shape[0], 1)))
    if (not ok_shape or not a.flags.c_contiguous or a.dtype.itemsize != dt.itemsize
            or (a.dtype != dt and not (dt == np.uint16 and storage.is_bf16(a.dtype)))):
        raise ValueError(f"backend 'cython': the {what} must be a C-contiguous array of "
                         f"shape {tuple(shape)} and {dt} elements, got "
                         f"{getattr(a, 'dtype', type(a))} {getattr(a, 'shape', '')}")
    a = a.reshape(-1)
    return a.view(dt) if a.dtype != dt else a


def _factored_parallel_min():
    """The threshold of the factored rules' passes (``fastopt.factored.PARALLEL_MIN``),
    or never parallel in a forked child (as :func:`_parallel_min`)."""
    from .. import factored
    return factored.PARALLEL_MIN if may_use_threads() else sys.maxsize


def _parallel_min():
    """``numba_cpu.PARALLEL_MIN`` (the one threshold of both CPU backends: read from
    that module once it is loaded, where tests and tuning set it, else its default
    ``base.PARALLEL_MIN``, without importing numba), or never parallel in a forked
    child (GNU OpenMP cannot start a parallel region there; see
    ``base.may_use_threads``)."""
    if not may_use_threads():
        return sys.maxsize
    nc = sys.modules.get(_NUMBA_CPU)
    return base.PARALLEL_MIN if nc is None else nc.PARALLEL_MIN


_NUMBA_CPU = __package__ + ".numba_cpu"


def _i64(a):
    return np.ascontiguousarray(a, dtype=np.int64)


def _f64(a):
    return np.ascontiguousarray(a, dtype=np.float64)


_BACKEND = None


def register_backend():
    """Register ``"cython"`` with :mod:`fastopt.backends` (idempotent).

    If the extension cannot be loaded (not built, or built for another scalar
    layout), the backend is recorded as unavailable with the reason, so that
    ``backend="cython"`` raises a clear error.  Returns the backend or None.
    """
    global _BACKEND
    if _BACKEND is None:
        try:
            _BACKEND = CythonBackend()
        except ImportError as exc:
            missing = isinstance(exc, ModuleNotFoundError) and \
                exc.name == __name__.split(".")[0] + "._cy_dense"
            _backends().register("cython", reason=(
                f"the compiled extension fastopt._cy_dense "
                f"{'is not built' if missing else 'could not be loaded'} ({exc}); "
                f"{INSTALL_HINT}"))
            return None
    _backends().register("cython", _BACKEND)
    return _BACKEND


def _backends():
    from .. import backends
    return backends
