"""``state_dict()`` and ``load_state_dict()`` of the optimizer classes.

Format (version 1, torch's layout plus a format version and the optimizer name)::

    {"version": 1, "optimizer": "Adam",
     "state": {index: {"step": int, "exp_avg": ndarray, ..., "mu_product": float}},
     "param_groups": [{**hyperparameters, "state_bits": ..., "bf16_update": ...,
                       "seed": ..., "params": [indices]}],   # a group's storage options
     "param_names": [...]}                 # when the parameters were given as a dict

Loading is strict and atomic: everything is checked before anything changes.  When
both the saved dict and the optimizer have parameter names, state is matched by
name (a dict of parameters in another order gets each parameter's own state);
otherwise by position.  A parameter's saved state must hold ``step`` and, when
``step > 0``, every state array its group's configuration uses and every host
scalar of the rule; arrays must have the slot's shape and the parameter's dtype
(fastopt never casts state); ``step`` is an integer in [0, 2**53]; NAdam's
``mu_product`` is a finite number in (0, 1] (a rule's host scalars pass its
``Rule.host_check``: ASGD's ``eta`` >= 0, ``mu`` in (0, 1]).
"""

import numbers

import numpy as np

from . import planner, storage

STATE_DICT_VERSION = 1
MAX_STEP = 2 ** 53


def indexed_groups(param_groups):
    """The param groups as a state dict stores them: hyperparameters, and the
    parameters as their flat indices."""
    groups, start = [], 0
    for g in param_groups:
        n = len(g["params"])
        groups.append({**{k: v for k, v in g.items() if k != "params"},
                       "params": list(range(start, start + n))})
        start += n
    return groups


def state_dict(opt):
    groups = indexed_groups(opt.param_groups)
    state = {}
    for i, st in enumerate(opt._state):
        if opt._steps[i] == 0 and not st:
            continue
        state[i] = {"step": int(opt._steps[i])}
        state[i].update({k: (opt.backend.to_host(v) if not isinstance(v, float) else v)
                         for k, v in st.items()})
    out = {"version": STATE_DICT_VERSION, "optimizer": opt.rule.name,
           "state": state, "param_groups": groups, "storage": storage_options(opt)}
    if opt._names is not None:
        out["param_names"] = list(opt._names)
    return out


def storage_options(opt):
    """The optimizer's storage options, as a state dict records them."""
    return {"state_bits": opt.state_bits, "bf16_update": opt.bf16_update, "seed": opt.seed}


def _check_values(rule, i, name, kind, v, host_param):
    """Refuse state values that no step can produce (a corrupt or hand-edited
    checkpoint): a negative value in a non-negative slot (second moments, sums; NaN
    is possible, as IEEE propagates a NaN gradient), an 8-bit block scale that is
    negative, NaN or infinite (it is the block's largest finite magnitude: a
    negated scale would flip every moment of its block, a NaN one poison 256
    parameters for good), or a Kahan compensation that is not below a bfloat16
    step of the parameters (checked against the tensor's largest magnitude, with a
    factor 16 of slack, so parameters restored after the optimizer state pass)."""
    where = f"state {name!r} of parameter {i}"
    if kind == "scale":
        bad = ~(np.isfinite(v) & (v >= 0))
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{where}: block {k} has scale {float(v[k])!r}; an 8-bit "
                             "block scale is a finite magnitude >= 0 (corrupt checkpoint?)")
        return
    if kind == "aux" and name == storage.KAHAN_COMP:
        comp = np.asarray(v, dtype=np.float32)
        pw = np.asarray(host_param())
        pw = _widen(pw) if pw.dtype == np.uint16 else pw.astype(np.float32)
        finite = np.isfinite(pw)
        if (finite & ~np.isfinite(comp)).any():
            raise ValueError(f"{where}: a non-finite compensation beside a finite parameter "
                             "(no step produces it; corrupt checkpoint?)")
        top = float(np.abs(pw[finite]).max()) if finite.any() else 0.0
        big = float(np.abs(comp[finite]).max()) if finite.any() else 0.0
        if big > top * 2.0 ** -4 + 2.0 ** -126:
            raise ValueError(f"{where}: compensation up to {big!r} beside parameters of "
                             f"magnitude up to {top!r}; a Kahan compensation is below one "
                             "bfloat16 step of its parameter (restore the parameters before "
                             "the optimizer state, or the checkpoint is corrupt)")
        return
    if kind == "slot" and name in rule.nonnegative_slots:
        a = np.asarray(v)
        if storage.is_bf16(a.dtype):
            a = a.astype(np.float32)
        if a.dtype.kind == "f" and (a < 0).any():
            raise ValueError(f"{where}: negative values in a non-negative slot "
                             "(no step produces them; corrupt checkpoint?)")


