"""The figures the docs quote from the examples and benchmarks, recomputed.

Only figures that do not drift are quoted as exact numbers and checked here: compiled
temporary memory (``memory_analysis()`` of a compiled program is deterministic for a JAX
version and a shape). Times and accuracies are quoted as dated measurements, not checked.
Each check reads the number from the sentence that quotes it, so a page edited without
rerunning the example fails here.
"""

from __future__ import annotations

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import pytest

import jaxent

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _quoted(path: str, pattern: str) -> tuple[float, ...]:
    text = " ".join((ROOT / path).read_text().split())
    m = re.search(pattern, text)
    assert m, f"{path} no longer quotes the figure /{pattern}/: update this test with it"
    return tuple(float(g) for g in m.groups())


def _temp_mib(fn, *shapes) -> float:
    compiled = jax.jit(jax.value_and_grad(fn)).lower(*shapes).compile()
    return compiled.memory_analysis().temp_size_in_bytes / 2**20


def test_tiny_lm_memory_figure_in_the_examples_page():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import tiny_lm
    finally:
        sys.path.remove(str(ROOT / "examples"))
    fused, naive = _quoted(
        "docs/examples.md", r"([\d.]+) MiB of compiled loss\+grad temporaries for the fused "
                            r"head against ([\d.]+) MiB for the naive one")
    batch, seq, width, vocab = (int(v) for v in _quoted(
        "docs/examples.md", r"at the default shapes \((\d+) x (\d+) tokens, width (\d+), "
                            r"vocabulary (\d+)\)"))
    source = (ROOT / "examples" / "tiny_lm.py").read_text()  # the page's defaults are the script's
    for flag, value in (("--batch-size", batch), ("--seq-len", seq), ("--d-model", width),
                        ("--vocab-size", vocab)):
        assert re.search(rf'"{flag}", type=int, default={value}\b', source), flag
    got = tiny_lm.loss_memory(batch * seq, width, vocab)
    assert round(got["fused_temp_mib"], 1) == fused
    assert round(got["naive_temp_mib"], 1) == naive


def test_readme_memory_figure_of_plain_cross_entropy():
    optax = pytest.importorskip("optax")
    jaxent_mib, optax_mib = _quoted(
        "README.md", r"Compiled temporaries of the same at bf16 4096 x 32000: under ([\d.]+) "
                     r"MiB for jaxent, ([\d.]+) MiB for optax")
    x = jax.ShapeDtypeStruct((4096, 32000), jnp.bfloat16)
    y = jax.ShapeDtypeStruct((4096,), jnp.int32)
    assert _temp_mib(lambda a, b: jaxent.cross_entropy(a, b), x, y) < jaxent_mib
    got = _temp_mib(lambda a, b: optax.softmax_cross_entropy_with_integer_labels(a, b).mean(),
                    x, y)
    assert round(got) == optax_mib
