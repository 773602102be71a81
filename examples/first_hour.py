"""The first hour: train a Flax model with jaxent's loss, then set it beside optax and PyTorch.

    python3 -m pip install -e ".[examples]" && python3 examples/first_hour.py

1. A two-layer Flax NNX MLP learns scikit-learn's 8x8 digits (shipped with scikit-learn,
   nothing is downloaded) in a jitted train step whose loss is ``jaxent.cross_entropy``.
2. One short table: the trained model's test loss computed by jaxent, by optax and by
   PyTorch (the same number), and the time of ``value_and_grad`` of the mean loss over a
   language-model head's logits (``--rows`` x ``--vocab``, float32), relative to optax.

About 25 s on 2 quiet CPU cores, start-up included (20 s of CPU time). The full
benchmark (more shapes, bf16, the fused linear head, memory, the GPU suite) is
``python3 -m jaxent.bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import jaxent


class MLP(nnx.Module):
    """``64 -> hidden -> 10`` with a ReLU: logits ``[B, 10]`` for flattened 8x8 images."""

    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jax.nn.relu(self.hidden(x)))


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
    """One Adam step on ``jaxent.cross_entropy`` (PyTorch's ``nn.CrossEntropyLoss()``)."""

    def loss_fn(model: MLP) -> jax.Array:
        return jaxent.cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def train(steps: int, batch: int, lr: float) -> tuple[MLP, np.ndarray, np.ndarray, dict]:
    """Trains on 80 % of the digits; returns the model, the held-out set and a summary."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        (digits.data / 16.0).astype(np.float32), digits.target, test_size=0.2,
        random_state=0, stratify=digits.target)
    model = MLP(128, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(x_train), batch)
        losses.append(float(train_step(model, optimizer, x_train[idx], y_train[idx])))
    seconds = time.perf_counter() - start
    accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=-1) == y_test))
    return model, x_test, y_test, {"first_loss": losses[0], "train_loss": losses[-1],
                                   "test_accuracy": accuracy, "train_seconds": seconds}


# ------------------------------------------------------------------------- the three losses
def jaxent_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jaxent.cross_entropy(logits, labels)


def optax_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def jax_timer(loss: Callable, logits: jax.Array, labels: jax.Array
              ) -> tuple[Callable[[], float], int | None]:
    """A call of the jitted ``value_and_grad``, timed to completion, and the compiled
    program's temporary bytes (``memory_analysis()``, where the backend reports it)."""
    compiled = jax.jit(jax.value_and_grad(loss)).lower(logits, labels).compile()
    analysis = compiled.memory_analysis()
    jax.block_until_ready(compiled(logits, labels))

    def timed() -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled(logits, labels))
        return time.perf_counter() - start

    return timed, getattr(analysis, "temp_size_in_bytes", None)


def torch_timer(torch, logits: np.ndarray, labels: np.ndarray, dtype: str
                ) -> Callable[[], float]:
    """The same for ``torch.nn.functional.cross_entropy`` and ``backward()`` on the CPU."""
    x = torch.tensor(logits, dtype=getattr(torch, dtype), requires_grad=True)
    y = torch.tensor(labels, dtype=torch.int64)

    def timed() -> float:
        start = time.perf_counter()
        x.grad = None
        torch.nn.functional.cross_entropy(x, y).backward()
        return time.perf_counter() - start

    timed()  # warm-up
    return timed


