"""The step planner: from parameters, gradients, state and hyperparameters to work.

One planner serves the optimizer classes and the functional layer, so an option is
honoured by both or by neither (there is no second place that builds work):

* :func:`group_spec` turns a validated param group into what kernels specialize on
  (used slots, compiled-in scalars, fused switches) and says whether its
  parameters go through the row drivers (row-wise rules, ``max_norm``);
* :func:`dense_buckets` groups dense tensors by configuration into
  :class:`~fastopt.backends.base.DenseWork` buckets with their pointer, chunk and
  scalar-row tables (built once and reused while nothing changes);
* :func:`fill_bucket` writes one step's gradient addresses and scalar rows;
* :func:`rows_work` builds the :class:`~fastopt.backends.base.RowsWork` of one
  parameter's row step, with the deterministic coalescing plan and, in exact
  sparse mode, the catch-up maps from the rule's closed form.
"""

from typing import NamedTuple

import numpy as np

from .backends.base import (CHUNK, FMT_AUX, FMT_BASE, FMT_COLS, FMT_KEY, FMT_N, FMT_NB, FMT_NSCALE,
                            FMT_ROW, FMT_SCALE, CatchUp, Config, DenseWork, RowsWork,
                            make_chunks, stored_chunks)
from .rules import NSCALARS, NSLOTS, fused
from .sparse import coalesce_plan, row_plan
from .storage import NATIVE, Q8_BLOCK, q8_blocks


class GroupSpec(NamedTuple):
    group: dict            # the validated hyperparameters
    uses: tuple            # which state slots the configuration uses
    fixed: tuple           # ((Scalars field, value), ...) compiled in
    switches: tuple        # fused switches, grad_scale off (it is per step)
    by_rows: bool          # updated by the row drivers (row-wise rule or max_norm)
    fused_row: tuple       # the fused scalars without grad_scale (fixed for the group)


def group_spec(rule, group):
    sw = fused.flags(group)
    return GroupSpec(group=group, uses=tuple(bool(u) for u in rule.uses_slots(group)),
                     fixed=rule.fixed(group), switches=sw,
                     by_rows=rule.layout == "rowwise" or sw[5],
                     fused_row=fused.scalars(group))


def config(rule, dtype, spec, grad_scale=None, storage=NATIVE):
    return Config(rule=rule, dtype=np.dtype(dtype), uses=spec.uses, fixed=spec.fixed,
                  switches=(grad_scale is not None,) + tuple(spec.switches[1:]),
                  storage=storage,
                  grad="native" if storage.param == "native" else "float32")


def grad_kind(storage, grad):
    """How the kernels read a gradient of a parameter stored as ``storage``."""
    if storage.param == "native":
        return "native"
    return "bfloat16" if grad.dtype.itemsize == 2 else "float32"


def slot_list(rule, state, uses):
    """The NSLOTS state arrays of a parameter (None where unused)."""
    names = rule.slots + (None,) * (NSLOTS - len(rule.slots))
    return [state[n] if u else None for n, u in zip(names, uses)]


