"""Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural
networks"; torch.optim.Muon): momentum, then each matrix replaced by an approximate
orthogonalization of itself (Newton-Schulz), then a decoupled-decay step.

Equations (state ``momentum_buffer`` B; momentum mu; coefficients (a, b, c)), per
matrix (the last two axes of a parameter of shape ``[..., M, N]``; every leading
index is a matrix of its own)::

    B = lerp(B, g, 1 - mu)                       # B = mu B + (1 - mu) g
    U = lerp(g, B, mu) if nesterov else B        # U = (1 - mu) g + mu B
    X = U (transposed when M > N, so that X is wide),  X = X / max(||X||_F, eps)
    repeat ns_steps times:
        A = X X^T;  P = b A + c A A;  X = a X + P X
    O = X (transposed back)
    p = p * (1 - lr * weight_decay)              # decoupled decay
    p = p - lr * r * O,   r = sqrt(max(1, M / N))        (adjust_lr_fn None, "original")
                          r = 0.2 * sqrt(max(M, N))      ("match_rms_adamw")

Defaults are torch's: ``lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
ns_coefficients=(3.4445, -4.775, 2.0315), eps=1e-7, ns_steps=5, adjust_lr_fn=None``;
fastopt adds ``ns_dtype`` (below).  ``lerp`` is torch's (``a + w (b - a)`` for
``w < 0.5``, else ``b - (b - a)(1 - w)``).  The NS of a zero matrix is zero (the
norm is clamped to ``eps``, ``0 / eps = 0``); a NaN anywhere in a matrix makes that
matrix's norm NaN and so its whole update NaN, and leaves the other matrices (of a
batched parameter too) alone.

Choices (where fastopt differs from torch, and why):

* **dtype of the orthogonalization** (``ns_dtype``): torch casts U to bfloat16 and
  runs the iterations there.  fastopt runs them in the parameter's dtype by default
  (``ns_dtype=None``: float32 for float32 parameters, float64 for float64), or in
  the dtype named (``"float32"``, ``"float64"``).  ``"bfloat16"`` runs torch's own
  iterations through torch's bfloat16 GEMM (CPU; :func:`newton_schulz_bf16`), the
  one bfloat16 GEMM at hand: NumPy and SciPy's BLAS have none, so without torch it
  is refused (emulating one would be slower than float32).
* **batched matrices**: a parameter of shape ``[..., M, N]`` (``ndim >= 2``) is a
  stack of matrices, each orthogonalized on its own, with ``r`` from ``(M, N)``.
  Parameters with ``ndim < 2`` are refused (use :func:`fastopt.muon_param_groups`
  to send them to AdamW).
* **matrix products**: through NumPy's matmul, i.e. the BLAS NumPy links
  (OpenBLAS here).  ``X @ X.T`` is recognized by NumPy, which calls ``?syrk``
  (half the flops of a GEMM); ``A @ A`` and ``P @ X`` are GEMMs.  Calling
  ``scipy.linalg.blas.ssyrk`` on ``A`` for ``A A`` (A is symmetric) and ``sgemm``
  with ``beta=a`` for ``a X + P X`` were measured (1024x1024 and 1024x4096
  float32, 2-core VM, best of 5): ``ssyrk(A)`` 88 ms against 80 ms for ``A @ A``,
  ``sgemm(beta)`` 117-174 ms against 72-176 ms for ``P @ X`` plus the add; a whole
  iteration through ``scipy.linalg.blas.sgemm`` with ``beta`` (torch's ``addmm``
  form, F-order views, no copies) took 593/1345 ms per NS of a 1024x1024/1024x4096
  matrix against 461/1011 ms with NumPy (best of 4, interleaved): neither paid, so
  the plain matmuls are kept.  The sums and scalings run in place (no temporary
  arrays besides the products; the same operations, so the same bits).
* **rule math once**: the element phases are the jitable :func:`momentum` (phase 1,
  called on whole arrays by the matrix phase, :mod:`fastopt.backends.matrix_cpu`,
  and by :func:`reference`) and :func:`element` (phase 2, run by every backend's
  dense drivers with the orthogonalized, ``r``-scaled matrix in the gradient's
  place).  :func:`newton_schulz` is the one copy of the matrix phase's math.
* no ``maximize`` (torch's Muon has none); dense gradients only (a row-sparse
  gradient would orthogonalize a matrix of mostly zeros, and exact sparse mode has
  no closed form); no ``clip_value``/``max_norm``/``grad_scale`` (they act on the
  gradient slot of the update pass, which holds O here); ``l1``, ``param_min``,
  ``param_max`` act on the parameter after the step, as for every rule.
"""

