"""Backends: who runs a dense step over a bucket of tensors.

A *bucket* (:class:`Bucket`) is the unit of work: tensors of one dtype whose
groups use the same state slots, with their pointer table, chunk table and
per-step scalar rows.  Every backend runs a bucket with the same semantics:

* ``numpy``: the reference functions of :mod:`fastopt.reference`, one tensor at a
  time (slow; the oracle).
* ``numba``: one Numba parallel region over the bucket's chunks
  (:mod:`fastopt._numba_cpu`).

``backend="auto"`` picks the fastest available CPU backend for host arrays.  A
backend named explicitly that is not available raises; there is no silent fallback.
"""

from dataclasses import dataclass, field
from typing import List

import numpy as np

from . import _numba_cpu, fused
from ._cy_util import data_address, gather_grads
from .arrays import as_grad, as_param


@dataclass
class Bucket:
    dtype: np.dtype
    uses: tuple                       # which of the NSLOTS slots are used
    index: List[int]                  # optimizer-wide parameter indices
    params: List[np.ndarray]
    const: tuple = ()                 # ((scalar index, value), ...) fixed for this bucket
    grads: List[np.ndarray] = field(default_factory=list)
    slots: List[list] = field(default_factory=list)   # per tensor: NSLOTS arrays or None
    ptrs: np.ndarray = None           # int64 (T, 2 + NSLOTS)
    chunks: np.ndarray = None         # int64 (C, 3)
    hyper: np.ndarray = None          # float64 (R, NSCALARS)
    hidx: np.ndarray = None           # int64 (T,)
    nelem: int = 0
    # reference backend only: per tensor (group dict, step, state dict, fresh set)
    ref_args: list = None
    grad_scale: float = None          # step(grad_scale=...), for the reference backend


@dataclass
class RowsWork:
    """One parameter's row-sparse step: coalescing plan, scalars and arrays."""
    param: np.ndarray                 # the parameter (any shape; rows = first axis)
    slots: list                       # NSLOTS state arrays or None
    vals: np.ndarray                  # (nnz, D) gradient rows, param dtype
    idx: np.ndarray                   # (nnz,) int64 row indices (validated)
    order: np.ndarray                 # stable sort of idx (fastopt.sparse.coalesce_plan)
    seg: np.ndarray
    uniq: np.ndarray
    uses: tuple
    const: tuple
    hyper: np.ndarray                 # (1, NSCALARS)
    ref_args: tuple = None            # (group, step, state dict, fresh) for the reference
    grad_scale: float = None          # step(grad_scale=...), for the reference backend


@dataclass
class CatchUpWork:
    """Exact sparse mode: bring ``rows`` of one parameter from step ``last[q]`` to
    ``t_end`` as if they had received zero gradients (see :mod:`fastopt.exact`)."""
    param: np.ndarray
    slots: list
    rows: np.ndarray                  # int64 row indices
    last: np.ndarray                  # int64 step each row is up to date with
    t_end: int
    buffer_start: int                 # step at which SGD's momentum buffer was created
    scalars: tuple                    # the rule's per-step scalars (for the closed form)
    group: dict
    uses: tuple


class HostArrays:
    """Array handling shared by the host (CPU) backends.  A device backend provides
    the same methods for its own arrays (see ``fastopt._cuda_backend``)."""

    device = "cpu"

    def as_param(self, obj, where):
        return as_param(obj, where)

    def check_grads(self, dense, plist, active):
        """Check (and where needed convert) gradients; returns (grads, addresses).

        A C loop checks type, shape, dtype and layout and records addresses; the
        slow path converts other float dtypes and non-contiguous gradients, or
        raises.  Nothing is written to any parameter or state here.
        """
        gptr = np.empty((len(dense), 1), dtype=np.int64)
        start, copied = 0, False
        while start < len(dense):
            bad = gather_grads(dense[start:], plist[start:], gptr[start:], 0)
            if bad < 0:
                break
            k = start + bad
            if not copied:
                dense, copied = list(dense), True
            dense[k] = as_grad(dense[k], plist[k], f"gradient {active[k]}")
            gptr[k, 0] = data_address(dense[k])
            start = k + 1
        return dense, gptr[:, 0]

    def all_finite(self, arrays):
        """True when no array holds an Inf or NaN (a parallel scan, stops early)."""
        return all(_numba_cpu.all_finite(a.reshape(-1)) for a in arrays if a.size)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype=dtype)

    def address(self, a):
        return data_address(a)

    def to_host(self, a):
        return a.copy()

    def from_host(self, a, like):
        return np.array(a, dtype=like.dtype, order="C", copy=True)


