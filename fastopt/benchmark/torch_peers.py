"""torch-based peers for rules torch.optim does not have (LAMB, LARS), written as
fast as torch allows on this CPU: multi-tensor ``torch._foreach_*`` operations for
the element-wise parts and ``torch._foreach_norm`` for the per-tensor norms (timm's
``Lamb`` and ``Lars`` loop over tensors with one kernel per operation; the foreach
form does the same math in fewer, larger launches).  The benchmark times them beside
fastopt (``torch-foreach``); tests/test_tensor_rules.py checks them against
fastopt's NumPy reference, so a fast peer is also a right one.

Each ``make_<rule>(torch, params, grads, group)`` returns a zero-argument step over
torch tensors sharing memory with the given NumPy arrays.
"""


def make_lamb(torch, params, grads, group):
    ps = [torch.from_numpy(p) for p in params]
    gs = [torch.from_numpy(g) for g in grads]
    ms = [torch.zeros_like(p) for p in ps]
    vs = [torch.zeros_like(p) for p in ps]
    b1, b2 = group["betas"]
    lr, eps, wd, clip = group["lr"], group["eps"], group["weight_decay"], group["trust_clip"]
    t = [0]

    @torch.no_grad()
    def step():
        t[0] += 1
        torch._foreach_lerp_(ms, gs, 1 - b1)                  # m = b1 m + (1 - b1) g
        torch._foreach_mul_(vs, b2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - b2)           # v = b2 v + (1 - b2) g^2
        bc1, bc2 = 1 - b1 ** t[0], 1 - b2 ** t[0]
        den = torch._foreach_div(vs, bc2)
        torch._foreach_sqrt_(den)
        torch._foreach_add_(den, eps)
        u = torch._foreach_div(ms, bc1)
        torch._foreach_div_(u, den)
        if wd:
            torch._foreach_add_(u, ps, alpha=wd)
        pn = torch._foreach_norm(ps)
        un = torch._foreach_norm(u)
        for p, uu, a, b in zip(ps, u, pn, un):
            a, b = float(a), float(b)
            r = a / b if a > 0 and b > 0 else 1.0
            if clip is not None:
                r = min(r, clip)
            p.add_(uu, alpha=-lr * r)
    return step


def make_lars(torch, params, grads, group):
    ps = [torch.from_numpy(p) for p in params]
    gs = [torch.from_numpy(g) for g in grads]
    bufs = [torch.zeros_like(p) for p in ps]
    lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
    tc, eps, nesterov = group["trust_coefficient"], group["eps"], group["nesterov"]

    @torch.no_grad()
    def step():
        pn = torch._foreach_norm(ps)
        gn = torch._foreach_norm(gs)
        locs = []
        for a, b in zip(pn, gn):
            a, b = float(a), float(b)
            locs.append(tc * a / (b + wd * a + eps) if a > 0 and b > 0 else 1.0)
        d = torch._foreach_add(gs, ps, alpha=wd) if wd else [g.clone() for g in gs]
        torch._foreach_mul_(d, locs)
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, d)
        if nesterov:
            torch._foreach_add_(d, bufs, alpha=mom)
            torch._foreach_add_(ps, d, alpha=-lr)
        else:
            torch._foreach_add_(ps, bufs, alpha=-lr)
    return step


#: rule name -> maker
PEERS = {"LAMB": make_lamb, "LARS": make_lars}


def newton_schulz_same_dtype(grad, ns_coefficients, ns_steps, eps):
    """torch.optim's ``_zeropower_via_newtonschulz`` (torch 2.13) without its cast to
    bfloat16: the same operations in the gradient's dtype.  Monkeypatched into
    ``torch.optim._muon`` it makes ``torch.optim.Muon`` the peer of fastopt.Muon's
    float32/float64 iterations (tests/test_muon.py compares them; bench/muon_bench.py
    times it as equal work)."""
    import torch
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho_grad = grad.clone()
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    ortho_grad.div_(ortho_grad.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram_matrix = ortho_grad @ ortho_grad.T
        gram_update = torch.addmm(gram_matrix, gram_matrix, gram_matrix, beta=b, alpha=c)
        ortho_grad = torch.addmm(ortho_grad, gram_update, ortho_grad, beta=a)
    if grad.size(0) > grad.size(1):
        ortho_grad = ortho_grad.T
    return ortho_grad
