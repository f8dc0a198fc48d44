"""The data exchanges of a step: the reduce-scatter of dense gradients (averaged in
float64 in rank order), the all-gather of updated parameters, the exchange and
gather of sparse rows, and the gradient-norm reduction (see the package docstring,
"Determinism")."""

import math
import mmap
import time

import numpy as np

from .._jit import njit, prange, register_jitable
from ..backends.base import may_use_threads
from ..clip import _array_norm
from ..sparse import coalesce_plan
from .layout import _DensePlan, _grad_dtype

#: elements at which the averaging kernel uses threads
_PARALLEL_MIN = 1 << 16
#: the overlapped step averages in chunks of this many elements and tests the
#: requests in flight between them (1 MiB of float32)
POLL_ELEMENTS = 1 << 18


# --------------------------------------------------------------------- kernels

def _make_mean_of_pieces(parallel):
    """:func:`_mean_of_pieces_body`, parallel or serial: a closure over ``PARALLEL``,
    whose cell is part of Numba's cache key, so the two builds never share a cache
    entry (see ``fastopt.clip._make_block_sums``); compiled on first call."""
    PARALLEL = bool(parallel)

    def mean_of_pieces(recv, nranks, me, count, pos, own):
        par = PARALLEL  # noqa: F841  (in the cache key)
        _mean_of_pieces_body(recv, nranks, me, count, pos, own)
    return njit(parallel=PARALLEL, cache=True, nogil=True)(mean_of_pieces)


@register_jitable(inline="always")
def _mean_of_pieces_body(recv, nranks, me, count, pos, own):
    """The average in place over this rank's own piece: ``own[j] = (x_0[j] + x_1[j]
    + ... + x_{N-1}[j]) / nranks`` where ``x_me`` is ``own`` itself and ``x_r`` (r !=
    me) is ``recv[s * count + pos:][:own.size]``, ``s`` = r (r < me) or r - 1 (the
    other ranks' pieces of ``count`` elements, in rank order, without this rank's).
    Added in rank order in float64, divided once and rounded once to ``own``'s
    dtype.  Blocks of 4096 elements with a float64 accumulator, so that the loops
    over elements vectorize; every element is computed the same way whatever the
    blocks and threads."""
    B = 4096
    total = own.shape[0]
    nb = (total + B - 1) // B
    for b in prange(nb):
        lo = b * B
        n = min(B, total - lo)
        acc = np.empty(B, dtype=np.float64)
        for r in range(nranks):
            if r == me:
                src = own[lo:lo + n]
            else:
                s = r if r < me else r - 1
                src = recv[s * count + pos + lo:s * count + pos + lo + n]
            if r == 0:
                for j in range(n):
                    acc[j] = src[j]
            else:
                for j in range(n):
                    acc[j] += src[j]
        dst = own[lo:lo + n]
        for j in range(n):
            dst[j] = acc[j] / nranks


_mean_parallel = _make_mean_of_pieces(True)
_mean_serial = _make_mean_of_pieces(False)


@njit(cache=True, nogil=True)
def _coalesced_mean(vals, order, seg, nranks, out):
    """Row ``u`` of ``out``: the rows ``vals[order[seg[u]:seg[u + 1]]]`` added in that
    order in float64, divided by ``nranks``."""
    D = vals.shape[1]
    for u in range(seg.shape[0] - 1):
        lo = seg[u]
        hi = seg[u + 1]
        for j in range(D):
            s = np.float64(vals[order[lo], j])
            for k in range(lo + 1, hi):
                s += np.float64(vals[order[k], j])
            out[u, j] = s / nranks


def _mean_of_pieces(recv, nranks, me, count, pos, own):
    if own.size >= _PARALLEL_MIN and may_use_threads():
        _mean_parallel(recv, nranks, me, count, pos, own)
    else:
        _mean_serial(recv, nranks, me, count, pos, own)


