"""Adafactor (the factored rule shape, fastopt/factored.py) against torch.optim.Adafactor.

(a) every CPU backend (numpy reference, numba, cython) against torch (foreach False and
    True) over 40 steps, float64 to 1e-9 and float32 to float32 tolerance, over
    hyperparameter variants and shapes (1-D, 2-D tall and wide, 3-D batched, 0-d,
    (1, N), (N, 1)); parameters and state;
(b) awkward gradients (zeros, huge, tiny, NaN) as torch gives them;
(c) the same bits with 1 and 2 threads (Numba and OpenMP), and Cython == Numba bit for bit;
(d) state_dict interchange with torch.optim.Adafactor both ways, checkpoint resume bit
    for bit, the functional form;
(e) refusals (nothing changes) and bad hyperparameters refused as torch refuses them.
"""

import copy
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import backends, rules

torch = pytest.importorskip("torch")
import fastopt.torch as ft  # noqa: E402

BACKENDS = [b for b in ("numpy", "numba", "cython") if b in backends.available()]
SHAPES = [(12, 5), (5, 12), (3, 4, 6), (2, 1, 3, 5), (10,), (), (1, 9), (9, 1)]
VARIANTS = [
    {},
    {"lr": 0.05, "weight_decay": 0.1},
    {"beta2_decay": -0.5, "eps": (1e-3, 1e-2), "d": 2.0},
    {"lr": 0.3, "eps": (None, 0.0), "maximize": True},
    {"lr": 1e-3, "beta2_decay": 0.0, "d": 1.5, "weight_decay": 0.01},
]
STEPS = 40
TOL = {np.float64: dict(rtol=1e-9, atol=1e-12), np.float32: dict(rtol=2e-5, atol=2e-6)}


