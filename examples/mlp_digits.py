"""A small MLP on scikit-learn's digits, trained four ways: SGD, SGD + Nesterov
momentum, RMSprop and Adam.

The network (64-128-64-10, ReLU, softmax cross-entropy) and its backward pass are
written by hand in NumPy (float32); fastopt does the rest of the training loop:

* ``fastopt.init.kaiming_uniform_`` initializes the weights (seeded) -- every
  optimizer starts from the *same* weights;
* every optimizer sees the *same* mini-batches (one seeded shuffle per epoch);
* the learning rate follows a linear warm-up then a cosine decay, per step
  (``SequentialLR`` of ``LinearLR`` and ``CosineAnnealingLR``);
* the global gradient norm is clipped (``fastopt.clip.clip_grad_norm_``) before
  every step.

Before training, the backward pass is checked against central finite differences
in float64 on a tiny batch (relative error < 1e-5), so the example verifies itself.

The data (8x8 images, 1,797 samples) ship inside scikit-learn: nothing is
downloaded.  The split is stratified and seeded; features are standardized with
the training set's statistics.

Run:  python examples/mlp_digits.py [--epochs 25] [--plot mlp_digits_loss.png]
Needs scikit-learn; the loss plot needs matplotlib (skipped with a note without it).
"""

import argparse
import sys
import time

import numpy as np

import fastopt
from fastopt import lr_scheduler
from fastopt.clip import clip_grad_norm_
from fastopt.init import kaiming_uniform_

SEED = 0
SIZES = (64, 128, 64, 10)
EPOCHS = 25
BATCH = 32
WARMUP = 0.1          # fraction of all steps spent warming up
MAX_GRAD_NORM = 1.0
SHOW_EVERY = 5        # table: every SHOW_EVERY epochs (and the first and last)

#: name -> (peak learning rate, optimizer factory)
OPTIMIZERS = {
    "SGD": (0.1, lambda p, lr: fastopt.SGD(p, lr=lr)),
    "SGD+Nesterov": (0.05, lambda p, lr: fastopt.SGD(p, lr=lr, momentum=0.9, nesterov=True)),
    "RMSprop": (1e-3, lambda p, lr: fastopt.RMSprop(p, lr=lr)),
    "Adam": (2e-3, lambda p, lr: fastopt.Adam(p, lr=lr)),
}


# ------------------------------------------------------------------------------ data

