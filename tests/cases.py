"""The test case registry: the cases the registry-driven suites draw from, in the
spirit of torch's OptimizerInfo, with one bitwise comparator and one "exact mode
possible" predicate.

Why
---
Every distinct (rule, variant flags, dtype, fused-option switches, storage format,
serial/parallel) compiles its own Numba driver, by design (speed); a full cross of
every axis in every suite compiled about a thousand drivers per CI run.  The suites
therefore take *pairwise* crosses from :func:`pairwise`, which keep every
interaction of two axes, and a *full* cross for the reference rule.

What :func:`pairwise` guarantees (checked by tests/test_cases.py for every set in
:data:`CASE_SETS`)
------------------------------------------------------------------------------
For a case set made from axes ``A1 .. An`` (each a list of values), a validity
predicate and a full-cross predicate:

1. every case is valid;
2. **pairs**: for every two axes ``Ai``, ``Aj`` and every value ``a`` of ``Ai`` and
   ``b`` of ``Aj`` such that *some* valid combination of all axes has ``Ai = a``
   and ``Aj = b``, at least one case has ``Ai = a`` and ``Aj = b``.  With the axes
   the suites use this means: every rule x variant is run, every variant x dtype,
   every variant x option set, every variant x storage format, every dtype x
   option set, every option set x backend, every format x sparse mode ... pair
   (whichever axes the set has) appears at least once;
3. **extra interactions**: the set's ``cover`` tuples (e.g. ``("rule", "backend",
   "dtype")``: every rule on every backend in every dtype) are covered completely,
   over derived keys (``rule`` is the rule of the ``variant`` axis);
4. **full cross**: every valid combination for which the full-cross predicate holds
   is a case; by default that is every combination whose rule is Adam, the
   reference rule (its every variant x every value of every other axis).  Sets
   where Adam is not valid (exact sparse mode: Adam has no closed form for skipped
   steps) have no full cross;
5. **seeds**: the cases given as ``seed`` come first, unchanged (a set can extend
   another, so that two suites compile the same drivers and the on-disk Numba
   cache serves the second);
6. the result is deterministic (no randomness; the same axes give the same cases
   on every run and in every pytest-xdist worker).

The construction is a greedy set cover over the valid combinations (each step
takes the combination that covers most pairs not yet covered; ties go to the
earliest combination in the axes' order, so the first dtype, the first option
set, ... are preferred, which keeps the suites' choices aligned).
"""

import functools
import heapq
import itertools

import numpy as np
import pytest

import fastopt
from fastopt import rules

#: every registry variant, as (rule name, variant index)
VARIANTS = [(name, k) for name, rule in rules.RULES.items() for k in range(len(rule.variants))]
#: the variants of rules that take row steps (sparse gradients, max_norm, stored
#: formats): every rule but the whole-tensor ones (per-tensor LAMB, LARS; matrix Muon;
#: factored Adafactor)
ROW_VARIANTS = [v for v in VARIANTS if not rules.RULES[v[0]].whole_tensor]


def takes_options(name):
    """Whether rule ``name`` takes the fused options on the gradient (clip_value,
    grad_scale) and max_norm: not the matrix rules (Muon's update pass reads the
    orthogonalized matrix in the gradient's place; tests/test_muon.py) nor the
    factored ones (Adafactor refuses every fused option; tests/test_adafactor.py)."""
    rule = rules.RULES[name]
    return rule.matrix is None and not rule.factored


#: the variants of rules that take the fused options
FUSED_VARIANTS = [v for v in VARIANTS if takes_options(v[0])]
DTYPES = [np.float32, np.float64]
#: every backend that runs on host arrays here
CPU_BACKENDS = [b for b in fastopt.available_backends() if b != "cuda"]
REFERENCE_RULE = "Adam"

#: name -> CaseSet: every case set the suites draw from (tests/test_cases.py checks
#: the guarantee of each)
CASE_SETS = {}


def rule_of(case):
    """The rule name of a case (its ``variant`` axis, or its ``rule`` axis)."""
    if "variant" in case:
        return case["variant"][0]
    return case.get("rule")


