"""The benchmark engine and the CLI (tiny sizes: this checks behaviour, not speed)."""

import subprocess
import sys

import numpy as np
import pytest

from fastopt import __main__ as cli
from fastopt import benchmark, rules


def test_ceiling_kernel_moves_every_used_stream():
    case = benchmark.Case("Adam", (1000,))
    fn = benchmark.implementations(case, only=["ceiling"])["ceiling"]
    params, grads, slots = fn()
    before = [s.copy() for s in slots[0]]
    fn()
    assert not np.array_equal(slots[0][0], before[0])      # exp_avg slot written
    assert not np.array_equal(slots[0][1], before[1])      # exp_avg_sq slot written
    np.testing.assert_array_equal(slots[0][2], before[2])  # unused slot untouched


@pytest.mark.parametrize("name", list(rules.RULES))
def test_bytes_per_step_counts_used_slots(name):
    rule = rules.RULES[name]
    if rule.layout == "rowwise":        # rows of ROW_DIM, one state value per row
        case = benchmark.Case(name, (10 * benchmark.ROW_DIM,), "float32")
        assert case.shape(640) == (10, benchmark.ROW_DIM)
        assert case.bytes_per_step() == 4 * (3 * 640 + 2 * 10)
        with pytest.raises(ValueError, match="rows of"):
            case.shape(10)
    else:
        case = benchmark.Case(name, (10,), "float32")
        uses = rule.uses_slots(case.group())
        assert case.bytes_per_step() == 10 * 4 * (3 + 2 * sum(uses))
    assert benchmark.Case("Adam", (10,)).bytes_per_step() == 10 * 28


def test_run_prints_a_table_with_every_implementation(capsys):
    rows = benchmark.run([benchmark.Case("SGD", (2000,))], min_time=0.01)
    out = capsys.readouterr()
    assert "[1/1] SGD" in out.err                      # progress
    impls = {r["impl"] for r in rows}
    assert {"fastopt-numba", "fastopt-numpy", "ceiling"} <= impls
    assert all(r["seconds"] > 0 and r["gb_per_s"] > 0 for r in rows)
    assert "| SGD 2K float32 | fastopt-numba |" in out.out
    assert out.out.startswith("Machine: ")


def test_cli_rejects_unknown_rule_and_backend():
    with pytest.raises(ValueError, match="unknown rule"):
        cli.main(["bench", "--rules", "Adamm"])
    with pytest.raises(ValueError, match="unknown backend"):
        cli.main(["bench", "--backends", "fortran"])


def test_cli_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "fastopt", "--help"], capture_output=True,
                         text=True)
    assert out.returncode == 0 and "bench" in out.stdout
