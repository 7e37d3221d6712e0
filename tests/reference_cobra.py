"""Reference implementation of the Cobra side (h-zhao1997/cobra, a Mamba VLM) for conversion tests: writers of tiny
random timm ViT encoders and Cobra run folders in their own layouts, Cobra's `resize-naive` image transform, and
Cobra's forward pass. Written from Cobra's and timm's code (not from transformers): `torch`, PIL, safetensors and
json only; timm itself is never imported.

Sources: Cobra `cobra/models/backbones/vision/{dinosiglip_vit,base_vision,siglip_vit}.py`, `cobra/util/nn_utils.py`,
`cobra/models/vlms/cobra.py`, `cobra/conf/{models,datasets}.py`, `scripts/pretrain.py`; timm
`timm/models/vision_transformer.py` (VisionTransformer, Block, `checkpoint_filter_fn`, `forward_intermediates`),
`timm/layers/{attention,mlp,layer_scale,attention_pool,pos_embed}.py`, `timm/models/_hub.py` (`save_config_for_hf`);
OpenCLIP `src/open_clip/{model,transformer,push_to_hf_hub}.py` for the OpenCLIP SigLIP file. Key names were checked
against timm 1.0.31 (and 0.9.10, Cobra's pin: the same names)."""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from tests.reference_models import mamba_lm_forward, random_mamba_ssm_state

FAMILIES = ("dinov2_reg4", "siglip")
DINOV2_REG_TOKENS = 4
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)

# timm's architecture name, pretrained tag, `global_pool`, mean/std and crop_pct of the two encoders Cobra loads
# (`vision_transformer.py` default_cfgs `vit_large_patch14_reg4_dinov2.lvd142m`, `vit_so400m_patch14_siglip_384.webli`)
TIMM_MODELS = {
    "dinov2_reg4": {
        "architecture": "vit_large_patch14_reg4_dinov2",
        "tag": "lvd142m",
        "global_pool": "token",
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
        "crop_pct": 1.0,
    },
    "siglip": {
        "architecture": "vit_so400m_patch14_siglip_384",
        "tag": "webli",
        "global_pool": "map",
        "mean": SIGLIP_MEAN,
        "std": SIGLIP_STD,
        "crop_pct": 0.9,
    },
}


# --- timm encoders: writer ---


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown timm ViT family {family!r}, expected one of {FAMILIES}")


def _random_vit_state(
    family: str, embed_dim: int, depth: int, patch_size: int, img_size: int, mlp_ratio: float, generator
) -> dict[str, torch.Tensor]:
    """Random weights of timm's `VisionTransformer` for one family, in timm's `state_dict()` order and names."""

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator) * scale

    def linear(prefix, fan_out, fan_in, gain=1.0):
        return {
            prefix + "weight": randn(fan_out, fan_in, scale=gain / math.sqrt(fan_in)),
            prefix + "bias": randn(fan_out, scale=0.1),
        }

    def norm(prefix):
        return {prefix + "weight": 1 + randn(embed_dim, scale=0.1), prefix + "bias": randn(embed_dim, scale=0.1)}

    d, hidden, grid = embed_dim, int(embed_dim * mlp_ratio), img_size // patch_size
    state = {}
    if family == "dinov2_reg4":  # class token, registers; pos_embed has no class slot (`no_embed_class=True`)
        state["cls_token"] = randn(1, 1, d, scale=0.5)
        state["reg_token"] = randn(1, DINOV2_REG_TOKENS, d, scale=0.5)
    state["pos_embed"] = randn(1, grid * grid, d, scale=0.5)
    fan_in = 3 * patch_size * patch_size
    state["patch_embed.proj.weight"] = randn(d, 3, patch_size, patch_size, scale=fan_in**-0.5)
    state["patch_embed.proj.bias"] = randn(d, scale=0.1)
    residual_gain = depth**-0.5  # keeps the residual stream O(1) over the blocks
    for i in range(depth):
        block = f"blocks.{i}."
        state |= norm(block + "norm1.")
        state |= linear(block + "attn.qkv.", 3 * d, d)
        state |= linear(block + "attn.proj.", d, d, gain=residual_gain)
        if family == "dinov2_reg4":
            state[block + "ls1.gamma"] = 0.1 + 0.9 * torch.rand(d, generator=generator)
        state |= norm(block + "norm2.")
        state |= linear(block + "mlp.fc1.", hidden, d)
        state |= linear(block + "mlp.fc2.", d, hidden, gain=residual_gain)
        if family == "dinov2_reg4":
            state[block + "ls2.gamma"] = 0.1 + 0.9 * torch.rand(d, generator=generator)
    state |= norm("norm.")
    if family == "siglip":  # AttentionPoolLatent ('map' head): latent query, q, kv, proj, norm, mlp
        state["attn_pool.latent"] = randn(1, 1, d, scale=d**-0.5)
        state |= linear("attn_pool.q.", d, d)
        state |= linear("attn_pool.kv.", 2 * d, d)
        state |= linear("attn_pool.proj.", d, d)
        state |= norm("attn_pool.norm.")
        state |= linear("attn_pool.mlp.fc1.", hidden, d)
        state |= linear("attn_pool.mlp.fc2.", d, hidden)
    return state


