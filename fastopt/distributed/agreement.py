"""The first collective of every call: every rank learns every rank's call, call
count, signature and error (see the package docstring, "Bad use"); digests of
hyperparameters and of what a rank would load."""

import hashlib
import os
import time

import numpy as np

from ..backends.base import may_use_threads
from .errors import DistributedError

#: seconds a waiting rank polls without sleeping before it backs off to short sleeps
_SPIN_S = 2e-3
#: chunk of a state array hashed as one piece (load_state_dict's agreement)
_HASH_CHUNK = 16 << 20


def _digest(obj):
    return hashlib.blake2b(repr(obj).encode(), digest_size=16).hexdigest()


def _array_digests(arrays):
    """A blake2b digest (hex, 16 bytes) of each array's dtype, shape and bytes.

    An array is hashed in chunks of ``_HASH_CHUNK`` bytes whose digests are hashed
    in order, so the result does not depend on the number of threads; large inputs
    are hashed by ``NUMBA_NUM_THREADS`` threads (hashlib releases the GIL)."""
    flat = [np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays]
    chunks = [(k, f[lo:lo + _HASH_CHUNK]) for k, f in enumerate(flat)
              for lo in range(0, f.size, _HASH_CHUNK)]

    def one(chunk):
        return hashlib.blake2b(chunk[1], digest_size=16).digest()

    threads = 1
    if may_use_threads() and sum(f.size for f in flat) >= 4 * _HASH_CHUNK:
        from numba import config
        threads = max(1, min(int(config.NUMBA_NUM_THREADS), len(chunks)))
    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(one, chunks))
    else:
        parts = [one(c) for c in chunks]
    out = [hashlib.blake2b(repr((np.asarray(a).dtype.str, np.shape(a))).encode(),
                           digest_size=16) for a in arrays]
    for (k, _), d in zip(chunks, parts):
        out[k].update(d)
    return [h.hexdigest() for h in out]


def _loaded_digests(state, groups):
    """What a rank is about to load, in a fixed order: per state entry
    ``(param, name, digest of the array or repr of the value)`` and per group the
    repr of its values (every key but ``params``, extras such as a scheduler's
    ``initial_lr`` included).  Returns ``(entries, groups, summary)`` where
    ``summary`` is ``(arrays digest, scalars digest, groups digest)``."""
    keys = [(i, k) for i in sorted(state) for k in sorted(state[i])]
    arrays = [(i, k) for i, k in keys if isinstance(state[i][k], np.ndarray)]
    digests = dict(zip(arrays, _array_digests([state[i][k] for i, k in arrays])))
    entries = [(i, k, "array", digests[(i, k)]) if (i, k) in digests else
               (i, k, type(state[i][k]).__name__, repr(state[i][k])) for i, k in keys]
    hyper = [sorted((k, type(v).__name__, repr(v)) for k, v in g.items() if k != "params")
             for g in groups]
    summary = (_digest([e for e in entries if e[2] == "array"]),
               _digest([e for e in entries if e[2] != "array"]),
               _digest(hyper))
    return entries, hyper, summary


class Agreement:
    """The agreement of :class:`~fastopt.distributed.ShardedOptimizer` (a mixin: it
    uses ``_comm``, ``_size``, ``_rank``, ``_calls``, ``_broken``, ``_timeout`` and
    ``_MPI``)."""

    def _agree(self, op, err, extra, describe=None, mismatch=DistributedError):
        """The first collective of every call: every rank learns every rank's call,
        call count, signature and error.  Raises on every rank if any rank failed
        or the signatures differ (``mismatch``: the class raised then)."""
        if self._broken is not None:
            raise DistributedError(f"this ShardedOptimizer is unusable: {self._broken}")
        msg = None if err is None else f"{type(err).__name__}: {err}"
        sigs = self._allgather_object((msg, (op, self._calls, extra)), op)
        self._calls += 1
        if err is not None:
            raise err
        for r, (m, _) in enumerate(sigs):
            if m is not None:
                raise DistributedError(f"{op}() failed on rank {r}: {m} (no rank changed "
                                       "anything)")
        calls = [s for _, s in sigs]
        for r, (op_r, n_r, _) in enumerate(calls):
            if op_r != op:
                raise DistributedError(
                    f"rank {r} called {op_r}() while rank {self._rank} called {op}() "
                    f"(collective call #{n_r} vs #{self._calls - 1}): every rank must make "
                    "the same calls in the same order")
            if n_r != calls[0][1]:
                raise DistributedError(
                    f"rank {r} is at collective call #{n_r} but rank 0 is at #{calls[0][1]} "
                    f"(in {op}()): a rank missed or added a step()/state-dict call")
        extras = [s[2] for s in calls]
        if any(e != extras[0] for e in extras):
            why = describe(extras) if describe is not None else "the ranks' arguments differ"
            raise mismatch(f"{op}(): {why}")

    def _allgather_object(self, obj, op):
        """``comm.allgather(obj)``: the sizes by a nonblocking allgather (which gives
        up after ``timeout`` seconds, if one was given), then the pickled objects."""
        import pickle
        MPI = self._MPI
        data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
        mine = np.array([data.size], dtype=np.int64)
        sizes = np.empty(self._size, dtype=np.int64)
        req = self._comm.Iallgather([mine, MPI.INT64_T], [sizes, MPI.INT64_T])
        if self._timeout is None:
            req.Wait()
        else:
            self._wait(req, op, (req, mine, sizes))
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        buf = np.empty(int(sizes.sum()), dtype=np.uint8)
        self._comm.Allgatherv([data, MPI.BYTE], [buf, (sizes, displs), MPI.BYTE])
        return [pickle.loads(buf[int(a):int(a) + int(n)].tobytes())
                for a, n in zip(displs, sizes)]

    def _wait(self, req, op, keep):
        """Wait for ``req`` at most ``timeout`` seconds: poll without sleeping for
        ``_SPIN_S`` (ranks in step arrive close together: no added latency), yielding
        the CPU between polls, then sleep between polls (1 ms at most), so a rank
        waiting for a slow or stopped one does not hold a CPU."""
        start = time.monotonic()
        deadline = start + self._timeout
        spin = start + _SPIN_S
        delay = 1e-5
        yield_cpu = getattr(os, "sched_yield", None)
        while not req.Test():
            now = time.monotonic()
            if now > deadline:
                self._broken = (f"the other ranks did not reach {op}() within timeout="
                                f"{self._timeout:g} s")
                self._pending = keep                    # never freed while in flight
                raise DistributedError(
                    f"{op}(): timed out after {self._timeout:g} s waiting for the other ranks: "
                    "a rank missed this call, stopped calling, raised, or is stuck; this "
                    "optimizer's communicator cannot be used any more (end the job, e.g. "
                    "MPI.COMM_WORLD.Abort(); run the script as 'python -m mpi4py script.py' "
                    "so that an uncaught exception on any rank aborts the job)")
            if now < spin:
                if yield_cpu is not None:
                    yield_cpu()
                continue
            time.sleep(delay)
            delay = min(2 * delay, 1e-3)
