"""The sharded optimizer: construction, param groups and the step (the exchanges,
the agreement and the checkpoints are mixins of their own modules)."""

import functools
import numbers
import threading
import time

import numpy as np

from .. import storage
from ..clip import _limit, _norm_type
from ..optimizer import Optimizer
from ..optimizers import CLASSES
from ..param_groups import refuse_overlaps
from ..rules import fused
from ..sparse import RowSparse, checked_rows, is_sparse
from .agreement import Agreement, _digest
from .checkpoints import Checkpoints
from .collectives import Collectives
from .layout import (_DensePlan, _DtypePlan, _by_dtype, _grad_dtype, _owner_bounds, _piece,
                     _row_bounds, _rows_and_width, _wire)

#: default size of one communication bucket
DEFAULT_BUCKET_BYTES = 32 << 20
#: default of ``overlap``: whether a dense step overlaps its exchanges with the
#: averaging and the update (non-blocking collectives; see docs/distributed.md,
#: "Overlap", for why it is off here)
DEFAULT_OVERLAP = False
#: default seconds a collective call waits for the other ranks to make the same call
#: (torch.distributed's default process-group timeout); None waits forever
DEFAULT_TIMEOUT = 1800.0

_NONE, _DENSE, _SPARSE = 0, 1, 2
_KIND_NAMES = {_NONE: "None", _DENSE: "dense", _SPARSE: "sparse"}


