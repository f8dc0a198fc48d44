"""Launching the CUDA kernels: the kernel cache, launch geometry, device tables.

* :func:`kernel_for`: the compiled kernel of a kind and
  :class:`~fastopt.backends.base.Config` (kept in :data:`_KERNELS`).
* :func:`_blocks`: the grid of a launch, capped by ``MAX_BLOCKS`` (``None``: 32
  blocks per multiprocessor; grid-stride loops cover the rest).
* :class:`DenseTables`: the device side of one dense bucket, the CUDA backend's
  launch handle.  Like the other backends (the Numba backend keeps its compiled
  driver on the work item, the optimizer's small-step path its launch handle on the
  cached plan), it is prepared once per work item, on the bucket's first launch, and
  kept in the bucket's ``launch`` dict (:class:`~fastopt.backends.base.DenseWork`):
  the pointer table (parameter and slot addresses, scalar row), the chunk table and,
  for a stored format, the format table go to the device in one copy then; a step
  copies only the gradient addresses, the stochastic-rounding keys of a stored
  format and the float64 scalar rows, in one copy.  A rebuilt plan (a parameter
  added, a group edited, new state arrays after ``load_state_dict``) is new work
  items, so it is prepared again; the copies that
  :func:`fastopt.planner.fill_bucket` makes for ``grad_scale`` share the bucket's
  dict, so they launch with its tables.  Every device copy goes through
  :func:`_upload` (the tests count them there).
* :func:`_rows_plan`: the per-step device copy of a row step's plan.
* :func:`run_dense`, :func:`run_rows`: the steps of
  :class:`fastopt.backends.cuda.CudaBackend`.

Launch settings are the package's module attributes ``BLOCK_SIZE``, ``CHUNK`` and
``MAX_BLOCKS`` (:mod:`fastopt.backends.cuda`), read at every launch; a bucket whose
tables were laid out for another chunk size is prepared again.  The 8-bit launches
(stored dense, stored rows without ``max_norm``, Muon's stored phase 1) run thread
blocks of :data:`fastopt.backends.cuda.stored.Q8_THREADS` threads, one 8-bit block
each, whatever ``BLOCK_SIZE`` is; their dense chunks are ``CHUNK // Q8_BLOCK``
8-bit blocks (at least one).
"""

import numpy as np

from ...rules import NSLOTS
from ...storage import Q8_BLOCK
from ..base import FMT_COLS, FMT_KEY, FMT_NSCALE, make_chunks
from .. import cuda as _pkg
from . import bf16_arrays as _bf16
from .arrays import _describe, _dummy, _flat, _import_device, is_device
from .kernels import (NORM_THREADS, TAB_COLS, TAB_ROW, make_count_kernel, make_dense_kernel,
                      make_norms_kernel,
                      make_renorm_kernel, make_rows_kernel, make_rowwise_kernel,
                      make_widen_kernel)
from .stored import (Q8_THREADS, make_stored_dense_kernel, make_stored_rows_kernel,
                     make_stored_rowwise_kernel)
from .stored_passes import make_stored_norms_kernel, make_stored_phase1_kernel

_KERNELS = {}        # (kind, config, extra, simulator) -> cuda.jit kernel
_DEFAULT_MAX_BLOCKS = None

_FACTORIES = {"dense": make_dense_kernel, "norms": make_norms_kernel,
              "rows": make_rows_kernel,
              "renorm": make_renorm_kernel, "rowwise": make_rowwise_kernel,
              "finite": make_count_kernel, "widen": make_widen_kernel,
              "stored_dense": make_stored_dense_kernel,
              "stored_rows": make_stored_rows_kernel,
              "stored_rowwise": make_stored_rowwise_kernel,
              "stored_norms": make_stored_norms_kernel,
              "stored_phase1": make_stored_phase1_kernel}


def kernel_for(kind, config, *extra):
    """The compiled kernel of ``kind`` ("dense", "rows", "renorm", "rowwise",
    "finite", "widen", "stored_dense", "stored_rows", "stored_rowwise",
    "stored_norms", "stored_phase1") for a
    :class:`~fastopt.backends.base.Config` (cached); ``extra``: the rows kernels'
    (catch, step) flags."""
    key = (kind, config, extra, _pkg._SIM)
    k = _KERNELS.get(key)
    if k is None:
        k = _KERNELS[key] = _FACTORIES[kind](config, *extra)
    return k


def _max_blocks():
    global _DEFAULT_MAX_BLOCKS
    if _pkg.MAX_BLOCKS is not None:
        return max(1, int(_pkg.MAX_BLOCKS))
    if _DEFAULT_MAX_BLOCKS is None:
        sms = None if _pkg._SIM else _pkg.cuda.get_current_device().MULTIPROCESSOR_COUNT
        _DEFAULT_MAX_BLOCKS = 32 * sms if sms else 64
    return _DEFAULT_MAX_BLOCKS


