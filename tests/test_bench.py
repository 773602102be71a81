"""The benchmark harness on tiny shapes: every contender computes the right loss and gradient
(so the benchmark never times a wrong implementation) and the reports come out. No timing
assertions."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import bench
from tests import reference

TINY = [
    bench.Case(bench.CE, bench.FWD_BWD, "float32", 16, 50),
    bench.Case(bench.CE, bench.FWD_BWD, "bfloat16", 16, 50),
    bench.Case(bench.CE, bench.FWD, "float32", 8, 40),
    bench.Case(bench.LINEAR, bench.FWD_BWD, "float32", 8, 40, 16),
]
TOL = {"float32": 1e-4, "bfloat16": 2e-2}


def _rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """The inputs as the contenders see them (bf16-rounded), in float64."""
    return np.asarray(jnp.asarray(a).astype(dtype).astype(jnp.float32), np.float64)


def _reference(case: bench.Case, inputs: dict) -> tuple[float, list[np.ndarray]]:
    y = inputs["labels"]
    if case.kind == bench.CE:
        x = _rounded(inputs["logits"], case.dtype)
        loss = reference.cross_entropy(x, y)
        if case.mode == bench.FWD:
            return float(loss), []
        grads = [reference.grad64(lambda x: reference.cross_entropy(x, y, xp=jnp), x)]
        return float(loss), grads
    h, w = _rounded(inputs["hidden"], case.dtype), _rounded(inputs["kernel"], case.dtype)
    loss = reference.cross_entropy(h @ w, y)
    grads = reference.grad64(lambda h, w: reference.cross_entropy(h @ w, y, xp=jnp), h, w,
                             argnums=(0, 1))
    return float(loss), list(grads)


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_every_contender_matches_the_reference(case):
    contenders, _ = bench.default_contenders()
    inputs = bench.make_inputs(case)
    ref_loss, ref_grads = _reference(case, inputs)
    tol = TOL[case.dtype]
    checked = 0
    for con in contenders:
        runner = con.build(case, inputs)
        if runner is None:
            continue
        if runner.prepare:
            runner.prepare()
        out = runner.call()
        loss = float(np.asarray(out[0], np.float32))
        np.testing.assert_allclose(loss, ref_loss, rtol=tol, err_msg=con.name)
        grads = runner.grads(out)
        if case.mode == bench.FWD_BWD:
            assert grads is not None and len(grads) == len(ref_grads), con.name
            for g, r in zip(grads, ref_grads, strict=True):
                assert g.shape == r.shape, con.name
                np.testing.assert_allclose(g, r, atol=tol * np.abs(r).max(), err_msg=con.name)
        checked += 1
    assert checked >= 2


def test_check_agreement_rejects_a_wrong_loss():
    case = TINY[0]
    bench.check_agreement(case, {"a": 1.0, "b": 1.00001})
    with pytest.raises(AssertionError, match="disagrees"):
        bench.check_agreement(case, {"a": 1.0, "b": 1.1})


def test_suite_reports(tmp_path):
    contenders, notes = bench.default_contenders()
    suite = bench.run_suite(TINY[2:3], contenders, rounds=2, progress=False,
                             copy_bytes=2**20)
    names = {r.contender for r in suite["results"]}
    assert {"optax", "naive (log_softmax+take)"} <= names
    table = bench.to_markdown(suite)
    assert "| case | contender | median ms |" in table
    assert "CE fwd f32 8x40" in table
    data = json.loads(bench.to_json(suite))
    assert data["copy_bandwidth"]["reference"] > 0
    base = [r for r in data["results"] if r["contender"] == "optax"]
    assert base and base[0]["ratio"] == pytest.approx(1.0)
    assert base[0]["temp_bytes"] is not None
    bench.plot(suite, str(tmp_path / "bench.png"))
    assert (tmp_path / "bench.png").stat().st_size > 0
    text = bench.results_markdown(suite, ["--quick"], notes)
    assert "python -m jaxent.bench --quick" in text and "jax:" in text

    # The CLI re-reports a saved run, keeping a hand-written analysis in RESULTS.md.
    saved, results = tmp_path / "run.json", tmp_path / "RESULTS.md"
    saved.write_text(bench.to_json(suite))
    results.write_text("old table\n\n## Analysis\n\nwhy it is fast\n")
    bench.main(["--from-json", str(saved), "--write", str(results), "--no-progress"])
    written = results.read_text()
    assert "| optax |" in written and written.endswith("## Analysis\n\nwhy it is fast\n")
    assert "old table" not in written


def test_default_cases_cover_the_issue():
    names = [c.name for c in bench.default_cases()]
    for shape in ("8192x1000", "4096x32000", "2048x128256", "65536x10"):
        for mode in ("fwd ", "fwd+bwd"):
            assert any(shape in n and mode in n and "f32" in n for n in names)
            assert any(shape in n and mode in n and "bf16" in n for n in names)
    assert any("4096x1024x32000" in n for n in names)
    assert any("2048x2048x128256" in n for n in names)
