"""Folders are replaced only once their new version is complete, whatever stood at the path, and what a killed run
left behind is cleaned up by the next one."""

import subprocess
import sys

import pytest

from vlmamba.conversion.files import clean_leftovers, inside_folder, staged
from vlmamba.conversion.hub_folder import save_folder


def hidden(parent) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("what", ["file", "symlink"])
def test_force_replaces_a_file_or_a_symbolic_link_and_never_its_target(model, processor, tmp_path, what):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("not ours")
    output = tmp_path / "out"
    if what == "file":
        output.write_text("a file where the folder goes")
    else:
        output.symlink_to(target, target_is_directory=True)
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        save_folder(model, output, processor)
    save_folder(model, output, processor, force=True)
    assert output.is_dir() and not output.is_symlink() and (output / "config.json").is_file()
    assert (target / "keep.txt").read_text() == "not ours" and hidden(tmp_path) == []


def test_leftovers_of_killed_runs_are_cleaned_and_a_lost_previous_version_restored(tmp_path):
    output = tmp_path / "out"
    killed = tmp_path / f".out.{dead_pid()}-0badcafe.tmp"
    killed.mkdir()
    (killed / "model.safetensors").write_bytes(b"\0" * 1000)
    live = tmp_path / ".out.1-0000live.tmp"  # pid 1 is always alive: another run still writing
    live.mkdir()
    previous = (
        tmp_path / f".out.{dead_pid()}-00000old.old"
    )  # killed between moving the old folder aside and the new in
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    clean_leftovers(output)
    assert hidden(tmp_path) == [live.name]
    assert (output / "config.json").read_text() == "{}"

    with pytest.raises(RuntimeError, match="killed"):
        with staged(output) as staging:
            (staging / "half-written").write_text("...")
            raise RuntimeError("killed")
    assert (output / "config.json").read_text() == "{}" and hidden(tmp_path) == [live.name]


def test_inside_folder():
    assert inside_folder("images/a.png") and inside_folder("./a/../b.png")
    assert not any(inside_folder(path) for path in ("../x.png", "a/../../x.png", "/etc/passwd", ".."))
