"""Compose an untrained VL-Mamba from pretrained parts: a vision encoder, a Mamba-family LLM and a fresh connector.

The result is ready for stage-1 training (connector alignment). The vision encoder may be a SigLIP or CLIP vision
model or a full SigLIP / CLIP model (its vision part is taken); the LLM a transformers Mamba, FalconMamba or Mamba-2
folder, or a raw mamba_ssm folder (converted on the way). The tokenizer gets the `<image>` token and a pad token
(the LLM's vocabulary grows where they do not fit), the chat template comes from the LLM's tokenizer; the image
processor comes from the vision folder.

    vlmamba compose --vision google/siglip-so400m-patch14-384 --llm state-spaces/mamba-2.8b-hf OUTPUT_DIR
    vlmamba compose --vision google/siglip-so400m-patch14-384 --llm tiiuae/Falcon3-Mamba-7B-Instruct OUTPUT_DIR
"""

import argparse
import re
import sys
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
    SiglipImageProcessorPil,
)
from transformers.image_processing_utils import BaseImageProcessor

from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration, VLMambaProcessor, VLMambaVisionConfig
from modeling_vlmamba.configuration_vlmamba import (
    LANGUAGE_MODEL_TYPES,
    PROJECTOR_TYPES,
    SCAN_TYPES,
    check_language_model_config,
)
from modeling_vlmamba.processing_vlmamba import IMAGE_ASPECT_RATIOS, IMAGE_TOKEN, PAD_TOKEN, output_size
from vlmamba.cli import positive_int, run_tool
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
    resample_position_grid,
    resolve_folder,
    tied_keys,
    verification_device,
    verify_folder,
)
from vlmamba.conversion.convert_mamba_ssm import convert_raw_weights, is_raw_mamba_ssm
from vlmamba.conversion.hub_folder import MAX_SHARD_SIZE, check_output_dir, save_folder
from vlmamba.model_cards import hub_ids, write_card

FULL_MODEL_TYPES = {"siglip": "siglip_vision_model", "clip": "clip_vision_model"}
# Each vision encoder's position embeddings: their name, the prefix tokens they hold positions for, and whether the
# encoder's own `interpolate_pos_encoding` antialiases.
POSITION_EMBEDDINGS = {
    "siglip_vision_model": ("embeddings.position_embedding.weight", 0, False),
    "clip_vision_model": ("embeddings.position_embedding.weight", 1, False),
    "dinov2": ("embeddings.position_embeddings", 1, True),
    "dinov2_with_registers": ("embeddings.position_embeddings", 1, True),
}
# Vision encoders a VL-Mamba (or one encoder of a fused tower) is composed from, and their encoder names.
VISION_MODEL_TYPES = {
    "siglip_vision_model": "siglip",
    "clip_vision_model": "clip",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2",
}
EMBEDDINGS = "model.language_model.embeddings.weight"
# transformers' Mamba, FalconMamba and Mamba-2 (`*ForCausalLM`) names -> VL-Mamba names. Old checkpoints say
# `embedding`, not `embeddings`.
LANGUAGE_MODEL_KEYS = KeyMap(
    rules=[
        (r"backbone\.embeddings?\.weight", EMBEDDINGS),
        (r"backbone\.(.+)", r"model.language_model.\1"),
        (r"lm_head\.weight", "lm_head.weight"),
    ]
)
# FalconMamba's weightless B/C/dt RMSNorms: constant ones that transformers keeps out of its checkpoints
# (non-persistent) and recomputes; a checkpoint holding them is a FalconMamba's.
FALCON_MAMBA_NORMS = r"backbone\.layers\.\d+\.mixer\.(b|c|dt)_layernorm\.weight"
# Added where a tokenizer has no pad token but its EOS, nor GPT-NeoX's `<|padding|>`.
ADDED_PAD_TOKEN = "<|pad|>"


