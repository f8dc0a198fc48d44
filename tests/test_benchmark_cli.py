"""The benchmark engine and the CLI (tiny sizes: this checks behaviour, not speed)."""

import functools
import json
import subprocess
import sys

import numpy as np
import pytest

from fastopt import __main__ as cli
from fastopt import benchmark, rules
from fastopt.benchmark import bandwidth, report, timing

TINY = dict(rounds=2, per_round=1, sample_time=0.0)


def test_ceiling_kernel_moves_every_used_stream():
    case = benchmark.Case("Adam", (1000,))
    fns, _ = benchmark.implementations(case, only=["ceiling"])
    params, grads, slots = fns["ceiling"]()
    before = [s.copy() for s in slots[0][:2]]
    fns["ceiling"]()
    assert not np.array_equal(slots[0][0], before[0])      # exp_avg slot written
    assert not np.array_equal(slots[0][1], before[1])      # exp_avg_sq slot written
    assert slots[0][2] is None                             # unused slot: not allocated


@pytest.mark.parametrize("name", list(rules.RULES))
def test_bytes_per_step_counts_used_slots(name):
    rule = rules.RULES[name]
    if rule.layout == "rowwise":        # rows of ROW_DIM, one state value per row
        case = benchmark.Case(name, (10 * benchmark.ROW_DIM,), "float32")
        assert case.shape(640) == (10, benchmark.ROW_DIM)
        assert case.bytes_per_step() == 4 * (3 * 640 + 2 * 10)
        with pytest.raises(ValueError, match="rows of"):
            case.shape(10)
    elif rule.factored:                 # 1-D: the vector path, three passes
        case = benchmark.Case(name, (10,), "float32")
        assert case.bytes_per_step() == 10 * 4 * 10
        assert case.memory() == 10 * 4 * 3
    else:
        case = benchmark.Case(name, (10,), "float32")
        uses = rule.uses_slots(case.group())
        # a per-tensor rule's norm pass first reads p, g and norm_reads slots
        norm_pass = 2 + rule.norm_reads if rule.per_tensor else 0
        assert case.bytes_per_step() == 10 * 4 * (3 + 2 * sum(uses) + norm_pass)
        assert case.memory() == 10 * 4 * (2 + sum(uses))
    assert benchmark.Case("Adam", (10,)).bytes_per_step() == 10 * 28


@pytest.mark.parametrize("dist", ["zipf", "uniform"])
def test_sparse_case_pool_is_fresh_in_range_and_counted(dist):
    case = benchmark.SparseCase("Adam", 1000, dim=8, lookups=512, dist=dist, pool=4)
    pool = case.batches()
    assert len(pool) == 4 and case.batches() is pool            # generated once
    ids = [i for i, _ in pool]
    assert all(i.dtype == np.int64 and i.min() >= 0 and i.max() < 1000 for i in ids)
    assert not np.array_equal(ids[0], ids[1])                    # a fresh batch each step
    touched = np.mean([np.unique(i).size for i in ids])
    assert case.touched == touched
    # param and 2 Adam slots read and written on touched rows, gradient values read
    assert case.bytes_per_step() == 4 * (2 * touched * 8 + 4 * touched * 8 + 512 * 8)
    if dist == "zipf":   # heavy head: far fewer distinct rows than lookups
        assert touched < 0.6 * 512


def test_sparse_contenders_cycle_through_the_pool():
    from fastopt.benchmark import contenders
    seen = []
    run = contenders._cycle(seen.append, ["g0", "g1", "g2"])
    for _ in range(4):
        run()
    assert seen == ["g0", "g1", "g2", "g0"]          # a fresh batch every step, cycled
    case = benchmark.SparseCase("Adam", 200, dim=4, lookups=64, pool=3)
    fns, omitted = benchmark.sparse_implementations(case, ["numba"])
    assert "fastopt-numba" in fns and not omitted
    fns["fastopt-numba"]()


def test_interleaved_rounds_rotate_and_report_stats():
    calls = []
    fns = {n: functools.partial(calls.append, n) for n in "abc"}
    stats = timing.time_interleaved(fns, rounds=3, per_round=2, sample_time=0.0)
    timed = calls[2 * 3:]                  # calibration: two calls each, in order
    assert timed == list("aabbcc") + list("bbccaa") + list("ccaabb")
    for s in stats.values():
        assert s.samples == 6 and s.calls == 1 and 0 < s.best <= s.median


def test_stats_spread_is_iqr_over_median():
    s = timing.Stats.of([1.0, 2.0, 3.0, 4.0, 5.0], 1)
    assert (s.best, s.median, s.spread) == (1.0, 3.0, pytest.approx(2.0 / 3.0))


def _stats(median, spread=0.01):
    return timing.Stats(best=median * 0.99, median=median, spread=spread, samples=10, calls=1)


