"""LLaVA-style Mamba VLM checkpoints -> VL-Mamba folders.

A LLaVA-based Mamba VLM (the layout Mamba-LLaVA writes, and a LLaVA-based VL-Mamba would have) saves
`model.embed_tokens`, `model.layers.{i}.*`, `model.norm_f`, `lm_head`, `model.mm_projector.*` and
`model.vision_tower.vision_tower.vision_model.*`, with LLaVA's `mm_*` keys next to the mamba_ssm ones in
`config.json`. Stage 1 of LLaVA training saves only the connector, as `mm_projector.bin`.

    vlmamba convert-llava checkpoint LLAVA_DIR OUTPUT_DIR [--vision openai/clip-vit-large-patch14-336]
    vlmamba convert-llava mm-projector mm_projector.bin --base COMPOSED_DIR OUTPUT_DIR
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoImageProcessor, AutoProcessor

from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration
from vlmamba.cli import run_tool
from vlmamba.conversion.checkpoint import (
    CONNECTOR,
    VISION_TOWER,
    ConversionError,
    KeyMap,
    ReferenceForward,
    add_output_arguments,
    build_model,
    compare_logits,
    convert_state_dict,
    dominant_dtype,
    expected_tensors,
    parse_dtype,
    random_token_ids,
    read_checkpoint,
    read_json,
    resolve_folder,
    tied_keys,
    verify_folder,
)
from vlmamba.conversion.compose import assemble, vision_source, vision_weights
from vlmamba.conversion.convert_mamba_ssm import mamba_config_from_raw
from vlmamba.conversion.hub_folder import MAX_SHARD_SIZE, check_output_dir, save_folder
from vlmamba.model_cards import hub_ids, read_card_data, write_card

# LLaVA's `mlp2x_gelu` is Sequential(Linear, GELU, Linear): indices 0 and 2 hold the weights.
MM_PROJECTOR_KEYS = KeyMap(
    rules=[
        (r"(?:model\.)?mm_projector\.0\.(weight|bias)", CONNECTOR + r".linear_1.\1"),
        (r"(?:model\.)?mm_projector\.2\.(weight|bias)", CONNECTOR + r".linear_2.\1"),
    ]
)
LLAVA_MAMBA_KEYS = KeyMap(
    rules=[
        (r"model\.embed_tokens\.weight", "model.language_model.embeddings.weight"),
        (r"model\.(layers\.\d+\..+|norm_f\.weight)", r"model.language_model.\1"),
        (r"lm_head\.weight", "lm_head.weight"),
        (r"model\.vision_tower\.vision_tower\.(?:vision_model\.)?(.+)", r"model.vision_tower.\1"),
    ]
).then(MM_PROJECTOR_KEYS)
# LLaVA `mm_vision_select_feature` -> our `vision_feature_select_strategy`.
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
# LLaVA `image_aspect_ratio` -> our `image_aspect_ratio` (LLaVA resizes unless told to pad).
ASPECT_RATIOS = {"pad": "pad", None: "resize", "square": "resize", "resize": "resize"}


def llava_options(raw: dict) -> dict:
    """VLMambaConfig / processor options for LLaVA's `mm_*` config keys; raises for what VL-Mamba cannot express."""
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if raw.get(flag):
            raise ConversionError(f"{flag}=true is not supported: VL-Mamba marks an image with <image> tokens only.")
    projector = raw.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(
            f"mm_projector_type={projector!r} is not supported: VL-Mamba's `mlp` connector is LLaVA's mlp2x_gelu."
        )
    feature = raw.get("mm_vision_select_feature", "patch")
    if feature not in SELECT_FEATURES:
        raise ConversionError(f"mm_vision_select_feature={feature!r} is not supported ({', '.join(SELECT_FEATURES)}).")
    aspect = raw.get("image_aspect_ratio")
    if aspect not in ASPECT_RATIOS:
        raise ConversionError(f"image_aspect_ratio={aspect!r} is not supported (pad, square, resize or unset).")
    return {
        "projector_type": "mlp",
        "vision_feature_layer": raw.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": SELECT_FEATURES[feature],
        "image_aspect_ratio": ASPECT_RATIOS[aspect],
    }


