"""This source tree against another one, step by step, interleaved on one machine.

Written to measure the removal of the CPU backends' plain float32/float64 drivers
(float32/float64 now run through the drivers of every storage format): each tree
runs in a child process of its own (``PYTHONPATH`` = the tree, built in place
with ``python setup.py build_ext --inplace``), both build the same cases with the
same data, then the parent asks each child in turn to time ``reps`` steps of one
case; the order of the two trees alternates from round to round, so load on a
shared machine hits both alike.  Reported per case: the median ms per step of each
tree and the median ratio this/other over the rounds with its 10th-90th percentile
spread.  At the end each child hashes its parameters and state: both took the same
steps from the same data, so equal hashes mean bit-identical results.  Nothing
here asserts a time.

Cases (Adam, lr 1e-3)::

    numba  float32 10M dense     numba  float32 262K dense    numba float64 262K dense
    cython float32 10M dense     cython float32 262K dense
    numba  10 x 100 float32 (the small-step fast path)
    numba / cython lazy sparse: a 200K x 64 float32 table, batches of 16K Zipf ids

``python bench/before_after.py --other /path/to/other/tree [--rounds 21] [--case ...]
[--cold]`` (``--cold``: empty Numba caches, the set-up and first steps of each case,
compilation included, reported too).  Thread counts: ``NUMBA_NUM_THREADS`` and
``OMP_NUM_THREADS`` of the environment.
"""

import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

#: name -> (kind, backend, dtype, size, reps per timing)
CASES = {
    "numba f32 10M": ("dense", "numba", "float32", 10_000_000, 10),
    "numba f32 262K": ("dense", "numba", "float32", 262_144, 1000),
    "numba f64 262K": ("dense", "numba", "float64", 262_144, 500),
    "cython f32 10M": ("dense", "cython", "float32", 10_000_000, 10),
    "cython f32 262K": ("dense", "cython", "float32", 262_144, 500),
    "numba 10x100 small": ("small", "numba", "float32", 100, 4000),
    "numba sparse 200Kx64": ("sparse", "numba", "float32", 200_000, 40),
    "cython sparse 200Kx64": ("sparse", "cython", "float32", 200_000, 40),
}
ROW_DIM = 64
BATCH = 16_384
NBATCHES = 8

_CHILD = r"""
import hashlib, sys, time
import numpy as np
import fastopt
sys.path.insert(0, sys.argv[1])
from before_after import CASES, build
cases = {}
first = {}
for name in sys.argv[2].split("|"):
    t0 = time.perf_counter()
    cases[name] = build(*CASES[name][:4])
    first[name] = time.perf_counter() - t0      # set-up and 3 steps (compiling, if cold)
for line in sys.stdin:
    name = line.strip()
    if name.startswith("first "):
        print(first[name[6:]], flush=True)
        continue
    if name == "hash":
        h = hashlib.sha256()
        for nm in sorted(cases):
            for a in cases[nm][1]():
                h.update(np.ascontiguousarray(a).tobytes())
        print(h.hexdigest(), flush=True)
        continue
    step, _ = cases[name]
    reps = CASES[name][4]
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    print((time.perf_counter() - t0) / reps * 1e3, flush=True)
"""


def build(kind, backend, dtype, size):
    """(step, arrays) of one case: ``step()`` takes one optimizer step, ``arrays()``
    the parameters and state after it."""
    import fastopt
    rng = np.random.default_rng(0)
    if kind == "dense":
        ps = [rng.standard_normal(size).astype(dtype)]
        gs = [(rng.standard_normal(size) * 1e-2).astype(dtype)]
    elif kind == "small":
        ps = [rng.standard_normal(size).astype(dtype) for _ in range(10)]
        gs = [(rng.standard_normal(size) * 1e-2).astype(dtype) for _ in range(10)]
    else:
        ps = [rng.standard_normal((size, ROW_DIM)).astype(dtype)]
        batches = []
        for _ in range(NBATCHES):
            ids = (rng.zipf(1.2, BATCH) - 1) % size
            vals = (rng.standard_normal((BATCH, ROW_DIM)) * 1e-2).astype(dtype)
            batches.append([fastopt.RowSparse(ids.astype(np.int64), vals)])
    opt = fastopt.Adam(ps, lr=1e-3, backend=backend)
    if kind == "sparse":
        k = [0]

        def step():
            opt.step(batches[k[0] % NBATCHES])
            k[0] += 1
    else:
        def step():
            opt.step(gs)
    for _ in range(3):
        step()

    def arrays():
        out = list(ps)
        for st in opt.state.values() if isinstance(opt.state, dict) else opt.state:
            out += [np.asarray(v) for v in st.values() if isinstance(v, np.ndarray)]
        return out
    return step, arrays


class _Tree:
    def __init__(self, path, names, cache=None):
        env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
        if cache is not None:
            env["NUMBA_CACHE_DIR"] = cache
        here = os.path.dirname(os.path.abspath(__file__))
        self.proc = subprocess.Popen([sys.executable, "-c", _CHILD, here, "|".join(names)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=here)

    def ask(self, what):
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the child of {what!r} died")
        return line.strip()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--other", required=True, help="the other source tree (the baseline)")
    ap.add_argument("--this", default=os.path.dirname(os.path.dirname(os.path.abspath(
        __file__))), help="this source tree (default: the one holding this script)")
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--case", action="append", choices=list(CASES))
    ap.add_argument("--cold", action="store_true",
                    help="each child compiles into an empty Numba cache directory of its "
                         "own; the set-up time of each case (3 steps) is reported")
    args = ap.parse_args(argv)
    names = args.case or list(CASES)
    tmp = tempfile.TemporaryDirectory() if args.cold else None
    trees = {}
    for t in ("this", "other"):
        trees[t] = _Tree(getattr(args, t), names,
                         os.path.join(tmp.name, t) if tmp is not None else None)
        if tmp is not None:     # one at a time: both compile alone on the machine
            trees[t].ask(f"first {names[0]}")
    times = {n: {"this": [], "other": []} for n in names}
    for r in range(args.rounds):
        for i, n in enumerate(names):
            order = ("this", "other") if (r + i) % 2 == 0 else ("other", "this")
            for t in order:
                times[n][t].append(float(trees[t].ask(n)))
    hashes = {t: trees[t].ask("hash") for t in trees}
    setup = {t: {n: float(trees[t].ask(f"first {n}")) for n in names} for t in trees}
    for t in trees.values():
        t.close()
    print(f"{args.rounds} rounds; this = {args.this}, other = {args.other}")
    print("| case | other ms | this ms | this/other [p10, p90] |\n|---|---:|---:|---|")
    for n in names:
        a, b = np.array(times[n]["other"]), np.array(times[n]["this"])
        ratio = b / a
        print(f"| {n} | {np.median(a):.4f} | {np.median(b):.4f} | {np.median(ratio):.3f} "
              f"[{np.percentile(ratio, 10):.3f}, {np.percentile(ratio, 90):.3f}] |")
    print("bit-identical parameters and state:", hashes["this"] == hashes["other"])
    if args.cold:
        print("\n| case | set-up + 3 steps, other s | this s |\n|---|---:|---:|")
        for n in names:
            print(f"| {n} | {setup['other'][n]:.2f} | {setup['this'][n]:.2f} |")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