def test_flags_ceiling_bound_noise_and_cache():
    big = benchmark.Case("SGD", (10_000_000,))          # 80 MB: not in a 1 MiB cache
    bw = {"triad": 10.0, "copy": 8.0}
    bound = big.bytes_per_step() / 10e9
    rows = report.build_rows(big, {"ceiling": _stats(1.0 * bound * 2),
                                   "fastopt-a": _stats(bound * 2 / 1.2),   # beats ceiling
                                   "fastopt-b": _stats(bound / 1.2),       # beats bound
                                   "fastopt-c": _stats(bound * 3, 0.3),    # noisy
                                   "torch-fused": _stats(bound * 6)},
                             bw, llc=2 ** 20, omitted={"fastopt-numpy": "too slow"})
    by = {r["impl"]: r for r in rows}
    assert "ABOVE-CEILING" in by["fastopt-a"]["flags"]
    assert "ABOVE-BOUND" in by["fastopt-b"]["flags"]
    assert by["fastopt-c"]["flags"] == ["NOISY"]
    assert by["ceiling"]["flags"] == [] and by["torch-fused"]["flags"] == []
    assert by["fastopt-c"]["vs_torch"] == pytest.approx(2.0)
    assert by["fastopt-numpy"]["omitted"] == "too slow"
    small = report.build_rows(benchmark.Case("SGD", (1000,)),
                              {"fastopt-a": _stats(1e-9)}, bw, llc=2 ** 20)
    assert small[0]["flags"] == ["cache"]                # in cache: the bound does not apply
    text = report.text(dict(machine="m", bandwidth=None, method="x", rows=rows))
    assert "ABOVE-CEILING" in text and "omitted: too slow" in text


def _sampled(median, sigma, rng, n=14):
    """Stats of ``n`` samples, lognormal around ``median`` (relative noise ``sigma``)."""
    return timing.Stats.of(median * np.exp(rng.normal(0.0, sigma, n)), 1)


def _record(case, medians, sigma, rng, slowdown=1.0):
    """A run: every contender's samples scaled by ``slowdown`` (the machine)."""
    return dict(machine="m", rows=report.build_rows(case, {
        name: _sampled(m * slowdown, sigma.get(name, 0.05) if isinstance(sigma, dict) else sigma,
                       rng) for name, m in medians.items()}, None, 0))


def test_compare_separates_machine_drift_from_a_change():
    """The machine 1.6x slower in the second run: nothing is flagged (every row is
    normalized by the ceiling timed in the same rounds); a contender 1.3x slower
    relative to its reference is flagged, 1.05x is not (under the 20% floor), nor
    is 1.2x buried in noise."""
    rng = np.random.default_rng(0)
    case = benchmark.Case("SGD", (10_000_000,))
    base = {"ceiling": 1.0, "a": 1.2, "b": 1.5, "c": 2.0, "torch-fused": 3.0}
    sigma = {"c": 0.5}
    old = _record(case, base, sigma, rng)
    drifted = _record(case, base, sigma, rng, slowdown=1.6)
    lines, regressions = report.compare(old, drifted)
    assert regressions == [], lines
    assert any("Machine drift" in line and "1.6" in line for line in lines)
    changed = _record(case, dict(base, a=1.2 * 1.3, b=1.5 * 1.05, c=2.0 * 1.2), sigma, rng,
                      slowdown=1.6)
    lines, regressions = report.compare(old, changed)
    assert [r["impl"] for r in regressions] == ["a"], lines
    assert any("REGRESSION" in line and "| a |" in line for line in lines)
    faster = _record(case, dict(base, b=1.5 / 1.4), sigma, rng, slowdown=0.7)
    lines, regressions = report.compare(old, faster)
    assert regressions == [] and any("faster" in line and "| b |" in line for line in lines)


@pytest.mark.parametrize("seed", range(10))
def test_compare_of_two_runs_of_the_same_code_flags_nothing(seed):
    """70 rows (14 cases x 5 contenders), the same code timed twice with 10% noise
    and a machine that drifts by up to 1.9x between the runs: no row is flagged."""
    rng = np.random.default_rng(seed)
    old_rows, new_rows = [], []
    for k in range(14):
        case = benchmark.Case("Adam", (1000 * (k + 1),))
        base = {"ceiling": 1.0, "fastopt-numba": 1.1, "fastopt-cython": 1.2,
                "fastopt-numpy": 5.0, "torch-fused": 2.0}
        old_rows += _record(case, base, 0.10, rng)["rows"]
        new_rows += _record(case, base, 0.10, rng, slowdown=rng.uniform(1.0, 1.9))["rows"]
    lines, regressions = report.compare(dict(machine="m", rows=old_rows),
                                        dict(machine="m", rows=new_rows))
    assert regressions == [], [line for line in lines if "REGRESSION" in line]
    assert "p < 0.05/42" in lines[2]         # 14 cases x 3 fastopt rows (torch: peers)


