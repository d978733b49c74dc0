"""Repository contracts: the README's two fresh-machine commands and CI stay in step."""
from __future__ import annotations

import re

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Two commands on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_commands_and_ci_runs_the_second():
    commands = readme_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    setup = "python3 -m venv .venv && .venv/bin/pip install -q torch==2.13.0 && "
    assert all(c.startswith(setup) for c in commands)  # the CPU torch first, never an unpinned one
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == commands[1]


def test_main_job_uses_files_shipped_in_the_repo():
    main_job = readme_commands()[0]
    for path in re.findall(r"models/\S+", main_job):
        assert (ROOT / path).is_file(), path
