"""The vocabulary walk's backward in row groups (:func:`jaxent.impl.plan.row_groups`): values
and every gradient against float64 references, with the groups forced at a small shape
(one ragged: 10 rows in groups of 4, the last shifted to rows 6-9)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import _rowmath as rm
from jaxent.impl import linear_ce, stats, stream
from jaxent.impl.plan import Options, make_plan, row_groups, stream_plan
from tests import reference as ref

N, D, V, PAD, BLOCK = 10, 8, 29, 6, 8


def _data(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return dict(
        h=f(N, D), k=f(D, V) / 2, b=f(V) / 2, ht=f(N, D), kt=f(D, V) / 2,
        t=jax.nn.softmax(2 * f(N, V)), y=jnp.asarray(rng.integers(0, V, (N,)), jnp.int32),
        temp=jnp.asarray(rng.uniform(0.5, 2.0, (N,)), jnp.float32),
        counted=jnp.asarray(np.arange(N) != 3), c=f(N))


def _grouped(plan, groups):
    return dataclasses.replace(plan, row_groups=groups)


def _close(got, want, rtol=2e-5):
    for u, v in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v), rtol=rtol,
                                   atol=rtol * max(1.0, float(np.max(np.abs(v)))))


def _check(f, f64, args, groups):
    """``f(plan, *args)`` with ``groups`` row groups against ``f64(*args)`` in float64 (value
    and gradients in every argument); its program differs from one group's."""
    fn = lambda g: jax.value_and_grad(  # noqa: E731
        lambda *a: f(g, *a), argnums=tuple(range(len(args))))
    many = jax.jit(fn(groups)).lower(*args)
    _close(many.compile()(*args), _value_and_grad64(f64, args))
    assert jax.jit(fn(1)).lower(*args).as_text() != many.as_text()


def _value_and_grad64(f64, args):
    with jax.enable_x64(True):
        a64 = [jnp.asarray(np.asarray(a, np.float64)) for a in args]
        v, g = jax.value_and_grad(f64, argnums=tuple(range(len(args))))(*a64)
        return jax.tree.map(np.asarray, (v, g))


def _logits(h, k, b, temp):
    return (h @ k + b[None, :]) / temp[:, None]


@pytest.mark.parametrize("groups", [2, 3])
def test_linear_cross_entropy(groups):
    d = _data()
    w = jnp.asarray(np.random.default_rng(1).uniform(0.5, 2.0, V), jnp.float32)
    opts = Options(label_smoothing=0.1, z_loss=1e-2)
    y = d["y"].at[5].set(-100)
    plan = make_plan(opts, V, V, N, D, "dv", False, block_size=BLOCK)

    def f(g, h, k, b):
        lab = rm.labels_info(y, V, -100, None, w, jnp.float32, d["temp"])
        losses, _ = linear_ce.rows(_grouped(plan, g), h, k, b, lab, w)
        return jnp.sum(losses * d["c"])

    def f64(h, k, b):
        loss = ref.cross_entropy(h @ k + b[None, :], y, weight=w, label_smoothing=0.1, z_loss=1e-2,
                                 reduction="none", temperature=d["temp"][:, None], xp=jnp)
        return jnp.sum(loss * d["c"])

    _check(f, f64, (d["h"], d["k"], d["b"]), groups)


@pytest.mark.parametrize("groups", [2, 3])
def test_soft_cross_entropy(groups):
    d = _data(2)
    plan = stream_plan(Options(), V, V, N, block_size=BLOCK)
    rows = stats.Rows(None, d["counted"], d["temp"])

    def f(g, h, k, b, t):
        out = stream.run(stats.SoftTargets(V), _grouped(plan, g), ((h, k, b),), rows,
                         {"targets": t})
        return jnp.sum(out * d["c"])

    def f64(h, k, b, t):
        loss = ref.soft_cross_entropy(_logits(h, k, b, d["temp"]), t, reduction="none",
                                      where=d["counted"], xp=jnp)
        return jnp.sum(loss * d["c"])

    _check(f, f64, (d["h"], d["k"], d["b"], d["t"]), groups)


@pytest.mark.parametrize("kind", ["kl", "jsd"])
def test_distillation(kind):
    d = _data(3)
    plan = stream_plan(Options(), V, V, N, block_size=BLOCK, streams=2)
    rows = stats.Rows(None, d["counted"], d["temp"])

    def f(g, h, k, b):
        out = stream.run(stats.Distill(kind, 0.3), _grouped(plan, g),
                         ((h, k, b), (d["ht"], d["kt"], None)), rows, {})
        return jnp.sum(out * d["c"])

    def f64(h, k, b):
        loss = ref.distillation(h @ k + b[None, :], d["ht"] @ d["kt"], divergence=kind, beta=0.3,
                                temperature=d["temp"][:, None], where=d["counted"],
                                reduction="none", xp=jnp)
        return jnp.sum(loss * d["c"])

    _check(f, f64, (d["h"], d["k"], d["b"]), 3)


def test_log_probs_padded_vocabulary():
    """Padding columns (large logits, masked) and an id per row; entropy too."""
    d = _data(4)
    plan = stream_plan(Options(), V, V + PAD, N, block_size=BLOCK)
    rows = stats.Rows(d["y"], d["counted"], d["temp"])
    pad = lambda k, b: (jnp.pad(k, ((0, 0), (0, PAD)), constant_values=3.0),  # noqa: E731
                        jnp.pad(b, (0, PAD), constant_values=5.0))

    def f(g, h, k, b):
        lp, ent = stream.run(stats.LogProbs(V, entropy=True), _grouped(plan, g),
                             ((h, *pad(k, b)),), rows, {})
        return jnp.sum(lp * d["c"]) + jnp.sum(ent * d["c"][::-1])

    def f64(h, k, b):
        lp, ent = ref.token_log_probs(_logits(h, k, b, d["temp"]), d["y"],
                                      where=d["counted"], xp=jnp)
        return jnp.sum(lp * d["c"]) + jnp.sum(ent * d["c"][::-1])

    _check(f, f64, (d["h"], d["k"], d["b"]), 3)


def test_the_budget():
    """Llama-3-8B's head (16384 x 4096) walks 8 groups of 2048 rows (32 MiB of float32
    ``d hidden`` each); the CPU bench's fused shapes one."""
    assert row_groups(16384, 4096) == 8
    assert row_groups(4096, 1024) == row_groups(2048, 2048) == 1
    assert row_groups(10, 8, forced=3) == 3 and row_groups(10, 8, forced=4) == 4
    assert row_groups(5, 8, forced=4) == 3  # groups of 2 rows: 3 of them cover 5
    assert row_groups(1, 8, forced=4) == 1
