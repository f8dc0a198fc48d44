"""Throughput measurement: every implementation of a step, side by side, in one run.

``fastopt bench`` (``python -m fastopt bench``) and ``bench/`` use this package:

* :mod:`.cases`: what is measured (dense tensor sizes, sparse tables fed a fresh
  batch every step) and the bytes each step must move;
* :mod:`.contenders`: fastopt's backends, the NumPy reference, ``torch.optim`` and
  the no-math ceiling kernel, each on its own copy of identical data;
* :mod:`.timing`: interleaved rounds, best / median / spread;
* :mod:`.bandwidth`: the machine's STREAM-like copy and triad bandwidth;
* :mod:`.report`: rows, flags, the text / Markdown / JSON outputs, the chart and the
  comparison against a saved run.

Only ratios measured in the same run are claimed; a row that beats its ceiling or
bound, or whose spread is wide, is flagged rather than reported as a result.
"""

import datetime
import gc
import os
import platform
import sys
import time

import numpy as np

from . import bandwidth, report, timing
from .cases import ROW_DIM, Case, SparseCase, default_cases, fmt_count
from .contenders import (CEILING, TORCH_MODES, TORCH_SPARSE, implementation_names,
                         implementations, sparse_implementations, touch)
from .timing import Stats, time_interleaved, time_step

__all__ = ["Case", "SparseCase", "ROW_DIM", "default_cases", "implementations",
           "sparse_implementations", "implementation_names", "measure", "run",
           "machine_description", "versions", "CEILING", "touch", "time_step",
           "time_interleaved", "Stats", "bandwidth", "report", "fmt_count",
           "TORCH_MODES", "TORCH_SPARSE", "PROFILES"]

#: timing settings: rounds, samples per contender per round, seconds per sample
PROFILES = {"full": dict(rounds=7, per_round=2, sample_time=0.03),
            "quick": dict(rounds=5, per_round=2, sample_time=0.015)}


def machine_description():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba
    mem = ""
    try:
        mem = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2 ** 30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    return (f"{cpu}, {os.cpu_count()} logical cores{mem}, numba {numba.__version__} "
            f"({numba.get_num_threads()} threads), numpy {np.__version__}, "
            f"Python {platform.python_version()}")


def versions():
    import numba

    from .. import __version__
    out = {"fastopt": __version__, "numba": numba.__version__, "numpy": np.__version__,
           "python": platform.python_version()}
    try:
        import torch
        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return out


def measure(case, host=None, profile="full", bw=None, llc=None, progress=None):
    """Time every contender of ``case`` in interleaved rounds; returns result rows
    (see :func:`fastopt.benchmark.report.build_rows`)."""
    settings = PROFILES[profile] if isinstance(profile, str) else profile
    gc.collect()              # the previous case's contenders, before sizing this one's
    fns, omitted = implementations(case, host)
    stats = time_interleaved(fns, progress=progress, **settings)
    del fns
    gc.collect()
    return report.build_rows(case, stats, bw, bandwidth.last_level_cache() if llc is None
                             else llc, omitted)


def run(cases, host=None, quick=False, profile=None, out=None, progress=True,
        fmt="text", measure_bandwidth=True):
    """Measure ``cases`` (progress on stderr) and print the table to ``out`` (default
    stdout) as ``fmt`` (``"text"`` or ``"markdown"``, None for nothing).  Returns
    the result record (what ``--json`` writes)."""
    out = sys.stdout if out is None else out
    progress = sys.stderr if progress is True else progress
    profile = profile or ("quick" if quick else "full")
    settings = PROFILES[profile] if isinstance(profile, str) else profile
    start = time.perf_counter()
    import numba
    bw = None
    if measure_bandwidth:
        if progress is not None:
            print("memory bandwidth ...", file=progress, flush=True)
        bw = bandwidth.measure()
        bw.update(threads=numba.get_num_threads(), repeats=20)
    llc = bandwidth.last_level_cache()
    rows = []
    for k, case in enumerate(cases, 1):
        if progress is not None:
            print(f"[{k}/{len(cases)}] {case.label} ...", file=progress, flush=True)
        rows.extend(measure(case, host, settings, bw, llc))
    result = dict(machine=machine_description(), versions=versions(), bandwidth=bw, llc=llc,
                  quick=bool(quick), profile=settings,
                  method=(f"interleaved rounds: {settings['rounds']} rounds x "
                          f"{settings['per_round']} samples of >= "
                          f"{settings['sample_time'] * 1e3:.0f} ms per contender; "
                          "median and best per step, spread = IQR/median; ratios "
                          "of medians"),
                  started=datetime.datetime.now().isoformat(timespec="seconds"),
                  seconds=time.perf_counter() - start, rows=rows)
    if fmt == "text":
        print(report.text(result), file=out)
    elif fmt == "markdown":
        print(report.markdown(result), file=out)
    return result
