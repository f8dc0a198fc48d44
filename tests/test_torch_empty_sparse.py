"""fastopt.torch and sparse gradients with no rows (an empty batch of ids for
``nn.Embedding(sparse=True)``, a batch of empty bags for ``nn.EmbeddingBag``).

torch counts such a gradient as a step: ``SparseAdam`` and ``Adagrad`` create the
state and advance ``state["step"]`` for it (the first step included) and change no
row.  fastopt.torch does the same: a parameter whose ``.grad`` is a sparse tensor
with no rows takes a step with no touched rows (lazy mode: only the step count and
the host scalars advance; exact mode: the rows fall one step behind and are caught
up later).  Regressions covered:

* the empty gradient was dropped from the step's active parameters while the cached
  plan still listed the parameter, so every later step raised ``KeyError`` (the
  slot views of the "inactive" parameter had been pruned, or never existed);
* the empty gradient was not counted as a step, so bias corrections and lr decay
  drifted from torch's and the saved ``step`` differed.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ft = pytest.importorskip("fastopt.torch")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import CPU_BACKENDS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch's Adagrad

COMPILED = [b for b in CPU_BACKENDS if b != "numpy"]
NAMES = ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "Lion",
         "RowWiseAdagrad"]
#: lazy-mode hyperparameters (non-default options on, so state and scalars matter)
LAZY = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.01),
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.01),
    "AdamW": dict(lr=0.01, weight_decay=0.1),
    "RMSprop": dict(lr=0.01, centered=True, momentum=0.5),
    "Adagrad": dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1),
    "Adamax": dict(lr=0.01, weight_decay=0.01),
    "NAdam": dict(lr=0.01, momentum_decay=0.01),
    "Lion": dict(lr=0.01, weight_decay=0.1),
    "RowWiseAdagrad": dict(lr=0.1, lr_decay=0.1),
}
#: exact-mode configurations (the rules with a closed form for skipped steps)
EXACT = {
    "SGD": dict(lr=0.05, momentum=0.9, dampening=0.5, weight_decay=0.01),
    "Adagrad": dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1),
    "RMSprop": dict(lr=0.01, alpha=0.9),
}
F64 = dict(rtol=1e-10, atol=1e-12)


def _np(t):
    return t.detach().cpu().numpy()


def _empty_sparse(shape, dtype):
    return torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.long),
                                   torch.zeros((0,) + tuple(shape[1:]), dtype=dtype), shape)


def _grad(kind, shape, dtype, rng):
    """A gradient of ``kind``: none, dense, rows (uncoalesced, duplicates) or empty."""
    if kind == "none":
        return None
    if kind == "dense":
        return torch.from_numpy(rng.standard_normal(shape)).to(dtype)
    if kind == "empty":
        return _empty_sparse(shape, dtype)
    nnz = int(rng.integers(1, 5))
    idx = torch.from_numpy(rng.integers(0, shape[0], nnz)).view(1, nnz)
    vals = torch.from_numpy(rng.standard_normal((nnz,) + tuple(shape[1:]))).to(dtype)
    return torch.sparse_coo_tensor(idx, vals, shape)


def _assert_state_close(o1, p1, o2, p2, **tol):
    for a, b in zip(p1, p2):
        np.testing.assert_allclose(_np(a), _np(b), **tol)
        s1, s2 = o1.state.get(a, {}), o2.state.get(b, {})
        assert sorted(s1) == sorted(s2)
        for k in s1:
            np.testing.assert_allclose(np.asarray(torch.as_tensor(s1[k]).numpy()),
                                       np.asarray(torch.as_tensor(s2[k]).numpy()), **tol,
                                       err_msg=k)


# ------------------------------------------------- 1. against torch, step by step

def _batch(module, t, empty, gen, n):
    """Step t's input for ``module``: no ids at all on an empty step; otherwise
    6 ids (Embedding) or 4 bags of which some are empty (EmbeddingBag)."""
    if isinstance(module, torch.nn.EmbeddingBag):
        if empty:                                  # a batch of empty bags only
            return torch.zeros(0, dtype=torch.long), torch.zeros(3, dtype=torch.long)
        ids = torch.randint(0, n, (6,), generator=gen)
        offsets = torch.tensor([0, 0, 2, 6]) if t % 2 else torch.tensor([0, 3, 3, 6])
        return ids, offsets
    if empty:
        return (torch.zeros(0, dtype=torch.long),)
    return (torch.randint(0, n, (6,), generator=gen),)


@pytest.mark.parametrize("empties", [(0, 4, 7), (3, 5, 8)], ids=["first-4-7", "3-5-8"])
@pytest.mark.parametrize("bag", [False, True], ids=["Embedding", "EmbeddingBag"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("oracle", ["SparseAdam", "Adagrad"])
def test_empty_sparse_batches_count_as_steps_like_torch(oracle, dtype, bag, empties):
    """10 steps of which 3 have no ids (the first one in one schedule): parameters,
    state and ``state["step"]`` after every step equal torch.optim.SparseAdam's (for
    lazy Adam; eps ~ 0, where SparseAdam's eps placement coincides with Adam's) and
    torch.optim.Adagrad(lr_decay=0.1)'s."""
    n, d = 12, 3
    torch.manual_seed(0)
    cls = torch.nn.EmbeddingBag if bag else torch.nn.Embedding
    kw = dict(mode="sum") if bag else {}
    e1 = cls(n, d, sparse=True, **kw).to(dtype)
    e2 = cls(n, d, sparse=True, **kw).to(dtype)
    e2.load_state_dict(e1.state_dict())
    if oracle == "SparseAdam":
        o1 = ft.Adam(e1.parameters(), lr=0.05, eps=1e-300)
        o2 = torch.optim.SparseAdam(e2.parameters(), lr=0.05, eps=1e-300)
        keys = ("exp_avg", "exp_avg_sq")
    else:
        o1 = ft.Adagrad(e1.parameters(), lr=0.1, lr_decay=0.1)
        o2 = torch.optim.Adagrad(e2.parameters(), lr=0.1, lr_decay=0.1)
        keys = ("sum",)
    tol = F64 if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    w0 = e1.weight.detach().clone()
    gen = torch.Generator().manual_seed(1)
    for t in range(10):
        empty = t in empties
        inputs = _batch(e1, t, empty, gen, n)
        w = torch.randn(4 if bag else 6, d, generator=gen, dtype=dtype)
        for e, o in ((e1, o1), (e2, o2)):
            o.zero_grad()
            out = e(*inputs)
            (out * w[:out.shape[0]]).sum().backward()
            assert e.weight.grad.is_sparse and (e.weight.grad._nnz() == 0) == empty
            o.step()
        np.testing.assert_allclose(_np(e1.weight), _np(e2.weight), **tol)
        s1, s2 = o1.state[e1.weight], o2.state[e2.weight]
        assert float(s1["step"]) == float(s2["step"]) == t + 1
        for k in keys:
            np.testing.assert_allclose(_np(s1[k]), _np(s2[k]), **tol, err_msg=k)
    assert float(o1.state_dict()["state"][0]["step"]) == 10
    assert (e1.weight.detach() - w0).abs().max() > 1e-3


