"""The README's main command, end to end (slow: about 7 minutes on 2 cores).

    pytest -m slow
"""

import json
import re
from pathlib import Path

import pytest

from granular.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def _main_command() -> list[str]:
    text = README.read_text()
    line = next(line for line in text.splitlines() if "granular search" in line and "pip install" in line)
    cmd = line.split("&&", 1)[1].split()
    assert cmd[0] == "granular"
    return cmd[1:]


def test_readme_names_exactly_two_setup_commands():
    setup = README.read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in setup.splitlines() if line.startswith("    ") and line.strip()]
    assert len(commands) == 2 and all(c.startswith("pip install") for c in commands)
    assert commands[1].endswith("&& pytest")
    ci = (README.parent / ".ci" / "run").read_text()
    assert commands[1] in ci


@pytest.mark.slow
def test_readme_main_command_meets_its_target(tmp_path):
    args = _main_command()
    target = args[args.index("--target-params") + 1]
    assert main(args + ["--out", str(tmp_path / "run"), "--no-progress"]) == 0
    meta = json.loads((tmp_path / "run" / "model" / "granular.json").read_text())
    want = int(float(re.sub("[Kk]$", "", target)) * (1000 if target[-1] in "Kk" else 1))
    assert 0.97 * want <= meta["nonzero_parameters"] <= want
