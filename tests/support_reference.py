"""The naive materialized sampler-support log-probs, written independently of jaxent.

NumPy float64 sets and values (sort, cumulative sum, mask, renormalize, in vLLM's order:
min-p, top-k, top-p on the renormalized survivors; ties kept by value), and a JAX program
on the materialized logits with that set held constant for the gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def transform64(x, temperature=1.0, cap=None):
    z = np.asarray(x, np.float64) / np.asarray(temperature, np.float64)[..., None]
    return z if cap is None else cap * np.tanh(z / cap)


def support_mask(z, top_k=None, top_p=None, min_p=None):
    """``[N, V]`` bool: the classes each row's sampler may draw (``z`` float64 ``[N, V]``;
    each parameter a scalar, an ``[N]`` array or None)."""
    n, v = z.shape
    per = lambda a, i: None if a is None else np.broadcast_to(np.asarray(a), (n,))[i]  # noqa: E731
    keep = np.ones((n, v), bool)
    for i in range(n):
        row = z[i]
        prob = np.exp(row - row.max())
        prob /= prob.sum()
        mp, k, p = per(min_p, i), per(top_k, i), per(top_p, i)
        if mp is not None:
            keep[i] &= prob >= mp * prob.max()
        if k is not None:
            kth = np.sort(row)[::-1][int(k) - 1]
            keep[i] &= row >= kth
        if p is not None and p < 1.0:
            vals = np.sort(row[keep[i]])[::-1]
            q = np.exp(vals - vals.max())
            q /= q.sum()
            before = np.cumsum(q) - q
            tau = vals[before < p].min()
            keep[i] &= row >= tau
    return keep


def values64(z, y, keep):
    """``(log p'_y, H')`` float64 (``-inf`` for a token outside the set)."""
    zm = np.where(keep, z, -np.inf)
    lse = np.log(np.sum(np.exp(zm - z.max(1, keepdims=True)), 1)) + z.max(1)
    lp = zm[np.arange(len(y)), y] - lse
    lpc = zm - lse[:, None]
    lpc = np.where(keep, lpc, 0.0)
    ent = -np.sum(np.where(keep, np.exp(lpc) * lpc, 0.0), 1)
    return lp, ent


def jax_program(keep, y, temperature=1.0, cap=None):
    """``x -> (log p'_y, H')`` on materialized logits with the set ``keep`` constant
    (``log p'_y`` replaced by 0 outside the set, where it is a constant ``-inf``)."""
    keep = jnp.asarray(keep)
    y = jnp.asarray(y)
    inside = keep[jnp.arange(y.shape[0]), y]

    def fn(x):
        t = jnp.asarray(temperature, x.dtype)
        z = x / (t if t.ndim == 0 else t.reshape(-1, 1))
        if cap is not None:
            z = cap * jnp.tanh(z / cap)
        lp = jax.nn.log_softmax(jnp.where(keep, z, -jnp.inf), axis=-1)
        lpy = jnp.take_along_axis(lp, y[:, None], 1)[:, 0]
        ent = -jnp.sum(jnp.where(keep, jnp.exp(lp) * jnp.where(keep, lp, 0.0), 0.0), -1)
        return jnp.where(inside, lpy, 0.0), ent

    return jax.jit(fn), inside
