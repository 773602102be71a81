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

The file is JSON only (never code) and is checked against its schema when read: an object
of ``{"choice": <JSON value>, "seconds": <finite number >= 0>, "timings": {<str>: <finite
number >= 0>}}`` entries, with integers in ``[-2**31, 2**31)``, strings of at most 256
characters and nesting at most 8 deep. Entries that fail (or a file that is not such an
object) are ignored with one warning, and the defaults are used. Writers take an exclusive
``fcntl`` lock on ``<cache>.lock`` around their read-modify-write and replace the file by an
atomic rename, so concurrent autotuning processes lose no entry and readers never see a
half-written file.

Example (the XLA walks' block sizes)::

    def build(bs):
        return jax.jit(jax.grad(functools.partial(jaxent.linear_cross_entropy,
                                                  block_size=bs)))

    key = jaxent.autotune_key("xla-vocab", h.dtype, n=n, d=d, v=v)
    best = jaxent.autotune(build, [1024, 2048, 4096], (h, w, y), key)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
import warnings
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


_MAX_BYTES = 16 << 20  # a cache larger than this is not one of ours
_MAX_DEPTH = 8
_MAX_STR = 256
_INT_RANGE = (-(2**31), 2**31)
_warned: set[tuple[str, str]] = set()


def _warn_once(path: Path, why: str) -> None:
    """One warning per cache file and reason (per process)."""
    if (str(path), why) in _warned:
        return
    _warned.add((str(path), why))
    warnings.warn(f"jaxent: ignoring {why} in the autotune cache {path}; the default block "
                  "sizes are used (the next jaxent.autotune run rewrites the file)",
                  RuntimeWarning, stacklevel=3)


def _json_ok(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is a JSON value within the schema's bounds."""
    if depth > _MAX_DEPTH:
        return False
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return _INT_RANGE[0] <= value < _INT_RANGE[1]
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return len(value) <= _MAX_STR
    if isinstance(value, list):
        return all(_json_ok(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and len(k) <= _MAX_STR and _json_ok(v, depth + 1)
                   for k, v in value.items())
    return False


def _seconds_ok(t: Any) -> bool:
    return (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t)
            and t >= 0)


def _entry_ok(entry: Any) -> bool:
    """One cache entry: ``{"choice": JSON, "seconds": t, "timings": {str: t}}``."""
    if not isinstance(entry, dict) or set(entry) != {"choice", "seconds", "timings"}:
        return False
    timings = entry["timings"]
    return (_json_ok(entry["choice"]) and _seconds_ok(entry["seconds"])
            and isinstance(timings, dict) and len(timings) <= 1024
            and all(isinstance(k, str) and len(k) <= 4 * _MAX_STR and _seconds_ok(t)
                    for k, t in timings.items()))


def _load(path: Path) -> dict:
    """The valid entries of the cache at ``path`` (``{}`` if there is none); anything that
    fails the schema is dropped with one warning."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_BYTES + 1)
    except OSError:
        return {}
    if len(raw) > _MAX_BYTES:
        _warn_once(path, f"a file over {_MAX_BYTES} bytes")
        return {}
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        _warn_once(path, "text that is not JSON (or nested too deeply)")
        return {}
    if not isinstance(data, dict):
        _warn_once(path, f"a top-level {type(data).__name__} (expected an object)")
        return {}
    good = {k: v for k, v in data.items() if isinstance(k, str) and _entry_ok(v)}
    if len(good) != len(data):
        _warn_once(path, f"{len(data) - len(good)} entries that do not fit its schema")
    return good


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``<path>.lock`` (``fcntl``; no lock where there is none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - Windows: atomic rename alone
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _store(path: Path, data: dict) -> None:
    """Write ``data`` atomically (a temporary file renamed over the cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def record(key: str, choice: Any, seconds: float, timings: dict[str, float]) -> None:
    """Add one winner to the cache: a locked read-modify-write and an atomic rename, so
    that concurrent writers lose nothing. Raises ``OSError`` if it cannot be written and
    ``ValueError`` if the entry does not fit the schema."""
    entry = {"choice": encode(choice), "seconds": float(seconds),
             "timings": {str(k): float(v) for k, v in timings.items()}}
    if not _entry_ok(entry):
        raise ValueError(f"autotune: the winner {choice!r} does not fit the cache's schema")
    path = cache_path()
    with _locked(path):
        data = _load(path)
        data[_full_key(key)] = entry
        _store(path, data)


def decode(choice: Any, cls: type, bounds: dict[str, tuple[int, int]] | None = None):
    """A frozen dataclass ``cls`` from its :func:`encode` form, or ``None`` (with one
    warning) if ``choice`` is not one: a foreign type name, unknown fields, a value whose
    type differs from the field default's, an int outside ``bounds[field]`` (inclusive;
    ``[1, 2**31)`` by default), or one that ``cls`` itself rejects."""
    if not (isinstance(choice, dict) and set(choice) == {"type", "fields"}
            and choice["type"] == cls.__qualname__ and isinstance(choice["fields"], dict)):
        _warn_once(cache_path(), f"a choice that is not a {cls.__qualname__}")
        return None
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    fields = choice["fields"]
    why = None
    for name, value in fields.items():
        if name not in defaults:
            why = f"an unknown field {name!r}"
            break
        want = defaults[name]
        if value is None and want is None:
            continue
        kind = type(want) if want is not None else int
        if isinstance(value, bool) != isinstance(want, bool) or not isinstance(value, kind):
            why = f"{name}={value!r} (expected {kind.__name__})"
            break
        lo, hi = (bounds or {}).get(name, (1, _INT_RANGE[1] - 1))
        if isinstance(value, int) and not isinstance(value, bool) and not lo <= value <= hi:
            why = f"{name}={value} (expected [{lo}, {hi}])"
            break
    if why is None:
        try:
            return cls(**fields)
        except (TypeError, ValueError) as e:
            why = f"a {cls.__qualname__} it rejects ({e})"
    _warn_once(cache_path(), why)
    return None


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
    with contextlib.suppress(OSError, ValueError):
        record(key, best, best_t, timings)
    return best