def _widen(bits):
    """bfloat16 parameters held as their uint16 bits (the CUDA backend) -> float32."""
    from .storage import reference
    return reference.widen(bits)


def _group_storage(opt, gi, hyper, saved):
    """Group ``gi``'s storage options as saved (a state dict without them in its
    groups: the optimizer-wide record), checked against this optimizer's group."""
    mine = opt._groups.fixed[gi]
    got = dict(zip(storage.OPTIONS, storage.check_options(
        *(hyper.get(k, saved.get(k)) for k in storage.OPTIONS))))
    if got != mine:
        raise ValueError(f"param group {gi} of the state_dict was saved with storage options "
                         f"{got}, this optimizer's group has {mine}")
    return mine


def _index_map(opt, sd):
    """saved parameter index -> this optimizer's index."""
    n = len(opt._params)
    names = sd.get("param_names")
    if names is not None and opt._names is not None:
        if not isinstance(names, (list, tuple)) or len(names) != n \
                or sorted(map(str, names)) != sorted(map(str, opt._names)):
            raise ValueError(f"state_dict has parameter names {names!r}, the optimizer has "
                             f"{opt._names!r}")
        mine = {str(k): i for i, k in enumerate(opt._names)}
        return {j: mine[str(k)] for j, k in enumerate(names)}
    return {j: j for j in range(n)}


def _step_value(i, st):
    if "step" not in st:
        raise ValueError(f"state of parameter {i} has no 'step'")
    step = st["step"]
    if isinstance(step, (bool, float)) or not isinstance(step, (int, np.integer)) \
            or not 0 <= step <= MAX_STEP:
        raise ValueError(f"state of parameter {i}: invalid step {step!r} (an integer in "
                         f"[0, 2**53])")
    return int(step)


