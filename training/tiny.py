"""Tiny VL-Mamba models built from scratch, for trying the API offline, for the tests and for the demo.

vlmamba tiny ./vlmamba-tiny [--llm mamba|falcon_mamba|mamba2] [--projector-type vss_l2] [--scan-type bidirectional]
             [--force]
"""

import argparse
import sys
from collections.abc import Iterable

import torch
from transformers import CLIPImageProcessorPil, PreTrainedTokenizerBase, SiglipImageProcessorPil
from transformers.image_processing_utils import BaseImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaProcessor
from modeling_vlmamba.configuration_vlmamba import PROJECTOR_TYPES, SCAN_TYPES
from vlmamba.cli import run_tool
from vlmamba.conversion.convert_mamba_ssm import pad_vocab_size
from vlmamba.conversion.hub_folder import save_folder
from vlmamba.model_cards import write_card
from vlmamba.training.tokenizer import IMAGE_TOKEN, train_gpt_neox_tokenizer

# A 4x4 patch grid (16 px images, 4 px patches), two encoder layers.
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
TINY_CLIP = {**{k: v for k, v in TINY_SIGLIP.items() if k != "vision_use_head"}, "model_type": "clip_vision_model"}
TINY_DINOV2 = {
    "model_type": "dinov2_with_registers",
    "hidden_size": 24,
    "mlp_ratio": 2,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
    "num_register_tokens": 4,
}
# Cobra's pair at tiny sizes: DINOv2 with registers and SigLIP, their patch features concatenated.
TINY_FUSED = {"model_type": "vlmamba_vision", "encoders": {"dino": TINY_DINOV2, "siglip": TINY_SIGLIP}}
TINY_VISION = {"siglip": TINY_SIGLIP, "clip": TINY_CLIP, "dino-siglip": TINY_FUSED}
# Each encoder family's own normalisation (its pretrained image processors use these).
NORMALIZATIONS = {
    "dinov2_with_registers": {"mean": list(IMAGENET_DEFAULT_MEAN), "std": list(IMAGENET_DEFAULT_STD)},
    "siglip_vision_model": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
    "clip_vision_model": {"mean": list(OPENAI_CLIP_MEAN), "std": list(OPENAI_CLIP_STD)},
}
TINY_MAMBA = {
    "model_type": "mamba",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "state_size": 8,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 1,
}
# The other backbones at the same tiny size: FalconMamba (Mamba-1 with dt/B/C norms; untied head, as the 7B) and
# Mamba-2 (4 heads of 16 channels in 2 groups, chunks of 8 tokens so that prompts span several).
TINY_FALCON_MAMBA = {**TINY_MAMBA, "model_type": "falcon_mamba", "tie_word_embeddings": False}
TINY_MAMBA2 = {
    **{k: v for k, v in TINY_MAMBA.items() if k != "model_type"},
    "model_type": "mamba2",
    "num_heads": 4,
    "head_dim": 16,
    "n_groups": 2,
    "chunk_size": 8,
    "tie_word_embeddings": True,
}
TINY_TEXT = {"mamba": TINY_MAMBA, "falcon_mamba": TINY_FALCON_MAMBA, "mamba2": TINY_MAMBA2}
SAMPLE_TEXT = [
    "<|system|>\nYou answer questions about pictures.",
    "<|user|>\nWhat colour is the square?<|endoftext|>\n<|assistant|>\nThe square is red.<|endoftext|>\n",
    "How many circles are there? There are three blue circles and two green triangles.",
    "Describe the picture: a yellow star at the top left, a purple square at the bottom right.",
]


def tiny_config(
    tokenizer: PreTrainedTokenizerBase, vision: dict | None = None, text: dict | None = None, **kwargs
) -> VLMambaConfig:
    """A from-scratch config sized by `vision`/`text` (default: the tiny dicts above; a `text` with another
    `model_type` starts from that backbone's tiny dict) for `tokenizer`'s vocabulary."""
    vision = vision or TINY_SIGLIP
    kwargs.setdefault("vss_state_size", 4)
    kwargs.setdefault("image_token_id", tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if vision["model_type"] == "clip_vision_model":
        kwargs.setdefault("vision_feature_select_strategy", "default")
    text = text or {}
    text = {**TINY_TEXT[text.get("model_type", "mamba")], "vocab_size": pad_vocab_size(len(tokenizer)), **text}
    return VLMambaConfig(vision_config=dict(vision), text_config=text, **kwargs)


def image_processor_for(config: VLMambaConfig) -> BaseImageProcessor:
    """The PIL image processor of the config's vision encoder, at its image size (for a fused tower, a plain resize:
    the processor then applies each encoder's normalisation)."""
    size = config.vision_config.image_size
    if config.vision_config.model_type == "clip_vision_model":
        return CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return SiglipImageProcessorPil(size={"height": size, "width": size})


def tiny_processor(tokenizer: PreTrainedTokenizerBase, config: VLMambaConfig, **kwargs) -> VLMambaProcessor:
    if config.is_fused_vision:
        kwargs.setdefault(
            "image_normalizations", [NORMALIZATIONS[encoder.model_type] for encoder in config.vision_encoders.values()]
        )
    return VLMambaProcessor(
        image_processor_for(config),
        tokenizer,
        image_seq_length=config.image_seq_length,
        patch_size=config.vision_config.patch_size,
        **kwargs,
    )


def tiny_model(config: VLMambaConfig, seed: int = 0) -> VLMambaForConditionalGeneration:
    torch.manual_seed(seed)
    return VLMambaForConditionalGeneration(config).eval()


def build_tiny_folder(output_dir: str, texts: Iterable[str] = SAMPLE_TEXT, force: bool = False, **config_kwargs):
    """Write a tiny random VL-Mamba (model, processor, remote code) to `output_dir` and return it."""
    tokenizer = train_gpt_neox_tokenizer(texts)
    config = tiny_config(tokenizer, **config_kwargs)
    description = "A tiny VL-Mamba with random weights, for trying the API offline: its answers are noise."
    return save_folder(
        tiny_model(config),
        output_dir,
        tiny_processor(tokenizer, config),
        force=force,
        finalize=lambda folder: write_card(folder, {"description": description}),
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description="Write a tiny random VL-Mamba folder (to try the API offline)."
    )
    parser.add_argument("output_dir")
    parser.add_argument("--vision", default="siglip", choices=TINY_VISION, help="vision tower (dino-siglip: fused)")
    parser.add_argument("--llm", default="mamba", choices=TINY_TEXT, help="language model family")
    parser.add_argument("--projector-type", default="vss_l2", choices=PROJECTOR_TYPES)
    parser.add_argument("--scan-type", default="bidirectional", choices=SCAN_TYPES)
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    args = parser.parse_args(argv)
    folder = build_tiny_folder(
        args.output_dir,
        force=args.force,
        vision=TINY_VISION[args.vision],
        text={"model_type": args.llm},
        projector_type=args.projector_type,
        scan_type=args.scan_type,
    )
    print(f"Tiny VL-Mamba saved to {folder}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