class ShardedOptimizer(Agreement, Collectives, Checkpoints):
    """A fastopt optimizer whose state is sharded over the ranks of an MPI
    communicator (see the module docstring for the scheme).

    Args:
        optimizer_class: a fastopt optimizer class (``fastopt.Adam``, ...) or its
            name (a key of ``fastopt.CLASSES``).
        params: as for the class: a list of arrays, a dict name -> array, or a list
            of param-group dicts.  Every rank passes its replica of the same
            parameters (same shapes, dtypes, groups and hyperparameters).
        comm: an mpi4py intracommunicator (default ``MPI.COMM_WORLD``); it is
            duplicated, so this optimizer's messages never mix with the caller's.
        bucket_bytes: size of one communication bucket (default 32 MiB): each
            reduce-scatter call carries at most this many bytes of every rank's
            gradients; its receive buffer, ``(N - 1) / N`` of it, lives for the step.
        max_grad_norm: clip the averaged gradient to this total norm (over all
            parameters and ranks) before each update; None (default): no clipping.
        norm_type: the norm of ``max_grad_norm`` (2, 1, ..., or ``inf``).
        timeout: seconds each collective call waits for the other ranks to make the
            same call before raising :class:`DistributedError` (default
            ``DEFAULT_TIMEOUT``, 1800 s; None: wait forever); also the settable
            attribute ``timeout``.
        reuse_grads: False (default): the averaged gradient of this rank's rows is
            formed in a gradient shard the optimizer keeps (``1/N`` of the gradient
            bytes), and the local gradients are only read.  True: it is formed in
            the caller's gradient arrays themselves, over this rank's rows (as DDP
            averages ``.grad`` in place), and no shard is kept: the gradients'
            contents after a step are unspecified, and they must not overlap each
            other or the parameters.  Gradients that are not C-contiguous,
            writeable and of the gradient dtype are copied for the step instead.
        overlap: True: a dense step runs its exchanges as non-blocking collectives
            in buckets of ``bucket_bytes / 2`` (two in flight: the receive memory of
            one ``bucket_bytes`` bucket), bucket ``k + 1``'s reduce-scatter in flight
            while bucket ``k`` is averaged and its completed parameters updated, and
            their all-gather in flight while the next buckets are; bit for bit the
            blocking step's result.  The update is split by bucket only without
            ``max_grad_norm``, ``skip_nonfinite``, sparse gradients in the step and
            per-tensor rules (LAMB, LARS), which need every gradient first.  False:
            blocking collectives, bucket after bucket.  None (default):
            ``DEFAULT_OVERLAP`` (False: not faster on the shared-memory machine
            measured, and slower for many small tensors in many buckets, whose
            per-bucket inner steps re-plan; see docs/distributed.md, "Overlap").
        **hyper: the class's hyperparameters, fused options, ``backend`` (a CPU
            backend) and ``sparse_mode``, as for the class.

    Attributes: ``param_groups`` (the full parameters' groups; edit
    hyperparameters between steps on every rank alike), ``state`` (this rank's
    shard of the state, keyed by parameter index), ``rank``, ``world_size``,
    ``last_grad_norm``, ``stats`` (cumulative timings and bytes).
    """

    def __init__(self, optimizer_class, params, comm=None, *, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 max_grad_norm=None, norm_type=2.0, timeout=DEFAULT_TIMEOUT,
                 reuse_grads=False, overlap=None, **hyper):
        try:
            from mpi4py import MPI
        except ImportError as e:
            raise ImportError("ShardedOptimizer needs mpi4py and an MPI library: "
                              "pip install 'fastopt[mpi]'") from e
        self._MPI = MPI
        if comm is None:
            comm = MPI.COMM_WORLD
        if not all(hasattr(comm, a) for a in ("Dup", "Alltoallv", "Allgatherv", "allgather",
                                              "Get_rank", "Get_size")):
            raise TypeError(f"comm must be an mpi4py intracommunicator, got "
                            f"{type(comm).__name__}")
        from mpi4py.util import dtlib
        self._dtlib = dtlib
        self._comm = comm.Dup()
        self._rank = self._comm.Get_rank()
        self._size = self._comm.Get_size()
        self._calls = 0
        self._lock = threading.Lock()
        self._broken = None
        self._timeout = None
        err, sig = None, None
        try:
            self.timeout = timeout
            if not isinstance(reuse_grads, (bool, np.bool_)):
                raise TypeError(f"reuse_grads must be True or False, got {reuse_grads!r}")
            self._reuse_grads = bool(reuse_grads)
            if overlap is None:
                overlap = DEFAULT_OVERLAP
            if not isinstance(overlap, (bool, np.bool_)):
                raise TypeError(f"overlap must be True, False or None, got {overlap!r}")
            self._overlap = bool(overlap)
            self._setup(optimizer_class, params, bucket_bytes, max_grad_norm, norm_type, hyper)
            sig = self._construction_signature()
        except Exception as e:      # reported to every rank below
            err = e
        try:
            self._agree("ShardedOptimizer", err, sig, self._describe_construction)
        except BaseException:
            if self._broken is None:    # every rank is here: free the duplicate
                self._comm.Free()
                self._broken = "its construction failed"
            raise
        self._build()

    # ------------------------------------------------------------ construction
    def _setup(self, optimizer_class, params, bucket_bytes, max_grad_norm, norm_type, hyper):
        if isinstance(optimizer_class, str):
            if optimizer_class not in CLASSES:
                raise ValueError(f"unknown optimizer {optimizer_class!r}; known: "
                                 f"{sorted(CLASSES)}")
            optimizer_class = CLASSES[optimizer_class]
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)
                and optimizer_class.rule is not None):
            raise TypeError(f"optimizer_class must be a fastopt optimizer class (e.g. "
                            f"fastopt.Adam), got {optimizer_class!r}")
        if isinstance(bucket_bytes, bool) or not isinstance(bucket_bytes, numbers.Integral) \
                or bucket_bytes < 8:
            raise ValueError(f"Invalid bucket_bytes: {bucket_bytes!r} (an integer >= 8)")
        self._bucket_bytes = int(bucket_bytes)
        self._max_grad_norm = None if max_grad_norm is None else _limit("max_grad_norm",
                                                                        max_grad_norm)
        self._norm_type = _norm_type(norm_type)
        self._cls = optimizer_class
        if not isinstance(params, (dict, list, tuple)):
            params = list(params)
        self._hyper = dict(hyper)
        # the full optimizer on every rank: it validates everything as the single
        # process would, holds the user-visible param_groups, never steps and never
        # holds state (except transiently inside load_state_dict)
        self._template = optimizer_class(params, **hyper)
        t = self._template
        if t.backend.memory != "host":
            raise NotImplementedError(
                f"ShardedOptimizer runs on host (CPU) arrays; backend {t.backend.name!r} keeps "
                "them on a device (stage them through host memory, or use a CPU backend)")
        self.rule = t.rule
        if t.rule.per_tensor and getattr(t.backend, "wants_reference_args", False):
            raise NotImplementedError(
                f"ShardedOptimizer: the NumPy reference backend computes {t.rule.name}'s "
                "norms inside each piece's reference step, not over the whole tensor; use "
                "backend='numba'")
        self._params = list(t.params)
        for fn in self.rule.methods:          # rule-specific methods (schedule-free's train)
            setattr(self, fn.__name__, functools.partial(self._rule_method, fn))

    def _construction_signature(self):
        t = self._template
        return {"class": self._cls.__name__, "rule": self.rule.name,
                "backend": t.backend.name, "sparse_mode": t.sparse_mode,
                "bucket_bytes": self._bucket_bytes, "reuse_grads": self._reuse_grads,
                "overlap": self._overlap,
                "clip": (self._max_grad_norm, self._norm_type),
                "names": None if t.param_names is None else [repr(n) for n in t.param_names],
                "params": [(p.shape, p.dtype.str) for p in self._params],
                "groups": [len(g["params"]) for g in t.param_groups],
                "hyper": self._hyper_repr()}

    def _describe_construction(self, sigs):
        a = sigs[0]
        for r, s in enumerate(sigs):
            if s == a:
                continue
            if len(s["params"]) != len(a["params"]):
                return (f"rank {r} has {len(s['params'])} parameters, rank 0 has "
                        f"{len(a['params'])}")
            for i, (x, y) in enumerate(zip(a["params"], s["params"])):
                if x != y:
                    return (f"parameter {i} has shape {y[0]} and dtype {np.dtype(y[1])} on "
                            f"rank {r} but shape {x[0]} and dtype {np.dtype(x[1])} on rank 0")
            if s["hyper"] != a["hyper"] and len(s["hyper"]) == len(a["hyper"]):
                for gi, (x, y) in enumerate(zip(a["hyper"], s["hyper"])):
                    diff = sorted(set(y) - set(x))
                    if diff:
                        return (f"hyperparameters of group {gi} differ: "
                                f"{', '.join(f'{k}={v}' for k, v in diff)} on rank {r}, "
                                f"{', '.join(f'{k}={v}' for k, v in sorted(set(x) - set(y)))}"
                                f" on rank 0")
            for k in a:
                if s[k] != a[k]:
                    what = {"hyper": "hyperparameters", "groups": "param group sizes",
                            "names": "parameter names", "clip": "max_grad_norm/norm_type"
                            }.get(k, k)
                    return f"{what} differ: {s[k]!r} on rank {r}, {a[k]!r} on rank 0"
        return "the ranks disagree"

    def _granules(self, first=0):
        """Per parameter from ``first``: the rows its cuts are multiples of (the 8-bit
        blocks of a 1-D parameter with 8-bit state, else 1).  The storage format is
        the whole parameter's (as the single process chooses it).  A matrix rule
        (Muon) orthogonalizes whole matrices: a 2-D parameter is never cut (one rank
        owns it, the others get an empty piece), a stack ``[B, ..., M, N]`` only
        between its matrices (the first axis), so every rank's pieces are whole
        matrices and each is computed as the single process computes it."""
        out, k = [], 0
        matrix = self.rule.matrix is not None
        for g in self._template.param_groups:
            for p in g["params"]:
                if k >= first and matrix:
                    out.append(max(1, p.shape[0]) if p.ndim == 2 else 1)
                elif k >= first:
                    stg = storage.storage_for(self.rule, p, g["state_bits"], g["bf16_update"])
                    out.append(storage.Q8_BLOCK if stg.state == "q8" and p.ndim == 1 else 1)
                k += 1
        return out

    def _cut(self, params, granules):
        """The bounds of ``params`` (new parameters): cut by rows
        (:func:`~fastopt.distributed.layout._row_bounds`), or, for a factored rule
        (Adafactor), each given whole to one rank, balanced by cost with the
        parameters already owned (:func:`~fastopt.distributed.layout._owner_bounds`):
        its row and column sums and RMS are those of the whole tensor, so each
        tensor is computed as the single process computes it."""
        if self.rule.factored:
            bounds, _, self._loads = _owner_bounds(params, self._size, self._loads)
            return bounds
        return _row_bounds(params, self._size, granules)

    def _inner_group(self, g, pieces):
        """The inner optimizer's group of the pieces of template group ``g``: its
        hyperparameters and storage options."""
        return {**self._hyper_of(g), **{k: g[k] for k in storage.OPTIONS if k in g},
                "params": pieces}

    def _place_pieces(self, first=0):
        """Tell the inner optimizer which rows of which parameter each piece is (its
        storage format and stochastic-rounding stream are the whole parameter's)."""
        me = self._rank
        for i in range(first, len(self._params)):
            self._inner.set_row_range(i, self._params[i].shape, int(self._bounds[i][me]))

    def _build(self):
        t = self._template
        n = len(self._params)
        self._names = t.param_names
        self._blocked = self._granules()
        self._loads = None
        self._bounds = self._cut(self._params, self._blocked)
        self._widths = [_rows_and_width(p)[1] for p in self._params]
        self._nrows = [_rows_and_width(p)[0] for p in self._params]
        me = self._rank
        self._pieces = [_piece(p, int(b[me]), int(b[me + 1]))
                        for p, b in zip(self._params, self._bounds)]
        self._pflat = [_wire(p.reshape(-1)) for p in self._params]
        groups, k = [], 0
        for g in t.param_groups:
            m = len(g["params"])
            groups.append(self._inner_group(g, self._pieces[k:k + m]))
            k += m
        self._inner = self._cls(groups, **self._hyper)
        if self.rule.per_tensor:
            # the norms of whole tensors: the ranks' parts added (fixed rank order)
            self._inner.norm_reducer = self._reduce_norms
        self._place_pieces()
        self._spec_seen = None
        self._shard = {}
        self._allocate_buffers()
        self._scratch = {}
        self._version = 0
        self._consolidated = None
        self.last_grad_norm = None
        self.reset_stats()

    def _allocate_buffers(self):
        """The gradient shard (one per dtype; none with ``reuse_grads``) for the
        current parameters, allocated and touched here (at construction, and when a
        group is added: only what has to grow), reused by every step.  (No bucket
        buffers: the gradients are sent from their arrays and the parameters
        gathered into theirs; the reduce-scatter's receive buffer lives for the
        step.)"""
        self._free_plans()
        self._plans = {}
        parts = [_DtypePlan(dt, idxs, self._bounds, self._widths, self._size, self._rank,
                            self._bucket_bytes)
                 for dt, idxs in _by_dtype(self._params, range(len(self._params))).values()]
        # (one rank without clipping steps on the gradients themselves: no buffers)
        alone = self._size == 1
        for dp in parts:
            need = 0 if (alone and self._max_grad_norm is None) or self._reuse_grads \
                else dp.length_me
            old = self._shard.get(dp.dtype.str)
            if old is None or old.size < need:
                buf = np.empty(need, dtype=dp.gdtype)
                buf.fill(0)
                self._shard[dp.dtype.str] = buf

    def _hyper_of(self, group):
        """The hyperparameters of a group and the rule's group entries (schedule-free's
        ``train_mode``), which the inner optimizer's groups mirror."""
        return {k: group[k] for k in (*self.rule.checks, *self.rule.group_keys) if k in group}

    def _rule_method(self, fn, *args, **kwargs):
        """A rule method (:attr:`fastopt.rules.Rule.methods`), collectively: every rank
        runs it on its shard (the inner optimizer: its rows of each parameter and their
        state), then every rank gets the full parameters, and the user-visible groups
        take the inner groups' new entries (schedule-free's ``train_mode``)."""
        self._sync_groups()
        out = fn(self._inner, *args, **kwargs)
        self._gather_all_params()
        for g, ig in zip(self._template.param_groups, self._inner.param_groups):
            for k in self.rule.group_keys:
                g[k] = ig[k]
        return out

    def _hyper_repr(self):
        return [sorted((k, repr(v)) for k, v in self._hyper_of(g).items())
                for g in self._template.param_groups]

    def _hyper_digest(self):
        return _digest(self._hyper_repr())

    # ------------------------------------------------------------------ groups
    @property
    def param_groups(self):
        """The groups of the full parameters, as for the plain class.  Edit
        hyperparameters between steps identically on every rank (a scheduler
        does); a difference between ranks is an error at the next step."""
        return self._template.param_groups

    @property
    def defaults(self):
        return self._template.defaults

    @property
    def backend(self):
        return self._template.backend

    @property
    def sparse_mode(self):
        return self._template.sparse_mode

    @property
    def timeout(self):
        """Seconds a collective call waits for the other ranks to make the same call
        before it raises :class:`DistributedError` (default ``DEFAULT_TIMEOUT`` = 1800;
        None: forever).  It bounds the wait at the start of each call (the agreement),
        not the data transfers after it.  Each rank may set its own; after a timeout
        the optimizer cannot be used any more."""
        return self._timeout

    @timeout.setter
    def timeout(self, value):
        if value is not None:
            value = _limit("timeout", value)
            if value == 0.0:
                raise ValueError("Invalid timeout: 0 (seconds > 0, or None to wait forever)")
        self._timeout = value

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._size

    @property
    def comm(self):
        """This optimizer's (duplicated) communicator."""
        return self._comm

    def shard_rows(self, i):
        """``(first, stop)``: the rows of parameter ``i`` this rank owns."""
        b = self._bounds[i]
        return int(b[self._rank]), int(b[self._rank + 1])

    def _check_group_structure(self):
        """Groups appended to (or removed from) ``param_groups``, or ``params`` lists
        that changed length: refused with what to do instead (the plain class's
        check would only say 'use add_param_group')."""
        groups = self._template.param_groups
        if len(groups) != len(self._inner.param_groups):
            raise ValueError(
                f"param_groups has {len(groups)} groups, this ShardedOptimizer has "
                f"{len(self._inner.param_groups)}: groups must not be appended to or removed "
                "from param_groups directly; take the edit back (param_groups.pop()) and "
                "call opt.add_param_group(group) on every rank (collective)")
        for gi, (g, ig) in enumerate(zip(groups, self._inner.param_groups)):
            ps = g.get("params") if isinstance(g, dict) else None
            if not isinstance(ps, list) or len(ps) != len(ig["params"]):
                raise ValueError(
                    f"the 'params' list of param group {gi} changed length: parameters "
                    "cannot be added to or removed from a group; add a group with "
                    "opt.add_param_group(group) on every rank (collective), or build a new "
                    "ShardedOptimizer")

    def add_param_group(self, group):
        """Collective: add a param group ``{"params": [...], **hyperparameters}`` as the
        plain class's ``add_param_group`` does (hyperparameters not given take the
        defaults; other keys are kept).  Every rank passes its replica of the same
        group (same shapes, dtypes and hyperparameters).  The new parameters are cut
        by rows among themselves, so each rank owns about ``1/N`` of them and the
        existing shards (and their state) do not move; they are stepped like the
        others, bit for bit as one process whose optimizer had the group added at the
        same point.  Everything is checked on every rank before anything changes on
        any rank (a bad group on one rank: its own error there,
        :class:`DistributedError` elsewhere).  Not possible when the parameters were
        given as a dict of names."""
        with self._lock:
            err, sig = None, None
            try:
                sig = self._check_new_group(group)
            except Exception as e:
                err = e
            self._agree("add_param_group", err, sig, self._describe_new_group)
            self._add_group(group)

    def _check_new_group(self, group):
        """Validate a group to be added without changing anything (a throwaway
        optimizer of the same class checks it as ``add_param_group`` will); returns
        the group's signature (shapes, dtypes, hyperparameters)."""
        digest = self._sync_groups()
        t = self._template
        if self._names is not None:
            raise ValueError(
                "add_param_group: the parameters were given by name (a dict), and a group "
                "of unnamed parameters cannot join them (gradients and state dicts are "
                "keyed by name); build a new ShardedOptimizer with every parameter")
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        probe = self._cls([group], **{**self._hyper, "backend": t.backend.name})
        refuse_overlaps(self._params + list(probe.params), t.backend)
        g = probe.param_groups[0]
        return ([(p.shape, p.dtype.str) for p in probe.params],
                sorted((k, repr(v)) for k, v in g.items() if k != "params"), digest)

    def _describe_new_group(self, sigs):
        (p0, h0, d0) = sigs[0]
        for r, (p, h, d) in enumerate(sigs):
            if (p, h, d) == (p0, h0, d0):
                continue
            if (p, h) == (p0, h0):
                return (f"the hyperparameters (param_groups) on rank {r} differ from rank 0's: "
                        "edit them identically on every rank")
            if len(p) != len(p0):
                return f"the group has {len(p)} parameters on rank {r}, {len(p0)} on rank 0"
            for k, (x, y) in enumerate(zip(p0, p)):
                if x != y:
                    return (f"parameter {k} of the group has shape {y[0]} and dtype "
                            f"{np.dtype(y[1])} on rank {r} but shape {x[0]} and dtype "
                            f"{np.dtype(x[1])} on rank 0")
            return (f"the group's hyperparameters differ: "
                    f"{', '.join(f'{k}={v}' for k, v in sorted(set(h) - set(h0)))} on rank {r}, "
                    f"{', '.join(f'{k}={v}' for k, v in sorted(set(h0) - set(h)))} on rank 0")
        return "the ranks' groups differ"

    def _add_group(self, group):
        """Add a checked and agreed group: to the full (template) optimizer, and its
        pieces to the inner optimizer; grow the buffers if needed."""
        t = self._template
        n0 = len(self._params)
        t.add_param_group(group)
        new = list(t.params[n0:])
        me = self._rank
        gran = self._granules(n0)
        self._blocked.extend(gran)
        bounds = self._cut(new, gran)
        pieces = [_piece(p, int(b[me]), int(b[me + 1])) for p, b in zip(new, bounds)]
        self._params.extend(new)
        self._bounds.extend(bounds)
        self._widths.extend(_rows_and_width(p)[1] for p in new)
        self._nrows.extend(_rows_and_width(p)[0] for p in new)
        self._pieces.extend(pieces)
        self._pflat.extend(_wire(p.reshape(-1)) for p in new)
        self._inner.add_param_group(self._inner_group(t.param_groups[-1], pieces))
        self._place_pieces(n0)
        self._allocate_buffers()
        self._spec_seen = None
        self._version += 1
        self._consolidated = None

    def _sync_groups(self):
        """Validate edits of param_groups (raises on a bad one, changing nothing) and
        copy new hyperparameters into the inner optimizer."""
        t = self._template
        self._check_group_structure()
        version = t.check_param_groups()
        if any(a is not b for a, b in zip(t.params, self._params)):
            raise ValueError("a parameter array in param_groups was replaced; ShardedOptimizer "
                             "keeps views of the original arrays (update them in place, or "
                             "build a new ShardedOptimizer)")
        if version != self._spec_seen:
            for g, ig in zip(t.param_groups, self._inner.param_groups):
                for k, v in self._hyper_of(g).items():
                    if ig.get(k) is not v:
                        ig[k] = v
            self._spec_digest = self._hyper_digest()
            self._spec_seen = version
        return self._spec_digest

    # -------------------------------------------------------------------- step
    def step(self, local_grads, grad_scale=None, skip_nonfinite=False):
        """One collective update.  ``local_grads``: this rank's gradients, aligned
        with the parameters as for the plain class (list, dict, ``None`` entries,
        dense arrays, :class:`fastopt.RowSparse`, scipy.sparse); the kind (None,
        dense, sparse) of each entry must be the same on every rank.

        The gradients are averaged over the ranks (float64, rank order), clipped to
        ``max_grad_norm`` if set, and applied; every rank ends with the same
        parameters.  ``grad_scale`` divides the gradients inside the update pass.
        Returns True, or False on every rank when ``skip_nonfinite`` found an Inf or
        NaN in the averaged gradient (nothing changed).
        """
        with self._lock:
            return self._step(local_grads, grad_scale, skip_nonfinite)

    def _check_step(self, local_grads, grad_scale, skip_nonfinite):
        digest = self._sync_groups()
        t = self._template
        if t.rule.step_reason is not None:       # schedule-free in eval mode: refused
            for gi, g in enumerate(t.param_groups):   # before any communication
                why = t.rule.step_reason(g)
                if why is not None:
                    raise RuntimeError(f"{t.rule.name}: param group {gi} cannot step: {why}")
        grads = t.align_grads(local_grads)
        if skip_nonfinite not in (True, False):
            raise TypeError(f"skip_nonfinite must be True or False, got {skip_nonfinite!r}")
        gs = fused.check_grad_scale(grad_scale)
        kinds = bytearray(len(grads))
        dense, sparse = {}, {}
        for i, g in enumerate(grads):
            p = self._params[i]
            if g is None:
                continue
            if type(g) is not np.ndarray and is_sparse(g):
                kinds[i] = _SPARSE
                sparse[i] = checked_rows(g, p, f"gradient {i}")
                continue
            kinds[i] = _DENSE
            if isinstance(g, (list, tuple)):
                raise TypeError(f"gradient {i}: expected an array, got {type(g).__name__}")
            a = g if isinstance(g, np.ndarray) else np.asarray(g)
            if a.dtype.kind != "f" and not storage.is_bf16(a.dtype):
                raise TypeError(f"gradient {i}: gradient dtype {a.dtype} is not a float dtype")
            if a.shape != p.shape:
                raise ValueError(f"gradient {i}: gradient shape {a.shape} does not match "
                                 f"parameter shape {p.shape}")
            dense[i] = a
        bk = t.backend
        if gs is not None:
            bk.require("grad_scale", "step(grad_scale=...)")
            fused.check_grad_scale_dtypes(gs, {storage.compute_dtype(self._params[i].dtype)
                                               for i in list(dense) + list(sparse)})
        if skip_nonfinite:
            bk.require("skip_nonfinite", "step(skip_nonfinite=True)")
        if any(g > 1 for g in self._blocked):
            self._check_blocked(dense, sparse)
        return dense, sparse, bytes(kinds), (bytes(kinds), digest, gs, skip_nonfinite)

    def _check_blocked(self, dense, sparse):
        """What the plain class refuses before its kernels run, refused here before the
        agreement (the inner optimizers would refuse it after, on some ranks only): a
        row-by-row step (a sparse gradient, ``max_norm``) of a 1-D parameter with
        8-bit state, whose blocks hold consecutive elements."""
        k = 0
        for g in self._template.param_groups:
            for _ in g["params"]:
                if self._blocked[k] > 1:
                    what = "a row-sparse gradient" if k in sparse else \
                        "max_norm" if k in dense and g.get("max_norm") is not None else None
                    if what is not None:
                        raise ValueError(
                            f"parameter {k}: {what} updates a 1-D parameter element by "
                            f"element, but its 8-bit state is quantized in blocks of "
                            f"{storage.Q8_BLOCK} elements; use state_bits=16 (or 32) for it "
                            "(a param group of its own)")
                k += 1

    def _describe_step(self, extras):
        k0, d0, g0, s0 = extras[0]
        for r, (k, d, g, s) in enumerate(extras):
            if k != k0:
                if len(k) != len(k0):
                    return f"rank {r} passed {len(k)} gradients, rank 0 passed {len(k0)}"
                i = next(j for j in range(len(k)) if k[j] != k0[j])
                return (f"gradient {i} is {_KIND_NAMES[k[i]]} on rank {r} but "
                        f"{_KIND_NAMES[k0[i]]} on rank 0 (every rank must pass the same kind "
                        "of gradient for a parameter, None included)")
            if d != d0:
                # every rank takes this branch (they all see the same signatures)
                hyper = self._allgather_object(self._hyper_repr(), "step")
                detail = ""
                for gi, (x, y) in enumerate(zip(hyper[0], hyper[r])):
                    if x != y:
                        detail = (f" (group {gi}: "
                                  f"{', '.join(f'{k}={v}' for k, v in sorted(set(y) - set(x)))}"
                                  f" on rank {r}, "
                                  f"{', '.join(f'{k}={v}' for k, v in sorted(set(x) - set(y)))}"
                                  " on rank 0)")
                        break
                return (f"the hyperparameters (param_groups) on rank {r} differ from rank 0's"
                        f"{detail}: edit them identically on every rank")
            if g != g0:
                return f"grad_scale is {g!r} on rank {r} but {g0!r} on rank 0"
            if s != s0:
                return f"skip_nonfinite is {s!r} on rank {r} but {s0!r} on rank 0"
        return "the ranks' arguments differ"

    def _step(self, local_grads, grad_scale, skip_nonfinite):
        t0 = time.perf_counter()
        err, extra, dense, sparse, kinds = None, None, {}, {}, b""
        try:
            dense, sparse, kinds, extra = self._check_step(local_grads, grad_scale,
                                                           skip_nonfinite)
        except Exception as e:
            err = e
        self._agree("step", err, extra, self._describe_step)
        gs = extra[2]
        st = self.stats
        st["check_s"] += time.perf_counter() - t0
        active = tuple(i for i, k in enumerate(kinds) if k == _DENSE)
        sparse_i = [i for i, k in enumerate(kinds) if k == _SPARSE]
        plan, views = None, {}
        if active:
            plan = self._plans.get(active)
            if plan is None:
                plan = self._plans[active] = _DensePlan(
                    self, active, self._bucket_bytes // 2 if self._overlap else None)
            if self._overlap and self._size > 1 and not sparse_i and not skip_nonfinite \
                    and self._max_grad_norm is None and not self.rule.per_tensor:
                self._step_overlapped(plan, dense, gs)
                self._version += 1
                st["steps"] += 1
                st["step_s"] += time.perf_counter() - t0
                return True
            views = self._reduce_scatter(plan, dense)
        rows = self._exchange_rows(sparse_i, sparse) if sparse_i else {}
        # the global decisions: non-finite values, the gradient norm, touched rows
        t1 = time.perf_counter()
        clip = self._max_grad_norm is not None
        touched = {}
        if sparse_i or skip_nonfinite or clip:
            arrays = [views[i] for i in active] + \
                [v for _, v in rows.values() if v.size]
            vec = np.zeros(2 + len(sparse_i), dtype=np.float64)
            if skip_nonfinite:
                vec[0] = 1.0 if self.backend.all_finite(arrays, gs) else 0.0
            if clip:
                vec[1] = self._partial_norm(arrays)
            vec[2:] = [rows[i][0].shape[0] for i in sparse_i]
            allv = np.empty((self._size, vec.size), dtype=np.float64)
            self._comm.Allgather(vec, allv)
            st["bytes_received"] += (self._size - 1) * vec.nbytes
            st["bytes_sent"] += (self._size - 1) * vec.nbytes
            if skip_nonfinite and not allv[:, 0].all():
                st["comm_s"] += time.perf_counter() - t1
                return False
            if clip:
                self._clip(allv[:, 1], arrays, gs)
            for s, i in enumerate(sparse_i):
                touched[i] = allv[:, 2 + s].astype(np.int64)
        st["comm_s"] += time.perf_counter() - t1
        # the update of this rank's shard
        t2 = time.perf_counter()
        glist = [None] * len(self._params)
        if plan is not None:
            for i in active:
                glist[i] = views[i]
        for i in sparse_i:
            uniq, vals = rows[i]
            if uniq.shape[0]:
                r0 = int(self._bounds[i][self._rank])
                glist[i] = RowSparse(uniq - r0, vals.reshape((uniq.shape[0],)
                                                             + self._params[i].shape[1:]))
            else:
                # no row of this piece (other ranks own the touched rows, or the
                # gradient is empty on every rank): the empty gradient, a step that
                # touches no row, as the plain class counts it -- state allocated, step
                # count and host scalars advanced, exact mode's rows one step behind --
                # so the pieces stay in step with each other
                glist[i] = RowSparse(np.zeros(0, np.int64),
                                     np.zeros((0,) + self._params[i].shape[1:],
                                              dtype=_grad_dtype(self._params[i].dtype)))
        if any(g is not None for g in glist):
            self._inner.step(glist, grad_scale=gs)
        st["update_s"] += time.perf_counter() - t2
        # every rank gets the updated parameters
        if plan is not None and self._size > 1:
            self._all_gather(plan)
        for i in sparse_i:
            if touched[i].sum() > 0 and self._size > 1:
                self._gather_rows(i, rows[i][0], touched[i])
        self._version += 1
        st["steps"] += 1
        st["step_s"] += time.perf_counter() - t0
        return True

    def _step_overlapped(self, plan, dense, gs):
        """The dense step with its update split by bucket (``overlap``; no global
        decision between the average and the update): after bucket ``k`` of the
        reduce-scatter is averaged (bucket ``k + 1`` already in flight), the inner
        optimizer steps this rank's parameters whose rows it completed, and the
        all-gather of every rank's parameters completed in bucket ``k`` starts
        (non-blocking, tested while later buckets are averaged); the parameters
        without rows here step with the last bucket's, and the all-gathers are
        waited for at the end.  Every parameter steps once, on its own rows, as in
        the blocking step: the same bits (the update is element- or row-wise, and
        a factored or matrix rule's tensors are whole on their owner)."""
        st, n = self.stats, len(self._params)
        views, gathers = {}, []

        def update(idxs):
            if idxs:
                glist = [None] * n
                for i in idxs:
                    glist[i] = views[i]
                t = time.perf_counter()
                self._inner.step(glist, grad_scale=gs)
                st["update_s"] += time.perf_counter() - t

        # the parameters without rows here step with the last bucket's (one inner
        # call fewer; with one bucket the inner step is then a step of every
        # parameter, which keeps its cached plan)
        rest = [i for dp in plan.parts for i in dp.rest_mine]
        last = [(id(dp), dp.nbuckets - 1) for dp in plan.parts if dp.nbuckets][-1:]
        pieces = self._reduce_scatter_pieces(plan, dense, views, gathers)
        try:
            for dp, k in pieces:
                if [(id(dp), k)] == last:
                    update(dp.ready_mine[k] + rest)
                    rest = []
                else:
                    update(dp.ready_mine[k])
                gathers.append(self._gather_piece(dp, k))
            update(rest)
        finally:
            pieces.close()
            t = time.perf_counter()
            self._MPI.Request.Waitall(gathers)
            st["comm_s"] += time.perf_counter() - t

    # ---------------------------------------------------------------- state
    @property
    def state(self):
        """This rank's shard of the state: {param index: {"step": int, name: array
        of the rows this rank owns, ...}} (the inner optimizer's state)."""
        return self._inner.state

    def state_bytes(self):
        """Bytes of optimizer state held by this rank."""
        return int(sum(v.nbytes for st in self._inner.state.values() for v in st.values()
                       if isinstance(v, np.ndarray)))

    def buffer_bytes(self):
        """Bytes of this rank's gradient shard and sparse scratch buffers (kept between
        steps; the reduce-scatter's receive buffer lives for one step)."""
        return int(sum(b.nbytes for b in self._shard.values())
                   + sum(b.nbytes for b in self._scratch.values()))

    def reset_stats(self):
        """Zero the cumulative counters of :attr:`stats`."""
        self.stats = {"steps": 0, "step_s": 0.0, "check_s": 0.0, "pack_s": 0.0,
                      "comm_s": 0.0, "reduce_s": 0.0, "update_s": 0.0, "sparse_s": 0.0,
                      "bytes_sent": 0, "bytes_received": 0}

    def flush(self):
        """Exact sparse mode: bring every row up to date (see
        :meth:`fastopt.Optimizer.flush`) on every rank.  Collective."""
        with self._lock:
            self._agree("flush", None, None)
            if self.sparse_mode == "exact":
                self._inner.flush()
                self._gather_all_params()
                self._version += 1

    def close(self):
        """Collective: free this optimizer's communicator (a duplicate of ``comm``).
        The optimizer cannot be used afterwards."""
        with self._lock:
            self._agree("close", None, None)
            self._free_plans()
            self._comm.Free()
            self._broken = "it was closed"

    def __repr__(self):
        lines = [f"ShardedOptimizer({self.rule.name}, backend={self.backend.name}, "
                 f"rank {self._rank} of {self._size}, state {self.state_bytes()} bytes here)"]
        for gi, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v!r}" for k, v in g.items() if k != "params")
            lines.append(f"  group {gi}: {len(g['params'])} params, {hyper}")
        return "\n".join(lines)
