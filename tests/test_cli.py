"""The tools as a user installs them: the `vlmamba` command from any directory, one-line user errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmamba.cli import TOOLS, main, run_tool

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project as `pip install .` puts it into site-packages (here a --target folder)."""
    target = tmp_path_factory.mktemp("site-packages")
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
    result = run([*command, "--target", str(target), str(ROOT)], cwd=target)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def test_pip_install_puts_every_tool_under_the_projects_name(installed, tmp_path):
    top_level = {path.name for path in installed.iterdir() if not path.name.endswith((".dist-info", "__pycache__"))}
    assert {"vlmamba", "modeling_vlmamba"} <= top_level
    assert not top_level & {"training", "conversion", "model_cards", "tests", "bench"}
    assert (installed / "vlmamba" / "model_cards" / "template.md").is_file()
    assert (installed / "vlmamba" / "training" / "configs" / "ddp.yaml").is_file()

    env = {"PYTHONPATH": str(installed)}
    result = run([str(installed / "bin" / "vlmamba"), "tiny", "tiny-model"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "tiny-model" / "config.json").is_file()
    code = "import vlmamba.training.sft as m, modeling_vlmamba as p; print(m.__file__); print(p.__file__)"
    result = run([sys.executable, "-c", code], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(line.startswith(str(installed)) for line in result.stdout.split()), result.stdout  # not the checkout
    result = run(
        [sys.executable, "-m", "vlmamba", "push", "tiny-model", "--repo-id", "o/n", "--dry-run"], tmp_path, env
    )
    assert result.returncode == 0 and "would hold these files" in result.stdout, result.stderr[-3000:]


def test_every_tool_answers_help_from_any_directory_and_in_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for tool in TOOLS:
        with pytest.raises(SystemExit) as exit_info:
            main([tool, "--help"])
        assert exit_info.value.code == 0 and f"usage: vlmamba {tool}" in capsys.readouterr().out, tool
    result = run([sys.executable, "-m", "training.sft", "--help"], cwd=ROOT)
    assert result.returncode == 0 and "--stage" in result.stdout, result.stderr[-2000:]


def test_a_user_error_ends_in_one_line_and_a_nonzero_exit(tmp_path):
    vlmamba = str(Path(sys.executable).with_name("vlmamba"))
    arguments = ["--stage", "1", "--data", "x.json", "--output-dir", "out"]
    result = run([vlmamba, "train", "--model", "runs/missing/final", *arguments], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "vlmamba train: error: --model 'runs/missing/final' does not exist: give an existing folder or a Hub repo id "
        "(ORG/NAME)."
    ]
    result = run([sys.executable, "-m", "vlmamba.training.evaluate", "./nope", "x.json"], cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith(
        "Model './nope' does not exist: give an existing folder or a Hub repo id (ORG/NAME)."
    )


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.is_bf16_supported(), reason="this machine has bf16")
def test_bf16_without_support_says_so(tmp_path, capsys):
    from vlmamba.training.sft import main

    argv = [
        "--stage",
        "1",
        "--model",
        str(tmp_path),
        "--data",
        "x.json",
        "--output-dir",
        str(tmp_path / "o"),
        "--bf16",
    ]
    assert run_tool(main, argv, prog="vlmamba train") == 1
    message = "--bf16 needs a CUDA GPU with bfloat16 support, and this machine has none: leave it out."
    assert capsys.readouterr().err == f"vlmamba train: error: {message}\n"


def test_a_config_value_of_the_wrong_type_is_a_user_error_too(tokenizer, capsys):
    from vlmamba.training.tiny import TINY_SIGLIP, tiny_config

    def main(argv, prog):
        tiny_config(tokenizer, vision={**TINY_SIGLIP, "image_size": "16"})  # the Hub's strict dataclass refuses it

    assert run_tool(main, [], prog="vlmamba compose") == 1
    assert "vlmamba compose: error: Validation error for field 'image_size'" in capsys.readouterr().err
