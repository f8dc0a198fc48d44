"""Linear regression four ways: full-batch GD, mini-batch SGD, momentum and Adam.

The classic textbook comparison, done so the comparison is fair:

* one synthetic problem ``y = X w* + b* + noise`` with correlated, unevenly scaled
  features (so plain gradient descent is slow along the badly scaled direction);
* every method sees the same number of *examples* (epochs), the mini-batch
  methods the same shuffled batches (same seed);
* the loss reported is always the full-data mean squared error, measured at the end
  of each epoch, next to the exact least-squares optimum (``numpy.linalg.lstsq``),
  so the curves show the gap to the best achievable loss;
* learning rates are chosen for each method from a small grid by the loss after
  the run (each method at its best), and printed.

Run:  python examples/linear_regression.py
"""

import numpy as np

import fastopt

RNG_SEED = 0
N, D = 4096, 20
EPOCHS = 30
BATCH = 64


def make_problem(seed=RNG_SEED):
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, 1.3, D)                       # feature scales 1 .. 20
    mix = np.eye(D) + 0.3 * rng.standard_normal((D, D)) / np.sqrt(D)
    X = (rng.standard_normal((N, D)) @ mix) * scales
    w_true = rng.standard_normal(D) / scales
    b_true = 0.5
    y = X @ w_true + b_true + 0.1 * rng.standard_normal(N)
    return X.astype(np.float32), y.astype(np.float32)


def mse_and_grads(X, y, w, b):
    """Loss 0.5 * mean((Xw + b - y)^2) and its gradients."""
    r = X @ w + b - y
    loss = 0.5 * float(np.mean(r.astype(np.float64) ** 2))
    gw = (X.T @ r) / len(y)
    gb = np.array([r.mean()], dtype=np.float32)
    return loss, gw.astype(np.float32), gb


def optimum(X, y):
    A = np.hstack([X, np.ones((len(y), 1), np.float32)]).astype(np.float64)
    sol, *_ = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)
    r = A @ sol - y
    return 0.5 * float(np.mean(r ** 2))


def train(X, y, make_opt, batch, epochs=EPOCHS, seed=RNG_SEED):
    """Train from zero; returns the full-data loss after each epoch."""
    w = np.zeros(X.shape[1], np.float32)
    b = np.zeros(1, np.float32)
    opt = make_opt({"w": w, "b": b})
    rng = np.random.default_rng(seed)
    curve = []
    np.seterr(over="ignore", invalid="ignore")   # a too-large lr diverges; it is dropped
    for _ in range(epochs):
        order = rng.permutation(len(y)) if batch < len(y) else np.arange(len(y))
        for start in range(0, len(y), batch):
            idx = order[start:start + batch]
            _, gw, gb = mse_and_grads(X[idx], y[idx], w, b)
            opt.step({"w": gw, "b": gb})
        curve.append(mse_and_grads(X, y, w, b)[0])
        if not np.isfinite(curve[-1]):
            break
    return curve


METHODS = {
    "GD (full batch)": (lambda n: n, lambda lr: lambda p: fastopt.SGD(p, lr=lr),
                        [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]),
    "mini-batch SGD": (lambda n: BATCH, lambda lr: lambda p: fastopt.SGD(p, lr=lr),
                       [3e-4, 1e-3, 3e-3, 1e-2]),
    "SGD + momentum 0.9": (lambda n: BATCH,
                           lambda lr: lambda p: fastopt.SGD(p, lr=lr, momentum=0.9),
                           [3e-5, 1e-4, 3e-4, 1e-3]),
    "Adam": (lambda n: BATCH, lambda lr: lambda p: fastopt.Adam(p, lr=lr),
             [1e-3, 3e-3, 1e-2, 3e-2]),
}


def main():
    X, y = make_problem()
    best_possible = optimum(X, y)
    print(f"{N} examples, {D} features; least-squares optimum loss = {best_possible:.5f}\n")
    results = {}
    for name, (batch_of, factory, grid) in METHODS.items():
        batch = batch_of(len(y))
        tried = {lr: train(X, y, factory(lr), batch) for lr in grid}
        finite = {lr: c for lr, c in tried.items() if len(c) == EPOCHS and np.isfinite(c[-1])}
        lr = min(finite, key=lambda k: finite[k][-1])
        results[name] = (lr, finite[lr])
    epochs_shown = [1, 2, 5, 10, 20, 30]
    print(f"{'method':<22}{'lr':>8}  " + "".join(f"{'ep ' + str(e):>11}" for e in epochs_shown))
    for name, (lr, curve) in results.items():
        cells = "".join(f"{curve[e - 1]:>11.5f}" for e in epochs_shown)
        print(f"{name:<22}{lr:>8.0e}  {cells}")
    print("\nexcess loss over the optimum after the last epoch:")
    for name, (lr, curve) in results.items():
        print(f"  {name:<22}{curve[-1] - best_possible:.2e}")
    return results, best_possible


if __name__ == "__main__":
    main()
