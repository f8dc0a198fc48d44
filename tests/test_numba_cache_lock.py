"""Numba's on-disk cache under concurrent processes (fastopt._jit.lock_cache_saves).

Two processes saving different keys into one cache index at the same moment can
both take the same data file number, and the index can then map one key to the
other's data (numba issues #4807, #10128): a later process runs the wrong machine
code.  fastopt serializes the saves with a lock beside the index.  Here two
processes save entries in lockstep through the class Numba uses, with a pause
between reading the index and writing it (the window of the race, widened so that
it is hit every time): without the lock, keys are lost or mapped to the other
process's data; with it, every key loads its own data."""

import multiprocessing as mp
import sys

import pytest

pytest.importorskip("numba")
pytest.importorskip("fcntl")

ENTRIES = 20


def _saver(path, who, barrier, locked):
    import time

    from numba.core import caching

    from fastopt import _jit
    read = caching.IndexDataCacheFile._load_index

    def slow_read(self):                    # the race's window, widened
        out = read(self)
        time.sleep(0.02)
        return out

    caching.IndexDataCacheFile._load_index = slow_read
    save = caching.IndexDataCacheFile.save
    if locked:
        _jit.lock_cache_saves()             # (a no-op if importing fastopt did it)
    elif getattr(save, "fastopt_locked", False):
        caching.IndexDataCacheFile.save = save.__wrapped__    # numba's own, unlocked
    cache = caching.IndexDataCacheFile(path, "f-1.py311", ("stamp", 1))
    for i in range(ENTRIES):
        barrier.wait()                      # both save at the same moment
        cache.save((who, i), (who, i) * 200)


def _run(tmp_path, locked):
    tmp_path.mkdir()
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_saver, args=(str(tmp_path), who, barrier, locked))
             for who in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    from numba.core import caching
    cache = caching.IndexDataCacheFile(str(tmp_path), "f-1.py311", ("stamp", 1))
    wrong = missing = 0
    for who in ("a", "b"):
        for i in range(ENTRIES):
            got = cache.load((who, i))
            if got is None:
                missing += 1            # a lost entry only costs a recompile
            elif got != (who, i) * 200:
                wrong += 1              # another key's code: silently wrong
    return wrong, missing


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_concurrent_saves_never_map_a_key_to_another_keys_data(tmp_path):
    wrong, missing = _run(tmp_path / "unlocked", locked=False)
    assert wrong + missing > 0, "the race did not show without the lock"
    wrong, missing = _run(tmp_path / "locked", locked=True)
    assert (wrong, missing) == (0, 0)


def test_the_lock_is_installed_when_fastopt_loads_numba():
    from numba.core import caching

    from fastopt import _jit
    _jit.numba()
    assert getattr(caching.IndexDataCacheFile.save, "fastopt_locked", False)
