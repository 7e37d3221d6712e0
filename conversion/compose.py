"""Compose an untrained VL-Mamba from pretrained parts: a vision encoder, a Mamba LLM and a fresh connector.

The result is ready for stage-1 training (connector alignment). The vision encoder may be a SigLIP or CLIP vision
model or a full SigLIP / CLIP model (its vision part is taken); the LLM a transformers Mamba folder or a raw
mamba_ssm folder (converted on the way). The tokenizer gets the `<image>` token; the image processor comes from the
vision folder.

    vlmamba compose --vision google/siglip-so400m-patch14-384 --llm state-spaces/mamba-2.8b-hf OUTPUT_DIR
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoTokenizer,
    MambaConfig,
    MambaForCausalLM,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaProcessor
from modeling_vlmamba.configuration_vlmamba import PROJECTOR_TYPES, SCAN_TYPES
from modeling_vlmamba.processing_vlmamba import IMAGE_ASPECT_RATIOS, IMAGE_TOKEN, PAD_TOKEN
from vlmamba.cli import run_tool
from vlmamba.conversion.checkpoint import (
    CONNECTOR,
    LANGUAGE_MODEL,
    VISION_TOWER,
    ConversionError,
    KeyMap,
    add_output_arguments,
    build_model,
    compare_logits,
    convert_state_dict,
    dominant_dtype,
    expected_tensors,
    parse_dtype,
    random_token_ids,
    read_checkpoint,
    resolve_folder,
    tied_keys,
    verification_device,
    verify_folder,
)
from vlmamba.conversion.convert_mamba_ssm import convert_raw_weights, is_raw_mamba_ssm
from vlmamba.conversion.hub_folder import MAX_SHARD_SIZE, check_output_dir, save_folder
from vlmamba.model_cards import hub_ids, write_card

FULL_MODEL_TYPES = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}
# transformers' Mamba (MambaForCausalLM) names -> VL-Mamba names. Old checkpoints say `embedding`, not `embeddings`.
LANGUAGE_MODEL_KEYS = KeyMap(
    rules=[
        (r"backbone\.embeddings?\.weight", "model.language_model.embeddings.weight"),
        (r"backbone\.(.+)", r"model.language_model.\1"),
        (r"lm_head\.weight", "lm_head.weight"),
    ]
)


def vision_source(folder: Path) -> tuple[PretrainedConfig, KeyMap]:
    """The vision config of a SigLIP/CLIP folder and the key map that places its weights in the vision tower."""
    config = AutoConfig.from_pretrained(folder)
    # transformers 4 checkpoints before 4.31 saved the position ids buffer; the model computes it.
    dropped = [r"(vision_model\.)?embeddings\.position_ids"]
    if config.model_type in FULL_MODEL_TYPES:
        config = config.vision_config
        dropped += [r"text_model\..+", r"logit_(scale|bias)", r"(visual|text)_projection\..+"]
    if config.model_type not in FULL_MODEL_TYPES.values():
        raise ConversionError(
            f"{folder} holds a '{config.model_type}' model; the vision encoder must be SigLIP or CLIP "
            f"({', '.join(sorted(FULL_MODEL_TYPES) + sorted(FULL_MODEL_TYPES.values()))})."
        )
    if config.model_type == "siglip_vision_model":
        config.vision_use_head = False  # VL-Mamba uses the patch features, never the pooling head
        dropped.append(r"(vision_model\.)?head\..+")
    # Full models and older vision-only checkpoints prefix the tower with `vision_model.`; transformers 5 does not.
    return config, KeyMap([(r"(?:vision_model\.)?(.+)", VISION_TOWER + r".\1")], dropped)


def language_model_source(folder: Path) -> tuple[MambaConfig, dict[str, torch.Tensor]]:
    """Config and transformers-named weights of a Mamba LLM folder (raw mamba_ssm folders are converted)."""
    if is_raw_mamba_ssm(folder):
        return convert_raw_weights(folder)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != "mamba":
        raise ConversionError(f"{folder} holds a '{config.model_type}' model; the LLM must be a Mamba (mamba) model.")
    return config, read_checkpoint(folder)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> PreTrainedTokenizerBase:
    """Add `<image>` as one special token, pad with `<|padding|>` on the left, and check the ids fit the model."""
    if len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) != 1:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        if PAD_TOKEN in tokenizer.get_vocab():
            tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "left"
    if len(tokenizer) > vocab_size:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} tokens with {IMAGE_TOKEN} but the LLM's vocabulary holds "
            f"{vocab_size}; use a tokenizer that fits (GPT-NeoX: 50277 + <image> fits Mamba's 50280)."
        )
    return tokenizer


def assemble(
    vision_dir: Path,
    vision_config: PretrainedConfig,
    text_config: MambaConfig,
    tokenizer_dir: Path,
    image_aspect_ratio: str = "pad",
    **options,
) -> tuple[VLMambaConfig, VLMambaProcessor]:
    """The VL-Mamba config and processor for a vision encoder and an LLM: the tokenizer gets `<image>`, the image
    processor (PIL backend) comes from the vision folder. `options` are further `VLMambaConfig` fields."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"No tokenizer in {tokenizer_dir}: pass --tokenizer (the Mamba LLMs use EleutherAI/gpt-neox-20b)."
        ) from error
    tokenizer = prepare_tokenizer(tokenizer, text_config.vocab_size)
    if tokenizer.pad_token_id is not None:
        text_config.pad_token_id = tokenizer.pad_token_id
    options.setdefault(
        "vision_feature_select_strategy", "default" if vision_config.model_type == "clip_vision_model" else "full"
    )
    config = VLMambaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        **options,
    )
    processor = VLMambaProcessor(
        AutoImageProcessor.from_pretrained(vision_dir, backend="pil"),
        tokenizer,
        image_seq_length=config.image_seq_length,
        patch_size=config.vision_config.patch_size,
        image_aspect_ratio=image_aspect_ratio,
    )
    return config, processor


