"""The benchmark harness on tiny shapes: every contender computes the right loss and gradient
(so the benchmark never times a wrong implementation), the reports come out with their spread
and warnings, a missing optional package gives one line naming the extra, and every suite and
the GPU script's dry run work on the CPU. No timing assertions."""

import json
import os
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from jaxent import bench
from jaxent.bench import cli, contenders, deps, measure, report, suites
from tests import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    bench.Case(bench.CE, bench.FWD_BWD, "float32", 16, 50),
    bench.Case(bench.CE, bench.FWD_BWD, "bfloat16", 16, 50),
    bench.Case(bench.CE, bench.FWD, "float32", 8, 40),
    bench.Case(bench.LINEAR, bench.FWD_BWD, "float32", 8, 40, 16),
    bench.Case(bench.LINEAR, bench.FWD_BWD, "bfloat16", 8, 40, 16),
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


def _check_against_reference(cons: list, case: bench.Case) -> int:
    inputs = bench.make_inputs(case)
    ref_loss, ref_grads = _reference(case, inputs)
    tol = TOL[case.dtype]
    checked = 0
    for con in cons:
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
    return checked


@pytest.mark.parametrize("case", TINY, ids=lambda c: c.name)
def test_every_contender_matches_the_reference(case):
    # The CPU suite's contenders and the GPU suite's JAX ones (jaxent's explicit walks).
    cpu, _ = bench.default_contenders()
    gpu, _ = bench.default_contenders(gpu=True, cuda=False)
    names = {c.name for c in cpu}
    assert _check_against_reference(cpu + [c for c in gpu if c.name not in names], case) >= 2


def test_gpu_suite_contenders_include_jaxent_walks():
    cons, notes = bench.default_contenders(gpu=True, cuda=False)
    names = {c.name for c in cons}
    assert {'jaxent impl="vocab"', "naive (materialized logits)", "optax"} <= names
    assert any("CUDA only" in n for n in notes)
    # The GPU suite is bf16: the token walk refuses it, and the note says why.
    assert any('impl="token": skipped' in n and "float32" in n for n in notes), notes


def _fake_tokamax(calls: list) -> types.ModuleType:
    """tokamax's public call, ``linear_softmax_cross_entropy_loss(x, labels, weights, *,
    reduction, implementation)``, as an old release without ``chunked_xla``."""
    import jax

    def loss(x, labels, weights, *, reduction="sum", implementation=None):
        calls.append((x.shape, labels.shape, weights.shape, reduction, implementation))
        if implementation not in ("xla",):
            raise ValueError(f"Unsupported implementation: {implementation}")
        logp = jax.nn.log_softmax(jnp.dot(x, weights, preferred_element_type=jnp.float32))
        per_row = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        return per_row.mean() if reduction == "mean" else per_row.sum()

    mod = types.ModuleType("tokamax")
    mod.linear_softmax_cross_entropy_loss = loss
    return mod


def test_tokamax_contenders_follow_its_api(monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "tokamax", _fake_tokamax(calls))
    cons, notes = contenders.tokamax_contenders()
    assert [c.name for c in cons] == ["tokamax xla"]
    assert len(notes) == 1 and "chunked_xla" in notes[0] and "Unsupported" in notes[0]
    case = TINY[3]
    assert _check_against_reference(cons, case) == 1
    assert (case.n, case.d) in [c[0] for c in calls]  # x first, then labels, then [D, V]
    assert all(c[3] == "mean" for c in calls)


def _kl_reference(inputs: dict, dtype: str) -> float:
    h, w = _rounded(inputs["hidden"], dtype), _rounded(inputs["kernel"], dtype)
    th, tw = _rounded(inputs["teacher_hidden"], dtype), _rounded(inputs["teacher_kernel"], dtype)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    logp, logq = log_softmax(h @ w), log_softmax(th @ tw)
    return float(np.mean(np.sum(np.exp(logq) * (logq - logp), -1)))


