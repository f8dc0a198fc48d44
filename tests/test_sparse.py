"""Row-sparse gradients: lazy semantics, duplicates, scipy inputs, validation,
determinism, and torch's SparseAdam / sparse Adagrad."""

import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse as sp

import fastopt
from fastopt import rules
from fastopt.sparse import coalesce

from cases import SPARSE_BACKENDS, SPARSE_LAZY
from conftest import CPU_BACKENDS, DTYPES
RTOL = {np.float32: 2e-5, np.float64: 1e-11}


def random_rowsparse(rng, nrows, row_shape, nnz, dtype, zipf=False):
    if zipf:
        idx = np.minimum(rng.zipf(1.3, nnz) - 1, nrows - 1)
    else:
        idx = rng.integers(0, nrows, nnz)
    vals = rng.standard_normal((nnz,) + row_shape)
    vals[rng.random(nnz) < 0.1] = 0.0
    return fastopt.RowSparse(idx.astype(rng.choice([np.int32, np.int64])), vals.astype(dtype))


def lazy_oracle(rule, variant, param, grads):
    """Lazy semantics spelled out: coalesce, apply the dense reference to the touched
    rows (and their state) with the parameter's step count; nothing else changes."""
    group = rule.check_group({**rule.defaults, **variant})
    uses = rule.uses_slots(group)
    p = param.copy()
    nrows = p.shape[0]
    state = {n: np.full(rule.slot_shape(p.shape), rule.slot_init(group, n), p.dtype)
             for n, u in zip(rule.slots, uses) if u}
    state.update(rule.host_init(group))
    for t, g in enumerate(grads, start=1):
        uniq, summed = coalesce(g.indices.astype(np.int64),
                                g.values.reshape(len(g.indices), -1), nrows)
        rows = p.reshape(nrows, -1)[uniq]
        st = {k: (v.reshape(nrows, -1)[uniq] if isinstance(v, np.ndarray) else v)
              for k, v in state.items()}
        with np.errstate(all="ignore"):
            rule.reference(rows, summed, st, group, t, set(rule.slots) if t == 1 else set())
        p.reshape(nrows, -1)[uniq] = rows
        for k, v in state.items():
            if isinstance(v, np.ndarray):
                v.reshape(nrows, -1)[uniq] = st[k]
            else:
                state[k] = st[k]
    return p, state


@pytest.mark.parametrize("variant_id,backend,dtype", SPARSE_LAZY.params("variant", "backend",
                                                                        "dtype"))
def test_lazy_matches_oracle(variant_id, backend, dtype):
    """Cases (tests/cases.py): every variant x backend, variant x dtype and backend x
    dtype pair, every rule x backend x dtype, every combination for Adam."""
    name, k = variant_id
    rule = rules.RULES[name]
    variant = rule.variants[k]
    rng = np.random.default_rng(7)
    shapes = [(40, 3), (25,)]
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    start = [p.copy() for p in params]
    seq = [[random_rowsparse(rng, s[0], s[1:], 12, dtype, zipf=True) for s in shapes]
           for _ in range(25)]
    opt = fastopt.CLASSES[name](params, backend=backend, **variant)
    for gs in seq:
        opt.step(gs)
    touched = [np.unique(np.concatenate([gs[j].indices for gs in seq])) for j in range(2)]
    for j, (p, p0) in enumerate(zip(params, start)):
        expected, exp_state = lazy_oracle(rule, variant, p0, [gs[j] for gs in seq])
        np.testing.assert_allclose(p, expected, rtol=RTOL[dtype], atol=RTOL[dtype])
        untouched = np.setdiff1d(np.arange(p.shape[0]), touched[j])
        np.testing.assert_array_equal(p[untouched], p0[untouched])
        got = opt.state_dict()["state"][j]
        for key, v in exp_state.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_allclose(got[key], v, rtol=RTOL[dtype], atol=RTOL[dtype])
                init = rule.slot_init(rule.check_group({**rule.defaults, **variant}), key)
                np.testing.assert_array_equal(got[key][untouched], np.array(init, dtype))


