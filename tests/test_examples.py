"""Smoke tests for examples/: each one trains a few steps on tiny settings and must learn.

The examples are scripts, not a package; like flax's examples they are imported with their
directory on ``sys.path``. Nothing here downloads anything (the data ship with scikit-learn
and with Python itself).
"""

from __future__ import annotations

import sys
from pathlib import Path

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


def test_digits_linen_learns(tmp_path):
    import digits_linen

    history = digits_linen.main(["--epochs", "2", "--out", str(tmp_path), "--no-progress"])
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert history["test_accuracy"][-1] > 0.3


def test_distill_student_learns(tmp_path):
    import distill

    result = distill.run(teacher_epochs=1, student_epochs=3, out_dir=tmp_path, progress=False)
    for name in ("plain", "distilled"):
        assert result[f"{name}_train_loss"][-1] < result[f"{name}_train_loss"][0]
        assert result[f"{name}_accuracy"] > 0.2  # chance is 0.1
    assert (tmp_path / "distill.json").exists()


def test_distillation_loss_reduces_to_hard_loss_at_alpha_zero():
    import distill
    import jax
    import jax.numpy as jnp

    import jaxent

    logits = jax.random.normal(jax.random.key(0), (8, 10))
    teacher = jax.random.normal(jax.random.key(1), (8, 10))
    labels = jnp.array([0, 1, 2, 3, -100, 5, 6, 7])
    hard = jaxent.cross_entropy(logits, labels)
    got = distill.distillation_loss(logits, labels, teacher, 0.0, 4.0)
    assert jnp.allclose(got, hard, rtol=1e-6)
    # With alpha=1 the loss is T^2 times the soft cross-entropy against the softened teacher.
    soft = jaxent.soft_cross_entropy(logits / 4.0, jax.nn.softmax(teacher / 4.0))
    assert jnp.allclose(distill.distillation_loss(logits, labels, teacher, 1.0, 4.0), 16 * soft,
                        rtol=1e-5)
