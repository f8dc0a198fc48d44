"""The Cython backend (``fastopt._cy_dense``, ``kernels/_cy_rules.pxd``) against its
semantic twin, the Numba CPU backend, bit for bit.

Every case is driven by the registry (``fastopt.rules.RULES``, each rule's
``variants``) and the capability table, not by hand lists:

(a) capabilities and the compiled scalar layout (named columns, NSCALARS);
(b) element math: every element-wise rule x variant x dtype, with the fused options
    off and all on, on awkward inputs (signed zeros, huge, tiny, NaN, +-Inf), against
    the rules' Python functions; row-wise rules row by row;
(c) dense multi-tensor steps through the optimizer classes: every rule x variant x
    dtype, with no option, the element-wise options (+ grad_scale) and all options
    (max_norm: the row driver), awkward gradients, bit-identical to numba; the
    functional layer likewise; each option alone;
(d) row-sparse lazy steps with duplicate indices (serial and parallel sizes);
(e) exact sparse mode (every registry variant that has a closed form), with a flush;
(f) serial vs parallel, 1 vs 2 OpenMP threads;
(g) bad tables, plans and arrays given to the entry points raise, writing nothing.

Both backends do the same IEEE operations in the same order and dtype (no FMA
contraction, no fast-math), so no tolerance is used: values are compared bit for
bit, except that any NaN equals any NaN (a NaN's payload is not part of the
contract).
"""

import dataclasses
import os
import subprocess
import sys
import types

import numpy as np
import pytest

_cy_dense = pytest.importorskip("fastopt._cy_dense",
                                reason="the Cython extension fastopt._cy_dense is not built")

import fastopt  # noqa: E402
from fastopt import functional, planner, rules  # noqa: E402
from fastopt.backends import FEATURES, capabilities, numba_cpu  # noqa: E402
from fastopt.backends import cython as cy_backend  # noqa: E402
from fastopt.backends.base import CHUNK, FMT_COLS  # noqa: E402
from fastopt.rules import fused  # noqa: E402
from fastopt.rules.base import NSLOTS  # noqa: E402
from fastopt.sparse import coalesce_plan  # noqa: E402

from cases import CY_EXACT, CY_SPARSE, CY_STEPS, same, same_optimizers  # noqa: E402
from conftest import shapes_for  # noqa: E402

# the extension is built: from here on, a backend that does not load is a failure
BACKEND = cy_backend.register_backend()
assert BACKEND is not None, fastopt.backends.unavailable().get("cython")

DTYPES = [np.float32, np.float64]
DT_IDS = ["f32", "f64"]

#: the element-wise options (the dense driver's Fused loop) and all of them
ELEMENT_OPTS = dict(clip_value=0.5, l1=0.5, param_min=-1.5, param_max=1.25)
ALL_OPTS = dict(ELEMENT_OPTS, max_norm=2.0)
#: each option alone: (hyperparameters, grad_scale)
ALONE = {"grad_scale": ({}, 8.0), "clip_value": ({"clip_value": 0.5}, None),
         "l1": ({"l1": 0.5}, None), "param_min": ({"param_min": -0.5}, None),
         "param_max": ({"param_max": 0.25}, None), "max_norm": ({"max_norm": 1.0}, None)}
assert tuple(ALONE) == fused.SWITCHES

AWKWARD = [0.0, -0.0, 1e30, -1e30, 1e-30, -1e-30, 1e3, -1e3, 0.5, -2.0, 3.25,
           np.nan, np.inf, -np.inf]


def rule_cases(pred=lambda rule, variant: True):
    return [pytest.param(name, k, id=f"{name}-v{k}")
            for name, rule in rules.RULES.items()
            for k, variant in enumerate(rule.variants) if pred(rule, variant)]


def elementwise(rule, variant):
    # (factored rules have no element math of this form: tests/test_adafactor.py)
    return rule.layout not in ("rowwise", "factored")


# ----------------------------------------------------------------- helpers

