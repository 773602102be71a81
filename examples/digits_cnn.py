"""A Flax NNX convolutional classifier on scikit-learn's 8x8 digits, trained with jaxent.

Three conv + max-pool blocks (8x8 -> 4x4 -> 2x2 -> 1x1), flatten, two dense layers, optax Adam,
and ``jaxent.cross_entropy`` inside a jitted train step. Every epoch it reports the average
train loss, the test loss and the test accuracy, and at the end it writes a PNG of the curves.
The data ships with scikit-learn, so nothing is downloaded.

Run::

    python examples/digits_cnn.py --epochs 20 --out out/digits_cnn

The logic lives in importable functions (``load_digits_split``, ``CNN``, ``train_step``,
``eval_step``, ``train_and_evaluate``) so that ``tests/test_examples.py`` can run a few steps;
``digits_linen.py`` and ``distill.py`` reuse the data helpers.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import jaxent

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

NUM_CLASSES = 10


# ----------------------------------------------------------------------------- data


def load_digits_split(
    test_size: float = 0.2, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Loads the 1797 bundled 8x8 digit images, scaled to [0, 1], as NHWC float32.

    Returns:
        ``(x_train, y_train, x_test, y_test)``; images ``[N, 8, 8, 1]`` float32, labels ``[N]``
        int32, split with stratification so both halves hold every class.
    """
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[..., None]
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    return x_train, y_train, x_test, y_test


def iterate_batches(
    x: np.ndarray, y: np.ndarray, batch_size: int, rng: np.random.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields shuffled full batches (the ragged tail is dropped, so one shape is compiled)."""
    order = rng.permutation(len(x))
    for start in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


# ----------------------------------------------------------------------------- model


class CNN(nnx.Module):
    """Conv(3x3) -> ReLU -> MaxPool(2), three times; flatten; Dense -> ReLU -> Dense."""

    def __init__(
        self,
        channels: Sequence[int] = (32, 64, 128),
        hidden: int = 128,
        num_classes: int = NUM_CLASSES,
        *,
        rngs: nnx.Rngs,
    ):
        c1, c2, c3 = channels
        self.conv1 = nnx.Conv(1, c1, kernel_size=(3, 3), rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, kernel_size=(3, 3), rngs=rngs)
        self.conv3 = nnx.Conv(c2, c3, kernel_size=(3, 3), rngs=rngs)
        self.fc1 = nnx.Linear(c3, hidden, rngs=rngs)  # after three pools the map is 1x1
        self.fc2 = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps images ``[B, 8, 8, 1]`` to logits ``[B, num_classes]``."""
        for conv in (self.conv1, self.conv2, self.conv3):
            x = nnx.max_pool(nnx.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.fc1(x)))


# ----------------------------------------------------------------------------- steps


def loss_fn(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean cross-entropy of the model's logits against integer labels."""
    return jaxent.cross_entropy(model(x), y)


@nnx.jit
def train_step(model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One Adam step on a batch; updates ``model`` and ``optimizer`` in place, returns the loss."""
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_step(model: CNN, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean loss and accuracy on a batch (here: the whole test set at once)."""
    logits = model(x)
    loss = jaxent.cross_entropy(logits, y)
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == y)
    return loss, accuracy


# ----------------------------------------------------------------------------- loop


def plot_curves(history: dict[str, list[float]], path: Path, title: str = "digits CNN") -> None:
    """Writes the loss curves and the test accuracy curve side by side to ``path`` (PNG)."""
    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3), dpi=80)
    ax_loss.plot(epochs, history["train_loss"], label="train")
    ax_loss.plot(epochs, history["test_loss"], label="test")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", yscale="log", title=f"{title}: loss")
    ax_loss.legend()
    ax_acc.plot(epochs, np.asarray(history["test_accuracy"]) * 100, color="C2")
    ax_acc.set(xlabel="epoch", ylabel="%", title="test accuracy")
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train_and_evaluate(
    *,
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Trains the CNN and returns the per-epoch history (plus ``wall_time_s``).

    If ``out_dir`` is given, the curves are written to ``out_dir/digits_cnn_curves.png``.
    """
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    model = CNN(rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(learning_rate), wrt=nnx.Param)
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {"train_loss": [], "test_loss": [], "test_accuracy": []}

    bar = tqdm(range(1, epochs + 1), desc="digits_cnn", unit="epoch", disable=not progress)
    for epoch in bar:
        losses = [train_step(model, optimizer, xb, yb) for xb, yb in
                  iterate_batches(x_train, y_train, batch_size, rng)]
        test_loss, test_acc = eval_step(model, x_test, y_test)
        history["train_loss"].append(float(jnp.mean(jnp.stack(losses))))
        history["test_loss"].append(float(test_loss))
        history["test_accuracy"].append(float(test_acc))
        line = (f"epoch {epoch:3d}  train_loss {history['train_loss'][-1]:.4f}  "
                f"test_loss {float(test_loss):.4f}  test_acc {float(test_acc):.2%}")
        bar.set_postfix_str(line.split("  ", 1)[1])
        if progress:
            tqdm.write(line)

    history["wall_time_s"] = [time.perf_counter() - start]
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plot_curves(history, out / "digits_cnn_curves.png")
    return history


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Command-line entry: parses options, trains, prints the final numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20,
                        help="passes over the training digits (20 took 100 s wall on 2 busy cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialization and the shuffling")
    parser.add_argument("--out", default="out/digits_cnn", help="directory for the curves PNG")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    args = parser.parse_args(argv)
    history = train_and_evaluate(
        epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
        seed=args.seed, out_dir=args.out, progress=not args.no_progress,
    )
    print(f"final test accuracy {history['test_accuracy'][-1]:.2%}, "
          f"test loss {history['test_loss'][-1]:.4f}, "
          f"wall time {history['wall_time_s'][0]:.1f} s; curves in {args.out}/")
    return history


if __name__ == "__main__":
    main()
