"""pytest-benchmark suites (off in the normal test run).

Run them with::

    python -m pytest bench/ --benchmark-enable --benchmark-group-by=group \\
        --benchmark-columns=min,median,ops,rounds

Every case is measured for every implementation (fastopt backends, the NumPy
reference, torch.optim for-loop/foreach/fused, and the no-math ceiling) and grouped
per case, so pytest-benchmark's relative column is the ratio to the fastest in the
same run.  ``extra_info`` carries the bytes a step moves, elements/s and GB/s
of the best round.
"""

import numpy as np


def record(benchmark, case):
    """Attach throughput figures computed from the best round."""
    best = benchmark.stats.stats.min
    benchmark.extra_info["elements_per_s"] = case.elements / best
    benchmark.extra_info["GB_per_s"] = case.bytes_per_step() / best / 1e9
    benchmark.extra_info["bytes_per_step"] = int(case.bytes_per_step())
    benchmark.extra_info["dtype"] = str(np.dtype(case.dtype))
