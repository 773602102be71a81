"""The vocabulary-parallel top-k and sparse-teacher cases (``tests/sharded_topk_cases.py``)
on 8 simulated CPU devices, in a subprocess of their own (see tests/test_sharded.py)."""

from __future__ import annotations

from tests.test_sharded import test_cases_on_8_cpu_devices as _run_cases


def test_topk_cases_on_8_cpu_devices():
    _run_cases("sharded_topk_cases.py")