@pytest.mark.boundscheck
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("name", list(rules.RULES))
def test_all_rows_touched_equals_dense(name, backend):
    rule = rules.RULES[name]
    if rule.whole_tensor:         # refused (tests/test_tensor_rules.py, test_muon.py, test_adafactor.py)
        with pytest.raises(ValueError, match="row-sparse gradient"):
            fastopt.CLASSES[name]([np.ones((6, 4))], backend=backend).step(
                [fastopt.RowSparse(np.arange(6), np.ones((6, 4)))])
        return
    rng = np.random.default_rng(1)
    a = rng.standard_normal((6, 4))
    b = a.copy()
    oa = fastopt.CLASSES[name]([a], backend=backend, **rule.variants[-1])
    ob = fastopt.CLASSES[name]([b], backend=backend, **rule.variants[-1])
    for _ in range(5):
        g = rng.standard_normal((6, 4))
        perm = rng.permutation(6)
        oa.step([g])
        ob.step([fastopt.RowSparse(perm, g[perm])])
    np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-15)


@pytest.mark.boundscheck
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_duplicates_are_summed_in_order(backend):
    rng = np.random.default_rng(2)
    idx = np.array([3, 1, 3, 3, 0, 1])
    vals = rng.standard_normal((6, 5)).astype(np.float32)
    a = np.ones((4, 5), np.float32)
    b = a.copy()
    fastopt.Adam([a], lr=0.1, backend=backend).step([fastopt.RowSparse(idx, vals)])
    summed = np.stack([vals[4], vals[1] + vals[5], np.zeros(5, np.float32),
                       (vals[0] + vals[2]) + vals[3]])
    fastopt.Adam([b], lr=0.1, backend=backend).step(
        [fastopt.RowSparse(np.array([0, 1, 3]), summed[[0, 1, 3]])])
    np.testing.assert_array_equal(a, b)
    assert np.all(a[2] == 1)


@pytest.mark.boundscheck
@pytest.mark.parametrize("kind", ["csr_matrix", "csc_matrix", "coo_matrix", "csr_array",
                                  "coo_array"])
def test_scipy_sparse_gradients(kind):
    rng = np.random.default_rng(3)
    dense = np.zeros((8, 3))
    dense[[1, 4, 6]] = rng.standard_normal((3, 3))
    dense[6, :] = [0.0, 0.5, 0.0]
    m = getattr(sp, kind)(dense)
    a, b = np.ones((8, 3)), np.ones((8, 3))
    fastopt.Adagrad([a], lr=0.1).step([m])
    fastopt.Adagrad([b], lr=0.1).step([fastopt.RowSparse([1, 4, 6], dense[[1, 4, 6]])])
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="shape"):
        fastopt.Adagrad([np.ones((9, 3))]).step([m])
    with pytest.raises(ValueError, match="2-D"):
        fastopt.Adagrad([np.ones(24)]).step([sp.csr_matrix(np.ones((1, 24)))])


@pytest.mark.boundscheck
def test_one_dimensional_parameter_takes_element_indices():
    p = np.zeros(10)
    fastopt.SGD([p], lr=1.0).step([fastopt.RowSparse([2, 7, 2], [1.0, 2.0, 3.0])])
    expected = np.zeros(10)
    expected[2], expected[7] = -4.0, -2.0
    np.testing.assert_array_equal(p, expected)


