"""Sparse embeddings end to end: matrix factorization on Zipf(1.2)-distributed ids,
trained with lazy Adam, Adagrad, row-wise Adagrad and SGD on row-sparse gradients.

The workload of recommender and embedding models, small enough for a laptop:

* a synthetic rating matrix ``r = mu + <u*_user, v*_item> + noise`` from hidden
  rank-8 ground-truth factors, observed at (user, item) pairs whose ids are drawn
  from a bounded Zipf(1.2) law (a few ids take most lookups, most ids are rarely or
  never seen -- ids are shuffled so the popular rows are scattered in the tables);
* 1.2M training ratings, 100K held out; the model is a 200,000 x 32 user table
  and a 50,000 x 32 item table,
  ``r_hat = mu_train + <U[user], V[item]>``, trained on the mean squared error plus
  a small L2 penalty on the looked-up rows;
* each mini-batch (4,096 ratings) computes the loss and its gradient by hand in
  NumPy; the gradient w.r.t. each table is ``fastopt.RowSparse(batch_ids,
  per-lookup rows)`` -- repeated ids are summed by fastopt, only touched rows (and
  their optimizer state) are read or written (``sparse_mode="lazy"``, the default);
* every optimizer starts from the same tables and sees the same batches; learning
  rates were picked per optimizer from a small grid (factors of ~3) by held-out
  RMSE with the default settings, and are printed.  SGD trails: one learning rate
  must be small enough for the head rows (hundreds of lookups per batch, so large
  summed gradients) and is then far too small for the tail rows; the adaptive
  optimizers scale each row (or element) by its own gradient history.

It prints the training loss every few steps, the held-out RMSE next to the baseline
of always predicting the training mean (and the noise floor), the time of the
optimizer step alone (``opt.step``, timed with ``time.perf_counter``; the median, so
the first step's JIT compilation is not counted) and the bytes of optimizer state:
Adam keeps two floats per element, Adagrad one, row-wise Adagrad one per *row*
(32x less than Adagrad here), SGD none.  Before training, the hand-written gradient
is checked against finite differences.

Run:  python examples/embedding_zipf.py [--steps 300] [--backend auto] [--seed 0]
      python examples/embedding_zipf.py --quick        (tiny sizes, a second or two)
"""

import argparse
import time

import numpy as np

import fastopt

SEED = 0
ZIPF_A = 1.2

#: problem sizes: the default run and ``--quick`` (tests)
SIZES = {
    "default": dict(n_users=200_000, n_items=50_000, dim=32, rank=8, n_train=1_200_000,
                    n_test=100_000, batch=4096, steps=300, show_every=50),
    "quick": dict(n_users=5_000, n_items=2_000, dim=16, rank=4, n_train=40_000,
                  n_test=10_000, batch=512, steps=150, show_every=25),
}
NOISE = 0.5          # std of the rating noise: the best achievable RMSE
MU = 3.5             # mean rating of the ground truth
INIT_STD = 0.1       # std of the initial embeddings (zero would have zero gradient)
L2 = 1e-3            # penalty L2 * (|U[user]|^2 + |V[item]|^2) per rating

#: name -> (learning rate, factory); all in sparse_mode="lazy" (the default)
OPTIMIZERS = {
    "Adam (lazy)": (1e-2, lambda p, lr, be: fastopt.Adam(p, lr=lr, backend=be)),
    "Adagrad": (1e-1, lambda p, lr, be: fastopt.Adagrad(p, lr=lr, backend=be)),
    "RowWiseAdagrad": (1e-1, lambda p, lr, be: fastopt.RowWiseAdagrad(p, lr=lr, backend=be)),
    "SGD": (3.0, lambda p, lr, be: fastopt.SGD(p, lr=lr, backend=be)),
}


# ------------------------------------------------------------------------------ data

def zipf_ids(rng, n_ids, size, a=ZIPF_A, perm=None):
    """``size`` ids in ``[0, n_ids)`` with P(rank k) proportional to k^-a (bounded
    Zipf), mapped through the permutation ``perm`` (rank -> id)."""
    cdf = np.cumsum(np.arange(1, n_ids + 1, dtype=np.float64) ** -a)
    cdf /= cdf[-1]
    ranks = np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n_ids - 1)
    return ranks if perm is None else perm[ranks]


def make_data(sizes, seed=SEED):
    """Hidden factors, training and held-out ratings (user ids, item ids, ratings)."""
    s = sizes
    rng = np.random.default_rng(seed)
    scale = s["rank"] ** -0.25                     # <u*, v*> has unit variance
    U_true = (scale * rng.standard_normal((s["n_users"], s["rank"]))).astype(np.float32)
    V_true = (scale * rng.standard_normal((s["n_items"], s["rank"]))).astype(np.float32)
    user_perm = rng.permutation(s["n_users"])
    item_perm = rng.permutation(s["n_items"])

    def ratings(n):
        users = zipf_ids(rng, s["n_users"], n, perm=user_perm)
        items = zipf_ids(rng, s["n_items"], n, perm=item_perm)
        r = MU + np.einsum("ij,ij->i", U_true[users], V_true[items]) \
            + NOISE * rng.standard_normal(n)
        return users.astype(np.int64), items.astype(np.int64), r.astype(np.float32)

    return ratings(s["n_train"]), ratings(s["n_test"])


