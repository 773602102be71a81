"""The digits CNN of ``digits_cnn.py`` written with Flax Linen and ``flax.training.train_state``.

For Linen users: the model is a ``nn.Module`` with ``@nn.compact``, the parameters and the optax
state live in a ``TrainState``, and the train step is a pure ``jax.jit`` function that returns
a new state. The loss is ``jaxent.cross_entropy``, exactly as with NNX.

Run::

    python examples/digits_linen.py --epochs 20 --out out/digits_linen
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from digits_cnn import NUM_CLASSES, iterate_batches, load_digits_split, plot_curves
from flax.training import train_state
from tqdm import tqdm

import jaxent


class CNN(nn.Module):
    """Conv(3x3) -> ReLU -> MaxPool(2), three times; flatten; Dense -> ReLU -> Dense."""

    channels: Sequence[int] = (32, 64, 128)
    hidden: int = 128
    num_classes: int = NUM_CLASSES

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps images ``[B, 8, 8, 1]`` to logits ``[B, num_classes]``."""
        for features in self.channels:
            x = nn.Conv(features, kernel_size=(3, 3))(x)
            x = nn.max_pool(nn.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.num_classes)(x)


def create_train_state(key: jax.Array, learning_rate: float) -> train_state.TrainState:
    """Initializes the parameters (in one jitted call) and wraps them with Adam."""
    model = CNN()
    params = jax.jit(model.init)(key, jnp.zeros((1, 8, 8, 1), jnp.float32))["params"]
    return train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.adam(learning_rate)
    )


@jax.jit
def train_step(
    state: train_state.TrainState, x: jax.Array, y: jax.Array
) -> tuple[train_state.TrainState, jax.Array]:
    """One Adam step; returns the new state and the batch loss."""

    def loss_fn(params):
        return jaxent.cross_entropy(state.apply_fn({"params": params}, x), y)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


@jax.jit
def eval_step(
    state: train_state.TrainState, x: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mean loss and accuracy on a batch (here: the whole test set at once)."""
    logits = state.apply_fn({"params": state.params}, x)
    return jaxent.cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, axis=-1) == y)


def train_and_evaluate(
    *,
    epochs: int = 20,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    seed: int = 0,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Trains the Linen CNN and returns the per-epoch history (plus ``wall_time_s``)."""
    start = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    state = create_train_state(jax.random.key(seed), learning_rate)
    rng = np.random.default_rng(seed)
    history: dict[str, list[float]] = {"train_loss": [], "test_loss": [], "test_accuracy": []}

    bar = tqdm(range(1, epochs + 1), desc="digits_linen", unit="epoch", disable=not progress)
    for epoch in bar:
        losses = []
        for xb, yb in iterate_batches(x_train, y_train, batch_size, rng):
            state, loss = train_step(state, xb, yb)
            losses.append(loss)
        test_loss, test_acc = eval_step(state, x_test, y_test)
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
        plot_curves(history, out / "digits_linen_curves.png", title="digits CNN (Linen)")
    return history


def main(argv: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Command-line entry: parses options, trains, prints the final numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20,
                        help="passes over the training digits (the NNX twin, digits_cnn.py, took "
                             "100 s wall for 20 on 2 busy cores)")
    parser.add_argument("--batch-size", type=int, default=64, help="examples per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialization and the shuffling")
    parser.add_argument("--out", default="out/digits_linen", help="directory for the curves PNG")
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