def compare(model: MLP, x_test: np.ndarray, y_test: np.ndarray, rows: int, vocab: int,
            rounds: int) -> list[dict]:
    """Test loss by each library; median time of ``value_and_grad`` at ``[rows, vocab]`` in
    float32 and bfloat16, and the JAX programs' compiled temporaries in bfloat16.

    The timed calls are interleaved (one of each per round) so that a busy machine slows
    them alike.
    """
    test_logits = np.asarray(model(x_test))
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((rows, vocab)) * 2).astype(np.float32)
    labels = rng.integers(0, vocab, rows).astype(np.int32)
    out: list[dict] = []
    for name, loss in (("jaxent.cross_entropy", jaxent_loss),
                       ("optax softmax_cross_entropy_with_integer_labels, mean", optax_loss)):
        row: dict = {"name": name, "test_loss": float(loss(test_logits, y_test)), "timers": {}}
        for dtype in ("float32", "bfloat16"):
            timed, temp = jax_timer(loss, jnp.asarray(logits, dtype), jnp.asarray(labels))
            row["timers"][dtype] = timed
            row["temp_bytes"] = temp  # the bfloat16 program's, the last one
        out.append(row)
    try:
        import torch
    except ImportError as e:  # the examples extra installs it; say so if it is missing
        print(f"note: PyTorch is not installed ({e}); pip install -e \".[examples]\"")
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        out.append({"name": f"torch {torch.__version__.split('+')[0]} F.cross_entropy",
                    "test_loss": float(torch.nn.functional.cross_entropy(
                        torch.tensor(test_logits), torch.tensor(y_test))),
                    "temp_bytes": None,
                    "timers": {d: torch_timer(torch, logits, labels, d)
                               for d in ("float32", "bfloat16")}})
    times: dict[tuple[int, str], list[float]] = {}
    for _ in range(rounds):
        for i, row in enumerate(out):
            for dtype, timed in row["timers"].items():
                times.setdefault((i, dtype), []).append(timed())
    for i, row in enumerate(out):
        del row["timers"]
        row["ms"] = {d: 1e3 * statistics.median(times[i, d]) for d in ("float32", "bfloat16")}
    for row in out:
        row["vs_optax"] = {d: row["ms"][d] / out[1]["ms"][d] for d in row["ms"]}
    return out


def table(rows: list[dict], n: int, v: int) -> str:
    """The comparison as a Markdown table."""
    def mib(b: int | None) -> str:
        return "-" if b is None else f"{b / 2**20:.1f} MiB"

    lines = [f"| loss | test loss (trained model) | {n} x {v} f32: time, vs optax "
             "| bf16: time, vs optax | bf16 temporaries |", "| --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['name']} | {r['test_loss']:.6f} | "
              + " | ".join(f"{r['ms'][d]:.0f} ms, {r['vs_optax'][d]:.2f}x"
                           for d in ("float32", "bfloat16"))
              + f" | {mib(r['temp_bytes'])} |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description="Train a Flax MLP with jaxent's loss, then compare the loss with optax "
                    "and PyTorch (value, and time relative to optax).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="Adam steps on the digits")
    parser.add_argument("--batch", type=int, default=128, help="examples per training step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    parser.add_argument("--rows", type=int, default=1024,
                        help="rows (tokens) of the timed logits")
    parser.add_argument("--vocab", type=int, default=32000,
                        help="classes (vocabulary) of the timed logits")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed calls of each loss (the median is shown)")
    args = parser.parse_args(argv)
    if min(args.steps, args.batch, args.rows, args.vocab, args.rounds) < 1:
        parser.error("--steps, --batch, --rows, --vocab and --rounds must be at least 1")

    model, x_test, y_test, summary = train(args.steps, args.batch, args.lr)
    print(f"Trained a Flax NNX MLP on scikit-learn's digits with jaxent.cross_entropy: "
          f"{args.steps} Adam steps in {summary['train_seconds']:.1f} s (compile included), "
          f"loss {summary['first_loss']:.3f} -> {summary['train_loss']:.3f}, "
          f"test accuracy {100 * summary['test_accuracy']:.1f} %.\n")
    rows = compare(model, x_test, y_test, args.rows, args.vocab, args.rounds)
    print(table(rows, args.rows, args.vocab))
    print(f"\nTimes: median of {args.rounds} interleaved calls on {jax.devices()[0].platform} "
          f"({os.cpu_count()} cores); lower is better. More shapes, bf16 and memory: "
          "python3 -m jaxent.bench --quick")
    return {**summary, "rows": rows}


if __name__ == "__main__":
    main()