class NumbaBackend(HostArrays):
    name = "numba"
    fuses_options = True          # fastopt.fused options are compiled into the drivers

    def run_catch_up(self, rule, w):
        nrows = w.param.shape[0]
        ks = w.t_end - w.last
        firsts = w.last == w.buffer_start - 1
        s0 = w.slots[0].reshape(nrows, -1) if w.slots[0] is not None else None
        _numba_cpu.launch_catch_up(rule.catch_up, w.param.dtype, w.uses,
                                   w.param.reshape(nrows, -1), s0, w.rows, ks, firsts,
                                   np.array(w.scalars, dtype=np.float64))

    def run_rows(self, rule, w):
        nrows = w.param.shape[0]
        _numba_cpu.launch_rows(rule.math, w.param.dtype, w.uses, w.const,
                               w.param.reshape(nrows, -1),
                               [s.reshape(nrows, -1) if s is not None else None
                                for s in w.slots],
                               w.vals, w.order, w.seg, w.uniq, w.hyper,
                               rowwise=rule.layout == "rowwise")

    def run(self, rule, bucket):
        if bucket.nelem:
            _numba_cpu.launch(rule.math, bucket.dtype, bucket.uses, bucket.const, bucket.ptrs,
                              bucket.chunks, bucket.hyper, bucket.hidx, bucket.nelem)


class NumpyBackend(HostArrays):
    name = "numpy"
    fuses_options = True          # applied with whole-array NumPy (fastopt.fused.np_*)

    def run_catch_up(self, rule, w):
        """The definition of exact mode: run the skipped steps with zero gradients
        through the dense reference, step by step (slow; the oracle)."""
        nrows = w.param.shape[0]
        p2 = w.param.reshape(nrows, -1)
        names = [n for n, u in zip(rule.slots, w.uses) if u]
        arrays = {n: s.reshape(nrows, -1) for n, s in zip(rule.slots, w.slots) if s is not None}
        for last in np.unique(w.last):
            rows = w.rows[w.last == last]
            sub = p2[rows]
            st = {n: arrays[n][rows] for n in names}
            zero = np.zeros_like(sub)
            with np.errstate(all="ignore"):
                for step in range(int(last) + 1, w.t_end + 1):
                    fresh = {"momentum_buffer"} if step == w.buffer_start else set()
                    rule.reference(sub, zero, st, w.group, step, fresh)
            p2[rows] = sub
            for n in names:
                arrays[n][rows] = st[n]

    def run_rows(self, rule, w):
        """Reference semantics of a lazy sparse step: coalesce, then apply the dense
        reference to the touched rows (and their state) only."""
        from .sparse import coalesce
        nrows = w.param.shape[0]
        uniq, summed = coalesce(w.idx, w.vals, nrows)
        group, step, state, fresh = w.ref_args
        p2 = w.param.reshape(nrows, -1)
        rows = p2[uniq]
        st = {k: (v.reshape(nrows, -1)[uniq] if isinstance(v, np.ndarray) else v)
              for k, v in state.items()}
        with np.errstate(all="ignore"):
            rule.reference(rows, fused.np_pre(summed, group, w.grad_scale), st, group, step,
                           fresh)
            fused.np_post(rows, group)
        p2[uniq] = rows
        for k, v in state.items():
            if isinstance(v, np.ndarray):
                v.reshape(nrows, -1)[uniq] = st[k]

    def run(self, rule, bucket):
        with np.errstate(all="ignore"):   # NaN/Inf propagate silently, as in the kernels
            for p, g, (group, step, state, fresh) in zip(bucket.params, bucket.grads,
                                                          bucket.ref_args):
                rule.reference(p, fused.np_pre(g, group, bucket.grad_scale), state, group,
                               step, fresh)
                fused.np_post(p, group)


_BACKENDS = {"numba": NumbaBackend(), "numpy": NumpyBackend()}
#: the CPU backend "auto" picks (see README: measured per case)
AUTO_CPU = "numba"
_UNAVAILABLE = {}   # name -> reason, filled by optional backends that failed to load
_KNOWN = ("auto", "numba", "cython", "cuda", "numpy")


def register(name, backend=None, reason=None):
    """Make an optional backend available (or record why it is not)."""
    if backend is not None:
        _BACKENDS[name] = backend
    else:
        _UNAVAILABLE[name] = reason


def available():
    """Names of the backends that can run on this machine."""
    return sorted(_BACKENDS)


def is_device_array(obj):
    """A CUDA device array: ``__cuda_array_interface__`` (CuPy, torch, numba) or a
    numba device array of the CUDA simulator (``__cuda_ndarray__``)."""
    if isinstance(obj, np.ndarray):
        return False
    return hasattr(obj, "__cuda_array_interface__") or bool(getattr(obj, "__cuda_ndarray__", False))


def resolve(name, sample=None):
    """The backend object for a name given by the user.

    ``"auto"``: ``cuda`` when ``sample`` (the first parameter) is a device array,
    else the fastest CPU backend.
    """
    if name not in _KNOWN:
        raise ValueError(f"unknown backend {name!r}; choose one of {_KNOWN}")
    if name == "auto":
        name = "cuda" if sample is not None and is_device_array(sample) else AUTO_CPU
    try:
        return _BACKENDS[name]
    except KeyError:
        why = _UNAVAILABLE.get(name, "it is not built into this version of fastopt")
        raise RuntimeError(f"backend {name!r} is not available: {why}") from None