import math

import numpy as np

from .._jit import register_jitable
from . import hyperparams as hp
from .base import Rule, scalars_type

Scalars = scalars_type("MuonScalars", (
    "lr", "decay", "momentum", "one_minus_momentum", "nesterov"))

DEFAULT_COEFFICIENTS = (3.4445, -4.775, 2.0315)
NS_DTYPES = {None: None, "float32": np.float32, "float64": np.float64,
             "bfloat16": np.float32}      # bfloat16: torch's GEMM, widened to float32


def host_scalars(group, step, host, fresh):
    lr, mu = group["lr"], group["momentum"]
    return dict(lr=lr, decay=1.0 - lr * group["weight_decay"], momentum=mu,
                one_minus_momentum=1.0 - mu, nesterov=float(group["nesterov"])), host


@register_jitable
def lerp(a, b, w, one_minus_w):
    """torch's lerp: ``a + w (b - a)`` for ``w < 0.5``, else ``b - (b - a)(1 - w)``."""
    if w < 0.5:
        return a + w * (b - a)
    return b - (b - a) * one_minus_w


@register_jitable
def momentum(g, buf, c):
    """Phase 1 of one element (or of whole arrays): the new momentum buffer and the
    direction U that is orthogonalized."""
    buf = lerp(buf, g, c.one_minus_momentum, c.momentum)
    if c.nesterov:
        return buf, lerp(g, buf, c.momentum, c.one_minus_momentum)
    return buf, buf


@register_jitable
def element(p, o, buf, unused1, unused2, c):
    """Phase 2 of one element: ``o`` (in the gradient's place) is ``r * O``."""
    p = p * c.decay - c.lr * o
    return p, buf, unused1, unused2


def adjust_ratio(adjust_lr_fn, shape):
    """torch's ``_adjust_lr`` ratio, from the matrix shape ``shape[-2:]``."""
    m, n = shape[-2:]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return math.sqrt(max(1, m / n))
    return 0.2 * math.sqrt(max(m, n))


def ns_dtype(group, dtype):
    """The dtype the orthogonalization of a parameter of ``dtype`` runs in."""
    return np.dtype(NS_DTYPES[group["ns_dtype"]] or dtype)


def newton_schulz(u, coefficients, steps, eps, dtype):
    """The orthogonalization of every matrix of ``u`` (``[..., M, N]``), computed in
    ``dtype``; returns a new array of ``dtype`` and ``u``'s shape."""
    a, b, c = (dtype.type(x) for x in coefficients)
    if u.size == 0:
        return np.zeros(u.shape, dtype=dtype)
    m, n = u.shape[-2:]
    tall = m > n
    src = u.reshape(-1, m, n)
    out = np.empty(src.shape, dtype=dtype)
    eps = dtype.type(eps)
    for k in range(src.shape[0]):
        x = np.array(src[k].T if tall else src[k], dtype=dtype, order="C")
        norm = np.linalg.norm(x)
        if not np.isfinite(norm) and np.isfinite(x).all():   # the squares overflowed
            amax = np.abs(x).max()
            norm = amax * np.linalg.norm(x / amax)
        x /= norm if not norm < eps else eps       # a NaN norm stays NaN (torch's clamp)
        for _ in range(steps):
            gram = x @ x.T                          # NumPy calls ?syrk for this
            p = gram @ gram
            p *= c
            gram *= b
            p += gram                               # b A + c A A
            t = p @ x
            x *= a
            x += t                                  # a X + P X, in place
        out[k] = x.T if tall else x
    return out.reshape(u.shape)