def _timm_hub_config(family: str, model_args: dict, num_features: int, img_size: int) -> dict:
    """`config.json` as timm's `save_config_for_hf` writes it: root fields, `model_args`, then `pretrained_cfg`
    (filtered `PretrainedCfg` fields in dataclass order; sources and nulls dropped except pool_size/first_conv/
    classifier)."""
    model = TIMM_MODELS[family]
    return {
        "architecture": model["architecture"],
        "num_classes": 0,
        "num_features": num_features,
        "global_pool": model["global_pool"],
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": model["tag"],
            "custom_load": False,
            "input_size": [3, img_size, img_size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": model["crop_pct"],
            "crop_mode": "center",
            "mean": list(model["mean"]),
            "std": list(model["std"]),
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
            "license": "apache-2.0",
        },
    }


def _open_clip_text_tower(width: int, mlp_ratio: float, generator, vocab: int, context: int) -> dict:
    """A one-layer OpenCLIP `TextTransformer` under `text.` (nn.MultiheadAttention-style names), as it sits beside
    `visual.trunk.` in an OpenCLIP SigLIP file (`CustomTextCLIP`)."""

    def randn(*shape, scale=0.02):
        return torch.randn(*shape, generator=generator) * scale

    hidden = int(width * mlp_ratio)
    block = "text.transformer.resblocks.0."
    return {
        "text.positional_embedding": randn(context, width),
        "text.token_embedding.weight": randn(vocab, width),
        block + "ln_1.weight": torch.ones(width),
        block + "ln_1.bias": torch.zeros(width),
        block + "attn.in_proj_weight": randn(3 * width, width),
        block + "attn.in_proj_bias": torch.zeros(3 * width),
        block + "attn.out_proj.weight": randn(width, width),
        block + "attn.out_proj.bias": torch.zeros(width),
        block + "ln_2.weight": torch.ones(width),
        block + "ln_2.bias": torch.zeros(width),
        block + "mlp.c_fc.weight": randn(hidden, width),
        block + "mlp.c_fc.bias": torch.zeros(hidden),
        block + "mlp.c_proj.weight": randn(width, hidden),
        block + "mlp.c_proj.bias": torch.zeros(width),
        "text.ln_final.weight": torch.ones(width),
        "text.ln_final.bias": torch.zeros(width),
        "text.text_projection.weight": randn(width, width),
        "text.text_projection.bias": torch.zeros(width),
    }


