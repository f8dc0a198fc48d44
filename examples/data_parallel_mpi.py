"""Data-parallel training with the optimizer state sharded over MPI ranks.

A small model -- an embedding table (looked up by a categorical feature: row-sparse
gradients) feeding a one-hidden-layer tanh network (dense gradients) -- is trained
by mean squared error on synthetic data with Adam:

* every step draws one global batch (the same seed on every rank); rank ``r`` takes
  every ``size``-th example from position ``r`` and computes the gradient of *its*
  mean loss;
* :class:`fastopt.distributed.ShardedOptimizer` averages the ranks' gradients (the
  embedding's as rows, never densified), each rank updates only its shard of the
  parameters and keeps only that shard's Adam state, and the updated parameters are
  gathered so every rank holds the same model;
* since the shards are the same size, the average of the ranks' mean gradients is
  the mean gradient of the whole batch: rank 0 then trains the same model in one
  process with plain ``fastopt.Adam`` on whole-batch gradients and prints both
  results and their difference (floating-point rounding only).

Run:  mpiexec -n 2 python -m mpi4py examples/data_parallel_mpi.py
      python examples/data_parallel_mpi.py            (one rank, no mpiexec)

If one rank raises and exits while the others wait in a collective call, MPI does
not end the job by itself: the others would wait (at full CPU, inside MPI) until
the job is killed.  Two guards, both used here:

* ``python -m mpi4py script.py`` (instead of ``python script.py``) calls
  ``MPI_Abort`` when a rank ends with an uncaught exception, which ends every rank
  at once;
* ``ShardedOptimizer(..., timeout=seconds)``: a rank that waits longer than that for
  the others to make the same call raises ``DistributedError`` (and waits sleeping,
  not spinning).  The default is ``fastopt.distributed.DEFAULT_TIMEOUT`` (1800 s);
  ``timeout=None`` waits forever.  Choose it longer than the longest time one rank
  may legitimately spend apart from the others (rank 0 writing a checkpoint, an
  evaluation on one rank, the first call compiling kernels).
"""

import argparse

import numpy as np

import fastopt

N_EXAMPLES = 6000
N_DENSE = 8          # dense input features
N_CATEGORIES = 200   # rows of the embedding table
EMB_DIM = 4
HIDDEN = 32
BATCH = 240          # divisible by 1, 2, 3, 4, 5, 6 and 8 ranks


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N_EXAMPLES, N_DENSE))
    cat = rng.zipf(1.3, N_EXAMPLES) % N_CATEGORIES
    effect = rng.standard_normal(N_CATEGORIES)
    y = np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2] + effect[cat] + 0.05 * rng.standard_normal(
        N_EXAMPLES)
    return x, cat.astype(np.int64), y


def init_params(seed=1):
    rng = np.random.default_rng(seed)
    return {"emb": 0.1 * rng.standard_normal((N_CATEGORIES, EMB_DIM)),
            "w1": rng.standard_normal((N_DENSE + EMB_DIM, HIDDEN)) / np.sqrt(N_DENSE + EMB_DIM),
            "b1": np.zeros(HIDDEN),
            "w2": rng.standard_normal(HIDDEN) / np.sqrt(HIDDEN),
            "b2": np.zeros(())}


def loss_and_grads(p, x, cat, y):
    """Mean squared error over the examples given and its gradients (the
    embedding's as the rows it touched)."""
    e = p["emb"][cat]
    z = np.concatenate([x, e], axis=1)
    h = np.tanh(z @ p["w1"] + p["b1"])
    r = h @ p["w2"] + p["b2"] - y
    n = len(y)
    loss = 0.5 * float(np.mean(r * r))
    dr = r / n
    dh = np.outer(dr, p["w2"]) * (1.0 - h * h)
    dz = dh @ p["w1"].T
    grads = {"emb": fastopt.RowSparse(cat, dz[:, N_DENSE:]),   # duplicates are summed
             "w1": z.T @ dh, "b1": dh.sum(0), "w2": h.T @ dr, "b2": np.asarray(dr.sum())}
    return loss, grads


def batches(steps, seed=2):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield rng.choice(N_EXAMPLES, BATCH, replace=False)


def full_loss(p, data):
    return loss_and_grads(p, *data)[0]


def train_sharded(data, steps, lr, comm, timeout):
    """Every rank: its slice of each batch, the ShardedOptimizer."""
    from fastopt.distributed import ShardedOptimizer
    p = init_params()
    # timeout: a rank that crashed or stopped calling makes the others raise
    # DistributedError after that many seconds instead of waiting forever (see the
    # module docstring; run under "python -m mpi4py" so a crash ends the job at once)
    opt = ShardedOptimizer(fastopt.Adam, p, comm=comm, lr=lr, timeout=timeout)
    x, cat, y = data
    for batch in batches(steps):
        mine = batch[comm.rank::comm.size]
        _, grads = loss_and_grads(p, x[mine], cat[mine], y[mine])
        opt.step(grads)
    mine = opt.state_bytes()
    return p, comm.allgather(mine)


def train_single(data, steps, lr):
    """One process, whole batches, plain fastopt.Adam."""
    p = init_params()
    opt = fastopt.Adam(p, lr=lr)
    x, cat, y = data
    for batch in batches(steps):
        _, grads = loss_and_grads(p, x[batch], cat[batch], y[batch])
        opt.step(grads)
    state = sum(v.nbytes for st in opt.state.values() for v in st.values()
                if isinstance(v, np.ndarray))
    return p, state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--timeout", type=float, default=120.0,
                    help="seconds a rank waits for the others in a collective call before "
                         "it raises (default 120: every step here takes milliseconds)")
    args = ap.parse_args(argv)
    try:
        from mpi4py import MPI
    except ImportError:
        raise SystemExit("this example needs mpi4py: pip install 'fastopt[mpi]'")
    comm = MPI.COMM_WORLD
    if BATCH % comm.size:
        raise SystemExit(f"the batch of {BATCH} does not split evenly over {comm.size} ranks")
    data = make_data()
    initial = full_loss(init_params(), data)
    sharded, state_per_rank = train_sharded(data, args.steps, args.lr, comm, args.timeout)
    if comm.rank != 0:
        return None
    single, single_state = train_single(data, args.steps, args.lr)
    diff = max(float(np.max(np.abs(sharded[k] - single[k]))) for k in single)
    n = comm.size
    print(f"data-parallel Adam, {args.steps} steps of {BATCH} examples "
          f"({BATCH // n} per rank)")
    print(f"initial loss {initial:.6f}")
    print(f"final loss: sharded on {n} rank{'s' if n > 1 else ''} "
          f"{full_loss(sharded, data):.12f}, single process {full_loss(single, data):.12f}")
    print(f"max |difference| of the parameters: {diff:.3e}")
    print("Adam state bytes per rank: " + ", ".join(map(str, state_per_rank))
          + f" (single process: {single_state})")
    return {"initial": initial, "sharded": sharded, "single": single, "difference": diff}


if __name__ == "__main__":
    main()