def _blocks(n_units, per_block=1):
    """Blocks for ``n_units`` work units of ``per_block`` each, capped by MAX_BLOCKS."""
    return max(1, min(-(-n_units // per_block), _max_blocks()))


def _upload(what, dev, host):
    """Copy host array ``host`` into device array ``dev``: ``what`` is "tables" (a
    bucket's fixed tables, once per work item) or "step" (a step's gradient
    addresses and scalar rows)."""
    dev.copy_to_device(host)


def _check_stored(config):
    """The kernels read a bfloat16 parameter's uint16 bits, float32 or float64
    parameters in their dtype: nothing else reaches them."""
    assert config.storage.param in ("native", "bfloat16"), config.storage


class DenseTables:
    """The device tables of one dense bucket (:class:`~fastopt.backends.base.DenseWork`),
    prepared once (see the module docstring).

    ``fixed`` (one device buffer, uploaded here): the pointer table ``tab`` int64 (T,
    :data:`~fastopt.backends.cuda.kernels.TAB_COLS`), the chunk table, and for a stored
    format the format table.  Chunks are elements (``CHUNK`` a chunk) or, with 8-bit
    state, 8-bit blocks (``per`` a chunk, :func:`_tables`); launched with
    ``BLOCK_SIZE`` threads a block, with 8-bit state
    :data:`~fastopt.backends.cuda.stored.Q8_THREADS` (a thread per element of an
    8-bit block).  ``host`` / ``dev``:
    the per-step buffer, gradient addresses (T,), for a stored format the stream keys
    (T,), then the float64 scalar rows (R, NSCALARS), copied by :meth:`launch`."""

    __slots__ = ("per", "nchunks", "stored", "host", "grads", "keys", "hyper", "dev",
                 "args", "config", "kernel", "chunks", "q8")

    def __init__(self, work, stored, per):
        cuda = _pkg.cuda
        T, (R, NS) = work.ptrs.shape[0], work.hyper.shape
        self.q8 = stored and work.config.storage.state == "q8"
        if self.q8:
            units = [int(n) for n in work.fmt[:, FMT_NSCALE]]
        else:
            units = [int(np.prod(_describe(p)[0], dtype=np.int64)) for p in work.params]
        chunks = make_chunks(units, per)
        self.chunks = chunks                  # the host copy (the norm pass's sums)
        self.per, self.stored = per, stored
        self.nchunks = C = chunks.shape[0]
        nt, nc, nf = T * TAB_COLS, C * 3, (T * FMT_COLS if stored else 0)
        fixed = np.empty(nt + nc + nf, dtype=np.int64)
        tab = fixed[:nt].reshape(T, TAB_COLS)
        tab[:, 0] = work.ptrs[:, 0]
        tab[:, 1:1 + NSLOTS] = work.ptrs[:, 2:2 + NSLOTS]
        tab[:, TAB_ROW] = work.hidx
        fixed[nt:nt + nc] = chunks.reshape(-1)
        if stored:
            fixed[nt + nc:] = work.fmt.reshape(-1)
        dfixed = cuda.device_array(fixed.shape, dtype=np.int64)
        _upload("tables", dfixed, fixed)
        nk = T if stored else 0
        self.host = np.zeros(T + nk + R * NS, dtype=np.int64)
        self.grads = self.host[:T]
        self.keys = self.host[T:T + nk]
        self.hyper = self.host[T + nk:].view(np.float64).reshape(R, NS)
        self.dev = dev = cuda.device_array(self.host.shape, dtype=np.int64)
        dtab = dfixed[:nt].reshape(T, TAB_COLS)
        dchunks = dfixed[nt:nt + nc].reshape(C, 3)
        dgrads = dev[:T]
        dhyper = dev[T + nk:].view(np.float64).reshape(R, NS)
        if stored:
            dfmt = dfixed[nt + nc:].reshape(T, FMT_COLS)
            self.args = (dtab, dgrads, dev[T:T + nk], dfmt, dchunks, dhyper)
        else:
            self.args = (dtab, dgrads, dchunks, dhyper)
        self.config = self.kernel = None

    def launch(self, work):
        """One step of ``work`` (the bucket or a ``grad_scale`` copy of it): this
        step's gradient addresses, keys and scalar rows in one copy, one launch."""
        if self.config is not work.config:     # identity: a Config compare costs more
            self.config = work.config
            self.kernel = kernel_for("stored_dense" if self.stored else "dense", work.config)
        self.grads[:] = work.ptrs[:, 1]
        if self.stored:
            self.keys[:] = work.fmt[:, FMT_KEY]
        self.hyper[:] = work.hyper
        _upload("step", self.dev, self.host)
        bs = Q8_THREADS if self.q8 else _pkg.BLOCK_SIZE
        self.kernel[_blocks(self.nchunks), bs](*self.args)


def run_norms(work):
    """The norm pass of a per-tensor rule over a bucket: this step's gradient
    addresses and scalar rows in one copy, one launch over the bucket's update tables
    (:func:`_tables`; a stored format: the ``stored_norms`` kernel,
    :mod:`fastopt.backends.cuda.stored_passes`), the chunk sums copied back and added
    per tensor in chunk order (float64, (tensors, 2))."""
    out = np.zeros((len(work.params), 2), dtype=np.float64)
    if not work.nelem:
        return out
    tables = _tables(work)
    tables.grads[:] = work.ptrs[:, 1]       # (a stored format's keys are not read)
    tables.hyper[:] = work.hyper
    _upload("step", tables.dev, tables.host)
    part = _pkg.cuda.device_array((tables.nchunks, 2), dtype=np.float64)
    kind = "stored_norms" if tables.stored else "norms"
    kernel_for(kind, work.config)[_blocks(tables.nchunks), NORM_THREADS](*tables.args, part)
    sums = part.copy_to_host()
    np.add.at(out, tables.chunks[:, 0], sums)   # unbuffered: chunk order, one pass in C
    return out


def _tables(work):
    """The bucket's :class:`DenseTables` (prepared on first use, or again when the
    launch settings changed its chunk size): chunks of ``CHUNK`` elements, or with
    8-bit state of ``CHUNK // Q8_BLOCK`` 8-bit blocks (at least one: about ``CHUNK``
    elements for the chunk's thread block to step block by block); shared by the
    norm pass and the update."""
    stored = not work.config.storage.native
    if stored:
        _check_stored(work.config)
        if work.config.storage.state == "q8":
            per = max(1, int(_pkg.CHUNK) // Q8_BLOCK)
        else:
            per = _pkg.CHUNK
    else:
        per = _pkg.CHUNK
    tables = work.launch.get("cuda")
    if tables is None or tables.per != per:
        tables = work.launch["cuda"] = DenseTables(work, stored, per)
    return tables


def run_dense(work):
    """A dense step of a bucket: one launch over its tables (prepared on the bucket's
    first launch, see :class:`DenseTables`)."""
    if not work.nelem:
        return
    _tables(work).launch(work)


def _rows_plan(work, nuniq, ident, catch):
    """One host-to-device copy of a row step's float64 scalars, catch-up maps and
    int64 plan.  Returns device (order, seg, uniq, coef, hyper); order/seg/uniq are
    stand-ins where not read (``ident``, or a catch-up only), coef where ``catch`` is
    off."""
    hyper = np.ascontiguousarray(work.hyper, dtype=np.float64)
    R, NS = hyper.shape
    parts = [hyper.reshape(-1).view(np.int64)]
    if catch:
        coef = np.ascontiguousarray(work.catch.coef, dtype=np.float64)
        parts.append(coef.reshape(-1).view(np.int64))
    ints = []
    if not ident:
        if work.vals is not None:
            ints = [np.asarray(work.order, np.int64), np.asarray(work.seg, np.int64)]
        ints.append(np.asarray(work.uniq, np.int64))
    dev = _pkg.cuda.to_device(np.concatenate(parts + ints))
    at = R * NS
    dhyper = dev[:at].view(np.float64).reshape(R, NS)
    dcoef = dhyper
    if catch:
        dcoef = dev[at:at + 4 * nuniq].view(np.float64).reshape(nuniq, 4)
        at += 4 * nuniq
    order = seg = uniq = dev[:1]
    if not ident:
        if work.vals is not None:
            n_o, n_s = work.order.shape[0], work.seg.shape[0]
            order, seg = dev[at:at + n_o], dev[at + n_o:at + n_o + n_s]
            at += n_o + n_s
        uniq = dev[at:at + nuniq]
    return order, seg, uniq, dcoef, dhyper


def _device_rows(a, D, dtype):
    """Gradient rows as a device (n, D) array: host arrays are copied over."""
    if is_device(a):
        d = _import_device(a)
        return d.reshape(int(np.prod(_describe(d)[0], dtype=np.int64)) // D, D)
    h = np.ascontiguousarray(a, dtype=dtype)
    return _pkg.cuda.to_device(h.reshape(h.size // D, D))


def run_rows(work):
    """The row step of one parameter (a row-sparse gradient, a dense step of a
    row-wise rule or of a max_norm group, or exact mode's catch-up): one launch
    (two with max_norm).  Indices were validated and the coalescing plan computed
    on the host by the planner."""
    cfg = work.config
    bs = _pkg.BLOCK_SIZE
    if work.catch is not None and work.catch.coef is None:
        raise ValueError("exact-mode work without its catch-up maps")
    if not cfg.storage.native:
        _run_stored_rows(work)
        return
    p = work.param
    shape = _describe(p)[0]
    nrows = shape[0]
    D = int(np.prod(shape[1:], dtype=np.int64))
    nuniq = int(work.uniq.shape[0])
    if nuniq == 0 or D == 0:
        return
    P = _import_device(p).reshape(nrows, D)
    stepping = work.vals is not None
    catch = work.catch is not None
    ident = stepping and work.order is work.uniq and nuniq == nrows
    order, seg, uniq, coef, hyper = _rows_plan(work, nuniq, ident, catch)
    vals = _device_rows(work.vals, D, P.dtype) if stepping else P
    if cfg.rule.layout == "rowwise":
        if not stepping:
            return                       # no closed form: never a catch-up here
        dups = not ident and work.order.shape[0] > nuniq
        pre_on = cfg.switches[0] or cfg.switches[1]
        scratch = _pkg.cuda.device_array((nuniq if (dups or pre_on) else 1, D), dtype=P.dtype)
        S0 = _import_device(work.slots[0]).reshape(nrows)
        kernel_for("rowwise", cfg)[_blocks(nuniq, bs), bs](
            P, S0, vals, order, seg, uniq, scratch, hyper, nuniq, ident)
        return
    S = [_import_device(s).reshape(nrows, D) if s is not None else P for s in work.slots]
    kernel_for("rows", cfg, catch, stepping)[_blocks(nuniq * D, bs), bs](
        P, S[0], S[1], S[2], vals, order, seg, uniq, coef, hyper, nuniq, ident)
    if stepping and cfg.switches[5]:
        kernel_for("renorm", cfg)[_blocks(nuniq, bs), bs](
            P, uniq, hyper, nuniq, ident)


def _run_stored_rows(work):
    """The row step of a stored-format parameter: one launch."""
    from ...storage import io
    cfg = work.config
    bs = _pkg.BLOCK_SIZE
    _check_stored(cfg)
    p = work.param
    shape = _describe(p)[0]
    nrows = shape[0]
    D = int(np.prod(shape[1:], dtype=np.int64))
    nuniq = int(work.uniq.shape[0])
    if nuniq == 0 or D == 0:
        return
    CT = np.dtype(cfg.compute_dtype)
    _, _, SDT, _ = io.dtypes(cfg.storage, "native", CT.type)
    P = _flat(p)
    stepping = work.vals is not None
    catch = work.catch is not None
    ident = stepping and work.order is work.uniq and nuniq == nrows
    order, seg, uniq, coef, hyper = _rows_plan(work, nuniq, ident, catch)
    vals = _device_rows(work.vals, D, CT) if stepping else _dummy((1, 1), CT)
    if vals.dtype == np.uint16:       # bfloat16 bits (dense rows of a bfloat16 param)
        vals = _bf16._widen(vals)
    if vals.dtype != CT:              # device rows of another dtype
        conv = _pkg.cuda.device_array(vals.shape, dtype=CT)
        conv[:] = vals
        vals = conv
    extras = work.extras or [None] * (1 + NSLOTS)
    A = _flat(extras[0]) if extras[0] is not None else _dummy((1,), np.uint16)
    key = int(work.key) & 0xFFFFFFFF
    if cfg.rule.layout == "rowwise":
        if not stepping:
            return                       # no closed form: never a catch-up here
        bufs = _pkg.cuda.device_array((2 * nuniq, D), dtype=CT)
        S0 = _import_device(work.slots[0]).reshape(nrows)
        kernel_for("stored_rowwise", cfg)[_blocks(nuniq, bs), bs](
            P, A, S0, vals, order, seg, uniq, hyper, bufs[:nuniq], bufs[nuniq:], nuniq,
            D, key, int(work.base), ident)
        return
    S = [_flat(s) if s is not None else _dummy((1,), SDT) for s in work.slots]
    C = [_flat(s) if s is not None else _dummy((1,), np.float32) for s in extras[1:]]
    mx = bool(cfg.switches[5])
    prows = _pkg.cuda.device_array((nuniq, D), dtype=CT) if mx else _dummy((1, 1), CT)
    if mx:
        grid = _blocks(nuniq, bs)                  # a thread per row
    elif cfg.storage.state == "q8":
        bs = Q8_THREADS                            # a thread block per 8-bit block
        grid = _blocks(nuniq * -(-D // Q8_BLOCK))
    else:
        grid = _blocks(nuniq * D, bs)              # a thread per element
    kernel_for("stored_rows", cfg, catch, stepping)[grid, bs](
        P, A, S[0], S[1], S[2], C[0], C[1], C[2], vals, order, seg, uniq, coef, hyper,
        prows, nuniq, D, key, int(work.base), ident)