def _struct(MPI, segments):
    """A committed MPI struct datatype of ``segments`` ((address, count, basic MPI
    datatype), absolute addresses: used with ``MPI.BOTTOM``), or None when empty."""
    if not segments:
        return None
    return MPI.Datatype.Create_struct([n for _, n, _ in segments],
                                      [a for a, _, _ in segments],
                                      [t for _, _, t in segments]).Commit()


def _free(types):
    for t in types:
        if t is not None:
            t.Free()


class Collectives:
    """The exchanges of :class:`~fastopt.distributed.ShardedOptimizer` (a mixin)."""

    # ------------------------------------------------------------ dense comm
    def _mpi(self, dtype):
        return self._dtlib.from_numpy_dtype(np.dtype(dtype))

    def _grad_source(self, g, gdtype):
        """The flat gradient array a rank sends from: ``g`` itself when it is
        C-contiguous in the gradient dtype (and, with ``reuse_grads``, writeable),
        else a converted copy (transient, this step's)."""
        ok = g.dtype == gdtype and g.flags.c_contiguous and \
            (g.flags.writeable or not self._reuse_grads)
        return (g if ok else np.array(g, dtype=gdtype, order="C")).reshape(-1)

    def _reduce_scatter(self, plan, dense):
        """The averaged gradient of this rank's pieces: {param: array of its rows}
        (:meth:`_reduce_scatter_pieces` run to its end)."""
        views = {}
        for _ in self._reduce_scatter_pieces(plan, dense, views):
            pass
        return views

    def _reduce_scatter_pieces(self, plan, dense, views, inflight=()):
        """Average the gradients of this rank's pieces into ``views`` ({param: array
        of its rows}), bucket by bucket; a generator that yields ``(dtype part,
        bucket)`` after each bucket is averaged (the parameters of
        ``part.ready_mine[bucket]`` are then complete).

        Every rank sends each rank's rows of its local gradients straight from the
        gradient arrays (an MPI struct datatype per destination and bucket, no pack
        copy) and receives the other ranks' pieces of its own rows into a receive
        buffer of ``(N - 1) x`` one bucket's share, allocated for the step; the average
        is formed in place over its own rows: in the gradient shard (a copy of its own
        rows first), or, with ``reuse_grads``, in the caller's gradient arrays
        themselves.  (One rank: the gradients themselves, converted to the
        parameter's dtype and layout where needed, or copied when clipping will scale
        them.)

        Blocking (``overlap`` off): one ``Alltoallw`` per bucket, then its average.
        Overlapped: the buckets are ``Ialltoallw`` calls, bucket ``k + 1`` posted
        before bucket ``k`` is waited for and averaged (two receive buffers of half
        a ``bucket_bytes`` bucket each: the same memory), and between chunks of
        :data:`POLL_ELEMENTS` of the average the requests in flight (the next
        bucket's, and the caller's ``inflight`` list: its all-gathers) are tested,
        which is what moves them on where MPI progresses only inside its calls
        (MPICH without ``MPICH_ASYNC_PROGRESS=1``).  The sums are the same either way
        (the same kernel over the same elements: bit for bit)."""
        N, me, comm, st = self._size, self._rank, self._comm, self.stats
        reuse = self._reuse_grads
        if N == 1:
            t0 = time.perf_counter()
            for i, g in dense.items():
                p = self._params[i]
                gdt = _grad_dtype(p.dtype)
                if self._max_grad_norm is None:
                    views[i] = np.asarray(g, dtype=gdt, order="C")
                elif reuse:
                    views[i] = self._grad_source(g, gdt).reshape(p.shape)
                else:
                    views[i] = plan.views[i]
                    np.copyto(views[i], g, casting="same_kind")
            st["pack_s"] += time.perf_counter() - t0
            for dp in plan.parts:
                for k in range(dp.nbuckets):
                    yield dp, k
            return
        MPI = self._MPI
        overlap = self._overlap
        t0 = time.perf_counter()
        addr, own = {}, {}
        for dp in plan.parts:
            gdt = dp.gdtype
            for i in dp.idxs:
                src = self._grad_source(dense[i], gdt)
                addr[i] = (src, src.ctypes.data)
                b, w = self._bounds[i], self._widths[i]
                mine = src[int(b[me]) * w:int(b[me + 1]) * w]
                if reuse:
                    own[i] = mine
                    views[i] = mine.reshape(self._pieces[i].shape)
                else:
                    views[i] = plan.views[i]
                    own[i] = views[i].reshape(-1)
                    np.copyto(own[i], mine)
        seq = [(dp, k) for dp in plan.parts for k in range(dp.nbuckets)]
        # the receive buffer(s), mapped for the step and unmapped after it (not the
        # heap: freed, a heap block of this size would stay resident); overlapped: two
        # halves, bucket j in half j % 2
        half = max([dp.recv_elements * dp.gdtype.itemsize for dp in plan.parts] + [8])
        half = -(-half // 8) * 8
        nbuf = 2 if overlap else 1
        mapping = mmap.mmap(-1, nbuf * half)
        st["pack_s"] += time.perf_counter() - t0

        def post(j):
            """Start bucket ``j`` (blocking: run it); returns (request, datatypes,
            receive buffer)."""
            t0 = time.perf_counter()
            dp, k = seq[j]
            gdt = dp.gdtype
            mt = self._mpi(gdt)
            item = gdt.itemsize
            recv = np.frombuffer(mapping, dtype=gdt, count=dp.recv_elements,
                                 offset=(j % nbuf) * half)
            c = dp.counts[k][me]
            stypes = [None if r == me else
                      _struct(MPI, [(addr[i][1] + first * item, n, mt)
                                    for i, first, n in dp.send[k][r]])
                      for r in range(N)]
            scounts = [0 if t is None else 1 for t in stypes]
            rcounts = [0 if r == me else c for r in range(N)]
            rdispls = [(r if r < me else r - 1) * c * item if r != me else 0
                       for r in range(N)]
            args = ([MPI.BOTTOM, (scounts, [0] * N),
                     [MPI.BYTE if t is None else t for t in stypes]],
                    [recv, (rcounts, rdispls), [mt] * N])
            t1 = time.perf_counter()
            req = comm.Ialltoallw(*args) if overlap else comm.Alltoallw(*args)
            t2 = time.perf_counter()
            st["pack_s"] += t1 - t0
            st["comm_s"] += t2 - t1
            st["bytes_received"] += (N - 1) * c * item
            st["bytes_sent"] += (sum(dp.counts[k]) - c) * item
            return req, stypes, recv

        try:
            nxt = post(0) if overlap and seq else None
            for j, (dp, k) in enumerate(seq):
                cur = nxt if overlap else post(j)
                nxt = post(j + 1) if overlap and j + 1 < len(seq) else None
                t0 = time.perf_counter()
                if overlap:
                    cur[0].Wait()
                t1 = time.perf_counter()
                _free(cur[1])
                recv = cur[2]
                c = dp.counts[k][me]
                polled = ([] if nxt is None else [nxt[0]]) + list(inflight) if overlap else []
                step = POLL_ELEMENTS if polled else 1 << 62
                for i, first, pos, n in dp.mine[k]:
                    o = first - int(self._bounds[i][me]) * self._widths[i]
                    for a in range(0, n, step):
                        m = min(step, n - a)
                        _mean_of_pieces(recv, N, me, c, pos + a, own[i][o + a:o + a + m])
                        if polled and a + m < n:
                            MPI.Request.Testall(polled)
                    if polled:
                        MPI.Request.Testall(polled)
                del recv, cur
                t2 = time.perf_counter()
                st["comm_s"] += t1 - t0
                st["reduce_s"] += t2 - t1
                yield dp, k
        finally:
            if nxt is not None:         # an exception between posting and waiting
                nxt[0].Wait()
                _free(nxt[1])
                nxt = None
            try:
                mapping.close()
            except BufferError:     # a view still alive: unmapped when it goes
                pass

    def _gather_types(self, dp):
        """The all-gather's MPI datatypes of a plan part, made once (the parameters
        do not move): what this rank sends (its rows of every parameter) and, per
        rank, where that rank's rows go (struct datatypes of absolute addresses)."""
        if dp.gather_types is None:
            MPI, me = self._MPI, self._rank
            mt = self._mpi(dp.pdtype)
            item = dp.pdtype.itemsize

            def of(segs):
                return _struct(MPI, [(self._pflat[i].ctypes.data + first * item, n, mt)
                                     for i, first, n, _ in segs])
            mine = of(dp.segs[me])
            dp.gather_types = (mine, [None if r == me else of(dp.segs[r])
                                      for r in range(self._size)])
        return dp.gather_types

    def _all_gather(self, plan):
        """Every rank's updated rows to every rank: one ``Alltoallw`` per dtype, from
        the parameters into the parameters (struct datatypes, no buffer, no copy)."""
        me, comm, st, N, MPI = self._rank, self._comm, self.stats, self._size, self._MPI
        for dp in plan.parts:
            t0 = time.perf_counter()
            mine, theirs = self._gather_types(dp)
            scounts = [0 if r == me or mine is None else 1 for r in range(N)]
            rcounts = [0 if t is None else 1 for t in theirs]
            stypes = [MPI.BYTE if mine is None else mine] * N
            rtypes = [MPI.BYTE if t is None else t for t in theirs]
            t1 = time.perf_counter()
            comm.Alltoallw([MPI.BOTTOM, (scounts, [0] * N), stypes],
                           [MPI.BOTTOM, (rcounts, [0] * N), rtypes])
            t2 = time.perf_counter()
            st["pack_s"] += t1 - t0
            st["comm_s"] += t2 - t1
            item = dp.pdtype.itemsize
            others = sum(dp.lengths) - dp.length_me
            st["bytes_received"] += others * item
            st["bytes_sent"] += others * item      # ring model: each rank forwards

    def _gather_piece(self, dp, k):
        """Start the all-gather of bucket ``k`` of a plan part (the overlapped step):
        every rank's parameters whose rows were complete after that bucket
        (``dp.ready[k]``), from the parameters into the parameters, one
        ``Ialltoallw`` (struct datatypes made once per plan); returns its request."""
        me, comm, st, N, MPI = self._rank, self._comm, self.stats, self._size, self._MPI
        t0 = time.perf_counter()
        types = dp.piece_types.get(k)
        if types is None:
            mt = self._mpi(dp.pdtype)
            item = dp.pdtype.itemsize

            def of(segs):
                return _struct(MPI, [(self._pflat[i].ctypes.data + first * item, n, mt)
                                     for i, first, n in segs])
            types = dp.piece_types[k] = (of(dp.ready[k][me]),
                                         [None if r == me else of(dp.ready[k][r])
                                          for r in range(N)])
        mine, theirs = types
        scounts = [0 if r == me or mine is None else 1 for r in range(N)]
        rcounts = [0 if t is None else 1 for t in theirs]
        stypes = [MPI.BYTE if mine is None else mine] * N
        rtypes = [MPI.BYTE if t is None else t for t in theirs]
        t1 = time.perf_counter()
        req = comm.Ialltoallw([MPI.BOTTOM, (scounts, [0] * N), stypes],
                              [MPI.BOTTOM, (rcounts, [0] * N), rtypes])
        t2 = time.perf_counter()
        st["pack_s"] += t1 - t0
        st["comm_s"] += t2 - t1
        item = dp.pdtype.itemsize
        others = sum(n for r in range(N) if r != me for _, _, n in dp.ready[k][r])
        st["bytes_received"] += others * item
        st["bytes_sent"] += others * item      # ring model: each rank forwards
        return req

    def _free_plans(self):
        """Free the MPI datatypes of the cached plans (before they are dropped)."""
        for plan in getattr(self, "_plans", {}).values():
            for dp in plan.parts:
                if dp.gather_types is not None:
                    mine, theirs = dp.gather_types
                    _free([mine, *theirs])
                    dp.gather_types = None
                for mine, theirs in dp.piece_types.values():
                    _free([mine, *theirs])
                dp.piece_types = {}

    def _gather_all_params(self):
        """All-gather every parameter (after an exact-mode flush)."""
        if self._size == 1:
            return
        plan = self._plans.get("all")
        if plan is None:
            plan = self._plans["all"] = _DensePlan(self, tuple(range(len(self._params))))
        self._all_gather(plan)

    # ----------------------------------------------------------- sparse comm
    def _buffer(self, key, n, dtype):
        """A reusable scratch array of ``n`` elements (grown when too small)."""
        dtype = np.dtype(dtype)
        need = max(1, n * dtype.itemsize)
        buf = self._scratch.get(key)
        if buf is None or buf.nbytes < need:
            buf = self._scratch[key] = np.empty(max(need, 2 * (0 if buf is None else
                                                               buf.nbytes)), dtype=np.uint8)
        return buf[:n * dtype.itemsize].view(dtype)

    def _exchange_rows(self, sparse_i, sparse):
        """Send every gradient row to its owner; returns {param: (global rows owned
        here, sorted unique, int64), (nuniq, D) averaged values}."""
        t0 = time.perf_counter()
        N, me, comm, st = self._size, self._rank, self._comm, self.stats
        m = len(sparse_i)
        counts = np.zeros((N, m), dtype=np.int64)
        sorted_rows = []
        for s, i in enumerate(sparse_i):
            idx, vals = sparse[i]
            owner = np.searchsorted(self._bounds[i], idx, side="right") - 1
            order = np.argsort(owner, kind="stable")
            counts[:, s] = np.bincount(owner, minlength=N)
            sorted_rows.append((idx[order], np.ascontiguousarray(
                vals[order], dtype=_grad_dtype(self._params[i].dtype))))
        rcounts = np.empty((N, m), dtype=np.int64)
        t1 = time.perf_counter()
        comm.Alltoall([counts, self._mpi(np.int64)], [rcounts, self._mpi(np.int64)])
        st["bytes_received"] += (N - 1) * m * 8
        st["bytes_sent"] += (N - 1) * m * 8
        out = {}
        tcomm = time.perf_counter() - t1
        for s, i in enumerate(sparse_i):
            sidx, svals = sorted_rows[s]
            D = self._widths[i]
            dt = _grad_dtype(self._params[i].dtype)
            sc = counts[:, s]
            rc = rcounts[:, s]
            sd = np.concatenate([[0], np.cumsum(sc)[:-1]])
            rd = np.concatenate([[0], np.cumsum(rc)[:-1]])
            total = int(rc.sum())
            ridx = self._buffer("ridx", total, np.int64)
            rvals = self._buffer("rvals", total * D, dt).reshape(total, D)
            t1 = time.perf_counter()
            comm.Alltoallv([sidx, (sc, sd), self._mpi(np.int64)],
                           [ridx, (rc, rd), self._mpi(np.int64)])
            comm.Alltoallv([svals, (sc * D, sd * D), self._mpi(dt)],
                           [rvals, (rc * D, rd * D), self._mpi(dt)])
            tcomm += time.perf_counter() - t1
            order, seg, uniq = coalesce_plan(ridx, self._nrows[i])
            avg = np.empty((uniq.shape[0], D), dtype=dt)
            if uniq.shape[0] and D:
                _coalesced_mean(rvals, order, seg, N, avg)
            out[i] = (uniq, avg)
            item = dt.itemsize
            st["bytes_received"] += int(total - rc[me]) * (8 + D * item)
            st["bytes_sent"] += int(sc.sum() - sc[me]) * (8 + D * item)
        st["comm_s"] += tcomm
        st["sparse_s"] += time.perf_counter() - t0 - tcomm
        return out

    def _gather_rows(self, i, uniq, counts):
        """Every rank gets the updated rows of parameter ``i`` from their owners."""
        t0 = time.perf_counter()
        comm, me, st = self._comm, self._rank, self.stats
        D = self._widths[i]
        P = self._pflat[i].reshape(self._nrows[i], D)      # (bfloat16: the uint16 bits)
        total = int(counts.sum())
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ridx = self._buffer("gidx", total, np.int64)
        rvals = self._buffer("gvals", total * D, P.dtype).reshape(total, D)
        mine = P[uniq]
        t1 = time.perf_counter()
        comm.Allgatherv([uniq, self._mpi(np.int64)],
                        [ridx, (counts, displs), self._mpi(np.int64)])
        comm.Allgatherv([mine, self._mpi(P.dtype)],
                        [rvals, (counts * D, displs * D), self._mpi(P.dtype)])
        t2 = time.perf_counter()
        lo, hi = int(displs[me]), int(displs[me]) + int(counts[me])
        if D:
            P[ridx[:lo]] = rvals[:lo]
            P[ridx[hi:]] = rvals[hi:]
        t3 = time.perf_counter()
        others = total - int(counts[me])
        st["bytes_received"] += others * (8 + D * P.dtype.itemsize)
        st["bytes_sent"] += others * (8 + D * P.dtype.itemsize)
        st["comm_s"] += t2 - t1
        st["sparse_s"] += (t1 - t0) + (t3 - t2)

    # -------------------------------------------------------------- clipping
    def _partial_norm(self, arrays):
        p = self._norm_type
        with np.errstate(over="ignore", invalid="ignore"):
            if p == math.inf:
                return max([_array_norm(a, p) for a in arrays], default=0.0)
            acc = 0.0
            for a in arrays:
                x = _array_norm(a, p)
                acc += x * x if p == 2.0 else x ** p
            return acc

    def _clip(self, partials, arrays, gs):
        p = self._norm_type
        with np.errstate(over="ignore", invalid="ignore"):
            if p == math.inf:
                total = math.nan if np.isnan(partials).any() else float(np.max(partials))
            else:
                acc = 0.0
                for x in partials:          # rank order
                    acc += float(x)
                total = math.sqrt(acc) if p == 2.0 else acc ** (1.0 / p)
        if gs is not None:
            total = total / gs
        self.last_grad_norm = total
        coef = self._max_grad_norm / (total + 1e-6)
        if not coef >= 1.0:
            with np.errstate(invalid="ignore"):
                for a in arrays:
                    np.multiply(a, coef, out=a, casting="same_kind")

    # ------------------------------------------------- per-tensor rules' norms
    def _reduce_norms(self, indices, sums):
        """The inner optimizer's ``norm_reducer`` for per-tensor rules (LAMB, LARS):
        every rank's sums of squares of its pieces, for every tensor of the step (the
        same buckets in the same order on every rank), all-gathered and added in
        rank order, so each rank sees the whole tensors' sums, the same on every
        rank (deterministic; the single process adds its chunks in another order,
        so the norms agree with it to rounding, not bit for bit)."""
        t0 = time.perf_counter()
        counts = [s.shape[0] for s in sums]
        mine = np.concatenate(sums) if sums else np.zeros((0, 2))
        allv = np.empty((self._size,) + mine.shape, dtype=np.float64)
        self._comm.Allgather(np.ascontiguousarray(mine), allv)
        total = np.zeros_like(mine)
        for r in range(self._size):          # rank order
            total += allv[r]
        st = self.stats
        st["bytes_sent"] += (self._size - 1) * mine.nbytes
        st["bytes_received"] += (self._size - 1) * mine.nbytes
        st["comm_s"] += time.perf_counter() - t0
        out, k = [], 0
        for c in counts:
            out.append(total[k:k + c])
            k += c
        return out