@pytest.mark.boundscheck
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_bad_sparse_gradients_change_nothing(backend):
    p = np.ones((5, 2), np.float32)
    q = np.ones(3, np.float32)
    opt = fastopt.Adam([p, q], backend=backend)
    opt.step([fastopt.RowSparse([0], np.ones((1, 2), np.float32)), np.ones(3, np.float32)])
    before_p, before_q, sd = p.copy(), q.copy(), opt.state_dict()
    for bad, exc, msg in [
        (fastopt.RowSparse([0, 5], np.ones((2, 2), np.float32)), IndexError, "5"),
        (fastopt.RowSparse([-1], np.ones((1, 2), np.float32)), IndexError, "-1"),
        (fastopt.RowSparse([1], np.ones((1, 3), np.float32)), ValueError, "shape"),
        (fastopt.RowSparse([1], np.ones((1, 2), np.int64)), TypeError, "dtype"),
    ]:
        with pytest.raises(exc, match=msg):
            opt.step([bad, np.ones(3, np.float32)])
    np.testing.assert_array_equal(p, before_p)
    np.testing.assert_array_equal(q, before_q)
    after = opt.state_dict()
    for i in (0, 1):
        assert after["state"][i]["step"] == sd["state"][i]["step"]
        np.testing.assert_array_equal(after["state"][i]["exp_avg"], sd["state"][i]["exp_avg"])
    with pytest.raises(TypeError, match="int32 or int64"):
        fastopt.RowSparse(np.array([0.0]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="nnz"):
        fastopt.RowSparse(np.array([0, 1]), np.ones((3, 2)))


@pytest.mark.boundscheck
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_sparse_gradient_is_a_step_with_no_rows(backend):
    """An empty batch counts as a step, as torch's SparseAdam and Adagrad count it:
    state created, step 1, no row changed (before, it was dropped: the step counts
    and so the bias corrections drifted from torch's)."""
    p = np.ones((4, 2))
    opt = fastopt.Adam([p], backend=backend)
    opt.step([fastopt.RowSparse(np.zeros(0, np.int64), np.zeros((0, 2)))])
    st = opt.state_dict()["state"][0]
    assert st["step"] == 1
    np.testing.assert_array_equal(st["exp_avg"], 0)
    np.testing.assert_array_equal(p, 1)


@pytest.mark.boundscheck
def test_dense_and_sparse_in_one_step():
    emb, w = np.zeros((100, 4)), np.zeros(3)
    opt = fastopt.SGD({"emb": emb, "w": w}, lr=1.0)
    opt.step({"emb": fastopt.RowSparse([5], np.ones((1, 4))), "w": np.ones(3)})
    assert emb[5].tolist() == [-1] * 4 and emb.sum() == -4 and w.tolist() == [-1] * 3


@pytest.mark.boundscheck
def test_sparse_thread_count_does_not_change_results():
    code = """
import sys, numpy as np, numba, fastopt
numba.set_num_threads(int(sys.argv[1]))
rng = np.random.default_rng(0)
p = rng.standard_normal((20000, 16)).astype(np.float32)
opt = fastopt.Adam([p])
for _ in range(3):
    idx = np.minimum(rng.zipf(1.2, 30000) - 1, 19999)
    opt.step([fastopt.RowSparse(idx, rng.standard_normal((30000, 16)).astype(np.float32))])
sys.stdout.buffer.write(p.tobytes())
"""
    outs = [subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True,
                           check=True).stdout for n in (1, 2)]
    assert len(outs[0]) == 20000 * 16 * 4 and outs[0] == outs[1]


@pytest.mark.boundscheck
@pytest.mark.skipif("cython" not in fastopt.available_backends(), reason="no cython")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_parallel_duplicate_sums_match_across_backends(dtype):
    """A large Zipf batch (parallel row drivers, hot rows repeated hundreds of times):
    numba (duplicates summed in gradient order by owned row ranges, rows prefetched)
    and cython (per-row sums) agree bit for bit, and both equal the step with the
    gradient pre-summed in order of appearance."""
    rng = np.random.default_rng(7)
    rows, dim, nnz = 6000, 24, 20000
    idx = ((rng.zipf(1.2, nnz) - 1) * 2654435761) % rows
    vals = rng.standard_normal((nnz, dim)).astype(dtype)
    assert np.unique(idx).size * dim >= 32768          # the parallel drivers run
    uniq = np.unique(idx)
    summed = np.zeros((uniq.size, dim), dtype)
    for u, r in enumerate(uniq):
        hits = np.flatnonzero(idx == r)
        acc = vals[hits[0]].copy()
        for h in hits[1:]:
            acc += vals[h]
        summed[u] = acc
    base = rng.standard_normal((rows, dim)).astype(dtype)
    out = {}
    for backend in ("numba", "cython"):
        p = base.copy()
        opt = fastopt.Adam([p], lr=1e-2, backend=backend)
        for _ in range(2):
            opt.step([fastopt.RowSparse(idx, vals)])
        out[backend] = p
    q = base.copy()
    opt = fastopt.Adam([q], lr=1e-2, backend="numba")
    for _ in range(2):
        opt.step([fastopt.RowSparse(uniq, summed)])
    np.testing.assert_array_equal(out["numba"], out["cython"])
    np.testing.assert_array_equal(out["numba"], q)


