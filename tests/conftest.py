"""Tiny random VL-Mamba models, tokenizers, processors and images for CPU tests (no network)."""

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaProcessor
from training.tokenizer import IMAGE_TOKEN, train_gpt_neox_tokenizer

CORPUS = [
    "<|system|>\nYou answer questions about pictures.",
    "<|user|>\nWhat colour is the square?<|endoftext|>\n<|assistant|>\nThe square is red.<|endoftext|>\n",
    "How many circles are there? There are three blue circles and two green triangles.",
    "Describe the picture: a yellow star at the top left, a purple square at the bottom right.",
]

TINY_SIGLIP = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
    "vision_use_head": False,
}
TINY_CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
}
TINY_MAMBA = {
    "model_type": "mamba",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "state_size": 8,
    "vocab_size": 328,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}


@pytest.fixture(scope="session")
def tokenizer():
    return train_gpt_neox_tokenizer(CORPUS)


def tiny_config(tokenizer, vision: dict | None = None, **kwargs) -> VLMambaConfig:
    """A VL-Mamba config with a 4x4-patch vision tower, a 2-layer Mamba and a tiny VSS mixer."""
    vision = vision or TINY_SIGLIP
    kwargs.setdefault("vss_state_size", 4)
    kwargs.setdefault("image_token_id", tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    kwargs.setdefault(
        "vision_feature_select_strategy", "default" if vision["model_type"] == "clip_vision_model" else "full"
    )
    return VLMambaConfig(vision_config=dict(vision), text_config=dict(TINY_MAMBA), **kwargs)


def tiny_model(config: VLMambaConfig, seed: int = 0) -> VLMambaForConditionalGeneration:
    torch.manual_seed(seed)
    return VLMambaForConditionalGeneration(config).eval()


def tiny_processor(tokenizer, config: VLMambaConfig, **kwargs) -> VLMambaProcessor:
    vision = config.vision_config
    size = vision.image_size
    if vision.model_type == "clip_vision_model":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        )
    else:
        image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    return VLMambaProcessor(image_processor, tokenizer, image_seq_length=config.image_seq_length, **kwargs)


def make_image(size: tuple[int, int] = (24, 16), color=(200, 30, 30), mode: str = "RGB") -> Image.Image:
    """A two-coloured PIL image (left half `color`, right half blue), converted to `mode`."""
    image = Image.new("RGB", size, color)
    image.paste((20, 40, 220), (size[0] // 2, 0, size[0], size[1]))
    return image.convert(mode)


def user_turn(text: str, num_images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}]


@pytest.fixture(scope="session")
def config(tokenizer) -> VLMambaConfig:
    return tiny_config(tokenizer)


@pytest.fixture(scope="session")
def model(config) -> VLMambaForConditionalGeneration:
    return tiny_model(config)


@pytest.fixture(scope="session")
def processor(tokenizer, config) -> VLMambaProcessor:
    return tiny_processor(tokenizer, config)
