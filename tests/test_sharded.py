"""The multi-device cases on 8 simulated CPU devices, each file in a subprocess of its own.

The device count is fixed when JAX starts (``XLA_FLAGS=--xla_force_host_platform_device_
count=8``), so these checks live in files that pytest does not collect here and run in a
fresh interpreter; the rest of the suite keeps its single device:

* ``tests/sharded_cases.py``: the vocabulary-parallel losses, every placement, export and
  the robustness checks on them;
* ``tests/sharded_layout_cases.py``: FSDP, two-axis token and padded-vocabulary shardings;
* ``tests/sharded_rl_cases.py``: the vocabulary-parallel RL and distillation losses;
* ``tests/sharded_reliability_cases.py``: overlapping axes, bad ids and second order;
* ``tests/sharded_engine_cases.py``: the RL heads on Explicit meshes, the Auto-mesh
  ``impl`` refusal and per-row temperatures through the placements;
* ``tests/sharded_compact_cases.py``: ``shift=1`` on Explicit meshes, ``capacity``'s
  refusal on meshes and its use inside a caller's ``shard_map``.
* ``tests/sharded_support_cases.py``: the support-restricted log-probs (shard_map, Explicit meshes).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("cases", ["sharded_cases.py", "sharded_layout_cases.py",
                                   "sharded_rl_cases.py", "sharded_reliability_cases.py",
                                   "sharded_engine_cases.py", "sharded_compact_cases.py",
                                   "sharded_support_cases.py"])
def test_cases_on_8_cpu_devices(cases):
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAXENT_SHARDED_SUBPROCESS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
         str(ROOT / "tests" / cases)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout, proc.stdout[-2000:]
