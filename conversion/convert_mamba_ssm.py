"""Raw mamba_ssm language model (Mamba-1 or Mamba-2) -> transformers `MambaForCausalLM` / `Mamba2ForCausalLM` folder.

The paper's LLM (`state-spaces/mamba-2.8b-slimpj`), `xiuyul/mamba-2.8b-zephyr` and the Mamba-2 LLMs
(`state-spaces/mamba2-2.7b` and smaller) exist only in mamba_ssm's own format: `config.json` (`d_model, n_layer,
vocab_size, ssm_cfg, rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple, tie_embeddings`) and
`pytorch_model.bin` with `backbone.embedding.weight`, `backbone.layers.{i}.*`, `backbone.norm_f.weight` and a tied
`lm_head.weight`. `ssm_cfg.layer` names the mixer: "Mamba1" (its default) becomes a `MambaForCausalLM`, "Mamba2" a
`Mamba2ForCausalLM`; mixer settings that transformers' model cannot compute are refused, naming the field.

    vlmamba convert-mamba-ssm state-spaces/mamba-2.8b-slimpj OUT_DIR --tokenizer EleutherAI/gpt-neox-20b
    vlmamba convert-mamba-ssm state-spaces/mamba2-2.7b OUT_DIR --tokenizer EleutherAI/gpt-neox-20b
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

from vlmamba.cli import run_tool
from vlmamba.conversion.checkpoint import (
    ConversionError,
    KeyMap,
    ReferenceForward,
    add_output_arguments,
    build_model,
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
from vlmamba.conversion.hub_folder import MAX_SHARD_SIZE, check_output_dir, save_folder

# mamba_ssm's mixer classes (`ssm_cfg.layer`, "Mamba1" when absent) -> the transformers model that computes each.
LAYERS = {"Mamba1": MambaForCausalLM, "Mamba2": Mamba2ForCausalLM}

# mamba_ssm `ssm_cfg` (Mamba-1 mixer arguments) -> transformers MambaConfig fields.
SSM_CFG_FIELDS = {
    "d_state": "state_size",
    "d_conv": "conv_kernel",
    "expand": "expand",
    "dt_rank": "time_step_rank",
    "conv_bias": "use_conv_bias",
    "bias": "use_bias",
    "dt_min": "time_step_min",
    "dt_max": "time_step_max",
    "dt_init": "time_step_init_scheme",
    "dt_scale": "time_step_scale",
    "dt_init_floor": "time_step_floor",
}
# Accepted, but with no effect on the network's function (`layer` is the mixer choice: see `mixer_layer`).
SSM_CFG_IGNORED = ("use_fast_path",)

# mamba_ssm `ssm_cfg` (Mamba-2 mixer arguments, `mamba_ssm.modules.mamba2.Mamba2`) -> transformers Mamba2Config
# fields. mamba_ssm's defaults differ from Mamba2Config's (ngroups 1, not 8), so every field is set.
MAMBA2_SSM_CFG_FIELDS = {
    "d_state": ("state_size", 128),
    "d_conv": ("conv_kernel", 4),
    "expand": ("expand", 2),
    "headdim": ("head_dim", 64),
    "ngroups": ("n_groups", 1),
    "chunk_size": ("chunk_size", 256),
    "bias": ("use_bias", False),
    "conv_bias": ("use_conv_bias", True),
    "dt_min": ("time_step_min", 0.001),
    "dt_max": ("time_step_max", 0.1),
    "dt_init_floor": ("time_step_floor", 1e-4),
    "dt_limit": ("time_step_limit", (0.0, math.inf)),
}
# Mamba-2 mixer variants transformers' Mamba2 does not compute: each is accepted at this value (mamba_ssm's default)
# only, with the reason and the fix given otherwise.
MAMBA2_SSM_CFG_FIXED = {
    "D_has_hdim": (False, "D per channel: transformers' Mamba2 has one D per head"),
    "rmsnorm": (True, "no gated RMSNorm: transformers' Mamba2 always applies it"),
    "norm_before_gate": (False, "RMSNorm before the gate: transformers' Mamba2 gates first, then normalises"),
}
# Accepted, but with no effect on the network's function (initialisation and kernel choice).
MAMBA2_SSM_CFG_IGNORED = ("conv_init", "A_init_range", "use_mem_eff_path")
# mamba_ssm's Mamba2 normalises its gated output with this epsilon whatever the block norms use; transformers' Mamba2
# uses `layer_norm_epsilon` for both.
MAMBA2_GATED_NORM_EPSILON = 1e-5
# Raw mamba_ssm folders carry no token ids; mamba_ssm's LLMs use GPT-NeoX's tokenizer, whose <|endoftext|> is id 0.
TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}

MAMBA_SSM_KEYS = KeyMap(
    rules=[
        (r"backbone\.embedding\.weight", "backbone.embeddings.weight"),
        (r"(backbone\.layers\.\d+\.(norm\.weight|mixer\..+)|backbone\.norm_f\.weight|lm_head\.weight)", r"\1"),
    ]
)


def pad_vocab_size(vocab_size: int, multiple: int = 8) -> int:
    """`vocab_size` rounded up to a multiple of `multiple`, as mamba_ssm pads its vocabulary (50277 -> 50280)."""
    return -(-vocab_size // multiple) * multiple


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def mixer_layer(raw: dict) -> str:
    """The mixer class a raw mamba_ssm config names (`ssm_cfg.layer`, "Mamba1" when absent): a key of LAYERS."""
    ssm_cfg = raw.get("ssm_cfg")
    layer = ssm_cfg.get("layer", "Mamba1") if isinstance(ssm_cfg, dict) else "Mamba1"
    if layer not in LAYERS:
        raise ConversionError(
            f"ssm_cfg.layer={layer!r} cannot be converted: transformers computes mamba_ssm's "
            + " and ".join(f"{name!r} ({model.__name__})" for name, model in LAYERS.items())
            + " mixers only."
        )
    return layer


def common_problems(raw: dict, model: str) -> tuple[dict, list[str]]:
    """The raw config's `ssm_cfg` and what is wrong with its fields that do not depend on the mixer."""
    problems = [f"missing '{name}'" for name in ("d_model", "n_layer", "vocab_size") if name not in raw]
    problems += [
        f"{name}={raw[name]!r} must be a positive integer"
        for name in ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple")
        if name in raw and not is_positive_int(raw[name])
    ]
    ssm_cfg = raw.get("ssm_cfg") or {}
    if not isinstance(ssm_cfg, dict):
        problems.append(f'ssm_cfg={ssm_cfg!r} must be an object of mixer settings (e.g. {{"d_state": 16}})')
        ssm_cfg = {}
    if "norm_epsilon" in raw and not (is_number(raw["norm_epsilon"]) and raw["norm_epsilon"] > 0):
        problems.append(f"norm_epsilon={raw['norm_epsilon']!r} must be a positive number")
    if not raw.get("rms_norm", True):
        problems.append(f"rms_norm=false (LayerNorm blocks): transformers' {model} has RMSNorm blocks only")
    if raw.get("d_intermediate", 0):
        problems.append(f"d_intermediate={raw['d_intermediate']} (MLP blocks): transformers' {model} has none")
    if raw.get("attn_layer_idx"):
        problems.append(f"attn_layer_idx={raw['attn_layer_idx']} (attention layers): transformers' {model} has none")
    return ssm_cfg, problems


