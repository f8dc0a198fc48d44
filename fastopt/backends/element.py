"""The one element step of the Numba drivers (CPU and CUDA), and what feeds it.

Every Numba driver, whatever it loops over (chunks of dense tensors on the CPU,
touched rows of a sparse gradient, CUDA grid-stride loops), updates an element by::

    p, s0 = catch_up(p, s0, coef)            exact sparse mode: skipped steps (optional)
    g = pre(g, c)                            g / grad_scale, clip to +-clip_value
    p, s0, s1, s2 = rule.math(p, g, s0, s1, s2, c)
    p = post(p, c)                           L1 soft-threshold, clamp to [param_min, param_max]

(``max_norm`` needs a whole row and runs right after a row is updated.)  The
pieces are chosen at compile time, so an option that is off costs nothing:

* :func:`scalar_loader` builds ``load(hyper, r)``: row ``r`` of the float64 scalar
  table as the rule's ``Scalars`` NamedTuple in the parameter's dtype, with the
  fields fixed for the configuration (option flags, zero weight decay) compiled in;
* :func:`element_step` composes pre, the rule's math and post for a tuple of
  switches (:data:`fastopt.rules.fused.SWITCHES`);
* :func:`apply_catch_up` applies a row's 2x2 catch-up map (float64 coefficients
  from the rule's closed form, :func:`catch_up_table`).

The loader is generated from the ``Scalars`` declaration (the only place that
knows a field's column), so adding a field or a rule needs no change here.
"""

import numpy as np

from .._jit import numba as _numba, register_jitable

_numba()   # a kernel module: numba now (and the registrations pending in fastopt._jit)
from numba import njit  # noqa: E402

from ..rules.fused import post, pre

_LOADERS = {}
_STEPS = {}
_TABLES = {}


def scalar_loader(Scalars, dtype, fixed=()):
    """A jitable ``load(hyper, r) -> Scalars`` in ``dtype``; the ``fixed`` fields
    ``((name, value), ...)`` are compile-time constants."""
    key = (Scalars, np.dtype(dtype).str, tuple(fixed))
    fn = _LOADERS.get(key)
    if fn is not None:
        return fn
    values = dict(fixed)
    unknown = set(values) - set(Scalars._fields)
    if unknown:
        raise ValueError(f"{Scalars.__name__} has no field(s) {sorted(unknown)}")
    DT = np.dtype(dtype).type
    ns = {"NT": Scalars, "DT": DT}
    args = []
    for k, name in enumerate(Scalars._fields):
        if name in values:
            ns[f"K_{name}"] = DT(values[name])
            args.append(f"K_{name}")
        else:
            args.append(f"DT(hyper[r, {k}])")
    src = "def load(hyper, r):\n    return NT(" + ", ".join(args) + ")\n"
    code = compile(src, f"<fastopt scalar loader {Scalars.__name__}>", "exec")
    exec(code, ns)
    fn = _LOADERS[key] = register_jitable(ns["load"])
    return fn


def element_step(math, switches):
    """The jitable ``step(p, g, s0, s1, s2, c, zero) -> (p, s0, s1, s2)``: fused
    pre-processing, the rule's math, fused post-processing."""
    key = (math, tuple(bool(s) for s in switches[:5]))
    fn = _STEPS.get(key)
    if fn is not None:
        return fn
    MATH = math
    SC, CL, L1, LO, HI = key[1]

    def step(p, g, s0, s1, s2, c, zero):
        g = pre(g, c, SC, CL)
        p, s0, s1, s2 = MATH(p, g, s0, s1, s2, c)
        p = post(p, c, zero, L1, LO, HI)
        return p, s0, s1, s2

    fn = _STEPS[key] = register_jitable(step)
    return fn


@register_jitable
def _term(k, x):
    """``k * x`` in float64, where a zero coefficient contributes an exact zero (so an
    Inf or NaN that the skipped steps never mixed in cannot leak through ``0 * x``)."""
    if k == 0.0:
        return 0.0
    return k * x


@register_jitable
def apply_catch_up(p, s0, a, b, c, e, DT):
    """``(p, s0) <- (a p + b s0, c p + e s0)``, formed in float64 (terms with a zero
    coefficient left out), stored in ``DT``."""
    fp = np.float64(p)
    fs = np.float64(s0)
    return DT(_term(a, fp) + _term(b, fs)), DT(_term(c, fp) + _term(e, fs))


def catch_up_table(rule):
    """A compiled ``table(ks, firsts, hyper_row) -> (n, 4) float64``: row ``q`` is the
    rule's closed form for ``ks[q]`` skipped steps (identity for ``ks[q] <= 0``);
    ``firsts[q]``: SGD's momentum buffer was created at the first skipped step."""
    fn = _TABLES.get(rule.catch_up)
    if fn is not None:
        return fn
    COEFF = rule.catch_up
    LOAD = scalar_loader(rule.Scalars, np.float64)

    def table(ks, firsts, hyper):
        h = LOAD(hyper, 0)
        out = np.empty((ks.shape[0], 4), dtype=np.float64)
        for q in range(ks.shape[0]):
            if ks[q] <= 0:
                out[q, 0], out[q, 1], out[q, 2], out[q, 3] = 1.0, 0.0, 0.0, 1.0
            else:
                a, b, c, e = COEFF(ks[q], firsts[q], h)
                out[q, 0], out[q, 1], out[q, 2], out[q, 3] = a, b, c, e
        return out

    fn = _TABLES[rule.catch_up] = njit(cache=False, nogil=True)(table)
    return fn
