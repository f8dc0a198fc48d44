"""sparse_mode="exact": the result equals dense steps whose gradient is zero on the
untouched rows, caught up in closed form when a row is next touched or flushed."""

import numpy as np
import pytest

import fastopt
from fastopt import rules

from cases import SPARSE_BACKENDS, exact_possible
from test_sparse import random_rowsparse

#: every test here runs in .ci/run's boundscheck lane (NUMBA_BOUNDSCHECK=1)
pytestmark = pytest.mark.boundscheck

EXACT_BACKENDS = [b for b in SPARSE_BACKENDS
                  if fastopt.backends.resolve(b).supports("sparse_exact")]


def exact_cases():
    out = []
    for name, rule in rules.RULES.items():
        for k, v in enumerate(rule.variants):
            if exact_possible(rule, v):
                out.append(pytest.param(name, k, id=f"{name}-v{k}"))
    return out


def scatter(g, shape):
    dense = np.zeros(shape)
    np.add.at(dense.reshape(shape[0], -1), g.indices, g.values.reshape(len(g.indices), -1))
    return dense


def test_every_exact_capable_rule_is_covered():
    names = {c.values[0] for c in exact_cases()}
    assert names == {"SGD", "Adagrad", "RMSprop"}


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
@pytest.mark.parametrize("name,k", exact_cases())
def test_exact_equals_dense_with_zero_rows(name, k, backend):
    variant = rules.RULES[name].variants[k]
    rng = np.random.default_rng(11)
    shape = (30, 3)
    a = rng.standard_normal(shape)
    b = a.copy()
    sparse = fastopt.CLASSES[name]([a], backend=backend, sparse_mode="exact", **variant)
    dense = fastopt.CLASSES[name]([b], backend="numba", **variant)
    for t in range(30):
        g = random_rowsparse(rng, shape[0], shape[1:], 4, np.float64)
        if t == 12:        # a scheduler-like lr change: pending rows use the old lr
            for o in (sparse, dense):
                o.param_groups[0]["lr"] *= 0.5
        sparse.step([g])
        dense.step([scatter(g, shape)])
    touched_now = np.unique(g.indices)
    np.testing.assert_allclose(a[touched_now], b[touched_now], rtol=1e-9, atol=1e-12)
    sparse.flush()
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    for key, v in dense.state_dict()["state"][0].items():
        np.testing.assert_allclose(sparse.state_dict()["state"][0][key], v, rtol=1e-9,
                                   atol=1e-12)


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_exact_mixes_dense_steps_momentum_switch_and_float32(backend):
    rng = np.random.default_rng(5)
    a = rng.standard_normal((20, 2)).astype(np.float32)
    b = a.copy()
    kw = dict(lr=0.05, momentum=0.0, weight_decay=0.01)
    sparse = fastopt.SGD([a], backend=backend, sparse_mode="exact", **kw)
    dense = fastopt.SGD([b], **kw)
    for t in range(25):
        if t == 8:   # momentum switched on mid-run: the buffer starts then, for every row
            for o in (sparse, dense):
                o.param_groups[0].update(momentum=0.9, nesterov=True)
        g = random_rowsparse(rng, 20, (2,), 3, np.float32)
        if t % 7 == 3:
            gd = scatter(g, (20, 2)).astype(np.float32)
            sparse.step([gd])
            dense.step([gd])
        else:
            sparse.step([g])
            dense.step([scatter(g, (20, 2)).astype(np.float32)])
    sparse.flush()
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_exact_state_dict_flushes_and_resumes():
    rng = np.random.default_rng(6)
    p = rng.standard_normal((15, 2))
    q = p.copy()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.05)
    o1 = fastopt.SGD([p], sparse_mode="exact", **kw)
    o2 = fastopt.SGD([q], sparse_mode="exact", **kw)
    grads = [random_rowsparse(rng, 15, (2,), 3, np.float64) for _ in range(20)]
    for g in grads:
        o1.step([g])
    for g in grads[:10]:
        o2.step([g])
    sd = o2.state_dict()
    q2 = q.copy()
    o3 = fastopt.SGD([q2], sparse_mode="exact", **kw)
    o3.load_state_dict(sd)
    for g in grads[10:]:
        o3.step([g])
    o1.flush()
    o3.flush()
    np.testing.assert_allclose(q2, p, rtol=1e-12, atol=1e-14)


def test_exact_is_refused_without_a_closed_form():
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "Lion"):
        with pytest.raises(ValueError, match=name):
            fastopt.CLASSES[name]([np.ones((3, 2))], sparse_mode="exact")
    with pytest.raises(ValueError, match="weight_decay"):
        fastopt.Adagrad([np.ones((3, 2))], sparse_mode="exact", weight_decay=0.1)
    with pytest.raises(ValueError, match="centered"):
        fastopt.RMSprop([np.ones((3, 2))], sparse_mode="exact", centered=True)
    with pytest.raises(ValueError, match="sparse_mode"):
        fastopt.SGD([np.ones(3)], sparse_mode="eager")
    opt = fastopt.RMSprop([np.ones((3, 2))], sparse_mode="exact")
    opt.param_groups[0]["momentum"] = 0.5        # no closed form any more
    with pytest.raises(ValueError, match="momentum"):
        opt.step([fastopt.RowSparse([0], np.ones((1, 2)))])
