"""The architecture's promises, checked: one place per rule, per backend, per table."""

import importlib
import pathlib

import pytest

import fastopt
from fastopt import backends, rules
from fastopt.rules import fused

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_generated_cython_scalar_columns_are_current():
    """kernels/_cy_scalars.pxi is derived from the rules' Scalars declarations."""
    pxi = ROOT / "kernels" / "_cy_scalars.pxi"
    if not pxi.exists():
        pytest.skip("not running from a source tree (kernels/ is not installed)")
    assert pxi.read_text() == rules.cython_pxi(), (
        "kernels/_cy_scalars.pxi is stale: regenerate it with "
        "python -c \"import fastopt.rules as r; open('kernels/_cy_scalars.pxi', 'w')"
        ".write(r.cython_pxi())\"")


def test_generated_cython_dispatch_is_current():
    """kernels/_cy_dispatch.pxi (the extension's rule ids, names, tags and the
    dispatches on them) is derived from the rule registry."""
    pxi = ROOT / "kernels" / "_cy_dispatch.pxi"
    if not pxi.exists():
        pytest.skip("not running from a source tree (kernels/ is not installed)")
    assert pxi.read_text() == rules.cython_dispatch_pxi(), (
        "kernels/_cy_dispatch.pxi is stale: regenerate it with "
        "python -c \"import fastopt.rules as r; open('kernels/_cy_dispatch.pxi', 'w')"
        ".write(r.cython_dispatch_pxi())\"")


def test_the_cython_extension_dispatches_every_element_wise_math():
    """Every element-wise rule module has an id in the built extension (its names come
    from the registry, so a stale build shows here)."""
    ext = pytest.importorskip("fastopt._cy_dense")
    mods = [r.math.__module__.rsplit(".", 1)[-1] for r in rules.RULES.values()
            if r.layout not in ("rowwise", "factored")]     # (factored: passes of their own)
    assert list(ext.MATH_NAMES) == list(dict.fromkeys(mods))


@pytest.mark.parametrize("name", list(rules.RULES))
def test_a_rule_is_defined_in_its_module(name):
    rule = rules.RULES[name]
    module = importlib.import_module(rule.math.__module__)
    assert module.__name__.startswith("fastopt.rules.")
    # named scalars: the fused fields first, then the rule's own, declared once
    assert rule.Scalars._fields[:len(fused.FIELDS)] == fused.FIELDS
    assert module.Scalars is rule.Scalars
    assert rule.reference.__module__ == module.__name__
    own = set(rule.Scalars._fields) - set(fused.FIELDS)
    row, _ = rule.row(rule.check_group(rule.defaults), 1, rule.host_init(rule.defaults), ())
    assert len(row) == rule.nscalars <= rules.NSCALARS
    assert set(rule.flags) | set(rule.zero_switches) <= own


def test_every_backend_is_a_module_with_declared_features():
    for name in backends.available():
        bk = backends.resolve(name)
        assert bk.__class__.__module__.startswith("fastopt.backends.")
        assert bk.features <= set(backends.FEATURES)


def test_import_does_not_import_torch_or_numba_cuda():
    import subprocess
    import sys
    code = ("import sys, fastopt; print('torch' in sys.modules, "
            "'numba.cuda' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "False"]


def test_version_in_one_place():
    from fastopt import _version
    assert fastopt.__version__ == _version.__version__


def test_a_new_rule_gets_a_class_from_the_registry():
    """Adding a rule needs no class: one is generated from the rule's defaults."""
    import inspect

    import numpy as np
    from fastopt.optimizers import make_class
    cls = make_class(rules.Lion)
    params = inspect.signature(cls.__init__).parameters
    for k, v in rules.torch_defaults(rules.Lion).items():
        assert params[k].default == v
    p, q = np.ones(4), np.ones(4)
    cls([p], lr=0.1, weight_decay=0.1).step([np.full(4, -2.0)])
    fastopt.Lion([q], lr=0.1, weight_decay=0.1).step([np.full(4, -2.0)])
    np.testing.assert_array_equal(p, q)