def exact_possible(name_or_rule, variant=None):
    """Whether sparse_mode="exact" takes the configuration (the registry's
    predicate, :meth:`fastopt.rules.Rule.exact_possible`)."""
    rule = rules.RULES[name_or_rule] if isinstance(name_or_rule, str) else name_or_rule
    return rule.exact_possible(variant or {})


def variant_of(case, state_bits=None):
    """The hyperparameters of a case's registry variant (for ``state_bits``, the
    nearest earlier variant that takes it, :func:`fastopt.rules.variant`)."""
    name, k = case["variant"]
    if state_bits is None:
        return dict(rules.RULES[name].variants[k])
    return dict(rules.variant(rules.RULES[name], k, state_bits))


# ------------------------------------------------------------------ generator

def _interactions(names, cover):
    """The interactions to cover, as tuples of keys: every pair of axes, then the
    extra ones."""
    out = [(a, b) for a, b in itertools.combinations(names, 2)]
    out += [tuple(c) for c in cover if tuple(c) not in out]
    return out


def _key(case, key):
    if key == "rule":
        return rule_of(case)
    return case[key]


def _hashable(v):
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, type):
        return v.__name__
    return v


def is_reference(case):
    return rule_of(case) == REFERENCE_RULE


def pairwise(axes, *, full=None, valid=None, seed=(), cover=()):
    """Cases (dicts, axis name -> value) covering every pair of values of every
    two axes (among valid combinations), every combination of each ``cover``
    tuple, and the full cross of the reference rule: ``full`` None (every valid
    combination whose rule is Adam), a predicate (every valid combination for
    which it holds), or a tuple of axis names (for Adam, every valid combination
    of those axes, the others pairwise); ``seed`` cases first.  See the module
    docstring."""
    names = list(axes)
    values = [list(axes[n]) for n in names]
    full_axes = None
    if full is None:
        full = is_reference
    elif isinstance(full, (tuple, list)):
        full_axes, full = tuple(full), (lambda case: False)
    interactions = _interactions(names, cover)
    # a case's "facts": (interaction, its values there), values as hashable keys
    keyed = [[_hashable(v) for v in vals] for vals in values]
    pos = {n: i for i, n in enumerate(names)}

    def facts_of(case, idx=None):
        if idx is None:
            hv = [_hashable(case[n]) for n in names]
        else:
            hv = [keyed[i][j] for i, j in enumerate(idx)]
        rule = rule_of(case)
        f = set()
        for i, keys in enumerate(interactions):
            f.add((i, tuple(rule if k == "rule" else hv[pos[k]] for k in keys)))
        if full_axes is not None and rule == REFERENCE_RULE:
            f.add((-1, tuple(hv[pos[k]] for k in full_axes)))
        return f

    combos, combo_facts = [], []
    for idx in itertools.product(*(range(len(v)) for v in values)):
        case = {n: values[i][j] for i, (n, j) in enumerate(zip(names, idx))}
        if valid is None or valid(case):
            combos.append(case)
            combo_facts.append(facts_of(case, idx))
    need = set().union(*combo_facts) if combos else set()
    chosen, taken = [], set()

    def take(case, f):
        chosen.append(case)
        taken.add(tuple(_hashable(case[n]) for n in names))
        need.difference_update(f)

    for case in seed:
        case = {n: case[n] for n in names}
        if valid is not None and not valid(case):
            raise ValueError(f"seed case {case} is not valid")
        take(case, facts_of(case))
    for case, f in zip(combos, combo_facts):
        if full(case) and tuple(_hashable(case[n]) for n in names) not in taken:
            take(case, f)
    # greedy set cover, lazily re-evaluated (a combination's gain only falls)
    heap = [(-len(f & need), i) for i, f in enumerate(combo_facts)]
    heapq.heapify(heap)
    while need:
        stale, i = heapq.heappop(heap)
        gain = len(combo_facts[i] & need)
        if gain == 0:
            continue
        if gain < -stale:
            heapq.heappush(heap, (-gain, i))
            continue
        take(combos[i], combo_facts[i])
    return chosen