def compose(
    vision: str | Path,
    llm: str | Path,
    output_dir: str | Path,
    tokenizer: str | Path | None = None,
    projector_type: str = "vss_l2",
    scan_type: str = "bidirectional",
    vision_feature_layer: int = -2,
    image_aspect_ratio: str = "pad",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Write an untrained VL-Mamba (pretrained vision encoder and LLM, connector initialised with `seed`).

    Verified before it is moved into place: the folder reloads to the composed tensors, its text-only logits equal
    the source LLM's, and its vision tower's hidden states equal the source encoder's.
    """
    check_output_dir(output_dir, force)
    vision_dir, llm_dir = resolve_folder(vision, "Vision encoder"), resolve_folder(llm, "LLM")
    vision_config, vision_keys = vision_source(vision_dir)
    text_config, llm_weights = language_model_source(llm_dir)
    config, processor = assemble(
        vision_dir,
        vision_config,
        text_config,
        resolve_folder(tokenizer, "Tokenizer") if tokenizer is not None else llm_dir,
        image_aspect_ratio,
        projector_type=projector_type,
        scan_type=scan_type,
        vision_feature_layer=vision_feature_layer,
    )
    expected = expected_tensors(VLMambaForConditionalGeneration, config)
    tied = tied_keys(VLMambaForConditionalGeneration, config)
    vision_weights = read_checkpoint(vision_dir)
    # One dtype for the whole model (by default the sources' own), the fresh connector included.
    dtype = dtype or dominant_dtype([*vision_weights.values(), *llm_weights.values()])
    state_dict = {}
    for name, prefixes, source, key_map in (
        ("vision encoder", (VISION_TOWER,), vision_weights, vision_keys),
        ("language model", LANGUAGE_MODEL, llm_weights, LANGUAGE_MODEL_KEYS),
    ):
        part = {key: tensor for key, tensor in expected.items() if key.startswith(prefixes)}
        state_dict |= convert_state_dict(
            source, key_map, part, tied=tied, dtype=dtype, description=f"Placing the {name}"
        )
    model = build_model(VLMambaForConditionalGeneration, config, state_dict, initialize=[CONNECTOR], seed=seed)
    model.to(dtype)

    input_ids = random_token_ids(config.text_config.vocab_size)
    input_ids = input_ids.masked_fill(input_ids == config.image_token_id, 0)  # text only: no image placeholders
    size = config.vision_config.image_size
    pixel_values = torch.randn(
        2, config.vision_config.num_channels, size, size, generator=torch.Generator().manual_seed(0)
    )
    device = verification_device()
    with torch.no_grad():
        if is_raw_mamba_ssm(llm_dir):
            source_llm = build_model(MambaForCausalLM, text_config, dict(llm_weights))
        else:
            source_llm = MambaForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
        llm_logits = source_llm.to(device)(input_ids.to(device)).logits.cpu()
        source_tower = type(model.model.vision_tower).from_pretrained(vision_dir, dtype=torch.float32).to(device)
        vision_states = source_tower(pixel_values.to(device), output_hidden_states=True).hidden_states
    del source_llm, source_tower
    weights_dtype = dtype

    def verify(folder: Path) -> None:
        composed = verify_folder(
            folder,
            VLMambaForConditionalGeneration,
            model.state_dict(),
            {"input_ids": input_ids},
            llm_logits,
            weights_dtype,
        )
        with torch.no_grad():
            states = composed.model.vision_tower(pixel_values.to(device), output_hidden_states=True).hidden_states
        difference = max(
            compare_logits(state, source, "the source vision encoder", weights_dtype)
            for state, source in zip(states, vision_states, strict=True)
        )
        print(f"Verified: vision hidden states match the source encoder (max |difference| {difference:.2e}).")
        vision_name, llm_name = (str(name) if hub_ids(name) else Path(name).name for name in (vision, llm))
        description = (
            f"An untrained VL-Mamba composed from the vision encoder `{vision_name}` and the language model "
            f"`{llm_name}`, "
            f"with a `{projector_type}` connector initialised at random (seed {seed}). Train it with "
            "`vlmamba train --stage 1` (connector alignment) before use."
        )
        write_card(folder, {"description": description, "base_model": hub_ids(vision, llm)})

    return save_folder(model, output_dir, processor, force=force, max_shard_size=max_shard_size, finalize=verify)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--vision", required=True, help="SigLIP/CLIP folder or Hub id (vision or full model)")
    parser.add_argument("--llm", required=True, help="Mamba folder or Hub id (transformers or raw mamba_ssm)")
    add_output_arguments(parser)
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the LLM's)")
    parser.add_argument("--projector-type", default="vss_l2", choices=PROJECTOR_TYPES)
    parser.add_argument("--scan-type", default="bidirectional", choices=SCAN_TYPES)
    parser.add_argument("--vision-feature-layer", type=int, default=-2)
    parser.add_argument("--image-aspect-ratio", default="pad", choices=IMAGE_ASPECT_RATIOS)
    parser.add_argument("--seed", type=int, default=0, help="seed of the connector's initialisation")
    args = parser.parse_args(argv)
    folder = compose(
        args.vision,
        args.llm,
        args.output_dir,
        tokenizer=args.tokenizer,
        projector_type=args.projector_type,
        scan_type=args.scan_type,
        vision_feature_layer=args.vision_feature_layer,
        image_aspect_ratio=args.image_aspect_ratio,
        seed=args.seed,
        dtype=parse_dtype(args.dtype),
        force=args.force,
        max_shard_size=args.max_shard_size,
    )
    print(f"VL-Mamba (untrained connector) saved to {folder}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