def load_data(seed=SEED):
    """Stratified 75/25 split of the digits, standardized with the train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y,
                                              random_state=seed)
    mean = X_tr.mean(axis=0)
    std = X_tr.std(axis=0)
    std[std == 0] = 1.0                       # border pixels that are always blank
    X_tr = ((X_tr - mean) / std).astype(np.float32)
    X_te = ((X_te - mean) / std).astype(np.float32)
    return X_tr, y_tr.astype(np.int64), X_te, y_te.astype(np.int64)


# ----------------------------------------------------------------------------- model

def init_params(seed=SEED, sizes=SIZES, dtype=np.float32):
    """Weights ``W{i}`` of shape [out, in] (torch's Linear layout), Kaiming-uniform
    for ReLU (linear gain for the output layer); biases zero."""
    rng = np.random.default_rng(seed)
    params = {}
    last = len(sizes) - 2
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = np.empty((n_out, n_in), dtype=dtype)
        kaiming_uniform_(W, nonlinearity="linear" if i == last else "relu", rng=rng)
        params[f"W{i + 1}"] = W
        params[f"b{i + 1}"] = np.zeros(n_out, dtype=dtype)
    return params


def forward(params, X):
    """Logits and the activations the backward pass needs."""
    n_layers = len(params) // 2
    acts = [X]
    h = X
    for i in range(1, n_layers + 1):
        z = h @ params[f"W{i}"].T + params[f"b{i}"]
        h = np.maximum(z, 0) if i < n_layers else z
        acts.append(h)
    return h, acts


def loss_and_grads(params, X, y, need_grads=True):
    """Mean softmax cross-entropy and its gradients (a dict like ``params``)."""
    logits, acts = forward(params, X)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_sum
    n = len(y)
    loss = -float(log_probs[np.arange(n), y].astype(np.float64).mean())
    if not need_grads:
        return loss, logits
    delta = np.exp(log_probs)                 # softmax
    delta[np.arange(n), y] -= 1
    delta /= n                                # d loss / d logits
    grads = {}
    for i in range(len(params) // 2, 0, -1):
        h_in = acts[i - 1]
        grads[f"W{i}"] = delta.T @ h_in
        grads[f"b{i}"] = delta.sum(axis=0)
        if i > 1:
            delta = (delta @ params[f"W{i}"]) * (h_in > 0)   # back through the ReLU
    return loss, grads


def evaluate(params, X, y):
    loss, logits = loss_and_grads(params, X, y, need_grads=False)
    return loss, float((logits.argmax(axis=1) == y).mean())


def gradient_check(X, y, n=8, per_tensor=40, eps=1e-6, tol=1e-5, seed=SEED):
    """Compare the backward pass with central differences in float64 on ``n``
    samples (``per_tensor`` random entries of each parameter).  Returns the largest
    relative error ``|g - g_fd| / (|g| + |g_fd|)`` (norms over a tensor's entries)."""
    rng = np.random.default_rng(seed)
    params = {k: v.astype(np.float64) for k, v in init_params(seed).items()}
    for k in params:
        if k.startswith("b"):                 # non-zero biases: test their path fully
            params[k] += 0.1 * rng.standard_normal(params[k].shape)
    Xb, yb = X[:n].astype(np.float64), y[:n]
    _, grads = loss_and_grads(params, Xb, yb)
    worst = 0.0
    for name, p in params.items():
        flat = p.reshape(-1)
        idx = rng.choice(flat.size, size=min(per_tensor, flat.size), replace=False)
        numeric = np.empty(len(idx))
        for j, k in enumerate(idx):
            old = flat[k]
            flat[k] = old + eps
            plus = loss_and_grads(params, Xb, yb, need_grads=False)[0]
            flat[k] = old - eps
            minus = loss_and_grads(params, Xb, yb, need_grads=False)[0]
            flat[k] = old
            numeric[j] = (plus - minus) / (2 * eps)
        analytic = grads[name].reshape(-1)[idx]
        rel = np.linalg.norm(analytic - numeric) / max(
            np.linalg.norm(analytic) + np.linalg.norm(numeric), 1e-30)
        worst = max(worst, float(rel))
    assert worst < tol, f"gradient check failed: relative error {worst:.2e} >= {tol:.0e}"
    return worst


# -------------------------------------------------------------------------- training

def train(name, data, init, epochs, batch=BATCH, seed=SEED):
    """Train a copy of ``init``; returns per-epoch curves (index 0 = before training)."""
    X_tr, y_tr, X_te, y_te = data
    peak_lr, make_opt = OPTIMIZERS[name]
    params = {k: v.copy() for k, v in init.items()}
    opt = make_opt(params, peak_lr)
    steps_per_epoch = -(-len(y_tr) // batch)
    total = epochs * steps_per_epoch
    warmup = max(1, int(WARMUP * total))
    sched = lr_scheduler.SequentialLR(
        opt,
        [lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup),
         lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=0.0)],
        milestones=[warmup])
    rng = np.random.default_rng(seed + 1)     # same batches for every optimizer
    train_loss, test_acc, grad_norm = [], [], []

    def record():
        train_loss.append(evaluate(params, X_tr, y_tr)[0])
        test_acc.append(evaluate(params, X_te, y_te)[1])

    record()
    for _ in range(epochs):
        order = rng.permutation(len(y_tr))
        norms = []
        for start in range(0, len(y_tr), batch):
            idx = order[start:start + batch]
            _, grads = loss_and_grads(params, X_tr[idx], y_tr[idx])
            norms.append(clip_grad_norm_(grads, MAX_GRAD_NORM))
            opt.step(grads)
            sched.step()
        grad_norm.append(float(np.mean(norms)))
        record()
    return {"lr": peak_lr, "train_loss": train_loss, "test_acc": test_acc,
            "grad_norm": grad_norm}


def print_table(results, epochs):
    shown = sorted({0, 1, epochs, *range(SHOW_EVERY, epochs + 1, SHOW_EVERY)})
    head = f"{'optimizer':<14}{'peak lr':>8}  " + "".join(f"{'ep ' + str(e):>13}"
                                                      for e in shown)
    print(head)
    print(" " * 24 + "".join(f"{'loss/acc':>13}" for _ in shown))
    for name, r in results.items():
        cells = "".join(f"{r['train_loss'][e]:>7.3f}/{r['test_acc'][e]:.3f}" for e in shown)
        print(f"{name:<14}{r['lr']:>8.0e}  {cells}")


def save_plot(results, path):
    """Train-loss and test-accuracy curves; returns False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        epochs = np.arange(len(r["train_loss"]))
        ax_loss.plot(epochs, r["train_loss"], label=f"{name} (lr {r['lr']:g})")
        ax_acc.plot(epochs, r["test_acc"], label=name)
    ax_loss.set(yscale="log", xlabel="epoch", ylabel="train loss (cross-entropy)",
                title="Training loss")
    ax_acc.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy", ylim=(0.8, 1.0))
    for ax in (ax_loss, ax_acc):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("MLP 64-128-64-10 on digits: warm-up + cosine, grad-norm clip "
                 f"{MAX_GRAD_NORM:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def main(argv=None):
    """Run the comparison; returns ``{optimizer: curves}`` (see :func:`train`)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=EPOCHS, help=f"default {EPOCHS}")
    ap.add_argument("--plot", default="mlp_digits_loss.png", metavar="PATH",
                    help="where to save the loss curves (default: %(default)s)")
    ap.add_argument("--no-plot", action="store_true", help="do not save a plot")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs must be >= 1")

    try:
        import sklearn  # noqa: F401
    except ImportError:
        sys.exit("this example needs scikit-learn: pip install scikit-learn")
    t0 = time.perf_counter()
    data = load_data()
    X_tr, y_tr, X_te, y_te = data
    err = gradient_check(X_tr, y_tr)
    print(f"gradient check (float64, finite differences): max relative error {err:.1e}")
    print(f"digits: {len(y_tr)} train / {len(y_te)} test, {X_tr.shape[1]} features; "
          f"MLP {'-'.join(map(str, SIZES))}; {args.epochs} epochs of batch {BATCH}, "
          f"warm-up {WARMUP:.0%} + cosine, clip norm {MAX_GRAD_NORM:g}\n")

    init = init_params()
    results = {name: train(name, data, init, args.epochs) for name in OPTIMIZERS}

    print_table(results, args.epochs)
    print("\nfinal test accuracy:")
    for name, r in results.items():
        print(f"  {name:<14}{r['test_acc'][-1]:.4f}   (train loss {r['train_loss'][-1]:.4f})")
    if not args.no_plot:
        if save_plot(results, args.plot):
            print(f"\nloss curves saved to {args.plot}")
        else:
            print("\nmatplotlib is not installed: no plot (pip install matplotlib)")
    print(f"({time.perf_counter() - t0:.1f} s)")
    return results


if __name__ == "__main__":
    main()
