"""Param groups: the user-editable list of groups and its validation.

``optimizer.param_groups`` is a list of dicts, as in torch: users edit
hyperparameters between steps (schedulers do), may replace a parameter array, and
add groups with ``add_param_group``.  :class:`ParamGroups` keeps the flat list of
parameters and re-validates a group whenever anything in it changed since the last
validated snapshot.  The snapshot compares values *with their types* and copies
mutable containers, so an edit that compares equal (``lr = True`` where it was
1.0) or an in-place edit of a list (``betas[0] = 5.0``) is seen and checked like
any other; a replaced parameter array must match the shape and dtype of the one it
replaces (its state belongs to it).
"""

from operator import is_

import numpy as np

from . import planner

_MISSING = object()

#: edits of any param group (or its params list) made through :class:`Group` and
#: :class:`GroupParams`, counted so that a step sees "nothing changed" in O(1)
_EDITS = [0]


def _counted(name, base):
    method = getattr(base, name)

    def edit(self, *args, **kwargs):
        _EDITS[0] += 1
        return method(self, *args, **kwargs)
    edit.__name__ = name
    return edit


class Group(dict):
    """A param group: a plain dict (``optimizer.param_groups[i]``) whose edits are
    counted.  Nothing else differs; a group replaced by a plain dict is checked the
    slow way."""
    for _name in ("__setitem__", "__delitem__", "__ior__", "clear", "pop", "popitem",
                  "setdefault", "update"):
        locals()[_name] = _counted(_name, dict)
    del _name


class GroupParams(list):
    """A param group's ``params`` list: a plain list whose edits are counted."""
    for _name in ("__setitem__", "__delitem__", "__iadd__", "__imul__", "append",
                  "extend", "insert", "pop", "remove", "clear", "sort", "reverse"):
        locals()[_name] = _counted(_name, list)
    del _name


def _frozen(v):
    """A comparable, type-aware copy of a hyperparameter value."""
    if isinstance(v, (list, tuple)):
        return (type(v),) + tuple(_frozen(x) for x in v)
    if isinstance(v, np.ndarray):
        return (np.ndarray, v.dtype.str, v.shape, v.tobytes())
    try:
        hash(v)
    except TypeError:
        return (type(v), id(v))
    return (type(v), v)


