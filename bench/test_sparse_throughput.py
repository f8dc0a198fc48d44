"""Sparse (lazy) step throughput on embedding tables fed a fresh batch every step
(a pool of Zipf(1.2) or uniform batches): fastopt backends against
torch.optim.SparseAdam / sparse Adagrad / SGD."""

import pytest

from fastopt.benchmark import SparseCase, sparse_implementations

from conftest import record

CASES = [SparseCase("Adam", 1_000_000), SparseCase("Adam", 4_000_000),
         SparseCase("Adam", 1_000_000, dist="uniform"),
         SparseCase("Adagrad", 1_000_000), SparseCase("SGD", 1_000_000, variant=1)]
IMPLS = ["fastopt-numba", "fastopt-cython", "fastopt-numpy", "torch-SparseAdam",
         "torch-Adagrad", "torch-SGD"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_sparse_step(benchmark, case, impl):
    fns, omitted = sparse_implementations(case, only=[impl])
    if impl not in fns:
        pytest.skip(omitted.get(impl, f"{impl} is not available for {case.rule}"))
    benchmark.group = case.label
    benchmark.pedantic(fns[impl], rounds=32, iterations=1, warmup_rounds=0)
    record(benchmark, case)
