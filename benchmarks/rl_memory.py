"""Compiled temporary memory of the fused RL/distillation heads against the naive programs.

``jit(value_and_grad(loss, argnums=(hidden, kernel)))`` is lowered from ShapeDtypeStructs and
compiled (never executed); ``memory_analysis().temp_size_in_bytes`` is compared for
``linear_log_probs(..., return_entropy=True)`` and ``linear_distillation_loss`` (each
divergence) against the same loss on materialized logits.

Run::

    python benchmarks/rl_memory.py --n 8192 --d 2048 --v 128256
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxent


def temp_bytes(fn, *shapes) -> int:
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def cases(n: int, v: int):
    y = jnp.zeros((n,), jnp.int32)

    def fused_lp(h, k):
        lp, ent = jaxent.linear_log_probs(h, k, y, return_entropy=True)
        return (lp + 0.1 * ent).sum()

    def naive_lp(h, k):
        logp = jax.nn.log_softmax(h @ k)
        ent = -jnp.sum(jnp.exp(logp) * logp, -1)
        return (jnp.take_along_axis(logp, y[:, None], -1)[:, 0] + 0.1 * ent).sum()

    yield "linear_log_probs(entropy)", fused_lp, naive_lp, 2

    def naive_divergence(xs, xt, div):
        """The textbook formulas on materialized float32 logits (the teacher constant)."""
        lp, lq = jax.nn.log_softmax(xs), jax.nn.log_softmax(jax.lax.stop_gradient(xt))
        p, q = jnp.exp(lp), jnp.exp(lq)
        if div == "kl":
            return jnp.mean(jnp.sum(q * (lq - lp), -1))
        if div == "reverse_kl":
            return jnp.mean(jnp.sum(p * (lp - lq), -1))
        lm = jnp.log(0.5 * q + 0.5 * p)
        return jnp.mean(0.5 * jnp.sum(q * (lq - lm), -1) + 0.5 * jnp.sum(p * (lp - lm), -1))

    for div in ("kl", "reverse_kl", "jsd"):
        def fused(h, k, ht, kt, div=div):
            return jaxent.linear_distillation_loss(h, k, ht, kt, divergence=div)

        def naive(h, k, ht, kt, div=div):
            return naive_divergence(h @ k, ht @ kt, div)

        yield f"linear_distillation_loss({div})", fused, naive, 4


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--v", type=int, default=128256)
    a = p.parse_args(argv)
    print(f"N={a.n} D={a.d} V={a.v} float32, jit(value_and_grad) temp_size_in_bytes")
    for name, fused, naive, nargs in cases(a.n, a.v):
        shapes = [(a.n, a.d), (a.d, a.v)] * (nargs // 2)
        f, r = temp_bytes(fused, *shapes), temp_bytes(naive, *shapes)
        print(f"{name:34s} fused {f / 2**20:9.1f} MiB  naive {r / 2**20:9.1f} MiB  "
              f"ratio {100 * f / r:5.2f} %", flush=True)


if __name__ == "__main__":
    main()
