"""Shared helpers for the registry-driven tests, and the ``exclusive`` marker."""

import os

import numpy as np
import pytest

import fastopt
from fastopt import rules
from fastopt.benchmark.torch_peers import newton_schulz_same_dtype

def pytest_configure(config):
    config.addinivalue_line(
        "markers", "exclusive: compares CPU time with wall time, so it needs the machine's "
        "cores to itself: skipped in pytest-xdist workers (`pytest -n ...`); bash .ci/run "
        "runs these in a lane of their own")
    config.addinivalue_line(
        "markers", "boundscheck: among the cases bash .ci/run's boundscheck lanes run "
        "(NUMBA_BOUNDSCHECK=1): together they drive every driver kind with every option")
    if getattr(config.option, "numprocesses", None) and not os.environ.get(
            "PYTEST_XDIST_WORKER"):
        # pytest-xdist runs one worker per core: OpenBLAS's own threads in every worker
        # oversubscribe the cores, and its spinning threads then make a small matmul
        # 10-40x slower (the examples' training loops, the reference's norms).  The
        # workers inherit this (they start after pytest_configure); tests that vary
        # BLAS threads set the variable for their own subprocesses.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    skip = pytest.mark.skip(reason="exclusive: measures CPU/wall time; run without -n "
                            "(pytest -m exclusive)")
    for item in items:
        if "exclusive" in item.keywords:
            item.add_marker(skip)


#: every backend that runs on host arrays here (the registry-driven suites loop over it)
CPU_BACKENDS = [b for b in fastopt.available_backends() if b != "cuda"]
DTYPES = [np.float32, np.float64]
#: shapes that cover: a scalar-like vector, a 2-D matrix, several chunks, empty
SHAPES = [(7,), (33, 17), (70_001,), (0,)]


def shape_for(name, shape):
    """The shape a test gives rule ``name`` for its usual ``shape``: a matrix rule
    (Muon) takes parameters of ndim >= 2 only, so a vector ``(n,)`` becomes the
    matrix ``(d, n // d)`` with the largest divisor ``d <= sqrt(n)`` (``(0,)`` becomes
    ``(0, 3)``, ``()`` ``(1, 1)``); other rules keep ``shape``."""
    shape = tuple(shape)
    if rules.RULES[name].layout != "matrix" or len(shape) >= 2:
        return shape
    n = shape[0] if shape else 1
    if n == 0:
        return (0, 3)
    d = max(k for k in range(1, int(n ** 0.5) + 1) if n % k == 0)
    return (d, n // d)


def shapes_for(name, shapes):
    """:func:`shape_for` of each shape."""
    return [shape_for(name, s) for s in shapes]


#: torch.optim.Muon's Newton-Schulz without its cast to bfloat16 (tests monkeypatch it
#: into torch.optim._muon to compare fastopt.Muon with torch in float64 and float32)
torch_ns_same_dtype = newton_schulz_same_dtype


def rule_cases():
    """(rule name, variant index) for every registry variant."""
    return [pytest.param(name, k, id=f"{name}-v{k}")
            for name, rule in rules.RULES.items() for k in range(len(rule.variants))]


def awkward_grads(shapes, dtype, steps, seed=0):
    """Gradients over `steps` steps: random, with exact zeros, an all-zero step, a
    1e3-scale step and a 1e-6-scale step."""
    rng = np.random.default_rng(seed)
    out = []
    for t in range(steps):
        gs = []
        for shape in shapes:
            g = rng.standard_normal(shape)
            g[rng.random(shape) < 0.2] = 0.0
            if t % 17 == 5:
                g[...] = 0.0
            elif t % 13 == 3:
                g *= 1e3
            elif t % 11 == 7:
                g *= 1e-6
            gs.append(g.astype(dtype))
        out.append(gs)
    return out


def init_params(shapes, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) for s in shapes]


def reference_run(rule, variant, params, grads_seq):
    """Run the NumPy reference functions directly (not through the optimizer)."""
    group = rule.check_group({**rule.defaults, **variant})
    uses = rule.uses_slots(group)
    params = [p.copy() for p in params]
    states = []
    for p in params:
        st = {n: np.full(rule.slot_shape(p.shape, n), rule.slot_init(group, n), dtype=p.dtype)
              for n, u in zip(rule.slots, uses) if u and n in rule.slots_of(p.shape)}
        st.update(rule.host_init(group))
        states.append(st)
    with np.errstate(all="ignore"):
        for t, grads in enumerate(grads_seq, start=1):
            for p, g, st in zip(params, grads, states):
                rule.reference(p, g, st, group, t, fresh=set(rule.slots) if t == 1 else set())
    return params, states


def pytest_sessionstart(session):
    """.ci/run sets FASTOPT_EXPECT_INSTALLED=1: the suite must test the installed
    package (built from the sdist), not the source tree next to the tests."""
    import os
    if os.environ.get("FASTOPT_EXPECT_INSTALLED") == "1":
        where = os.path.realpath(os.path.dirname(fastopt.__file__))
        source = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", "fastopt"))
        if where == source:
            raise pytest.UsageError(f"FASTOPT_EXPECT_INSTALLED=1 but fastopt was imported "
                                    f"from the source tree {where}")


@pytest.fixture(autouse=True, scope="session")
def _run_outside_the_source_tree(tmp_path_factory):
    """Subprocesses started by tests (``python -c``, ``python -m fastopt``) put their
    working directory first on sys.path: run them from an empty directory, so that
    they import the same fastopt as the tests, never the source tree's."""
    import os
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)
