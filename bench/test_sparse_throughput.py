"""Sparse (lazy) step throughput on embedding tables: fastopt backends against
torch.optim.SparseAdam / sparse Adagrad on identical Zipf(1.2) gradients."""

import pytest

from fastopt.benchmark import SparseCase, sparse_implementations

from conftest import record

CASES = [SparseCase("Adam", 1_000_000), SparseCase("Adam", 4_000_000),
         SparseCase("Adagrad", 1_000_000), SparseCase("SGD", 1_000_000, variant=1)]
IMPLS = ["fastopt-numba", "fastopt-cython", "fastopt-numpy", "torch-SparseAdam",
         "torch-Adagrad", "torch-SGD"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_sparse_step(benchmark, case, impl):
    fns = sparse_implementations(case)
    if impl not in fns:
        pytest.skip(f"{impl} is not available for {case.rule}")
    benchmark.group = case.label
    fn = fns[impl]
    fn()
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=1)
    record(benchmark, case)
