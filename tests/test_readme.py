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


def test_quickstart_and_the_trl_peft_example_run_as_written(tmp_path):
    """In a fresh directory, as a user would: the quickstart's commands, its Python, then the TRL + PEFT example."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "m")}
    env.pop("PYTHONPATH", None)
    vlmamba = Path(sys.executable).with_name("vlmamba")  # the console command of this environment
    section = marked_section("quickstart")
    for command in code_blocks(section, "bash"):
        assert command.startswith("vlmamba ")
        subprocess.run(command.replace("vlmamba ", f"{vlmamba} ", 1), shell=True, check=True, cwd=tmp_path, env=env)
    (quickstart,) = code_blocks(section, "python")
    (trl_peft,) = code_blocks(marked_section("trl-peft"), "python")
    for block, expected in ((quickstart, "generated_text"), (trl_peft, "trainable params")):
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert expected in result.stdout


def test_readme_counts_the_code_files_a_saved_folder_carries():
    from vlmamba.conversion.push_to_hub import CODE_FILES

    assert len(CODE_FILES) == 7 and "carries the seven code files" in README
    assert all(f"`{name}`" in README for name in CODE_FILES)


def test_ci_runs_the_readme_test_command():
    (command,) = code_blocks(marked_section("test-command"), "bash")
    assert "pytest" in command
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "<!-- test-command -->" in ci
    assert not any("pytest" in line for line in commands)  # the command itself comes from the README only
