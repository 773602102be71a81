"""Strict JAX configuration for every test, and shared fixtures."""

import zlib

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

# Tolerances against float64 references, indexed by input dtype.
RTOL = {"float32": 2e-5, "bfloat16": 1e-2, "float16": 5e-3, "float64": 1e-10}


@pytest.fixture
def rng(request) -> np.random.Generator:
    """A generator seeded from the test's name: fresh draws per test, reproducible per run."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
