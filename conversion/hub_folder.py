"""Write a Hub-ready folder atomically: a temporary sibling folder, verified, then renamed into place."""

from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin

from modeling_vlmamba import VLMambaProcessor
from vlmamba.conversion.files import staged

MAX_SHARD_SIZE = "5GB"


def check_output_dir(output_dir: str | Path, force: bool) -> Path:
    """Refuse an existing `output_dir` unless `force`; converters call this before any work."""
    output_dir = Path(output_dir)
    if (output_dir.exists() or output_dir.is_symlink()) and not force:
        raise FileExistsError(f"{output_dir} already exists; pass force=True (--force) to overwrite it.")
    return output_dir


def save_folder(
    model: PreTrainedModel,
    output_dir: str | Path,
    processor: ProcessorMixin | PreTrainedTokenizerBase | None = None,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
    finalize: Callable[[Path], None] | None = None,
) -> Path:
    """Save `model` (sharded safetensors, remote code, generation config) and `processor` into `output_dir`. With a
    VL-Mamba processor, the generation config stops where its chat template ends a turn (`stop_token_ids`) and pads
    with its tokenizer's pad token.

    Nothing is half-written: everything goes to a temporary folder next to `output_dir`; `finalize(folder)` may
    verify it (and raise) and add files such as the model card; only then it takes the place of `output_dir`.
    An existing `output_dir` (a folder, or with `force` also a file or a symbolic link) is an error unless `force`;
    it is replaced only once the new folder is complete, and restored if that replacement fails.
    """
    output_dir = check_output_dir(output_dir, force)
    if isinstance(processor, VLMambaProcessor):
        stops = processor.stop_token_ids()
        if not stops:
            raise ValueError(
                "Generation would never stop: the tokenizer has no EOS token and the chat template ends turns with no "
                "special token. Give the tokenizer an EOS token (tokenizer.add_special_tokens({'eos_token': ...}))."
            )
        model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
        model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    with staged(output_dir) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if processor is not None:
            processor.save_pretrained(staging)
        if finalize is not None:
            finalize(staging)
    return output_dir
