"""Cobra checkpoints (Zhao et al., arXiv 2403.14520; h-zhao1997/cobra) -> VL-Mamba folders.

A Cobra run folder (`han1997/cobra`, subfolder `cobra+3b`) holds `config.json` (the run config; its `model` section
names the backbones) and `checkpoints/latest-checkpoint.pt`: `{"model": {"projector": ..., "llm_backbone": ...}}`,
the connector and the mamba_ssm LLM under `llm.`. It holds no vision weights: Cobra takes them from two timm
checkpoints, DINOv2 with registers and SigLIP, whose timm names are mapped here to transformers' own models (the
fused qkv split, DINOv2's position grid resampled to 384 px as timm does, its class and register tokens, layer
scale; SigLIP without its pooling head).

    vlmamba convert-cobra han1997/cobra/cobra+3b cobra-3b-hf --tokenizer EleutherAI/gpt-neox-20b
"""

import argparse
import re
import sys
from pathlib import Path

import torch
from transformers import (
    Dinov2WithRegistersConfig,
    MambaConfig,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from modeling_vlmamba import (
    IMAGES_FIRST_CHAT_TEMPLATE,
    VLMambaForConditionalGeneration,
)
from vlmamba.cli import positive_int, run_tool
from vlmamba.conversion.checkpoint import (
    ConversionError,
    KeyMap,
    add_output_arguments,
    build_model,
    check_source,
    convert_state_dict,
    dominant_dtype,
    expected_tensors,
    parse_dtype,
    read_checkpoint,
    read_json,
    resample_position_grid,
    resolve_folder,
    tied_keys,
    verify_folder,
)
from vlmamba.conversion.compose import assemble
from vlmamba.conversion.convert_mamba_ssm import is_positive_int
from vlmamba.conversion.hub_folder import MAX_SHARD_SIZE, check_output_dir, save_folder
from vlmamba.model_cards import hub_ids, write_card

COBRA_REPO = "han1997/cobra"
TIMM_DINOV2 = "timm/vit_large_patch14_reg4_dinov2.lvd142m"
TIMM_SIGLIP = "timm/vit_so400m_patch14_siglip_384.webli"
# Cobra's vision backbones: the timm encoders (in the order their features are concatenated) and the image size.
VISION_BACKBONES = {
    "dinosiglip-vit-so-384px": ({"dino": "dinov2_reg", "siglip": "siglip"}, 384),
    "siglip-vit-so400m-384px": ({"siglip": "siglip"}, 384),
}
# Cobra's projector (the part of `arch_specifier` after "+") -> our connector.
PROJECTORS = {"fused-gelu-mlp": "fused_gelu_mlp", "gelu-mlp": "mlp"}
# LLM backbones whose prompt format is Zephyr's (the format of our images-first chat template).
ZEPHYR_LLMS = ("mamba-2.8b-zephyr",)
# timm architectures -> attention heads (the one size timm's Hub config.json does not give; `model_args` may).
TIMM_HEADS = {"vit_large_patch14_reg4_dinov2": 16, "vit_so400m_patch14_siglip_384": 16}
# timm's LayerNorms and Cobra's exact-erf GELU
TIMM_LAYER_NORM_EPS = 1e-6
COBRA_CITATION = """@article{zhao2024cobra,
  title   = {Cobra: Extending Mamba to Multi-Modal Large Language Model for Efficient Inference},
  author  = {Zhao, Han and Zhang, Min and Zhao, Wei and Ding, Pengxiang and Huang, Siteng and Wang, Donglin},
  journal = {arXiv preprint arXiv:2403.14520},
  year    = {2024}
}"""

# timm ViT names -> transformers names, per family. `{key}:q|k|v` are the thirds of a fused qkv (see `split_timm`).
DINOV2_KEYS = [
    (r"cls_token", "embeddings.cls_token"),
    (r"reg_token", "embeddings.register_tokens"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"blocks\.(\d+)\.(norm1|norm2)\.(weight|bias)", r"encoder.layer.\1.\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias):(q|k|v)", r"encoder.layer.\1.attention.\3_proj.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layer.\1.attention.o_proj.\2"),
    (r"blocks\.(\d+)\.ls(1|2)\.gamma", r"encoder.layer.\1.layer_scale\2.lambda1"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layer.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
]
SIGLIP_KEYS = [
    (r"pos_embed", "embeddings.position_embedding.weight"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm(1|2)\.(weight|bias)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias):(q|k|v)", r"encoder.layers.\1.self_attn.\3_proj.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.out_proj.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]
# SigLIP's attention-pooling head: a patch-feature connector never uses it.
SIGLIP_DROPPED = [r"attn_pool\..+"]
# Cobra's checkpoint: the projector (Sequential indices) and the mamba_ssm LLM under `llm.`.
PROJECTOR_KEYS = {
    "fused_gelu_mlp": [
        (r"projector\.0\.", "linear_1."),
        (r"projector\.2\.", "linear_2."),
        (r"projector\.4\.", "linear_3."),
    ],
    "mlp": [(r"projector\.0\.", "linear_1."), (r"projector\.2\.", "linear_2.")],
}
LLM_KEYS = [
    (r"llm\.backbone\.embedding\.weight", "model.language_model.embeddings.weight"),
    (r"llm\.backbone\.(layers\.\d+\.(norm\.weight|mixer\..+)|norm_f\.weight)", r"model.language_model.\1"),
    (r"llm\.lm_head\.weight", "lm_head.weight"),
]


def resolve_cobra(source: str | Path) -> Path:
    """A local Cobra run folder, or `han1997/cobra/cobra+3b` (a Hub repo id and its subfolder), downloaded."""
    path = Path(source)
    if path.is_dir():
        return path
    parts = str(source).split("/")
    if path.exists() or len(parts) < 3:
        check_source(source, "Cobra checkpoint")  # names a missing local path
        raise ConversionError(
            f"Give a Cobra run folder, or the Hub repo and its subfolder (e.g. {COBRA_REPO}/cobra+3b)."
        )
    from huggingface_hub import hf_hub_download

    repo_id, subfolder = "/".join(parts[:2]), "/".join(parts[2:])
    for name in ("config.json", "checkpoints/latest-checkpoint.pt"):
        downloaded = Path(hf_hub_download(repo_id, f"{subfolder}/{name}"))
    return downloaded.parent.parent


def cobra_settings(run: dict, config_path: Path) -> tuple[dict[str, str], int, str]:
    """(encoder name -> family, image size, connector type) of a Cobra run config; raises for a variant this
    converter cannot express, listing the ones it can."""
    model = run.get("model")
    if not isinstance(model, dict):
        raise ConversionError(f"{config_path} has no 'model' section: is it a Cobra run's config.json?")
    projector = str(model.get("arch_specifier", "")).rpartition("+")[2]
    problems = []
    if model.get("vision_backbone_id") not in VISION_BACKBONES:
        problems.append(f"vision_backbone_id={model.get('vision_backbone_id')!r}")
    if projector not in PROJECTORS:
        problems.append(f"arch_specifier={model.get('arch_specifier')!r}")
    if model.get("llm_backbone_id") not in ZEPHYR_LLMS:
        problems.append(f"llm_backbone_id={model.get('llm_backbone_id')!r} (a prompt format other than Zephyr's)")
    if model.get("image_resize_strategy") != "resize-naive":
        problems.append(f"image_resize_strategy={model.get('image_resize_strategy')!r}")
    if problems:
        raise ConversionError(
            f"Cobra variant {model.get('model_id')!r} cannot be converted: {', '.join(problems)}. Supported: vision "
            f"{', '.join(VISION_BACKBONES)}; projector {', '.join(PROJECTORS)}; LLM {', '.join(ZEPHYR_LLMS)}; image "
            "resize strategy resize-naive (cobra+3b, cobra-one-epoch+3b and cobra-siglip+3b are of this kind)."
        )
    encoders, image_size = VISION_BACKBONES[model["vision_backbone_id"]]
    return encoders, image_size, PROJECTORS[projector]


def read_timm(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """timm's `config.json` and the trunk tensors of a timm checkpoint folder: timm's own (`config.json` and
    `model.safetensors`), or OpenCLIP's, which timm 0.9 (Cobra's) loads SigLIP from (`open_clip_config.json` and
    `open_clip_pytorch_model.bin`, the trunk under `visual.trunk.`, the text tower left out)."""
    if not (folder / "open_clip_pytorch_model.bin").is_file() or (folder / "model.safetensors").is_file():
        return read_json(folder / "config.json"), read_checkpoint(folder)
    open_clip = read_json(folder / "open_clip_config.json")
    vision = open_clip.get("model_cfg", {}).get("vision_cfg", {})
    config = {
        "architecture": vision.get("timm_model_name"),
        "model_args": vision.get("timm_model_kwargs") or {},
        "pretrained_cfg": open_clip.get("preprocess_cfg", {}),
    }
    weights = read_checkpoint(folder / "open_clip_pytorch_model.bin")
    trunk = {key.removeprefix("visual.trunk."): v for key, v in weights.items() if key.startswith("visual.trunk.")}
    return config, trunk


def split_timm(state: dict[str, torch.Tensor], family: str, grid: int) -> dict[str, torch.Tensor]:
    """timm tensors in the form transformers stores them, still under timm's names: every fused qkv as its three
    thirds (`{key}:q`, `:k`, `:v`), the position grid resampled to `grid`, DINOv2's with a zero slot for the class
    token (timm folds that position into `cls_token` and gives the class and register tokens none)."""
    split = {}
    for key, tensor in state.items():
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias")) and tensor.shape[0] % 3 == 0:
            split |= {f"{key}:{part}": third for part, third in zip("qkv", tensor.chunk(3), strict=True)}
        elif key == "pos_embed" and tensor.ndim == 3:
            resampled = resample_position_grid(tensor, grid, prefix_tokens=0, antialias=True)  # as timm does
            zero_class_slot = torch.zeros_like(resampled[:, :1])
            split[key] = torch.cat([zero_class_slot, resampled], 1) if family == "dinov2_reg" else resampled[0]
        else:
            split[key] = tensor
    return split


def timm_vision_config(config: dict, state: dict[str, torch.Tensor], family: str, image_size: int):
    """The transformers vision config of a timm ViT checkpoint, its sizes read from the tensors."""
    architecture = config.get("architecture")
    heads = (config.get("model_args") or {}).get("num_heads") or TIMM_HEADS.get(architecture)
    if not is_positive_int(heads):
        raise ConversionError(
            f"Cannot tell the attention heads of timm architecture {architecture!r}: known are "
            f"{', '.join(TIMM_HEADS)} (or give model_args.num_heads in its config.json)."
        )
    try:
        width, _, patch, _ = state["patch_embed.proj.weight"].shape
        depth = 1 + max(int(m[1]) for key in state if (m := re.match(r"blocks\.(\d+)\.", key)))
        intermediate = state["blocks.0.mlp.fc1.weight"].shape[0]
    except (KeyError, ValueError) as error:
        raise ConversionError(f"The {family} checkpoint lacks the tensors of a timm ViT ({error}).") from None
    shared = {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": heads}
    shared |= {
        "image_size": image_size,
        "patch_size": patch,
        "hidden_act": "gelu",
        "layer_norm_eps": TIMM_LAYER_NORM_EPS,
    }
    if family == "dinov2_reg":
        registers = state["reg_token"].shape[1] if "reg_token" in state else 0
        if intermediate % width:
            raise ConversionError(f"DINOv2's MLP width {intermediate} is not a multiple of its width {width}.")
        return Dinov2WithRegistersConfig(**shared, mlp_ratio=intermediate // width, num_register_tokens=registers)
    return SiglipVisionConfig(**shared, intermediate_size=intermediate, vision_use_head=False)


def llm_config(weights: dict[str, torch.Tensor]) -> MambaConfig:
    """transformers' MambaConfig of Cobra's LLM, read from its tensors (Cobra's checkpoint holds no LLM config)."""
    try:
        vocab_size, width = weights["llm.backbone.embedding.weight"].shape
        layers = 1 + max(int(m[1]) for key in weights if (m := re.match(r"llm\.backbone\.layers\.(\d+)\.", key)))
        inner, state_size = weights["llm.backbone.layers.0.mixer.A_log"].shape
        kernel = weights["llm.backbone.layers.0.mixer.conv1d.weight"].shape[-1]
        rank = weights["llm.backbone.layers.0.mixer.dt_proj.weight"].shape[1]
    except (KeyError, ValueError) as error:
        raise ConversionError(
            f"The checkpoint's llm_backbone lacks the tensors of a mamba_ssm LLM ({error})."
        ) from None
    return MambaConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        num_hidden_layers=layers,
        state_size=state_size,
        expand=inner // width,
        conv_kernel=kernel,
        time_step_rank=rank,
        use_conv_bias="llm.backbone.layers.0.mixer.conv1d.bias" in weights,
        use_bias="llm.backbone.layers.0.mixer.in_proj.bias" in weights,
        residual_in_fp32=True,  # mamba-2.8b-zephyr's mamba_ssm config
        layer_norm_epsilon=1e-5,
    )


def convert_cobra(
    source: str | Path,
    output_dir: str | Path,
    dino: str | Path = TIMM_DINOV2,
    siglip: str | Path = TIMM_SIGLIP,
    tokenizer: str | Path = "EleutherAI/gpt-neox-20b",
    image_size: int | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
) -> Path:
    """Convert a Cobra run folder (with the timm checkpoints of its vision encoders) into a VL-Mamba folder.

    `image_size` is the size the encoders run at (default: the vision backbone's, 384 px). Every tensor of Cobra's
    checkpoint and of the timm checkpoints is used once or dropped on purpose (SigLIP's pooling head, the OpenCLIP
    text tower); the saved folder is checked to reload to the converted tensors.
    """
    check_output_dir(output_dir, force)
    run_dir = resolve_cobra(source)
    run = read_json(run_dir / "config.json")
    encoder_families, backbone_size, projector_type = cobra_settings(run, run_dir / "config.json")
    image_size = image_size or backbone_size
    checkpoint = run_dir / "checkpoints" / "latest-checkpoint.pt"
    if not checkpoint.is_file():
        raise FileNotFoundError(f"{checkpoint} not found: a Cobra run folder holds checkpoints/latest-checkpoint.pt.")
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    parts = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(parts, dict) or set(parts) != {"projector", "llm_backbone"}:
        found = sorted(parts) if isinstance(parts, dict) else type(parts).__name__
        raise ConversionError(f"{checkpoint} must hold {{'model': {{'projector', 'llm_backbone'}}}}, found {found}.")

    sources = {"dino": dino, "siglip": siglip}
    encoders, vision_weights, key_maps, bases = {}, {}, [], []
    for name, family in encoder_families.items():
        folder = resolve_folder(sources[name], f"timm {name} checkpoint")
        timm_config, state = read_timm(folder)
        vision_config = timm_vision_config(timm_config, state, family, image_size)
        grid = image_size // vision_config.patch_size
        fused = len(encoder_families) > 1
        prefix = f"model.vision_tower.{name}." if fused else "model.vision_tower."
        rules = DINOV2_KEYS if family == "dinov2_reg" else SIGLIP_KEYS
        dropped = SIGLIP_DROPPED if family == "siglip" else []
        vision_weights |= {f"{name}/{key}": tensor for key, tensor in split_timm(state, family, grid).items()}
        key_maps.append(KeyMap([(f"{name}/{p}", prefix + r) for p, r in rules], [f"{name}/{p}" for p in dropped]))
        pretrained = timm_config.get("pretrained_cfg") or {}
        # Cobra's resize-naive: a bicubic resize to the square, then the encoder's own normalisation.
        image_processor = SiglipImageProcessorPil(
            size={"height": image_size, "width": image_size},
            image_mean=list(pretrained.get("mean", (0.5,) * 3)),
            image_std=list(pretrained.get("std", (0.5,) * 3)),
        )
        encoders[name if fused else None] = (vision_config, image_processor)
        bases.append(str(sources[name]))
    text_config = llm_config(parts["llm_backbone"])
    config, processor = assemble(
        encoders,
        text_config,
        resolve_folder(tokenizer, "Tokenizer"),
        image_aspect_ratio="resize",
        chat_template=IMAGES_FIRST_CHAT_TEMPLATE,
        projector_type=projector_type,
        vision_feature_select_strategy="patch",
    )

    projector = KeyMap(
        [(p + r"(weight|bias)", f"model.multi_modal_projector.{r}" + r"\1") for p, r in PROJECTOR_KEYS[projector_type]]
    )
    key_map = projector.then(KeyMap(LLM_KEYS))
    for vision_keys in key_maps:
        key_map = key_map.then(vision_keys)
    source_tensors = {**parts["projector"], **parts["llm_backbone"], **vision_weights}
    dtype = dtype or dominant_dtype(source_tensors.values())
    expected = expected_tensors(VLMambaForConditionalGeneration, config)
    mask_tokens = {
        key: torch.zeros(tensor.shape, dtype=dtype) for key, tensor in expected.items() if key.endswith("mask_token")
    }
    expected = {key: tensor for key, tensor in expected.items() if key not in mask_tokens}
    state_dict = convert_state_dict(
        source_tensors,
        key_map,
        expected,
        tied=tied_keys(VLMambaForConditionalGeneration, config),
        dtype=dtype,
        description="Converting Cobra",
    )
    state_dict |= mask_tokens  # DINOv2's masked-image-modelling token: timm has none, and inference never uses it
    model = build_model(VLMambaForConditionalGeneration, config, state_dict)

    def verify(folder: Path) -> None:
        verify_folder(folder, VLMambaForConditionalGeneration, state_dict, {}, None, dtype)
        model_id = run["model"].get("model_id", run_dir.name)
        description = (
            f"Cobra (`{model_id}`, Zhao et al., 2024, arXiv 2403.14520) converted to VL-Mamba's classes: "
            f"{' + '.join(encoder_families)} vision features of the second-to-last layer, concatenated on channels, "
            f"through Cobra's `{run['model'].get('arch_specifier')}` connector into Mamba-2.8B-Zephyr; the image "
            "comes before the whole conversation (no placeholder in the text), and the prompt is Zephyr's. Same "
            "function as Cobra's own model."
        )
        write_card(
            folder,
            {
                "description": description,
                "license": "mit",
                "base_model": hub_ids(COBRA_REPO, *bases, "xiuyul/mamba-2.8b-zephyr"),
                "citations": [COBRA_CITATION],
            },
        )

    return save_folder(model, output_dir, processor, force=force, max_shard_size=max_shard_size, finalize=verify)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help=f"Cobra run folder, or {COBRA_REPO}/SUBFOLDER (e.g. {COBRA_REPO}/cobra+3b)")
    add_output_arguments(parser)
    parser.add_argument("--dino", default=TIMM_DINOV2, help=f"timm DINOv2 folder or Hub id (default: {TIMM_DINOV2})")
    parser.add_argument("--siglip", default=TIMM_SIGLIP, help=f"timm SigLIP folder or Hub id (default: {TIMM_SIGLIP})")
    parser.add_argument("--tokenizer", default="EleutherAI/gpt-neox-20b", help="the LLM's tokenizer (GPT-NeoX)")
    parser.add_argument("--image-size", type=positive_int, help="size the encoders run at (default: Cobra's, 384)")
    args = parser.parse_args(argv)
    folder = convert_cobra(
        args.source,
        args.output_dir,
        dino=args.dino,
        siglip=args.siglip,
        tokenizer=args.tokenizer,
        image_size=args.image_size,
        dtype=parse_dtype(args.dtype),
        force=args.force,
        max_shard_size=args.max_shard_size,
    )
    print(f"VL-Mamba (converted Cobra) saved to {folder}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