class CaseSet(list):
    """A list of cases with what made them (for tests/test_cases.py), and the few
    of them the boundscheck lanes run."""

    def __init__(self, name, axes, cases, full, valid, cover, seed, boundscheck=(),
                 boundscheck_where=None):
        super().__init__(cases)
        self.name, self.axes, self.full, self.valid = name, axes, full, valid
        self.cover, self.seed = tuple(cover), list(seed)
        self.boundscheck_axes = tuple(boundscheck)
        among = [c for c in self if boundscheck_where is None or boundscheck_where(c)]
        self.boundscheck = one_each(among, self.boundscheck_axes) if boundscheck else []

    def _marks(self, case):
        return [pytest.mark.boundscheck] if any(case is c for c in self.boundscheck) else []

    def params(self, *names):
        """``pytest.param`` objects for ``@pytest.mark.parametrize(",".join(names),
        ...)``, with readable ids (and the ``boundscheck`` mark on the boundscheck
        cases)."""
        return [pytest.param(*[case[n] for n in names], id=case_id(case, self.axes),
                             marks=self._marks(case)) for case in self]

    def cases(self):
        """Each case (its dict) as one ``pytest.param``."""
        return [pytest.param(case, id=case_id(case, self.axes), marks=self._marks(case))
                for case in self]

    def select(self, **fixed):
        """The cases whose given axes have the given values."""
        return [c for c in self if all(_hashable(c[k]) == _hashable(v)
                                       for k, v in fixed.items())]


def one_each(cases, axes):
    """A few of ``cases`` that together take every value each of ``axes`` takes in
    ``cases`` (greedy, deterministic): what a lane that need not repeat a whole
    matrix runs (NUMBA_BOUNDSCHECK=1 checks the drivers' indexing, which depends on
    the format, the options and the driver kind, not on every pair of them)."""
    need = {(k, _hashable(_key(c, k))) for c in cases for k in axes}
    out = []
    while need:
        best = max(cases, key=lambda c: len(need & {(k, _hashable(_key(c, k))) for k in axes}))
        out.append(best)
        need -= {(k, _hashable(_key(best, k))) for k in axes}
    return out


def case_set(name, axes, *, full=None, valid=None, seed=(), cover=(), boundscheck=(),
             boundscheck_where=None):
    """Make (once), register and return the case set ``name``; ``boundscheck``: the
    axes whose every value the boundscheck lanes run (:func:`one_each`), among the
    cases where ``boundscheck_where`` holds."""
    if name in CASE_SETS:
        return CASE_SETS[name]
    cases = pairwise(axes, full=full, valid=valid, seed=seed, cover=cover)
    out = CASE_SETS[name] = CaseSet(name, axes, cases, full, valid, cover, seed, boundscheck,
                                    boundscheck_where)
    return out


def _id(v):
    if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) \
            and isinstance(v[1], int):
        return f"{v[0]}-v{v[1]}"                              # a registry variant
    if isinstance(v, type) and issubclass(v, np.generic):
        return {np.float32: "f32", np.float64: "f64"}.get(v, np.dtype(v).name)
    if v is None:
        return "none"
    return str(v)


def case_id(case, axes):
    return "-".join(_id(case[n]) for n in axes)


# ---------------------------------------------------------------- comparators

def _bf16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


