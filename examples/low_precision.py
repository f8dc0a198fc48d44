"""Train one model three ways: float32, and bfloat16 parameters and gradients with
8-bit Adam state ("split" and "stochastic" bfloat16 updates).  Prints the loss
curves, the optimizer's memory and its step time side by side.

    python examples/low_precision.py [--steps 300]

The model is a two-layer MLP (256 -> 512 -> 16, tanh) fitted to a random teacher
network of the same shape; the forward and backward passes run in float32 from
the bfloat16 parameters (as mixed-precision training does), the optimizer keeps
the parameters in bfloat16 and its state in 8 bits.
"""

import argparse
import time

import numpy as np

import fastopt
from fastopt import storage

BF16 = storage.BF16


def make_data(n=4096, d=256, h=512, k=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w1 = rng.standard_normal((d, h)).astype(np.float32) / np.sqrt(d)
    w2 = rng.standard_normal((h, k)).astype(np.float32) / np.sqrt(h)
    y = np.tanh(x @ w1) @ w2
    return x, y.astype(np.float32)


def init(d=256, h=512, k=16, seed=1):
    rng = np.random.default_rng(seed)
    return {"w1": (rng.standard_normal((d, h)) / np.sqrt(d)).astype(np.float32),
            "b1": np.zeros(h, np.float32),
            "w2": (rng.standard_normal((h, k)) / np.sqrt(h)).astype(np.float32),
            "b2": np.zeros(k, np.float32)}


def loss_and_grads(params, x, y):
    w1, b1, w2, b2 = (params[k].astype(np.float32) for k in ("w1", "b1", "w2", "b2"))
    a = np.tanh(x @ w1 + b1)
    out = a @ w2 + b2
    err = out - y
    loss = float((err ** 2).mean())
    d_out = 2 * err / err.size
    d_a = (d_out @ w2.T) * (1 - a * a)
    return loss, {"w1": x.T @ d_a, "b1": d_a.sum(0), "w2": a.T @ d_out, "b2": d_out.sum(0)}


def train(setup, steps, batch=256, seed=2):
    x, y = make_data()
    params = {k: v.astype(setup["dtype"]) for k, v in init().items()}
    opt = fastopt.Adam(params, lr=2e-3, **setup["options"])
    rng = np.random.default_rng(seed)
    losses, step_time = [], 0.0
    for t in range(steps):
        idx = rng.integers(0, x.shape[0], batch)
        loss, grads = loss_and_grads(params, x[idx], y[idx])
        grads = {k: g.astype(setup["grad_dtype"]) for k, g in grads.items()}
        t0 = time.perf_counter()
        opt.step(grads)
        step_time += time.perf_counter() - t0
        if t % 50 == 0 or t == steps - 1:
            losses.append(loss_and_grads(params, x, y)[0])
    state = opt.state_dict()["state"]
    state_bytes = sum(v.nbytes for st in state.values() for v in st.values()
                      if isinstance(v, np.ndarray))
    param_bytes = sum(p.nbytes for p in params.values())
    nparams = sum(p.size for p in params.values())
    return dict(losses=losses, final=losses[-1], state_bytes=state_bytes,
                param_bytes=param_bytes, nparams=nparams, step_ms=step_time / steps * 1e3)


SETUPS = {
    "float32": dict(dtype=np.float32, grad_dtype=np.float32, options={}),
    "bf16 + 8-bit state, split": dict(dtype=BF16, grad_dtype=BF16,
                                      options=dict(state_bits=8)),
    "bf16 + 8-bit state, stochastic": dict(dtype=BF16, grad_dtype=BF16,
                                           options=dict(state_bits=8,
                                                        bf16_update="stochastic")),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    results = {name: train(s, args.steps) for name, s in SETUPS.items()}
    print(f"{'setup':34s} {'final loss':>10s} {'params B/param':>15s} "
          f"{'state B/param':>14s} {'step ms':>8s}")
    for name, r in results.items():
        print(f"{name:34s} {r['final']:10.5f} {r['param_bytes'] / r['nparams']:15.2f} "
              f"{r['state_bytes'] / r['nparams']:14.2f} {r['step_ms']:8.3f}")
    print("loss every 50 steps:")
    for name, r in results.items():
        print(f"  {name:32s} " + " ".join(f"{v:.4f}" for v in r["losses"]))
    return results


if __name__ == "__main__":
    main()