def _grads(rng, shapes, dtype, kind="normal", k=0):
    out = []
    for s in shapes:
        g = rng.standard_normal(s).astype(dtype) * (1 + k % 3)
        if kind == "zeros":
            g = np.zeros(s, dtype)
        elif kind == "huge":
            g = (g * (1e10 if dtype == np.float32 else 1e100)).astype(dtype)
        elif kind == "tiny":
            g = (g * (1e-20 if dtype == np.float32 else 1e-150)).astype(dtype)
        elif kind == "nan" and g.size > 1 and k == 3:
            g.reshape(-1)[g.size // 2] = np.nan
        out.append(np.asarray(g, dtype))
    return out


def _torch_state(opt, p):
    st = opt.state[p]
    return {k: v.detach().numpy() for k, v in st.items() if k != "step"}


def _run_pair(backend, shapes, dtype, variant, foreach, kind="normal", steps=STEPS, seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(dtype) for s in shapes]
    tp = [torch.tensor(a.copy(), requires_grad=True) for a in init]
    fp = [a.copy() for a in init]
    topt = torch.optim.Adafactor(tp, foreach=foreach, **variant)
    fopt = fastopt.Adafactor(fp, backend=backend, **variant)
    for k in range(steps):
        gs = _grads(rng, shapes, dtype, kind, k)
        for t, g in zip(tp, gs):
            t.grad = torch.tensor(g.copy())
        topt.step()
        fopt.step(gs)
    return tp, topt, fp, fopt


def _compare(tp, topt, fp, fopt, dtype, equal_nan=False):
    for i, (t, f) in enumerate(zip(tp, fp)):
        np.testing.assert_allclose(f, t.detach().numpy(), equal_nan=equal_nan,
                                   err_msg=f"param {i} {f.shape}", **TOL[dtype])
        ts = _torch_state(topt, t)
        fs = fopt.state[i]
        assert set(ts) == set(fs) - {"step"}
        assert fs["step"] == int(topt.state[t]["step"].item())
        for name, v in ts.items():
            assert fs[name].shape == v.shape and fs[name].dtype == v.dtype, name
            np.testing.assert_allclose(fs[name], v, equal_nan=equal_nan,
                                       err_msg=f"{name} of param {i}", **TOL[dtype])


# ------------------------------------------------------------- (a) torch parity
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("foreach", [False, True], ids=["single", "foreach"])
@pytest.mark.parametrize("vi", range(len(VARIANTS)))
def test_matches_torch(backend, dtype, foreach, vi):
    tp, topt, fp, fopt = _run_pair(backend, SHAPES, dtype, VARIANTS[vi], foreach)
    _compare(tp, topt, fp, fopt, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_tensors_match_torch(backend, monkeypatch):
    """Several row blocks and chunks, through the parallel drivers."""
    import fastopt.factored
    monkeypatch.setattr(fastopt.factored, "PARALLEL_MIN", 0)
    shapes = [(300, 250), (70000,), (2, 130, 140)]
    tp, topt, fp, fopt = _run_pair(backend, shapes, np.float64, {"weight_decay": 0.01},
                                   False, steps=5)
    _compare(tp, topt, fp, fopt, np.float64)


# --------------------------------------------------------- (b) awkward gradients
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["zeros", "huge", "tiny", "nan"])
def test_awkward_gradients_as_torch(backend, dtype, kind):
    tp, topt, fp, fopt = _run_pair(backend, SHAPES, dtype, {"weight_decay": 0.1}, False,
                                   kind=kind, steps=6)
    _compare(tp, topt, fp, fopt, dtype, equal_nan=True)
    if kind == "nan":    # a NaN spreads over its matrix (through the mean of row_var);
        # in a vector it stays in its element (the divisor max(1, NaN) is 1, as in torch)
        assert np.isnan(fp[0]).all() and np.isnan(fp[4]).sum() == 1
        assert np.isfinite(fp[5]).all()       # the 0-d parameter has no NaN gradient
    elif kind == "zeros":
        for t, f in zip(tp, fp):
            assert np.isfinite(f).all()


def test_empty_tensor_is_skipped():
    p = np.zeros((0, 3))
    opt = fastopt.Adafactor([p], backend="numba")
    opt.step([np.zeros((0, 3))])
    assert opt.state[0]["step"] == 1


# ------------------------------------------------------------- (c) determinism
_SCRIPT = r"""
import hashlib, sys
import numpy as np
import fastopt
import fastopt.factored
shapes = [(333, 201), (3, 70, 190), (100003,)]
out = []
for backend, pmin in (("numba", 0), ("cython", 0), ("numba", 1 << 40), ("cython", 1 << 40)):
    fastopt.factored.PARALLEL_MIN = pmin      # the parallel drivers, then the serial ones
    for dtype in (np.float32, np.float64):
        rng = np.random.default_rng(3)
        ps = [rng.standard_normal(s).astype(dtype) for s in shapes]
        rng2 = np.random.default_rng(4)
        opt = fastopt.Adafactor(ps, backend=backend, weight_decay=0.1)
        for k in range(4):
            opt.step([rng2.standard_normal(s).astype(dtype) for s in shapes])
        h = hashlib.sha256()
        for i, p in enumerate(ps):
            h.update(p.tobytes())
            for n in ("row_var", "col_var", "variance"):
                if n in opt.state[i]:
                    h.update(opt.state[i][n].tobytes())
        out.append(h.hexdigest())
import numba
print(numba.get_num_threads(), " ".join(out))
"""


def _hashes(nthreads):
    env = dict(os.environ, OMP_NUM_THREADS=str(nthreads), NUMBA_NUM_THREADS=str(nthreads))
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    n, *hs = r.stdout.split()
    assert int(n) == nthreads
    return hs


@pytest.mark.skipif("cython" not in BACKENDS, reason="the Cython extension is not built")
def test_same_bits_with_one_and_two_threads_and_cython_equals_numba():
    one, two = _hashes(1), _hashes(2)
    assert one == two                    # (numba f32, f64, cython f32, f64) x (par, serial)
    assert one[:2] == one[2:4]           # Cython == Numba, bit for bit
    assert one[:4] == one[4:]            # parallel drivers == serial drivers


# ------------------------------------------- (d) state_dict, checkpoint, functional
def _torch_params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=dtype) for s in [(6, 5), (2, 3, 4), (7,), ()]]


def _step_both(opts_params, k, dtype=torch.float64):
    g = torch.Generator().manual_seed(100 + k)
    grads = [torch.randn(p.shape, generator=g, dtype=dtype) for p in opts_params[0][1]]
    for opt, ps in opts_params:
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        opt.step()