def newton_schulz_bf16(u, coefficients, steps, eps):
    """:func:`newton_schulz` in bfloat16 through torch's bfloat16 GEMM (CPU), the
    operations of ``torch.optim._muon._zeropower_via_newtonschulz`` (torch 2.13);
    returns float32 (bfloat16 values widened)."""
    import torch
    a, b, c = coefficients
    if u.size == 0:
        return np.zeros(u.shape, dtype=np.float32)
    m, n = u.shape[-2:]
    tall = m > n
    src = torch.from_numpy(np.ascontiguousarray(u).reshape(-1, m, n))
    out = np.empty((src.shape[0], m, n), dtype=np.float32)
    for k in range(src.shape[0]):
        x = src[k].bfloat16()
        if tall:
            x = x.T
        x.div_(x.norm().clamp(min=eps))
        for _ in range(steps):
            gram = x @ x.T
            x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        if tall:
            x = x.T
        out[k] = x.float().numpy()
    return out.reshape(u.shape)


def orthogonalized(u, group, dtype):
    """What phase 2 reads in the gradient's place: ``r * NS(U)`` in ``dtype`` (the
    parameter's), with ``r`` the shape's learning-rate ratio (formed in float64)."""
    if group["ns_dtype"] == "bfloat16":
        o = newton_schulz_bf16(u, group["ns_coefficients"], group["ns_steps"], group["eps"])
    else:
        o = newton_schulz(u, group["ns_coefficients"], group["ns_steps"], group["eps"],
                          ns_dtype(group, dtype))
    r = adjust_ratio(group["adjust_lr_fn"], u.shape)
    out = o.astype(dtype, copy=False)          # o is ours: scaled in place
    if r != 1.0:
        out *= dtype.type(r)
    return out


def scalars_of(row, dtype):
    """The Scalars tuple of a float64 row, in ``dtype`` (as the drivers load it)."""
    t = np.dtype(dtype).type
    return Scalars(*(t(v) for v in row[:len(Scalars._fields)]))


def reference(param, grad, state, group, step, fresh=()):
    from . import fused
    dt = param.dtype
    own, _ = host_scalars(group, step, {}, fresh)
    c = scalars_of(fused.scalars(group) + tuple(own[k] for k in Scalars._fields[
        len(fused.FIELDS):]), dt)
    buf = state["momentum_buffer"]
    buf[...], u = momentum(grad, buf, c)
    o = orthogonalized(np.asarray(u, dtype=dt), group, dt)
    param[...] = element(param, o, buf, 0.0, 0.0, c)[0]


# ------------------------------------------------------------------ checks
def _coefficients(name, value):
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"Invalid {name}: {value!r} (expected three numbers (a, b, c))")
    return tuple(hp.real(f"{name}[{k}]", v) for k, v in enumerate(value))