def convert_llava(
    checkpoint_dir: str | Path,
    output_dir: str | Path,
    vision: str | Path | None = None,
    tokenizer: str | Path | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
    reference: ReferenceForward | None = None,
) -> Path:
    """Convert a LLaVA-style Mamba VLM checkpoint into a VL-Mamba folder and verify it.

    `vision` is the vision tower's folder or Hub id (default: the checkpoint's `mm_vision_tower`): its config and
    image processor, and its weights when the checkpoint holds none. `reference(input_ids, pixel_values)` is the
    source model's forward, if one can run; its logits on a fixed random input must then match.
    """
    check_output_dir(output_dir, force)
    checkpoint_dir = resolve_folder(checkpoint_dir, "Checkpoint")
    raw = read_json(checkpoint_dir / "config.json")
    options = llava_options(raw)
    vision = vision or raw.get("mm_vision_tower")
    if not isinstance(vision, str | Path):
        raise ConversionError(
            f"{checkpoint_dir / 'config.json'} names no mm_vision_tower: pass the vision tower the checkpoint was "
            "trained with (--vision, e.g. openai/clip-vit-large-patch14-336)."
        )
    vision_dir = resolve_folder(vision, "Vision tower")
    vision_config, dropped = vision_source(vision_dir)
    tokenizer_dir = resolve_folder(tokenizer, "Tokenizer") if tokenizer else checkpoint_dir
    image_processor = AutoImageProcessor.from_pretrained(vision_dir, backend="pil")
    try:
        text_config = mamba_config_from_raw(raw)
    except ConversionError as error:
        raise ConversionError(
            f"{checkpoint_dir / 'config.json'}: the language model is not a Mamba-1 model, the only kind of "
            f"LLaVA-style checkpoint this converter reads. {error}"
        ) from None
    config, processor = assemble({None: (vision_config, image_processor)}, text_config, tokenizer_dir, **options)
    if raw.get("mm_hidden_size", config.vision_feature_size) != config.vision_feature_size:
        raise ConversionError(
            f"mm_hidden_size={raw['mm_hidden_size']} but {vision_dir} gives {config.vision_feature_size}-wide "
            "features: pass the vision tower the checkpoint was trained with (--vision)."
        )

    source = read_checkpoint(checkpoint_dir)
    if any(key.startswith("model.vision_tower.") for key in source):
        tower = r"model\.vision_tower\.vision_tower\."
        key_map = KeyMap(LLAVA_MAMBA_KEYS.rules, [tower + pattern for pattern in dropped])
    else:
        print(f"The checkpoint holds no vision tower: taking it from {vision_dir}.")
        source |= vision_weights(vision_dir, vision_config, dropped, VISION_TOWER)  # already under our names
        key_map = LLAVA_MAMBA_KEYS.then(KeyMap([(r"(model\.vision_tower\..+)", r"\1")]))
    expected = expected_tensors(VLMambaForConditionalGeneration, config)
    tied = tied_keys(VLMambaForConditionalGeneration, config)
    state_dict = convert_state_dict(source, key_map, expected, tied=tied, dtype=dtype, description="Converting LLaVA")
    model = build_model(VLMambaForConditionalGeneration, config, state_dict)

    inputs = fixed_multimodal_inputs(config)
    reference_logits = reference(inputs["input_ids"], inputs["pixel_values"]) if reference is not None else None

    def verify(folder: Path) -> None:
        verify_folder(
            folder,
            VLMambaForConditionalGeneration,
            state_dict,
            inputs,
            reference_logits,
            dominant_dtype(state_dict.values()),
        )
        description = f"VL-Mamba converted from the LLaVA-style Mamba VLM checkpoint `{checkpoint_dir.name}`."
        write_card(folder, {"description": description, "base_model": hub_ids(vision)})

    return save_folder(model, output_dir, processor, force=force, max_shard_size=max_shard_size, finalize=verify)


def fixed_multimodal_inputs(config: VLMambaConfig) -> dict[str, torch.Tensor]:
    """A fixed random prompt with one image: text, `image_seq_length` image tokens, text; and random pixels."""
    text = random_token_ids(config.text_config.vocab_size, batch=1, length=12)
    text = text.masked_fill(text == config.image_token_id, 0)
    image_tokens = torch.full((1, config.image_seq_length), config.image_token_id)
    size = config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.cat([text[:, :4], image_tokens, text[:, 4:]], dim=1),
        "pixel_values": torch.randn(1, config.vision_config.num_channels, size, size, generator=generator),
    }


