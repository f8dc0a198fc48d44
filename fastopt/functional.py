"""The functional layer: in-place update functions for users who keep their own state.

One function per rule, named after it with a trailing underscore (in place)::

    fastopt.functional.adam_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *,
                             step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.0, amsgrad=False, maximize=False,
                             clip_value=None, l1=0.0, param_min=None, param_max=None,
                             max_norm=None, grad_scale=None, backend="auto")

* positional arrays after ``grad``: the rule's state slots in the registry's order
  (torch's state names); a slot the configuration does not use may be ``None``;
* ``step``: the number of this step, starting at 1 (bias corrections, lr decay);
  SGD's momentum buffer is set to the gradient when ``step == 1``, as torch does
  when it creates the buffer;
* hyperparameters and fused options: the same names, defaults and checks as the
  classes; ``grad_scale`` divides the gradient inside the update pass;
* ``grad`` may be a dense array or a row-sparse gradient (:class:`fastopt.RowSparse`,
  scipy.sparse): lazy mode, touched rows only;
* NAdam also takes ``mu_product`` (the product of the previous mu's, 1.0 before the
  first step) and returns the new one; ASGD takes ``eta`` and ``mu`` (the step size
  and averaging weight, ``lr`` and 1.0 before the first step) and returns the new
  ones as a dict; the others return None.

The work is planned by :mod:`fastopt.planner`, the planner the optimizer classes use,
so every option and backend behaves exactly as through the classes.  Everything is
validated before any array is written; a gradient or state array that shares memory
with the parameter or another state array is refused.
"""

import inspect

import numpy as np

from . import backends, factored, planner, rules, state_io
from .param_groups import refuse_overlaps
from .rules import fused
from .sparse import checked_rows, is_sparse


def _apply(rule, param, grad, slot_arrays, step, host, backend, hyper, grad_scale):
    group = rule.check_group({**rule.defaults, **hyper})
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) \
            or not 1 <= step <= state_io.MAX_STEP:
        raise ValueError(f"Invalid step: {step!r} (the number of this step, >= 1)")
    for k, v in host.items():
        why = rule.host_check(k, v)       # (the rule's check: NAdam's (0, 1], ASGD's ...)
        if why is not None:
            raise ValueError(f"Invalid {k}: {v!r} ({why})")
    bk = backends.resolve(backend, sample=param)
    spec = planner.group_spec(rule, group)
    if rule.layout == "rowwise":
        bk.require("rowwise", f"the row-wise rule {rule.name}")
    if any(spec.switches[1:]):
        bk.require("fused_options")
    gs = fused.check_grad_scale(grad_scale)
    p = bk.as_param(param, "param")
    if p.dtype.kind != "f":
        raise TypeError("param: the functional layer takes float32 and float64 parameters; "
                        "bfloat16 parameters and low-precision state are kept by the "
                        "optimizer classes (state_bits=..., bf16_update=...)")
    if gs is not None:
        bk.require("grad_scale")
        fused.check_grad_scale_dtypes(gs, [p.dtype])
    if rule.param_reason is not None and rule.param_reason(p.shape) is not None:
        raise ValueError(rule.param_reason(p.shape))
    if gs is not None and rule.matrix is not None:
        raise ValueError(f"{rule.name}: grad_scale is not supported: the update pass reads "
                         "the orthogonalized matrix in the gradient's place")
    if rule.layout == "rowwise" and p.ndim == 0:
        raise ValueError(f"{rule.name} needs a parameter with at least one dimension")
    if rule.factored:
        return _apply_factored(rule, bk, group, p, grad, slot_arrays, step, gs)
    slots = []
    for name, used, arr in zip(rule.slots, spec.uses, slot_arrays):
        if not used:
            slots.append(None)
            continue
        if arr is None:
            raise ValueError(f"{rule.name}: state {name!r} is required by this configuration")
        a = bk.as_param(arr, name)
        if a.shape != rule.slot_shape(p.shape) or a.dtype != p.dtype:
            raise ValueError(f"state {name!r} has shape {a.shape} and dtype {a.dtype}; "
                             f"expected {rule.slot_shape(p.shape)} and {p.dtype}")
        slots.append(a)
    refuse_overlaps([p] + [s for s in slots if s is not None], bk, "array (param, state...)")
    sparse = is_sparse(grad) and not isinstance(grad, np.ndarray)
    if sparse and rule.whole_tensor:
        raise ValueError("grad: " + rule.tensor_refusal("a row-sparse gradient"))
    if rule.per_tensor:
        bk.require("tensor_norms", f"the per-tensor rule {rule.name}")
    if rule.matrix is not None:
        bk.require("matrix", f"the matrix rule {rule.name}")
    if sparse:
        bk.require("sparse_lazy")
        idx, vals = checked_rows(grad, p, "grad")
        g = vals
    else:
        (g,), _ = bk.check_grads([grad], [p], ["grad"])
    owned = [p] + [s for s in slots if s is not None]
    if g.size and any(_shares(bk, g, a) for a in owned):
        raise ValueError("grad shares memory with the parameter or a state array; pass a "
                         "separate gradient array (e.g. grad.copy())")
    # everything checked: plan and run
    fresh = set(rule.slots) if step == 1 else set()
    row, new_host = rule.row(group, int(step), host, fresh, gs)
    slots += [None] * (rules.NSLOTS - len(slots))
    state = {n: a for n, a in zip(rule.slots, slots) if a is not None}
    state.update(host)
    ref = (group, int(step), state, fresh)
    if sparse or spec.by_rows:
        if p.size and (not sparse or idx.shape[0]):
            work = planner.rows_work(rule, spec, p, slots, row,
                                     idx if sparse else None, g, gs, ref=ref,
                                     inverse=bk.plan_inverse)
            bk.run_rows(work)
        return new_host
    (b,) = planner.dense_buckets(rule, bk, [(p, slots, spec, 0)])
    work = planner.fill_bucket(b, np.array([bk.address(g)], dtype=np.int64), [g], [row], gs,
                               all_active=True)
    work.ref = [ref]
    if rule.per_tensor and not getattr(bk, "wants_reference_args", False):
        planner.tensor_scalars(rule, bk, [work], [[group]])
    if rule.matrix is not None and not getattr(bk, "wants_reference_args", False):
        from . import matrix_phase
        matrix_phase.run(bk, [work], [[group]])
    bk.run_dense(work)
    return new_host