@pytest.mark.parametrize("direction", ["torch_to_fastopt", "fastopt_to_torch"])
def test_state_dict_interchange_with_torch(direction):
    hyper = dict(lr=0.05, weight_decay=0.1, eps=(1e-4, 1e-3))
    a = [p.clone().requires_grad_() for p in _torch_params()]
    b = [p.clone().requires_grad_() for p in _torch_params()]
    src_cls, dst_cls = ((torch.optim.Adafactor, ft.Adafactor) if direction == "torch_to_fastopt"
                        else (ft.Adafactor, torch.optim.Adafactor))
    src = src_cls(a, **hyper)
    ref = torch.optim.Adafactor(b, **hyper)
    for k in range(4):
        _step_both([(src, a), (ref, b)], k)
    sd = copy.deepcopy(src.state_dict())
    for st in sd["state"].values():           # torch's layout: keepdim shapes, step tensor
        assert torch.is_tensor(st["step"])
    c = [p.detach().clone().requires_grad_() for p in a]
    dst = dst_cls(c, **hyper)
    dst.load_state_dict(sd)
    for k in range(4, 10):
        _step_both([(dst, c), (ref, b)], k)
    for x, y in zip(c, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    for x, y in zip(c, b):
        for n, v in ref.state[y].items():
            torch.testing.assert_close(dst.state[x][n].to(v.dtype), v, rtol=1e-12, atol=1e-14)


def test_state_dict_refuses_wrong_shapes():
    p = [torch.zeros(4, 3, requires_grad=True)]
    opt = ft.Adafactor(p)
    p[0].grad = torch.ones(4, 3)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["row_var"] = torch.zeros(4)          # not the keepdim shape (4, 1)
    with pytest.raises(ValueError, match="row_var"):
        opt.load_state_dict(sd)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][0]["variance"] = sd["state"][0].pop("col_var").reshape(-1)
    with pytest.raises(ValueError):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "numpy"])
def test_checkpoint_resume_is_bit_identical(tmp_path, backend):
    rng = np.random.default_rng(5)
    shapes = [(20, 7), (3, 5, 4), (9,), ()]
    init = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [[rng.standard_normal(s).astype(np.float32) for s in shapes] for _ in range(8)]
    a = [x.copy() for x in init]
    oa = fastopt.Adafactor(a, backend=backend, weight_decay=0.01)
    for g in grads:
        oa.step(g)
    b = [x.copy() for x in init]
    ob = fastopt.Adafactor(b, backend=backend, weight_decay=0.01)
    for g in grads[:4]:
        ob.step(g)
    fastopt.save(tmp_path / "ck.npz", ob)
    c = [x.copy() for x in b]
    oc = fastopt.Adafactor(c, backend=backend, weight_decay=0.01)
    fastopt.load(tmp_path / "ck.npz", oc)
    for g in grads[4:]:
        oc.step(g)
    for x, y in zip(a, c):
        assert x.tobytes() == y.tobytes()
    for i in range(len(shapes)):
        for n, v in oa.state[i].items():
            assert np.asarray(v).tobytes() == np.asarray(oc.state[i][n]).tobytes(), n


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_equals_class(backend):
    rng = np.random.default_rng(6)
    hyper = dict(lr=0.05, weight_decay=0.1, maximize=True)
    for shape in [(6, 4), (2, 3, 5), (8,), ()]:
        p0 = rng.standard_normal(shape)
        a, b = p0.copy(), p0.copy()
        opt = fastopt.Adafactor([a], backend=backend, **hyper)
        if len(shape) >= 2:
            st = [np.zeros(shape[:-1] + (1,)), np.zeros(shape[:-2] + (1,) + shape[-1:]), None]
        else:
            st = [None, None, np.zeros(shape)]
        for step in range(1, 6):
            g = rng.standard_normal(shape)
            opt.step([g])
            assert fastopt.functional.adafactor_(b, g, *st, step=step, backend=backend,
                                                 **hyper) is None
        assert a.tobytes() == b.tobytes()
        for n, v in zip(rules.Adafactor.slots, st):
            if v is not None:
                assert v.tobytes() == opt.state[0][n].tobytes()


def test_functional_checks_state_shapes():
    p = np.zeros((4, 3))
    with pytest.raises(ValueError, match="row_var"):
        fastopt.functional.adafactor_(p, np.ones((4, 3)), np.zeros((4,)), np.zeros((1, 3)),
                                      step=1)
    with pytest.raises(ValueError, match="no state 'variance'"):
        fastopt.functional.adafactor_(p, np.ones((4, 3)), np.zeros((4, 1)), np.zeros((1, 3)),
                                      np.zeros((4, 3)), step=1)
    assert not p.any()