def test_compare_never_flags_peers_nor_a_reference_that_moved_alone():
    """torch's rows are peers (their code is not compared): a 1.5x torch row is
    listed, not flagged.  A reference 1.4x faster on its own (its run-to-run
    variation) makes every normalized row look 1.4x slower, but their raw times did
    not change: nothing is flagged."""
    rng = np.random.default_rng(4)
    case = benchmark.Case("SGD", (10_000_000,))
    base = {"ceiling": 1.0, "fastopt-numba": 1.2, "torch-fused": 3.0}
    old = _record(case, base, 0.03, rng)
    new = _record(case, dict(base, **{"torch-fused": 4.5}), 0.03, rng)
    lines, regressions = report.compare(old, new)
    assert regressions == [] and any("| torch-fused |" in line and "peer" in line
                                     for line in lines)
    new = _record(case, dict(base, ceiling=1.0 / 1.4), 0.03, rng)
    lines, regressions = report.compare(old, new)
    assert regressions == [], lines


def test_compare_does_not_test_a_case_whose_reference_was_disturbed():
    """A reference with a wide spread cannot normalize its case: listed, not tested."""
    rng = np.random.default_rng(3)
    case = benchmark.Case("SGD", (10_000_000,))
    old = _record(case, {"ceiling": 1.0, "a": 1.0}, 0.05, rng)
    new = _record(case, {"ceiling": 1.0, "a": 3.0}, {"ceiling": 1.5, "a": 0.05}, rng)
    lines, regressions = report.compare(old, new)
    assert regressions == []
    assert any("| a |" in line and "reference noisy" in line for line in lines)


def test_compare_of_records_without_samples_never_flags():
    """Older records carry no per-sample times: normalized medians are listed, with
    no test, so nothing is flagged."""
    case = benchmark.Case("SGD", (10_000_000,))
    old = dict(machine="m", rows=report.build_rows(case, {"ceiling": _stats(1.0),
                                                          "a": _stats(1.0)}, None, 0))
    new = dict(machine="m", rows=report.build_rows(case, {"ceiling": _stats(1.0),
                                                          "a": _stats(2.0)}, None, 0))
    lines, regressions = report.compare(old, new)
    assert regressions == []
    assert any("| a |" in line and "| 2.00 | n/a |" in line for line in lines)


def test_run_json_markdown_and_compare_through_the_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark.bandwidth, "measure",
                        functools.partial(bandwidth.measure, nbytes=1 << 22, repeats=2))
    monkeypatch.setitem(benchmark.PROFILES, "quick", TINY)
    monkeypatch.setattr(benchmark, "default_cases", lambda quick=False: [
        benchmark.Case("SGD", (2000,)),
        benchmark.SparseCase("Adam", 500, dim=4, lookups=64, pool=2)])
    path = tmp_path / "run.json"
    assert cli.main(["bench", "--quick", "--backends", "numba", "--json", str(path),
                     "--markdown"]) == 0
    out = capsys.readouterr()
    assert "[1/2] SGD 2K float32" in out.err and "[2/2] Adam sparse" in out.err
    assert out.out.startswith("Machine: ") and "Memory bandwidth" in out.out
    assert "| SGD 2K float32 | fastopt-numba |" in out.out
    rec = json.loads(path.read_text())
    assert rec["bandwidth"]["triad"] > 0 and rec["versions"]["fastopt"]
    impls = {(r["case"], r["impl"]) for r in rec["rows"]}
    assert ("SGD 2K float32", "ceiling") in impls
    assert any(c.startswith("Adam sparse") and i == "fastopt-numba" for c, i in impls)
    for r in rec["rows"]:
        assert r["best_s"] <= r["median_s"] and r["spread"] >= 0 and r["gb_per_s"] > 0
    assert cli.main(["bench", "--quick", "--backends", "numba", "--compare", str(path)]) in (0, 3)
    assert "new/old" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="not a fastopt bench"):
        cli.main(["bench", "--quick", "--compare", str(bad)])


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    case = benchmark.Case("SGD", (10_000_000,))
    rows = report.build_rows(case, {"ceiling": _stats(1.0), "fastopt-numba": _stats(1.1),
                                    "torch-fused": _stats(2.0)}, {"triad": 10.0}, 0)
    path = tmp_path / "b.png"
    report.plot(dict(machine="m", rows=rows), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bandwidth_is_measured():
    bw = bandwidth.measure(nbytes=1 << 22, repeats=2)
    assert bw["copy"] > 0 and bw["triad"] > 0 and bw["update"] > 0 and bw["array_bytes"] == 1 << 22
    assert bw["bound"] == max(bw["copy"], bw["triad"], bw["update"])


def test_cli_rejects_unknown_rule_and_backend():
    with pytest.raises(ValueError, match="unknown rule"):
        cli.main(["bench", "--rules", "Adamm"])
    with pytest.raises(ValueError, match="unknown backend"):
        cli.main(["bench", "--backends", "fortran"])


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fastopt", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "bench" in out.stdout
