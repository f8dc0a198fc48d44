"""How it is timed: every contender of a case in interleaved rounds.

A noisy moment on a shared machine (another process, a frequency change) lands on
whatever runs at that moment.  Timing each contender once in its turn puts the whole
disturbance on one of them and turns it into a ratio; interleaving spreads it:

1. calibrate: each contender's batch size (calls per sample) so that a sample
   takes at least ``sample_time`` (one call for slow steps);
2. ``rounds`` rounds; in each, every contender takes ``per_round`` samples, in an
   order rotated from round to round (no contender always runs first or after the
   same neighbour);
3. per contender: ``best`` (the least disturbed sample), ``median`` and the
   ``spread``, the interquartile range over the median (0.05 = the middle half of
   the samples lie within 5% of each other).

Ratios between contenders are taken from medians measured in the same rounds.
"""

import time
from dataclasses import dataclass

import numpy as np


@dataclass
class Stats:
    best: float          # seconds per call, the fastest sample
    median: float        # seconds per call, the median sample
    spread: float        # (p75 - p25) / median of the samples
    samples: int
    calls: int           # calls per sample
    #: seconds per call of every sample, in the order taken: sample k of every
    #: contender of a case comes from the same round (``k // per_round``), which
    #: lets ``fastopt bench --compare`` pair each with a reference's
    times: tuple = ()

    @classmethod
    def of(cls, samples, calls):
        s = np.asarray(samples, dtype=np.float64)
        med = float(np.median(s))
        q1, q3 = np.percentile(s, [25, 75])
        return cls(best=float(s.min()), median=med,
                   spread=float((q3 - q1) / med) if med > 0 else float("nan"),
                   samples=len(s), calls=calls, times=tuple(float(x) for x in s))


def _calibrate(fn, sample_time):
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(sample_time / one))


def time_interleaved(fns, rounds=7, per_round=2, sample_time=0.02, progress=None):
    """``{name: Stats}`` for the callables ``fns`` (name -> zero-argument callable),
    timed in interleaved rounds (see the module docstring)."""
    names = list(fns)
    calls = {n: _calibrate(fns[n], sample_time) for n in names}
    samples = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for n in names[k:] + names[:k]:
            fn, c = fns[n], calls[n]
            for _ in range(per_round):
                t0 = time.perf_counter()
                for _ in range(c):
                    fn()
                samples[n].append((time.perf_counter() - t0) / c)
        if progress is not None:
            progress(r + 1, rounds)
    return {n: Stats.of(samples[n], calls[n]) for n in names}


def time_step(fn, min_time=0.3, max_repeats=20):
    """Best seconds per call of one callable alone (a warm-up, then repeats of
    batches); kept for single-contender uses such as pytest-benchmark helpers."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(0.02 / one))
    best, spent, reps = float("inf"), 0.0, 0
    while reps < 3 or (spent < min_time and reps < max_repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        dt = time.perf_counter() - t0
        best = min(best, dt / inner)
        spent += dt
        reps += 1
    return best
