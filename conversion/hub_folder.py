"""Write a Hub-ready folder atomically: a temporary sibling folder, verified, then renamed into place."""

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

MAX_SHARD_SIZE = "5GB"


def save_folder(
    model: PreTrainedModel,
    output_dir: str | Path,
    processor: ProcessorMixin | PreTrainedTokenizerBase | None = None,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
    verify: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` (sharded safetensors, remote code, generation config) and `processor` into `output_dir`.

    Nothing is half-written: everything goes to a temporary folder next to `output_dir`, `verify(folder)` may check
    it (and raise), and only then it replaces `output_dir`. An existing `output_dir` is an error unless `force`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir} already exists; pass force=True (--force) to overwrite it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(staging)
        if verify is not None:
            verify(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
