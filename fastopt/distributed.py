"""Optimizer state sharded over MPI ranks (ZeRO style), dense and row-sparse.

Usage (``mpiexec -n 4 python train.py``)::

    import fastopt
    from fastopt.distributed import ShardedOptimizer

    opt = ShardedOptimizer(fastopt.Adam, params, lr=1e-3)    # comm=MPI.COMM_WORLD
    for batch in my_part_of_the_data:
        opt.step(local_grads(batch))     # averaged over the ranks; every rank ends
                                         # with the same parameters

Every rank holds the whole parameters (its model replica) and passes its own
gradients for them; each rank keeps the optimizer state of only its *shard* of the
parameters, updates that shard with the ordinary fastopt kernels (any rule, CPU
backend, fused option, sparse mode), and the updated shards are all-gathered.  The
result is the result of one process stepping the plain optimizer on the averaged
gradients (bit for bit, see "Determinism").  ``mpi4py`` is imported on first use:
``import fastopt`` and ``import fastopt.distributed`` do not import it (install
``fastopt[mpi]`` for mpi4py and MPICH).

Sharding scheme
---------------
Parameters are split by **rows** (the first axis; a 1-D parameter's rows are its
elements, a 0-d parameter is one row).  Per dtype, the parameters' rows are laid end
to end in a virtual flat space (in parameter order) and cut into one contiguous range
per rank, with the cuts at the row boundaries nearest to ``total * r / N`` elements:
rank ``r`` owns rows ``[bounds[r], bounds[r + 1])`` of every parameter (``shard_rows``).
Its *inner optimizer* is an ordinary fastopt optimizer of the same class and groups
whose parameters are the views ``param[bounds[r]:bounds[r + 1]]`` (possibly empty), one
per parameter, so parameter ``i`` keeps index ``i``.  Whole rows keep every rule and
option correct without special cases: element-wise rules do not care, ``RowWiseAdagrad``
and ``max_norm`` need whole rows, and a row-sparse gradient is cut by row ownership.
The price is balance: the ranks' shares differ by at most the largest row (a
parameter of shape ``(1, n)`` cannot be split; pass it as 1-D for that).

A dense step: the local gradients are copied into fixed buckets of at most
``bucket_bytes`` (default 32 MiB; each bucket holds ``bucket_bytes / N`` bytes of
every rank's range), exchanged with ``Alltoallv`` and summed (the reduce-scatter),
the rank steps its shard, then the updated shards are all-gathered bucket by bucket
(``Allgatherv``) into every rank's parameters.  The send and receive buffers are
allocated once and reused; so is the gradient shard (``1/N`` of the gradient bytes).
Each rank receives ``2 (N - 1) / N`` times the stepped parameters' bytes per step.

A row-sparse step (:class:`fastopt.RowSparse`, scipy.sparse): each rank sends its
gradient rows (indices and values, never densified) to the rows' owners
(``Alltoallv``); the owner coalesces duplicates, averages, steps its rows lazily (or
in exact mode), and the updated rows (only those) are all-gathered as (index, row)
pairs.  A parameter whose rows some rank does not own in this step still advances its
step count on that rank, as in the single process.

Determinism
-----------
MPI does not promise a reduction order for ``Reduce_scatter``/``Allreduce`` (MPICH
picks algorithms by message size and world size), so the sum is done here: each rank
receives the pieces of its range from every rank (``Alltoallv``) and adds them **in
rank order, in float64**, then divides by ``N`` and rounds once to the gradient dtype
(the parameter's; **float32 for bfloat16 parameters**, whose local gradients, bfloat16
or float32 or another float dtype, are first converted to float32, as the single
process converts them).  Sparse rows are coalesced in (rank, position) order, also in
float64.  So the averaged gradient is ``((g_0 + g_1) + ... + g_{N-1}) / N`` computed
in float64, independent of thread counts and bucket sizes; the update kernels are
element- or row-wise, hence a sharded step equals the single-process step on that
averaged gradient bit for bit.  (Gradient-norm clipping adds the ranks' partial sums of squares
in rank order, so its norm can differ from :func:`fastopt.clip_grad_norm_`'s in the
last bits.)

Gradient clipping and skipping
------------------------------
``max_grad_norm`` (and ``norm_type``) at construction clip the *averaged* gradient to
that total norm over all parameters and ranks before the update (torch's coefficient
``min(max_norm / (norm + 1e-6), 1)``); ``last_grad_norm`` holds the norm of the last
step.  ``step(..., skip_nonfinite=True)``: an Inf/NaN in the averaged gradient (and so
on any rank) skips the step on every rank, and every rank returns False.

Checkpoints
-----------
``consolidated_state_dict(to=0)`` is collective and returns, on rank ``to``, exactly
the ``state_dict()`` of the plain optimizer class (None elsewhere); afterwards
``state_dict()`` on that rank returns it, so ``fastopt.save(path, opt)`` works there.
``load_state_dict(full)`` (and ``fastopt.load``) on every rank re-shards a full state
dict, from any world size::

    opt.consolidated_state_dict(to=0)
    if comm.rank == 0:
        fastopt.save("ckpt.npz", opt)
    comm.Barrier()
    fastopt.load("ckpt.npz", opt)        # every rank, any world size

Bad use
-------
Every collective call (construction, ``step``, ``consolidated_state_dict``,
``load_state_dict``, ``flush``) starts with an allgather of a small signature: the
call, a call counter, the gradient kinds, a digest of the hyperparameters, and any
error this rank found while checking its own input.  Different parameter shapes or
dtypes, a rank that made another call (a rank that missed a step and went on to
checkpoint), gradients of different kinds, edits of ``param_groups`` on some ranks
only, or an invalid gradient on one rank raise on *every* rank (the rank with the
bad input raises its own error, the others :class:`DistributedError`) before
anything is changed.  ``load_state_dict`` also agrees on a digest of what each rank
would load (every array, step count, host scalar and group value): ranks given
different checkpoints (a stale copy on one node) all raise
:class:`StateDictMismatchError` (a ``ValueError``) and load nothing.  A rank that
stops calling altogether leaves the others waiting for at most ``timeout`` seconds
(default ``DEFAULT_TIMEOUT``, 1800 s, sleeping between polls; None: forever): then
they raise :class:`DistributedError` (and the optimizer is unusable; end the job).
Run scripts with ``mpiexec -n N python -m mpi4py script.py`` so that an uncaught
exception on one rank aborts the whole job at once.

Groups are added with :meth:`ShardedOptimizer.add_param_group` (collective; the new
parameters are cut by rows among themselves).

Storage formats
---------------
bfloat16 parameters (every ``bf16_update``: split, kahan, stochastic, nearest; ``seed``)
and ``state_bits`` 16 and 8 (also per param group) give the single process's result
bit for bit.  Each piece is declared to the inner optimizer as rows of its parameter
(:meth:`fastopt.Optimizer.set_row_range`): its storage format is chosen for the whole
parameter (8-bit state or float32 by the whole parameter's size, as one process
chooses), and stochastic rounding draws the whole parameter's random stream (the
kernels of every backend add the piece's element base to the element index).  A
1-D parameter with 8-bit state is cut at multiples of ``storage.Q8_BLOCK`` elements,
so its quantization blocks are the whole parameter's (2-D blocks lie within rows).
bfloat16 parameters travel as their 16-bit patterns in the all-gather; their averaged
gradients are float32 (4 bytes per element in the reduce-scatter).  The consolidated
state dict holds the whole parameter's arrays, 8-bit scales (``<slot>_absmax``) and
``master_low``/``kahan_comp`` included, and loads into the plain class.
"""

