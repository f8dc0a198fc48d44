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
A factored rule (Adafactor) reads row/column sums and RMS of whole tensors: each
parameter is owned whole by one rank instead (balanced by cost, largest first;
``layout._owner_bounds``), its bounds ``[0, .., 0, rows, .., rows]``.

A dense step: in buckets of at most ``bucket_bytes`` (default 32 MiB; each bucket
carries ``bucket_bytes / N`` bytes of every rank's range) each rank sends every rank
its rows straight from the gradient arrays (``Alltoallw`` with MPI struct datatypes:
no pack copy) and receives the other ranks' pieces of its own rows into a buffer
mapped for the step; they are summed (the reduce-scatter) in place over its own rows
-- in the gradient shard (``1/N`` of the gradient bytes, allocated once), or with
``reuse_grads=True`` in the caller's gradient arrays (no shard) -- the rank steps its
shard, then one ``Alltoallw`` per dtype all-gathers the updated rows from the
parameters into the parameters (struct datatypes made once: no buffer, no copy).
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

Package layout
--------------
:mod:`~fastopt.distributed.sharded` (the class: construction, param groups, the
step), :mod:`~fastopt.distributed.layout` (the cut into pieces, the bucket plans),
:mod:`~fastopt.distributed.agreement` (the first collective of every call),
:mod:`~fastopt.distributed.collectives` (the exchanges and the averaging kernels),
:mod:`~fastopt.distributed.checkpoints` (consolidated state dicts, re-sharding),
:mod:`~fastopt.distributed.errors`.  The plain optimizers are used through their
public engine methods (``params``, ``param_names``, ``align_grads``,
``check_param_groups``, ``param_groups_restored``, ``set_row_range``, ``step``,
``state_dict``/``load_state_dict``, ``add_param_group``, ``flush``) and the
``_capture``/``_restore`` rollback protocol of :mod:`fastopt.checkpoint`.
"""

from .errors import DistributedError, StateDictMismatchError
from .sharded import DEFAULT_BUCKET_BYTES, DEFAULT_OVERLAP, DEFAULT_TIMEOUT, ShardedOptimizer

__all__ = ["ShardedOptimizer", "DistributedError", "StateDictMismatchError",
           "DEFAULT_BUCKET_BYTES", "DEFAULT_OVERLAP", "DEFAULT_TIMEOUT"]