def raise_problems(problems: list[str], config_class: type) -> None:
    if problems:
        raise ConversionError(
            f"This raw mamba_ssm config cannot be converted to transformers' {config_class.__name__}:\n  "
            + "\n  ".join(problems)
        )


def common_fields(raw: dict) -> dict:
    """The target config's fields that do not depend on the mixer (from a raw config already checked)."""
    return {
        "hidden_size": raw["d_model"],
        "num_hidden_layers": raw["n_layer"],
        "vocab_size": pad_vocab_size(raw["vocab_size"], raw.get("pad_vocab_size_multiple", 8)),
        "residual_in_fp32": raw.get("residual_in_fp32", True),
        "layer_norm_epsilon": float(raw.get("norm_epsilon", 1e-5)),
        "tie_word_embeddings": raw.get("tie_embeddings", True),
        **TOKEN_IDS,
    }


def mamba_config_from_raw(raw: dict) -> MambaConfig:
    """transformers' `MambaConfig` for a raw mamba_ssm Mamba-1 config; raises `ConversionError` for what it cannot
    express (`language_model_config_from_raw` takes either mixer)."""
    ssm_cfg, problems = common_problems(raw, "Mamba")
    problems += [
        f"ssm_cfg.{name}={ssm_cfg[name]!r} must be a positive integer"
        for name in ("d_state", "d_conv", "expand")
        if name in ssm_cfg and not is_positive_int(ssm_cfg[name])
    ]
    if "dt_rank" in ssm_cfg and ssm_cfg["dt_rank"] != "auto" and not is_positive_int(ssm_cfg["dt_rank"]):
        problems.append(f"ssm_cfg.dt_rank={ssm_cfg['dt_rank']!r} must be 'auto' or a positive integer")
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        problems.append(
            f"ssm_cfg.layer={ssm_cfg['layer']!r}: not a Mamba-1 mixer (see language_model_config_from_raw)"
        )
    unknown = sorted(set(ssm_cfg) - {*SSM_CFG_FIELDS, *SSM_CFG_IGNORED, "layer"})
    if unknown:
        problems.append(
            f'ssm_cfg keys {unknown} have no Mamba-1 equivalent (a Mamba-2 config? Then add "layer": "Mamba2")'
        )
    raise_problems(problems, MambaConfig)
    return MambaConfig(
        **common_fields(raw),
        **{SSM_CFG_FIELDS[key]: value for key, value in ssm_cfg.items() if key in SSM_CFG_FIELDS},
    )


