"""Shared fixtures: a tiny random VL-Mamba, its tokenizer and processor, and PIL images (no network)."""

import pytest
from PIL import Image

from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaProcessor
from vlmamba.training.tiny import SAMPLE_TEXT, tiny_config, tiny_model, tiny_processor
from vlmamba.training.tokenizer import train_gpt_neox_tokenizer


def make_image(size: tuple[int, int] = (24, 16), color=(200, 30, 30), mode: str = "RGB") -> Image.Image:
    """A two-coloured PIL image (left half `color`, right half blue), converted to `mode`."""
    image = Image.new("RGB", size, color)
    image.paste((20, 40, 220), (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode)


def leftovers(parent) -> list[str]:
    """Anything a failed conversion left next to its output folder (staging and moved-aside folders are hidden)."""
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


def interrupt_saving(monkeypatch) -> None:
    """Make transformers' shard writer write half a shard, then raise KeyboardInterrupt: a save killed midway."""
    import transformers.modeling_utils

    def crash_after_writing(tensors, path, *args, **kwargs):
        with open(path, "wb") as partial:
            partial.write(b"half a shard")
        raise KeyboardInterrupt("simulated interruption mid-save")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", crash_after_writing)


def user_turn(text: str, num_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="session")
def tokenizer():
    return train_gpt_neox_tokenizer(SAMPLE_TEXT)


@pytest.fixture(scope="session")
def config(tokenizer) -> VLMambaConfig:
    return tiny_config(tokenizer)


@pytest.fixture(scope="session")
def model(config) -> VLMambaForConditionalGeneration:
    return tiny_model(config)


@pytest.fixture(scope="session")
def processor(tokenizer, config) -> VLMambaProcessor:
    return tiny_processor(tokenizer, config)
