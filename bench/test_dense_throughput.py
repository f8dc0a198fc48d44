"""Dense step throughput: every rule at 1e3..1e7 elements, plus the many-tensor
cases (1,000 x 10K, 10 x 100), for every implementation side by side."""

import pytest

from fastopt import rules
from fastopt.benchmark import Case, implementation_names, implementations

from conftest import record

SIZES = [1_000, 10_000, 100_000, 1_000_000, 10_000_000]
CASES = [Case(name, (n,)) for name in rules.RULES for n in SIZES]
CASES += [Case("Adam", (10_000,) * 1000), Case("Adam", (100,) * 10),
          Case("SGD", (10_000,) * 1000, variant=1), Case("Adam", (1_000_000,), "float64")]


@pytest.mark.parametrize("impl", implementation_names())
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_step(benchmark, case, impl):
    fns, omitted = implementations(case, only=[impl])
    if impl not in fns:
        pytest.skip(omitted.get(impl, f"{impl} is not available for {case.rule}"))
    benchmark.group = case.label
    fn = fns[impl]
    fn()                       # compile / warm up outside the timing
    benchmark.pedantic(fn, rounds=15 if case.elements >= 1_000_000 else 50,
                       iterations=1 if case.elements >= 100_000 else 20, warmup_rounds=1)
    record(benchmark, case)