def test_row_plan_inverse():
    """row_plan's inverse maps each gradient row to its unique row; its plan is
    coalesce_plan's."""
    pytest.importorskip("numba")
    from fastopt.sparse import coalesce_plan, row_plan
    rng = np.random.default_rng(5)
    for nrows, nnz in ((1, 3), (50, 7), (1000, 5000), (1 << 20, 3000)):
        idx = np.minimum(rng.zipf(1.2, nnz) - 1, nrows - 1).astype(np.int64)
        order, seg, uniq, inverse = row_plan(idx, nrows)
        for x, y in zip((order, seg, uniq), coalesce_plan(idx, nrows)):
            np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(uniq[inverse], idx)


def test_plan_is_a_stable_argsort_on_both_paths():
    """The plan is NumPy's stable argsort of the ids and the runs of equal ids, from
    the packed radix sort and from the merge-sort path that takes over where ids and
    positions do not fit 62 bits together (forced here with ``packed_bits=0``)."""
    pytest.importorskip("numba")
    from numba import njit
    from fastopt.sparse import _radix_plan
    plan = njit(lambda idx, nrows, inv, bits: _radix_plan(idx, nrows, inv, bits))
    rng = np.random.default_rng(11)
    for nrows, nnz in ((1, 1), (1, 4), (7, 0), (50, 9), (5000, 4000), (1 << 24, 2000)):
        idx = (rng.zipf(1.3, nnz) * 7919 % nrows).astype(np.int64)
        order = np.argsort(idx, kind="stable")
        uniq, first = np.unique(idx[order], return_index=True)
        for bits in (62, 0):
            inv = np.empty(nnz, np.int64)
            o, seg, u = plan(idx, nrows, inv, bits)
            np.testing.assert_array_equal(o, order)
            np.testing.assert_array_equal(u, uniq)
            np.testing.assert_array_equal(seg, np.append(first, nnz))
            np.testing.assert_array_equal(u[inv], idx)


torch = None
try:
    import torch
except ImportError:
    pass


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
@pytest.mark.parametrize("name,torch_cls,kw", [
    # SparseAdam adds eps to sqrt(v) before bias correction (the paper's placement);
    # fastopt's lazy Adam is exactly dense torch.optim.Adam on the touched rows, so
    # the two agree when eps is negligible
    ("Adam", "SparseAdam", {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-14}),
    ("Adagrad", "Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
])
@pytest.mark.boundscheck
def test_lazy_matches_torch_sparse(name, torch_cls, kw, backend):
    rng = np.random.default_rng(4)
    p = rng.standard_normal((30, 3))
    tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
    topt = getattr(torch.optim, torch_cls)([tp], **kw)
    opt = fastopt.CLASSES[name]([p], backend=backend, **kw)
    for _ in range(20):
        g = random_rowsparse(rng, 30, (3,), 10, np.float64)
        opt.step([g])
        tp.grad = torch.sparse_coo_tensor(torch.from_numpy(g.indices.astype(np.int64))[None],
                                          torch.from_numpy(g.values), (30, 3))
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-10, atol=1e-12)
