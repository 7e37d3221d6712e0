"""Write a Hub-ready folder atomically: a temporary sibling folder, verified, then renamed into place."""

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

MAX_SHARD_SIZE = "5GB"


def check_output_dir(output_dir: str | Path, force: bool) -> Path:
    """Refuse an existing `output_dir` unless `force`; converters call this before any work."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir} already exists; pass force=True (--force) to overwrite it.")
    return output_dir


def _sibling(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.{suffix}"


def save_folder(
    model: PreTrainedModel,
    output_dir: str | Path,
    processor: ProcessorMixin | PreTrainedTokenizerBase | None = None,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
    finalize: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` (sharded safetensors, remote code, generation config) and `processor` into `output_dir`.

    Nothing is half-written: everything goes to a temporary folder next to `output_dir`; `finalize(folder)` may
    verify it (and raise) and add files such as the model card; only then it takes the place of `output_dir`.
    An existing `output_dir` is an error unless `force`; it is replaced only once the new folder is complete, and
    restored if that replacement fails.
    """
    output_dir = check_output_dir(output_dir, force)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(output_dir, "tmp")
    staging.mkdir()
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(staging)
        if finalize is not None:
            finalize(staging)
        if output_dir.exists():
            previous = _sibling(output_dir, "old")
            output_dir.rename(previous)
            try:
                staging.rename(output_dir)
            except BaseException:
                previous.rename(output_dir)
                raise
            shutil.rmtree(previous)
        else:
            staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
