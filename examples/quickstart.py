"""Quickstart: a two-layer MLP on scikit-learn's 8x8 digits, trained with optax and jaxent.

    python examples/quickstart.py

Plain JAX parameters, one jitted train step, ``jaxent.cross_entropy`` as the loss. Runs in a
few seconds on a laptop CPU and downloads nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxent


def init_params(key: jax.Array, sizes: Sequence[int] = (64, 128, 10)) -> list[dict]:
    """He-initialized weights and zero biases (shaped [1, n]) for a fully connected network."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {"w": jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), "b": jnp.zeros((1, n))}
        for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def predict(params: list[dict], x: jax.Array) -> jax.Array:
    """Logits ``[B, 10]`` for flattened images ``x`` of shape ``[B, 64]``."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params: list[dict], x: jax.Array, y: jax.Array) -> jax.Array:
    """The mean cross-entropy: PyTorch's ``nn.CrossEntropyLoss()(logits, y)``."""
    return jaxent.cross_entropy(predict(params, x), y)


@jax.jit
def evaluate(params: list[dict], x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean loss and accuracy on a held-out set."""
    logits = predict(params, x)
    return jaxent.cross_entropy(logits, y), jnp.mean(jnp.argmax(logits, axis=-1) == y)


def make_train_step(optimizer: optax.GradientTransformation):
    """A jitted ``(params, opt_state, x, y) -> (params, opt_state, loss)`` step."""

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Trains full-batch for ``--steps`` Adam steps and prints loss and test accuracy."""
    parser = argparse.ArgumentParser(description="jaxent quickstart on sklearn digits",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=200,
                        help="full-batch Adam steps (the default: about 10 s on 2 CPU cores, "
                             "start-up included)")
    parser.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
    args = parser.parse_args(argv)

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data / 16.0, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    params = jax.jit(init_params)(jax.random.key(0))  # one compile instead of one per op
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)
    train_step = make_train_step(optimizer)

    first_loss = None
    for step in range(1, args.steps + 1):
        params, opt_state, loss = train_step(params, opt_state, x_train, y_train)
        first_loss = float(loss) if first_loss is None else first_loss
        if step % 50 == 0 or step == args.steps:
            print(f"step {step:4d}  train loss {float(loss):.4f}")

    test_loss, accuracy = map(float, evaluate(params, x_test, y_test))
    print(f"test loss {test_loss:.4f}  test accuracy {accuracy:.2%}")
    return {"first_loss": first_loss, "train_loss": float(loss),
            "test_loss": test_loss, "test_accuracy": accuracy}


if __name__ == "__main__":
    main()
