"""Smoke tests for examples/: each one trains a few steps on tiny settings and must learn.

The examples are scripts, not a package; like flax's examples they are imported with their
directory on ``sys.path``. Nothing here downloads anything (the data ship with scikit-learn
and with Python itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_quickstart_learns(capsys):
    import quickstart

    result = quickstart.main(["--steps", "30"])
    assert result["train_loss"] < 0.5 * result["first_loss"]
    assert result["test_accuracy"] > 0.8  # chance is 0.1
    assert "test accuracy" in capsys.readouterr().out


def test_digits_cnn_learns_and_plots(tmp_path):
    import digits_cnn

    history = digits_cnn.main(["--epochs", "2", "--out", str(tmp_path), "--no-progress"])
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert all(loss > 0 for loss in history["test_loss"])  # computed, not left at zero
    assert history["test_accuracy"][-1] > 0.3  # chance is 0.1
    assert (tmp_path / "digits_cnn_curves.png").stat().st_size > 1000