def mamba2_config_from_raw(raw: dict) -> Mamba2Config:
    """transformers' `Mamba2Config` for a raw mamba_ssm Mamba-2 config (`ssm_cfg.layer` "Mamba2"); raises
    `ConversionError` for what transformers' Mamba2 cannot compute."""
    ssm_cfg, problems = common_problems(raw, "Mamba2")
    settings = {key: ssm_cfg.get(key, default) for key, (_, default) in MAMBA2_SSM_CFG_FIELDS.items()}
    problems += [
        f"ssm_cfg.{name}={settings[name]!r} must be a positive integer"
        for name in ("d_state", "d_conv", "expand", "headdim", "ngroups", "chunk_size")
        if not is_positive_int(settings[name])
    ]
    problems += [
        f"ssm_cfg.{name}={settings[name]!r} must be true or false"
        for name in ("bias", "conv_bias")
        if not isinstance(settings[name], bool)
    ]
    problems += [
        f"ssm_cfg.{name}={settings[name]!r} must be a number"
        for name in ("dt_min", "dt_max", "dt_init_floor")
        if not is_number(settings[name])
    ]
    limit = settings["dt_limit"]
    if not (isinstance(limit, list | tuple) and len(limit) == 2 and all(map(is_number, limit))):
        limit = None
    if limit is None or not 0 <= limit[0] <= limit[1]:
        problems.append(f"ssm_cfg.dt_limit={settings['dt_limit']!r} must be [low, high] with 0 <= low <= high")
    if ssm_cfg.get("layer") != "Mamba2":
        problems.append(
            f"ssm_cfg.layer={ssm_cfg.get('layer')!r}: not a Mamba-2 mixer (see language_model_config_from_raw)"
        )
    problems += [
        f"ssm_cfg.{name}={ssm_cfg[name]!r} ({reason}): only {name}={json.dumps(value)} converts; run this model "
        "with mamba_ssm itself"
        for name, (value, reason) in MAMBA2_SSM_CFG_FIXED.items()
        if ssm_cfg.get(name, value) != value
    ]
    known = {*MAMBA2_SSM_CFG_FIELDS, *MAMBA2_SSM_CFG_FIXED, *MAMBA2_SSM_CFG_IGNORED, "d_ssm", "layer"}
    unknown = sorted(set(ssm_cfg) - known)
    if unknown:
        problems.append(f"ssm_cfg keys {unknown} have no Mamba-2 equivalent")
    if raw.get("norm_epsilon", MAMBA2_GATED_NORM_EPSILON) != MAMBA2_GATED_NORM_EPSILON:
        problems.append(
            f"norm_epsilon={raw['norm_epsilon']!r}: mamba_ssm's Mamba2 normalises its gated output with "
            f"{MAMBA2_GATED_NORM_EPSILON:g} whatever the blocks use, transformers' Mamba2 uses one epsilon for both; "
            f"only {MAMBA2_GATED_NORM_EPSILON:g} converts"
        )
    raise_problems(problems, Mamba2Config)

    width = settings["expand"] * raw["d_model"]
    if ssm_cfg.get("d_ssm") not in (None, width):
        problems.append(
            f"ssm_cfg.d_ssm={ssm_cfg['d_ssm']!r} (the SSM on part of the width, a gated MLP on the rest): "
            f"transformers' Mamba2 runs the SSM on all expand * d_model = {width} channels; only d_ssm null or "
            f"{width} converts"
        )
    if width % settings["headdim"]:
        problems.append(
            f"ssm_cfg.headdim={settings['headdim']} must divide expand * d_model = {width} (the mixer's width)"
        )
    elif (width // settings["headdim"]) % settings["ngroups"]:
        problems.append(
            f"ssm_cfg.ngroups={settings['ngroups']} must divide the number of heads, expand * d_model / headdim "
            f"= {width // settings['headdim']}"
        )
    raise_problems(problems, Mamba2Config)
    fields = {field: settings[key] for key, (field, _) in MAMBA2_SSM_CFG_FIELDS.items()}
    fields |= {field: float(fields[field]) for field in ("time_step_min", "time_step_max", "time_step_floor")}
    fields["time_step_limit"] = tuple(float(bound) for bound in limit)
    return Mamba2Config(num_heads=width // settings["headdim"], **common_fields(raw), **fields)


def language_model_config_from_raw(raw: dict) -> MambaConfig | Mamba2Config:
    """transformers' config for a raw mamba_ssm config, of the class its mixer (`ssm_cfg.layer`) needs."""
    return mamba2_config_from_raw(raw) if mixer_layer(raw) == "Mamba2" else mamba_config_from_raw(raw)


def language_model_class(config: MambaConfig | Mamba2Config) -> type[MambaForCausalLM] | type[Mamba2ForCausalLM]:
    """The transformers model of a config from `language_model_config_from_raw`."""
    return next(model for model in LAYERS.values() if type(config) is model.config_class)


def is_raw_mamba_ssm(folder: str | Path) -> bool:
    """Whether `folder` holds a mamba_ssm-format config (rather than a transformers one)."""
    config = Path(folder) / "config.json"
    return config.is_file() and "d_model" in read_json(config) and "model_type" not in read_json(config)


def convert_raw_weights(
    raw_dir: str | Path, dtype: torch.dtype | None = None, key_map: KeyMap = MAMBA_SSM_KEYS
) -> tuple[MambaConfig | Mamba2Config, dict[str, torch.Tensor]]:
    """The config and the state dict of a raw mamba_ssm folder: a `MambaForCausalLM`'s for a Mamba-1 mixer, a
    `Mamba2ForCausalLM`'s for a Mamba-2 one (`language_model_class` of the config; strict key accounting)."""
    raw_dir = Path(raw_dir)
    config = language_model_config_from_raw(read_json(raw_dir / "config.json"))
    model_class = language_model_class(config)
    expected = expected_tensors(model_class, config)
    tied = tied_keys(model_class, config)
    state_dict = convert_state_dict(
        read_checkpoint(raw_dir), key_map, expected, tied=tied, dtype=dtype, description="Converting mamba_ssm"
    )
    return config, state_dict


def mamba_ssm_reference(raw_dir: str | Path) -> ReferenceForward | None:
    """The source model's forward through mamba_ssm itself (its `MambaLMHeadModel`, Mamba-1 or Mamba-2 mixers as
    `ssm_cfg.layer` says), when it is installed and CUDA is available."""
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as RawConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None

    def forward(input_ids: torch.LongTensor) -> torch.Tensor:
        raw = read_json(Path(raw_dir) / "config.json")
        known = set(RawConfig.__dataclass_fields__)
        model = MambaLMHeadModel(RawConfig(**{k: v for k, v in raw.items() if k in known}), device="cuda")
        model.load_state_dict(read_checkpoint(raw_dir))
        with torch.no_grad():
            logits = model.float().eval()(input_ids.cuda()).logits.float().cpu()
        del model
        torch.cuda.empty_cache()
        return logits

    return forward


def convert_mamba_ssm(
    raw_dir: str | Path,
    output_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
    max_shard_size: str = MAX_SHARD_SIZE,
    reference: ReferenceForward | None = None,
) -> Path:
    """Convert a raw mamba_ssm folder into a transformers `MambaForCausalLM` (Mamba-1 mixers) or
    `Mamba2ForCausalLM` (Mamba-2 mixers) folder and verify it.

    The output is reloaded before it is moved into place: with a `reference` (the source model's forward; see
    `mamba_ssm_reference`) its fp32 logits on a fixed random input must match; without one its weights must
    equal the converted tensors.
    """
    check_output_dir(output_dir, force)
    raw_dir = resolve_folder(raw_dir, "mamba_ssm checkpoint")
    config, state_dict = convert_raw_weights(raw_dir, dtype)
    model_class = language_model_class(config)
    model = build_model(model_class, config, state_dict)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else None
    input_ids = random_token_ids(config.vocab_size)
    reference_logits = reference(input_ids) if reference is not None else None

    def verify(folder: Path) -> None:
        inputs = {"input_ids": input_ids}
        verify_folder(folder, model_class, state_dict, inputs, reference_logits, dominant_dtype(state_dict.values()))

    return save_folder(model, output_dir, tokenizer, force=force, max_shard_size=max_shard_size, finalize=verify)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "raw_dir",
        help="mamba_ssm folder or Hub id, Mamba-1 or Mamba-2 (config.json + pytorch_model.bin / safetensors)",
    )
    add_output_arguments(parser)
    parser.add_argument("--tokenizer", help="tokenizer folder to copy in (e.g. EleutherAI/gpt-neox-20b)")
    args = parser.parse_args(argv)
    reference = mamba_ssm_reference(resolve_folder(args.raw_dir, "mamba_ssm checkpoint"))
    folder = convert_mamba_ssm(
        args.raw_dir,
        args.output_dir,
        tokenizer_dir=args.tokenizer,
        dtype=parse_dtype(args.dtype),
        force=args.force,
        max_shard_size=args.max_shard_size,
        reference=reference,
    )
    print(f"{read_json(folder / 'config.json')['architectures'][0]} saved to {folder}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