def write_timm_vit(
    folder: Path,
    family: str,
    *,
    embed_dim: int,
    depth: int,
    num_heads: int,
    patch_size: int,
    img_size: int,
    mlp_ratio: float = 4.0,
    seed: int = 0,
    open_clip: bool = False,
) -> dict[str, torch.Tensor]:
    """A random timm ViT checkpoint of one of Cobra's two encoder families, in timm's own key names:
    "dinov2_reg4" (`vit_large_patch14_reg4_dinov2.lvd142m`: cls_token, 4 reg_token, pos_embed without a class slot,
    ls1/ls2 layer scale) or "siglip" (`vit_so400m_patch14_siglip_384`: no class token, final `norm`, `attn_pool.*`
    'map' head). `img_size` is the training size: pos_embed covers (img_size // patch_size)**2 patches.

    Writes `model.safetensors` + timm's Hub `config.json` (plus a `model_args` block with the tiny dimensions, which
    timm's loader honours and the real Hub configs lack). With `open_clip=True` (SigLIP only, the file timm 0.9.10
    loads for this model): `open_clip_pytorch_model.bin` (trunk under `visual.trunk.`, a one-layer text tower,
    `logit_scale`, `logit_bias`) + an approximate `open_clip_config.json`. Returns the trunk state (timm names)."""
    _check_family(family)
    if open_clip and family != "siglip":
        raise ValueError("open_clip=True is only meaningful for the SigLIP family")
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    generator = torch.Generator().manual_seed(seed)
    state = _random_vit_state(family, embed_dim, depth, patch_size, img_size, mlp_ratio, generator)
    model_args = {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "patch_size": patch_size,
        "img_size": img_size,
        "mlp_ratio": mlp_ratio,
    }
    if family == "dinov2_reg4":
        model_args["reg_tokens"] = DINOV2_REG_TOKENS
    folder.mkdir(parents=True, exist_ok=True)
    if not open_clip:
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        config = _timm_hub_config(family, model_args, embed_dim, img_size)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return state

    vocab, context = 64, 16  # the real text tower: 32000 tokens, context 64, 27 layers
    clip_state = {"logit_scale": torch.tensor(math.log(10.0)), "logit_bias": torch.tensor(-10.0)}  # SigLIP's init
    clip_state |= {"visual.trunk." + k: v for k, v in state.items()}
    clip_state |= _open_clip_text_tower(embed_dim, mlp_ratio, generator, vocab, context)
    torch.save(clip_state, folder / "open_clip_pytorch_model.bin")
    open_clip_config = {
        "model_cfg": {
            "embed_dim": embed_dim,
            "init_logit_bias": -10,
            "custom_text": True,
            "vision_cfg": {
                "image_size": img_size,
                "timm_model_name": TIMM_MODELS["siglip"]["architecture"],
                "timm_model_pretrained": False,
                "timm_pool": "map",
                "timm_proj": "none",
                # not in the real file (its dims are those of the named timm model); OpenCLIP forwards these
                "timm_model_kwargs": {k: v for k, v in model_args.items() if k != "img_size"},
            },
            "text_cfg": {
                "context_length": context,
                "vocab_size": vocab,
                "width": embed_dim,
                "heads": num_heads,
                "layers": 1,
                "mlp_ratio": mlp_ratio,
                "no_causal_mask": True,
                "proj_bias": True,
                "pool_type": "last",
                "norm_kwargs": {"eps": 1e-6},
            },
        },
        "preprocess_cfg": {
            "mean": list(SIGLIP_MEAN),
            "std": list(SIGLIP_STD),
            "interpolation": "bicubic",
            "resize_mode": "squash",
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(open_clip_config, indent=2))
    return state


# --- timm encoders: forward ---


def _resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """timm's `resample_abs_pos_embed` as `checkpoint_filter_fn` calls it for both families (no prefix slots:
    DINOv2-reg has `no_embed_class=True`, SigLIP no class token): unchanged when the grid already matches, else the
    square grid bicubic-resampled with antialias=True (align_corners=False), in float32."""
    tokens, dim = pos_embed.shape[1], pos_embed.shape[2]
    if tokens == grid * grid:
        return pos_embed
    old = math.isqrt(tokens)
    if old * old != tokens:
        raise ValueError(f"pos_embed with {tokens} positions is not a square grid (a class slot?)")
    image = pos_embed.float().reshape(1, old, old, dim).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    return image.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos_embed.dtype)


def _layer_norm(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], eps=1e-6)


def _linear(x: torch.Tensor, state: dict, prefix: str) -> torch.Tensor:
    return F.linear(x, state[prefix + "weight"], state[prefix + "bias"])


