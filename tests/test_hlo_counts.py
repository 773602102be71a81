"""The compiled plain-CE programs keep their passes over the logits (jaxent.bench.hlo).

Counts of the optimized HLO are deterministic where times are not: a new pass, a lost
fusion, a second ``exp`` per logit or a logits-sized temporary changes them. The programs
are only compiled (abstract inputs), so the benchmark's own shape costs no memory.
"""

import jax
import jax.numpy as jnp
import pytest

from jaxent.bench import hlo

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the expected counts are XLA:CPU's")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["value", "value_and_grad"])
def test_plain_ce_counts(dtype, mode):
    n, c = hlo.SHAPE
    got = hlo.counts(hlo.plain_ce(mode, n, c, dtype))
    want = hlo.EXPECTED[(dtype, mode)]
    assert {k: got[k] for k in want} == want, got
    assert got["bytes_written"] == got["writes"] * n * c * jnp.dtype(dtype).itemsize
    assert got["temp_bytes"] < 1 << 20  # no logits-sized temporary


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_small_shape_has_the_same_passes(dtype):
    """The passes hold at any N (only the [N]-sized bookkeeping's fusions vary)."""
    got = hlo.counts(hlo.plain_ce("value_and_grad", 64, 512, dtype))
    want = hlo.EXPECTED[(dtype, "value_and_grad")]
    assert {k: got[k] for k in ("passes", "picks", "writes", "exps")} == {
        k: want[k] for k in ("passes", "picks", "writes", "exps")}


def test_counts_of_known_programs():
    """The counter itself, on programs whose passes are known by construction."""
    x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
    y = jax.ShapeDtypeStruct((64,), jnp.int32)

    def compiled(fn):
        return jax.jit(fn).lower(x, y).compile()

    fresh_exp = hlo.counts(compiled(lambda x, y: jnp.exp(x)))
    assert (fresh_exp["passes"], fresh_exp["writes"], fresh_exp["exps"]) == (1, 1, 1)
    assert fresh_exp["bytes_written"] == 64 * 512 * 4
    two = hlo.counts(compiled(
        lambda x, y: (x.max(1), jnp.exp(x).sum(1), x[jnp.arange(64), y])))
    assert (two["passes"], two["picks"], two["writes"], two["exps"]) == (2, 1, 0, 1)


def test_hlo_suite_prints_the_counts(capsys):
    from jaxent.bench import cli

    cli.run(["--suite", "hlo", "64", "512"])
    out = capsys.readouterr().out
    assert "| float32 value_and_grad | 4 / 2 / 1 / " in out
    assert "| bfloat16 value_and_grad | 3 / 1 / 2 / " in out
    assert "(at SHAPE only)" in out  # expected counts are given at hlo.SHAPE only


@pytest.mark.parametrize("name, want", [
    ("grad_fwd_ord", (4, 2, 1)),      # max, exp written, its sum, the gradient over it
    ("label_shift", (3, 2, 1)),       # no max pass: the label's logit is the shift
    ("label_shift_lse", (2, 1, 2)),   # fused sum(exp), then the gradient with its own exp
])
def test_recorded_formulations_keep_their_passes(name, want):
    """The programs benchmarks/FINDINGS.md compares (issue 26): (passes, writes, exps)."""
    from jaxent.bench import formulations

    got = hlo.counts(hlo.plain_ce("value_and_grad", 64, 512, "float32",
                                  formulations.FORMS[name]))
    assert (got["passes"], got["writes"], got["exps"]) == want, got
