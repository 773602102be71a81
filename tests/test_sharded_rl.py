"""Vocabulary-parallel RL and distillation losses on 8 simulated CPU devices, in a subprocess.

The device count is fixed when JAX starts (``XLA_FLAGS=--xla_force_host_platform_device_
count=8``), so the checks live in ``tests/sharded_rl_cases.py`` and run in a fresh interpreter;
the rest of the suite keeps its single device.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_sharded_rl_cases_on_8_cpu_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "sharded_rl_cases.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
