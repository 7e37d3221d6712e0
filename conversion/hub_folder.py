"""Write a Hub-ready VL-Mamba folder atomically: a temporary sibling folder, renamed into place when complete."""

import shutil
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, ProcessorMixin

MAX_SHARD_SIZE = "5GB"


def save_folder(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    output_dir: str | Path,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Save `model` (sharded safetensors, remote code, generation config) and `processor` into `output_dir`.

    Nothing is half-written: everything goes to a temporary folder next to `output_dir`, which replaces it only
    once complete. An existing `output_dir` is an error unless `force`.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and not force:
        raise FileExistsError(f"{output_dir} already exists; pass force=True (--force) to overwrite it.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent))
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        processor.save_pretrained(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir
