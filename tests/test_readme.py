"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    assert BLOCKS, "README.md lost its Python examples"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    if BLOCKS[index].startswith("# Needs 8 devices"):
        pytest.skip("multi-device snippet: run by tests/test_sharded.py via its example script")
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


def test_quickstart_is_two_commands_and_ci_runs_the_second():
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert commands[0].endswith("python3 examples/first_hour.py")
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines(), "CI must run the README's test command"
