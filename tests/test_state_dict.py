"""state_dict round trips, resume, refusal of foreign state, thread-count determinism."""

import os
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import rules

from conftest import CPU_BACKENDS, awkward_grads, init_params, rule_cases, shapes_for

SHAPES = [(40,), (6, 7)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,k", rule_cases())
def test_resume_is_bit_identical_to_never_stopping(name, k, backend):
    variant = rules.RULES[name].variants[k]
    cls = fastopt.CLASSES[name]
    shapes = shapes_for(name, SHAPES)
    grads = awkward_grads(shapes, np.float32, 20, seed=5)
    straight = init_params(shapes, np.float32)
    opt = cls(straight, backend=backend, **variant)
    for gs in grads:
        opt.step(gs)
    resumed = init_params(shapes, np.float32)
    first = cls(resumed, backend=backend, **variant)
    for gs in grads[:9]:
        first.step(gs)
    sd = first.state_dict()
    saved_params = [p.copy() for p in resumed]
    del first
    params2 = [p.copy() for p in saved_params]
    second = cls(params2, backend=backend, **variant)
    second.load_state_dict(sd)
    for gs in grads[9:]:
        second.step(gs)
    for a, b in zip(straight, params2):
        np.testing.assert_array_equal(a, b)
    # round trip is exact and a copy
    sd2 = second.state_dict()
    second.load_state_dict(sd2)
    for i, st in sd2["state"].items():
        for key, v in st.items():
            np.testing.assert_array_equal(second.state_dict()["state"][i][key], v)


def test_state_dict_layout_uses_torch_names():
    p = np.ones(3, np.float32)
    opt = fastopt.Adam([p], amsgrad=True)
    opt.step([np.ones(3, np.float32)])
    sd = opt.state_dict()
    assert sd["version"] == 1 and sd["optimizer"] == "Adam"
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert sd["param_groups"][0]["params"] == [0]
    assert sd["param_groups"][0]["betas"] == (0.9, 0.999)
    sd["state"][0]["exp_avg"][:] = 7          # a copy: the optimizer is unaffected
    assert opt.state_dict()["state"][0]["exp_avg"][0] != 7


def test_load_refuses_foreign_or_mismatched_state():
    p = np.ones(3, np.float32)
    adam = fastopt.Adam([p])
    adam.step([np.ones(3, np.float32)])
    sd = adam.state_dict()
    with pytest.raises(ValueError, match="AdamW"):
        fastopt.AdamW([np.ones(3, np.float32)]).load_state_dict(sd)
    with pytest.raises(ValueError, match="shape"):
        fastopt.Adam([np.ones(4, np.float32)]).load_state_dict(sd)
    with pytest.raises(ValueError, match="dtype"):
        fastopt.Adam([np.ones(3, np.float64)]).load_state_dict(sd)
    bad = adam.state_dict()
    bad["state"][0]["exp_avg"] = bad["state"][0]["exp_avg"].astype(np.float64)
    target = fastopt.Adam([np.ones(3, np.float32)])
    with pytest.raises(ValueError, match="dtype"):
        target.load_state_dict(bad)
    bad = adam.state_dict()
    bad["param_groups"][0]["lr"] = -3.0
    with pytest.raises(ValueError, match="lr"):
        target.load_state_dict(bad)
    bad = adam.state_dict()
    bad["state"][0]["momentum_buffer"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="momentum_buffer"):
        target.load_state_dict(bad)
    assert target.state_dict()["state"] == {}   # nothing was loaded by the failures


@pytest.mark.parametrize("name", list(rules.RULES))
def test_thread_count_does_not_change_results(name):
    """The parallel driver gives bit-identical results with 1 and 2 threads."""
    a, b = shapes_for(name, [(300_000,), (1000,)])      # Muon: (500, 600), (25, 40)
    code = f"""
import sys, numpy as np, numba, fastopt
numba.set_num_threads(int(sys.argv[1]))
rng = np.random.default_rng(0)
p = [rng.standard_normal({a}).astype(np.float32), rng.standard_normal({b})]
opt = fastopt.{name}(p, backend='numba')
for _ in range(3):
    opt.step([rng.standard_normal({a}).astype(np.float32), rng.standard_normal({b})])
sys.stdout.buffer.write(p[0].tobytes() + p[1].tobytes())
"""
    outs = [subprocess.run([sys.executable, "-c", code, str(n)], capture_output=True,
                           check=True).stdout for n in (1, 2)]
    assert len(outs[0]) == 300_000 * 4 + 8000
    assert outs[0] == outs[1]


def test_works_from_a_read_only_install(tmp_path):
    """Kernels compile and run when the package directory is not writable (Numba
    falls back to a per-user cache directory)."""
    import shutil
    pkg = os.path.dirname(fastopt.__file__)
    dest = tmp_path / "site" / "fastopt"
    shutil.copytree(pkg, dest, ignore=shutil.ignore_patterns("__pycache__"))
    for root, dirs, files in os.walk(tmp_path / "site"):
        for f in files:
            os.chmod(os.path.join(root, f), 0o444)
        os.chmod(root, 0o555)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), HOME=str(tmp_path / "home"))
    env.pop("NUMBA_CACHE_DIR", None)
    code = ("import numpy as np, fastopt; p = np.ones(10, np.float32); "
            "o = fastopt.Adam([p], lr=0.5); o.step([np.ones(10, np.float32)]); "
            "assert fastopt.__file__.startswith(%r), fastopt.__file__; print(p[0])"
            % str(tmp_path / "site"))
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, cwd=str(tmp_path))
    finally:
        for root, dirs, files in os.walk(tmp_path / "site"):
            os.chmod(root, 0o755)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) == pytest.approx(0.5)