def dense_buckets(rule, backend, tensors):
    """Buckets of dense tensors.  ``tensors``: list of ``(param, slots, spec,
    row_key[, storage, extras[, base]])`` (``extras``: the aux and 8-bit scale arrays
    of a stored format, else None; both default to float32/float64 storage;
    ``base``: the element base of a row range of a larger tensor, default 0, see
    ``DenseWork.fmt``); tensors with equal ``row_key`` (and configuration)
    share a scalar row.  Each bucket gets ``pos`` (positions in ``tensors``), ``row_keys`` and
    ``row_members`` (positions sharing each row); the gradient column of ``ptrs``
    and ``hyper`` are filled per step by :func:`fill_bucket`."""
    by_cfg = {}
    tensors = [t if len(t) == 7 else tuple(t) + (NATIVE, None, 0)[len(t) - 4:]
               for t in tensors]
    for pos, (p, slots, spec, row_key, storage, extras, base) in enumerate(tensors):
        by_cfg.setdefault(config(rule, p.dtype, spec, storage=storage), []).append(pos)
    buckets = []
    for cfg, members in by_cfg.items():
        ptrs = np.zeros((len(members), 2 + NSLOTS), dtype=np.int64)
        row_of, row_keys, row_members = {}, [], []
        hidx = np.empty(len(members), dtype=np.int64)
        params, slot_arrays, extra_arrays = [], [], []
        stored = not cfg.storage.native or not backend.plain_layout
        fmt = np.zeros((len(members), FMT_COLS), dtype=np.int64) if stored else None
        blocks = []
        for t, pos in enumerate(members):
            p, slots, spec, row_key, storage, extras, base = tensors[pos]
            params.append(p)
            extra_arrays.append(extras)
            if stored:
                blocks.append(fill_fmt(fmt[t], p, extras, storage, backend))
                fmt[t, FMT_BASE] = base
            slot_arrays.append(slots)
            ptrs[t, 0] = backend.address(p)
            for s in range(NSLOTS):
                ptrs[t, 2 + s] = backend.address(slots[s]) if slots[s] is not None \
                    else ptrs[t, 0]
            r = row_of.get(row_key)
            if r is None:
                r = row_of[row_key] = len(row_keys)
                row_keys.append(row_key)
                row_members.append([])
            row_members[r].append(pos)
            hidx[t] = r
        sizes = [p.size for p in params]
        chunks = make_chunks(sizes) if not stored else stored_chunks(
            blocks, Q8_BLOCK if cfg.storage.state == "q8" else CHUNK)
        b = DenseWork(config=cfg, index=members, params=params, slots=slot_arrays, ptrs=ptrs,
                      chunks=chunks, hyper=np.zeros((len(row_keys), NSCALARS)),
                      hidx=hidx, nelem=int(sum(sizes)), fmt=fmt, extras=extra_arrays)
        b.pos = np.array(members, dtype=np.int64)
        b.row_keys, b.row_members = row_keys, row_members
        buckets.append(b)
    return buckets