# ------------------------------------------------------------------ (e) refusals
def _snapshot(opt, ps):
    return [p.copy() for p in ps], copy.deepcopy(opt.state)


def test_refusals_change_nothing():
    ps = [np.ones((8, 4)), np.ones(5)]
    opt = fastopt.Adafactor(ps, backend="numba")
    opt.step([np.ones((8, 4)), np.ones(5)])
    before = _snapshot(opt, ps)
    with pytest.raises(ValueError, match="row-sparse"):
        opt.step([fastopt.RowSparse(np.array([1]), np.ones((1, 4))), np.ones(5)])
    with pytest.raises(ValueError, match="grad_scale"):
        opt.step([np.ones((8, 4)), np.ones(5)], grad_scale=2.0)
    after = _snapshot(opt, ps)
    for x, y in zip(before[0], after[0]):
        assert x.tobytes() == y.tobytes()
    assert before[1].keys() == after[1].keys()
    for i in before[1]:
        for n, v in before[1][i].items():
            assert np.asarray(v).tobytes() == np.asarray(after[1][i][n]).tobytes()


@pytest.mark.parametrize("option", [{"max_norm": 1.0}, {"clip_value": 1.0}, {"l1": 0.1},
                                    {"param_min": -1.0}])
def test_fused_options_refused(option):
    with pytest.raises(ValueError, match="fused options"):
        fastopt.Adafactor([np.ones((3, 3))], **option)


def test_exact_mode_low_state_and_bfloat16_refused():
    with pytest.raises(ValueError, match="exact"):
        fastopt.Adafactor([np.ones((3, 3))], sparse_mode="exact")
    for bits in (8, 16):
        with pytest.raises(ValueError, match=f"state_bits={bits}"):
            fastopt.Adafactor([np.ones((3, 3), np.float32)], backend="numba", state_bits=bits)
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(ValueError, match="bfloat16"):
        fastopt.Adafactor([np.ones((3, 3), ml_dtypes.bfloat16)], backend="numba")


def test_every_backend_class_has_the_factored_feature():
    """CUDA included (its kernels: tests/test_adafactor_cuda.py, in the simulator)."""
    from fastopt.backends.cuda import CudaBackend
    assert "factored" in CudaBackend.features
    assert set(backends.capable("factored")) >= {"numba", "numpy"}


@pytest.mark.parametrize("bad", [
    {"lr": -1e-3}, {"beta2_decay": 0.1}, {"eps": (-1e-3, 1e-3)}, {"eps": (None, -1.0)},
    {"d": 0.0}, {"d": 0.5}, {"weight_decay": -0.1}])
def test_bad_hyperparameters_refused_as_torch(bad):
    with pytest.raises(ValueError):
        torch.optim.Adafactor([torch.zeros(2, requires_grad=True)], **bad)
    with pytest.raises(ValueError):
        fastopt.Adafactor([np.zeros(2)], **bad)
    with pytest.raises(ValueError):
        ft.Adafactor([torch.zeros(2, requires_grad=True)], **bad)
    with pytest.raises(ValueError):
        fastopt.functional.adafactor_(np.zeros(2), np.ones(2), None, None, np.zeros(2),
                                      step=1, **bad)


def test_torch_dropin_matches_torch_float32():
    a = [p.clone().requires_grad_() for p in _torch_params(dtype=torch.float32)]
    b = [p.clone().requires_grad_() for p in _torch_params(dtype=torch.float32)]
    oa, ob = torch.optim.Adafactor(a, foreach=True), ft.Adafactor(b)
    for k in range(40):
        _step_both([(oa, a), (ob, b)], k, torch.float32)
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, rtol=2e-5, atol=2e-6)
    assert hashlib  # (imported for the determinism script's twin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_nonfinite_skips_the_whole_step(backend):
    ps = [np.ones((4, 3)), np.ones(3)]
    opt = fastopt.Adafactor(ps, backend=backend)
    assert opt.step([np.ones((4, 3)), np.ones(3)], skip_nonfinite=True) is True
    before = [p.copy() for p in ps], copy.deepcopy(opt.state)
    bad = np.ones(3)
    bad[1] = np.inf
    assert opt.step([np.ones((4, 3)), bad], skip_nonfinite=True) is False
    for x, y in zip(before[0], ps):
        assert x.tobytes() == y.tobytes()
    assert opt.state[0]["step"] == 1
    assert opt.state[0]["row_var"].tobytes() == before[1][0]["row_var"].tobytes()