def _vit_block(x: torch.Tensor, state: dict, prefix: str, num_heads: int) -> torch.Tensor:
    """timm `Block`: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); fused qkv with bias, scale
    head_dim**-0.5, exact-erf GELU MLP; `ls*.gamma` only where the checkpoint has it (DINOv2)."""
    batch, length, dim = x.shape
    head_dim = dim // num_heads
    qkv = _linear(_layer_norm(x, state, prefix + "norm1."), state, prefix + "attn.qkv.")
    q, k, v = qkv.reshape(batch, length, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q * head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
    attn = _linear((weights @ v).transpose(1, 2).reshape(batch, length, dim), state, prefix + "attn.proj.")
    if prefix + "ls1.gamma" in state:
        attn = attn * state[prefix + "ls1.gamma"]
    x = x + attn
    mlp = F.gelu(_linear(_layer_norm(x, state, prefix + "norm2."), state, prefix + "mlp.fc1."))
    mlp = _linear(mlp, state, prefix + "mlp.fc2.")
    if prefix + "ls2.gamma" in state:
        mlp = mlp * state[prefix + "ls2.gamma"]
    return x + mlp


def timm_vit_features(
    state: dict, family: str, pixel_values: torch.Tensor, *, num_heads: int, patch_size: int, img_size: int
) -> torch.Tensor:
    """One Cobra featurizer: timm's ViT created at `img_size` (pos_embed resampled once from the checkpoint grid, as
    `checkpoint_filter_fn` does), run as `get_intermediate_layers(n={depth - 2})`: the output of the second-to-last
    block, prefix tokens (DINOv2: CLS + 4 registers; SigLIP: none) dropped, no final norm. fp32.
    Returns (B, (img_size // patch_size)**2, embed_dim)."""
    _check_family(family)
    state = {k: v.float() for k, v in state.items()}
    if tuple(pixel_values.shape[-2:]) != (img_size, img_size):  # timm's PatchEmbed is strict about the input size
        raise ValueError(f"expected {img_size}x{img_size} pixels, got {tuple(pixel_values.shape[-2:])}")
    grid = img_size // patch_size
    x = F.conv2d(
        pixel_values.float(), state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch_size
    )
    x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, D); a remainder of img_size % patch_size pixels is dropped
    x = x + _resample_pos_embed(state["pos_embed"], grid)  # both families add pos_embed before the prefix tokens
    prefix = []
    if family == "dinov2_reg4":
        prefix = [state["cls_token"], state["reg_token"]]
    num_prefix = sum(t.shape[1] for t in prefix)
    x = torch.cat([t.expand(x.shape[0], -1, -1) for t in prefix] + [x], dim=1)
    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth - 1):  # blocks 0 .. depth-2; the last block is computed by timm but not returned
        x = _vit_block(x, state, f"blocks.{i}.", num_heads)
    return x[:, num_prefix:]


# --- Cobra's image transform ---