def init_tables(sizes, seed=SEED):
    rng = np.random.default_rng(seed + 1)
    U = (INIT_STD * rng.standard_normal((sizes["n_users"], sizes["dim"]))).astype(np.float32)
    V = (INIT_STD * rng.standard_normal((sizes["n_items"], sizes["dim"]))).astype(np.float32)
    return U, V


# ----------------------------------------------------------------------------- model

def loss_and_grads(U, V, users, items, r, mu, l2=L2):
    """Batch loss ``mean((mu + <U[u], V[i]> - r)^2 + l2 (|U[u]|^2 + |V[i]|^2))``,
    its mean squared error, and the per-lookup gradient rows: ``gU[k]`` is the
    gradient w.r.t. ``U[users[k]]`` from rating ``k`` alone (likewise ``gV``), so
    the gradient of the table is their sum over repeated ids -- what
    ``RowSparse(users, gU)`` stands for."""
    Uu, Vi = U[users], V[items]
    err = mu + np.einsum("ij,ij->i", Uu, Vi) - r
    n = len(r)
    mse = float(np.mean(err.astype(np.float64) ** 2))
    loss = mse + l2 * float((np.sum(Uu.astype(np.float64) ** 2)
                             + np.sum(Vi.astype(np.float64) ** 2)) / n)
    d = (2.0 / n) * err[:, None]
    gU = d * Vi + (2.0 * l2 / n) * Uu
    gV = d * Uu + (2.0 * l2 / n) * Vi
    return loss, mse, gU.astype(U.dtype, copy=False), gV.astype(V.dtype, copy=False)


def rmse(U, V, users, items, r, mu):
    err = mu + np.einsum("ij,ij->i", U[users], V[items]) - r
    return float(np.sqrt(np.mean(err.astype(np.float64) ** 2)))


def gradient_check(seed=SEED, eps=1e-6, tol=1e-6):
    """The summed per-lookup rows against central differences, in float64, on a
    tiny problem with many repeated ids.  Returns the relative error."""
    rng = np.random.default_rng(seed)
    U, V = rng.standard_normal((7, 3)), rng.standard_normal((5, 3))
    users, items = rng.integers(0, 7, 20), rng.integers(0, 5, 20)
    r = rng.standard_normal(20)
    _, _, gU, gV = loss_and_grads(U, V, users, items, r, 0.3, l2=0.1)
    analytic = [np.zeros_like(U), np.zeros_like(V)]
    np.add.at(analytic[0], users, gU)             # what fastopt's coalescing computes
    np.add.at(analytic[1], items, gV)
    worst = 0.0
    for table, a in zip((U, V), analytic):
        numeric = np.zeros_like(table)
        for k in np.ndindex(table.shape):
            old = table[k]
            table[k] = old + eps
            plus = loss_and_grads(U, V, users, items, r, 0.3, l2=0.1)[0]
            table[k] = old - eps
            minus = loss_and_grads(U, V, users, items, r, 0.3, l2=0.1)[0]
            table[k] = old
            numeric[k] = (plus - minus) / (2 * eps)
        rel = np.linalg.norm(a - numeric) / (np.linalg.norm(a) + np.linalg.norm(numeric))
        worst = max(worst, float(rel))
    assert worst < tol, f"gradient check failed: relative error {worst:.2e} >= {tol:.0e}"
    return worst


# -------------------------------------------------------------------------- training

def state_bytes(opt):
    """Bytes of the arrays the optimizer keeps (its state, not the parameters)."""
    return sum(int(v.nbytes) for st in opt.state.values() for v in st.values()
               if hasattr(v, "nbytes"))


def train(name, lr, make_opt, init, train_data, test_data, mu, sizes, backend, seed):
    """Train copies of the ``init`` tables; returns the per-step batch losses, the
    held-out RMSE, the optimizer step times and its state bytes."""
    U, V = init[0].copy(), init[1].copy()
    opt = make_opt([U, V], lr, backend)
    users, items, r = train_data
    batch, steps = sizes["batch"], sizes["steps"]
    rng = np.random.default_rng(seed + 2)          # same batches for every optimizer
    order = np.empty(0, dtype=np.int64)
    losses, mses, step_s = [], [], []
    for _ in range(steps):
        if len(order) < batch:                     # next epoch: a fresh shuffle
            order = np.concatenate([order, rng.permutation(len(r))])
        idx, order = order[:batch], order[batch:]
        bu, bi = users[idx], items[idx]
        loss, mse, gU, gV = loss_and_grads(U, V, bu, bi, r[idx], mu)
        grads = [fastopt.RowSparse(bu, gU), fastopt.RowSparse(bi, gV)]
        t = time.perf_counter()
        opt.step(grads)
        step_s.append(time.perf_counter() - t)
        losses.append(loss)
        mses.append(mse)
    return {"lr": lr, "loss": losses, "mse": mses, "test_rmse": rmse(U, V, *test_data, mu),
            "step_ms": 1e3 * float(np.median(step_s)), "state_bytes": state_bytes(opt),
            "backend": opt.backend.name}