def test_distillation_contenders_when_jaxent_has_them(monkeypatch):
    import jaxent

    case = bench.Case(bench.DISTILL, bench.FWD_BWD, "float32", 8, 40, 16)
    assert case.flops() == 8 * 8 * 16 * 40 and case.n_diff == 2
    monkeypatch.delattr(jaxent, "linear_distillation_loss", raising=False)
    assert not any(c.kind == bench.DISTILL for c in suites.suite_cases("main", True, False, ""))
    monkeypatch.setattr(jaxent, "linear_distillation_loss",
                        lambda h, w, th, tw: contenders.naive_distill(h, w, th, tw, None),
                        raising=False)
    assert any(c.kind == bench.DISTILL for c in suites.suite_cases("main", True, False, ""))
    assert any(c.kind == bench.DISTILL for c in suites.suite_cases("gpu", False, True, ""))
    cons, _ = bench.default_contenders()
    inputs = bench.make_inputs(case)
    want = _kl_reference(inputs, case.dtype)
    built = {c.name: c.build(case, inputs) for c in cons}
    built = {k: r for k, r in built.items() if r is not None}
    assert set(built) == {"naive KL (materialized logits)", "jaxent linear_distillation_loss"}
    for name, runner in built.items():
        loss, grads = runner.call()
        np.testing.assert_allclose(float(loss), want, rtol=1e-4, err_msg=name)
        assert [g.shape for g in grads] == [(8, 16), (16, 40)]  # the student's only
    results = bench.run_case(case, cons, rounds=1, copy_gbps=None, settle_s=0.0)
    assert results[0].contender == "naive KL (materialized logits)" and results[0].ratio == 1.0


def test_check_agreement_rejects_a_wrong_loss():
    case = TINY[0]
    bench.check_agreement(case, {"a": 1.0, "b": 1.00001})
    with pytest.raises(AssertionError, match="disagrees"):
        bench.check_agreement(case, {"a": 1.0, "b": 1.1})


def test_a_wrong_contender_is_not_timed():
    case = TINY[2]
    cons, _ = bench.default_contenders()
    wrong = contenders.Contender("wrong", contenders.for_kind(
        bench.CE, lambda x, y: contenders.optax_loss(x, y) + 1.0))
    notes = []
    results = bench.run_case(case, [cons[0], wrong], rounds=1, copy_gbps=None, notes=notes,
                             settle_s=0.0)
    assert [r.contender for r in results] == ["optax"]
    assert any(n.startswith("NOT TIMED") and "wrong" in n for n in notes)


def test_flop_and_byte_formulas():
    assert bench.matmul_flops(4096, 4096, 32000) == 2 * 4096 * 4096 * 32000
    assert bench.linear_flops(16, 8, 100, "fwd") == 2 * 16 * 8 * 100
    assert bench.linear_flops(16, 8, 100, "fwd+bwd") == 6 * 16 * 8 * 100
    case = bench.Case(bench.LINEAR, bench.FWD_BWD, "bfloat16", 16384, 128256, 4096)
    assert case.flops() == 6 * 16384 * 4096 * 128256
    ce = bench.Case(bench.CE, bench.FWD_BWD, "bfloat16", 8192, 128256)
    assert ce.min_bytes() == 2 * 8192 * 128256 * 2 + 8192 * 4 and ce.flops() == 0


def test_default_cases_cover_the_issue():
    names = [c.name for c in bench.default_cases()]
    for shape in ("8192x1000", "4096x32000", "2048x128256", "65536x10"):
        for mode in ("fwd ", "fwd+bwd"):
            assert any(shape in n and mode in n and "f32" in n for n in names)
            assert any(shape in n and mode in n and "bf16" in n for n in names)
    assert any("4096x1024x32000" in n for n in names)
    assert any("2048x2048x128256" in n for n in names)


def test_gpu_cases_cover_the_issue():
    full = bench.gpu_cases()
    names = [c.name for c in full]
    for shape in ("4096x4096x32000", "16384x4096x128256", "16384x2560x262144"):
        assert f"linear CE fwd+bwd bf16 {shape}" in names
    assert "CE fwd+bwd bf16 8192x128256" in names
    assert all(c.dtype == "bfloat16" and c.mode == bench.FWD_BWD for c in full)
    quick = bench.gpu_cases(quick=True)
    assert set(quick) < set(full) and "CE fwd+bwd bf16 8192x128256" in [c.name for c in quick]
    assert all(c.n * c.c <= 2**16 for c in bench.gpu_cases(tiny=True))


