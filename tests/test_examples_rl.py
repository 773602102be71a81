"""Smoke tests of examples/rl_tiny_lm.py and examples/distill_lm.py (tiny settings)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

TINY = ["--vocab-size", "256", "--d-model", "32", "--no-progress"]


def test_rl_tiny_lm_runs_and_plots(tmp_path, capsys):
    import rl_tiny_lm

    r = rl_tiny_lm.main(["--pretrain-steps", "10", "--rl-steps", "3", "--prompts", "2",
                         "--group", "4", "--prompt-len", "4", "--completion", "6",
                         "--out", str(tmp_path), *TINY])
    assert len(r["reward"]) == 3 and all(0.0 <= x <= 1.0 for x in r["reward"])
    assert all(math.isfinite(k) and k >= -1e-6 for k in r["kl"])
    assert r["kl"][0] < 1e-4  # the first update starts from the reference model
    assert (tmp_path / "rl_tiny_lm.png").stat().st_size > 1000
    assert "mean reward" in capsys.readouterr().out


def test_rl_group_advantages():
    import numpy as np
    import rl_tiny_lm

    adv = rl_tiny_lm.group_advantages(np.array([0.0, 1.0, 0.5, 0.5]), group=2)
    np.testing.assert_allclose(adv, [-1, 1, 0, 0], atol=1e-3)
    ids = np.array([[3, 4, 5, 6]])
    np.testing.assert_allclose(rl_tiny_lm.rewards(ids, np.array([4, 6])), [0.5])


def test_distill_lm_runs(tmp_path, capsys):
    import distill_lm

    r = distill_lm.main(["--teacher-steps", "6", "--student-steps", "4", "--seq-len", "16",
                         "--teacher-d", "16", "--student-d", "16", "--teacher-layers", "1",
                         "--teacher-heads", "2",
                         "--batch-size", "8", "--teacher-topk", "8",
                         "--out", str(tmp_path), "--vocab-size", "256", "--no-progress"])
    for name in ("teacher", "plain", "distilled", "sparse"):
        assert math.isfinite(r[f"{name}_val_loss"])
    assert r["plain_val_loss"] != r["distilled_val_loss"]  # the teacher changed something
    assert r["sparse_val_loss"] not in (r["plain_val_loss"], r["distilled_val_loss"])
    assert (tmp_path / "distill_lm.json").exists()
    out = capsys.readouterr().out
    assert "with it" in out and "top-8 log-probs only" in out


@pytest.mark.parametrize("name", ["rl_tiny_lm", "distill_lm"])
def test_help_shows_defaults(name, capsys):
    module = __import__(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "(default:" in capsys.readouterr().out
