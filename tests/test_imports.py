"""What ``import fastopt`` imports, and what each feature imports on first use.

* ``import fastopt`` imports neither numba (about 0.2 s) nor ml_dtypes (about 0.4 s);
* numba is imported when a Numba-backed feature is first used (the numba backend,
  ``"auto"`` on host arrays, clip_grad_norm_, sparse coalescing), and the lazily
  compiled kernels still work (and keep their on-disk cache);
* ml_dtypes is imported only when a bfloat16 array or option appears;
* a dense float32 step on the Cython backend imports neither;
* a source tree without the compiled extensions imports, runs the other backends,
  and says how to build the Cython one (``backend="cython"``, ``python -m fastopt
  info``).

Each check runs in a fresh interpreter (``sys.modules`` of this process has long
had numba).  Nothing here measures time.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import fastopt

CYTHON = "cython" in fastopt.available_backends()


def run_py(code, cwd, timeout=300, env=None, prelude=""):
    """Run ``prelude`` then ``code`` in a fresh interpreter started in ``cwd``; its
    last stdout line parsed as JSON."""
    code = prelude + "\n" + textwrap.dedent(code)
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd,
                         capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, **(env or {})})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


LOADED = "json.dumps({m: m in sys.modules for m in ('numba', 'llvmlite', 'ml_dtypes')})"


def test_import_fastopt_imports_neither_numba_nor_ml_dtypes(tmp_path):
    out = run_py(f"""
        import importlib.util, json, sys
        import fastopt
        first = {LOADED}
        # lists numba without importing it (with numba-cuda installed, looking for a
        # GPU imports numba.cuda, hence numba)
        names = fastopt.available_backends()
        from fastopt import storage
        bf = storage.is_bf16(storage.compute_dtype("float32"))
        print(json.dumps([json.loads(first), names, bf, json.loads({LOADED}),
                          importlib.util.find_spec("numba_cuda") is not None]))
    """, tmp_path)
    first, names, bf, after, numba_cuda = out
    assert first == {"numba": False, "llvmlite": False, "ml_dtypes": False}
    assert "numba" in names and "numpy" in names
    assert bf is False
    if not numba_cuda:
        assert after == first


@pytest.mark.skipif(not CYTHON, reason="the cython backend is not built")
def test_cython_float32_step_imports_neither_numba_nor_ml_dtypes(tmp_path):
    out = run_py(f"""
        import json, sys
        import numpy as np
        import fastopt
        w = [np.zeros(1000, np.float32), np.ones((40, 3), np.float32)]
        g = [np.ones(1000, np.float32), np.full((40, 3), 0.5, np.float32)]
        opt = fastopt.Adam(w, backend="cython", weight_decay=0.1)
        opt.step(g)
        opt.step(g, grad_scale=2.0)
        sgd = fastopt.SGD([np.zeros(70_001)], lr=0.1, momentum=0.9, backend="cython")
        sgd.step([np.ones(70_001)])
        sd = opt.state_dict()
        opt.load_state_dict(sd)
        print(json.dumps([json.loads({LOADED}), float(w[0][0]), float(w[1][0, 0])]))
    """, tmp_path)
    loaded, w0, w1 = out
    assert loaded == {"numba": False, "llvmlite": False, "ml_dtypes": False}
    ref = [np.zeros(1000, np.float32), np.ones((40, 3), np.float32)]
    g = [np.ones(1000, np.float32), np.full((40, 3), 0.5, np.float32)]
    opt = fastopt.Adam(ref, backend="numba", weight_decay=0.1)   # bit-identical twins
    opt.step(g)
    opt.step(g, grad_scale=2.0)
    assert (w0, w1) == (float(ref[0][0]), float(ref[1][0, 0]))


def test_numba_is_imported_on_first_use_and_works(tmp_path):
    out = run_py(f"""
        import json, sys
        import numpy as np
        import fastopt
        from fastopt import clip
        res = {{"import": json.loads({LOADED}), "prange_bound": clip.prange.__module__}}
        w = np.zeros(5, np.float32)
        opt = fastopt.Adam([w], lr=0.1)                     # "auto": numba on host arrays
        res["auto"] = opt.backend.name
        res["after_auto"] = json.loads({LOADED})
        opt.step([np.arange(5, dtype=np.float32) - 2])
        res["w"] = w.tolist()
        g = np.full(300_000, 0.01, np.float32)             # the parallel block sums
        res["norm"] = fastopt.clip_grad_norm_([g], 1.0)
        res["prange_after"] = clip.prange.__module__
        p = np.zeros((6, 2))
        fastopt.Adagrad([p], lr=1.0, backend="numba").step(
            [fastopt.RowSparse(np.array([4, 1, 4]), np.ones((3, 2)))])
        res["sparse"] = p[:, 0].tolist()
        from fastopt import sparse
        order, seg, uniq = sparse.coalesce_plan(np.array([3, 0, 3], np.int64), 4)
        res["plan"] = [order.tolist(), seg.tolist(), uniq.tolist()]
        res["cached"] = type(clip._block_sums.dispatcher._cache).__name__
        print(json.dumps(res))
    """, tmp_path)
    assert out["import"]["numba"] is False
    assert out["prange_bound"] == "fastopt._jit"           # the stand-in until numba loads
    assert out["auto"] == "numba" and out["after_auto"]["numba"] is True
    assert out["w"] == pytest.approx([0.1, 0.1, 0.0, -0.1, -0.1], abs=1e-6)
    assert out["norm"] == pytest.approx(float(np.float32(0.01)) * np.sqrt(300_000), rel=1e-12)
    assert out["prange_after"].startswith("numba")          # rebound to numba.prange
    assert out["sparse"] == pytest.approx([0, -1, 0, 0, -1, 0])
    assert out["plan"] == [[1, 0, 2], [0, 1, 3], [0, 3]]
    assert out["cached"] != "NullCache"                     # cache=True kept


def test_bfloat16_imports_ml_dtypes_and_steps(tmp_path):
    out = run_py(f"""
        import json, sys
        import numpy as np
        import fastopt
        res = {{"import": json.loads({LOADED})}}
        # a float32 step with the default options does not need it
        fastopt.Adam([np.zeros(4, np.float32)], backend="numpy").step([np.ones(4, np.float32)])
        res["float32"] = json.loads({LOADED})["ml_dtypes"]
        # a storage option that stores bfloat16 does
        fastopt.Adam([np.zeros(4, np.float32)], backend="numpy", state_bits=16)
        res["state16"] = json.loads({LOADED})["ml_dtypes"]
        import ml_dtypes
        p = np.ones(8, ml_dtypes.bfloat16)
        opt = fastopt.Adam([p], lr=0.5, backend="numpy")
        opt.step([np.ones(8, ml_dtypes.bfloat16)])
        res["p"] = p.astype(np.float32).tolist()
        res["master"] = str(opt.state[0]["master_low"].dtype)
        print(json.dumps(res))
    """, tmp_path)
    assert out["import"]["ml_dtypes"] is False
    assert out["float32"] is False
    assert out["state16"] is True
    assert out["p"] == [0.5] * 8
    assert out["master"] == "uint16"


def test_bfloat16_checkpoint_round_trip_in_a_fresh_process(tmp_path):
    """The state is bfloat16 (state_bits=16): a fresh process that never imported
    ml_dtypes itself loads it (fastopt imports ml_dtypes for the option)."""
    p = np.linspace(-1, 1, 12).astype(np.float32)
    opt = fastopt.Adam([p], backend="numpy", state_bits=16)
    opt.step([np.ones(12, np.float32)])
    path = tmp_path / "ckpt.npz"
    fastopt.save(path, opt)
    want = opt.state[0]["exp_avg_sq"].view(np.uint16).tolist()
    out = run_py(f"""
        import json, sys
        import numpy as np
        import fastopt
        before = json.loads({LOADED})["ml_dtypes"]
        opt = fastopt.Adam([np.zeros(12, np.float32)], backend="numpy", state_bits=16)
        fastopt.load({str(path)!r}, opt)
        v = opt.state[0]["exp_avg_sq"]
        print(json.dumps([before, json.loads({LOADED})["ml_dtypes"], str(v.dtype),
                          v.view(np.uint16).tolist()]))
    """, tmp_path)
    assert out == [False, True, "bfloat16", want]


def test_python_fallback_of_cy_util_agrees():
    """``fastopt._py_util`` (used without the compiled extensions) gives what
    ``fastopt._cy_util`` gives."""
    from fastopt import _py_util
    cy = pytest.importorskip("fastopt._cy_util", reason="fastopt._cy_util is not built")
    params = [np.zeros((3, 4), np.float32)] * 7
    a = np.ones((3, 4), np.float32)

    class Sub(np.ndarray):
        pass

    cases = [[a, a.copy()], [a, np.ones((4, 3), np.float32)], [a, np.ones((3, 4))],
             [a, np.ones((3, 8), np.float32)[:, ::2]], [a, np.ones((3, 4), ">f4")],
             [a, np.ones((3, 4), np.float32).view(Sub)], [a, [[1.0] * 4] * 3],
             [np.asfortranarray(np.ones((3, 4), np.float32)), a]]
    for grads in cases:
        got = []
        for mod in (cy, _py_util):
            ptrs = np.zeros((2, 2), np.int64)
            got.append((mod.gather_grads(list(grads), params[:2], ptrs, 1), ptrs.tolist()))
        assert got[0] == got[1]
    assert _py_util.data_address(a) == cy.data_address(a)
    with pytest.raises(ValueError):
        _py_util.gather_grads([a], params[:2], np.zeros((2, 2), np.int64), 0)


def _source_tree_without_extensions(dest):
    """A copy of the imported package without compiled extensions or caches."""
    src = Path(fastopt.__file__).parent
    shutil.copytree(src, dest / "fastopt",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    assert not list((dest / "fastopt").rglob("*.so"))


#: run first in a subprocess that must import the copy: an editable install of fastopt
#: (setuptools' finder on sys.meta_path) would otherwise supply the compiled
#: extensions the copy lacks
_NO_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if not "
                "getattr(f, '__module__', '').startswith('__editable__')]")


def test_source_tree_without_compiled_extensions(tmp_path):
    _source_tree_without_extensions(tmp_path)
    out = run_py(f"""
        import json, sys
        import numpy as np
        import fastopt
        from fastopt.backends import base
        res = {{"loaded": json.loads({LOADED}), "file": fastopt.__file__,
               "gather": base.gather_grads.__module__}}
        res["names"] = fastopt.available_backends()   # (with numba-cuda: imports numba)
        w = np.zeros(4, np.float32)
        fastopt.SGD([w], lr=0.5, backend="numpy").step([np.ones(4, np.float32)])
        res["w"] = w.tolist()
        try:
            fastopt.Adam([w], backend="cython")
        except RuntimeError as exc:
            res["error"] = str(exc)
        print(json.dumps(res))
    """, tmp_path, prelude=_NO_EDITABLE)
    assert Path(out["file"]).resolve().parent == (tmp_path / "fastopt").resolve()
    assert "cython" not in out["names"] and "numba" in out["names"]
    assert out["gather"] == "fastopt._py_util"
    assert out["loaded"] == {"numba": False, "llvmlite": False, "ml_dtypes": False}
    assert out["w"] == [-0.5] * 4
    err = out["error"]
    assert "backend 'cython' is not available" in err
    assert "fastopt._cy_dense is not built" in err and "pip install ." in err
    info = _NO_EDITABLE + "; import runpy; sys.argv[1:] = ['info']; " \
        "runpy.run_module('fastopt', run_name='__main__', alter_sys=True)"
    res = subprocess.run([sys.executable, "-c", info], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert str(tmp_path / "fastopt") in res.stdout
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("cython: not available")]
    assert len(lines) == 1 and "pip install ." in lines[0], res.stdout