def window_means(values, every):
    """Mean of each block of ``every`` consecutive values (the last may be shorter)."""
    return [float(np.mean(values[k:k + every])) for k in range(0, len(values), every)]


def print_losses(results, every):
    names = list(results)
    steps = len(next(iter(results.values()))["loss"])
    print(f"training loss (mean over the last {every} batches; MSE + L2 {L2:g}):")
    print(f"{'steps':>11}" + "".join(f"{n:>16}" for n in names))
    first = results[names[0]]["loss"][0]
    print(f"{'0 (init)':>11}" + "".join(f"{r['loss'][0]:>16.4f}" for r in results.values()))
    assert all(r["loss"][0] == first for r in results.values())   # same start, same batch
    means = {n: window_means(r["loss"], every) for n, r in results.items()}
    for w in range(len(means[names[0]])):
        lo, hi = w * every + 1, min((w + 1) * every, steps)
        print(f"{f'{lo}-{hi}':>11}" + "".join(f"{means[n][w]:>16.4f}" for n in names))


def main(argv=None):
    """Run the comparison; returns ``(results, baseline_rmse)`` with ``results`` =
    ``{optimizer: {"lr", "loss", "mse", "test_rmse", "step_ms", "state_bytes",
    "backend"}}``."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=None,
                    help=f"training steps per optimizer (default {SIZES['default']['steps']}, "
                         f"{SIZES['quick']['steps']} with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    ap.add_argument("--backend", default="auto",
                    help="fastopt backend: auto, numba, cython, numpy, ... (default auto)")
    ap.add_argument("--seed", type=int, default=SEED, help=f"default {SEED}")
    args = ap.parse_args(argv)
    sizes = dict(SIZES["quick" if args.quick else "default"])
    if args.steps is not None:
        if args.steps < 1:
            ap.error("--steps must be >= 1")
        sizes["steps"] = args.steps

    t0 = time.perf_counter()
    err = gradient_check(args.seed)
    print(f"gradient check (float64, finite differences, ids repeated): "
          f"relative error {err:.1e}")
    train_data, test_data = make_data(sizes, args.seed)
    users, items, r = train_data
    mu = float(np.mean(r, dtype=np.float64))
    baseline = float(np.sqrt(np.mean((test_data[2].astype(np.float64) - mu) ** 2)))
    top_users = np.bincount(users, minlength=sizes["n_users"])
    top_share = np.sort(top_users)[::-1][:max(1, sizes["n_users"] // 100)].sum() / len(users)
    print(f"tables: users {sizes['n_users']:,} x {sizes['dim']}, items {sizes['n_items']:,} x "
          f"{sizes['dim']} (float32); ids ~ Zipf({ZIPF_A:g}), ground truth rank {sizes['rank']}")
    print(f"ratings: {len(r):,} train / {len(test_data[2]):,} held out; batch {sizes['batch']:,}, "
          f"{sizes['steps']} steps (seed {args.seed})")
    print(f"ids seen in training: users {np.count_nonzero(top_users):,}, items "
          f"{np.count_nonzero(np.bincount(items)):,}; the top 1% of users own "
          f"{top_share:.0%} of the lookups\n")

    init = init_tables(sizes, args.seed)
    results = {name: train(name, lr, make, init, train_data, test_data, mu, sizes,
                           args.backend, args.seed)
               for name, (lr, make) in OPTIMIZERS.items()}

    print_losses(results, sizes["show_every"])
    backend = next(iter(results.values()))["backend"]
    print(f"\nheld-out RMSE: predicting the train mean {mu:.3f} gives {baseline:.4f}; "
          f"noise floor {NOISE:g}")
    print(f"{'optimizer':<16}{'lr':>8}{'test RMSE':>11}{'step ms':>10}{'state bytes':>15}")
    for name, res in results.items():
        print(f"{name:<16}{res['lr']:>8g}{res['test_rmse']:>11.4f}{res['step_ms']:>10.2f}"
              f"{res['state_bytes']:>15,}")
    print(f"(step ms: median time of opt.step on backend {backend}; "
          f"total {time.perf_counter() - t0:.1f} s)")
    return results, baseline


if __name__ == "__main__":
    main()