def _apply_factored(rule, bk, group, p, grad, slot_arrays, step, gs):
    """A factored rule (Adafactor): the slots the parameter's shape has (torch's
    keepdim shapes), checked, then :func:`fastopt.factored.run_tensor`."""
    bk.require("factored", f"the factored rule {rule.name}")
    mine = rule.slots_of(p.shape)
    state = {}
    for name, arr in zip(rule.slots, slot_arrays):
        if name not in mine:
            if arr is not None:
                raise ValueError(f"{rule.name}: a parameter of shape {p.shape} has no state "
                                 f"{name!r} (it has {', '.join(mine)})")
            continue
        if arr is None:
            raise ValueError(f"{rule.name}: state {name!r} is required for a parameter of "
                             f"shape {p.shape}")
        a = bk.as_param(arr, name)
        shape = rule.slot_shape(p.shape, name)
        if a.shape != shape or a.dtype != p.dtype:
            raise ValueError(f"state {name!r} has shape {a.shape} and dtype {a.dtype}; "
                             f"expected {shape} and {p.dtype}")
        state[name] = a
    refuse_overlaps([p] + list(state.values()), bk, "array (param, state...)")
    if is_sparse(grad) and not isinstance(grad, np.ndarray):
        raise ValueError("grad: " + factored.refusal(rule, "a row-sparse gradient"))
    if gs is not None:
        raise ValueError(factored.refusal(rule, "grad_scale"))
    (g,), _ = bk.check_grads([grad], [p], ["grad"])
    if g.size and any(_shares(bk, g, a) for a in [p] + list(state.values())):
        raise ValueError("grad shares memory with the parameter or a state array; pass a "
                         "separate gradient array (e.g. grad.copy())")
    factored.run_tensor(bk, rule, group, int(step), p, g, state)
    return {}


def _shares(bk, a, b):
    lo1, lo2 = bk.address(a), bk.address(b)
    return lo1 < lo2 + b.nbytes and lo2 < lo1 + a.nbytes and a.nbytes and b.nbytes


def _fname(rule):
    """``Adam`` -> ``adam_``, ``RowWiseAdagrad`` -> ``rowwise_adagrad_``."""
    return {"RowWiseAdagrad": "rowwise_adagrad"}.get(rule.name, rule.name.lower()) + "_"


def _make(rule):
    hyper_names = list(rule.defaults)
    host_names = list(rule.host_init(rule.defaults))

    def fn(param, grad, *slot_arrays, step, backend="auto", grad_scale=None, **kwargs):
        if len(slot_arrays) > len(rule.slots):
            raise TypeError(f"{fn.__name__}() takes at most {len(rule.slots)} state arrays "
                            f"({', '.join(rule.slots)})")
        host = {}
        # host scalars not given start as the state of a new parameter would (ASGD's
        # eta is the lr given here, checked first so that a bad one is named)
        init = rule.host_init(rule.check_group(
            {k: kwargs[k] for k in hyper_names if k in kwargs})) if host_names else {}
        for k, v in init.items():
            x = kwargs.pop(k, v)
            if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
                raise ValueError(f"Invalid {k}: {x!r} (expected a number)")
            host[k] = float(x)
        slot_kw = set(rule.slots)
        unknown = set(kwargs) - set(hyper_names) - slot_kw
        if unknown:
            raise TypeError(f"{fn.__name__}() got unexpected keyword(s) {sorted(unknown)}")
        slot_arrays = list(slot_arrays) + [None] * (len(rule.slots) - len(slot_arrays))
        for k, name in enumerate(rule.slots):
            if name in kwargs:
                if slot_arrays[k] is not None:
                    raise TypeError(f"{fn.__name__}() got {name!r} twice")
                slot_arrays[k] = kwargs.pop(name)
        new_host = _apply(rule, param, grad, slot_arrays, step, host, backend, kwargs,
                          grad_scale)
        if host_names:
            return new_host[host_names[0]] if len(host_names) == 1 else new_host
        return None

    P = inspect.Parameter
    params = [P("param", P.POSITIONAL_ONLY), P("grad", P.POSITIONAL_ONLY)]
    params += [P(s, P.POSITIONAL_OR_KEYWORD, default=None) for s in rule.slots]
    params += [P("step", P.KEYWORD_ONLY)]
    params += [P(k, P.KEYWORD_ONLY, default=v) for k, v in rule.defaults.items()]
    params += [P(k, P.KEYWORD_ONLY, default=v) for k, v in rule.host_init(rule.defaults).items()]
    params += [P("grad_scale", P.KEYWORD_ONLY, default=None),
               P("backend", P.KEYWORD_ONLY, default="auto")]
    fn.__signature__ = inspect.Signature(params)
    fn.__name__ = fn.__qualname__ = _fname(rule)
    fn.__doc__ = (f"In-place {rule.name} step on one parameter (see fastopt.{rule.name} "
                  f"for the equations).  State arrays: {', '.join(rule.slots)}.")
    return fn


for _rule in rules.RULES.values():
    globals()[_fname(_rule)] = _make(_rule)

__all__ = [_fname(r) for r in rules.RULES.values()]
