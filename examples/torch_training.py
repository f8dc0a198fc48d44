"""Training PyTorch models with fastopt.torch and with torch.optim, side by side.

Two small tasks, each trained twice from the same initial weights on the same
batches, once with a ``fastopt.torch`` optimizer and once with its ``torch.optim``
counterpart; only the optimizer class differs (``import fastopt.torch`` and swap
the class name):

1. an MLP classifier (sklearn's 8x8 digits when scikit-learn is installed, else a
   synthetic 10-class problem of the same shape), ``AdamW`` with a
   ``OneCycleLR`` schedule;
2. a matrix-factorization recommender with ``nn.Embedding(sparse=True)`` tables on
   Zipf(1.2)-distributed user/item ids: ``fastopt.torch.Adam`` (lazy sparse Adam)
   against ``torch.optim.SparseAdam``.

It prints the loss curves (they coincide: the update rules are the same) and the
median ``optimizer.step()`` time of each.  ``--quick`` runs fewer steps.

    python examples/torch_training.py [--quick] [--seed 0]
"""

import argparse
import copy
import time

import numpy as np
import torch

import fastopt.torch as ft


def digits_data(seed):
    try:
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y, source = d.data.astype(np.float32) / 16.0, d.target.astype(np.int64), \
            "sklearn digits"
    except ImportError:
        rng = np.random.default_rng(seed)
        centers = rng.standard_normal((10, 64)).astype(np.float32)
        y = rng.integers(0, 10, 1797)
        x = (centers[y] + 2.5 * rng.standard_normal((1797, 64))).astype(np.float32)
        source = "synthetic 10-class data (scikit-learn not installed)"
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    x, y = torch.from_numpy(x[order]), torch.from_numpy(y[order])
    return x[:1500], y[:1500], x[1500:], y[1500:], source


def train(model, opt, sched, batches, loss_fn):
    losses, times = [], []
    for batch in batches:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses, float(np.median(times) * 1e3)


def mlp_task(steps, seed):
    xtr, ytr, xte, yte, source = digits_data(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    g = torch.Generator().manual_seed(seed)
    batches = [torch.randint(0, len(ytr), (64,), generator=g) for _ in range(steps)]

    def loss_fn(m, idx):
        return torch.nn.functional.cross_entropy(m(xtr[idx]), ytr[idx])

    out = {}
    for label, cls in (("fastopt.torch", ft.AdamW), ("torch.optim", torch.optim.AdamW)):
        m = copy.deepcopy(model)
        opt = cls(m.parameters(), lr=3e-3, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
        losses, ms = train(m, opt, sched, batches, loss_fn)
        with torch.no_grad():
            acc = (m(xte).argmax(1) == yte).float().mean().item()
        out[label] = dict(loss=losses, step_ms=ms, test_acc=acc)
    return f"MLP on {source}, AdamW + OneCycleLR", out


def recommender_task(steps, seed, users=20_000, items=5_000, dim=32, batch=1024):
    rng = np.random.default_rng(seed)
    true_u = rng.standard_normal((users, 4)).astype(np.float32)
    true_i = rng.standard_normal((items, 4)).astype(np.float32)

    def ids(n, size):
        return np.minimum(rng.zipf(1.2, size) - 1, n - 1)

    data = []
    for _ in range(steps):
        u, i = ids(users, batch), ids(items, batch)
        r = (true_u[u] * true_i[i]).sum(1) + 0.1 * rng.standard_normal(batch)
        data.append((torch.from_numpy(u), torch.from_numpy(i),
                     torch.from_numpy(r.astype(np.float32))))
    torch.manual_seed(seed)

    class MF(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.u = torch.nn.Embedding(users, dim, sparse=True)
            self.i = torch.nn.Embedding(items, dim, sparse=True)
            torch.nn.init.normal_(self.u.weight, std=0.1)
            torch.nn.init.normal_(self.i.weight, std=0.1)

        def forward(self, u, i):
            return (self.u(u) * self.i(i)).sum(1)

    model = MF()

    def loss_fn(m, b):
        u, i, r = b
        return torch.nn.functional.mse_loss(m(u, i), r)

    out = {}
    for label, cls in (("fastopt.torch", ft.Adam), ("torch.optim", torch.optim.SparseAdam)):
        m = copy.deepcopy(model)
        opt = cls(m.parameters(), lr=1e-2)
        losses, ms = train(m, opt, None, data, loss_fn)
        out[label] = dict(loss=losses, step_ms=ms)
    return (f"matrix factorization, nn.Embedding({users:,}/{items:,}, {dim}, sparse=True), "
            f"Zipf(1.2) ids, Adam (lazy) vs SparseAdam"), out


def report(title, out, every):
    print(f"\n{title}")
    print(f"  {'step':>6}  {'fastopt.torch loss':>18}  {'torch.optim loss':>16}")
    f, t = out["fastopt.torch"]["loss"], out["torch.optim"]["loss"]
    for k in list(range(0, len(f), every)) + [len(f) - 1]:
        print(f"  {k + 1:>6}  {f[k]:18.5f}  {t[k]:16.5f}")
    for label, r in out.items():
        extra = f", test accuracy {r['test_acc']:.3f}" if "test_acc" in r else ""
        print(f"  {label:<14} median optimizer.step(): {r['step_ms']:.3f} ms{extra}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a few seconds)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    mlp_steps, rec_steps = (60, 40) if args.quick else (300, 150)
    results = {}
    for title, out in (mlp_task(mlp_steps, args.seed),
                       recommender_task(rec_steps, args.seed)):
        report(title, out, every=max(1, len(out["fastopt.torch"]["loss"]) // 8))
        results[title] = out
    return results


if __name__ == "__main__":
    main()