def load_state_dict(opt, sd):
    rule = opt.rule
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        raise ValueError("not an optimizer state_dict")
    if sd.get("optimizer") != rule.name:
        raise ValueError(f"state_dict is for optimizer {sd.get('optimizer')!r}, "
                         f"not {rule.name!r}")
    if sd.get("version") != STATE_DICT_VERSION:
        raise ValueError(f"unsupported state_dict version {sd.get('version')!r}")
    if not isinstance(sd["state"], dict) or not isinstance(sd["param_groups"], (list, tuple)):
        raise ValueError("state_dict 'state' must be a dict and 'param_groups' a list")
    saved = sd.get("storage", {"state_bits": None, "bf16_update": "split", "seed": 0})
    if saved != storage_options(opt):
        raise ValueError(f"state_dict was saved with storage options {saved}, this optimizer "
                         f"has {storage_options(opt)}; construct it with the same state_bits, "
                         f"bf16_update and seed")
    if len(sd["param_groups"]) != len(opt.param_groups):
        raise ValueError("state_dict has a different number of param groups")
    new_groups = []
    for gi, (g_new, g_old) in enumerate(zip(sd["param_groups"], opt.param_groups)):
        if not isinstance(g_new, dict):
            raise ValueError(f"param group {gi} of the state_dict is not a dict")
        if len(g_new.get("params", ())) != len(g_old["params"]):
            raise ValueError(f"param group {gi} has a different number of parameters")
        hyper = {k: v for k, v in g_new.items() if k != "params"}
        fixed = _group_storage(opt, gi, hyper, saved)
        checked = rule.check_group({**opt.defaults, **hyper})
        opt._check_group({**checked, **fixed})
        extras = {k: v for k, v in hyper.items() if k not in checked and k not in fixed}
        new_groups.append({**extras, **checked, **fixed})
    owner = []
    for gi, g in enumerate(opt.param_groups):
        owner.extend([gi] * len(g["params"]))
    specs = [planner.group_spec(rule, g) for g in new_groups]
    where = _index_map(opt, sd)
    new_state = [{} for _ in opt._params]
    new_steps = np.zeros(len(opt._params), dtype=np.int64)
    allowed = set(rule.slots)
    host_keys = set(rule.host_init(new_groups[0])) if new_groups else set()
    for key, st in sd["state"].items():
        try:
            j = int(key) if not isinstance(key, (bool, float)) else None
        except (TypeError, ValueError):
            j = None
        if j is None or j not in where:
            raise ValueError(f"state_dict has state for parameter {key!r}; keys must be "
                             f"parameter indices 0..{len(opt._params) - 1}")
        if not isinstance(st, dict):
            raise ValueError(f"state of parameter {key!r} is not a dict")
        i = where[j]
        p = opt._params[i]
        step = _step_value(i, st)
        new_steps[i] = step
        out = {}
        stg = opt._storage[i]
        expect = {}
        if not stg.native:
            used = [n for n, u in zip(rule.slots, specs[owner[i]].uses) if u]
            expect = {k: (shp, dt, kind) for k, shp, dt, kind in
                      storage.layout(rule, stg, p.shape, p.dtype, used)}
        for name, v in st.items():
            if name == "step":
                continue
            if name in expect:
                v = np.asarray(v)
                shp, dt, _ = expect[name]
                if v.shape != tuple(shp) or v.dtype != dt:
                    raise ValueError(f"state {name!r} of parameter {i} has shape {v.shape} and "
                                     f"dtype {v.dtype}, expected {tuple(shp)} and {dt} (the "
                                     f"optimizer's storage format; fastopt never casts state)")
                out[name] = v
            elif name in allowed and stg.native and name in rule.slots_of(p.shape):
                v = np.asarray(v)
                if v.shape != rule.slot_shape(p.shape, name):
                    raise ValueError(f"state {name!r} of parameter {i} has shape {v.shape}, "
                                     f"expected {rule.slot_shape(p.shape, name)}")
                if v.dtype != p.dtype:
                    raise ValueError(f"state {name!r} of parameter {i} has dtype {v.dtype}, "
                                     f"expected {p.dtype} (fastopt never casts state)")
                out[name] = v
            elif name in host_keys:
                why = "a real number" if isinstance(v, bool) or not isinstance(
                    v, numbers.Real) else rule.host_check(name, v)
                if why is not None:
                    raise ValueError(f"state {name!r} of parameter {i} must be {why}, "
                                     f"got {v!r}")
                out[name] = float(v)
            else:
                raise ValueError(f"state_dict has unknown state {name!r} for {rule.name}")
        for name, v in out.items():
            if not isinstance(v, float):
                _check_values(rule, i, name, expect[name][2] if name in expect else "slot",
                              v, lambda: opt.backend.to_host(p))
        if step > 0:
            spec = specs[owner[i]]
            mine = rule.slots_of(p.shape)
            need = [n for n, u in zip(rule.slots, spec.uses) if u and n in mine] \
                + sorted(host_keys)
            need += [k for k in expect if k not in need]
            missing = [n for n in need if n not in out]
            if missing:
                raise ValueError(f"state of parameter {i} (step {step}) is missing {missing}")
        new_state[i] = out
    # all checked: commit (arrays copied onto the backend's memory)
    for i, st in enumerate(new_state):
        for name, v in list(st.items()):
            if not isinstance(v, float):
                like = opt._params[i] if opt._storage[i].native else v
                st[name] = opt.backend.from_host(v, like)
    for g, hyper in zip(opt.param_groups, new_groups):
        params = g["params"]
        g.clear()
        g.update({**hyper, "params": params})
    opt._state = new_state
    opt._steps = opt._store.counts(new_steps, len(new_steps))
    opt._store.replaced(new_state)