def vision_source(folder: Path) -> tuple[PretrainedConfig, list[str]]:
    """The vision config of a SigLIP, CLIP or DINOv2 folder (vision-only or a full SigLIP / CLIP model), and the
    patterns of its tensors that a VL-Mamba leaves out on purpose."""
    config = AutoConfig.from_pretrained(folder)
    # transformers 4 checkpoints before 4.31 saved the position ids buffer; the model computes it.
    dropped = [r"(vision_model\.)?embeddings\.position_ids"]
    if config.model_type in FULL_MODEL_TYPES:
        config = config.vision_config
        dropped += [r"text_model\..+", r"logit_(scale|bias)", r"(visual|text)_projection\..+"]
    if config.model_type not in VISION_MODEL_TYPES:
        raise ConversionError(
            f"{folder} holds a '{config.model_type}' model; the vision encoder must be SigLIP, CLIP or DINOv2 "
            f"({', '.join(sorted(FULL_MODEL_TYPES) + sorted(VISION_MODEL_TYPES))})."
        )
    if config.model_type == "siglip_vision_model":
        config.vision_use_head = False  # VL-Mamba uses the patch features, never the pooling head
        dropped.append(r"(vision_model\.)?head\..+")
    return config, dropped


def vision_weights(folder: Path, config: PretrainedConfig, dropped: list[str], prefix: str) -> dict[str, torch.Tensor]:
    """The vision encoder's tensors under `prefix`, read by transformers' own loader (which also renames the older
    key layouts it saves and reads, e.g. DINOv2's); any tensor it misses, leaves unused (but for `dropped`) or finds
    mis-shaped is an error naming it."""
    model_class = AutoModel._model_mapping[type(config)]
    model, info = model_class.from_pretrained(folder, config=config, output_loading_info=True)
    unused = [key for key in info["unexpected_keys"] if not any(re.fullmatch(pattern, key) for pattern in dropped)]
    problems = {
        "missing (no source tensor)": sorted(info["missing_keys"]),
        "unexpected (no target tensor)": sorted(unused),
        "wrong shape": [str(item) for item in info["mismatched_keys"]],
    }
    if any(problems.values()):
        lines = [f"{len(keys)} {what}:\n  " + "\n  ".join(keys) for what, keys in problems.items() if keys]
        raise ConversionError(f"{folder} does not match its vision config.\n" + "\n".join(lines))
    return {f"{prefix}.{key}": tensor for key, tensor in model.state_dict().items()}


