"""The examples run and reach the results they print (short runs)."""

import runpy
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name):
    """The example's module namespace (its ``if __name__ == "__main__"`` block not run)."""
    return runpy.run_path(str(EXAMPLES / name), run_name=f"example_{Path(name).stem}")


def test_linear_regression(capsys):
    results, best = load_example("linear_regression.py")["main"]()
    excess = {name: curve[-1] - best for name, (lr, curve) in results.items()}
    assert excess["SGD + momentum 0.9"] < 1e-3
    assert excess["Adam"] < 1e-3
    assert excess["GD (full batch)"] > excess["Adam"]
    assert "excess loss over the optimum" in capsys.readouterr().out


def test_mlp_digits(tmp_path, capsys):
    pytest.importorskip("sklearn")
    try:
        import matplotlib  # noqa: F401
        has_mpl = True
    except ImportError:
        has_mpl = False
    plot = tmp_path / "loss.png"
    results = load_example("mlp_digits.py")["main"](["--epochs", "6", "--plot", str(plot)])

    assert set(results) == {"SGD", "SGD+Nesterov", "RMSprop", "Adam"}
    for name, r in results.items():
        assert len(r["train_loss"]) == len(r["test_acc"]) == 7, name
        assert r["train_loss"][-1] < 0.5 * r["train_loss"][0], name
    assert results["Adam"]["test_acc"][-1] > 0.9
    # same initialization for every optimizer
    assert len({r["train_loss"][0] for r in results.values()}) == 1

    out = capsys.readouterr().out
    assert "gradient check" in out and "final test accuracy" in out
    if has_mpl:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert not plot.exists() and "matplotlib is not installed" in out



def _loss_table(out):
    """The printed training-loss table (from its title to the blank line after it)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("training loss"))
    end = lines.index("", start)
    return lines[start:end]


def test_embedding_zipf(capsys):
    main = load_example("embedding_zipf.py")["main"]
    results, baseline = main(["--quick", "--seed", "3"])
    out = capsys.readouterr().out

    assert set(results) == {"Adam (lazy)", "Adagrad", "RowWiseAdagrad", "SGD"}
    steps = 150
    for name, r in results.items():
        loss = np.asarray(r["loss"])
        assert len(loss) == steps and np.all(np.isfinite(loss)), name
        # the loss falls: the last 25 batches average well below the first batch
        assert loss[-25:].mean() < 0.8 * loss[0], (name, loss[0], loss[-25:].mean())
        assert loss[-25:].mean() < loss[:25].mean(), name
        assert r["test_rmse"] < baseline, (name, r["test_rmse"], baseline)
    for name in ("Adam (lazy)", "Adagrad", "RowWiseAdagrad"):
        assert results[name]["test_rmse"] < 0.8 * baseline, (name, results[name]["test_rmse"])
    # same initial tables and first batch for every optimizer
    assert len({r["loss"][0] for r in results.values()}) == 1
    # state: Adam two floats per element, Adagrad one, row-wise Adagrad one per row
    nbytes = {name: r["state_bytes"] for name, r in results.items()}
    assert nbytes["Adagrad"] > 0 and nbytes["Adam (lazy)"] == 2 * nbytes["Adagrad"]
    assert nbytes["RowWiseAdagrad"] * 16 == nbytes["Adagrad"]          # dim 16 in --quick
    assert nbytes["SGD"] == 0
    assert all(r["step_ms"] > 0 for r in results.values())
    assert "held-out RMSE" in out and f"gives {baseline:.4f}" in out
    table = _loss_table(out)
    assert len(table) == 2 + 1 + steps // 25

    # deterministic: the same seed prints the same losses; another seed does not
    again, baseline_again = main(["--quick", "--seed", "3"])
    assert _loss_table(capsys.readouterr().out) == table
    assert baseline_again == baseline
    for name, r in results.items():
        assert again[name]["loss"] == r["loss"], name
        assert again[name]["test_rmse"] == r["test_rmse"], name
    other, _ = main(["--quick", "--seed", "4", "--steps", "25"])
    other_table = _loss_table(capsys.readouterr().out)
    assert other_table[2] != table[2]                        # the initial loss differs
    assert other["SGD"]["loss"] != results["SGD"]["loss"][:25]


def test_low_precision(capsys):
    pytest.importorskip("ml_dtypes")
    results = load_example("low_precision.py")["main"](["--steps", "120"])
    f32 = results["float32"]
    for name, r in results.items():
        assert r["final"] < 0.1 * r["losses"][0], name
        assert abs(r["final"] - f32["final"]) < 0.05 * f32["final"], name
    assert results["bf16 + 8-bit state, stochastic"]["state_bytes"] / f32["nparams"] < 2.2
    assert "state B/param" in capsys.readouterr().out