def _ns_steps(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not 1 <= value < 100:
        raise ValueError(f"Invalid {name}: {value!r} (expected an integer in [1, 100))")
    return int(value)


def _adjust_lr_fn(name, value):
    if value not in (None, "original", "match_rms_adamw"):
        raise ValueError(f"Invalid {name}: {value!r} (expected None, 'original' or "
                         "'match_rms_adamw')")
    return value


def _ns_dtype(name, value):
    if value == "bfloat16":
        import importlib.util
        if importlib.util.find_spec("torch") is None:
            raise ValueError(f"Invalid {name}: 'bfloat16' needs a bfloat16 GEMM: torch "
                             "(CPU) has one, and is not installed; NumPy and SciPy's BLAS "
                             "have none (use None, 'float32' or 'float64')")
        return value
    if isinstance(value, type) or isinstance(value, np.dtype):
        value = np.dtype(value).name
    if value not in NS_DTYPES:
        raise ValueError(f"Invalid {name}: {value!r} (expected None, 'float32', 'float64' "
                         "or 'bfloat16')")
    return value


def cross_check(group):
    for key in ("clip_value", "max_norm"):
        if group.get(key) is not None:
            raise ValueError(
                f"Muon: {key} is not supported: the update pass reads the orthogonalized "
                "matrix in the gradient's place (clip the gradients before the step; "
                "renormalize rows after it)")


def torch_state_in(sd):
    """torch.optim.Muon keeps no step count: a parameter's state without ``step`` is
    loaded as step 1 (it has had at least one step; the count is informative only,
    Muon's math does not read it).  fastopt.torch.Muon's own state dicts keep their
    ``step``, which torch.optim.Muon loads and ignores."""
    if not isinstance(sd, dict) or not isinstance(sd.get("state"), dict):
        return sd                     # (the drop-in's own checks name the problem)
    state = {}
    for k, st in sd["state"].items():
        if isinstance(st, dict) and st and "step" not in st:
            st = {**st, "step": 1}
        state[k] = st
    return {**sd, "state": state}


def param_reason(shape):
    """None when a parameter of ``shape`` can be given to Muon, else why not."""
    if len(shape) < 2:
        return (f"Muon orthogonalizes matrices; a parameter of shape {tuple(shape)} "
                f"(ndim {len(shape)} < 2) is not one. Give vectors, biases, norms (and "
                "usually embeddings and the output head) to AdamW: "
                "fastopt.muon_param_groups(named_params) splits a model's parameters "
                "into the two groups (docs/muon.md)")
    return None


RULE = Rule(
    name="Muon",
    doc="""Muon (torch.optim.Muon): momentum, Newton-Schulz orthogonalization of each
        matrix, decoupled weight decay.

        ``B = lerp(B, g, 1 - momentum)``; ``U = lerp(g, B, momentum)`` if nesterov else
        ``B``; ``O = NS(U)`` per matrix (the last two axes; ``ns_steps`` quintic
        iterations with ``ns_coefficients`` on ``U / max(||U||_F, eps)``, transposed
        when tall); ``p *= 1 - lr weight_decay``; ``p -= lr r O`` with
        ``r = sqrt(max(1, M / N))`` (``adjust_lr_fn`` None or ``"original"``) or
        ``0.2 sqrt(max(M, N))`` (``"match_rms_adamw"``).  ``ns_dtype``: the dtype of the
        iterations (None: the parameter's; ``"float32"``, ``"float64"``; ``"bfloat16"``,
        torch's iterations through torch's bfloat16 GEMM, when torch is installed).  Parameters of
        ndim >= 2 only (split a model with :func:`fastopt.muon_param_groups`), dense
        gradients; float32/float64/bfloat16 parameters, 32/16/8-bit state.
        """,
    defaults=dict(lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
                  ns_coefficients=DEFAULT_COEFFICIENTS, eps=1e-7, ns_steps=5,
                  adjust_lr_fn=None, ns_dtype=None),
    checks=dict(lr=hp.non_negative, weight_decay=hp.non_negative,
                momentum=hp.unit_half_open, nesterov=hp.boolean,
                ns_coefficients=_coefficients, eps=hp.positive, ns_steps=_ns_steps,
                adjust_lr_fn=_adjust_lr_fn, ns_dtype=_ns_dtype),
    slots=("momentum_buffer",),
    uses_slots=lambda group: (True, False, False),
    Scalars=Scalars,
    host_scalars=host_scalars,
    math=element,
    reference=reference,
    layout="matrix",
    matrix=orthogonalized,
    phase1=momentum,
    param_reason=param_reason,
    cross_check=cross_check,
    storage_note=(
        "phase 1 decodes the momentum buffer (16- or 8-bit) and encodes it once per "
        "step; the matrix phase runs on the float32 direction; phase 2 stores the "
        "bfloat16 parameter with its bf16_update. Against float32 over 50 steps (lr "
        "0.02, (64, 128) and (2, 32, 48), tests/test_muon.py), the RMS drift over the "
        "RMS distance moved: 16-bit state 0.29%, 8-bit 0.82%; bfloat16 parameters "
        "\"split\" 0 (float32's bits), \"kahan\" 0.19%, \"nearest\" 0.97%, "
        "\"stochastic\" 1.4%"),
    flags=("nesterov",),
    torch_state_in=torch_state_in,
    variants=({}, {"nesterov": False, "weight_decay": 0.0},
              {"adjust_lr_fn": "match_rms_adamw", "momentum": 0.5, "lr": 2e-2,
               "ns_steps": 3}),
)
