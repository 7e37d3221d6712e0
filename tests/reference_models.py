"""Small reference implementations of the source formats' forward passes, written from the source code's math
(not from transformers), and writers of tiny random checkpoints in those formats' own layouts."""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F


def pad_vocab(vocab_size: int, multiple: int) -> int:
    return -(-vocab_size // multiple) * multiple


def raw_mamba_config(**overrides) -> dict:
    """A tiny mamba_ssm `config.json`."""
    return {
        "d_model": 16,
        "n_layer": 2,
        "vocab_size": 50,
        "ssm_cfg": {"d_state": 4},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 8,
        **overrides,
    }


def random_mamba_ssm_state(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a mamba_ssm `MambaLMHeadModel` under its own key names (`lm_head` tied)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator) * scale

    d, n_state = raw["d_model"], raw["ssm_cfg"].get("d_state", 16)
    inner, rank, kernel = 2 * d, math.ceil(d / 16), raw["ssm_cfg"].get("d_conv", 4)
    state = {"backbone.embedding.weight": randn(pad_vocab(raw["vocab_size"], raw["pad_vocab_size_multiple"]), d)}
    for i in range(raw["n_layer"]):
        prefix = f"backbone.layers.{i}."
        state |= {
            prefix + "norm.weight": 1 + randn(d, scale=0.1),
            prefix + "mixer.in_proj.weight": randn(2 * inner, d),
            prefix + "mixer.conv1d.weight": randn(inner, 1, kernel),
            prefix + "mixer.conv1d.bias": randn(inner, scale=0.1),
            prefix + "mixer.x_proj.weight": randn(rank + 2 * n_state, inner),
            prefix + "mixer.dt_proj.weight": randn(inner, rank),
            prefix + "mixer.dt_proj.bias": torch.log(torch.expm1(torch.full((inner,), 0.05)))
            + randn(inner, scale=0.1),
            prefix + "mixer.A_log": torch.log(torch.arange(1, n_state + 1.0)).repeat(inner, 1)
            + randn(inner, n_state, scale=0.1),
            prefix + "mixer.D": 1 + randn(inner, scale=0.1),
            prefix + "mixer.out_proj.weight": randn(d, inner),
        }
    state["backbone.norm_f.weight"] = 1 + randn(d, scale=0.1)
    state["lm_head.weight"] = state["backbone.embedding.weight"]  # tied, as mamba_ssm saves it
    return state


def write_mamba_ssm_checkpoint(folder: Path, seed: int = 0, state: dict | None = None, **raw_overrides) -> dict:
    """A random mamba_ssm checkpoint in its own format: `config.json` + `pytorch_model.bin`. Returns the state."""
    raw = raw_mamba_config(**raw_overrides)
    state = random_mamba_ssm_state(raw, seed) if state is None else state
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    torch.save(state, folder / "pytorch_model.bin")
    return state


def mamba_mixer(x: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """mamba_ssm's `Mamba.forward` (Mamba-1 selective scan), sequentially, for `x` of shape (B, L, D)."""
    length = x.shape[1]
    hidden, gate = (x @ p["in_proj.weight"].T).chunk(2, dim=-1)
    kernel = p["conv1d.weight"].shape[-1]
    hidden = F.conv1d(
        hidden.transpose(1, 2), p["conv1d.weight"], p["conv1d.bias"], padding=kernel - 1, groups=hidden.shape[-1]
    )
    hidden = F.silu(hidden[..., :length].transpose(1, 2))
    rank, n_state = p["dt_proj.weight"].shape[1], p["A_log"].shape[1]
    dt, b, c = (hidden @ p["x_proj.weight"].T).split([rank, n_state, n_state], dim=-1)
    dt = F.softplus(dt @ p["dt_proj.weight"].T + p["dt_proj.bias"])
    a = -torch.exp(p["A_log"])
    state = torch.zeros(x.shape[0], hidden.shape[-1], n_state)
    outputs = []
    for t in range(length):
        state = torch.exp(dt[:, t, :, None] * a) * state + dt[:, t, :, None] * b[:, t, None, :] * hidden[:, t, :, None]
        outputs.append((state * c[:, t, None, :]).sum(-1) + p["D"] * hidden[:, t])
    y = torch.stack(outputs, dim=1) * F.silu(gate)
    return y @ p["out_proj.weight"].T


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def mamba_lm_forward(
    state: dict, n_layer: int, input_ids=None, inputs_embeds=None, prefix="backbone.", embed_key=None
):
    """mamba_ssm's `MambaLMHeadModel` in fp32: blocks `(hidden, residual) -> (mixer(norm(hidden + residual)), ...)`,
    `norm_f(hidden + residual)`, and the LM head tied to the embedding. Returns logits (B, L, V)."""
    embedding = state[embed_key or prefix + "embedding.weight"]
    hidden = embedding[input_ids] if inputs_embeds is None else inputs_embeds
    residual = None
    for i in range(n_layer):
        layer = {
            k.removeprefix(f"{prefix}layers.{i}.mixer."): v
            for k, v in state.items()
            if k.startswith(f"{prefix}layers.{i}.mixer.")
        }
        residual = hidden if residual is None else hidden + residual
        hidden = mamba_mixer(rms_norm(residual, state[f"{prefix}layers.{i}.norm.weight"]), layer)
    return rms_norm(hidden + residual, state[f"{prefix}norm_f.weight"]) @ embedding.T


LLAVA_IMAGE_INDEX = -200  # LLaVA's placeholder id for an image in input_ids


def write_llava_mamba_checkpoint(
    folder: Path, vision_model, tokenizer, with_vision_tower: bool = True, **mm
) -> tuple[dict, dict]:
    """A random LLaVA-style Mamba VLM checkpoint (Mamba-LLaVA layout): `config.json` with the mamba_ssm and `mm_*`
    keys, `pytorch_model.bin`, and the tokenizer (without `<image>`: LLaVA marks images with id -200)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = raw_mamba_config(vocab_size=len(tokenizer) + 1)  # room for <image>, as GPT-NeoX's 50277 in Mamba's 50280
    mamba = random_mamba_ssm_state(raw)
    vision_width = vision_model.config.hidden_size
    raw |= {
        "architectures": ["LlavaMambaForCausalLM"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": vision_width,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_use_im_start_end": False,
        "tokenizer_padding_side": "right",
        **mm,
    }
    state = {
        key.replace("backbone.embedding.", "model.embed_tokens.").replace("backbone.", "model."): value
        for key, value in mamba.items()
    }
    generator = torch.Generator().manual_seed(1)
    width = raw["d_model"]
    state |= {
        "model.mm_projector.0.weight": torch.randn(width, vision_width, generator=generator) * 0.2,
        "model.mm_projector.0.bias": torch.randn(width, generator=generator) * 0.1,
        "model.mm_projector.2.weight": torch.randn(width, width, generator=generator) * 0.2,
        "model.mm_projector.2.bias": torch.randn(width, generator=generator) * 0.1,
    }
    if with_vision_tower:  # LLaVA's CLIPVisionTower wraps a transformers 4 CLIPVisionModel: `vision_model.` inside
        tower = "model.vision_tower.vision_tower.vision_model."
        state |= {tower + key: value for key, value in vision_model.state_dict().items()}
    (folder / "config.json").write_text(json.dumps(raw))
    torch.save(state, folder / "pytorch_model.bin")
    tokenizer.save_pretrained(folder)
    return state, raw


def llava_mamba_forward(
    state: dict, raw: dict, vision_model, input_ids: torch.LongTensor, pixel_values
) -> torch.Tensor:
    """LLaVA's `prepare_inputs_labels_for_multimodal` splice + the mamba_ssm LM, for LLaVA-format `input_ids`
    (one -200 per image). Returns logits (B, L', V) with each -200 replaced by the image's patch positions."""
    with torch.no_grad():
        selected = vision_model(pixel_values, output_hidden_states=True).hidden_states[raw["mm_vision_select_layer"]]
    patches = selected[:, 1:] if raw["mm_vision_select_feature"] == "patch" else selected
    projected = F.linear(
        F.gelu(F.linear(patches, state["model.mm_projector.0.weight"], state["model.mm_projector.0.bias"])),
        state["model.mm_projector.2.weight"],
        state["model.mm_projector.2.bias"],
    )
    embedding = state["model.embed_tokens.weight"]
    images = iter(projected)
    rows = []
    for ids in input_ids:
        pieces = []
        for token in ids.tolist():
            pieces.append(next(images) if token == LLAVA_IMAGE_INDEX else embedding[token][None])
        rows.append(torch.cat(pieces))
    return mamba_lm_forward(
        state, raw["n_layer"], inputs_embeds=torch.stack(rows), prefix="model.", embed_key="model.embed_tokens.weight"
    )


def collapse_image_tokens(input_ids: torch.LongTensor, image_token_id: int) -> torch.LongTensor:
    """VL-Mamba input ids (each image expanded to a run of image tokens) -> LLaVA's (one -200 per image)."""
    rows = []
    for ids in input_ids.tolist():
        row = [
            token for i, token in enumerate(ids) if token != image_token_id or i == 0 or ids[i - 1] != image_token_id
        ]
        rows.append([LLAVA_IMAGE_INDEX if token == image_token_id else token for token in row])
    return torch.tensor(rows)