import hashlib
import math
import numbers
import os
import threading
import time

import numpy as np

from . import state_io, storage
from ._jit import njit, prange, register_jitable
from .backends.base import may_use_threads
from .clip import _array_norm, _limit, _norm_type
from .optimizer import Optimizer
from .optimizers import CLASSES
from .param_groups import refuse_overlaps
from .rules import fused
from .sparse import RowSparse, checked_rows, coalesce_plan, is_sparse

__all__ = ["ShardedOptimizer", "DistributedError", "StateDictMismatchError",
           "DEFAULT_BUCKET_BYTES", "DEFAULT_TIMEOUT"]

#: default size of one communication bucket
DEFAULT_BUCKET_BYTES = 32 << 20
#: default seconds a collective call waits for the other ranks to make the same call
#: (torch.distributed's default process-group timeout); None waits forever
DEFAULT_TIMEOUT = 1800.0
#: seconds a waiting rank polls without sleeping before it backs off to short sleeps
_SPIN_S = 2e-3
#: chunk of a state array hashed as one piece (load_state_dict's agreement)
_HASH_CHUNK = 16 << 20
#: elements at which the averaging kernel uses threads
_PARALLEL_MIN = 1 << 16
#: largest point-to-point message when consolidating state (bytes)
_CHUNK_BYTES = 1 << 28

_NONE, _DENSE, _SPARSE = 0, 1, 2
_KIND_NAMES = {_NONE: "None", _DENSE: "dense", _SPARSE: "sparse"}


class DistributedError(RuntimeError):
    """Raised on every rank when the ranks disagree (shapes, calls, gradient kinds,
    hyperparameters) or when another rank's input was invalid; nothing was changed."""


class StateDictMismatchError(DistributedError, ValueError):
    """Raised on every rank by :meth:`ShardedOptimizer.load_state_dict` when the ranks
    were given different state dicts (arrays, step counts or hyperparameters): a
    ``ValueError`` as well as a :class:`DistributedError`; nothing was changed."""


# --------------------------------------------------------------------- kernels

def _make_mean_of_pieces(parallel):
    """:func:`_mean_of_pieces_body`, parallel or serial: a closure over ``PARALLEL``,
    whose cell is part of Numba's cache key, so the two builds never share a cache
    entry (see ``fastopt.clip._make_block_sums``); compiled on first call."""
    PARALLEL = bool(parallel)

    def mean_of_pieces(recv, nranks, count, out):
        par = PARALLEL  # noqa: F841  (in the cache key)
        _mean_of_pieces_body(recv, nranks, count, out)
    return njit(parallel=PARALLEL, cache=True, nogil=True)(mean_of_pieces)


@register_jitable(inline="always")
def _mean_of_pieces_body(recv, nranks, count, out):
    """``out[j] = (recv[j] + recv[count + j] + ...) / nranks``: the ``nranks``
    pieces of ``count`` elements added in rank order in float64, divided once and
    rounded once to ``out``'s dtype.  Blocks of 4096 elements with a float64
    accumulator, so that the loops over elements vectorize; every element is
    computed the same way whatever the blocks and threads."""
    B = 4096
    nb = (count + B - 1) // B
    for b in prange(nb):
        lo = b * B
        n = min(B, count - lo)
        acc = np.empty(B, dtype=np.float64)
        src = recv[lo:lo + n]
        for j in range(n):
            acc[j] = src[j]
        for r in range(1, nranks):
            src = recv[r * count + lo:r * count + lo + n]
            for j in range(n):
                acc[j] += src[j]
        dst = out[lo:lo + n]
        for j in range(n):
            dst[j] = acc[j] / nranks


_mean_parallel = _make_mean_of_pieces(True)
_mean_serial = _make_mean_of_pieces(False)


@njit(cache=True, nogil=True)
def _coalesced_mean(vals, order, seg, nranks, out):
    """Row ``u`` of ``out``: the rows ``vals[order[seg[u]:seg[u + 1]]]`` added in that
    order in float64, divided by ``nranks``."""
    D = vals.shape[1]
    for u in range(seg.shape[0] - 1):
        lo = seg[u]
        hi = seg[u + 1]
        for j in range(D):
            s = np.float64(vals[order[lo], j])
            for k in range(lo + 1, hi):
                s += np.float64(vals[order[k], j])
            out[u, j] = s / nranks


def _mean_of_pieces(recv, nranks, count, out):
    if count >= _PARALLEL_MIN and may_use_threads():
        _mean_parallel(recv, nranks, count, out)
    else:
        _mean_serial(recv, nranks, count, out)


# ---------------------------------------------------------------------- layout

def _rows_and_width(p):
    """(rows, elements per row) of a parameter: 0-d is one row of one element."""
    if p.ndim == 0:
        return 1, 1
    return p.shape[0], int(np.prod(p.shape[1:], dtype=np.int64))


