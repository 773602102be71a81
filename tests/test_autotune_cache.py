"""The autotune cache: schema, bounds, one warning for a bad file, no lost concurrent writes.

A bad cache must never break a Pallas call: each case below gives one warning and the
backend's default block ``Config`` (``jaxent.impl.pallas.config_for``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import jax.numpy as jnp
import pytest

import jaxent
from jaxent import _autotune
from jaxent.impl import pallas

SHAPE = (64, 32, 256)  # n, d, v


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "autotune.json"
    monkeypatch.setenv(_autotune.ENV_CACHE, str(path))
    _autotune._warned.clear()
    return path


def _full_key() -> str:
    key = jaxent.autotune_key("pallas-linear", jnp.float32, n=SHAPE[0], d=SHAPE[1], v=SHAPE[2])
    return f"{_autotune.device_kind()}|{key}"


def _entry(choice) -> str:
    return json.dumps({_full_key(): {"choice": choice, "seconds": 0.1, "timings": {}}})


def _config(fields) -> dict:
    return {"type": "Config", "fields": fields}


BAD = {
    "deeply-nested": "[" * 100_000 + "]" * 100_000,
    "not-json": "{not json",
    "top-level-list": "[1, 2, 3]",
    "foreign-object": json.dumps({"hello": "world"}),
    "missing-fields": _entry({"type": "Config"}),
    "block_n-2**70": _entry(_config({"block_n": 2**70})),
    "block_n-2**20": _entry(_config({"block_n": 2**20})),
    "d_split-1.5": _entry(_config({"d_split": 1.5})),
    "block_n-true": _entry(_config({"block_n": True})),
    "block_n-string": _entry(_config({"block_n": "64"})),
    "unknown-field": _entry(_config({"block_x": 64})),
    "rejected-by-config": _entry(_config({"block_n": 48})),  # not a power of two
    "seconds-nan": json.dumps({_full_key(): {"choice": 1, "seconds": float("nan"),
                                             "timings": {}}}),
    "binary": "\xff\xfe\x00garbage",
}


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_cache_gives_one_warning_and_the_default(cache, name, platform):
    cache.write_bytes(BAD[name].encode("utf-8", "surrogateescape"))
    default = pallas.default_config(*SHAPE, jnp.float32, platform)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [pallas.config_for(*SHAPE, jnp.float32, platform) for _ in range(3)]
    assert got == [default] * 3
    ours = [w for w in caught if "autotune cache" in str(w.message)]
    # A choice of the other backend's Config type is not this backend's: one warning too.
    assert len(ours) == 1, [str(w.message) for w in caught]


def test_a_valid_cached_config_is_used(cache):
    cache.write_text(_entry(_config({"block_n": 32, "block_v": 64})))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = pallas.config_for(*SHAPE, jnp.float32, "cuda")
    assert (got.block_n, got.block_v) == (32, 64)


def test_winners_that_do_not_fit_the_schema_are_not_written(cache):
    with pytest.raises(ValueError, match="schema"):
        _autotune.record("k", 2**70, 0.1, {})
    assert not cache.exists()


_WRITER = """
import sys
import jaxent
proc = int(sys.argv[1])
for i in range(100):
    key = f"writer{proc}-{i}"
    assert jaxent.autotune(lambda c: (lambda: c), [i], (), key, reps=1) == i
"""


def test_concurrent_writers_lose_nothing(cache):
    """4 processes x 100 autotune runs, each its own key: all 400 entries remain."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(p)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for p in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    data = json.loads(cache.read_text())
    keys = {k.split("|", 1)[1] for k in data}
    assert keys == {f"writer{p}-{i}" for p in range(4) for i in range(100)}
    assert all(v["choice"] == int(k.rsplit("-", 1)[1]) for k, v in
               ((k.split("|", 1)[1], v) for k, v in data.items()))
    assert not list(cache.parent.glob("*.tmp"))
