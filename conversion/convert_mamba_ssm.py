"""Raw mamba_ssm language model -> transformers `MambaForCausalLM` folder.

The paper's LLM (`state-spaces/mamba-2.8b-slimpj`) and `xiuyul/mamba-2.8b-zephyr` exist only in mamba_ssm's own
format: `config.json` (`d_model, n_layer, vocab_size, ssm_cfg, rms_norm, residual_in_fp32, fused_add_norm,
pad_vocab_size_multiple`) and `pytorch_model.bin` with `backbone.embedding.weight`, `backbone.layers.{i}.*`,
`backbone.norm_f.weight` and a tied `lm_head.weight`.

    vlmamba convert-mamba-ssm state-spaces/mamba-2.8b-slimpj OUT_DIR --tokenizer EleutherAI/gpt-neox-20b
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM

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
# Accepted, but with no effect on the network's function.
SSM_CFG_IGNORED = ("use_fast_path", "layer")

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


def mamba_config_from_raw(raw: dict) -> MambaConfig:
    """transformers' `MambaConfig` for a raw mamba_ssm config; raises `ConversionError` for what it cannot express."""
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
    problems += [
        f"ssm_cfg.{name}={ssm_cfg[name]!r} must be a positive integer"
        for name in ("d_state", "d_conv", "expand")
        if name in ssm_cfg and not is_positive_int(ssm_cfg[name])
    ]
    if "dt_rank" in ssm_cfg and ssm_cfg["dt_rank"] != "auto" and not is_positive_int(ssm_cfg["dt_rank"]):
        problems.append(f"ssm_cfg.dt_rank={ssm_cfg['dt_rank']!r} must be 'auto' or a positive integer")
    if ssm_cfg.get("layer", "Mamba1") != "Mamba1":
        problems.append(f"ssm_cfg.layer={ssm_cfg['layer']!r}: only Mamba-1 mixers are converted")
    unknown = sorted(set(ssm_cfg) - set(SSM_CFG_FIELDS) - set(SSM_CFG_IGNORED))
    if unknown:
        problems.append(f"ssm_cfg keys {unknown} have no Mamba-1 equivalent (a Mamba-2 config?)")
    if not raw.get("rms_norm", True):
        problems.append("rms_norm=false (LayerNorm blocks): transformers' Mamba has RMSNorm blocks only")
    if raw.get("d_intermediate", 0):
        problems.append(f"d_intermediate={raw['d_intermediate']} (MLP blocks): transformers' Mamba has none")
    if raw.get("attn_layer_idx"):
        problems.append(f"attn_layer_idx={raw['attn_layer_idx']} (attention layers): transformers' Mamba has none")
    if problems:
        raise ConversionError(
            "This raw mamba_ssm config cannot be converted to transformers' MambaConfig:\n  " + "\n  ".join(problems)
        )
    return MambaConfig(
        hidden_size=raw["d_model"],
        num_hidden_layers=raw["n_layer"],
        vocab_size=pad_vocab_size(raw["vocab_size"], raw.get("pad_vocab_size_multiple", 8)),
        residual_in_fp32=raw.get("residual_in_fp32", True),
        layer_norm_epsilon=raw.get("norm_epsilon", 1e-5),
        tie_word_embeddings=raw.get("tie_embeddings", True),
        **{SSM_CFG_FIELDS[key]: value for key, value in ssm_cfg.items() if key in SSM_CFG_FIELDS},
    )


def is_raw_mamba_ssm(folder: str | Path) -> bool:
    """Whether `folder` holds a mamba_ssm-format config (rather than a transformers one)."""
    config = Path(folder) / "config.json"
    return config.is_file() and "d_model" in read_json(config) and "model_type" not in read_json(config)


def convert_raw_weights(
    raw_dir: str | Path, dtype: torch.dtype | None = None, key_map: KeyMap = MAMBA_SSM_KEYS
) -> tuple[MambaConfig, dict[str, torch.Tensor]]:
    """The config and the `MambaForCausalLM` state dict of a raw mamba_ssm folder (strict key accounting)."""
    raw_dir = Path(raw_dir)
    config = mamba_config_from_raw(read_json(raw_dir / "config.json"))
    expected = expected_tensors(MambaForCausalLM, config)
    tied = tied_keys(MambaForCausalLM, config)
    state_dict = convert_state_dict(
        read_checkpoint(raw_dir), key_map, expected, tied=tied, dtype=dtype, description="Converting mamba_ssm"
    )
    return config, state_dict


def mamba_ssm_reference(raw_dir: str | Path) -> ReferenceForward | None:
    """The source model's forward through mamba_ssm itself, when it is installed and CUDA is available."""
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
    """Convert a raw mamba_ssm folder into a transformers `MambaForCausalLM` folder and verify it.

    The output is reloaded before it is moved into place: with a `reference` (the source model's forward; see
    `mamba_ssm_reference`) its fp32 logits on a fixed random input must match; without one its weights must
    equal the converted tensors.
    """
    check_output_dir(output_dir, force)
    raw_dir = resolve_folder(raw_dir, "mamba_ssm checkpoint")
    config, state_dict = convert_raw_weights(raw_dir, dtype)
    model = build_model(MambaForCausalLM, config, state_dict)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir is not None else None
    input_ids = random_token_ids(config.vocab_size)
    reference_logits = reference(input_ids) if reference is not None else None

    def verify(folder: Path) -> None:
        inputs = {"input_ids": input_ids}
        verify_folder(
            folder, MambaForCausalLM, state_dict, inputs, reference_logits, dominant_dtype(state_dict.values())
        )

    return save_folder(model, output_dir, tokenizer, force=force, max_shard_size=max_shard_size, finalize=verify)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("raw_dir", help="mamba_ssm folder or Hub id (config.json + pytorch_model.bin / safetensors)")
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
    print(f"MambaForCausalLM saved to {folder}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
