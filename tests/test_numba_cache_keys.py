"""Every driver a step compiles is found in Numba's disk cache by the next process.

Numba keys a closure's cache entries by its bytecode and a pickle of its cells: a
cell holding something that pickles differently in every process (a function made
at run time that refers to a Numba intrinsic, for one) gives a new key every time,
and every process compiles the driver again (seconds per configuration, and the
memory LLVM keeps).  Two processes step the same configurations with one cache
directory; the second must load every compiled fastopt function from it."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("numba")

SCRIPT = r"""
import gc, json
import numpy as np
import fastopt
from fastopt.sparse import RowSparse
from numba.core.dispatcher import Dispatcher

rng = np.random.default_rng(0)
def dense(cls, shape, **kw):
    p = rng.standard_normal(shape).astype(np.float32)
    cls([p], backend="numba", **kw).step([np.ones_like(p)])
def rows(cls, **kw):
    p = rng.standard_normal((64, 8)).astype(np.float32)
    g = RowSparse(np.array([1, 3, 1, 60]), np.ones((4, 8), np.float32))
    cls([p], backend="numba", **kw).step([g])
dense(fastopt.Adam, 5000)
dense(fastopt.Adam, 5000, state_bits=8)
dense(fastopt.LAMB, (40, 30), state_bits=8)
rows(fastopt.Adam)
rows(fastopt.Adam, state_bits=8)
rows(fastopt.RowWiseAdagrad)
out = {}
for d in gc.get_objects():
    if isinstance(d, Dispatcher) and (d.py_func.__module__ or "").startswith("fastopt") \
            and d.overloads:
        s = d.stats
        name = f"{d.py_func.__module__}.{d.py_func.__qualname__}"
        h, m = out.get(name, (0, 0))
        out[name] = [h + sum(s.cache_hits.values()), m + sum(s.cache_misses.values())]
print(json.dumps(out))
"""


def _run(env):
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_second_process_compiles_no_driver(tmp_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    first = _run(env)
    drivers = {k for k, (hits, misses) in first.items() if misses and k.endswith("_driver")}
    assert len(drivers) >= 4, f"too few drivers were compiled: {sorted(first)}"
    second = _run(env)
    missed = {k for k, (hits, misses) in second.items() if misses}
    assert not missed, f"compiled again instead of loaded from the cache: {sorted(missed)}"
    assert {k for k, (hits, misses) in second.items() if hits} >= drivers
