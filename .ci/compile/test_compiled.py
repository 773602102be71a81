"""Every public loss and fused head compiled for TPUs and GPUs with no device (the CI job).

Run by ``.ci/compile/run`` in a virtual environment with the ``compile`` extra; the records
come from :mod:`jaxent.bench.compiled`, which also writes ``benchmarks/COMPILED.md``. What
does not hold yet is an ``xfail`` with its reason (strict: it fails once it holds).
"""

from __future__ import annotations

import math
import os

import pytest

from jaxent.bench import compiled, targets

KEYS = compiled.plan(os.environ.get("JAXENT_COMPILE_PROFILE", "ci"))
FUSED = ("linear_cross_entropy", *compiled.STAT_HEADS)
KERNELS = {
    ("cross_entropy", "value"): ["jaxent_ce_fwd"],
    ("cross_entropy", "grad"): ["jaxent_ce_bwd", "jaxent_ce_fwd"],
    # Every fused head runs the kernels built from its row statistic.
    **{(head, "value"): ["jaxent_stat_fwd"] for head in FUSED},
    **{(head, "grad"): ["jaxent_stat_dhidden", "jaxent_stat_dkernel", "jaxent_stat_fwd"]
       for head in FUSED},
    # Three passes (the row max and candidates, the nucleus's mass, the restricted sums).
    ("linear_support_log_probs", "value"): ["jaxent_stat_fwd"] * 3,
    ("linear_support_log_probs", "grad"): ["jaxent_stat_dhidden", "jaxent_stat_dkernel",
                                           *["jaxent_stat_fwd"] * 3],
}

def _keys(pred, xfail=lambda k: None):
    """The plan's keys that ``pred`` selects; ``xfail(key)``: why it is known to fail. Each
    chip's programs go to one xdist worker (``--dist loadgroup``), which compiles them once."""
    out = []
    for k in KEYS:
        if pred(k):
            marks = [pytest.mark.xdist_group(k.target)]
            if (why := xfail(k)) is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=why))
            out.append(pytest.param(k, id=str(k), marks=marks))
    return out


@pytest.fixture(scope="session", autouse=True)
def _configured():
    compiled.configure()


@pytest.mark.parametrize("key", _keys(lambda k: True))
def test_compiles(key):
    rec = compiled.get(key)
    if key.impl == "token" and key.head == "linear_cross_entropy":  # bf16: refused
        assert rec.error is not None and "`impl`='token' cannot serve" in rec.error
        return
    assert rec.ok, rec.error
    assert rec.temp_bytes is not None


@pytest.mark.parametrize("key", _keys(lambda k: k.impl == "pallas"))
def test_pallas_programs_hold_their_kernels(key):
    rec = compiled.get(key)
    assert rec.ok, rec.error
    expected = KERNELS[key.head, key.mode]
    if key.head == "linear_soft_cross_entropy" and key.mode == "grad" and \
            targets.CHIPS[key.target].platform == "tpu":
        # TPU kernels are read off the jaxpr, which still holds the targets' gradient
        # kernel that XLA drops (not asked for: three launches).
        expected = sorted([*expected, "jaxent_stat_dcols"])
    assert sorted(k.name for k in rec.kernels) == expected
    assert rec.launches is not None and rec.launches >= len(KERNELS[key.head, key.mode])


@pytest.mark.parametrize("key", _keys(
    lambda k: k.shape == "llama" and k.mode == "grad" and k.impl not in ("naive", "token")
    and any(j == k._replace(impl="naive") for j in KEYS)))
def test_fused_temporaries_at_most_3_percent_of_naive(key):
    rec = compiled.get(key)
    assert rec.fraction is not None and rec.fraction <= 0.03, rec.fraction


@pytest.mark.parametrize("key", _keys(
    lambda k: k.impl == "pallas" and k.mode == "grad" and k.shape in ("llama", "plain")))
def test_pallas_never_above_the_xla_walk(key):
    """Temporaries: a Pallas program may hold its per-row vectors (a few ``[N]`` float32
    arrays, padded to whole blocks) that XLA fuses away, nothing more."""
    walk = "vocab" if key.head.startswith("linear") else "xla"
    pallas, xla = compiled.get(key), compiled.get(key._replace(impl=walk))
    rows = 16 * 4 * compiled.SHAPES[key.shape][0]
    assert pallas.temp_bytes <= xla.temp_bytes + rows, (pallas.temp_bytes, xla.temp_bytes)


@pytest.mark.parametrize("key", _keys(
    lambda k: k.impl == "pallas" and targets.CHIPS[k.target].platform == "cuda"))
def test_no_register_spills(key):
    rec = compiled.get(key)
    assert rec.kernels
    for k in rec.kernels:
        assert k.registers is not None, f"no ptxas report for {k.name}"
        assert k.spill_bytes == 0, (k.name, k.spill_bytes)


@pytest.mark.parametrize("key", _keys(
    lambda k: k.impl == "pallas" and k.shape in ("llama", "plain")))
def test_grids_fill_the_chip(key):
    """Every kernel launches at least one program per SM (GPU) or TensorCore (TPU; the
    first, parallel, grid axis)."""
    chip = targets.CHIPS[key.target]
    for k in compiled.get(key).kernels:
        programs = math.prod(k.grid) if chip.platform == "cuda" else k.grid[0]
        assert programs >= chip.cores, (k.name, k.grid, chip.cores)


@pytest.mark.parametrize("key", _keys(lambda k: k.impl == "pallas"))
def test_kernels_carry_cost_estimates(key):
    """Every pallas_call states its cost."""
    rec = compiled.get(key)
    assert rec.kernels
    assert all(k.cost_flops for k in rec.kernels), [(k.name, k.cost_flops) for k in rec.kernels]


# Two limitations of jax/jaxlib 0.10.2, neither jaxent's (benchmarks/compiled_notes.md, item 5):
# an executable compiled for a GPU from a topology (no device, so no local client) answers
# `UNIMPLEMENTED: GetCostAnalysis is not supported` for any program, a plain matmul too
# (openxla/xla xla/pjrt/se/stream_executor_executable.cc, StreamExecutorExecutable::
# GetCostAnalysis), and Lowered.cost_analysis() is None through the CUDA plugin's PJRT C API;
# and the Triton lowering discards the estimate (jax-ml/jax jax/_src/pallas/triton/
# pallas_call_registration.py: `del interpret, out_avals, cost_estimate, name`), so even a
# device executable would count the kernels as free. The estimates are on every pallas_call
# (test_kernels_carry_cost_estimates).
GPU_NO_COST = ("GPU cost_analysis() of a compile-only executable is UNIMPLEMENTED in XLA's "
               "PJRT StreamExecutorExecutable, and the Triton lowering drops cost_estimate")


@pytest.mark.parametrize("key", _keys(lambda k: k.impl == "pallas", lambda k: (
    GPU_NO_COST if targets.CHIPS[k.target].platform == "cuda" else None)))
def test_cost_analysis_counts_the_kernels(key):
    """XLA's cost_analysis of a pallas program counts its kernels: at least the logits
    matmul of the fused head, one flop per logit of plain CE."""
    rec = compiled.get(key)
    n, d, v = compiled.SHAPES[key.shape]
    floor = 2 * n * d * v if key.head.startswith("linear") else n * v
    assert rec.flops is not None and rec.flops >= floor, (rec.flops, floor)
