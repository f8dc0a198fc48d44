"""The NumPy reference: what every kernel must compute.

One readable whole-array function per rule, written from torch.optim's documented
algorithms and independent of :mod:`fastopt.rules` (bias corrections are computed
here from ``beta ** step``, not taken from the registry's host scalars), so it can
serve as the oracle.

Signature of every function::

    ref(param, grad, state, group, step, fresh=())

* ``param`` is updated in place; ``grad`` is read only.
* ``state``: dict of the rule's state arrays used by this configuration (same shape
  and dtype as ``param``, updated in place) and host scalars (NAdam's
  ``mu_product``, replaced in the dict).
* ``group``: the hyperparameters (a validated param-group dict).
* ``step``: this step's count, starting at 1.
* ``fresh``: state names created for this step (SGD's momentum buffer starts as
  the gradient, as in torch).

Arithmetic stays in the parameter's dtype (NumPy 2 keeps float32 when combined
with Python floats), mirroring the kernels' rounding closely.  Use float64 arrays
for a float64 oracle.
"""

import math

import numpy as np


def _signed_grad(grad, group):
    return -grad if group.get("maximize", False) else grad


def _l2(g, param, weight_decay):
    return g + weight_decay * param if weight_decay != 0 else g


def sgd(param, grad, state, group, step, fresh=()):
    g = _l2(_signed_grad(grad, group), param, group["weight_decay"])
    momentum = group["momentum"]
    if momentum != 0:
        buf = state["momentum_buffer"]
        if "momentum_buffer" in fresh:
            buf[...] = g
        else:
            buf[...] = momentum * buf + (1 - group["dampening"]) * g
        g = g + momentum * buf if group["nesterov"] else buf
    param -= group["lr"] * g


def adagrad(param, grad, state, group, step, fresh=()):
    g = _l2(_signed_grad(grad, group), param, group["weight_decay"])
    clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
    s = state["sum"]
    s += g * g
    param -= clr * g / (np.sqrt(s) + group["eps"])


def rmsprop(param, grad, state, group, step, fresh=()):
    g = _l2(_signed_grad(grad, group), param, group["weight_decay"])
    alpha, eps = group["alpha"], group["eps"]
    sq = state["square_avg"]
    sq[...] = alpha * sq + (1 - alpha) * g * g
    if group["centered"]:
        ga = state["grad_avg"]
        ga[...] = alpha * ga + (1 - alpha) * g
        avg = np.sqrt(sq - ga * ga) + eps
    else:
        avg = np.sqrt(sq) + eps
    if group["momentum"] > 0:
        buf = state["momentum_buffer"]
        buf[...] = group["momentum"] * buf + g / avg
        param -= group["lr"] * buf
    else:
        param -= group["lr"] * (g / avg)


def _adam(param, grad, state, group, step, decoupled):
    b1, b2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    g = _signed_grad(grad, group)
    if decoupled:
        param *= 1 - lr * wd
    else:
        g = _l2(g, param, wd)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    bias_correction1 = 1 - b1 ** step
    bias_correction2 = 1 - b2 ** step
    if group["amsgrad"]:
        vmax = state["max_exp_avg_sq"]
        np.maximum(vmax, v, out=vmax)
        vhat = vmax
    else:
        vhat = v
    denom = np.sqrt(vhat) / math.sqrt(bias_correction2) + group["eps"]
    param -= (lr / bias_correction1) * (m / denom)


def adam(param, grad, state, group, step, fresh=()):
    """Adam with L2 weight decay added to the gradient (torch.optim.Adam)."""
    _adam(param, grad, state, group, step, decoupled=False)


def adamw(param, grad, state, group, step, fresh=()):
    """Adam with decoupled weight decay p <- p (1 - lr wd) (torch.optim.AdamW)."""
    _adam(param, grad, state, group, step, decoupled=True)


def adamax(param, grad, state, group, step, fresh=()):
    b1, b2 = group["betas"]
    g = _l2(_signed_grad(grad, group), param, group["weight_decay"])
    m, u = state["exp_avg"], state["exp_inf"]
    m[...] = b1 * m + (1 - b1) * g
    np.maximum(b2 * u, np.abs(g) + group["eps"], out=u)
    param -= (group["lr"] / (1 - b1 ** step)) * (m / u)


def nadam(param, grad, state, group, step, fresh=()):
    b1, b2 = group["betas"]
    lr, wd, psi = group["lr"], group["weight_decay"], group["momentum_decay"]
    g = _signed_grad(grad, group)
    if group["decoupled_weight_decay"]:
        param *= 1 - lr * wd
    else:
        g = _l2(g, param, wd)
    mu = b1 * (1 - 0.5 * 0.96 ** (step * psi))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((step + 1) * psi))
    mu_product = state["mu_product"] * mu
    state["mu_product"] = mu_product
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = b1 * m + (1 - b1) * g
    v[...] = b2 * v + (1 - b2) * g * g
    denom = np.sqrt(v) / math.sqrt(1 - b2 ** step) + group["eps"]
    param -= (lr * (1 - mu) / (1 - mu_product)) * (g / denom)
    param -= (lr * mu_next / (1 - mu_product * mu_next)) * (m / denom)


def lion(param, grad, state, group, step, fresh=()):
    b1, b2 = group["betas"]
    lr = group["lr"]
    g = _signed_grad(grad, group)
    m = state["exp_avg"]
    update = b1 * m + (1 - b1) * g
    param *= 1 - lr * group["weight_decay"]
    param -= lr * np.sign(update)
    m[...] = b2 * m + (1 - b2) * g


def rowwise_adagrad(param, grad, state, group, step, fresh=()):
    """Row-wise Adagrad: state ``sum`` has one entry per row (first axis)::

        g = -g if maximize;  g = g + weight_decay * p
        sum_r = sum_r + mean_j(g_rj^2);   p_rj = p_rj - clr * g_rj / (sqrt(sum_r) + eps)
    """
    if param.size == 0:
        return
    nrows = param.shape[0]
    p2 = param.reshape(nrows, -1)
    g = _l2(_signed_grad(grad.reshape(nrows, -1), group), p2, group["weight_decay"])
    clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
    s = state["sum"].reshape(-1)
    s += np.mean(g * g, axis=1)
    p2 -= clr * g / (np.sqrt(s)[:, None] + group["eps"])