def same(a, b, what=""):
    """Bit-identical arrays or scalars: same dtype and shape, every value with the
    same bits (signed zeros distinguished), except that any NaN equals any NaN (a
    NaN's payload is not part of the contract).  bfloat16 is compared through
    float32 (exact), integer arrays exactly."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype == _bf16():
        a, b = a.astype(np.float32), b.astype(np.float32)
    if a.dtype.kind != "f":
        if not np.array_equal(a, b):
            k = np.flatnonzero((a != b).ravel())
            raise AssertionError(f"{what}: {len(k)} element(s) differ, first at {k[0]}: "
                                 f"{a.ravel()[k[0]]!r} vs {b.ravel()[k[0]]!r}")
        return
    na, nb = np.isnan(a), np.isnan(b)
    if not np.array_equal(na, nb):
        k = np.flatnonzero((na != nb).ravel())[0]
        raise AssertionError(f"{what}: NaN at flat index {k} on one side only: "
                             f"{a.ravel()[k]!r} vs {b.ravel()[k]!r}")
    x, y = a[~na], b[~nb]
    if x.tobytes() != y.tobytes():
        diff = np.flatnonzero((x.view(np.uint8).reshape(-1, x.itemsize)
                               != y.view(np.uint8).reshape(-1, x.itemsize)).any(1))
        k = diff[0]
        raise AssertionError(f"{what}: {len(diff)} element(s) differ, first "
                             f"{x[k]!r} vs {y[k]!r}")


def same_bytes(a, b, what=""):
    """Every byte equal (NaN payloads included), same dtype and shape."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    x = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    y = np.ascontiguousarray(b).reshape(-1).view(np.uint8)
    if not np.array_equal(x, y):
        bad = np.flatnonzero(x != y)
        raise AssertionError(f"{what}: {bad.size} bytes differ (first at byte {bad[0]})")


def same_optimizers(a, b, state_dict=False):
    """Parameters and every state value of two optimizers, with :func:`same`:
    ``opt.state`` (the arrays the kernels write), or with ``state_dict=True`` every
    entry of ``state_dict()["state"]`` (stored formats: codes, scales, master
    bits)."""
    for i, (pa, pb) in enumerate(zip(a._params, b._params)):
        same(pa, pb, f"parameter {i}")
    sa, sb = (a.state_dict()["state"], b.state_dict()["state"]) if state_dict \
        else (a.state, b.state)
    assert sa.keys() == sb.keys()
    for i in sa:
        assert sa[i].keys() == sb[i].keys(), i
        for key, v in sa[i].items():
            if isinstance(v, np.ndarray):
                same(v, sb[i][key], f"state {key!r} of parameter {i}")
            else:
                assert v == sb[i][key], (i, key)


# ------------------------------------------------------------------ the sets
#
# Axes values are plain data (rule variants as (name, index), NumPy dtype types,
# option-set and format names the suites resolve); the suites say what each name
# means.

#: fused-option sets of the Cython parity suite: none, the element-wise options
#: with grad_scale (the dense driver's option loop), all of them (max_norm: the row
#: driver)
OPTION_SETS = ["none", "all", "element"]

#: tests/test_cython_parity.py (c): dense multi-tensor steps, numba vs cython
CY_STEPS = case_set("cython-dense-steps", {"variant": VARIANTS, "dtype": DTYPES,
                                           "options": OPTION_SETS},
                    # "all" has max_norm (row steps), which per-tensor rules refuse;
                    # factored rules take no fused options
                    valid=lambda c: not (c["options"] == "all"
                                         and rules.RULES[c["variant"][0]].per_tensor)
                    and (c["options"] == "none" or takes_options(c["variant"][0])))
#: (d): lazy row-sparse steps, without options and with all of them; extends the
#: dense cases (with max_norm a dense step runs the same row driver)
CY_SPARSE = case_set("cython-sparse-lazy",
                     {"variant": ROW_VARIANTS, "dtype": DTYPES, "options": ["none", "all"]},
                     seed=[c for c in CY_STEPS if c["options"] != "element"
                           and c["variant"] in ROW_VARIANTS])
#: (e): exact sparse mode, every variant with a closed form
CY_EXACT = case_set("cython-sparse-exact",
                    {"variant": [v for v in VARIANTS if exact_possible(*v[:1], variant_of(
                        {"variant": v}))],
                     "dtype": DTYPES, "scaled": ["plain", "scaled-clipped"]})

#: tests/test_rules_vs_reference.py: every variant x backend x dtype pair, and every
#: rule on every backend in every dtype; the numba cases are the dense "none" cases
#: above (the same parallel drivers)
REFERENCE = case_set("reference", {"variant": VARIANTS, "backend": CPU_BACKENDS,
                                   "dtype": DTYPES},
                     cover=[("rule", "backend", "dtype")],
                     seed=[dict(c, backend="numba") for c in CY_STEPS
                           if c["options"] == "none"])

