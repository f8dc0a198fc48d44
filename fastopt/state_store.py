"""The state store: how the step engine sees a facade's objects.

The engine (:class:`fastopt.optimizer.Optimizer`) works on arrays: NumPy arrays on the
CPU, device arrays for CUDA.  A facade whose users hold other objects (torch tensors)
passes its own store, which translates at the edges and nowhere else:

* ``param(obj, where)``: the array the engine updates for a user's parameter object
  (the param groups keep the user's objects; the engine keeps these arrays);
* ``grads(grads, params)``: the full path's gradients as arrays (dense), row-sparse
  gradients (:class:`fastopt.RowSparse`) or None; ``gather(grads, params, ptrs, col)``:
  the fast path's check of the same list (``-1`` with the addresses written into
  ``ptrs[:, col]`` when every gradient is a dense, contiguous gradient of its
  parameter's size, else the index of the first that needs the full path);
* ``counts(old, n)``: the array of ``n`` per-parameter step counts holding ``old``'s
  values (the engine adds to it in place: a store may share it with its users);
* ``published(i, st)``: parameter ``i``'s state dict ``st`` got new entries
  (allocation); ``replaced(states)``: every state dict was replaced (load, restore);
  ``host(members, values)``: host scalars (NAdam's ``mu_product``) of parameters
  ``members`` changed.

:class:`ArrayStore` is the default: the users' objects are the arrays.
"""

import numpy as np

from .backends.base import gather_grads


class ArrayStore:
    """The default store: parameters, gradients and state are the users' arrays."""

    #: True when ``param`` and ``grads`` translate objects (the param groups then
    #: keep the users' objects, and the fast path launches only native plans)
    converts = False

    def attach(self, engine):
        self.backend = engine.backend

    def param(self, obj, where):
        return self.backend.as_param(obj, where)

    def grads(self, grads, params):
        return grads

    def gather(self, grads, params, ptrs, col):
        return gather_grads(grads, params, ptrs, col)

    def counts(self, old, n):
        out = np.zeros(n, dtype=np.int64)
        out[:min(n, len(old))] = old[:n]
        return out

    def published(self, i, st):
        pass

    def replaced(self, states):
        pass

    def host(self, members, values):
        pass
