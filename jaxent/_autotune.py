"""Pick block sizes by timing candidates on the current device, and remember the winner.

Generic over what is tuned: a *candidate* is any value with a JSON form (an int, a string,
a tuple/list or dict of those, or a frozen dataclass of them such as a Pallas ``Config``).
A winner is cached in one JSON file, keyed by the device kind
(``jax.devices()[0].device_kind``) and a *problem key* that names the implementation, the
dtype and the shape class (each dimension rounded up to a power of two, see
:func:`autotune_key`), so one measurement serves nearby shapes.

The cache lives at ``$JAXENT_AUTOTUNE_CACHE`` if set, else
``~/.cache/jaxent/autotune.json``. :func:`lookup` never times and never fails: a missing or
unreadable cache, an unknown device or a cached value that is no longer a candidate give the
caller's default (its heuristics).

Example (the XLA walks' block sizes)::

    def build(bs):
        return jax.jit(jax.grad(functools.partial(jaxent.linear_cross_entropy,
                                                  block_size=bs)))

    key = jaxent.autotune_key("xla-vocab", h.dtype, n=n, d=d, v=v)
    best = jaxent.autotune(build, [1024, 2048, 4096], (h, w, y), key)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Hashable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

ENV_CACHE = "JAXENT_AUTOTUNE_CACHE"


def cache_path() -> Path:
    """The cache file: ``$JAXENT_AUTOTUNE_CACHE`` or ``~/.cache/jaxent/autotune.json``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env) if env else Path.home() / ".cache" / "jaxent" / "autotune.json"


def device_kind() -> str:
    """``jax.devices()[0].device_kind`` (``"unknown"`` if there is none to ask)."""
    try:
        return str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 - no backend, no device: still a valid key
        return "unknown"


def _bucket(x: int) -> int:
    """``x`` rounded up to a power of two (at least 1)."""
    return 1 << max(0, math.ceil(math.log2(max(int(x), 1))))


def autotune_key(impl: str, dtype, **dims: int) -> str:
    """``"impl|dtype|n=1024,v=131072"``: dimensions rounded up to powers of two, sorted."""
    shape = ",".join(f"{k}={_bucket(v)}" for k, v in sorted(dims.items()))
    return f"{impl}|{np.dtype(dtype).name}|{shape}"


def encode(candidate: Any) -> Any:
    """The JSON form of a candidate (dataclasses as ``{"type": name, "fields": {...}}``)."""
    if dataclasses.is_dataclass(candidate) and not isinstance(candidate, type):
        return {"type": type(candidate).__qualname__,
                "fields": {f.name: encode(getattr(candidate, f.name))
                           for f in dataclasses.fields(candidate)}}
    if isinstance(candidate, tuple | list):
        return [encode(c) for c in candidate]
    if isinstance(candidate, dict):
        return {str(k): encode(v) for k, v in candidate.items()}
    if candidate is None or isinstance(candidate, bool | int | float | str):
        return candidate
    raise TypeError(f"autotune candidates must have a JSON form, got {candidate!r}")


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store(path: Path, data: dict) -> None:
    """Write ``data`` atomically (a temporary file renamed over the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _full_key(key: str) -> str:
    return f"{device_kind()}|{key}"


def lookup(key: str, candidates: Sequence[Hashable] | None = None, default: Any = None):
    """The cached winner for ``key`` on this device, else ``default`` (never times).

    With ``candidates``, the winner is returned as the candidate whose JSON form matches
    (``default`` if none does); without, as its JSON form.
    """
    entry = _load(cache_path()).get(_full_key(key))
    if not isinstance(entry, dict) or "choice" not in entry:
        return default
    if candidates is None:
        return entry["choice"]
    for c in candidates:
        if encode(c) == entry["choice"]:
            return c
    return default


def time_call(fn: Callable, args: Sequence, reps: int = 3) -> float:
    """Seconds of ``fn(*args)`` (blocked until ready): the minimum of ``reps`` runs after
    one warm-up run (which compiles)."""
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def autotune(build: Callable[[Any], Callable], candidates: Sequence[Hashable],
             args: Sequence, key: str, *, reps: int = 3, default: Any = None,
             refresh: bool = False):
    """The fastest of ``candidates`` for ``key`` on this device, cached.

    Args:
      build: ``candidate -> fn``; ``fn(*args)`` runs the work with that candidate (jit it).
      candidates: the configurations to try (JSON-able; see :func:`encode`).
      args: the arguments to time ``fn`` on (concrete arrays of the problem's shape).
      key: the problem key, e.g. from :func:`autotune_key` (the device kind is added).
      reps: timed runs per candidate after one warm-up; the minimum counts.
      default: returned when every candidate fails (else the first candidate).
      refresh: time again even when a winner is cached.

    Returns:
      The winning candidate (a cached one is returned without timing). A candidate that
      raises when built or run is skipped. The winner and all timings are written to
      :func:`cache_path` (if it cannot be written, the winner is still returned).
    """
    if not candidates:
        raise ValueError("autotune needs at least one candidate")
    if not refresh:
        hit = lookup(key, candidates)
        if hit is not None:
            return hit
    timings = {}
    best, best_t = None, math.inf
    for c in candidates:
        try:
            t = time_call(build(c), args, reps)
        except Exception:  # noqa: BLE001 - an infeasible configuration is not an error
            continue
        timings[json.dumps(encode(c), sort_keys=True)] = t
        if t < best_t:
            best, best_t = c, t
    if best is None:
        return default if default is not None else candidates[0]
    path = cache_path()
    data = _load(path)
    data[_full_key(key)] = {"choice": encode(best), "seconds": best_t, "timings": timings}
    try:
        _store(path, data)
    except OSError:
        pass
    return best