#: backends with row-sparse steps
SPARSE_BACKENDS = [b for b in fastopt.available_backends()
                   if hasattr(fastopt.backends.resolve(b), "run_rows")]
#: tests/test_sparse.py: lazy row-sparse steps against the oracle, every variant x
#: backend x dtype pair, every rule x backend x dtype; the numba cases are the
#: Cython suite's lazy "none" cases (the same serial row drivers)
SPARSE_LAZY = case_set("sparse-lazy", {"variant": ROW_VARIANTS, "backend": SPARSE_BACKENDS,
                                       "dtype": DTYPES},
                       cover=[("rule", "backend", "dtype")],
                       seed=[dict(c, backend="numba") for c in CY_SPARSE
                             if c["options"] == "none" and "numba" in SPARSE_BACKENDS],
                       boundscheck=("rule", "dtype"),
                       boundscheck_where=lambda c: c["backend"] == "numba")

#: tests/test_fused.py: the last variant of each rule (the fused options wrap the
#: rule math, whose every variant the suites above run) x option set x dtype
FUSED = case_set("fused", {"rule": [n for n in rules.RULES if takes_options(n)],
                           "options": [0, 1, 2, 3],
                           "dtype": DTYPES})


# ------------------------------------------------------------ stored formats

#: parameter dtypes, state widths and bfloat16 update modes of the stored formats
STORED_PARAMS = ["f32", "f64", "bf16"]
STATE_BITS = [32, 16, 8]
BF16_UPDATES = [None, "split", "kahan", "stochastic", "nearest"]


def param_dtype(case):
    from fastopt import storage
    return {"f32": np.dtype(np.float32), "f64": np.dtype(np.float64),
            "bf16": storage.BF16}[case["param"]]


def stored_variant(case):
    """The hyperparameters of a stored-format case: the rule's first or last
    variant (``pick``), or the nearest earlier one that takes the state width."""
    rule = rules.RULES[rule_of(case)]
    k = 0 if case.get("pick", "last") == "first" else len(rule.variants) - 1
    return dict(rules.variant(rule, k, case["bits"]))


def storage_of(case, shape=(16, 300)):
    """The :class:`fastopt.storage.Storage` a case's parameter of ``shape`` gets."""
    return _storage(rule_of(case), case["param"], case["bits"], case["update"], tuple(shape))


@functools.lru_cache(maxsize=None)
def _storage(rule, param, bits, update, shape):
    from fastopt import storage
    return storage.storage_for(rules.RULES[rule], np.zeros(shape, param_dtype({"param": param})),
                               bits, update)


def _takes_bits(case):
    """Whether the case's rule has a variant (first or last, ``pick``, or an earlier
    one) that takes its state width (:func:`fastopt.rules.variant`)."""
    try:
        stored_variant(case)
    except ValueError:          # every such variant refuses 8- (or 16-) bit state
        return False
    return True


def _stored_valid(case):
    if rules.RULES[rule_of(case)].whole_tensor:
        return False                      # float32/float64 only (a refusal test checks)
    if not _takes_bits(case):
        return False
    bf = case["param"] == "bf16"
    if bf and rules.RULES[case["rule"]].bf16_reason is not None:
        return False                      # the rule refuses bfloat16 parameters
    if (case["update"] is None) == bf:
        return False                      # bf16_update is for bfloat16 parameters only
    if case.get("grad", "same") == "bf16" and not bf:
        return False                      # bfloat16 gradients of bfloat16 parameters
    return not storage_of(case).native    # a stored format, not float32/float64 state