def _row_bounds(params, nranks, granules=None):
    """Per parameter, int64 (nranks + 1,): the first row of each rank's piece.

    Per dtype, the parameters' elements are laid end to end; the cut before rank
    ``r`` is at the row boundary nearest to ``total * r // nranks``, and in a
    parameter with a granule ``g`` (``granules[i]``, default 1) at a multiple of
    ``g`` rows (or its end): a 1-D parameter with 8-bit state is cut at its
    quantization blocks.  Parameters without elements (shape (k, 0)) belong to
    rank 0."""
    bounds = [None] * len(params)
    by_dtype = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype.str, []).append(i)
    for idxs in by_dtype.values():
        gran = [1 if granules is None else int(granules[i]) for i in idxs]
        shapes = [_rows_and_width(params[i]) for i in idxs]
        sizes = [n * d for n, d in shapes]
        offs = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        total = int(offs[-1])
        cuts = [0] * (nranks + 1)
        cuts[nranks] = total
        for r in range(1, nranks):
            t = total * r // nranks
            k = int(np.searchsorted(offs, t, side="right")) - 1
            while k < len(idxs) and sizes[k] == 0:
                k += 1
            if k >= len(idxs):
                cuts[r] = total
                continue
            nrows, width = shapes[k]
            g = gran[k]
            unit = width * g
            units = -(-nrows // g)
            u = min(max((t - int(offs[k]) + unit // 2) // unit, 0), units)
            cuts[r] = int(offs[k]) + min(u * g, nrows) * width
        for r in range(1, nranks + 1):          # monotone (rounding cannot reorder)
            cuts[r] = max(cuts[r], cuts[r - 1])
        for k, i in enumerate(idxs):
            nrows, width = shapes[k]
            b = np.zeros(nranks + 1, dtype=np.int64)
            if width == 0:
                b[1:] = nrows
            else:
                for r in range(nranks + 1):
                    b[r] = min(max((cuts[r] - int(offs[k])) // width, 0), nrows)
            bounds[i] = b
    return bounds


def _grad_dtype(dtype):
    """The dtype gradients of a parameter of ``dtype`` are averaged and stepped in:
    float32 for bfloat16 parameters, else the parameter's dtype."""
    return np.dtype(np.float32) if storage.is_bf16(dtype) else np.dtype(dtype)


def _wire_dtype(dtype):
    """The element dtype a parameter or state array of ``dtype`` travels as
    (bfloat16: its uint16 bits)."""
    return np.dtype(np.uint16) if storage.is_bf16(dtype) else np.dtype(dtype)


def _wire(a):
    """``a`` viewed with its wire dtype (bfloat16 -> uint16)."""
    return a.view(np.uint16) if storage.is_bf16(a.dtype) else a


def _dtype_token(dt):
    """A picklable name of a dtype that keeps bfloat16 (whose ``str`` is ``'<V2'``)."""
    return "bfloat16" if storage.is_bf16(dt) else np.dtype(dt).str


def _dtype_of(token):
    return storage.bf16() if token == "bfloat16" else np.dtype(token)


def _piece(p, r0, r1):
    """The view of rows [r0, r1) of ``p`` (a 0-d parameter: itself, or an empty 1-D
    view)."""
    if p.ndim == 0:
        return p if r1 > r0 else p.reshape(1)[0:0]
    return p[r0:r1]


class _DtypePlan:
    """The buckets of one dtype for one set of dense parameters."""

    def __init__(self, dtype, idxs, bounds, widths, nranks, me, bucket_bytes):
        self.dtype = dtype
        self.gdtype = _grad_dtype(dtype)        # the averaged gradients (reduce-scatter)
        self.pdtype = _wire_dtype(dtype)        # the parameters (all-gather)
        self.idxs = idxs
        item = self.gdtype.itemsize
        segs = []                   # per rank: [(param, first element, count, offset)]
        lengths = []
        for r in range(nranks):
            out, off = [], 0
            for i in idxs:
                b = bounds[i]
                n = int(b[r + 1] - b[r]) * widths[i]
                if n:
                    out.append((i, int(b[r]) * widths[i], n, off))
                    off += n
            segs.append(out)
            lengths.append(off)
        self.lengths = lengths
        self.length_me = lengths[me]
        longest = max(lengths) if lengths else 0
        per_rank = max(1, bucket_bytes // item // nranks)
        self.b = b_ = min(per_rank, longest) if longest else 0
        self.nbuckets = -(-longest // b_) if b_ else 0
        # shard offsets of my pieces (the gradient views)
        self.my_offsets = {}
        off = 0
        for i in idxs:
            b = bounds[i]
            self.my_offsets[i] = off
            off += int(b[me + 1] - b[me]) * widths[i]
        self.counts, self.displs = [], []
        self.pack, self.mine, self.unpack = [], [], []
        for k in range(self.nbuckets):
            lo = k * b_
            counts = [max(0, min(b_, L - lo)) for L in lengths]
            displs = [0] * nranks
            for r in range(1, nranks):
                displs[r] = displs[r - 1] + counts[r - 1]
            self.counts.append(counts)
            self.displs.append(displs)
            pack, unpack = [], []
            for r in range(nranks):
                for i, first, pos, n in _window(segs[r], lo, lo + counts[r]):
                    pack.append((i, first, displs[r] + pos, n))
                    if r == me:
                        continue
                    unpack.append((i, first, displs[r] + pos, n))
            self.pack.append(pack)
            self.unpack.append(unpack)
            self.mine.append(list(_window(segs[me], lo, lo + counts[me])))
        self.bytes_needed = nranks * b_ * item


def _window(segs, lo, hi):
    """The parts of the segments ``(param, first, count, offset)`` that fall in the
    offsets [lo, hi): ``(param, first element, position - lo, count)``."""
    for i, first, n, off in segs:
        a = max(lo, off)
        z = min(hi, off + n)
        if a < z:
            yield i, first + (a - off), a - lo, z - a


def _by_dtype(params, idxs):
    """{dtype key: (dtype, [indices])} in order of first appearance."""
    out = {}
    for i in idxs:
        dt = params[i].dtype
        out.setdefault(dt.str, (dt, []))[1].append(i)
    return out


class _DensePlan:
    def __init__(self, opt, active):
        self.parts = [_DtypePlan(dt, idxs, opt._bounds, opt._widths, opt._size, opt._rank,
                                 opt._bucket_bytes)
                      for dt, idxs in _by_dtype(opt._params, active).values()]
        self.views = {}
        for dp in self.parts:
            shard = opt._shard[dp.dtype.str]
            if shard.size < dp.length_me:       # one rank, no clipping: not needed
                continue
            for i in dp.idxs:
                piece = opt._pieces[i]
                off = dp.my_offsets[i]
                self.views[i] = shard[off:off + piece.size].reshape(piece.shape)


def _digest(obj):
    return hashlib.blake2b(repr(obj).encode(), digest_size=16).hexdigest()


def _array_digests(arrays):
    """A blake2b digest (hex, 16 bytes) of each array's dtype, shape and bytes.

    An array is hashed in chunks of ``_HASH_CHUNK`` bytes whose digests are hashed
    in order, so the result does not depend on the number of threads; large inputs
    are hashed by ``NUMBA_NUM_THREADS`` threads (hashlib releases the GIL)."""
    flat = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    chunks = [(k, f[lo:lo + _HASH_CHUNK]) for k, f in enumerate(flat)
              for lo in range(0, f.size, _HASH_CHUNK)]

    def one(chunk):
        return hashlib.blake2b(chunk[1], digest_size=16).digest()

    threads = 1
    if may_use_threads() and sum(f.size for f in flat) >= 4 * _HASH_CHUNK:
        from numba import config
        threads = max(1, min(int(config.NUMBA_NUM_THREADS), len(chunks)))
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(one, chunks))
    else:
        parts = [one(c) for c in chunks]
    out = [hashlib.blake2b(repr((np.asarray(a).dtype.str, np.shape(a))).encode(),
                           digest_size=16) for a in arrays]
    for (k, _), d in zip(chunks, parts):
        out[k].update(d)
    return [h.hexdigest() for h in out]


def _loaded_digests(state, groups):
    """What a rank is about to load, in a fixed order: per state entry
    ``(param, name, digest of the array or repr of the value)`` and per group the
    repr of its values (every key but ``params``, extras such as a scheduler's
    ``initial_lr`` included).  Returns ``(entries, groups, summary)`` where
    ``summary`` is ``(arrays digest, scalars digest, groups digest)``."""
    keys = [(i, k) for i in sorted(state) for k in sorted(state[i])]
    arrays = [(i, k) for i, k in keys if isinstance(state[i][k], np.ndarray)]
    digests = dict(zip(arrays, _array_digests([state[i][k] for i, k in arrays])))
    entries = [(i, k, "array", digests[(i, k)]) if (i, k) in digests else
               (i, k, type(state[i][k]).__name__, repr(state[i][k])) for i, k in keys]
    hyper = [sorted((k, type(v).__name__, repr(v)) for k, v in g.items() if k != "params")
             for g in groups]
    summary = (_digest([e for e in entries if e[2] == "array"]),
               _digest([e for e in entries if e[2] != "array"]),
               _digest(hyper))
    return entries, hyper, summary


# ----------------------------------------------------------------- the class

class ShardedOptimizer:
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
        bucket_bytes: size of one communication bucket (default 32 MiB).  The send
            and receive buffers are at most this size each, allocated once.
        max_grad_norm: clip the averaged gradient to this total norm (over all
            parameters and ranks) before each update; None (default): no clipping.
        norm_type: the norm of ``max_grad_norm`` (2, 1, ..., or ``inf``).
        timeout: seconds each collective call waits for the other ranks to make the
            same call before raising :class:`DistributedError` (default
            ``DEFAULT_TIMEOUT``, 1800 s; None: wait forever); also the settable
            attribute ``timeout``.
        **hyper: the class's hyperparameters, fused options, ``backend`` (a CPU
            backend) and ``sparse_mode``, as for the class.

    Attributes: ``param_groups`` (the full parameters' groups; edit
    hyperparameters between steps on every rank alike), ``state`` (this rank's
    shard of the state, keyed by parameter index), ``rank``, ``world_size``,
    ``last_grad_norm``, ``stats`` (cumulative timings and bytes).
    """

    def __init__(self, optimizer_class, params, comm=None, *, bucket_bytes=DEFAULT_BUCKET_BYTES,
                 max_grad_norm=None, norm_type=2.0, timeout=DEFAULT_TIMEOUT, **hyper):
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
        self._params = list(t._params)

    def _construction_signature(self):
        t = self._template
        return {"class": self._cls.__name__, "rule": self.rule.name,
                "backend": t.backend.name, "sparse_mode": t.sparse_mode,
                "bucket_bytes": self._bucket_bytes,
                "clip": (self._max_grad_norm, self._norm_type),
                "names": None if t._names is None else [repr(n) for n in t._names],
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
        the whole parameter's (as the single process chooses it)."""
        out, k = [], 0
        for g in self._template.param_groups:
            for p in g["params"]:
                if k >= first:
                    stg = storage.storage_for(self.rule, p, g["state_bits"], g["bf16_update"])
                    out.append(storage.Q8_BLOCK if stg.state == "q8" and p.ndim == 1 else 1)
                k += 1
        return out

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
        self._names = t._names
        self._blocked = self._granules()
        self._bounds = _row_bounds(self._params, self._size, self._blocked)
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
        self._place_pieces()
        self._spec_seen = None
        self._shard = {}
        self._send = self._recv = np.zeros(0, dtype=np.uint8)
        self._allocate_buffers()
        self._scratch = {}
        self._version = 0
        self._consolidated = None
        self.last_grad_norm = None
        self.reset_stats()

    def _allocate_buffers(self):
        """The gradient shard (one per dtype) and the bucket buffers for the current
        parameters, allocated and touched here (at construction, and when a group is
        added: only what has to grow), reused by every step."""
        self._plans = {}
        parts = [_DtypePlan(dt, idxs, self._bounds, self._widths, self._size, self._rank,
                            self._bucket_bytes)
                 for dt, idxs in _by_dtype(self._params, range(len(self._params))).values()]
        # (one rank without clipping steps on the gradients themselves: no buffers)
        alone = self._size == 1
        for dp in parts:
            need = 0 if alone and self._max_grad_norm is None else dp.length_me
            old = self._shard.get(dp.dtype.str)
            if old is None or old.size < need:
                buf = np.empty(need, dtype=dp.gdtype)
                buf.fill(0)
                self._shard[dp.dtype.str] = buf
        nbytes = max([0 if alone else dp.bytes_needed for dp in parts] + [8])
        nbytes = -(-nbytes // 8) * 8
        if self._send.nbytes < nbytes:
            self._send = np.zeros(nbytes, dtype=np.uint8)
            self._recv = np.zeros(nbytes, dtype=np.uint8)
            self._send.fill(0)
            self._recv.fill(0)

    def _hyper_of(self, group):
        return {k: group[k] for k in self.rule.checks if k in group}

    def _hyper_repr(self):
        return [sorted((k, repr(v)) for k, v in self._hyper_of(g).items())
                for g in self._template.param_groups]

    def _hyper_digest(self):
        return _digest(self._hyper_repr())

    # --------------------------------------------------------------- agreement
    def _agree(self, op, err, extra, describe=None, mismatch=DistributedError):
        """The first collective of every call: every rank learns every rank's call,
        call count, signature and error.  Raises on every rank if any rank failed
        or the signatures differ (``mismatch``: the class raised then)."""
        if self._broken is not None:
            raise DistributedError(f"this ShardedOptimizer is unusable: {self._broken}")
        msg = None if err is None else f"{type(err).__name__}: {err}"
        sigs = self._allgather_object((msg, (op, self._calls, extra)), op)
        self._calls += 1
        if err is not None:
            raise err
        for r, (m, _) in enumerate(sigs):
            if m is not None:
                raise DistributedError(f"{op}() failed on rank {r}: {m} (no rank changed "
                                       "anything)")
        calls = [s for _, s in sigs]
        for r, (op_r, n_r, _) in enumerate(calls):
            if op_r != op:
                raise DistributedError(
                    f"rank {r} called {op_r}() while rank {self._rank} called {op}() "
                    f"(collective call #{n_r} vs #{self._calls - 1}): every rank must make "
                    "the same calls in the same order")
            if n_r != calls[0][1]:
                raise DistributedError(
                    f"rank {r} is at collective call #{n_r} but rank 0 is at #{calls[0][1]} "
                    f"(in {op}()): a rank missed or added a step()/state-dict call")
        extras = [s[2] for s in calls]
        if any(e != extras[0] for e in extras):
            why = describe(extras) if describe is not None else "the ranks' arguments differ"
            raise mismatch(f"{op}(): {why}")

    def _allgather_object(self, obj, op):
        """``comm.allgather(obj)``: the sizes by a nonblocking allgather (which gives
        up after ``timeout`` seconds, if one was given), then the pickled objects."""
        import pickle
        MPI = self._MPI
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        mine = np.array([data.size], dtype=np.int64)
        sizes = np.empty(self._size, dtype=np.int64)
        req = self._comm.Iallgather([mine, MPI.INT64_T], [sizes, MPI.INT64_T])
        if self._timeout is None:
            req.Wait()
        else:
            self._wait(req, op, (req, mine, sizes))
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        buf = np.empty(int(sizes.sum()), dtype=np.uint8)
        self._comm.Allgatherv([data, MPI.BYTE], [buf, (sizes, displs), MPI.BYTE])
        return [pickle.loads(buf[int(a):int(a) + int(n)].tobytes())
                for a, n in zip(displs, sizes)]

    def _wait(self, req, op, keep):
        """Wait for ``req`` at most ``timeout`` seconds: poll without sleeping for
        ``_SPIN_S`` (ranks in step arrive close together: no added latency), yielding
        the CPU between polls, then sleep between polls (1 ms at most), so a rank
        waiting for a slow or stopped one does not hold a CPU."""
        start = time.monotonic()
        deadline = start + self._timeout
        spin = start + _SPIN_S
        delay = 1e-5
        yield_cpu = getattr(os, "sched_yield", None)
        while not req.Test():
            now = time.monotonic()
            if now > deadline:
                self._broken = (f"the other ranks did not reach {op}() within timeout="
                                f"{self._timeout:g} s")
                self._pending = keep                    # never freed while in flight
                raise DistributedError(
                    f"{op}(): timed out after {self._timeout:g} s waiting for the other ranks: "
                    "a rank missed this call, stopped calling, raised, or is stuck; this "
                    "optimizer's communicator cannot be used any more (end the job, e.g. "
                    "MPI.COMM_WORLD.Abort(); run the script as 'python -m mpi4py script.py' "
                    "so that an uncaught exception on any rank aborts the job)")
            if now < spin:
                if yield_cpu is not None:
                    yield_cpu()
                continue
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)

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
        refuse_overlaps(self._params + probe._params, t.backend)
        g = probe.param_groups[0]
        return ([(p.shape, p.dtype.str) for p in probe._params],
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
        new = list(t._params[n0:])
        me = self._rank
        gran = self._granules(n0)
        self._blocked.extend(gran)
        bounds = _row_bounds(new, self._size, gran)
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
        t._groups.validated()
        if any(a is not b for a, b in zip(t._params, self._params)):
            raise ValueError("a parameter array in param_groups was replaced; ShardedOptimizer "
                             "keeps views of the original arrays (update them in place, or "
                             "build a new ShardedOptimizer)")
        version = t._groups.spec_version
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
        grads = t._align_grads(local_grads)
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
                plan = self._plans[active] = _DensePlan(self, active)
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
        advance = []
        for i in sparse_i:
            uniq, vals = rows[i]
            if uniq.shape[0]:
                r0 = int(self._bounds[i][self._rank])
                glist[i] = RowSparse(uniq - r0, vals.reshape((uniq.shape[0],)
                                                             + self._params[i].shape[1:]))
            elif touched[i].sum() > 0:
                advance.append(i)
            else:
                # empty on every rank: every piece gets the empty gradient, and does
                # with it what the plain class does with an empty sparse gradient
                glist[i] = RowSparse(np.zeros(0, np.int64),
                                     np.zeros((0,) + self._params[i].shape[1:],
                                              dtype=_grad_dtype(self._params[i].dtype)))
        if any(g is not None for g in glist):
            self._inner.step(glist, grad_scale=gs)
        if advance:
            self._advance(advance, gs)
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

    # ------------------------------------------------------------ dense comm
    def _mpi(self, dtype):
        return self._dtlib.from_numpy_dtype(np.dtype(dtype))

    def _reduce_scatter(self, plan, dense):
        """The averaged gradient of this rank's pieces: {param: view of the gradient
        shard}.  (One rank: the gradients themselves, converted to the parameter's
        dtype and layout where needed, or copied when clipping will scale them.)"""
        N, me, comm, st = self._size, self._rank, self._comm, self.stats
        if N == 1:
            t0 = time.perf_counter()
            out = {}
            for i, g in dense.items():
                p = self._params[i]
                if self._max_grad_norm is None:
                    out[i] = np.asarray(g, dtype=_grad_dtype(p.dtype), order="C")
                else:
                    out[i] = plan.views[i]
                    np.copyto(out[i], g, casting="same_kind")
            st["pack_s"] += time.perf_counter() - t0
            return out
        gflat = {i: (g if g.flags.c_contiguous else np.ascontiguousarray(g)).reshape(-1)
                 for i, g in dense.items()}
        for dp in plan.parts:
            mt = self._mpi(dp.gdtype)
            item = dp.gdtype.itemsize
            send = self._send.view(dp.gdtype)
            recv = self._recv.view(dp.gdtype)
            shard = self._shard[dp.dtype.str]
            for k in range(dp.nbuckets):
                t0 = time.perf_counter()
                counts, displs = dp.counts[k], dp.displs[k]
                c = counts[me]
                for i, first, pos, n in dp.pack[k]:
                    np.copyto(send[pos:pos + n], gflat[i][first:first + n], casting="same_kind")
                t1 = time.perf_counter()
                comm.Alltoallv([send, (counts, displs), mt],
                               [recv, ([c] * N, [r * c for r in range(N)]), mt])
                t2 = time.perf_counter()
                if c:
                    lo = k * dp.b
                    _mean_of_pieces(recv, N, c, shard[lo:lo + c])
                t3 = time.perf_counter()
                st["pack_s"] += t1 - t0
                st["comm_s"] += t2 - t1
                st["reduce_s"] += t3 - t2
                st["bytes_received"] += (N - 1) * c * item
                st["bytes_sent"] += (sum(counts) - c) * item
        return plan.views

    def _all_gather(self, plan):
        me, comm, st = self._rank, self._comm, self.stats
        for dp in plan.parts:
            mt = self._mpi(dp.pdtype)
            item = dp.pdtype.itemsize
            send = self._send.view(dp.pdtype)
            recv = self._recv.view(dp.pdtype)
            for k in range(dp.nbuckets):
                t0 = time.perf_counter()
                counts, displs = dp.counts[k], dp.displs[k]
                c = counts[me]
                for i, first, pos, n in dp.mine[k]:
                    send[pos:pos + n] = self._pflat[i][first:first + n]
                t1 = time.perf_counter()
                comm.Allgatherv([send, c, mt], [recv, (counts, displs), mt])
                t2 = time.perf_counter()
                for i, first, pos, n in dp.unpack[k]:
                    self._pflat[i][first:first + n] = recv[pos:pos + n]
                t3 = time.perf_counter()
                st["pack_s"] += (t1 - t0) + (t3 - t2)
                st["comm_s"] += t2 - t1
                others = sum(counts) - c
                st["bytes_received"] += others * item
                st["bytes_sent"] += others * item      # ring model: each rank forwards

    def _gather_all_params(self):
        """All-gather every parameter (after an exact-mode flush)."""
        if self._size == 1:
            return
        plan = self._plans.get("all")
        if plan is None:
            plan = self._plans["all"] = _DensePlan(self, tuple(range(len(self._params))))
        self._all_gather(plan)

    # ----------------------------------------------------------- sparse comm
    def _buffer(self, key, n, dtype):
        """A reusable scratch array of ``n`` elements (grown when too small)."""
        dtype = np.dtype(dtype)
        need = max(1, n * dtype.itemsize)
        buf = self._scratch.get(key)
        if buf is None or buf.nbytes < need:
            buf = self._scratch[key] = np.empty(max(need, 2 * (0 if buf is None else
                                                               buf.nbytes)), dtype=np.uint8)
        return buf[:n * dtype.itemsize].view(dtype)

    def _exchange_rows(self, sparse_i, sparse):
        """Send every gradient row to its owner; returns {param: (global rows owned
        here, sorted unique, int64), (nuniq, D) averaged values}."""
        t0 = time.perf_counter()
        N, me, comm, st = self._size, self._rank, self._comm, self.stats
        m = len(sparse_i)
        counts = np.zeros((N, m), dtype=np.int64)
        sorted_rows = []
        for s, i in enumerate(sparse_i):
            idx, vals = sparse[i]
            owner = np.searchsorted(self._bounds[i], idx, side="right") - 1
            order = np.argsort(owner, kind="stable")
            counts[:, s] = np.bincount(owner, minlength=N)
            sorted_rows.append((idx[order], np.ascontiguousarray(
                vals[order], dtype=_grad_dtype(self._params[i].dtype))))
        rcounts = np.empty((N, m), dtype=np.int64)
        t1 = time.perf_counter()
        comm.Alltoall([counts, self._mpi(np.int64)], [rcounts, self._mpi(np.int64)])
        st["bytes_received"] += (N - 1) * m * 8
        st["bytes_sent"] += (N - 1) * m * 8
        out = {}
        tcomm = time.perf_counter() - t1
        for s, i in enumerate(sparse_i):
            sidx, svals = sorted_rows[s]
            D = self._widths[i]
            dt = _grad_dtype(self._params[i].dtype)
            sc = counts[:, s]
            rc = rcounts[:, s]
            sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
            rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
            total = int(rc.sum())
            ridx = self._buffer("ridx", total, np.int64)
            rvals = self._buffer("rvals", total * D, dt).reshape(total, D)
            t1 = time.perf_counter()
            comm.Alltoallv([sidx, (sc, sd), self._mpi(np.int64)],
                           [ridx, (rc, rd), self._mpi(np.int64)])
            comm.Alltoallv([svals, (sc * D, sd * D), self._mpi(dt)],
                           [rvals, (rc * D, rd * D), self._mpi(dt)])
            tcomm += time.perf_counter() - t1
            order, seg, uniq = coalesce_plan(ridx, self._nrows[i])
            avg = np.empty((uniq.shape[0], D), dtype=dt)
            if uniq.shape[0] and D:
                _coalesced_mean(rvals, order, seg, N, avg)
            out[i] = (uniq, avg)
            item = dt.itemsize
            st["bytes_received"] += int(total - rc[me]) * (8 + D * item)
            st["bytes_sent"] += int(sc.sum() - sc[me]) * (8 + D * item)
        st["comm_s"] += tcomm
        st["sparse_s"] += time.perf_counter() - t0 - tcomm
        return out

    def _gather_rows(self, i, uniq, counts):
        """Every rank gets the updated rows of parameter ``i`` from their owners."""
        t0 = time.perf_counter()
        comm, me, st = self._comm, self._rank, self.stats
        D = self._widths[i]
        P = self._pflat[i].reshape(self._nrows[i], D)      # (bfloat16: the uint16 bits)
        total = int(counts.sum())
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ridx = self._buffer("gidx", total, np.int64)
        rvals = self._buffer("gvals", total * D, P.dtype).reshape(total, D)
        mine = P[uniq]
        t1 = time.perf_counter()
        comm.Allgatherv([uniq, self._mpi(np.int64)],
                        [ridx, (counts, displs), self._mpi(np.int64)])
        comm.Allgatherv([mine, self._mpi(P.dtype)],
                        [rvals, (counts * D, displs * D), self._mpi(P.dtype)])
        t2 = time.perf_counter()
        lo, hi = int(displs[me]), int(displs[me]) + int(counts[me])
        if D:
            P[ridx[:lo]] = rvals[:lo]
            P[ridx[hi:]] = rvals[hi:]
        t3 = time.perf_counter()
        others = total - int(counts[me])
        st["bytes_received"] += others * (8 + D * P.dtype.itemsize)
        st["bytes_sent"] += others * (8 + D * P.dtype.itemsize)
        st["comm_s"] += t2 - t1
        st["sparse_s"] += (t1 - t0) + (t3 - t2)

    def _advance(self, idxs, gs):
        """A sparse step that touches no row of this rank's pieces (other ranks own
        the touched rows): what the plain optimizer does for a parameter whose step
        touches none of the given rows -- allocate state, advance the step count and
        host scalars, and in exact mode start tracking the rows -- so the pieces stay
        in step with each other."""
        inner = self._inner
        with inner._lock:
            specs, owner = inner._groups.validated()
            rows = [(i, np.zeros(0, np.int64),
                     np.zeros((0, self._widths[i]), dtype=_grad_dtype(self._params[i].dtype)))
                    for i in idxs]
            inner._step_rows(rows, specs, owner, gs)
            inner._plan_version += 1      # step counts of some pieces moved alone

    # -------------------------------------------------------------- clipping
    def _partial_norm(self, arrays):
        p = self._norm_type
        with np.errstate(over="ignore", invalid="ignore"):
            if p == math.inf:
                return max([_array_norm(a, p) for a in arrays], default=0.0)
            acc = 0.0
            for a in arrays:
                x = _array_norm(a, p)
                acc += x * x if p == 2.0 else x ** p
            return acc

    def _clip(self, partials, arrays, gs):
        p = self._norm_type
        with np.errstate(over="ignore", invalid="ignore"):
            if p == math.inf:
                total = math.nan if np.isnan(partials).any() else float(np.max(partials))
            else:
                acc = 0.0
                for x in partials:          # rank order
                    acc += float(x)
                total = math.sqrt(acc) if p == 2.0 else acc ** (1.0 / p)
        if gs is not None:
            total = total / gs
        self.last_grad_norm = total
        coef = self._max_grad_norm / (total + 1e-6)
        if not coef >= 1.0:
            with np.errstate(invalid="ignore"):
                for a in arrays:
                    np.multiply(a, coef, out=a, casting="same_kind")

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
        """Bytes of this rank's communication buffers and gradient shard."""
        return int(self._send.nbytes + self._recv.nbytes
                   + sum(b.nbytes for b in self._shard.values())
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

    def consolidated_state_dict(self, to=0):
        """Collective: the plain class's ``state_dict()`` of the whole optimizer on
        rank ``to`` (None on the other ranks).  In exact sparse mode every row is
        first brought up to date on every rank, as ``state_dict()`` does.  After it,
        ``state_dict()`` on rank ``to`` returns the same dict (for
        :func:`fastopt.save`) until the next step."""
        with self._lock:
            err, digest = None, None
            try:
                if isinstance(to, bool) or not isinstance(to, numbers.Integral) \
                        or not 0 <= to < self._size:
                    raise ValueError(f"Invalid to={to!r}: a rank in [0, {self._size})")
                digest = self._sync_groups()
            except Exception as e:
                err = e
            self._agree("consolidated_state_dict", err, (to if err is None else None, digest))
            return self._consolidate(int(to))

    def _consolidate(self, to):
        comm, me, N = self._comm, self._rank, self._size
        if self.sparse_mode == "exact":
            self._inner.flush()
            self._gather_all_params()
        local = self._inner.state
        meta = {i: {k: (("a", _dtype_token(v.dtype)) if isinstance(v, np.ndarray)
                        else ("s", v))
                    for k, v in st.items()} for i, st in local.items()}
        metas = comm.allgather(meta)
        if any(m != metas[0] for m in metas):
            raise DistributedError("internal error: the ranks' shards of the state are out of "
                                   "step (different step counts or state names)")
        out = {}
        for i in sorted(metas[0]):
            entry = {}
            p = self._params[i]
            for k, (kind, v) in metas[0][i].items():
                if kind == "s":
                    entry[k] = v
                    continue
                shape = self._state_shape(i, k)
                full = np.empty(shape, dtype=_dtype_of(v)) if me == to else None
                for r in range(N):
                    lo, hi = self._state_range(i, k, r)
                    if hi == lo:
                        continue
                    if me == to:
                        dst = full.reshape(-1)[lo:hi]
                        if r == me:
                            dst[...] = local[i][k].reshape(-1)
                        else:
                            self._recv_chunks(dst, r)
                    elif r == me:
                        self._send_chunks(local[i][k].reshape(-1), to)
                entry[k] = full
            out[i] = entry
        if me != to:
            return None
        sd = self._state_dict_from(out)
        self._consolidated = (self._version, out)
        return sd

    def _state_kind(self, k):
        """"slot", "scale" (an 8-bit slot's block scales) or "aux" (master_low,
        kahan_comp) of a state array name."""
        if k in (storage.MASTER_LOW, storage.KAHAN_COMP):
            return "aux"
        if k.endswith(storage.SCALE_SUFFIX) and k[:-len(storage.SCALE_SUFFIX)] in \
                self.rule.slots:
            return "scale"
        return "slot"

    def _state_shape(self, i, k):
        """The shape of state array ``k`` of the whole parameter ``i``."""
        p = self._params[i]
        kind = self._state_kind(k)
        if kind == "aux":
            return p.shape
        shape = self.rule.slot_shape(p.shape)
        if kind == "scale":
            r, nb, _ = storage.q8_blocks(shape)
            return (r * nb,)
        return shape

    def _state_range(self, i, k, r):
        """``[lo, hi)``: the flat elements of the whole parameter's state array ``k``
        that rank ``r``'s piece holds.  Slots and aux arrays: the piece's rows.
        8-bit scales: the blocks of those rows (a 1-D parameter is one row cut at
        block multiples, so its pieces' blocks are the whole parameter's)."""
        b = self._bounds[i]
        r0, r1 = int(b[r]), int(b[r + 1])
        if r1 == r0:
            return 0, 0
        kind = self._state_kind(k)
        shape = self._params[i].shape if kind == "aux" else \
            self.rule.slot_shape(self._params[i].shape)
        if kind == "scale":
            if len(shape) <= 1:
                return r0 // storage.Q8_BLOCK, -(-r1 // storage.Q8_BLOCK)
            nb = storage.q8_blocks(shape)[1]
            return r0 * nb, r1 * nb
        per_row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) else 1
        return r0 * per_row, r1 * per_row

    def _send_chunks(self, a, dest):
        a = _wire(a)
        step = max(1, _CHUNK_BYTES // a.dtype.itemsize)
        for lo in range(0, a.shape[0], step):
            self._comm.Send([a[lo:lo + step], self._mpi(a.dtype)], dest=dest, tag=7)

    def _recv_chunks(self, a, source):
        a = _wire(a)
        step = max(1, _CHUNK_BYTES // a.dtype.itemsize)
        for lo in range(0, a.shape[0], step):
            self._comm.Recv([a[lo:lo + step], self._mpi(a.dtype)], source=source, tag=7)

    def _state_dict_from(self, state):
        groups, start = [], 0
        for g in self._template.param_groups:
            n = len(g["params"])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(start, start + n))})
            start += n
        sd = {"version": state_io.STATE_DICT_VERSION, "optimizer": self.rule.name,
              "state": {i: dict(st) for i, st in state.items()}, "param_groups": groups,
              "storage": state_io.storage_options(self._template)}
        if self._names is not None:
            sd["param_names"] = list(self._names)
        return sd

    def state_dict(self):
        """The full state dict on the rank that last called
        :meth:`consolidated_state_dict` as its ``to`` (if no step came since), so that
        ``fastopt.save(path, opt)`` works there.  With one rank it consolidates
        directly.  Not collective."""
        with self._lock:
            if self._size == 1:
                self._sync_groups()
                return self._consolidate_local()
            c = self._consolidated
            if c is None or c[0] != self._version:
                raise RuntimeError(
                    "ShardedOptimizer.state_dict() returns the state gathered by the last "
                    "consolidated_state_dict(to=rank) on that rank; call "
                    "opt.consolidated_state_dict(to=rank) on every rank first (the state "
                    "changed since, or this rank was not 'to')")
            self._check_group_structure()
            self._template._groups.validated()
            return self._state_dict_from(c[1])

    def _consolidate_local(self):
        if self.sparse_mode == "exact":
            self._inner.flush()
        out = {i: {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
               for i, st in self._inner.state.items()}
        return self._state_dict_from(out)

    def load_state_dict(self, state_dict):
        """Collective: every rank passes the same full state dict (the plain class's
        format, from any world size); each rank keeps its shard.  Checked as the
        plain class checks it (optimizer, groups, names, shapes, dtypes, steps)
        before anything changes on any rank."""
        with self._lock:
            t = self._template
            saved = [{k: v for k, v in g.items() if k != "params"} for g in t.param_groups]
            err, piece_sd, summary, detail = None, None, None, None
            try:
                self._sync_groups()
                t.load_state_dict(state_dict)
                piece_sd = self._pieces_of(t.state)
                if self._size > 1:
                    # what this rank would load (arrays, steps and host scalars,
                    # every group value), canonical after the full check: equal on
                    # every rank, or nothing is loaded anywhere
                    entries, hyper, summary = _loaded_digests(t.state, t.param_groups)
                    detail = (entries, hyper)
            except Exception as e:
                err = e
            try:
                self._agree("load_state_dict", err, summary,
                            lambda sigs: self._describe_load(detail),
                            mismatch=StateDictMismatchError)
            except BaseException:
                self._restore_groups(saved)
                self._clear_template()
                raise
            self._clear_template()
            self._inner.load_state_dict(piece_sd)
            self._spec_seen = None
            self._sync_groups()
            self._version += 1
            self._consolidated = None

    def _describe_load(self, detail):
        """Which part of the state dicts differs (a second allgather: every rank is
        here, since every rank saw the same signatures)."""
        details = self._allgather_object(detail, "load_state_dict")
        e0, h0 = details[0]
        tail = ("; every rank must load the same checkpoint (a stale or partial copy on one "
                "node?); nothing was loaded on any rank")
        for r, (e, h) in enumerate(details):
            if (e, h) == (e0, h0):
                continue
            for gi, (x, y) in enumerate(zip(h0, h)):
                if x != y:
                    mine = ", ".join(f"{k}={v}" for k, _, v in sorted(set(y) - set(x)))
                    zero = ", ".join(f"{k}={v}" for k, _, v in sorted(set(x) - set(y)))
                    return (f"the state dicts differ between ranks: group {gi} has {mine} on "
                            f"rank {r} but {zero} on rank 0{tail}")
            d0 = {(i, k): (kind, v) for i, k, kind, v in e0}
            d = {(i, k): (kind, v) for i, k, kind, v in e}
            for key in sorted(set(d0) | set(d)):
                a, b = d0.get(key), d.get(key)
                if a == b:
                    continue
                i, k = key
                if a is None or b is None:
                    where, other = (r, 0) if a is None else (0, r)
                    why = f"parameter {i} has state {k!r} on rank {where} but not on rank {other}"
                elif a[0] == "array" and b[0] == "array":
                    why = (f"state {k!r} of parameter {i} differs between rank {r} and rank 0 "
                           "(different array contents)")
                else:
                    why = f"state {k!r} of parameter {i} is {b[1]} on rank {r} but {a[1]} on rank 0"
                return f"the state dicts differ between ranks: {why}{tail}"
        return f"the state dicts differ between ranks{tail}"

    def _pieces_of(self, full_state):
        """This rank's shard of a validated full state (the inner state dict)."""
        me = self._rank
        state = {}
        for i, st in full_state.items():
            piece = self._pieces[i]
            d = {}
            for k, v in st.items():
                if isinstance(v, np.ndarray):
                    lo, hi = self._state_range(i, k, me)
                    kind = self._state_kind(k)
                    shape = (hi - lo,) if kind == "scale" else piece.shape if kind == "aux" \
                        else self.rule.slot_shape(piece.shape)
                    d[k] = v.reshape(-1)[lo:hi].reshape(shape)
                else:
                    d[k] = v
            state[i] = d
        groups, start = [], 0
        for g in self._template.param_groups:
            n = len(g["params"])
            groups.append(self._inner_group(g, list(range(start, start + n))))
            start += n
        sd = {"version": state_io.STATE_DICT_VERSION, "optimizer": self.rule.name,
              "state": state, "param_groups": groups,
              "storage": state_io.storage_options(self._template)}
        return sd

    def _restore_groups(self, saved):
        for g, h in zip(self._template.param_groups, saved):
            ps = g["params"]
            g.clear()
            g.update({**h, "params": ps})
        self._template._groups.invalidate()

    def _clear_template(self):
        """Drop the state a load left in the full (template) optimizer."""
        t = self._template
        if not t.state:
            return
        groups = state_io.indexed_groups(t.param_groups)
        t.load_state_dict({"version": state_io.STATE_DICT_VERSION, "optimizer": self.rule.name,
                           "state": {}, "param_groups": groups,
                           "storage": state_io.storage_options(t)})

    # checkpoint.load rolls back through these when a scheduler fails to load
    def _capture(self):
        groups = [{k: v for k, v in g.items() if k != "params"}
                  for g in self._template.param_groups]
        return groups, self._inner._capture(), self._version

    def _restore(self, captured):
        groups, inner, version = captured
        self._restore_groups(groups)
        self._inner._restore(inner)
        self._spec_seen = None
        self._version = version + 1
        self._consolidated = None

    def close(self):
        """Collective: free this optimizer's communicator (a duplicate of ``comm``).
        The optimizer cannot be used afterwards."""
        with self._lock:
            self._agree("close", None, None)
            self._comm.Free()
            self._broken = "it was closed"

    def __repr__(self):
        lines = [f"ShardedOptimizer({self.rule.name}, backend={self.backend.name}, "
                 f"rank {self._rank} of {self._size}, state {self.state_bytes()} bytes here)"]
        for gi, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v!r}" for k, v in g.items() if k != "params")
            lines.append(f"  group {gi}: {len(g['params'])} params, {hyper}")
        return "\n".join(lines)
