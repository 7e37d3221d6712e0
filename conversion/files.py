"""Safe file handling shared by the tools: relative paths that stay inside their folder, and folders replaced only
once their new version is complete (a sibling staging folder, renamed into place), with what a killed run left behind
cleaned up by the next one."""

import glob
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def inside_folder(relative_path: str | Path) -> bool:
    """Whether `relative_path` stays inside the folder it is relative to: not absolute, and no `..` leading out."""
    normalized = os.path.normpath(relative_path)
    return not os.path.isabs(normalized) and normalized != ".." and not normalized.startswith(".." + os.sep)


def _sibling(target: Path, suffix: str) -> Path:
    # The process id lets a later run tell a dead run's leftovers from a live run's staging folder.
    return target.parent / f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.{suffix}"


STAGING_NAME = re.compile(r"\.(?P<target>.+)\.\d+-[0-9a-f]{8}\.tmp")


def target_name(folder: Path) -> str:
    """The name `folder` will have: that of the folder it stages (see `staging_folder`), or its own."""
    staged_for = STAGING_NAME.fullmatch(folder.name)
    return staged_for["target"] if staged_for else folder.name


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def clean_leftovers(target: Path) -> None:
    """Remove the staging folders that killed runs left next to `target`, and restore its previous version if a run
    died between moving it aside and moving the new one in."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.*-*.*"):
        owner, _, rest = path.name.removeprefix(f".{target.name}.").partition("-")
        suffix = rest.rpartition(".")[2]
        if not owner.isdigit() or suffix not in ("tmp", "old") or _alive(int(owner)):
            continue
        if suffix == "old" and not target.exists() and not target.is_symlink():
            path.rename(target)  # the complete previous version, whose replacement never arrived
        else:
            _remove(path)


def staging_folder(target: Path) -> Path:
    """A new empty folder next to `target` (same file system, so the final rename is atomic), after cleaning up
    what killed runs left there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(target)
    staging = _sibling(target, "tmp")
    staging.mkdir()
    return staging


def replace_folder(staging: Path, target: Path) -> Path:
    """Move the complete `staging` folder to `target`, replacing whatever `target` was (a folder, a file or a
    symbolic link, which is replaced itself, never what it points to). The old version is moved aside first and
    restored if the move fails; it is deleted only once the new one is in place."""
    if not target.exists() and not target.is_symlink():
        staging.rename(target)
        return target
    previous = _sibling(target, "old")
    target.rename(previous)
    try:
        staging.rename(target)
    except BaseException:
        previous.rename(target)
        raise
    _remove(previous)
    return target


@contextmanager
def staged(target: Path) -> Iterator[Path]:
    """A staging folder (see `staging_folder`) that takes the place of `target` when the block completes, and is
    removed if it fails: a run that fails or is killed leaves `target` as it was."""
    staging = staging_folder(target)
    try:
        yield staging
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
