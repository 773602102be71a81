"""Knowledge distillation on scikit-learn's 8x8 digits with ``jaxent.soft_cross_entropy``.

A CNN teacher (``digits_cnn.CNN``) is trained first. Then the same small MLP student is trained
twice from the same initialization: once on the hard labels alone, once on a mix of the hard
labels and the teacher's temperature-softened probabilities (Hinton et al., 2015)::

    loss = alpha * T**2 * soft_cross_entropy(student_logits, softmax(teacher_logits / T),
                                             temperature=T)
         + (1 - alpha) * cross_entropy(student_logits, labels)

The ``T**2`` factor keeps the soft term's gradients on the scale of the hard term's. The
student is trained on all training images but keeps the labels of only ``--labelled-fraction``
of them; the others carry ``ignore_index`` (-100), so the hard term skips them, while the
teacher's probabilities cover every image. Without distillation (``alpha=0``) the same code
trains on the labelled images alone; with it, the teacher's "dark knowledge" fills the gap.

Run::

    python examples/distill.py --out out/distill
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_cnn import CNN, NUM_CLASSES, eval_step, iterate_batches, load_digits_split
from digits_cnn import train_step as teacher_step
from flax import nnx
from tqdm import tqdm

import jaxent


class MLP(nnx.Module):
    """A small student: flatten, Dense -> ReLU -> Dense."""

    def __init__(self, hidden: int = 32, num_classes: int = NUM_CLASSES, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(64, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps images ``[B, 8, 8, 1]`` to logits ``[B, num_classes]``."""
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


def distillation_loss(
    logits: jax.Array,
    labels: jax.Array,
    teacher_logits: jax.Array,
    alpha: jax.Array | float,
    temperature: float,
) -> jax.Array:
    """Hinton's mix of the soft (teacher) and hard (label) cross-entropies; ``alpha=0`` is plain
    supervised training."""
    soft_targets = jax.nn.softmax(teacher_logits / temperature, axis=-1)
    soft = jaxent.soft_cross_entropy(logits, soft_targets, temperature=temperature)
    hard = jaxent.cross_entropy(logits, labels)
    return alpha * temperature**2 * soft + (1.0 - alpha) * hard


@nnx.jit(static_argnames="temperature")
def student_step(
    model: MLP,
    optimizer: nnx.Optimizer,
    x: jax.Array,
    y: jax.Array,
    teacher_logits: jax.Array,
    alpha: jax.Array,
    *,
    temperature: float,
) -> jax.Array:
    """One Adam step of the student; ``alpha`` is traced so both runs share one compile."""

    def loss_fn(model):
        return distillation_loss(model(x), y, teacher_logits, alpha, temperature)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model: nnx.Module, x: jax.Array) -> jax.Array:
    """The model's logits, jitted (used for the teacher's soft labels)."""
    return model(x)


def train_teacher(x, y, *, epochs, batch_size, learning_rate, seed, progress) -> CNN:
    """Trains ``digits_cnn.CNN`` with the hard labels and returns it."""
    model = CNN(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    for _ in tqdm(range(epochs), desc="teacher", unit="epoch", disable=not progress):
        for xb, yb in iterate_batches(x, y, batch_size, rng):
            teacher_step(model, optimizer, xb, yb)
    return model


def train_student(
    x, y, teacher_logits, *, alpha, temperature, epochs, batch_size, learning_rate, seed, progress
) -> tuple[MLP, list[float]]:
    """Trains a fresh student (same seed, same batches for every ``alpha``); returns it and its
    per-epoch mean training loss. Labels equal to -100 are ignored by the hard term."""
    model = MLP(rngs=nnx.Rngs(seed + 1))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    rng = np.random.default_rng(seed + 1)
    index = np.arange(len(x))
    losses = []
    desc = f"student alpha={alpha}"
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress):
        epoch_losses = [
            student_step(model, optimizer, x[i], y[i], teacher_logits[i], jnp.float32(alpha),
                         temperature=temperature)
            for i, _ in iterate_batches(index, index, batch_size, rng)
        ]
        losses.append(float(jnp.mean(jnp.stack(epoch_losses))))
    return model, losses


def run(
    *,
    teacher_epochs: int = 15,
    student_epochs: int = 30,
    labelled_fraction: float = 0.1,
    temperature: float = 4.0,
    alpha: float = 0.9,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, float | list[float]]:
    """Teacher, then the student with and without distillation; returns the accuracies."""
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    teacher = train_teacher(x_train, y_train, epochs=teacher_epochs, batch_size=64,
                            learning_rate=learning_rate, seed=seed, progress=progress)
    _, teacher_acc = eval_step(teacher, x_test, y_test)

    n = max(batch_size, int(len(x_train) * labelled_fraction))
    y_s = y_train.copy()
    y_s[n:] = -100  # jaxent's default ignore_index; the split is already shuffled
    teacher_logits = np.asarray(predict(teacher, x_train))

    result: dict[str, float | list[float]] = {"teacher_accuracy": float(teacher_acc),
                                              "student_labels": n}
    for name, a in (("plain", 0.0), ("distilled", alpha)):
        student, losses = train_student(
            x_train, y_s, teacher_logits, alpha=a, temperature=temperature, epochs=student_epochs,
            batch_size=batch_size, learning_rate=learning_rate, seed=seed, progress=progress)
        loss, acc = eval_step(student, x_test, y_test)
        result[f"{name}_train_loss"] = losses
        result[f"{name}_test_loss"] = float(loss)
        result[f"{name}_accuracy"] = float(acc)
    result["wall_time_s"] = time.perf_counter() - start

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "distill.json").write_text(json.dumps(result, indent=1))
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, float | list[float]]:
    """Command-line entry: parses options, runs, prints the three accuracies."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--teacher-epochs", type=int, default=15,
                        help="epochs of the CNN teacher on all the labels (all the defaults: about "
                             "1 minute on 2 CPU cores)")
    parser.add_argument("--student-epochs", type=int, default=30,
                        help="epochs of each MLP student (with and without distillation)")
    parser.add_argument("--labelled-fraction", type=float, default=0.1,
                        help="fraction of the training labels the student keeps")
    parser.add_argument("--temperature", type=float, default=4.0,
                        help="softening temperature of the teacher's and the student's logits")
    parser.add_argument("--alpha", type=float, default=0.9, help="weight of the soft loss")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per step")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initializations, the label subset and the shuffling")
    parser.add_argument("--out", default="out/distill", help="directory for distill.json")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bars")
    args = parser.parse_args(argv)
    r = run(teacher_epochs=args.teacher_epochs, student_epochs=args.student_epochs,
            labelled_fraction=args.labelled_fraction, temperature=args.temperature,
            alpha=args.alpha, batch_size=args.batch_size, seed=args.seed, out_dir=args.out,
            progress=not args.no_progress)
    print(f"teacher (CNN) test accuracy:                {r['teacher_accuracy']:.2%}")
    print(f"student (MLP, {r['student_labels']} labels) without distillation: "
          f"{r['plain_accuracy']:.2%}")
    print(f"student (MLP, {r['student_labels']} labels) with distillation:    "
          f"{r['distilled_accuracy']:.2%}  (T={args.temperature}, alpha={args.alpha})")
    print(f"wall time {r['wall_time_s']:.1f} s")
    return r


if __name__ == "__main__":
    main()