def load_mm_projector(
    mm_projector: str | Path,
    base_dir: str | Path,
    output_dir: str | Path,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Put a LLaVA stage-1 connector (`mm_projector.bin`) into a composed VL-Mamba folder with an `mlp` connector.

    Verified on the saved folder: the connector computes LLaVA's Linear-GELU-Linear with the file's tensors.
    """
    check_output_dir(output_dir, force)
    base = VLMambaForConditionalGeneration.from_pretrained(base_dir)
    if base.config.projector_type != "mlp":
        raise ConversionError(
            f"{base_dir} has a '{base.config.projector_type}' connector; mm_projector.bin holds LLaVA's mlp2x_gelu: "
            "compose the base with --projector-type mlp."
        )
    weights = read_checkpoint(mm_projector)
    connector = {k: v for k, v in base.state_dict().items() if k.startswith(CONNECTOR + ".")}
    converted = convert_state_dict(weights, MM_PROJECTOR_KEYS, connector, description="Converting mm_projector")
    base.load_state_dict(converted, strict=False)
    processor = AutoProcessor.from_pretrained(base_dir)
    features = torch.randn(2, base.config.image_seq_length, base.config.vision_feature_size)
    prefixes = sorted({key.removesuffix(key.split("mm_projector.")[-1]) for key in weights})
    if len(prefixes) != 1:
        raise ConversionError(
            f"{mm_projector} mixes key prefixes {prefixes}: a stage-1 connector has one (mm_projector. or "
            "model.mm_projector.); save it from a single model."
        )
    (prefix,) = prefixes
    w0, b0, w2, b2 = (weights[prefix + name].float() for name in ("0.weight", "0.bias", "2.weight", "2.bias"))
    expected = F.linear(F.gelu(F.linear(features, w0, b0)), w2, b2)  # LLaVA's mlp2x_gelu, from the file itself

    def verify(folder: Path) -> None:
        loaded = VLMambaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
        with torch.no_grad():
            projected = loaded.model.multi_modal_projector(features)
        difference = compare_logits(projected, expected, "LLaVA's mlp2x_gelu", base.dtype)
        print(f"Verified: the connector matches LLaVA's mlp2x_gelu (max |difference| {difference:.2e}).")
        card_data = read_card_data(base_dir)
        card_data["description"] = (
            f"{card_data.get('description', 'A VL-Mamba.')} Its connector holds the LLaVA stage-1 weights of "
            f"`{Path(mm_projector).name}`."
        )
        write_card(folder, card_data)

    return save_folder(base, output_dir, processor, force=force, max_shard_size=max_shard_size, finalize=verify)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    full = commands.add_parser("checkpoint", help="a full LLaVA-style Mamba VLM checkpoint")
    full.add_argument("checkpoint_dir")
    add_output_arguments(full)
    full.add_argument("--vision", help="vision tower folder or Hub id (default: the config's mm_vision_tower)")
    full.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the checkpoint's)")
    stage_1 = commands.add_parser("mm-projector", help="a stage-1 mm_projector.bin into a composed VL-Mamba")
    stage_1.add_argument("mm_projector", help="the mm_projector.bin file")
    stage_1.add_argument("--base", required=True, help="VL-Mamba folder from conversion.compose --projector-type mlp")
    add_output_arguments(stage_1)
    args = parser.parse_args(argv)
    if args.command == "checkpoint":
        folder = convert_llava(
            args.checkpoint_dir,
            args.output_dir,
            vision=args.vision,
            tokenizer=args.tokenizer,
            dtype=parse_dtype(args.dtype),
            force=args.force,
            max_shard_size=args.max_shard_size,
        )
    else:
        if args.dtype is not None:
            parser.error("mm-projector keeps the base folder's dtype; --dtype does not apply")
        folder = load_mm_projector(
            args.mm_projector, args.base, args.output_dir, force=args.force, max_shard_size=args.max_shard_size
        )
    print(f"VL-Mamba saved to {folder}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
