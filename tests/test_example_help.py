"""Every example's ``--help`` explains every option and shows its default.

Each script runs with ``--help`` in a subprocess of its own (argparse exits before any
training), so nothing here trains or touches devices.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def option_entries(help_text: str) -> dict[str, str]:
    """``{"--flag": "its help text"}`` from argparse's ``options:`` section."""
    section = help_text.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + section)
    out = {}
    for entry in entries:
        entry = entry.strip()
        if not entry.startswith("-"):
            continue
        flags = re.findall(r"--[\w-]+", entry.split("  ")[0])
        out[flags[-1] if flags else entry.split()[0]] = " ".join(entry.split())
    return out


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_help_shows_every_default_with_a_text(script):
    env = dict(os.environ, COLUMNS="100", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=script.parent.parent)
    assert proc.returncode == 0, proc.stderr
    entries = option_entries(proc.stdout)
    assert "--help" in entries
    options = {k: v for k, v in entries.items() if k != "--help"}
    assert options, f"{script.name} --help lists no options:\n{proc.stdout}"
    for flag, text in options.items():
        assert "(default:" in text, f"{script.name} {flag}: no default shown: {text!r}"
        described = re.sub(r"\(default:.*?\)$", "", text)
        described = re.sub(r"^(-[-\w]+(?: [A-Z_{}|,+.\w]+)?,? ?)+", "", described).strip()
        assert len(described) >= 8, f"{script.name} {flag}: no help text: {text!r}"


def test_long_default_says_how_long_it_takes():
    text = (EXAMPLES[0].parent / "tiny_lm.py").read_text()
    assert "17 minutes" in text  # --steps 600 on 2 CPU cores
