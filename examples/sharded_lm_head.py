"""A vocabulary-parallel language-model head on a 2 x 4 (data x model) mesh.

Runs on one CPU host: the script asks XLA for 8 simulated devices before JAX starts. On
real accelerators drop that line (and on several hosts call ``jax.distributed.initialize()``
first); the code is otherwise the same.

    python examples/sharded_lm_head.py

It trains a tiny softmax head ``hidden @ kernel`` for a few optax steps with the kernel
sharded along the vocabulary over the ``model`` axis and the tokens over the ``data`` axis,
using three equivalent entry points, and checks them against the single-device loss:

1. ``jaxent.sharded.shard_linear_cross_entropy`` (wraps ``shard_map``: the logits are never
   materialized, each device walks its own vocabulary slice in blocks);
2. ``jaxent.sharded.linear_cross_entropy`` inside the user's own ``jax.shard_map``;
3. ``jaxent.sharded.shard_cross_entropy`` on logits sharded (tokens x vocabulary).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jaxent  # noqa: E402

OPTIONS = dict(label_smoothing=0.1, z_loss=1e-4)


def make_data(key, n_tokens=256, dim=32, vocab=1024):
    """Random hidden states, a kernel and labels (a few padded with ignore_index=-100)."""
    kh, kw, ky = jax.random.split(key, 3)
    hidden = jax.random.normal(kh, (n_tokens, dim))
    kernel = jax.random.normal(kw, (dim, vocab)) / jnp.sqrt(dim)
    labels = jax.random.randint(ky, (n_tokens,), 0, vocab).at[::17].set(-100)
    return hidden, kernel, labels


def loss_fused(kernel, hidden, labels, mesh):
    """Entry point 1: the ready function over the mesh."""
    return jaxent.sharded.shard_linear_cross_entropy(
        hidden, kernel, labels, mesh=mesh, vocab_axis="model", token_axis="data", **OPTIONS)


def loss_in_shard_map(kernel, hidden, labels, mesh):
    """Entry point 2: the per-shard function inside our own shard_map."""

    def per_device(h, k, y):  # h: [N/2, D], k: [D, V/4], y: [N/2]
        return jaxent.sharded.linear_cross_entropy(
            h, k, y, axis_name="model", token_axis_name="data", **OPTIONS)

    return jax.shard_map(per_device, mesh=mesh,
                         in_specs=(P("data"), P(None, "model"), P("data")),
                         out_specs=P())(hidden, kernel, labels)


def loss_on_logits(kernel, hidden, labels, mesh):
    """Entry point 3: vocabulary-parallel cross-entropy of (sharded) logits."""
    logits = jnp.einsum("nd,dv->nv", hidden, kernel,
                        out_sharding=NamedSharding(mesh, P("data", "model")))
    return jaxent.sharded.shard_cross_entropy(
        logits, labels, mesh=mesh, vocab_axis="model", token_axis="data", **OPTIONS)


def train(loss_fn, kernel, hidden, labels, mesh, steps=5):
    """A few Adam steps on the kernel; returns the losses."""
    opt = optax.adam(1e-2)
    state = opt.init(kernel)

    @jax.jit
    def step(kernel, state):
        loss, grad = jax.value_and_grad(loss_fn)(kernel, hidden, labels, mesh)
        updates, state = opt.update(grad, state, kernel)
        return optax.apply_updates(kernel, updates), state, loss

    losses = []
    for _ in range(steps):
        kernel, state, loss = step(kernel, state)
        losses.append(float(loss))
    return losses


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: trains the head with each entry point and checks the losses.

    ``main()`` runs the defaults (tests call it so, under pytest's own ``sys.argv``); the
    script passes its command line.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=5,
                        help="Adam steps per entry point (the default: about 17 s on 2 CPU cores, "
                             "start-up included)")
    parser.add_argument("--tokens", type=int, default=256,
                        help="tokens N of hidden [N, D] (divisible by the data axis, 2)")
    parser.add_argument("--dim", type=int, default=32, help="hidden width D")
    parser.add_argument("--vocab", type=int, default=1024,
                        help="vocabulary V (divisible by the model axis, 4)")
    args = parser.parse_args([] if argv is None else argv)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    hidden, kernel, labels = make_data(jax.random.key(0), n_tokens=args.tokens, dim=args.dim,
                                       vocab=args.vocab)
    # Place the inputs: tokens over "data", the kernel's vocabulary over "model".
    hidden = jax.device_put(hidden, NamedSharding(mesh, P("data")))
    labels = jax.device_put(labels, NamedSharding(mesh, P("data")))
    kernel = jax.device_put(kernel, NamedSharding(mesh, P(None, "model")))
    print(f"{jax.device_count()} devices, mesh {dict(mesh.shape)}; kernel shards "
          f"{kernel.addressable_shards[0].data.shape} of {kernel.shape}")

    reference = float(jaxent.linear_cross_entropy(
        jax.device_get(hidden), jax.device_get(kernel), jax.device_get(labels), **OPTIONS))
    for name, fn in [("shard_linear_cross_entropy", loss_fused),
                     ("linear_cross_entropy in shard_map", loss_in_shard_map),
                     ("shard_cross_entropy on logits", loss_on_logits)]:
        losses = train(fn, kernel, hidden, labels, mesh, steps=args.steps)
        assert abs(losses[0] - reference) < 1e-4 * abs(reference), (losses[0], reference)
        assert losses[-1] < losses[0]
        print(f"{name:36s} loss {losses[0]:.5f} -> {losses[-1]:.5f} "
              f"(single device {reference:.5f})")


if __name__ == "__main__":
    main(sys.argv[1:])