def language_model_source(folder: Path) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """Config and transformers-named weights of a Mamba, FalconMamba or Mamba-2 LLM folder (raw mamba_ssm folders are
    converted). The folder's `model_type` decides the config class, so a FalconMamba is never read as a Mamba: a
    config with another type's fields, or Mamba weights with FalconMamba's B/C/dt norms, are refused."""
    if is_raw_mamba_ssm(folder):
        return convert_raw_weights(folder)
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in LANGUAGE_MODEL_TYPES:
        raise ConversionError(
            f"{folder} holds a '{config.model_type}' model; the LLM must be a transformers "
            f"{', '.join(LANGUAGE_MODEL_TYPES)} model, or a raw mamba_ssm one."
        )
    try:
        check_language_model_config(config)
    except ValueError as error:
        raise ConversionError(f"{folder / 'config.json'}: {error}") from None
    weights = read_checkpoint(folder)
    norms = sorted(key for key in weights if re.fullmatch(FALCON_MAMBA_NORMS, key))
    if norms and config.model_type != "falcon_mamba":
        raise ConversionError(
            f"{folder} says model_type='{config.model_type}' but its weights hold FalconMamba's B/C/dt norms "
            f"({norms[0]}, ...): it is a FalconMamba checkpoint, which would load as a '{config.model_type}' without "
            "an error and compute the wrong thing. Set model_type to 'falcon_mamba' in its config.json."
        )
    return config, {key: tensor for key, tensor in weights.items() if key not in norms}


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Add `<image>` as one special token and pad on the left with a token other than EOS: the tokenizer's own pad
    token, else GPT-NeoX's `<|padding|>` where the vocabulary has it, else an added `<|pad|>`. Labels are masked
    where the input is padding: padding with EOS would hide the end of every answer from the loss."""
    if len(tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False)) != 1:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        if PAD_TOKEN in tokenizer.get_vocab():
            tokenizer.pad_token = PAD_TOKEN
        else:
            tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # saved only from there: a Hub tokenizer may not say it
    return tokenizer


def grow_embeddings(weights: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """An LLM's transformers-named `weights` with the input embeddings and the LM head (where the checkpoint has
    one) grown to `vocab_size` rows, each new row the mean of the tensor's existing rows: a new token starts as an
    average token, whose logits stay on the scale of the others."""
    grown = dict(weights)
    for key, tensor in weights.items():
        if LANGUAGE_MODEL_KEYS.rename(key) in (EMBEDDINGS, "lm_head.weight"):
            mean = tensor.float().mean(dim=0, keepdim=True).to(tensor.dtype)
            grown[key] = torch.cat([tensor, mean.expand(vocab_size - len(tensor), -1)])
    return grown


def assemble(
    encoders: dict[str, tuple[PretrainedConfig, BaseImageProcessor]],
    text_config: PretrainedConfig,
    tokenizer_dir: Path,
    image_aspect_ratio: str = "pad",
    chat_template: str | None = None,
    grow_vocabulary: bool = False,
    **options,
) -> tuple[VLMambaConfig, VLMambaProcessor]:
    """The VL-Mamba config and processor for vision encoders (name -> their config and PIL image processor; several
    make a fused tower) and an LLM (`text_config`, left as it is): the tokenizer gets `<image>` and a pad token
    (`prepare_tokenizer`), whose ids, and its EOS's, the text config takes. A tokenizer larger than the LLM's
    vocabulary is another LLM's, an error. One that those two tokens make larger is an error too, unless
    `grow_vocabulary`: the text config then has the tokenizer's size as its `vocab_size` and the LLM's as its
    `source_vocab_size` (the caller grows the weights: `grow_embeddings`). A fused
    tower's processor resizes once (as its first encoder's processor would) and normalises for each encoder.
    `options` are further `VLMambaConfig` fields."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"No tokenizer in {tokenizer_dir}: pass --tokenizer (the Mamba LLMs use EleutherAI/gpt-neox-20b)."
        ) from error
    if len(tokenizer) > text_config.vocab_size:  # before <image> and a pad token: growing is for those only
        raise ConversionError(
            f"The tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens, more than the LLM's vocabulary of "
            f"{text_config.vocab_size}: it is not this LLM's tokenizer. Pass the LLM's own with --tokenizer (the "
            "Mamba and Mamba-2 LLMs use EleutherAI/gpt-neox-20b)."
        )
    tokenizer = prepare_tokenizer(tokenizer)
    token_ids = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    text = text_config.to_dict() | {name: index for name, index in token_ids.items() if index is not None}
    if len(tokenizer) > text_config.vocab_size:
        if not grow_vocabulary:
            raise ConversionError(
                f"The tokenizer has {len(tokenizer)} tokens with {IMAGE_TOKEN} and its pad token but the LLM's "
                f"vocabulary holds {text_config.vocab_size}; use a tokenizer that fits (GPT-NeoX: 50277 + <image> "
                "fits Mamba's 50280)."
            )
        text |= {"vocab_size": len(tokenizer), "source_vocab_size": text_config.vocab_size}
    (first_config, first_processor), *others = encoders.values()
    if others:
        vision_config = VLMambaVisionConfig(encoders={name: config for name, (config, _) in encoders.items()})
        size = output_size(first_processor)
        image_processor = SiglipImageProcessorPil(
            size={"height": size[0], "width": size[1]}, resample=first_processor.resample
        )
        normalizations = [
            {"mean": list(processor.image_mean), "std": list(processor.image_std)}
            for _, processor in encoders.values()
        ]
    else:
        vision_config, image_processor, normalizations = first_config, first_processor, None
        if first_config.model_type == "clip_vision_model":
            options.setdefault("vision_feature_select_strategy", "default")
    config = VLMambaConfig(
        vision_config=vision_config,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        **options,
    )
    processor = VLMambaProcessor(
        image_processor,
        tokenizer,
        image_seq_length=config.image_seq_length,
        patch_size=config.vision_config.patch_size,
        image_aspect_ratio=image_aspect_ratio,
        chat_template=chat_template,
        image_normalizations=normalizations,
    )
    return config, processor


def square(image_size: int) -> dict[str, int]:
    return {"height": image_size, "width": image_size}


def resize_encoder(
    weights: dict[str, torch.Tensor], config: PretrainedConfig, prefix: str, image_size: int
) -> dict[str, torch.Tensor]:
    """An encoder's `weights` (under `prefix`) for `image_size`: its position embeddings resampled as its own
    `interpolate_pos_encoding` would at run time, and its config set to that size."""
    if config.image_size == image_size:
        return weights
    key, prefix_tokens, antialias = POSITION_EMBEDDINGS[config.model_type]
    grid = image_size // config.patch_size
    weights[f"{prefix}.{key}"] = resample_position_grid(weights[f"{prefix}.{key}"], grid, prefix_tokens, antialias)
    config.image_size = image_size
    return weights