def cobra_transform(image: Image.Image, size: int, mean: tuple, std: tuple) -> torch.Tensor:
    """Cobra's `resize-naive` transform for one encoder (`dinosiglip_vit.py`): torchvision Resize((size, size),
    BICUBIC) on the PIL image (PIL's own `resize`), the no-op CenterCrop(size), ToTensor (uint8 / 255, HWC -> CHW),
    Normalize ((x - mean) / std, float32). Expects an RGB image; returns (3, size, size)."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
    if image.size != (size, size):  # torchvision returns the image untouched when it already has the size
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    pixels = pixels.permute(2, 0, 1).to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    std_t = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return (pixels - mean_t) / std_t


# --- Cobra run folder ---


def _projector_layers(arch_specifier: str) -> list[int]:
    """Indices of the Linear layers inside Cobra's projector `nn.Sequential` (`nn_utils.py`), matched as
    `CobraVLM.__init__` does: "linear" exactly, then the suffixes "fused-gelu-mlp", "gelu-mlp"."""
    if arch_specifier == "linear":
        return []
    if arch_specifier.endswith("fused-gelu-mlp"):
        return [0, 2, 4]
    if arch_specifier.endswith("gelu-mlp"):
        return [0, 2]
    raise ValueError(f"projector {arch_specifier!r} is not covered by this reference")


def _random_projector(arch_specifier: str, vision_dim: int, llm_dim: int, generator) -> dict[str, torch.Tensor]:
    """`LinearProjector` (`projector.{weight,bias}`), `MLPProjector` (Linear vision->llm, GELU, Linear llm->llm) or
    `FusedMLPProjector` (Linear vision->4*vision, GELU, Linear ->llm, GELU, Linear llm->llm)."""
    layers = _projector_layers(arch_specifier)
    if not layers:
        shapes = {"projector.": (llm_dim, vision_dim)}
    elif len(layers) == 3:
        shapes = {"projector.0.": (4 * vision_dim, vision_dim), "projector.2.": (llm_dim, 4 * vision_dim)}
        shapes["projector.4."] = (llm_dim, llm_dim)
    else:
        shapes = {"projector.0.": (llm_dim, vision_dim), "projector.2.": (llm_dim, llm_dim)}
    state = {}
    for prefix, (fan_out, fan_in) in shapes.items():
        state[prefix + "weight"] = torch.randn(fan_out, fan_in, generator=generator) * (1.5 / math.sqrt(fan_in))
        state[prefix + "bias"] = torch.randn(fan_out, generator=generator) * 0.1
    return state


def _run_config(model_id, arch_specifier, vision_backbone_id, llm_backbone_id) -> dict:
    """Cobra's `config.json`: `scripts/pretrain.py` dumps the draccus `PretrainConfig` to YAML and re-saves it as
    JSON; choice classes carry their registry name under "type". Model hyperparameters are `Cobra_3B`'s; the dataset
    is `llava-lvis4v-lrv` (what `cobra+3b` was trained on). Approximate outside the "model" section."""
    dataset_id = "llava-lvis4v-lrv"
    model = {
        "type": model_id,
        "model_id": model_id,
        "arch_specifier": arch_specifier,
        "vision_backbone_id": vision_backbone_id,
        "llm_backbone_id": llm_backbone_id,
        "image_resize_strategy": "resize-naive",
        "llm_max_length": 2048,
        "align_epochs": 1,
        "align_max_steps": None,
        "align_global_batch_size": 256,
        "align_per_device_batch_size": 16,
        "align_learning_rate": 0.001,
        "align_weight_decay": 0.0,
        "align_max_grad_norm": 1.0,
        "align_lr_scheduler_type": "linear-warmup+cosine-decay",
        "align_warmup_ratio": 0.03,
        "align_train_strategy": "fsdp-shard-grad-op",
        "finetune_epochs": 2,
        "finetune_max_steps": None,
        "finetune_global_batch_size": 128,
        "finetune_per_device_batch_size": 16,
        "finetune_learning_rate": 2e-05,
        "finetune_weight_decay": 0.1,
        "finetune_max_grad_norm": 1.0,
        "finetune_lr_scheduler_type": "linear-warmup+cosine-decay",
        "finetune_warmup_ratio": 0.03,
        "finetune_train_strategy": "fsdp-full-shard",
        "enable_gradient_checkpointing": True,
        "enable_mixed_precision_training": True,
        "reduce_in_full_precision": False,
    }
    dataset = {
        "type": dataset_id,
        "dataset_id": dataset_id,
        "align_stage_components": ["download/llava-laion-cc-sbu-558k/chat.json", "download/llava-laion-cc-sbu-558k"],
        "finetune_stage_components": [
            "download/llava-v1.5-instruct/llava_v1_5_lvis4v_lrv_mix1231k.json",
            "download/llava-v1.5-instruct",
        ],
        "dataset_root_dir": "data",
    }
    return {
        "model": model,
        "dataset": dataset,
        "stage": "finetune",
        "pretrained_checkpoint": None,
        "run_id": f"{dataset_id}+{model_id}+stage-finetune+x7",
        "run_root_dir": "runs",
        "seed": 7,
        "hf_token": ".hf_token",
        "trackers": ["jsonl", "wandb"],
        "wandb_project": "cobra",
        "wandb_entity": None,
    }


def write_cobra_checkpoint(
    folder: Path,
    *,
    raw_llm: dict,
    vision_dim: int,
    model_id: str = "cobra+3b",
    arch_specifier: str = "no-align+fused-gelu-mlp",
    vision_backbone_id: str = "dinosiglip-vit-so-384px",
    llm_backbone_id: str = "mamba-2.8b-zephyr",
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """A random Cobra run folder as `cobra/models/load.py` reads it: `config.json` (its "model" section names the
    backbones and projector) and `checkpoints/latest-checkpoint.pt` = torch.save({"model": {"projector": ...,
    "llm_backbone": ...}}) (the FSDP save splits the VLM state by top-level module; no vision weights). The LLM is
    the mamba_ssm LM of `raw_llm` under `llm.`, tied `llm.lm_head.weight` included. Returns the two dicts as stored."""
    generator = torch.Generator().manual_seed(seed + 1)
    projector = _random_projector(arch_specifier, vision_dim, raw_llm["d_model"], generator)
    llm_backbone = {"llm." + k: v for k, v in random_mamba_ssm_state(raw_llm, seed).items()}
    (folder / "checkpoints").mkdir(parents=True, exist_ok=True)
    config = _run_config(model_id, arch_specifier, vision_backbone_id, llm_backbone_id)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = {"projector": projector, "llm_backbone": llm_backbone}
    torch.save({"model": state}, folder / "checkpoints" / "latest-checkpoint.pt")
    return state


# --- Cobra forward ---


def _cobra_project(projector: dict, features: torch.Tensor, arch_specifier: str) -> torch.Tensor:
    """Cobra's projector (`nn_utils.py`): Linear layers of the `nn.Sequential` with exact GELU between them."""
    layers = _projector_layers(arch_specifier)
    if not layers:
        return _linear(features, projector, "projector.")
    for n, index in enumerate(layers):
        if n:
            features = F.gelu(features)
        features = _linear(features, projector, f"projector.{index}.")
    return features