def _result(name: str, times: list[float], case: str = "CE fwd f32 8x40") -> measure.Result:
    return measure.Result(case=case, contender=name, median_s=float(np.median(times)),
                          min_s=min(times), max_s=max(times), times_s=times, ratio=1.0,
                          gbps=None, copy_fraction=None, gflops=None, temp_bytes=None,
                          loss=1.0, c=40, kind="ce", mode="fwd", dtype="float32")


def test_spread_and_busy_warnings():
    steady = _result("steady", [0.100, 0.101, 0.102])
    noisy = _result("noisy", [0.100, 0.150, 0.210])
    assert measure.spread([0.1, 0.2]) == 2.0 and steady.spread == pytest.approx(1.02)
    assert bench.busy_warnings([steady], 0.5, 0.7, cores=2) == []
    [w] = bench.busy_warnings([steady, noisy], 0.5, 0.7, cores=2)
    assert "1 of 2 rows varied by more than 1.3x" in w and "noisy on CE fwd f32 8x40 (2.10x)" in w
    [w] = bench.busy_warnings([steady], 0.5, 9.0, cores=2)
    assert "busy" in w and "9.0 at the end" in w and "2 cores" in w
    assert len(bench.busy_warnings([noisy], 3.0, 0.1, cores=2)) == 2


def test_table_shows_spread_baselines_and_warning():
    suite = {"copy_bandwidth": {"jax_inplace": 10.0, "reference": 10.0},
             "load": {"start": 8.0, "end": 1.0, "cores": 2},
             "results": [_result("optax", [0.010, 0.011, 0.015])]}
    text = bench.to_markdown(suite)
    assert "| median ms | min–max ms |" in text and "| 11.0 | 10.0–15.0 |" in text
    assert "optax" in text.split("|")[0] and "naive materialized XLA path" in text
    assert "min / median / max over 3 interleaved calls" in text
    assert text.count("WARNING: the machine was busy") == 2  # above and below the table
    gpu_row = measure.Result(case="linear CE fwd+bwd bf16 4x2x8", contender="x", median_s=1.0,
                             min_s=1.0, ratio=None, gbps=None, copy_fraction=None,
                             gflops=5e5, matmul_fraction=0.5, temp_bytes=None,
                             peak_bytes=3 * 2**20, loss=1.0, c=8, kind="linear",
                             mode="fwd+bwd", dtype="bfloat16")
    line = report.table([gpu_row])
    assert "TFLOP/s" in line[0] and "| 500.0 | 50 | — | 3.0 |" in line[2]


def test_suite_reports(tmp_path):
    contenders_, notes = bench.default_contenders()
    suite = bench.run_suite(TINY[2:3], contenders_, rounds=2, progress=False,
                            copy_bytes=2**20)
    names = {r.contender for r in suite["results"]}
    assert {"optax", "naive (log_softmax+take)"} <= names
    table = bench.to_markdown(suite)
    assert "| case | contender | median ms | min–max ms |" in table
    assert "CE fwd f32 8x40" in table and "Load average" in table
    data = json.loads(bench.to_json(suite))
    assert data["copy_bandwidth"]["reference"] > 0
    base = [r for r in data["results"] if r["contender"] == "optax"]
    assert base and base[0]["ratio"] == pytest.approx(1.0)
    assert base[0]["temp_bytes"] is not None and len(base[0]["times_s"]) == 2
    assert base[0]["min_s"] <= base[0]["median_s"] <= base[0]["max_s"]
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


def test_saved_runs_of_the_old_harness_still_load():
    path = os.path.join(ROOT, "benchmarks", "runs", "2026-12-01-ce.json")
    suite, notes = bench.load_json([path])
    assert suite["results"] and suite["results"][0].max_s is None
    assert "| 5.6–? |" in bench.to_markdown(suite)  # no max recorded then