class ParamGroups:
    """The groups, the flat parameter list and the validated view of both."""

    def __init__(self, rule, backend, defaults, check_extra=lambda group: None,
                 fixed_of=lambda group, arrays: {}, fixed_keys=(), view=None,
                 keep_objects=False, check_raw=None, watched=()):
        self.rule = rule
        self.fixed_keys = tuple(fixed_keys)
        self._keys = tuple(rule.checks) + tuple(rule.group_keys) + self.fixed_keys + tuple(
            k for k in watched if k not in rule.checks)
        self.backend = backend
        #: the array of a user's parameter object (a store's ``param``)
        self.view = view or backend.as_param
        #: the groups keep the users' objects (tensors), ``params`` their arrays
        self.keep_objects = keep_objects
        #: a facade's check of a whole group dict (its own keys), before the rule's
        self.check_raw = check_raw
        self.objects = []                  # flat list of the users' parameter objects
        self.defaults = defaults
        self.check_extra = check_extra     # e.g. exact-mode compatibility
        #: validates a new group's fixed entries (the storage options), returns them
        self.fixed_of = fixed_of
        self.fixed = []                    # per group: its fixed entries, as added
        self.groups = []                   # the user-visible list (optimizer.param_groups)
        self.params = []                   # flat list of parameter arrays
        self._snapshot = None
        self._objs = ()                    # the groups whose edits are counted ...
        self._edits_seen = -1              # ... and the count at the last snapshot
        self._cache = None
        self.version = 0                   # bumped when the parameters change
        self.spec_version = 0              # bumped when the groups are re-validated

    def add(self, group, check_params=lambda arrays: None):
        """Validate and append a group dict ``{"params": [...], **hyperparameters}``.
        Returns the flat indices of its parameters."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError("a param group must be a dict with a 'params' entry")
        arrays = group["params"]
        if isinstance(arrays, dict):
            raise TypeError("a param group's 'params' must be a list of arrays")
        if not isinstance(arrays, (list, tuple)):
            arrays = [arrays]
        start = len(self.params)
        if self.check_raw is not None:
            self.check_raw(group, f"param group {len(self.groups)}")
        checked = [self.view(a, f"parameter {start + k}") for k, a in enumerate(arrays)]
        refuse_overlaps(self.params + checked, self.backend)
        fixed = self.fixed_of(group, checked)
        check_params(checked)
        if self.rule.layout == "rowwise" and any(a.ndim == 0 for a in checked):
            raise ValueError(f"{self.rule.name} keeps one accumulator per row: parameters "
                             "need at least one dimension")
        hyper = self.rule.check_group({**self.defaults, **group})
        self.check_extra({**hyper, **fixed})
        extras = {k: v for k, v in group.items()
                  if k not in hyper and k not in fixed and k != "params"}
        shown = list(arrays) if self.keep_objects else checked
        self.groups.append(Group({**extras, **hyper, **fixed,
                                  "params": GroupParams(shown)}))
        self.fixed.append(dict(fixed))
        self.params.extend(checked)
        self.objects.extend(shown)
        self.version += 1
        self._snapshot = None
        return list(range(start, len(self.params)))

    def _snap(self):
        """Per group: the values themselves (compared by identity), copies of the
        mutable ones (compared by content, with types) and the parameter ids."""
        keys = self._keys
        out = []
        for g in self.groups:
            vals = tuple(g.get(k) for k in keys)
            mutable = tuple((i, _frozen(v)) for i, v in enumerate(vals)
                            if isinstance(v, (list, dict, np.ndarray)))
            out.append((vals, mutable, tuple(map(id, g["params"]))))
        return out

    def _unchanged(self):
        snap = self._snapshot
        if snap is None or len(snap) != len(self.groups):
            return False
        if _EDITS[0] == self._edits_seen and all(map(is_, self.groups, self._objs)):
            return True                  # no counted edit since the snapshot: O(1)
        if not self._unchanged_slow(snap):
            return False
        self._note_edits()
        return True

    def _note_edits(self):
        """Remember the edit count, when every group and params list counts its edits
        and no hyperparameter is a mutable value (compared by content)."""
        snap = self._snapshot
        countable = all(type(g) is Group and type(g["params"]) is GroupParams
                        for g in self.groups) and not any(m for _, m, _ in snap)
        self._objs = tuple(self.groups) if countable else ()
        self._edits_seen = _EDITS[0] if countable else -1

    def _unchanged_slow(self, snap):
        keys = self._keys
        for g, (vals, mutable, ids) in zip(self.groups, snap):
            # identity of every value (C-level loops: this runs every step)
            if not all(map(is_, map(g.get, keys), vals)):
                return False
            for i, frozen in mutable:
                if _frozen(vals[i]) != frozen:
                    return False
            ps = g["params"]
            if tuple(map(id, ps)) != ids:
                return False
        return True

    def validated(self):
        """``(specs, owner)``: a :class:`fastopt.planner.GroupSpec` per group and the
        group of every parameter.  Re-checks whatever changed; raises (changing
        nothing) on a bad edit."""
        if self._unchanged():
            return self._cache
        self._check_fixed()
        if self.check_raw is not None:
            for gi, g in enumerate(self.groups):
                self.check_raw(g, f"param group {gi}")
        checked = [self.rule.check_group(g) for g in self.groups]
        for h, fixed in zip(checked, self.fixed):
            self.check_extra({**h, **fixed})
        new_params = self._checked_params()
        specs = [planner.group_spec(self.rule, h) for h in checked]
        owner = []
        for gi, g in enumerate(self.groups):
            owner.extend([gi] * len(g["params"]))
        if new_params is not None:
            self.params[:], self.objects[:] = new_params
            self.version += 1
        # write the normalized values back (a list of betas becomes the checked tuple)
        for g, h in zip(self.groups, checked):
            for k, v in h.items():
                if _frozen(g.get(k)) != _frozen(v):
                    g[k] = v
        self._cache = (specs, owner)
        self.spec_version += 1
        self._snapshot = self._snap()
        self._note_edits()
        return self._cache

    def _check_fixed(self):
        """Refuse an edit of a fixed entry (a group's storage format: its state is
        stored in that format from the group's first step)."""
        for gi, (g, fixed) in enumerate(zip(self.groups, self.fixed)):
            for k, v in fixed.items():
                new = g.get(k, _MISSING)
                if new is _MISSING or _frozen(new) != _frozen(v):
                    shown = "deleted" if new is _MISSING else f"changed to {new!r}"
                    raise ValueError(
                        f"param_groups[{gi}][{k!r}] was {shown}; it was {v!r}: a group's "
                        f"{k} is fixed when the group is added (its state is stored in "
                        f"that format); put parameters that need another {k} in a group of "
                        f"their own (add_param_group) or a new optimizer")

    def _checked_params(self, moved=False):
        """``(arrays, objects)`` after user edits of ``params`` lists (or, with
        ``moved``, of the memory behind the objects), or None if unchanged."""
        flat = [p for g in self.groups for p in g["params"]]
        if len(flat) != len(self.params):
            raise RuntimeError("param_groups' 'params' lists must not change length; "
                               "use add_param_group")
        if not moved and all(a is b for a, b in zip(flat, self.objects)):
            return None
        out = []
        for i, (new, obj, old) in enumerate(zip(flat, self.objects, self.params)):
            if new is obj and not moved:
                out.append(old)
                continue
            p = self.view(new, f"parameter {i}")
            if p is old:
                out.append(old)
                continue
            if p.shape != old.shape or p.dtype != old.dtype:
                raise ValueError(f"parameter {i} was replaced by an array of shape {p.shape} "
                                 f"and dtype {p.dtype}; its state is for shape {old.shape} "
                                 f"and dtype {old.dtype}")
            out.append(p)
        refuse_overlaps(out, self.backend)
        if self.keep_objects:
            return out, flat
        # the groups hold the checked views
        k = 0
        for g in self.groups:
            n = len(g["params"])
            g["params"][:] = out[k:k + n]
            k += n
        return out, list(out)

    def refresh(self):
        """Re-view every parameter object (a facade saw the memory behind one move:
        torch's ``p.data = ...``); True when an array changed.  Raises, changing
        nothing, when a new array does not match its state (shape, dtype)."""
        new = self._checked_params(moved=True)
        if new is None or all(a is b for a, b in zip(new[0], self.params)):
            return False
        self.params[:], self.objects[:] = new
        self.version += 1
        self._snapshot = None
        return True

    def invalidate(self):
        self._snapshot = None


def refuse_overlaps(arrays, backend, what="parameter"):
    """Raise if two arrays share memory (an update would be applied twice).

    Sorts the byte ranges and compares neighbours: O(n log n).
    """
    spans = []
    for k, p in enumerate(arrays):
        nbytes = p.size * p.dtype.itemsize
        if nbytes:
            lo = backend.address(p)
            spans.append((lo, lo + nbytes, k))
    spans.sort()
    for (lo1, hi1, k1), (lo2, hi2, k2) in zip(spans, spans[1:]):
        if lo2 < hi1:
            k = max(k1, k2)
            raise ValueError(f"{what} {k} appears twice or overlaps {what} {min(k1, k2)}")