def encoder_names(configs: list[PretrainedConfig]) -> list[str]:
    """Encoder names of a fused tower from their model types (`dinov2`, `siglip`, `clip`), numbered on repeats."""
    names = [VISION_MODEL_TYPES[config.model_type] for config in configs]
    return [f"{name}_{names[:i].count(name) + 1}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def compose(
    vision: str | Path | list[str | Path],
    llm: str | Path,
    output_dir: str | Path,
    tokenizer: str | Path | None = None,
    projector_type: str = "vss_l2",
    scan_type: str = "bidirectional",
    vision_feature_layer: int = -2,
    image_aspect_ratio: str = "pad",
    image_size: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Write an untrained VL-Mamba (pretrained vision encoder(s) and LLM, connector initialised with `seed`).
    Several `vision` sources make a fused tower, their patch features concatenated on channels in that order.
    `image_size` (default: the first encoder's) sets the size the encoders run at, their position embeddings
    resampled as each encoder interpolates them (e.g. DINOv2's 518 px grid for 384 px, to fuse it with SigLIP).

    Verified before it is moved into place: the folder reloads to the composed tensors, its text-only logits equal
    the source LLM's, and its vision encoders' hidden states equal the source encoders'.
    """
    check_output_dir(output_dir, force)
    vision = [vision] if isinstance(vision, str | Path) else list(vision)
    vision_dirs = [resolve_folder(source, "Vision encoder") for source in vision]
    llm_dir = resolve_folder(llm, "LLM")
    configs, dropped = zip(*(vision_source(folder) for folder in vision_dirs), strict=True)
    names = encoder_names(configs) if len(vision_dirs) > 1 else [None]
    prefixes = [VISION_TOWER if name is None else f"{VISION_TOWER}.{name}" for name in names]
    text_config, llm_weights = language_model_source(llm_dir)
    encoders = [vision_weights(*source) for source in zip(vision_dirs, configs, dropped, prefixes, strict=True)]
    image_size = image_size or configs[0].image_size
    resized = [config.image_size != image_size for config in configs]
    encoders = [
        resize_encoder(weights, config, prefix, image_size)
        for weights, config, prefix in zip(encoders, configs, prefixes, strict=True)
    ]
    config, processor = assemble(
        {
            name: (config, AutoImageProcessor.from_pretrained(folder, backend="pil", **resize))
            for name, config, folder, resize in zip(
                names, configs, vision_dirs, [{"size": square(image_size)} if r else {} for r in resized], strict=True
            )
        },
        text_config,
        resolve_folder(tokenizer, "Tokenizer") if tokenizer is not None else llm_dir,
        image_aspect_ratio,
        grow_vocabulary=True,
        projector_type=projector_type,
        scan_type=scan_type,
        vision_feature_layer=vision_feature_layer,
    )
    vocab_size, source_vocab_size = config.text_config.vocab_size, text_config.vocab_size
    placed_llm_weights = llm_weights
    if vocab_size > source_vocab_size:
        placed_llm_weights = grow_embeddings(llm_weights, vocab_size)
        print(
            f"The tokenizer's {vocab_size} tokens (with {IMAGE_TOKEN} and its pad token) do not fit the LLM's "
            f"{source_vocab_size}: its vocabulary grows to {vocab_size} rows (text_config.vocab_size; "
            f"text_config.source_vocab_size={source_vocab_size}), each new row of the input embeddings"
            f"{'' if config.tie_word_embeddings else ' and of lm_head'} the mean of the existing ones."
        )
    expected = expected_tensors(VLMambaForConditionalGeneration, config)
    tied = tied_keys(VLMambaForConditionalGeneration, config)
    # One dtype for the whole model (by default the sources' own), the fresh connector included.
    dtype = dtype or dominant_dtype([t for weights in encoders + [llm_weights] for t in weights.values()])
    parts = [
        (f"vision encoder {name or ''}".strip(), (prefix + ".",), weights, KeyMap([(r"(.+)", r"\1")]))
        for name, prefix, weights in zip(names, prefixes, encoders, strict=True)
    ]
    state_dict = {}
    for name, part_prefixes, source, key_map in [
        *parts,
        ("language model", LANGUAGE_MODEL, placed_llm_weights, LANGUAGE_MODEL_KEYS),
    ]:
        part = {key: tensor for key, tensor in expected.items() if key.startswith(part_prefixes)}
        state_dict |= convert_state_dict(
            source, key_map, part, tied=tied, dtype=dtype, description=f"Placing the {name}"
        )
    model = build_model(VLMambaForConditionalGeneration, config, state_dict, initialize=[CONNECTOR], seed=seed)
    model.to(dtype)

    input_ids = random_token_ids(source_vocab_size)  # ids the source LLM has
    input_ids = input_ids.masked_fill(input_ids == config.image_token_id, 0)  # text only: no image placeholders
    generator = torch.Generator().manual_seed(0)
    size = config.vision_config.image_size
    pixel_values = [torch.randn(2, c.num_channels, size, size, generator=generator) for c in configs]
    device = verification_device()
    towers = [model.model.vision_tower] if names == [None] else list(model.model.vision_tower.encoders.values())
    with torch.no_grad():
        # The source's own class (Mamba, FalconMamba, Mamba-2), from the config its weights were checked against.
        source_class = AutoModelForCausalLM._model_mapping[type(text_config)]
        if is_raw_mamba_ssm(llm_dir):
            source_llm = build_model(source_class, text_config, dict(llm_weights))
        else:
            source_llm = source_class.from_pretrained(llm_dir, config=text_config, dtype=torch.float32)
        llm_logits = source_llm.to(device)(input_ids.to(device)).logits.cpu()
        vision_states = []
        for tower, folder, pixels, interpolate in zip(towers, vision_dirs, pixel_values, resized, strict=True):
            source_tower = type(tower).from_pretrained(folder, dtype=torch.float32).to(device)
            extra = {"interpolate_pos_encoding": True} if interpolate else {}  # the source at its own image size
            states = source_tower(pixels.to(device), output_hidden_states=True, **extra).hidden_states
            vision_states.append(states)
    del source_llm, source_tower

    def verify(folder: Path) -> None:
        composed = verify_folder(
            folder,
            VLMambaForConditionalGeneration,
            model.state_dict(),
            {"input_ids": input_ids},
            llm_logits,
            dtype,
            vocab_size=source_vocab_size,
        )
        tower = composed.model.vision_tower
        composed_towers = [tower] if names == [None] else list(tower.encoders.values())
        difference = 0.0
        with torch.no_grad():
            for encoder, pixels, sources in zip(composed_towers, pixel_values, vision_states, strict=True):
                states = encoder(pixels.to(device), output_hidden_states=True).hidden_states
                difference = max(
                    difference,
                    *(
                        compare_logits(s, t, "the source vision encoder", dtype)
                        for s, t in zip(states, sources, strict=True)
                    ),
                )
        print(f"Verified: vision hidden states match the source encoders (max |difference| {difference:.2e}).")
        vision_names = [str(name) if hub_ids(name) else Path(name).name for name in vision]
        llm_name = str(llm) if hub_ids(llm) else Path(llm).name
        description = (
            f"An untrained VL-Mamba composed from the vision encoder{'s' if len(vision) > 1 else ''} "
            f"{' + '.join(f'`{name}`' for name in vision_names)} and the language model `{llm_name}`, "
            f"with a `{projector_type}` connector initialised at random (seed {seed}). Train it with "
            "`vlmamba train --stage 1` (connector alignment) before use."
        )
        write_card(folder, {"description": description, "base_model": hub_ids(*vision, llm)})

    return save_folder(model, output_dir, processor, force=force, max_shard_size=max_shard_size, finalize=verify)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vision",
        required=True,
        nargs="+",
        help="SigLIP, CLIP or DINOv2 folder(s) or Hub id(s) (vision or full model); several make a fused tower",
    )
    parser.add_argument(
        "--llm",
        required=True,
        help="Mamba, FalconMamba or Mamba-2 folder or Hub id (transformers, or raw mamba_ssm)",
    )
    add_output_arguments(parser)
    parser.add_argument("--tokenizer", help="tokenizer folder or Hub id (default: the LLM's)")
    parser.add_argument("--projector-type", default="vss_l2", choices=PROJECTOR_TYPES)
    parser.add_argument("--scan-type", default="bidirectional", choices=SCAN_TYPES)
    parser.add_argument("--vision-feature-layer", type=int, default=-2)
    parser.add_argument("--image-aspect-ratio", default="pad", choices=IMAGE_ASPECT_RATIOS)
    parser.add_argument("--image-size", type=positive_int, help="size the encoders run at (default: the first's)")
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
        image_size=args.image_size,
        seed=args.seed,
        dtype=parse_dtype(args.dtype),
        force=args.force,
        max_shard_size=args.max_shard_size,
    )
    print(f"VL-Mamba (untrained connector) saved to {folder}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