def cobra_logits(
    cobra: dict,
    vision_states: dict[str, dict],
    raw_llm: dict,
    input_ids: torch.LongTensor,
    pixel_values: dict[str, torch.Tensor],
    *,
    vision: dict[str, dict],
    arch_specifier: str = "no-align+fused-gelu-mlp",
) -> torch.Tensor:
    """`CobraVLM.forward` (`cobra/models/vlms/cobra.py`) for a fully multimodal batch, one image per sample, no
    padding, fp32: per-encoder patch features (`timm_vit_features`; `vision[name]` = {"family", "num_heads",
    "patch_size", "img_size"}) concatenated on channels in Cobra's order ("dino" then "siglip"; a single-encoder
    model has only "siglip"), the projector, then [projected patches, embedded input_ids] through the mamba_ssm LM.
    Cobra loads `llm.lm_head.weight` last into the tied embedding/head parameter, so its values serve as both.
    Returns logits (B, num_patches + T, padded vocab)."""
    names = ["dino", "siglip"] if "dino" in vision_states else ["siglip"]
    if set(vision_states) != set(names):
        raise ValueError(f"expected encoders {names}, got {sorted(vision_states)}")
    features = torch.cat(
        [
            timm_vit_features(
                vision_states[name],
                vision[name]["family"],
                pixel_values[name],
                num_heads=vision[name]["num_heads"],
                patch_size=vision[name]["patch_size"],
                img_size=vision[name]["img_size"],
            )
            for name in names
        ],
        dim=2,
    )
    projector = {k: v.float() for k, v in cobra["projector"].items()}
    projected = _cobra_project(projector, features, arch_specifier)
    llm = {k: v.float() for k, v in cobra["llm_backbone"].items()}
    table_key = "llm.lm_head.weight" if "llm.lm_head.weight" in llm else "llm.backbone.embedding.weight"
    embeddings = torch.cat([projected, llm[table_key][input_ids]], dim=1)
    return mamba_lm_forward(
        llm, raw_llm["n_layer"], inputs_embeds=embeddings, prefix="llm.backbone.", embed_key=table_key
    )
