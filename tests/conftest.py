"""Strict JAX configuration for every test, and shared fixtures."""

import os
import zlib

# The suite compiles thousands of small programs and runs most of them once: XLA:CPU's LLVM
# optimization is most of that compile time and buys nothing here. The HLO programs, their
# fusions and buffer assignment (what the tests inspect) are the same at every LLVM level;
# users and the benchmarks keep XLA's default. Set before JAX starts its CPU client; the
# subprocesses of the suite inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# Tolerances against float64 references, indexed by input dtype.
RTOL = {"float32": 2e-5, "bfloat16": 1e-2, "float16": 5e-3, "float64": 1e-10}


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's name: fresh draws per test, reproducible per run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# Runs of a minute or more each (8 simulated devices, or two processes, in subprocesses of
# their own): collected first, and handed out two at a time, so that under `pytest -n 2`
# both workers start on them and the short tests fill in around them (xdist's default
# hands out consecutive chunks of about an eighth of the suite, which can queue several
# long runs behind each other on one worker).
_LONG_FIRST = ("tests/test_sharded.py::", "tests/test_multiprocess.py::")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(_LONG_FIRST))


def pytest_configure(config):
    if getattr(config.option, "maxschedchunk", 0) is None:
        config.option.maxschedchunk = 2