# ------------------------------- 2. every class: an empty batch on a plan-building step

#: (grad kind of the embedding-like parameter A, of the dense parameter B) per step.
#: Empty batches arrive on the first step, on the step after state allocation, after
#: a dense -> sparse switch, on a fast-path step, and with the other gradient None.
SCHEDULE = [("empty", "none"), ("rows", "dense"), ("empty", "dense"), ("rows", "dense"),
            ("dense", "dense"), ("empty", "dense"), ("rows", "dense"), ("empty", "dense"),
            ("rows", "none"), ("empty", "none"), ("rows", "dense")]


def _cases():
    out = []
    for name in NAMES:
        for backend in COMPILED:
            out.append(pytest.param(name, backend, "lazy", id=f"{name}-{backend}-lazy"))
            if name in EXACT:
                out.append(pytest.param(name, backend, "exact", id=f"{name}-{backend}-exact"))
    return out


def _run_schedule(opt, params, grads_seq, check_lazy_empty=False):
    stepful = opt.stepful
    for t, grads in enumerate(grads_seq):
        before = {}
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
            if check_lazy_empty and g is not None and g.is_sparse and g._nnz() == 0:
                st0 = opt.state.get(p, {})
                before[p] = (p.detach().clone(),
                             {k: v.clone() for k, v in st0.items() if k in opt.rule.slots},
                             float(st0["step"]) if "step" in st0 else 0.0)
        opt.step()
        for p, (p0, slots0, step0) in before.items():
            # a step with no touched row: nothing but the counts changes
            assert torch.equal(p.detach(), p0), t
            for k, v in slots0.items():
                assert torch.equal(opt.state[p][k], v), (t, k)
            if stepful:
                assert float(opt.state[p]["step"]) == step0 + 1, t


