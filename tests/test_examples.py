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


def test_first_hour_trains_and_compares(capsys):
    import first_hour

    result = first_hour.main(["--steps", "40", "--rows", "64", "--vocab", "300",
                              "--rounds", "1"])
    assert result["train_loss"] < 0.5 * result["first_loss"]
    assert result["test_accuracy"] > 0.8  # chance is 0.1
    rows = {r["name"].split()[0]: r for r in result["rows"]}
    assert set(rows) == {"jaxent.cross_entropy", "optax", "torch"}
    # The three libraries agree on the trained model's test loss.
    losses = [r["test_loss"] for r in rows.values()]
    assert max(losses) - min(losses) < 1e-5 * max(losses)
    assert rows["optax"]["vs_optax"] == {"float32": 1.0, "bfloat16": 1.0}
    out = capsys.readouterr().out
    assert "| jaxent.cross_entropy |" in out and "test accuracy" in out


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


def test_tiny_lm_packing_pads_with_ignore_index():
    import numpy as np
    import tiny_lm

    rows = tiny_lm.pack_rows([[5, 6, 2], [7, 2], [8, 9, 10, 11, 12, 13, 2]], seq_len=4)
    assert rows.shape == (3, 5)
    np.testing.assert_array_equal(rows[0], [5, 6, 2, 7, 2])  # two documents share a row
    np.testing.assert_array_equal(rows[2], [13, 2, 0, 0, 0])  # a long one's tail, padded
    inputs, targets = tiny_lm.inputs_and_targets(rows)
    np.testing.assert_array_equal(targets[2], [2, -100, -100, -100])
    np.testing.assert_array_equal(inputs[1], [8, 9, 10, 11])
    assert tiny_lm.detokenize(tiny_lm.tokenize("a (b), c.")) == "a (b), c."


@pytest.mark.parametrize("options", [{}, {"z_loss": 1e-3}, {"reduction": "sum"}])
def test_tiny_lm_fused_loss_matches_naive_head(options):
    import functools

    import jax
    import jax.numpy as jnp
    import tiny_lm

    h = jax.random.normal(jax.random.key(0), (12, 8))
    e = jax.random.normal(jax.random.key(1), (50, 8))
    y = jnp.array([1, 2, 3, -100, 4, 5, 6, 7, 8, 9, -100, 0])
    fused = functools.partial(tiny_lm.fused_loss, targets=y, **options)
    naive = functools.partial(tiny_lm.naive_loss, targets=y, **options)
    got = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, e)
    want = jax.value_and_grad(naive, argnums=(0, 1))(h, e)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert jnp.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_tiny_lm_learns(tmp_path):
    import tiny_lm

    result = tiny_lm.main([
        "--corpus", "pydoc", "--vocab-size", "512", "--seq-len", "32", "--d-model", "32",
        "--layers", "1", "--heads", "2", "--batch-size", "8", "--steps", "40",
        "--eval-every", "20", "--sample-tokens", "5", "--out", str(tmp_path), "--no-progress",
    ])
    (_, untrained), *_, (_, final) = result["val_loss"]
    assert final < untrained - 0.5
    assert result["train_loss"][-1][1] < result["train_loss"][0][1]
    assert result["tokens_per_s"] > 0
    assert result["sample"].startswith("The")
    assert (tmp_path / "tiny_lm.json").exists()
