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
* :func:`refusal` says what a factored rule refuses before anything is written;
* :func:`group_plan` / :class:`GroupPlan`: on a backend with the optional grouped
  capability (``factored_group``: numba, :mod:`fastopt.backends.numba_factored_group`)
  the tensors below :data:`PARALLEL_MIN` elements of one dtype take one driver call
  per step, each tensor's passes and host work compiled and run by one thread
  (``prange`` over the tensors), the same bits as :func:`run_tensor`; the larger
  tensors take :func:`run_tensor` (parallel within the tensor).

Every sum is float64 in an order fixed by the shape (per row in 8 lanes, element j
to lane j % 8, the lanes then the tail added in order; the
column sums per block of ``FACTOR_ROWS`` rows, the blocks added in order; vectors
per chunk of ``CHUNK`` elements, the chunks in order), so the result does not
depend on the thread count, and Numba and Cython give the same bits.
"""

import numpy as np

from ._py_util import data_address
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


def step(opt, active, dense, specs, owner, gptr=None):
    """One step of the parameters ``active`` (indices) with dense gradients
    ``dense`` (aligned with ``active``; ``gptr`` their addresses, as the engine's
    gradient check gave them), for :class:`fastopt.Optimizer`.

    On a backend with the grouped capability (``Backend.factored_group``) the
    tensors below :data:`PARALLEL_MIN` elements take one driver call per dtype
    (:func:`group_plan`, cached with the engine's plan key); the others, and every
    tensor on other backends, :func:`run_tensor` one by one.  The bits are the same
    either way."""
    opt._allocate_state(active, specs, owner)
    bk = opt.backend
    params, states, steps = opt._params, opt._state, opt._steps
    grouped = getattr(bk, "factored_group", None)
    rest = range(len(active))
    if grouped is not None and gptr is not None:
        key = (tuple(active), opt._plan_version, opt._groups.spec_version)
        plan = getattr(opt, "_factored_plan", None)
        if plan is None or plan[0] != key:
            plan = opt._factored_plan = (key, group_plan(opt, active, specs, owner))
        subplans, rest = plan[1]
        for sp in subplans:
            sp.ptrs[:, 1] = gptr[sp.pos]
            sidx, scal = sp.scalars(steps, specs)
            grouped(sp.ptrs, sp.dims, sp.sqn, sidx, scal, sp.dtype)
    for k in rest:
        i = active[k]
        run_tensor(bk, opt.rule, specs[owner[i]].group, int(steps[i]) + 1, params[i],
                   dense[k], states[i])
    steps[active] += 1


class GroupPlan:
    """The tensors of one dtype stepped by one grouped driver call: positions
    ``pos`` in the step's active list, parameter indices ``idx``, their param groups
    ``gown``, and the tables ``ptrs`` (param, grad, two state addresses), ``dims``
    (``B, R, C, n``; ``B = 0`` for a vector) and ``sqn`` (``n ** 0.5``) of
    :mod:`fastopt.backends.numba_factored_group`."""

    def __init__(self, rule, dtype, pos, idx, gown, ptrs, dims, sqn):
        self.rule, self.dtype, self.pos, self.idx, self.gown = rule, dtype, pos, idx, gown
        self.ptrs, self.dims, self.sqn = ptrs, dims, sqn

    def scalars(self, steps, specs):
        """This step's ``(sidx, scal)``: one float64 row per (param group, step
        number) among the tensors (``w, rho, decay, eps1, eps2, d, maximize``, the
        host scalars of :func:`run_tensor`), ``sidx`` each tensor's row."""
        t = steps[self.idx].astype(np.int64) + 1
        keys = self.gown * (int(t.max()) + 1) + t
        uniq, sidx = np.unique(keys, return_inverse=True)
        scal = np.empty((len(uniq), 7), dtype=np.float64)
        for r, kk in enumerate(uniq):
            k = int(np.argmax(keys == kk))
            group = specs[int(self.gown[k])].group
            sc, _ = self.rule.host_scalars(group, int(t[k]), {}, ())
            scal[r] = (sc["beta2_weight"], sc["rho"], sc["decay"],
                       eps1_of(group, self.dtype), sc["eps2"], sc["d"],
                       1.0 if sc["maximize"] else 0.0)
        return sidx.astype(np.int64).reshape(-1), scal


def group_plan(opt, active, specs, owner):
    """``(subplans, rest)``: a :class:`GroupPlan` per parameter dtype for the
    non-empty tensors below :data:`PARALLEL_MIN` elements, and the positions (in
    ``active``) of the larger ones, which take :func:`run_tensor` (parallel
    within the tensor)."""
    params, states = opt._params, opt._state
    by_dtype, rest = {}, []
    for k, i in enumerate(active):
        p = params[i]
        if p.size == 0:
            continue
        if p.size >= PARALLEL_MIN or p.dtype not in (np.float32, np.float64):
            rest.append(k)
            continue
        by_dtype.setdefault(p.dtype, []).append(k)
    subplans = []
    for dtype, ks in by_dtype.items():
        T = len(ks)
        ptrs = np.zeros((T, 4), dtype=np.int64)
        dims = np.zeros((T, 4), dtype=np.int64)
        sqn = np.empty(T, dtype=np.float64)
        for t, k in enumerate(ks):
            i = active[k]
            p, st = params[i], states[i]
            ptrs[t, 0] = data_address(p)
            if p.ndim >= 2:
                R, C = p.shape[-2:]
                dims[t, :3] = (p.size // (R * C), R, C)
                rv, cv = st["row_var"], st["col_var"]
                for a in (rv, cv):
                    if not (a.flags.c_contiguous and a.dtype == p.dtype):
                        raise ValueError(f"parameter {i}: Adafactor state must be "
                                         f"C-contiguous {p.dtype} arrays")
                ptrs[t, 2], ptrs[t, 3] = data_address(rv), data_address(cv)
            else:
                v = st["variance"]
                if not (v.flags.c_contiguous and v.dtype == p.dtype):
                    raise ValueError(f"parameter {i}: Adafactor state must be "
                                     f"C-contiguous {p.dtype} arrays")
                ptrs[t, 2] = ptrs[t, 3] = data_address(v)
            dims[t, 3] = p.size
            sqn[t] = p.size ** 0.5
        pos = np.asarray(ks, dtype=np.int64)
        idx = np.asarray([active[k] for k in ks], dtype=np.int64)
        gown = np.asarray([owner[active[k]] for k in ks], dtype=np.int64)
        subplans.append(GroupPlan(opt.rule, dtype, pos, idx, gown, ptrs, dims, sqn))
    return subplans, rest


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
