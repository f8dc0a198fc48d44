"""The torch state store: the engine's state as torch tensors in ``optimizer.state``.

The engine (:class:`fastopt.optimizer.Optimizer`) keeps NumPy (or device) arrays;
this store (:mod:`fastopt.state_store`) shows them to torch users as tensors sharing
their memory, in ``optimizer.state[p]`` under torch's state names.  ``step`` and the
host scalars (NAdam's ``mu_product``) are 0-d views of one buffer per name, in
torch's scalar dtype: the engine's step counts *are* that buffer, so one vectorized
add advances every ``state[p]["step"]``.

Writes to ``optimizer.state`` (a :class:`State`) and to its per-parameter dicts
(:class:`ParamState`) are counted, so the facade sees in O(1) whether a user
replaced a state tensor (then the state is loaded into the engine again, checked).
"""

import collections
from operator import attrgetter

import numpy as np
import torch

from ..state_store import ArrayStore
from . import views

_NBYTES = attrgetter("nbytes")
_PTR = torch.Tensor.data_ptr
_CONTIG = torch.Tensor.is_contiguous


class ParamState(dict):
    """One parameter's state dict; every write bumps ``ParamState.writes``."""

    writes = 0

    def __reduce__(self):
        return (ParamState, (dict(self),))


class State(collections.defaultdict):
    """``optimizer.state``: torch's ``defaultdict`` of :class:`ParamState` dicts,
    counting changes of its own entries."""

    def __init__(self, data=()):
        super().__init__(ParamState, data)
        self.changes = 0

    def __reduce__(self):
        return (State, (), None, None, iter(self.items()))


def _counting(cls, counter):
    for name in ("__setitem__", "__delitem__", "clear", "pop", "popitem", "setdefault",
                 "update", "__ior__"):
        method = getattr(dict, name)

        def edit(self, *args, _m=method, **kwargs):
            counter(self)
            return _m(self, *args, **kwargs)
        edit.__name__ = name
        setattr(cls, name, edit)


def _bump_writes(self):
    ParamState.writes += 1


def _bump_changes(self):
    self.changes += 1


_counting(ParamState, _bump_writes)
_counting(State, _bump_changes)


class TensorStore(ArrayStore):
    """The engine's view of a torch optimizer (see the module docstring)."""

    converts = True

    def __init__(self, owner, stepful, scalar_dtype, check_group, group_keys):
        self.owner = owner                  # the torch optimizer (its ``state``)
        self.stepful = stepful              # torch keeps ``step`` in the state
        self.sdt = scalar_dtype
        self.check_group = check_group      # the facade's check of a group dict
        self.group_keys = group_keys        # ... and the keys it watches
        self.bufs = {}                      # name -> (tensor, numpy view, 0-d views)
        self.seen = None
        self._nbytes = []

    def attach(self, engine):
        super().attach(engine)
        self.engine = engine

    # ------------------------------------------------------------- objects
    def param(self, obj, where):
        return views.array(obj, self.backend, where)

    def grads(self, grads, params):
        objs = self.params
        return [views.grad(g, objs[i], params[i], self.backend, i)
                for i, g in enumerate(grads)]

    def gather(self, grads, params, ptrs, col):
        """Every gradient dense and contiguous with its parameter's size (torch's
        ``grad`` setter already matches dtype, shape and device): their addresses."""
        nb = self._nbytes
        if len(nb) != len(params):    # (a replaced array keeps its shape and dtype)
            nb = self._nbytes = list(map(_NBYTES, params))
        try:
            if list(map(_NBYTES, grads)) != nb or not all(map(_CONTIG, grads)):
                return 0
            ptrs[:, col] = np.fromiter(map(_PTR, grads), np.int64, len(grads))
        except (AttributeError, TypeError, RuntimeError):
            return 0                 # a None, sparse or storage-less gradient
        return -1

    # -------------------------------------------------------------- scalars
    @property
    def params(self):
        return self.engine.param_objects

    def _buffer(self, name, n):
        buf = self.bufs.get(name)
        if buf is None or buf[1].shape[0] < n:
            t = torch.zeros(max(n, 1), dtype=self.sdt)
            new = (t, t.numpy(), [None] * max(n, 1))
            if buf is not None:
                new[1][:buf[1].shape[0]] = buf[1]
            self.bufs[name] = new
            if buf is not None:         # the 0-d views in the state follow the buffer
                state = self.owner.state
                for i, p in enumerate(self.params):
                    st = state.get(p)
                    if st is not None and st.get(name) is not None:
                        dict.__setitem__(st, name, self._scalar(name, i))
            buf = new
        return buf

    def _scalar(self, name, i):
        t, _, views0 = self.bufs[name]
        v = views0[i]
        if v is None:
            v = views0[i] = t[i]
        return v

    def counts(self, old, n):
        vals = np.array(old[:n], dtype=np.float64)
        view = self._buffer("step", n)[1]
        view[:] = 0
        view[:len(vals)] = vals
        return view[:n]

    def host(self, members, values):
        for k, v in values.items():
            self._buffer(k, len(self.params))[1][members] = v

    # ---------------------------------------------------------------- state
    def published(self, i, st):
        p = self.params[i]
        out = ParamState()
        if self.stepful:
            out["step"] = self._scalar("step", i)
        for k, v in st.items():
            if isinstance(v, float):
                self._buffer(k, len(self.params))[1][i] = v
                out[k] = self._scalar(k, i)
            else:
                out[k] = views.tensor(v, p)
        self.owner.state[p] = out

    def replaced(self, states):
        self.owner.state = State()
        for i, st in enumerate(states):
            if st:
                self.published(i, st)

    # ------------------------------------------------------- user edits
    def mark(self):
        """Remember the state's counters (after the engine wrote to it)."""
        st = self.owner.state
        self.seen = (st, getattr(st, "changes", None), ParamState.writes)

    def edited(self):
        st = self.owner.state
        seen = self.seen
        return seen is None or seen[0] is not st or seen[1] != getattr(st, "changes", None) \
            or seen[2] != ParamState.writes