def test_plot_legend_covers_every_line(tmp_path, monkeypatch):
    import matplotlib.figure

    seen = {}
    orig = matplotlib.figure.Figure.legend

    def spy(self, handles, labels, **kw):
        seen["labels"] = list(labels)
        return orig(self, handles, labels, **kw)

    monkeypatch.setattr(matplotlib.figure.Figure, "legend", spy)
    rows = []
    for name, temp in (("optax", 2**20), ("jaxent", 10), ("torch (cpu)", None)):
        for n, c in ((64, 10), (8, 1000)):
            r = _result(name, [0.1, 0.1], case=f"CE fwd+bwd f32 {n}x{c}")
            r.mode, r.c, r.n, r.temp_bytes = bench.FWD_BWD, c, n, temp
            rows.append(r)
    bench.plot({"results": rows}, str(tmp_path / "p.png"))
    assert seen["labels"] == ["optax f32", "jaxent f32", "torch (cpu) f32"]


def test_missing_bench_extra_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optax", None)  # import optax -> ImportError
    with pytest.raises(bench.MissingExtra, match=r'pip install "jaxent\[bench\]"'):
        bench.main(["--quick", "--only", "CE fwd f32 2048x1000$", "--no-progress"])
    monkeypatch.setattr(sys, "argv", ["python -m jaxent.bench", "--quick", "--no-progress"])
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "optax" in err[0] and 'pip install "jaxent[bench]"' in err[0]


