"""The examples run and reach the results they print (short runs)."""

import runpy
from pathlib import Path

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