@pytest.mark.parametrize("name,backend,mode", _cases())
def test_empty_batch_on_a_plan_building_step(name, backend, mode):
    """No exception on the steps after an empty sparse batch that arrives when the
    plan is built, and the result is that of a no-row step: lazy mode, the
    parameter and its slots unchanged by it, its step count advanced, and the whole
    trajectory equal to the NumPy reference backend's (which caches no plan); exact
    mode, equal to dense steps with the sparse gradients scattered (zero rows)."""
    dtype = torch.float64
    rng = np.random.default_rng(3)
    shapes = [(8, 3), (4, 2)]
    grads_seq = [[_grad(k, s, dtype, rng) for k, s in zip(kinds, shapes)]
                 for kinds in SCHEDULE]
    init = [torch.from_numpy(rng.standard_normal(s)) for s in shapes]
    cls = ft.CLASSES[name]
    hyper = (LAZY if mode == "lazy" else EXACT)[name]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = cls(params, backend=backend, sparse_mode=mode, **hyper)
    _run_schedule(opt, params, grads_seq, check_lazy_empty=mode == "lazy")
    ref_params = [torch.nn.Parameter(x.clone()) for x in init]
    if mode == "lazy":
        ref = cls(ref_params, backend="numpy", **hyper)
        _run_schedule(ref, ref_params, grads_seq)
    else:
        ref = cls(ref_params, backend=backend, **hyper)
        _run_schedule(ref, ref_params, [[g if g is None else g.to_dense() for g in gs]
                                        for gs in grads_seq])
        opt.flush()
    _assert_state_close(opt, params, ref, ref_params, rtol=1e-9, atol=1e-12)
    if opt.stepful:
        for j, p in enumerate(params):
            taken = sum(gs[j] is not None for gs in grads_seq)
            assert float(opt.state[p]["step"]) == taken
    # the engine cached its dense plan (a row-wise rule has none: every step is by rows)
    assert opt.engine._plan is not None or opt.rule.layout == "rowwise"


# ----------------------------------------------- 3. property: random sequences

KINDS = ["none", "dense", "rows", "empty"]


@st.composite
def sequences(draw):
    name = draw(st.sampled_from(NAMES))
    mode = draw(st.sampled_from(["lazy", "exact"] if name in EXACT else ["lazy"]))
    backend = draw(st.sampled_from(COMPILED))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    kinds = ["none", "rows", "empty"] if name == "Adam" else KINDS   # SparseAdam's domain
    nsteps = draw(st.integers(1, 7))
    steps = [(draw(st.sampled_from(kinds)), draw(st.sampled_from(kinds)))
             for _ in range(nsteps)]
    return name, mode, backend, dtype, steps, draw(st.integers(0, 2 ** 16))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(sequences())
def test_random_empty_batches_and_kind_switches(case):
    """Random sequences of empty and non-empty sparse batches, dense gradients and
    None, switching freely, for every class, compiled backend and sparse mode: never
    an exception, and equal to the oracle: torch.optim.Adagrad (Adagrad, whose exact
    mode without weight decay is its lazy mode), torch.optim.SparseAdam (Adam), dense
    steps with scattered gradients (exact mode), else the NumPy reference backend."""
    name, mode, backend, dtype, steps, seed = case
    rng = np.random.default_rng(seed)
    shapes = [(6, 2), (5,)]
    grads_seq = [[_grad(k, s, dtype, rng) for k, s in zip(kinds, shapes)] for kinds in steps]
    init = [torch.from_numpy(rng.standard_normal(s)).to(dtype) for s in shapes]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    ref_params = [torch.nn.Parameter(x.clone()) for x in init]
    cls = ft.CLASSES[name]
    torch_ref = name in ("Adagrad", "Adam")
    if name == "Adagrad":
        hyper = dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1)
        ref = torch.optim.Adagrad(ref_params, **hyper)
        ref_grads = grads_seq
    elif name == "Adam":
        hyper = dict(lr=0.05, eps=1e-300)
        ref = torch.optim.SparseAdam(ref_params, **hyper)
        ref_grads = grads_seq
    elif mode == "exact":
        hyper = EXACT[name]
        ref = cls(ref_params, backend="numpy", **hyper)
        ref_grads = [[g if g is None else g.to_dense() for g in gs] for gs in grads_seq]
    else:
        hyper = LAZY[name]
        ref = cls(ref_params, backend="numpy", **hyper)
        ref_grads = grads_seq
    opt = cls(params, backend=backend, sparse_mode=mode, **hyper)
    _run_schedule(opt, params, grads_seq, check_lazy_empty=mode == "lazy")
    for t, gs in enumerate(ref_grads):
        for p, g in zip(ref_params, gs):
            p.grad = None if g is None else g.clone()
        ref.step()
    opt.flush()
    tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5,
                                                                             atol=1e-6)
    for j, (a, b) in enumerate(zip(params, ref_params)):
        np.testing.assert_allclose(_np(a), _np(b), **tol)
        taken = sum(gs[j] is not None for gs in grads_seq)
        s1, s2 = opt.state.get(a, {}), ref.state.get(b, {})
        if opt.stepful and (taken or opt.eager_state):
            assert float(s1["step"]) == taken
            if torch_ref:
                assert float(s2["step"]) == taken      # torch's own count
        for k in set(s1) & set(s2):
            if k == "step":
                assert float(s1[k]) == float(s2[k])
            else:
                np.testing.assert_allclose(_np(s1[k]), _np(s2[k]), **tol, err_msg=k)
        assert sorted(k for k in s1 if k != "step") == sorted(k for k in s2 if k != "step")

