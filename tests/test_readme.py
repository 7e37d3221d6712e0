"""The README's quickstart runs as written, and CI runs the README's own test command."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def marked_section(name: str) -> str:
    match = re.search(rf"<!-- {name} -->\n(.*?)<!-- /{name} -->", README, re.DOTALL)
    assert match, f"README.md has no <!-- {name} --> section"
    return match.group(1)


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


def test_quickstart_runs_as_written(tmp_path):
    section = marked_section("quickstart")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")}
    for command in code_blocks(section, "bash"):
        subprocess.run(
            command.replace("python ", f"{sys.executable} ", 1), shell=True, check=True, cwd=tmp_path, env=env
        )
    (python_block,) = code_blocks(section, "python")
    result = subprocess.run(
        [sys.executable, "-c", python_block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "generated_text" in result.stdout


def test_ci_runs_the_readme_test_command():
    (command,) = code_blocks(marked_section("test-command"), "bash")
    assert "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "<!-- test-command -->" in ci
    assert not any("pytest" in line for line in commands)  # the command itself comes from the README only
