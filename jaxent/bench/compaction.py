"""``--suite compaction [N D V PERCENT]``: what ``capacity=`` saves when most tokens are
ignored.

``jax.value_and_grad`` of :func:`jaxent.linear_cross_entropy` (w.r.t. hidden and kernel) at
``N x D x V`` (default 8192 x 512 x 32000) with ``PERCENT`` % of the tokens counted
(default 25; the rest ``ignore_index``, at random positions), once with
``capacity = PERCENT % of N`` and once with ``capacity=None``: both jitted, checked to
agree, warmed up, then timed interleaved (``--rounds``, default 5: A B A B ...). The report
gives each variant's min / median / max and the ratio of the minima with its spread (the
min and max of the per-round ratios), which is what to quote on a shared machine.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxent.bench.measure import machine_load
from jaxent.linear import linear_cross_entropy


def _args(args: Any) -> tuple[int, int, int, int]:
    vals = list(args.args) or ["8192", "512", "32000", "25"]
    if len(vals) != 4 or not all(v.isdigit() for v in vals) or not 0 < int(vals[3]) <= 100:
        raise SystemExit("--suite compaction takes N D V PERCENT (counted tokens, 1..100), "
                         f"e.g. 8192 512 32000 25; got {vals}")
    n, d, v, pct = (int(x) for x in vals)
    return n, d, v, pct


def inputs(n: int, d: int, v: int, pct: int, dtype=jnp.float32, seed: int = 0):
    """``(hidden [n, d], kernel [d, v], labels [n], capacity)``: ``pct`` % of the labels
    are classes, the rest -100, and ``capacity`` is exactly their number."""
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(n, d)), dtype)
    k = jnp.asarray(rng.normal(size=(d, v)) / np.sqrt(d), dtype)
    counted = max(1, n * pct // 100)
    y = np.full(n, -100)
    y[rng.choice(n, counted, replace=False)] = rng.integers(0, v, counted)
    return h, k, jnp.asarray(y), counted


def step(capacity: int | None):
    """The jitted ``value_and_grad`` (hidden, kernel) of the mean loss."""
    return jax.jit(jax.value_and_grad(
        lambda h, k, y: linear_cross_entropy(h, k, y, capacity=capacity), (0, 1)))


def compaction_suite(args: Any) -> tuple[str, dict[str, Any]]:
    """Interleaved timing of ``capacity=PERCENT % of N`` against ``capacity=None``:
    ``(markdown, data)`` (the suite registry wraps them in its report)."""
    n, d, v, pct = _args(args)
    rounds = args.rounds or 5
    h, k, y, cap = inputs(n, d, v, pct, jnp.dtype(args.dtype))
    runs = {f"capacity={cap}": step(cap), "capacity=None": step(None)}
    outs = {name: jax.block_until_ready(f(h, k, y)) for name, f in runs.items()}  # compile
    (la, ga), (lb, gb) = outs.values()
    tol = 1e-4 if args.dtype == "float32" else 2e-2
    agree = bool(np.allclose(la, lb, rtol=tol)) and all(
        np.allclose(a, b, rtol=tol, atol=tol * float(jnp.abs(b).max())) for a, b in
        zip(ga, gb, strict=True))
    load = machine_load()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, f in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(f(h, k, y))
            times[name].append(time.perf_counter() - t)
    a, b = times.values()
    per_round = [x / y for x, y in zip(a, b, strict=True)]
    ratio = min(a) / min(b)
    lines = [f"value_and_grad of linear_cross_entropy, {n}x{d}x{v} {args.dtype}, {pct} % of "
             f"tokens counted, {rounds} interleaved rounds; load average {load} at the "
             f"start, {machine_load()} at the end; values and gradients agree: {agree}", "",
             "| variant | min s | median s | max s |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {min(t):.3f} | {statistics.median(t):.3f} | {max(t):.3f} |"
              for name, t in times.items()]
    lines += ["", f"ratio of minima: {ratio:.3f}x (per-round ratios {min(per_round):.3f}x .. "
                  f"{max(per_round):.3f}x)"]
    data = {"n": n, "d": d, "v": v, "percent": pct, "capacity": cap, "dtype": args.dtype,
            "times": times, "ratio_of_minima": ratio, "per_round_ratios": per_round,
            "agree": agree, "load": load}
    return "\n".join(lines), data
