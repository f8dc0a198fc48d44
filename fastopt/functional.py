"""The functional layer: in-place update functions for users who keep their own state.

One function per rule, named after it with a trailing underscore (in place)::

    fastopt.functional.adam_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *,
                             step, lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                             weight_decay=0.0, amsgrad=False, maximize=False,
                             backend="auto")

* positional arrays after ``grad``: the rule's state slots in the registry's order
  (torch's state names); a slot the configuration does not use may be ``None``;
* ``step``: the number of this step, starting at 1 (bias corrections, lr decay);
  SGD's momentum buffer is set to the gradient when ``step == 1``, as torch does
  when it creates the buffer;
* hyperparameters: the same names, defaults and checks as the classes;
* NAdam also takes ``mu_product`` (the product of the previous mu's, 1.0 before the
  first step) and returns the new one; the others return None.

Everything is validated before any array is written.
"""

import inspect

import numpy as np

from . import backends, registry
from ._cy_util import data_address
from ._numba_cpu import make_chunks
from .arrays import as_grad, as_param
from .registry import NSLOTS


def _apply(rule, param, grad, slot_arrays, step, host, backend, hyper):
    group = rule.check_group({**rule.defaults, **hyper})
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"Invalid step: {step!r} (the number of this step, >= 1)")
    bk = backends.resolve(backend)
    p = as_param(param, "param")
    g = as_grad(grad, p, "grad")
    uses = rule.uses_slots(group)
    slots = []
    for name, used, arr in zip(rule.slots, uses, slot_arrays):
        if not used:
            slots.append(None)
            continue
        if arr is None:
            raise ValueError(f"{rule.name}: state {name!r} is required by this configuration")
        a = as_param(arr, name)
        if a.shape != rule.slot_shape(p.shape) or a.dtype != p.dtype:
            raise ValueError(f"state {name!r} has shape {a.shape} and dtype {a.dtype}; "
                             f"expected {rule.slot_shape(p.shape)} and {p.dtype}")
        slots.append(a)
    fresh = set(rule.slots) if step == 1 else set()
    scal, new_host = rule.scalars(group, int(step), host, fresh)
    state = {n: a for n, a in zip(rule.slots, slots) if a is not None}
    state.update(host)
    if rule.layout == "rowwise":     # whole rows: every row once through the row driver
        if p.ndim == 0:
            raise ValueError(f"{rule.name} needs a parameter with at least one dimension")
        if p.size == 0:
            return new_host
        rows = np.arange(p.shape[0], dtype=np.int64)
        bk.run_rows(rule, backends.RowsWork(
            param=p, slots=slots + [None] * (NSLOTS - len(slots)),
            vals=g.reshape(p.shape[0], p.size // p.shape[0]), idx=rows, order=rows, seg=np.arange(
                p.shape[0] + 1, dtype=np.int64), uniq=rows, uses=tuple(uses),
            const=rule.constants(group), hyper=np.array([scal], dtype=np.float64),
            ref_args=(group, int(step), state, fresh)))
        return new_host
    ptrs = np.zeros((1, 2 + NSLOTS), dtype=np.int64)
    ptrs[0, 0], ptrs[0, 1] = data_address(p), data_address(g)
    for s in range(NSLOTS):
        ptrs[0, 2 + s] = data_address(slots[s]) if s < len(slots) and slots[s] is not None \
            else ptrs[0, 0]
    b = backends.Bucket(dtype=p.dtype, uses=tuple(uses), const=rule.constants(group), index=[0], params=[p], grads=[g],
                        ptrs=ptrs, chunks=make_chunks([p.size]),
                        hyper=np.array([scal], dtype=np.float64),
                        hidx=np.zeros(1, dtype=np.int64), nelem=p.size,
                        ref_args=[(group, int(step), state, fresh)])
    bk.run(rule, b)
    return new_host


def _fname(rule):
    """``Adam`` -> ``adam_``, ``RowWiseAdagrad`` -> ``rowwise_adagrad_``."""
    return {"RowWiseAdagrad": "rowwise_adagrad"}.get(rule.name, rule.name.lower()) + "_"


def _make(rule):
    hyper_names = list(rule.defaults)
    host_names = list(rule.host_init(rule.defaults))

    def fn(param, grad, *slot_arrays, step, backend="auto", **kwargs):
        if len(slot_arrays) > len(rule.slots):
            raise TypeError(f"{fn.__name__}() takes at most {len(rule.slots)} state arrays "
                            f"({', '.join(rule.slots)})")
        host = {k: float(kwargs.pop(k, v)) for k, v in rule.host_init(rule.defaults).items()}
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
        new_host = _apply(rule, param, grad, slot_arrays, step, host, backend, kwargs)
        if host_names:
            return new_host[host_names[0]] if len(host_names) == 1 else new_host
        return None

    P = inspect.Parameter
    params = [P("param", P.POSITIONAL_ONLY), P("grad", P.POSITIONAL_ONLY)]
    params += [P(s, P.POSITIONAL_OR_KEYWORD, default=None) for s in rule.slots]
    params += [P("step", P.KEYWORD_ONLY)]
    params += [P(k, P.KEYWORD_ONLY, default=v) for k, v in rule.defaults.items()]
    params += [P(k, P.KEYWORD_ONLY, default=v) for k, v in rule.host_init(rule.defaults).items()]
    params += [P("backend", P.KEYWORD_ONLY, default="auto")]
    fn.__signature__ = inspect.Signature(params)
    fn.__name__ = fn.__qualname__ = _fname(rule)
    fn.__doc__ = (f"In-place {rule.name} step on one parameter (see fastopt.{rule.name} "
                  f"for the equations).  State arrays: {', '.join(rule.slots)}.")
    return fn


for _rule in registry.RULES.values():
    globals()[_fname(_rule)] = _make(_rule)

__all__ = [_fname(r) for r in registry.RULES.values()]