def test_missing_torch_and_tqdm_are_skipped(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    cons, notes = bench.default_contenders()
    assert not any(c.family == "torch" for c in cons)
    assert any(n.startswith("torch: skipped") and "jaxent[bench]" in n for n in notes)
    suite = bench.run_suite(TINY[2:3], cons, rounds=1, progress=True, copy_bytes=2**20)
    assert suite["results"] and "no progress bar (tqdm" in capsys.readouterr().err
    with pytest.raises(bench.MissingExtra, match="matplotlib"):
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        report.plot(suite, "unused.png")


def test_optional_import_reports_why():
    mod, why = deps.optional("no_such_module_here")
    assert mod is None and why.startswith("ModuleNotFoundError")
    assert deps.optional("json")[0] is json


def test_list_and_tiny_gpu_suite_run_on_the_cpu(capsys):
    listed = bench.main(["--gpu", "--list"])
    assert "linear CE fwd+bwd bf16 16384x2560x262144" in listed["cases"]
    assert 'jaxent impl="vocab"' in listed["contenders"]
    suite = bench.main(["--suite", "gpu", "--tiny", "--rounds", "1", "--no-progress"])
    linear = [r for r in suite["results"] if r.kind == bench.LINEAR]
    assert linear and all(r.matmul_fraction and r.gflops for r in linear)
    assert all(r.peak_bytes is not None for r in linear if "torch" not in r.contender)
    assert "Matmul ceiling measured in this run" in capsys.readouterr().out


def test_other_suites(capsys):
    mem = bench.main(["--suite", "linear-memory", "32", "16", "256"])
    assert {r["dtype"] for r in mem["rows"]} == {"float32", "bfloat16"}
    assert mem["rows"][0]["of_naive"] == 1.0
    rl = bench.main(["--suite", "rl-memory", "2048", "16", "32768"])  # 16 blocks of 2048
    assert [r["loss"] for r in rl["rows"]] == [
        "linear_log_probs(entropy)", "linear_distillation_loss(kl)",
        "linear_distillation_loss(reverse_kl)", "linear_distillation_loss(jsd)"]
    assert all(r["of_naive"] == r["fused_bytes"] / r["naive_bytes"] < 0.25 for r in rl["rows"])
    speed = bench.main(["--suite", "linear-speed", "32", "16", "256", "--rounds", "1",
                        "--contenders", "naive,ours:impl=vocab:block_size=128"])
    assert [r.ratio for r in speed["results"]][0] == 1.0
    assert speed["results"][1].contender == "jaxent impl='vocab' block_size=128"
    mm = bench.main(["--suite", "matmul", "32", "16", "512", "8", "128", "--rounds", "1"])
    assert len(mm["rows"]) >= 6
    ex = bench.main(["--suite", "explore-ce", "16", "50", "float32", "optax", "grad_fwd",
                     "fwd:optax", "grad_fwd_donate", "--rounds", "1"])
    assert {r.contender for r in ex["results"]} == {"optax", "grad_fwd", "fwd:optax",
                                                    "grad_fwd_donate"}
    with pytest.raises(SystemExit, match="unknown formulation"):
        bench.main(["--suite", "explore-ce", "16", "50", "float32", "nope"])
    capsys.readouterr()


def test_formulations_handle_per_row_cotangents():
    from jaxent.bench import formulations

    formulations.check_per_row(n=8, c=40)


def test_gpu_script_dry_run():
    out = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh"),
                          "--dry-run"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dry run: ok" in out.stdout
    assert "suite gpu:" in out.stdout  # the --list of the GPU suite ran


def test_tpu_suite_on_the_cpu_writes_json_its_script_accepts(capsys, tmp_path):
    """The TPU suite (benchmarks/tpu/run.sh) at tiny shapes: Llama-3-8B's head first, every
    fused head against naive XLA, no torch; its JSON passes the script's own check, which
    does fail on a run that lost its baseline or a jaxent impl."""
    import importlib.util

    listed = bench.main(["--tpu", "--list"])
    assert listed["cases"][0] == "linear CE fwd+bwd bf16 16384x4096x128256"
    assert "naive (materialized logits)" in listed["contenders"]
    assert not any("torch" in c for c in listed["contenders"])
    capsys.readouterr()
    bench.main(["--suite", "tpu", "--tiny", "--rounds", "1", "--no-progress", "--json"])
    data = json.loads(capsys.readouterr().out)
    spec = importlib.util.spec_from_file_location(
        "tpu_check", os.path.join(ROOT, "benchmarks", "tpu", "check.py"))
    assert spec is not None and spec.loader is not None
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    assert {r["kind"] for r in data["results"]} == {"linear", "ce", "distill"}
    assert check.problems(data, on_device=False) == []
    assert check.problems(data, on_device=True)  # no roofline on the CPU
    lost = {**data, "notes": [], "results": [r for r in data["results"]
                                            if r["contender"] != "naive (materialized logits)"]}
    assert any("baseline" in p for p in check.problems(lost, on_device=False))
    assert any('impl="pallas"' in p for p in check.problems(lost, on_device=False))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(data))
    assert check.main([str(path)]) == 0
    script = os.path.join(ROOT, "benchmarks", "tpu", "run.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_suites_registry_matches_the_cli():
    assert set(suites.SUITES) == set(cli.SUITE_NAMES)


def test_roofline_fraction_on_a_known_chip():
    """On an H100 the floor of Llama-3-8B's head is its 6 N D V flops at 989.4 TFLOP/s
    (compute bound); a measurement's row then shows its fraction; elsewhere there is none."""
    from jaxent.bench import targets

    case = bench.Case(bench.LINEAR, bench.FWD_BWD, "bfloat16", 16384, 128256, 4096)
    h100 = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    floor = measure.roofline_floor(case, h100)
    assert floor == pytest.approx(6 * 16384 * 4096 * 128256 / 989.4e12)
    assert floor == pytest.approx(targets.roofline(targets.CHIPS["h100"], 16384, 4096,
                                                   128256).floor_s)
    assert measure.roofline_floor(case, types.SimpleNamespace(device_kind="cpu")) is None
    ce = bench.Case(bench.CE, bench.FWD_BWD, "bfloat16", 8192, 128256)  # memory bound
    assert measure.roofline_floor(ce, types.SimpleNamespace(device_kind="TPU v6 lite")) == \
        pytest.approx(ce.min_bytes() / 1640e9)
    row = measure.Result(case="c", contender="x", median_s=2 * floor, min_s=floor, ratio=None,
                         gbps=None, copy_fraction=None, gflops=None, temp_bytes=None,
                         loss=1.0, c=8, kind="linear", mode="fwd+bwd", dtype="bfloat16",
                         roofline_fraction=0.5)
    lines = report.table([row])
    assert lines[0].endswith("% roofline |") and lines[2].endswith(" 50 |")


# ------------------------------------------------- bad command lines: one line, non-zero exit
def _saved_run_files(tmp_path):
    """Files that are not saved ``--json`` runs, each for a different reason."""
    files = {"missing": tmp_path / "missing.json", "folder": tmp_path}
    for name, text in {"not JSON": "not json", "a list": "[1, 2]",
                       "no results": '{"notes": []}',
                       "foreign rows": '{"results": [{"bogus": 1}]}',
                       "too deep": "[" * 100_000 + "]" * 100_000}.items():
        files[name] = tmp_path / f"{name.replace(' ', '_')}.json"
        files[name].write_text(text)
    return files


def test_bad_from_json_names_the_file(tmp_path):
    for why, path in _saved_run_files(tmp_path).items():
        with pytest.raises(SystemExit) as exc:
            bench.main(["--from-json", str(path)])
        message = str(exc.value.code)
        assert message.startswith(f"--from-json {path}: not a readable saved run"), (why, message)


@pytest.mark.parametrize("argv, expected", [
    (["--only", "["], "argument --only: not a regular expression: '['"),
    (["--rounds", "-1"], "argument --rounds: expected an integer >= 1, got -1"),
    (["--rounds", "0"], "argument --rounds: expected an integer >= 1, got 0"),
    (["--rounds", "two"], "argument --rounds: expected an integer >= 1, got 'two'"),
    (["--suite", "explore-ce", "16", "50", "float33"],
     "DTYPE (the third argument) must be one of float32, bfloat16, got 'float33'"),
])
def test_bad_arguments_are_usage_errors(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2  # argparse's usage error, before anything runs
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_requested_contender_that_is_missing_stops_the_run(monkeypatch):
    monkeypatch.setitem(sys.modules, "jax_cce", None)  # import jax_cce -> ImportError
    with pytest.raises(bench.MissingExtra, match=r"--contenders cce needs `jax_cce`"):
        bench.main(["--suite", "linear-speed", "8", "4", "16", "--contenders", "naive,cce"])


def test_a_jaxent_that_is_not_the_package_stops_the_bench(monkeypatch, tmp_path):
    # From a clone's parent directory, ``import jaxent`` finds the clone as an empty
    # namespace package (a folder without __init__.py): the bench must not run without it.
    clone = types.ModuleType("jaxent")
    clone.__path__ = [str(tmp_path / "jaxent")]
    monkeypatch.setitem(sys.modules, "jaxent", clone)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--list"])
    message = str(exc.value.code)
    assert "not the jaxent package" in message and str(tmp_path / "jaxent") in message


@pytest.mark.parametrize("spec, expected", [
    ("missing.py:f", "expected NAME=TARGET:function"),
    ("x=missing_file_for_jaxent_test.py:f", "cannot load 'missing_file_for_jaxent_test.py'"),
    ("x=no_such_module_for_jaxent:f", "cannot load 'no_such_module_for_jaxent'"),
    ("x=os:no_such_function", "'os' has no function 'no_such_function'"),
])
def test_a_bad_extra_contender_is_one_line(spec, expected):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--extra", spec, "--only", "^$", "--no-progress"])
    message = str(exc.value.code)
    assert message.startswith(f"--extra {spec!r}") and expected in message, message


def test_compiled_table_says_when_ptxas_did_not_report():
    """A GPU kernel without ptxas's report is marked unknown, not shown as if it had no
    registers; TPU kernels have none to report."""
    from jaxent.bench import compiled  # noqa: PLC0415

    def row(target, registers):
        k = compiled.Kernel("jaxent_stat_fwd", (8, 16, 1), registers,
                            None if registers is None else 0)
        rec = compiled.Record(target, "linear_cross_entropy", "pallas", "grad",
                              (512, 256, 4096), temp_bytes=13 << 20, kernels=[k], launches=3)
        return compiled.table([rec]).splitlines()[-1]

    assert "stat_fwd 8x16x1 r150 s0 |" in row("h100", 150)
    assert "stat_fwd 8x16x1 r? s? (no ptxas report) |" in row("h100", None)
    assert "stat_fwd 8x16x1 |" in row("v5e", None)
