"""How the parameters are cut into per-rank pieces, and the bucket plans of the
dense exchanges (see the package docstring, "Sharding scheme" and "Storage
formats")."""

import numpy as np

from .. import storage


def _rows_and_width(p):
    """(rows, elements per row) of a parameter: 0-d is one row of one element."""
    if p.ndim == 0:
        return 1, 1
    return p.shape[0], int(np.prod(p.shape[1:], dtype=np.int64))


def _row_bounds(params, nranks, granules=None):
    """Per parameter, int64 (nranks + 1,): the first row of each rank's piece.

    Per dtype, the parameters' elements are laid end to end; the cut before rank
    ``r`` is at the row boundary nearest to ``total * r // nranks``, and in a
    parameter with a granule ``g`` (``granules[i]``, default 1) at a multiple of
    ``g`` rows (or its end): a 1-D parameter with 8-bit state is cut at its
    quantization blocks.  Parameters without elements (shape (k, 0)) belong to
    rank 0."""
    bounds = [None] * len(params)
    by_dtype = {}
    for i, p in enumerate(params):
        by_dtype.setdefault(p.dtype.str, []).append(i)
    for idxs in by_dtype.values():
        gran = [1 if granules is None else int(granules[i]) for i in idxs]
        shapes = [_rows_and_width(params[i]) for i in idxs]
        sizes = [n * d for n, d in shapes]
        offs = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)
        total = int(offs[-1])
        cuts = [0] * (nranks + 1)
        cuts[nranks] = total
        for r in range(1, nranks):
            t = total * r // nranks
            k = int(np.searchsorted(offs, t, side="right")) - 1
            while k < len(idxs) and sizes[k] == 0:
                k += 1
            if k >= len(idxs):
                cuts[r] = total
                continue
            nrows, width = shapes[k]
            g = gran[k]
            unit = width * g
            units = -(-nrows // g)
            u = min(max((t - int(offs[k]) + unit // 2) // unit, 0), units)
            cuts[r] = int(offs[k]) + min(u * g, nrows) * width
        for r in range(1, nranks + 1):          # monotone (rounding cannot reorder)
            cuts[r] = max(cuts[r], cuts[r - 1])
        for k, i in enumerate(idxs):
            nrows, width = shapes[k]
            b = np.zeros(nranks + 1, dtype=np.int64)
            if width == 0:
                b[1:] = nrows
            else:
                for r in range(nranks + 1):
                    b[r] = min(max((cuts[r] - int(offs[k])) // width, 0), nrows)
            bounds[i] = b
    return bounds


#: the cost of one whole tensor beyond its elements, in elements (the host work and
#: the kernel launches between a factored tensor's passes), for :func:`_owner_bounds`
TENSOR_COST = 4096


def _owner_bounds(params, nranks, loads=None):
    """Per parameter, int64 (nranks + 1,) bounds that give each parameter *whole* to
    one rank (its owner owns rows ``[0, rows)``, every other rank none): the
    ownership of a rule that updates whole tensors from their own reductions
    (Adafactor's row and column sums and RMS).

    Balanced by cost, largest first (LPT): the parameters in order of decreasing
    cost (``numel + TENSOR_COST``; ties by index) each go to the rank with the least
    cost so far (ties: the lowest rank), starting from ``loads`` (per rank, the cost
    already owned; default zeros).  Deterministic: every rank computes the same
    owners.  The largest rank's cost is at most the mean plus the largest
    tensor's cost.  Parameters without elements belong to rank 0 (nobody steps
    them).  Returns (bounds, owners, new loads)."""
    load = [0] * nranks if loads is None else list(loads)
    cost = [int(p.size) + TENSOR_COST if p.size else 0 for p in params]
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-cost[i], i)):
        if cost[i] == 0:
            continue
        r = min(range(nranks), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += cost[i]
    bounds = []
    for p, r in zip(params, owners):
        b = np.zeros(nranks + 1, dtype=np.int64)
        b[r + 1:] = _rows_and_width(p)[0]
        bounds.append(b)
    return bounds, owners, load


def _grad_dtype(dtype):
    """The dtype gradients of a parameter of ``dtype`` are averaged and stepped in:
    float32 for bfloat16 parameters, else the parameter's dtype."""
    return np.dtype(np.float32) if storage.is_bf16(dtype) else np.dtype(dtype)


def _wire_dtype(dtype):
    """The element dtype a parameter or state array of ``dtype`` travels as
    (bfloat16: its uint16 bits)."""
    return np.dtype(np.uint16) if storage.is_bf16(dtype) else np.dtype(dtype)


def _wire(a):
    """``a`` viewed with its wire dtype (bfloat16 -> uint16)."""
    return a.view(np.uint16) if storage.is_bf16(a.dtype) else a


def _dtype_token(dt):
    """A picklable name of a dtype that keeps bfloat16 (whose ``str`` is ``'<V2'``)."""
    return "bfloat16" if storage.is_bf16(dt) else np.dtype(dt).str


def _dtype_of(token):
    return storage.bf16() if token == "bfloat16" else np.dtype(token)


def _piece(p, r0, r1):
    """The view of rows [r0, r1) of ``p`` (a 0-d parameter: itself, or an empty 1-D
    view)."""
    if p.ndim == 0:
        return p if r1 > r0 else p.reshape(1)[0:0]
    return p[r0:r1]


class _DtypePlan:
    """The buckets of one dtype for one set of dense parameters."""

    def __init__(self, dtype, idxs, bounds, widths, nranks, me, bucket_bytes):
        self.dtype = dtype
        self.gdtype = _grad_dtype(dtype)        # the averaged gradients (reduce-scatter)
        self.pdtype = _wire_dtype(dtype)        # the parameters (all-gather)
        self.idxs = idxs
        item = self.gdtype.itemsize
        segs = []                   # per rank: [(param, first element, count, offset)]
        lengths = []
        for r in range(nranks):
            out, off = [], 0
            for i in idxs:
                b = bounds[i]
                n = int(b[r + 1] - b[r]) * widths[i]
                if n:
                    out.append((i, int(b[r]) * widths[i], n, off))
                    off += n
            segs.append(out)
            lengths.append(off)
        self.lengths = lengths
        self.length_me = lengths[me]
        longest = max(lengths) if lengths else 0
        per_rank = max(1, bucket_bytes // item // nranks)
        self.b = b_ = min(per_rank, longest) if longest else 0
        self.nbuckets = -(-longest // b_) if b_ else 0
        # shard offsets of my pieces (the gradient views)
        self.my_offsets = {}
        off = 0
        for i in idxs:
            b = bounds[i]
            self.my_offsets[i] = off
            off += int(b[me + 1] - b[me]) * widths[i]
        self.segs = segs
        self.counts = []
        self.send, self.mine = [], []
        for k in range(self.nbuckets):
            lo = k * b_
            counts = [max(0, min(b_, L - lo)) for L in lengths]
            self.counts.append(counts)
            # what this rank sends to each rank in bucket k: (param, first element,
            # count), and the windows of its own rows (param, first, position, count)
            self.send.append([[(i, first, n) for i, first, _, n in
                               _window(segs[r], lo, lo + counts[r])] for r in range(nranks)])
            self.mine.append(list(_window(segs[me], lo, lo + counts[me])))
        #: the reduce-scatter's receive buffer: the other ranks' pieces of one bucket
        self.recv_elements = (nranks - 1) * b_
        self.gather_types = None        # the all-gather's MPI datatypes (made on use)
        # the overlapped step (ShardedOptimizer(overlap=True)): per bucket k and rank
        # r, the segments (param, first element, count) of r's parameters whose last
        # element of r's rows arrives in bucket k -- r updates them after averaging
        # bucket k, and the all-gather of bucket k carries them; ready_mine[k]: this
        # rank's parameters of bucket k; rest_mine: its parameters in no bucket (no
        # rows here), stepped after the last bucket (empty pieces count steps too)
        self.ready = [[[] for _ in range(nranks)] for _ in range(self.nbuckets)]
        for r in range(nranks):
            for i, first, n, off in segs[r]:
                self.ready[(off + n - 1) // b_][r].append((i, first, n))
        self.ready_mine = [[i for i, _, _ in self.ready[k][me]] for k in range(self.nbuckets)]
        mine = {i for i, _, _, _ in segs[me]}
        self.rest_mine = [i for i in idxs if i not in mine]
        self.piece_types = {}           # bucket -> the all-gather's MPI datatypes of it


def _window(segs, lo, hi):
    """The parts of the segments ``(param, first, count, offset)`` that fall in the
    offsets [lo, hi): ``(param, first element, position - lo, count)``."""
    for i, first, n, off in segs:
        a = max(lo, off)
        z = min(hi, off + n)
        if a < z:
            yield i, first + (a - off), a - lo, z - a


def _by_dtype(params, idxs):
    """{dtype key: (dtype, [indices])} in order of first appearance."""
    out = {}
    for i in idxs:
        dt = params[i].dtype
        out.setdefault(dt.str, (dt, []))[1].append(i)
    return out


class _DensePlan:
    """The dense exchanges of one set of parameters (``active``): a
    :class:`_DtypePlan` per dtype, in order of first appearance, and the views of the
    gradient shard.  ``bucket_bytes``: the size of one bucket (default the
    optimizer's; the overlapped step passes half of it, two buckets in flight)."""

    def __init__(self, opt, active, bucket_bytes=None):
        bb = opt._bucket_bytes if bucket_bytes is None else bucket_bytes
        self.parts = [_DtypePlan(dt, idxs, opt._bounds, opt._widths, opt._size, opt._rank,
                                 bb)
                      for dt, idxs in _by_dtype(opt._params, active).values()]
        self.views = {}
        for dp in self.parts:
            shard = opt._shard[dp.dtype.str]
            if shard.size < dp.length_me:       # one rank, no clipping: not needed
                continue
            for i in dp.idxs:
                piece = opt._pieces[i]
                off = dp.my_offsets[i]
                self.views[i] = shard[off:off + piece.size].reshape(piece.shape)