def fill_fmt(row, p, extras, storage, backend):
    """One tensor's row of a stored bucket's ``fmt`` table; returns (rows, blocks per
    row) of its block layout."""
    extras = extras if extras is not None else (None,) * (1 + NSLOTS)
    row[FMT_AUX] = backend.address(extras[0]) if extras[0] is not None else backend.address(p)
    for s in range(NSLOTS):
        sc = extras[1 + s]
        row[FMT_SCALE + s] = backend.address(sc) if sc is not None else backend.address(p)
    row[FMT_N] = p.size
    if storage.state == "q8":
        r, nb, d = q8_blocks(p.shape)
    else:
        r, nb, d = 1, -(-p.size // CHUNK), p.size
    row[FMT_ROW], row[FMT_NB], row[FMT_NSCALE] = d, nb, r * nb
    return r, nb


def fill_bucket(b, gptr, grads, rows, grad_scale=None, all_active=False, keys=None):
    """Write one step into bucket ``b``: gradient addresses ``gptr`` and arrays
    ``grads`` (indexed by position), and ``rows`` (one float64 scalar tuple per
    ``b.row_keys`` entry).  Returns the work to run (the bucket itself, or a copy
    whose configuration has the grad_scale switch on)."""
    b.ptrs[:, 1] = gptr if all_active else gptr[b.pos]
    b.grads = grads if all_active else [grads[k] for k in b.pos]
    for r, row in enumerate(rows):
        b.hyper[r, :len(row)] = row
    b.grad_scale = grad_scale
    cfg = b.config.with_grad_scale(grad_scale is not None)
    if not cfg.storage.native:
        kinds = {grad_kind(cfg.storage, g) for g in b.grads}
        if len(kinds) > 1:            # bfloat16 and float32 gradients in one bucket
            b.grads = [g.astype(np.float32) if g.dtype.itemsize == 2 else g for g in b.grads]
            for t, g in enumerate(b.grads):
                b.ptrs[t, 1] = g.__array_interface__["data"][0]
            kinds = {"float32"}
        cfg = cfg.with_grad(kinds.pop())
        if keys is not None:
            b.fmt[:, FMT_KEY] = keys          # aligned with the bucket's tensors
    if cfg is not b.config:           # with_grad_scale/with_grad return self unchanged
        w = DenseWork(**{k: getattr(b, k) for k in DenseWork.__dataclass_fields__})
        w.config = cfg
        return w
    return b


def tensor_scalars(rule, backend, works, groups, reduce=None):
    """Per-tensor rules (``rule.per_tensor``): run the norm pass of every bucket in
    ``works`` (``backend.run_norms``), let ``reduce`` combine the sums of squares
    (sharding: the shards' parts of each tensor; ``reduce(list of (T, 2) arrays)``
    returns the list), and write each tensor's scalars (``rule.tensor_scalars`` of
    its group ``groups[bucket][t]`` and the two norms) into its own scalar row.
    Every tensor of a per-tensor rule has a row of its own (its row key holds its
    index)."""
    sums = [backend.run_norms(w) for w in works]
    if reduce is not None:
        sums = reduce(sums)
    col = {name: k for k, name in enumerate(rule.Scalars._fields)}
    for w, s, gs in zip(works, sums, groups):
        norms = np.sqrt(s).tolist()
        for t, (x, y) in enumerate(norms):
            row = w.hyper[w.hidx[t]]
            for name, value in rule.tensor_scalars(gs[t], x, y).items():
                row[col[name]] = value


_IDENTITY_CACHE = {}


def _identity_plan(n):
    """The plan of a dense row step: every row once, in order."""
    plan = _IDENTITY_CACHE.get(n)
    if plan is None:
        rows = np.arange(n, dtype=np.int64)
        plan = (rows, rows, np.arange(n + 1, dtype=np.int64), rows)
        if n <= 1 << 16:
            _IDENTITY_CACHE[n] = plan
    return plan


def rows_work(rule, spec, param, slots, row, idx=None, vals=None, grad_scale=None,
              exact=None, rows=None, ref=None, storage=NATIVE, extras=None, key=0, base=0,
              inverse=False):
    """The row step of one parameter.

    ``idx``/``vals``: validated row indices (int64) and gradient rows (nnz, D) of a
    sparse gradient; ``idx=None`` with ``vals`` a dense gradient: every row once;
    ``vals=None``: catch-up only, of ``rows`` (exact mode's flush).  ``row``: the
    step's float64 scalar tuple.  ``exact``: exact sparse mode, a callable
    ``uniq -> CatchUp or None`` giving the touched rows' pending steps; their
    catch-up maps are computed here from the rule's closed form.  ``key``/``base``:
    the stochastic-rounding stream and element base (see ``DenseWork.fmt``).
    ``inverse``: give the work the plan's inverse map (``Backend.plan_inverse``).
    """
    if param.ndim == 0:          # a 0-d parameter is one row of one element (max_norm)
        param = param.reshape(1)
        slots = [s.reshape(1) if s is not None else None for s in slots]
        vals = vals.reshape(1) if vals is not None else None
        if extras is not None:
            extras = [e.reshape(1) if e is not None and e.ndim == 0 else e for e in extras]
    nrows = param.shape[0]
    want_inverse, inverse = inverse, None
    if vals is None:
        uniq, order, seg = rows, None, None
    elif idx is None:
        idx, order, seg, uniq = _identity_plan(nrows)
        vals = vals.reshape(nrows, -1)
    else:
        order, seg, uniq, inverse = row_plan(idx, nrows) if want_inverse else \
            coalesce_plan(idx, nrows) + (None,)
    hyper = np.zeros((1, NSCALARS))
    hyper[0, :len(row)] = row
    catch = exact(uniq) if exact is not None else None
    if catch is not None:
        ks = catch.t_end - catch.last
        firsts = catch.last == catch.buffer_start - 1
        h = np.zeros((1, NSCALARS))
        h[0, :len(catch.scalars)] = catch.scalars
        from .backends.element import catch_up_table    # numba (exact sparse mode)
        catch.coef = catch_up_table(rule)(ks, firsts, h)
    return RowsWork(config=config(rule, param.dtype, spec, grad_scale, storage), param=param,
                    slots=slots, vals=vals, idx=idx, order=order, seg=seg, uniq=uniq,
                    hyper=hyper, catch=catch, ref=ref, grad_scale=grad_scale, extras=extras,
                    key=key, base=base, inverse=inverse)


__all__ = ["GroupSpec", "group_spec", "config", "slot_list", "dense_buckets", "fill_bucket",
           "tensor_scalars", "rows_work", "CatchUp"]
