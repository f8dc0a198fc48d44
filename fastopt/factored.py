"""The factored shape of the step engine (``Rule.layout == "factored"``: Adafactor).

A factored rule keeps state whose shapes are not the parameter's (``row_var``
(..., R, 1) and ``col_var`` (..., 1, C) for a tensor of 2 or more dimensions,
``variance`` for a vector), and each tensor's update reads reductions of the whole
tensor made in between passes.  The engine's hooks are here, so the element-wise
planner and its buckets stay as they are:

* :func:`step` is what :meth:`fastopt.Optimizer._step_dense` runs for such a rule
  (the state is made by the engine's ``_allocate_state`` with the rule's
  ``slots_of``/``slot_shape``);
* :func:`run_tensor` is one tensor's step, used by :func:`step` and by the
  functional layer: the backend's passes (``Backend.factored_sums``,
  ``factored_usq``, ``factored_apply`` for tensors of 2 or more dimensions,
  ``vector_sums``, ``vector_usq``, ``vector_apply`` for the others; numba:
  :mod:`fastopt.backends.numba_factored`, cython: ``kernels/_cy_factored.pxi``)
  with the host work between them (the lerps of the small factors, the means, the
  step size), or, on the NumPy reference backend, the rule's ``reference``;
* :func:`refusal` says what a factored rule refuses before anything is written.

Every sum is float64 in an order fixed by the shape (per row in 8 lanes, element j
to lane j % 8, the lanes then the tail added in order; the
column sums per block of ``FACTOR_ROWS`` rows, the blocks added in order; vectors
per chunk of ``CHUNK`` elements, the chunks in order), so the result does not
depend on the thread count, and Numba and Cython give the same bits.
"""

import numpy as np

from .rules.adafactor import alpha_of, divisor_of, eps1_of, lerp_host

#: a tensor of at least this many elements runs the parallel drivers of the passes
#: (Numba ``prange``, Cython OpenMP), a smaller one the serial drivers.  Higher than
#: the element-wise rules' ``PARALLEL_MIN``: each tensor takes three passes, each a
#: parallel region with a serial tail (the sums in order), and on the shared 2-core
#: VM 600 tensors of 65K elements stepped 4-7x faster serially (75 ms against
#: 350-540 ms, float32, loaded by other work).  The results are the same bits
#: either way (tests/test_adafactor.py).
PARALLEL_MIN = 1 << 22


def refusal(rule, what):
    """The message refusing ``what`` for a factored rule."""
    return (f"{rule.name} updates whole tensors (row and column sums of the gradient, "
            f"then the RMS of the update, then the update pass); {what} is not "
            "supported for it")


def check_step(rule, grad_scale, sparse_i):
    """Refuse, before anything is written, what a factored step cannot take."""
    if sparse_i:
        raise ValueError(f"gradient {sparse_i[0]}: " + refusal(rule, "a row-sparse gradient"))
    if grad_scale is not None:
        raise ValueError(refusal(rule, "step(grad_scale=...)") + "; divide the gradients "
                         "before the step")


def step(opt, active, dense, specs, owner):
    """One step of the parameters ``active`` (indices) with dense gradients
    ``dense`` (aligned with ``active``), for :class:`fastopt.Optimizer`."""
    opt._allocate_state(active, specs, owner)
    bk = opt.backend
    params, states, steps = opt._params, opt._state, opt._steps
    for i, g in zip(active, dense):
        run_tensor(bk, opt.rule, specs[owner[i]].group, int(steps[i]) + 1, params[i], g,
                   states[i])
    steps[active] += 1


def run_tensor(bk, rule, group, step, p, g, state):
    """One tensor's step: ``p`` and ``state`` (its slots by name) updated in place
    from the dense gradient ``g`` at step number ``step``."""
    if p.size == 0:
        return
    if getattr(bk, "wants_reference_args", False):
        with np.errstate(all="ignore"):     # NaN/Inf propagate silently, as in the kernels
            rule.reference(p, g, state, group, step)
        return
    if getattr(bk, "memory", "host") == "device":   # the state is on the device: the
        bk.factored_tensor(rule, group, step, p, g, state)  # host work runs there too
        return
    sc, _ = rule.host_scalars(group, step, {}, ())
    dt = p.dtype.type
    eps1 = eps1_of(group, p.dtype)
    e2 = dt(eps1 * eps1)
    sign = dt(-1) if sc["maximize"] else dt(1)
    one = dt(1)
    n = p.size
    if p.ndim >= 2:
        R, C = p.shape[-2:]
        B = n // (R * C)
        P, G = p.reshape(-1), g.reshape(-1)
        rv = state["row_var"].reshape(B, R)
        cv = state["col_var"].reshape(B, C)
        rows, cols, psq = bk.factored_sums(P, G, B, R, C)
        alpha = alpha_of(sc["rho"], sc["eps2"], psq, n)
        with np.errstate(all="ignore"):
            # torch: norm(G, dim) squared and divided, in the parameter's dtype
            nr = np.sqrt(rows).astype(dt)
            nc = np.sqrt(cols).astype(dt)
            lerp_host(rv, nr * nr / dt(C), sc["beta2_weight"])
            lerp_host(cv, nc * nc / dt(R), sc["beta2_weight"])
            m = rv.mean(axis=1, dtype=np.float64).astype(dt)
            m = np.where(m < dt(eps1), dt(eps1), m)      # a NaN mean stays NaN
        usq = bk.factored_usq(G, rv.reshape(-1), cv.reshape(-1), m, B, R, C, e2, sign, one)
        s = dt(-alpha / divisor_of(usq, n, sc["d"]))
        bk.factored_apply(P, G, rv.reshape(-1), cv.reshape(-1), m, B, R, C, e2, sign, one,
                          dt(sc["decay"]), s)
    else:
        P, G, V = p.reshape(-1), g.reshape(-1), state["variance"].reshape(-1)
        w = dt(sc["beta2_weight"])
        psq = bk.vector_sums(P, G, V, w, one - w, sign)
        alpha = alpha_of(sc["rho"], sc["eps2"], psq, n)
        usq = bk.vector_usq(G, V, e2, sign, one)
        s = dt(-alpha / divisor_of(usq, n, sc["d"]))
        bk.vector_apply(P, G, V, e2, sign, one, dt(sc["decay"]), s)


__all__ = ["step", "run_tensor", "refusal", "check_step"]