#: Stored formats, dense and row-sparse steps: every rule (first and last variant)
#: x parameter dtype x state width x bf16_update x gradient dtype x fused options,
#: pairwise; Adam in every format.  tests/test_storage.py runs these against the
#: NumPy reference, tests/test_cython_storage.py numba against cython bit for bit,
#: so the second file finds every stored driver it needs compiled.
STORED = case_set("stored",
                  {"rule": [n for n, r in rules.RULES.items() if not r.whole_tensor],
                   "pick": ["last", "first"],
                   "param": STORED_PARAMS, "bits": STATE_BITS, "update": BF16_UPDATES,
                   "grad": ["same", "bf16"], "options": ["none", "element", "max_norm"]},
                  valid=_stored_valid, full=("param", "bits", "update"),
                  boundscheck=("rule", "param", "bits", "update", "grad", "options"))


def _whole_stored_valid(case):
    rule = rules.RULES[rule_of(case)]
    if case["options"] == "element" and rule.matrix is not None:
        return False                      # Muon refuses clip_value and grad_scale
    bf = case["param"] == "bf16"
    if (case["update"] is None) == bf or (case.get("grad", "same") == "bf16" and not bf):
        return False
    return _takes_bits(case) and not storage_of(case).native


#: Stored formats of the whole-tensor rules that read them (the per-tensor LAMB, LARS
#: through their norm pass; the matrix rule Muon through its matrix phase): rule
#: (first and last variant) x parameter dtype x state width x bf16_update x gradient
#: dtype x options (none; the element-wise ones with grad_scale, not for Muon),
#: pairwise.  tests/test_storage.py runs them against the reference over many steps,
#: tests/test_cython_storage.py numba against cython bit for bit.
STORED_WHOLE = case_set("stored-whole",
                        {"rule": [n for n, r in rules.RULES.items()
                                  if r.whole_tensor and not r.factored],
                         "pick": ["last", "first"],
                         "param": STORED_PARAMS, "bits": STATE_BITS, "update": BF16_UPDATES,
                         "grad": ["same", "bf16"], "options": ["none", "element"]},
                        valid=_whole_stored_valid, boundscheck=("rule", "bits"))


def _exact_stored_valid(case):
    return _stored_valid(case) and exact_possible(rule_of(case), stored_variant(case))


#: Exact sparse mode in stored formats: the rules with a closed form (their first
#: variant) x parameter dtype (float32, bfloat16) x state width x bf16_update,
#: plain or with clip_value
#: and grad_scale (the options exact mode takes), pairwise (Adam has no closed
#: form: no full cross).  tests/test_storage.py (against the reference) and
#: tests/test_cython_storage.py (numba against cython) run the same cases.
STORED_EXACT = case_set("stored-exact",
                        {"rule": [n for n, r in rules.RULES.items() if r.catch_up is not None],
                         "pick": ["first"], "param": ["f32", "bf16"], "bits": STATE_BITS,
                         "update": BF16_UPDATES, "options": ["none", "clip"]},
                        valid=_exact_stored_valid,
                        boundscheck=("rule", "param", "bits", "update", "options"))


# ---------------------------------------------------------------------- CUDA

#: tests/test_cuda_backend.py: dense steps on device arrays against numba, through
#: the optimizer class or the functional layer: every variant x dtype, variant x
#: API and dtype x API pair; Adam in full
#: (matrix and factored rules: their own passes, tests/test_muon_cuda.py and
#: tests/test_adafactor_cuda.py)
CUDA_DENSE = case_set("cuda-dense", {"variant": [v for v in VARIANTS
                                                 if rules.RULES[v[0]].matrix is None
                                                 and not rules.RULES[v[0]].factored],
                                     "dtype": DTYPES,
                                     "api": ["class", "functional"]})
#: tests/test_cuda_storage.py: 16- and 8-bit state of every element-wise rule,
#: dense or row-sparse (lazy) steps: every rule x state width, rule x step kind and
#: state width x step kind pair; Adam in full
CUDA_STORED = case_set("cuda-stored",
                       {"rule": [n for n, r in rules.RULES.items()
                                 if r.layout == "elementwise"],
                        "bits": [16, 8], "steps": ["dense", "sparse"]},
                       valid=lambda c: any(rules.takes_state_bits(rules.RULES[c["rule"]], v,
                                                                  c["bits"])
                                           for v in rules.RULES[c["rule"]].variants))
