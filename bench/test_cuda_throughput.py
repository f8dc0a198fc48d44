"""GPU step throughput: fastopt's CUDA backend beside torch.optim (foreach, fused) on
CUDA, a CuPy ElementwiseKernel, and the device's copy-bandwidth ceiling (the same
multi-tensor kernel with no math: every used stream read and written once).

Adam, AdamW and SGD (momentum) in float32 on one 100M-element tensor and on 1,000
tensors of 100K.  Needs a GPU; skipped without one and under the CUDA simulator.
Every timed call ends with a device synchronize.  Run with::

    python -m pytest bench/test_cuda_throughput.py --benchmark-enable \\
        --benchmark-group-by=group --benchmark-columns=min,median,rounds

``extra_info``: elements/s, GB/s and ``fraction_of_ceiling`` (the ceiling kernel's
best time, measured in the same run, over this implementation's best time).
"""

import importlib.util
import os

import pytest

if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
    pytest.skip("GPU benchmarks mean nothing under the CUDA simulator", allow_module_level=True)
if importlib.util.find_spec("numba_cuda") is None:
    pytest.skip("numba-cuda is not installed", allow_module_level=True)

from numba import cuda  # noqa: E402

if not cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)

from fastopt import benchmark
from fastopt.benchmark import cuda as cuda_bench  # noqa: E402
from fastopt.backends import cuda as cuda_backend  # noqa: E402

from conftest import record  # noqa: E402

cuda_backend.register_backend()
CASES = cuda_bench.default_cases()
_CEILING = {}   # case label -> best seconds of the ceiling kernel


def _ceiling_seconds(case):
    if case.label not in _CEILING:
        fn = cuda_bench.implementation(case, "ceiling-cuda")
        _CEILING[case.label] = benchmark.time_step(fn, min_time=0.3)
    return _CEILING[case.label]


@pytest.mark.parametrize("impl", cuda_bench.IMPLEMENTATIONS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_cuda_step(benchmark, case, impl):
    fn = cuda_bench.implementation(case, impl)
    if fn is None:
        pytest.skip(f"{impl} is not available for {case.label} here")
    benchmark.group = f"{case.label} cuda"
    fn()                                    # compile / warm up outside the timing
    benchmark.pedantic(fn, rounds=20, iterations=1, warmup_rounds=2)
    record(benchmark, case)
    benchmark.extra_info["fraction_of_ceiling"] = (_ceiling_seconds(case)
                                                   / benchmark.stats.stats.min)
