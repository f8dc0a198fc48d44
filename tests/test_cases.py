"""The case registry's guarantee (tests/cases.py), checked by brute force for every
case set the suites draw from: every case valid; every pair of values of every two
axes that some valid combination has appears in a case; every extra interaction
(``cover``) complete; every valid combination of the reference rule (Adam) present;
seed cases kept; the same cases on every run.  And the checker itself catches a
missing pair."""

import itertools

import numpy as np
import pytest

from fastopt import rules

import cases
from cases import CASE_SETS, pairwise


def _norm(v):
    """A comparable form of an axis value (dicts, lists, dtype classes)."""
    if isinstance(v, dict):
        return tuple(sorted((k, _norm(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    if isinstance(v, type):
        return ("type", v.__module__, v.__qualname__)
    return v


def _get(case, key):
    if key == "rule":
        return case["variant"][0] if "variant" in case else case["rule"]
    return case[key]


def _valid_combinations(axes, valid):
    names = list(axes)
    for combo in itertools.product(*(axes[n] for n in names)):
        case = dict(zip(names, combo))
        if valid is None or valid(case):
            yield case


def missing(axes, got, valid=None, full=None, cover=()):
    """What a list of cases ``got`` lacks of the guarantee, as a list of strings
    (empty: the guarantee holds).  Written independently of cases.pairwise."""
    names = list(axes)
    problems = []
    for case in got:
        if set(case) != set(names):
            problems.append(f"case {case} has axes {sorted(case)}, not {sorted(names)}")
        elif valid is not None and not valid(case):
            problems.append(f"invalid case {case}")
    keysets = [(a, b) for a, b in itertools.combinations(names, 2)] + [tuple(c) for c in cover]
    have = {ks: {tuple(_norm(_get(c, k)) for k in ks) for c in got} for ks in keysets}
    combos = list(_valid_combinations(axes, valid))
    for ks in keysets:
        want = {tuple(_norm(_get(c, k)) for k in ks) for c in combos}
        for values in sorted(want - have[ks], key=repr):
            problems.append(f"{' x '.join(ks)}: {values} never appears")
    if isinstance(full, (tuple, list)):       # Adam x every combination of these axes
        present = {tuple(_norm(c[n]) for n in full) for c in got if _reference_rule(c)}
        for c in combos:
            if _reference_rule(c) and tuple(_norm(c[n]) for n in full) not in present:
                problems.append(f"full cross: Adam with {[c[n] for n in full]} is missing")
    elif full is not None:
        present = {tuple(_norm(c[n]) for n in names) for c in got}
        for c in combos:
            if full(c) and tuple(_norm(c[n]) for n in names) not in present:
                problems.append(f"full cross: {c} is missing")
    return problems


def _reference_rule(case):
    return _get(case, "rule") == "Adam"


@pytest.mark.parametrize("name", sorted(CASE_SETS))
def test_case_set_keeps_its_guarantee(name):
    cs = CASE_SETS[name]
    assert len(cs) > 0
    full = cs.full if cs.full is not None else (
        _reference_rule if "variant" in cs.axes or "rule" in cs.axes else None)
    assert missing(cs.axes, list(cs), cs.valid, full, cs.cover) == []
    # the seed cases come first, unchanged
    for seed, case in zip(cs.seed, cs):
        assert {k: _norm(seed[k]) for k in cs.axes} == {k: _norm(v) for k, v in case.items()}
    # deterministic: the same axes give the same cases
    again = pairwise(cs.axes, full=cs.full, valid=cs.valid, seed=cs.seed, cover=cs.cover)
    assert [{k: _norm(v) for k, v in c.items()} for c in again] == \
        [{k: _norm(v) for k, v in c.items()} for c in cs]
    # no case twice (a repeated case would compile and run nothing new)
    keys = [tuple(_norm(c[n]) for n in cs.axes) for c in cs]
    assert len(set(keys)) == len(keys)


@pytest.mark.parametrize("name", sorted(CASE_SETS))
def test_every_rule_and_every_variant_is_run(name):
    """Whatever the set's other axes, every rule of the registry (every variant,
    where the set has a variant axis) that the set's validity admits is run."""
    cs = CASE_SETS[name]
    if "variant" in cs.axes:
        allowed = {tuple(_norm(c["variant"])) for c in _valid_combinations(cs.axes, cs.valid)}
        assert {tuple(_norm(c["variant"])) for c in cs} == allowed
        assert allowed <= {(n, k) for n, r in rules.RULES.items()
                           for k in range(len(r.variants))}
    elif "rule" in cs.axes:
        allowed = {c["rule"] for c in _valid_combinations(cs.axes, cs.valid)}
        assert {c["rule"] for c in cs} == allowed


def test_the_checker_catches_a_missing_pair():
    axes = {"variant": [("Adam", 0), ("SGD", 0), ("SGD", 1)], "dtype": cases.DTYPES,
            "options": ["none", "all", "element"]}
    got = pairwise(axes)
    assert missing(axes, got, full=_reference_rule) == []
    assert len(got) < 3 * 2 * 3                      # fewer than the full cross
    sgd = [c for c in got if c["variant"][0] == "SGD"]
    for drop in sgd:                                  # any SGD case is needed
        rest = [c for c in got if c is not drop]
        assert missing(axes, rest, full=_reference_rule) != []
    adam = next(c for c in got if c["variant"][0] == "Adam")
    rest = [c for c in got if c is not adam]
    assert any("full cross" in p for p in missing(axes, rest, full=_reference_rule))


def test_validity_and_extra_interactions():
    """Pairs that no valid combination has are not required; a ``cover`` tuple is
    covered in full."""
    axes = {"variant": [("Adam", 0), ("SGD", 0), ("Lion", 0)], "backend": ["a", "b", "c"],
            "dtype": cases.DTYPES}

    def valid(c):
        return not (c["backend"] == "c" and c["dtype"] is np.float64)
    got = pairwise(axes, valid=valid, cover=[("rule", "backend", "dtype")])
    assert all(valid(c) for c in got)
    assert missing(axes, got, valid=valid, full=_reference_rule,
                   cover=[("rule", "backend", "dtype")]) == []
    triples = {(c["variant"][0], c["backend"], c["dtype"]) for c in got}
    assert len(triples) == 3 * 5                     # 3 rules x 5 valid (backend, dtype)


def test_exact_mode_predicate_is_the_registry_one():
    """The one "exact mode possible" predicate: the rule's own (its closed form and
    the fused options), as the optimizer decides."""
    import fastopt
    for name, rule in rules.RULES.items():
        for k, variant in enumerate(rule.variants):
            for extra in ({}, {"clip_value": 0.5}, {"l1": 0.1}, {"max_norm": 1.0}):
                hyper = {**variant, **extra}
                possible = cases.exact_possible(name, hyper)
                assert possible == rule.exact_possible(hyper)
                try:
                    fastopt.CLASSES[name]([np.zeros((3, 2))], sparse_mode="exact", **hyper)
                    accepted = True
                except ValueError:
                    accepted = False
                assert possible == accepted, (name, k, extra)
    assert {c["variant"][0] for c in cases.CY_EXACT} == {"SGD", "Adagrad", "RMSprop"}
