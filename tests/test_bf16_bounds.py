"""bfloat16 parameters stay inside ``param_min``/``param_max`` and ``max_norm``.

The clamp and the row renormalization run in float32 before the bfloat16
write-back; rounding then put 68-92% of the clamped elements one bfloat16 step
outside [-0.1, 0.1] ("kahan", "stochastic", "nearest"), and row norms reached
0.5007 with ``max_norm=0.5``.  The parameter the model sees must be inside: the
bounds are rounded inward to bfloat16 values, ``max_norm`` keeps a 2**-7 margin for
the rounding updates, and the Kahan store stays between its value's two bfloat16
neighbours (:func:`fastopt.storage.bf16_fused_row`, ``codecs.bracket``).
"""

import numpy as np
import pytest

import fastopt
from fastopt import storage
from fastopt.storage import codecs as C
from fastopt.storage import reference as R

from conftest import CPU_BACKENDS

ml_dtypes = pytest.importorskip("ml_dtypes")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BF = np.dtype(ml_dtypes.bfloat16)
BF16_BACKENDS = [b for b in CPU_BACKENDS if "bfloat16" in fastopt.backends.capabilities()[b]]
UPDATES = list(storage.BF16_UPDATES)


def _run(backend, update, steps=25, seed=0, **fused):
    rng = np.random.default_rng(seed)
    p = (rng.standard_normal((16, 300)) * 0.2).astype(BF)
    opt = fastopt.AdamW([p], lr=0.05, backend=backend, bf16_update=update, seed=seed, **fused)
    for _ in range(steps):
        g = (rng.standard_normal(p.shape) * 3.0).astype(np.float32)
        opt.step([g])
        yield p.astype(np.float64)


@pytest.mark.parametrize("backend", BF16_BACKENDS)
@pytest.mark.parametrize("update", UPDATES)
@pytest.mark.parametrize("lo,hi", [(-0.1, 0.1), (-0.3, -0.1), (0.1, 0.3)])
def test_clamped_bfloat16_parameters_stay_inside(backend, update, lo, hi):
    hit = 0
    for w in _run(backend, update, param_min=lo, param_max=hi):
        assert w.min() >= lo and w.max() <= hi, (w.min(), w.max())
        hit += int(np.sum((w == w.min()) | (w == w.max())))
    assert hit > 0                       # the bounds were reached


@pytest.mark.parametrize("backend", BF16_BACKENDS)
@pytest.mark.parametrize("update", ["kahan", "nearest"])
@pytest.mark.parametrize("name,kw", [("LAMB", dict(lr=0.05)),
                                     ("LARS", dict(lr=1.0, trust_coefficient=0.2)),
                                     ("Muon", dict(lr=0.05))])
def test_clamped_bfloat16_parameters_of_whole_tensor_rules_stay_inside(backend, update,
                                                                       name, kw):
    """The same bounds for the rules whose norm pass or matrix phase reads bfloat16
    parameters (their update pass is the stored driver, its clamp the same)."""
    rng = np.random.default_rng(0)
    p = (rng.standard_normal((16, 300)) * 0.2).astype(BF)
    opt = fastopt.CLASSES[name]([p], backend=backend, bf16_update=update, param_min=-0.1,
                                param_max=0.1, **kw)
    top = storage.bf16_toward(0.1, down=True)     # the bound rounded inward
    hit = 0
    for _ in range(10):
        opt.step([(rng.standard_normal(p.shape) * 3.0).astype(np.float32)])
        w = p.astype(np.float64)
        assert w.min() >= -0.1 and w.max() <= 0.1, (w.min(), w.max())
        hit += int(np.sum(np.abs(w) == top))
    assert hit > 0                       # the bounds were reached


@pytest.mark.parametrize("backend", BF16_BACKENDS)
@pytest.mark.parametrize("update", UPDATES)
def test_renormalized_bfloat16_rows_stay_under_max_norm(backend, update):
    reached = 0.0
    for w in _run(backend, update, max_norm=0.5):
        norms = np.sqrt((w * w).sum(axis=1))
        assert norms.max() <= 0.5, norms.max()
        reached = max(reached, norms.max())
    assert reached > 0.49                 # rows were renormalized, not far below


@settings(max_examples=300, deadline=None, derandomize=True)
@given(x=st.floats(width=32, allow_nan=True, allow_infinity=True),
       t=st.integers(0, 0xFFFF))
def test_kahan_bracket_keeps_the_neighbours(x, t):
    """codecs.bracket (Numba) equals the NumPy definition and holds any bits between
    the two bfloat16 neighbours of x."""
    x = np.float32(x)
    got = C.bracket(np.uint16(t), x)
    want = R.bracket(np.array([t], np.uint16), np.array([x], np.float32))[0]
    assert got == want
    v = float(R.widen(np.array([got], np.uint16))[0])
    if np.isnan(x) or np.isnan(v):
        return
    b = int(np.array([x], np.float32).view(np.uint32)[0])
    near = R.widen(np.array([b >> 16, (b >> 16) + ((b & 0xFFFF) != 0)], np.uint16))
    lo, hi = float(near.min()), float(near.max())
    assert lo <= v <= hi
    tv = float(R.widen(np.array([t], np.uint16))[0])
    if lo <= tv <= hi:
        assert got == t                  # inside already: untouched


def test_bounds_are_rounded_inward():
    row = (1.0, np.inf, 0.0, -0.1, 0.1, 0.5)
    _, _, _, lo, hi, mn = storage.bf16_fused_row(row, "stochastic")
    assert lo >= -0.1 and hi <= 0.1
    assert np.array([lo, hi], np.float32).astype(BF).astype(np.float64).tolist() == [lo, hi]
    assert mn == 0.5 * (1 - 2 ** -7)
    assert storage.bf16_fused_row(row, "split")[5] == 0.5