def init_params(shapes, dtype, seed=1):
    """Random parameters with exact zeros of both signs and tiny entries (L1 hits)."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in shapes:
        p = rng.standard_normal(shape)
        f = p.reshape(-1)
        f[::9] *= 1e-4
        f[3::11] = 0.0
        f[5::13] = -0.0
        out.append(p.astype(dtype))
    return out


def awkward_grad(rng, shape, dtype, t):
    """Step ``t``'s gradient: random with zeros; on some steps huge (1e30), tiny
    (1e-30), all zero, or with a NaN and +-Inf at fixed places."""
    g = rng.standard_normal(shape)
    g[rng.random(shape) < 0.2] = 0.0
    f = g.reshape(-1)
    kind = t % 6
    if kind == 1:
        f[::7] *= 1e30
    elif kind == 2:
        g *= 1e-30
    elif kind == 3 and f.size >= 3:
        f[:3] = (np.nan, np.inf, -np.inf)
    elif kind == 4:
        g[...] = 0.0
    return g.astype(dtype)


def zipf_rows(rng, nrows, nnz, D, dtype, t):
    """A row-sparse gradient: Zipf(1.2) indices (hot rows repeated many times) and
    awkward values."""
    idx = np.minimum(rng.zipf(1.2, nnz) - 1, nrows - 1).astype(np.int64)
    vals = awkward_grad(rng, (nnz, D), dtype, t)
    return idx, vals


def both(make):
    """``make(backend)`` for numba and cython."""
    return make("numba"), make("cython")


# ---------------------------------------------------- (a) capabilities, layout

def test_cython_has_every_feature():
    table = capabilities()
    assert table["cython"] == sorted(FEATURES) == table["numba"]
    assert type(BACKEND).features is fastopt.backends.Backend.features   # no override


def test_compiled_layout_matches_the_scalars_declarations():
    assert cy_backend.layout_mismatches(_cy_dense) == []
    assert _cy_dense.NSCALARS_BUILT == rules.NSCALARS
    assert _cy_dense.NSLOTS_BUILT == NSLOTS == rules.NSLOTS
    # every constant of the generated .pxi is checked, and nothing else
    names = {line.split("=")[0].strip() for line in rules.cython_pxi().splitlines()
             if "=" in line}
    assert set(_cy_dense.COLUMNS) | {"NSCALARS"} == names
    # a stale build (a column moved, a field renamed, another width) is detected
    for change in ({"COLUMNS": {**_cy_dense.COLUMNS, "ADAM_EPS": 7}},
                   {"COLUMNS": {**_cy_dense.COLUMNS, "SGD_GONE": 9}},
                   {"NSCALARS_BUILT": rules.NSCALARS + 1}):
        fake = types.SimpleNamespace(**{k: getattr(_cy_dense, k) for k in dir(_cy_dense)
                                        if k.isupper() or k.endswith("_BUILT")})
        for k, v in change.items():
            setattr(fake, k, v)
        assert cy_backend.layout_mismatches(fake), change
    assert cy_backend.layout_mismatches(types.SimpleNamespace()) != []


def test_every_registry_rule_has_a_cython_copy():
    assert list(BACKEND.rule_ids) == list(rules.RULES)
    for name, rule in rules.RULES.items():
        if rule.factored:      # passes of their own (_cy_factored.pxi; test_adafactor.py)
            continue
        rid = BACKEND.rule_id(rule)
        if rule.layout == "rowwise":
            names, prefixes = _cy_dense.ROWWISE_NAMES, _cy_dense.ROWWISE_SCALARS
        else:
            names, prefixes = _cy_dense.MATH_NAMES, _cy_dense.MATH_SCALARS
        assert names[rid] == cy_backend.math_module(rule)
        assert prefixes[rid] == cy_backend.scalars_prefix(rule.Scalars)
    assert BACKEND.rule_id(rules.AdamW) == BACKEND.rule_id(rules.Adam)


def test_rule_without_cython_math_is_refused_before_writing():
    def element(p, g, s0, s1, s2, c):
        return p, s0, s1, s2
    custom = dataclasses.replace(rules.SGD, name="Custom", math=element)
    with pytest.raises(NotImplementedError, match="cython"):
        BACKEND.rule_id(custom)
    # a copy of a registry rule is not the registry rule
    with pytest.raises(NotImplementedError):
        BACKEND.rule_id(dataclasses.replace(rules.Adam))


def test_register_backend_is_idempotent():
    assert cy_backend.register_backend() is BACKEND
    assert fastopt.available_backends().count("cython") == 1
    assert fastopt.backends.resolve("cython") is BACKEND


# ---------------------------------------------------------- (b) element math

def _scalar_rows(rule, variant, grad_scale=None):
    """The float64 scalar rows of the variant at step 1 (fresh state) and step 7."""
    group = rule.check_group({**rule.defaults, **variant})
    host = rule.host_init(group)
    out = []
    for step, fresh in ((1, set(rule.slots)), (7, set())):
        row, host2 = rule.row(group, step, host, fresh, grad_scale)
        out.append((f"step{step}", row))
        host = host2 or host
    return out


def _inputs(rng, dtype, n):
    """n rows (p, g, s0, s1, s2): all-awkward, mixed and random rows; non-negative
    copies for states that only make sense so (v, sum)."""
    aw = np.array(AWKWARD)
    rows = [rng.choice(aw, 5) for _ in range(n // 2)]
    for _ in range(n - len(rows)):
        r = rng.standard_normal(5) * 10.0 ** rng.integers(-6, 4, 5)
        r[rng.random(5) < 0.2] = 0.0
        rows.append(r)
    rows += [np.abs(r) for r in rows[: n // 4]]
    return np.array(rows).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name,k", rule_cases(elementwise))
def test_element_math_bit_identical(name, k, dtype):
    """``math_elem`` (the dense driver's element loop, options off and the five
    element-wise options on) against ``element_step`` run as Python on NumPy
    scalars of the dtype."""
    from fastopt.backends.element import element_step
    rule = rules.RULES[name]
    rid = BACKEND.rule_id(rule)
    dt = np.dtype(dtype).type
    rng = np.random.default_rng(1000 + 10 * k)
    rows = _inputs(rng, dtype, 120)
    opts_ok = rule.matrix is None       # Muon refuses clip_value and grad_scale
    variant = {**rule.variants[k], **(ELEMENT_OPTS if opts_ok else {})}
    checked = 0
    for switches in (fused.OFF,) + (((True,) * 5 + (False,)),) * opts_ok:
        step = element_step(rule.math, switches)
        opts = cy_backend.option_mask(_cy_dense, switches)
        for label, row64 in _scalar_rows(rule, variant, 4.0 if switches[0] else None):
            c = rule.Scalars(*(dt(x) for x in row64))
            table = list(row64) + [0.0] * (rules.NSCALARS - len(row64))
            for r in rows:
                p, g, s0, s1, s2 = (dt(x) for x in r)
                with np.errstate(all="ignore"):
                    want = step(p, g, s0, s1, s2, c, dt(0))
                got = _cy_dense.math_elem(rid, p, g, s0, s1, s2, table, dtype, opts)
                for what, w, v in zip(("p", "s0", "s1", "s2"), want, got):
                    assert type(v) is dt
                    same(dt(w), v, f"{name} v{k} {label} opts {opts:#x} {what}: "
                                   f"inputs {r.tolist()}")
                checked += 1
    assert checked == (2 if opts_ok else 1) * 2 * len(rows)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("name,k", rule_cases(lambda r, v: r.layout == "rowwise"))
def test_row_math_bit_identical(name, k, dtype):
    """Row-wise rules: whole rows (lengths 1..33, awkward values) through the Cython
    copy and the Python function, bit for bit (row and accumulator)."""
    rule = rules.RULES[name]
    rid = BACKEND.rule_id(rule)
    dt = np.dtype(dtype).type
    rng = np.random.default_rng(2000 + 10 * k)
    aw = np.array(AWKWARD)
    checked = 0
    for label, row64 in _scalar_rows(rule, rule.variants[k]):
        c = rule.Scalars(*(dt(x) for x in row64))
        table = list(row64) + [0.0] * (rules.NSCALARS - len(row64))
        for n in (1, 7, 8, 33):
            for trial in range(12):
                if trial % 3 == 0:
                    prow, grow = rng.choice(aw, n), rng.choice(aw, n)
                else:
                    prow = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 4, n)
                    grow = rng.standard_normal(n) * 10.0 ** rng.integers(-6, 4, n)
                    grow[rng.random(n) < 0.2] = 0.0
                prow, grow = prow.astype(dtype), grow.astype(dtype)
                acc = dt(abs(rng.standard_normal()) if trial % 2 else 0.0)
                want_p = prow.copy()
                with np.errstate(all="ignore"):
                    want_acc = rule.math(want_p, grow, acc, dt(1) / dt(n), dt(0), c)
                got_p = prow.copy()
                got_acc = _cy_dense.math_row(rid, got_p, grow, acc, table)
                assert type(got_acc) is dt
                same(dt(want_acc), got_acc, f"{name} {label} n={n} trial {trial}")
                same(want_p, got_p, f"{name} {label} n={n} trial {trial}")
                checked += 1
    assert checked == 2 * 4 * 12


def test_math_helpers_reject_bad_arguments():
    c = (0.0,) * rules.NSCALARS
    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError):
        _cy_dense.math_row(len(_cy_dense.ROWWISE_NAMES), p, p.copy(), 0.0, c)
    with pytest.raises(ValueError):
        _cy_dense.math_row(0, p, np.zeros(3, np.float64), 0.0, c)
    with pytest.raises(ValueError):
        _cy_dense.math_row(0, p, p.copy(), 0.0, c[:4])
    with pytest.raises(ValueError):
        _cy_dense.math_elem(len(_cy_dense.MATH_NAMES), 0, 0, 0, 0, 0, c, np.float32)
    with pytest.raises(ValueError):
        _cy_dense.math_elem(0, 0, 0, 0, 0, 0, c[:5], np.float32)
    with pytest.raises(ValueError):                      # max_norm is not element-wise
        _cy_dense.math_elem(0, 0, 0, 0, 0, 0, c, np.float32, _cy_dense.OPTION_BITS[5])
    with pytest.raises(TypeError):
        _cy_dense.math_elem(0, 0, 0, 0, 0, 0, c, np.float16)


# ------------------------------------------------ (c) dense, through the classes

DENSE_SHAPES = [(7,), (33, 17), (0,), (40_000,)]      # 40,640 elements: parallel driver
OPTION_SETS = {"none": ({}, None), "element": (ELEMENT_OPTS, 8.0), "all": (ALL_OPTS, 8.0)}


def run_classes(backend, name, variant, dtype, shapes, steps, grad_scale=None, seed=0,
                sparse=None, mode="lazy"):
    """``steps`` steps of the optimizer class on awkward gradients; ``sparse``: a
    function (rng, param, t) -> RowSparse or None (dense)."""
    rng = np.random.default_rng(seed)
    ps = init_params(shapes, dtype)
    opt = fastopt.CLASSES[name](ps, backend=backend, sparse_mode=mode, **variant)
    for t in range(steps):
        gs = []
        for p in ps:
            g = sparse(rng, p, t) if sparse is not None else None
            gs.append(g if g is not None else awkward_grad(rng, p.shape, dtype, t))
        assert opt.step(gs, grad_scale=grad_scale) is True
    return opt


@pytest.mark.parametrize("variant_id,dtype,options", CY_STEPS.params("variant", "dtype",
                                                                    "options"))
def test_dense_steps_bit_identical_to_numba(variant_id, dtype, options):
    """Many tensors per step (one bucket, parallel size), 7 steps of awkward
    gradients; "all" adds max_norm, so the tensors go through the row driver.
    Cases: tests/cases.py (every variant x dtype, variant x option set, dtype x
    option set pair; every combination for Adam)."""
    name, k = variant_id
    hyper, gs = OPTION_SETS[options]
    variant = {**rules.RULES[name].variants[k], **hyper}
    on, oc = both(lambda b: run_classes(b, name, variant, dtype, shapes_for(name, DENSE_SHAPES),
                                        7, gs, seed=k))
    same_optimizers(on, oc)
    if hyper:                                   # the options did run: the clamps hold
        p = np.concatenate([q.ravel() for q in oc._params])
        p = p[~np.isnan(p)]
        assert p.min() >= np.float32(hyper["param_min"]) and p.max() <= hyper["param_max"]


def test_groups_dtypes_and_skipped_params():
    """Several groups (several scalar rows, options in one group only), two dtypes
    (two buckets), a None gradient on odd steps."""
    def run(backend):
        ps = init_params([(50_000,), (3, 5), (40_000,)], np.float32) \
            + init_params([(1000,)], np.float64)
        opt = fastopt.Adam([{"params": ps[:2], "lr": 0.1, **ELEMENT_OPTS},
                            {"params": ps[2:], "amsgrad": True, "weight_decay": 0.1}],
                           backend=backend)
        rng = np.random.default_rng(3)
        for t in range(6):
            gs = [awkward_grad(rng, p.shape, p.dtype, t) for p in ps]
            if t % 2:
                gs[1] = None
            opt.step(gs, grad_scale=2.0 if t % 3 == 0 else None)
        return opt
    on, oc = both(run)
    same_optimizers(on, oc)
    assert [oc.state[i]["step"] for i in range(4)] == [6, 3, 6, 6]


@pytest.mark.parametrize("option", list(ALONE))
@pytest.mark.parametrize("name,k,dtype", [("Adam", 1, np.float32), ("SGD", 1, np.float64),
                                          ("RowWiseAdagrad", 1, np.float32)],
                         ids=["Adam-v1-f32", "SGD-v1-f64", "RowWiseAdagrad-v1-f32"])
def test_each_option_alone(name, k, dtype, option):
    """One fused option at a time, on a dense parameter (parallel size) and a
    row-sparse one with duplicate indices and rows longer than the extension's
    option blocks (the element-wise dense driver, the row driver and the row-wise
    driver)."""
    hyper, gs = ALONE[option]
    variant = {**rules.RULES[name].variants[k], **hyper}

    def sparse(rng, p, t):
        if p.ndim == 2:
            idx, vals = zipf_rows(rng, p.shape[0], 300, p.shape[1], p.dtype, t)
            return fastopt.RowSparse(idx, vals)
        return None
    on, oc = both(lambda b: run_classes(b, name, variant, dtype, [(40_000,), (40, 700)],
                                        6, gs, seed=5, sparse=sparse))
    same_optimizers(on, oc)


def test_grad_scale_with_skip_nonfinite():
    """skip_nonfinite checks g / grad_scale: an overflow there skips the step on
    both backends; otherwise the step is applied, bit-identically."""
    outs = []
    for backend in ("numba", "cython"):
        p = init_params([(64,)], np.float32)[0]
        opt = fastopt.Adam([p], backend=backend, clip_value=1.0)
        g = np.full(64, 3e38, np.float32)
        assert opt.step([g], grad_scale=0.5, skip_nonfinite=True) is False   # 6e38: Inf
        assert opt.step([g], grad_scale=4.0, skip_nonfinite=True) is True
        outs.append(opt)
    same_optimizers(*outs)
    assert outs[1].state[0]["step"] == 1


def _functional_cases():
    """The dense cases (CY_STEPS) of each rule's richest (last) variant with options:
    the functional layer runs the drivers those cases compile."""
    return [pytest.param(c["variant"][0], c["dtype"], c["options"],
                         id=f"{c['variant'][0]}-{DT_IDS[DTYPES.index(c['dtype'])]}-"
                            f"{c['options']}")
            for c in CY_STEPS if c["options"] != "none"
            and c["variant"][1] == len(rules.RULES[c["variant"][0]].variants) - 1]


@pytest.mark.parametrize("name,dtype,options", _functional_cases())
def test_functional_bit_identical_to_numba(name, dtype, options):
    """The functional layer with the richest variant, grad_scale on every step:
    "element", a 1-D parameter of parallel size with the element-wise options (the
    dense driver); "all", a 2-D one with all options (the row driver), stepped with
    a row-sparse gradient every other step.  Every rule with both option sets, and
    both dtypes (tests/cases.py CY_STEPS)."""
    rule = rules.RULES[name]
    fn = getattr(functional, functional._fname(rule))
    variant = dict(rule.variants[-1])
    group = rule.check_group({**rule.defaults, **variant})
    uses = rule.uses_slots(group)
    hyper, gs = OPTION_SETS[options]
    shape = (40_000,) if options == "element" else (20, 5)

    def run(backend):
        rng = np.random.default_rng(7)
        p = init_params([shape], dtype)[0]
        slots = [np.full(rule.slot_shape(p.shape), rule.slot_init(group, n), dtype)
                 if u else None for n, u in zip(rule.slots, uses)]
        host = rule.host_init(group)
        for t in range(1, 6):
            g = awkward_grad(rng, p.shape, dtype, t)
            if p.ndim == 2 and t % 2:
                idx = np.array([3, 0, 3, 19, 3], dtype=np.int64)
                g = fastopt.RowSparse(idx, awkward_grad(rng, (5, 5), dtype, t))
            new = fn(p, g, *slots, step=t, backend=backend, grad_scale=gs,
                     **variant, **hyper, **host)
            if host:   # one host scalar comes back alone, several as a dict (ASGD)
                host = new if isinstance(new, dict) else {next(iter(host)): new}
        return [(p, slots, host)]
    for (pn, sn, hn), (pc, sc, hc) in zip(*both(run)):
        same(pn, pc, "param")
        for a, b in zip(sn, sc):
            assert (a is None) == (b is None)
            if a is not None:
                same(a, b, "state")
        assert hn == hc


# --------------------------------------------------------- (d) sparse, lazy

def _zipf_sparse(nnz):
    def sparse(rng, p, t):
        idx, vals = zipf_rows(rng, p.shape[0], nnz, int(np.prod(p.shape[1:])), p.dtype, t)
        return fastopt.RowSparse(idx, vals.reshape((nnz,) + p.shape[1:]))
    return sparse


@pytest.mark.parametrize("variant_id,dtype,options", CY_SPARSE.params("variant", "dtype",
                                                                     "options"))
def test_sparse_lazy_bit_identical_to_numba(variant_id, dtype, options):
    """Zipf gradients with many duplicates: a small parameter (serial row driver)
    and a 3-D one with enough touched elements for the parallel driver; without
    options, and with all of them (the row driver the dense "all" cases above run:
    the cases extend those, tests/cases.py)."""
    name, k = variant_id
    hyper, gs = OPTION_SETS[options]
    variant = {**rules.RULES[name].variants[k], **hyper}
    shapes = [(300, 7), (3000, 4, 16)]
    rng = np.random.default_rng(k)
    for shape, nnz, parallel in zip(shapes, (2000, 6000), (False, True)):
        idx = np.minimum(rng.zipf(1.2, nnz) - 1, shape[0] - 1)
        order, seg, uniq = coalesce_plan(idx.astype(np.int64), shape[0])
        D = int(np.prod(shape[1:]))
        assert (uniq.shape[0] * D >= numba_cpu.PARALLEL_MIN) == parallel
        assert nnz >= 2 * uniq.shape[0] and np.diff(seg).max() >= 100   # many duplicates
    for shape, nnz in zip(shapes, (2000, 6000)):
        on, oc = both(lambda b: run_classes(b, name, variant, dtype, [shape], 4, gs, seed=k,
                                            sparse=_zipf_sparse(nnz)))
        same_optimizers(on, oc)
        p0 = init_params([shape], dtype)[0]
        untouched = (oc._params[0] == p0).reshape(shape[0], -1).all(axis=1)
        assert 0 < untouched.sum() < shape[0]


# --------------------------------------------------------- (e) sparse, exact

@pytest.mark.parametrize("variant_id,dtype,scaled", CY_EXACT.params("variant", "dtype",
                                                                    "scaled"))
def test_sparse_exact_bit_identical_to_numba(variant_id, dtype, scaled):
    """Exact mode: sparse steps touching different rows (each row caught up over
    the steps it missed, in the serial row driver), a dense step in between (the
    parameter is flushed first), and a final flush (parallel size).  Rows with
    -0.0 and with a state that overflows to Inf are included.  Cases: every
    variant with a closed form x dtype, x plain / scaled and clipped, pairwise."""
    name, k = variant_id
    scaled = scaled == "scaled-clipped"
    variant = {**rules.RULES[name].variants[k]}
    if scaled:
        variant["clip_value"] = 0.75
    shape = (4000, 12)

    def sparse(rng, p, t):
        if t == 3:
            return None                                   # a dense step
        rows = rng.choice(p.shape[0], 300, replace=False)
        rows = np.concatenate([rows, rows[:40]])          # duplicates
        if t == 1:
            rows[:5] = (0, 1, 2, 3, 4)
        vals = awkward_grad(rng, (rows.shape[0], p.shape[1]), p.dtype, t)
        if t == 1:
            vals[:5] = 1e30                               # rows 0-4: state -> Inf
        return fastopt.RowSparse(rows, vals)

    def run(backend):
        opt = run_classes(backend, name, variant, dtype, [shape], 7, 4.0 if scaled else None,
                          seed=k, sparse=sparse, mode="exact")
        opt._params[0][::97] = -0.0          # signed zeros on rows to be caught up
        return opt

    on, oc = both(run)
    same_optimizers(on, oc)            # before the flush: caught-up touched rows only
    for opt in (on, oc):
        assert opt._exact.behind(0, 7).shape[0] > 3000     # most rows are behind
        more = _zipf_sparse(500)(np.random.default_rng(9), opt._params[0], 1)
        opt.step([more])
        opt.flush()
    same_optimizers(on, oc)
    assert oc._exact.behind(0, 8).shape[0] == 0
    assert oc.state[0]["step"] == 8


# ------------------------------------------ (f) serial/parallel, OpenMP threads

@pytest.mark.parametrize("name", [n for n, r in rules.RULES.items() if not r.factored])
def test_serial_and_parallel_drivers_agree(name, monkeypatch):
    # (factored rules take no fused options: tests/test_adafactor.py runs 1 and 2 threads)
    """The same steps with every driver serial, and every driver parallel."""
    opts_ok = rules.RULES[name].matrix is None      # Muon: no clip_value, grad_scale
    variant = {**rules.RULES[name].variants[-1], **(ELEMENT_OPTS if opts_ok else {})}

    def run(parallel_min):
        monkeypatch.setattr(numba_cpu, "PARALLEL_MIN", parallel_min)
        dense = run_classes("cython", name, variant, np.float32,
                            shapes_for(name, [(70_001,), (9, 3)]), 4, 2.0 if opts_ok else None)
        if rules.RULES[name].whole_tensor:        # whole tensors only: no row steps
            return (dense,)
        sparse = run_classes("cython", name, {**variant, "max_norm": 1.0}, np.float64,
                             [(500, 8)], 3, sparse=_zipf_sparse(900))
        return dense, sparse
    serial, parallel = run(1 << 40), run(0)
    for a, b in zip(serial, parallel):
        same_optimizers(a, b)


_THREAD_SCRIPT = r"""
import hashlib
import numpy as np
import fastopt
from fastopt import _cy_dense, rules
print("threads", _cy_dense.openmp_max_threads())
opts = dict(clip_value=0.5, l1=0.1, param_min=-1.0, param_max=1.0)
for name in [n for n, r in rules.RULES.items() if not r.factored]:   # (test_adafactor.py)
    for dt in (np.float32, np.float64):
        rng = np.random.default_rng(0)
        mat = rules.RULES[name].matrix is not None   # Muon: matrices, no clip/grad_scale
        dense = rng.standard_normal((300, 331) if mat else 3 * 32768 + 777).astype(dt)
        table = rng.standard_normal((20_000, 8)).astype(dt)
        kw = dict(rules.RULES[name].variants[-1], **opts)
        if mat:
            del kw["clip_value"]
        a = fastopt.CLASSES[name]([dense], backend="cython", **kw)
        rows = not rules.RULES[name].whole_tensor   # whole tensors only: LAMB, LARS, Muon
        b = fastopt.CLASSES[name]([table], backend="cython", **kw,
                                  **({"max_norm": 1.5} if rows else {}))
        for _ in range(2):
            a.step([rng.standard_normal(dense.shape).astype(dt)],
                   grad_scale=None if mat else 2.0)
            idx = np.minimum(rng.zipf(1.2, 30_000) - 1, table.shape[0] - 1)
            vals = rng.standard_normal((30_000, 8)).astype(dt)
            if rows:
                b.step([fastopt.RowSparse(idx, vals)])
            else:
                g = np.zeros_like(table)
                np.add.at(g, idx, vals)
                b.step([g])
        h = hashlib.sha256(dense.tobytes() + table.tobytes())
        print(name, np.dtype(dt).name, h.hexdigest())
