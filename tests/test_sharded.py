"""The multi-device cases on 8 simulated CPU devices, each file in a subprocess of its own.

The device count is fixed when JAX starts (``XLA_FLAGS=--xla_force_host_platform_device_
count=8``), so these checks live in files that pytest does not collect here and run in a
fresh interpreter; the rest of the suite keeps its single device:

* ``tests/sharded_cases.py``: the vocabulary-parallel losses, every placement, export and
  the robustness checks on them;
* ``tests/sharded_layout_cases.py``: FSDP, two-axis token and padded-vocabulary shardings
  (its compiled-program checks, ``gathers``, a run of their own that the newest-JAX leg
  also runs; with ``tests/sharded_row_groups_cases.py``: the backward in row groups);
* ``tests/sharded_rl_cases.py``: the vocabulary-parallel RL and distillation losses;
* ``tests/sharded_reliability_cases.py``: overlapping axes, bad ids and second order;
* ``tests/sharded_engine_cases.py``: the RL heads on Explicit and Auto meshes (with
  ``return_aux``), the Auto-mesh ``impl`` refusals and per-row temperatures through the
  placements;
* ``tests/sharded_compact_cases.py``: ``shift=1`` on Explicit meshes, ``capacity``'s
  refusal on meshes and its use inside a caller's ``shard_map``.
* ``tests/sharded_support_cases.py``: the support-restricted log-probs (shard_map,
  Explicit meshes);
* ``tests/sharded_topk_cases.py``: the vocabulary-parallel top-k and sparse teacher;
* ``tests/sharded_conformance_cases.py``: the heads' conformance suite over placements x
  impls x dtypes x vocabularies.

A run is a file (or a few small ones) or, for the longest file, a ``-k`` selection, so that
no single run holds one ``pytest -n 2`` worker for much longer than the others.
"""


from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


# The tests of sharded_cases.py that the conformance and robustness suites bring in.
_ROBUST = ("value_and_vjp or 16bit or class_weights or far_below or narrow_label or "
           "tiny_temperatures")
RUNS = {
    "placements": (("sharded_cases.py",), f"not ({_ROBUST} or plain_jit)"),
    "plain_jit": (("sharded_cases.py",), "plain_jit"),
    "robustness": (("sharded_cases.py",), _ROBUST),
    "layouts": (("sharded_layout_cases.py", "sharded_row_groups_cases.py"), "not gathers"),
    "layout_hlo": (("sharded_layout_cases.py",), "gathers"),
    "reliability": (("sharded_reliability_cases.py",), None),
    "engine": (("sharded_engine_cases.py",), None),
    "topk": (("sharded_topk_cases.py",), None),
    "conformance": (("sharded_conformance_cases.py",), None),
    "rl_compact_support": (("sharded_rl_cases.py", "sharded_compact_cases.py",
                            "sharded_support_cases.py"), None),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_cases_on_8_cpu_devices(run):
    files, select = RUNS[run]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAXENT_SHARDED_SUBPROCESS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         *(str(ROOT / "tests" / f) for f in files), *(("-k", select) if select else ())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]
