"""The registry of implementations: its entries run, an explicit ``impl`` is honoured (the
compiled programs differ) or refused by name."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from jaxent.impl import REGISTRY, implementation

H = jax.ShapeDtypeStruct((32, 16), jnp.float32)
K = jax.ShapeDtypeStruct((16, 96), jnp.float32)
Y = jax.ShapeDtypeStruct((32,), jnp.int32)


def _lowered(impl: str):
    def loss(h, k, y):
        return jaxent.linear_cross_entropy(h, k, y, impl=impl, block_size=32,
                                           token_block_size=16, interpret=True)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(H, K, Y)


def _program(impl: str) -> str:
    return _lowered(impl).as_text()


def _compiled(impl: str) -> str:
    return _lowered(impl).compile().as_text()


def test_entries_are_the_implementations():
    for (kind, name), entry in REGISTRY.items():
        assert entry.name == name and entry.kind == kind
        if kind in ("linear", "stat"):
            assert callable(implementation(kind, name).run)


def test_explicit_impls_compile_to_different_programs():
    programs = {impl: _program(impl) for impl in ("vocab", "token", "pallas")}
    for a, b in itertools.combinations(programs, 2):
        assert programs[a] != programs[b], (a, b)
    # "auto" chooses inside lax.platform_dependent: its lowering holds every platform's
    # choice, the compiled program only the CPU's, named by its scope.
    compiled = _compiled("auto")
    assert ("jaxent_vocab" in compiled) != ("jaxent_token" in compiled)


@pytest.mark.parametrize("impl", ["token", "pallas"])
def test_rl_heads_run_token_and_pallas(impl):
    """The RL heads serve every impl (``tests/test_conformance_heads.py`` checks their
    numbers); compiled Pallas kernels need a GPU or TPU, so on the CPU without
    ``interpret=True`` they raise its hint."""
    h = jnp.linspace(-1.0, 1.0, 32).reshape(4, 8)
    k = jnp.cos(jnp.arange(80.0)).reshape(8, 10)
    y = jnp.array([0, 3, 9, 4])
    if impl == "pallas":
        with pytest.raises(ValueError, match="interpret=True"):
            jaxent.linear_log_probs(h, k, y, impl=impl)
        with pytest.raises(ValueError, match="interpret=True"):
            jaxent.linear_distillation_loss(h, k, h, k, impl=impl)
        return
    np.testing.assert_allclose(jaxent.linear_log_probs(h, k, y, impl=impl),
                               jaxent.linear_log_probs(h, k, y, impl="vocab"), rtol=1e-6)
    np.testing.assert_allclose(jaxent.linear_distillation_loss(h, k, -h, k, impl=impl),
                               jaxent.linear_distillation_loss(h, k, -h, k, impl="vocab"),
                               rtol=1e-6)


def test_auto_reads_the_registry_preferences():
    """"auto" picks by the entries' per-platform preferences (rank, max_classes): on the CPU
    the token walk up to 64K classes and the vocabulary walk above; on the TPU the
    vocabulary walk; an entry registered with a better rank is picked."""
    from jaxent import _platform
    from jaxent.impl import Implementation, Preference, Request, register, select

    def req(v):
        return Request("linear", jnp.float32, "mean", num_classes=v)

    with _platform.traced_for("cpu"):
        assert (select("auto", req(1000)), select("auto", req(128256))) == ("token", "vocab")
    with _platform.traced_for("tpu"):
        assert select("auto", req(1000)) == "vocab"
    register(Implementation("mine", "linear", True, lambda r: None,
                            implementation("linear", "vocab").run,
                            prefer={"cpu": Preference(-1, 2000)}))
    try:
        with _platform.traced_for("cpu"):
            assert select("xla", req(1000)) == "mine"
            assert select("auto", req(4000)) == "token"
        with _platform.traced_for("tpu"):
            assert select("auto", req(1000)) == "vocab"
    finally:
        del REGISTRY["linear", "mine"]