table = np.random.default_rng(1).standard_normal((50_000, 4)).astype(np.float32)
c = fastopt.SGD([table], backend="cython", sparse_mode="exact", lr=0.1, momentum=0.9,
                weight_decay=0.01)
rng = np.random.default_rng(2)
for _ in range(3):
    c.step([fastopt.RowSparse(rng.integers(0, 50_000, 9000), np.ones((9000, 4), np.float32))])
c.flush()
print("exact", hashlib.sha256(table.tobytes()).hexdigest())
"""


def test_same_bits_with_one_and_two_openmp_threads():
    outs = {}
    here = os.path.dirname(os.path.abspath(__file__))
    for nthreads in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(nthreads))
        res = subprocess.run([sys.executable, "-c", _THREAD_SCRIPT], env=env, cwd=here,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        lines = res.stdout.splitlines()
        assert lines[0] == f"threads {nthreads}"
        outs[nthreads] = lines[1:]
    assert len(outs[1]) == 2 * sum(not r.factored for r in rules.RULES.values()) + 1
    assert outs[1] == outs[2]


def _fork_child_step(conn):
    p, g = _fork_arrays()
    opt = fastopt.Adam([p], backend="cython", clip_value=0.5)
    opt.step([g], grad_scale=2.0)
    conn.send(p.tobytes())
    conn.close()


def _fork_arrays():
    rng = np.random.default_rng(4)
    return (rng.standard_normal(2 * numba_cpu.PARALLEL_MIN).astype(np.float32),
            rng.standard_normal(2 * numba_cpu.PARALLEL_MIN).astype(np.float32))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_forked_child_steps_serially():
    """GNU OpenMP cannot start a parallel region in a process forked after it ran
    one: a forked child must step (with the serial loops) instead of hanging."""
    import multiprocessing as mp
    p, g = _fork_arrays()
    opt = fastopt.Adam([p], backend="cython", clip_value=0.5)
    opt.step([g], grad_scale=2.0)                    # the parent's OpenMP pool is up
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    child = ctx.Process(target=_fork_child_step, args=(there,))
    child.start()
    ok = here.poll(60)
    got = here.recv() if ok else None
    child.join(5)
    if child.is_alive():
        child.kill()
    assert ok, "the forked child hung"
    assert child.exitcode == 0
    assert got == p.tobytes()


# -------------------------------------------------- (g) errors, validation

def _error_type(fn):
    try:
        fn()
    except Exception as exc:   # noqa: BLE001  (the type is what is compared)
        return type(exc)
    return None


def test_wrong_grad_shape_same_error_as_numba_and_nothing_changes():
    errors = {}
    for backend in ("numba", "cython"):
        p = np.ones((4, 5), dtype=np.float64)
        opt = fastopt.Adam([p], backend=backend, clip_value=1.0)
        errors[backend] = _error_type(lambda: opt.step([np.ones((5, 4))]))
        np.testing.assert_array_equal(p, 1.0)
        assert opt.state == {}
    assert errors["numba"] is not None
    assert errors["cython"] is errors["numba"]


def _dense_tables(p, g):
    """The tables of a one-tensor float32 bucket as the planner lays it out for the CPU
    backends (float32 parameters and state: the format whose loads and stores are the
    identity): ptrs, fmt, chunks (blocks of CHUNK elements), hyper, hidx."""
    ptrs = np.array([[p.ctypes.data, g.ctypes.data] + [p.ctypes.data] * NSLOTS],
                    dtype=np.int64)
    fmt = np.zeros((1, FMT_COLS), dtype=np.int64)
    fmt[0, :1 + NSLOTS] = p.ctypes.data
    fmt[0, 4:8] = (p.size, p.size, 1, 1)       # elements, row length, blocks, "scales"
    return (ptrs, fmt, np.array([[0, 0, 1]], dtype=np.int64), np.zeros((1, rules.NSCALARS)),
            np.zeros(1, dtype=np.int64))


def test_run_dense_validates_tables():
    p = np.zeros(4, dtype=np.float32)
    g = np.ones(4, dtype=np.float32)
    ptrs, fmt, chunks, hyper, hidx = _dense_tables(p, g)
    rid = BACKEND.rule_ids["SGD"]
    lr = rules.SGD.Scalars._fields.index("lr")
    bits = dict(zip(fused.SWITCHES, _cy_dense.OPTION_BITS))
    native = (_cy_dense.PARAM_KINDS["native"], _cy_dense.GRAD_KINDS["native"],
              _cy_dense.STATE_KINDS["native"], 0)

    def call(rule=rid, code=0, opts=0, ptrs=ptrs, fmt=fmt, chunks=chunks, hyper=hyper,
             hidx=hidx):
        _cy_dense.run_stored_dense(rule, code, *native, False, False, False, opts, ptrs, fmt,
                                   chunks, hyper, hidx, CHUNK, 4, 0)

    for kw, exc in [(dict(rule=99), ValueError), (dict(code=2), ValueError),
                    (dict(opts=bits["max_norm"]), ValueError),      # needs whole rows
                    (dict(opts=1 << 10), ValueError),               # unknown option bit
                    (dict(hyper=np.zeros((1, rules.NSCALARS + 2))), ValueError),  # a wrong width
                    (dict(ptrs=ptrs[:, :4].copy()), ValueError),
                    (dict(fmt=fmt[:, :9].copy()), ValueError),
                    (dict(hidx=np.zeros(2, dtype=np.int64)), ValueError),
                    (dict(hidx=np.ones(1, dtype=np.int64)), IndexError),
                    (dict(chunks=np.array([[1, 0, 1]], dtype=np.int64)), IndexError),
                    (dict(chunks=np.array([[0, 1, 0]], dtype=np.int64)), IndexError),
                    (dict(chunks=np.array([[0, 0, 2]], dtype=np.int64)), IndexError)]:
        with pytest.raises(exc):
            call(**kw)
        np.testing.assert_array_equal(p, 0.0)
    hyper[0, lr] = 0.5                                     # p = 0 - 0.5 * 1
    call()
    np.testing.assert_array_equal(p, -0.5)
    hyper[0, fused.FIELDS.index("grad_scale")] = 4.0       # p = -0.5 - 0.5 * (1 / 4)
    hyper[0, fused.FIELDS.index("param_min")] = -0.6       # then clamped
    call(opts=bits["grad_scale"] | bits["param_min"])
    np.testing.assert_array_equal(p, np.float32(-0.6))


def test_run_rows_validates_plan_and_writes_nothing():
    rid = BACKEND.rule_ids["SGD"]
    p = np.zeros((4, 2), dtype=np.float32)
    vals = np.ones((3, 2), dtype=np.float32)
    # parameter, gradient rows, 3 slots, aux, 3 scales (float32: only the first two read)
    addrs = np.array([p.ctypes.data, vals.ctypes.data] + [p.ctypes.data] * 7, dtype=np.int64)
    hyper = np.zeros((1, rules.NSCALARS))
    hyper[0, rules.SGD.Scalars._fields.index("lr")] = 0.5
    i64 = lambda *v: np.array(v, dtype=np.int64)        # noqa: E731
    good = (i64(0, 2, 1), i64(0, 2, 3), i64(1, 3))      # rows 1 (twice) and 3
    ident = np.array([[1.0, 0, 0, 1]] * 2)
    native = (_cy_dense.PARAM_KINDS["native"], _cy_dense.STATE_KINDS["native"], 0)

    def call(order=good[0], seg=good[1], uniq=good[2], nnz=3, dtype_code=0, rule=rid,
             coef=None, step=True, opts=0, hyper=hyper, addrs=addrs, kinds=native,
             inverse=None):
        _cy_dense.run_stored_rows(rule, dtype_code, *kinds, False, False, False, opts, addrs,
                                  4, 2, nnz, order, seg, uniq, hyper, coef, step, 0,
                                  fused.RENORM_EPS, 0, 0, inverse)

    for kw, exc in [(dict(rule=99), ValueError), (dict(dtype_code=2), ValueError),
                    (dict(opts=1 << 10), ValueError),
                    (dict(kinds=(99, 0, 0)), ValueError),                   # unknown format
                    (dict(hyper=np.zeros((1, rules.NSCALARS + 2))), ValueError),
                    (dict(hyper=np.zeros((0, rules.NSCALARS))), ValueError),
                    (dict(addrs=addrs[:3].copy()), ValueError),
                    (dict(nnz=2), ValueError), (dict(seg=i64(0, 3)), ValueError),
                    (dict(order=None), ValueError),
                    (dict(coef=np.ones((3, 4))), ValueError),               # not nuniq rows
                    (dict(coef=np.ones((2, 3))), ValueError),
                    (dict(step=False), ValueError),                         # flush, no maps
                    (dict(step=False, coef=ident, uniq=i64(3, 1)), IndexError),
                    (dict(order=i64(0, 3, 1)), IndexError),
                    (dict(uniq=i64(1, 4)), IndexError),            # row out of range
                    (dict(uniq=i64(3, 1)), IndexError),            # not increasing
                    (dict(uniq=i64(1, 1)), IndexError),            # repeated row
                    (dict(seg=i64(0, 0, 3)), IndexError),          # empty segment
                    (dict(seg=i64(0, 2, 4)), IndexError),          # past nnz
                    (dict(inverse=i64(0, 1)), ValueError),         # not nnz entries
                    (dict(inverse=i64(1, 0, 0)), IndexError),      # not the plan's
                    (dict(inverse=i64(0, 7, 0)), IndexError)]:
        with pytest.raises(exc):
            call(**kw)
        np.testing.assert_array_equal(p, 0.0)
    call(inverse=i64(0, 1, 0))            # the fused driver (sums, then updates)
    np.testing.assert_array_equal(p, [[0, 0], [-1, -1], [0, 0], [-0.5, -0.5]])
    p[:] = 0
    call()
    np.testing.assert_array_equal(p, [[0, 0], [-1, -1], [0, 0], [-0.5, -0.5]])
    # catch-up only: rows 1 and 3 through (a, b, c, e) = (2, 0, 0, 1): p <- 2 p
    call(coef=np.array([[2.0, 0, 0, 1]] * 2), step=False, order=None, seg=None, nnz=0)
    np.testing.assert_array_equal(p, [[0, 0], [-2, -2], [0, 0], [-1, -1]])


def test_run_rows_refuses_mismatched_arrays():
    rule = rules.Adam
    group = rule.check_group(dict(rule.defaults))
    spec = planner.group_spec(rule, group)
    row, _ = rule.row(group, 1, {}, set(rule.slots))
    p = np.zeros((6, 4), dtype=np.float32)
    idx = np.array([1, 1, 4], dtype=np.int64)
    good_vals = np.ones((3, 4), np.float32)
    ok = np.zeros((6, 4), np.float32)

    def work(slots, vals):
        return planner.rows_work(rule, spec, p, slots, row, idx, vals)
    for slots, vals in [([ok, np.zeros((4, 6), np.float32), None], good_vals),
                        ([ok, np.zeros((6, 4), np.float64), None], good_vals),
                        ([ok, np.zeros((4, 6), np.float32).T, None], good_vals),
                        ([ok, None, None], good_vals),
                        ([ok, ok.copy(), None], np.ones((3, 4), np.float64)),
                        ([ok, ok.copy(), None], np.ones((3, 5), np.float32))]:
        with pytest.raises(ValueError):
            BACKEND.run_rows(work(slots, vals))
        np.testing.assert_array_equal(p, 0.0)
    w = work([ok, ok.copy(), None], good_vals)
    w.catch = types.SimpleNamespace(coef=None)          # exact mode without its maps
    with pytest.raises(ValueError):
        BACKEND.run_rows(w)
    np.testing.assert_array_equal(p, 0.0)
    BACKEND.run_rows(work([ok, ok.copy(), None], good_vals))
    assert (p[[1, 4]] != 0).all() and (p[[0, 2, 3, 5]] == 0).all()
