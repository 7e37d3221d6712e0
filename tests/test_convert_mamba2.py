"""Raw mamba_ssm Mamba-2 checkpoints -> transformers' `Mamba2ForCausalLM`: tiny random checkpoints in mamba_ssm's
layout, converted and compared with a reference forward written from mamba_ssm's `Mamba2` module; mixer settings
that transformers cannot compute, and checkpoints whose weights belong to the other mixer, are refused by name.
The GPU test compares with mamba_ssm's own `MambaLMHeadModel`."""

import importlib.util
import json

import pytest
import torch
from transformers import Mamba2ForCausalLM

from tests.conftest import interrupt_saving, leftovers
from tests.reference_mamba2 import (
    mamba2_lm_forward,
    random_mamba2_ssm_state,
    raw_mamba2_config,
    write_mamba2_ssm_checkpoint,
)
from tests.reference_models import raw_mamba_config, write_mamba_ssm_checkpoint
from vlmamba.cli import run_tool
from vlmamba.conversion import convert_mamba_ssm as convert_mamba_ssm_module
from vlmamba.conversion.checkpoint import ConversionError
from vlmamba.conversion.convert_mamba_ssm import (
    convert_mamba_ssm,
    convert_raw_weights,
    is_raw_mamba_ssm,
    language_model_class,
    language_model_config_from_raw,
)

# transformers' chunked fp32 scan vs a float64 step-by-step recurrence, on logits of magnitude up to about 3.
ATOL = 1e-5
PROG = "vlmamba convert-mamba-ssm"
# With mamba_ssm or causal-conv1d installed, transformers' Mamba2 calls their CUDA kernels for CPU tensors too; the
# CPU comparisons then cannot run (the GPU test covers such machines).
torch_path_only = pytest.mark.skipif(
    any(importlib.util.find_spec(name) for name in ("mamba_ssm", "causal_conv1d")),
    reason="transformers' Mamba2 takes the mamba_ssm / causal-conv1d kernels, CUDA only",
)


def reference(raw: dict, state: dict):
    return lambda input_ids: mamba2_lm_forward(state, raw, input_ids)


def write(folder, **overrides) -> tuple[dict, dict]:
    raw = raw_mamba2_config(**overrides)
    return raw, write_mamba2_ssm_checkpoint(folder, raw)


@pytest.fixture
def raw_dir(tmp_path):
    write(tmp_path / "raw")
    return tmp_path / "raw"


# ---------------------------------------------------------------- the same function


VARIANTS = {
    "one-group": {},
    "two-groups": {"ssm_cfg": {"ngroups": 2}},
    # every other mixer setting that changes the function or the weights, and an untied LM head
    "mixer-settings": {
        "ssm_cfg": {"ngroups": 4, "expand": 1, "headdim": 8, "d_conv": 3, "bias": True, "conv_bias": False}
        | {"dt_limit": [0.05, 0.2]},
        "tie_embeddings": False,
    },
}


@torch_path_only
@pytest.mark.parametrize("overrides", VARIANTS.values(), ids=VARIANTS.keys())
def test_mamba2_checkpoint_converts_to_the_same_function(tmp_path, tokenizer, overrides):
    raw, state = write(tmp_path / "raw", **overrides)
    tokenizer.save_pretrained(tmp_path / "tok")
    out = convert_mamba_ssm(
        tmp_path / "raw", tmp_path / "out", tokenizer_dir=tmp_path / "tok", reference=reference(raw, state)
    )

    model = Mamba2ForCausalLM.from_pretrained(out)
    config, ssm_cfg = model.config, raw["ssm_cfg"]
    assert config.vocab_size == 64  # 50 padded to a multiple of 16, as mamba_ssm does
    assert (config.n_groups, config.chunk_size, config.head_dim) == (ssm_cfg.get("ngroups", 1), 8, ssm_cfg["headdim"])
    assert config.num_heads == ssm_cfg.get("expand", 2) * 64 // ssm_cfg["headdim"] == 8
    assert (config.eos_token_id, config.pad_token_id) == (0, 0)  # GPT-NeoX's <|endoftext|>, as for Mamba-1
    assert (model.lm_head.weight is model.backbone.embeddings.weight) == raw["tie_embeddings"]
    ids = torch.randint(0, 64, (3, 21), generator=torch.Generator().manual_seed(7))  # 21 steps: three chunks of 8
    with torch.no_grad():
        logits = model(ids).logits
    expected = reference(raw, state)(ids)
    print(f"\nMamba-2 converted vs reference: max |logits difference| {(logits - expected).abs().max():.2e}")
    torch.testing.assert_close(logits, expected, rtol=0, atol=ATOL)
    assert (out / "tokenizer.json").is_file() and leftovers(tmp_path) == []


def test_raw_mamba2_config_maps_onto_mamba2config():
    raw = raw_mamba2_config(ssm_cfg={"dt_min": 0.01, "dt_max": 1, "dt_init_floor": 0.001, "dt_limit": [0, 3]})
    config = language_model_config_from_raw(raw)
    assert language_model_class(config) is Mamba2ForCausalLM
    assert (config.hidden_size, config.num_hidden_layers, config.state_size, config.conv_kernel) == (64, 2, 16, 4)
    assert (config.time_step_min, config.time_step_max, config.time_step_floor) == (0.01, 1.0, 0.001)
    assert config.time_step_limit == (0.0, 3.0) and config.layer_norm_epsilon == 1e-5
    assert config.tie_word_embeddings and config.residual_in_fp32 and not config.use_bias and config.use_conv_bias
    # mamba_ssm's own defaults where the config leaves them out (Mamba2Config's differ: n_groups 8)
    defaults = language_model_config_from_raw(raw_mamba2_config(d_model=128) | {"ssm_cfg": {"layer": "Mamba2"}})
    assert (defaults.state_size, defaults.head_dim, defaults.n_groups, defaults.num_heads) == (128, 64, 1, 4)
    assert (defaults.chunk_size, defaults.time_step_limit) == (256, (0.0, float("inf")))


def test_the_published_mamba2_2_7b_config_converts():
    """state-spaces/mamba2-2.7b's config.json."""
    raw = {
        "d_model": 2560,
        "d_intermediate": 0,
        "n_layer": 64,
        "vocab_size": 50277,
        "ssm_cfg": {"layer": "Mamba2"},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": True,
    }
    config = language_model_config_from_raw(raw)
    assert (config.vocab_size, config.num_heads, config.head_dim, config.n_groups) == (50288, 80, 64, 1)
    assert (config.state_size, config.expand, config.num_hidden_layers) == (128, 2, 64)


def test_dtype_option_casts_and_still_verifies(tmp_path):
    raw, state = write(tmp_path / "raw")
    out = convert_mamba_ssm(tmp_path / "raw", tmp_path / "out", dtype=torch.bfloat16, reference=reference(raw, state))
    assert Mamba2ForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_failed_verification_leaves_nothing(tmp_path):
    raw, state = write(tmp_path / "raw")
    with pytest.raises(ConversionError, match="Converted logits differ from the source model"):
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out", reference=lambda ids: reference(raw, state)(ids) + 0.01)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_compose_helpers_see_a_raw_mamba2_folder(raw_dir):
    assert is_raw_mamba_ssm(raw_dir)
    config, weights = convert_raw_weights(raw_dir)
    assert language_model_class(config) is Mamba2ForCausalLM
    assert "backbone.layers.1.mixer.dt_bias" in weights and "lm_head.weight" not in weights  # tied


# ---------------------------------------------------------------- what transformers' Mamba2 cannot compute


@pytest.mark.parametrize(
    ("ssm_cfg", "message"),
    [
        ({"D_has_hdim": True}, "ssm_cfg.D_has_hdim=True (D per channel: transformers' Mamba2 has one D per head)"),
        ({"rmsnorm": False}, "ssm_cfg.rmsnorm=False (no gated RMSNorm: transformers' Mamba2 always applies it)"),
        ({"norm_before_gate": True}, "ssm_cfg.norm_before_gate=True (RMSNorm before the gate"),
        ({"d_ssm": 64}, "ssm_cfg.d_ssm=64 (the SSM on part of the width, a gated MLP on the rest)"),
        ({"headdim": 48}, "ssm_cfg.headdim=48 must divide expand * d_model = 128"),
        ({"ngroups": 3}, "ssm_cfg.ngroups=3 must divide the number of heads, expand * d_model / headdim = 8"),
        ({"dt_limit": [0.2, 0.1]}, "ssm_cfg.dt_limit=[0.2, 0.1] must be [low, high] with 0 <= low <= high"),
        ({"chunk_size": 0}, "ssm_cfg.chunk_size=0 must be a positive integer"),
        ({"bias": "no"}, "ssm_cfg.bias='no' must be true or false"),
        ({"dt_rank": 4}, "ssm_cfg keys ['dt_rank'] have no Mamba-2 equivalent"),
    ],
)
def test_mamba2_mixer_settings_transformers_cannot_compute_are_rejected(tmp_path, ssm_cfg, message):
    write(tmp_path / "raw", ssm_cfg=ssm_cfg)
    with pytest.raises(ConversionError, match="cannot be converted to transformers' Mamba2Config") as error:
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    assert message in str(error.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rms_norm": False}, "rms_norm=false (LayerNorm blocks): transformers' Mamba2 has RMSNorm blocks only"),
        ({"d_intermediate": 64}, "d_intermediate=64 (MLP blocks): transformers' Mamba2 has none"),
        ({"attn_layer_idx": [1]}, "attn_layer_idx=[1] (attention layers): transformers' Mamba2 has none"),
        ({"norm_epsilon": 1e-6}, "norm_epsilon=1e-06: mamba_ssm's Mamba2 normalises its gated output with 1e-05"),
    ],
)
def test_mamba2_blocks_transformers_cannot_compute_are_rejected(tmp_path, overrides, message):
    write(tmp_path / "raw", **overrides)
    with pytest.raises(ConversionError, match="cannot be converted to transformers' Mamba2Config") as error:
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    assert message in str(error.value)


def test_an_unknown_mixer_is_refused_not_converted_as_mamba1(tmp_path):
    write_mamba_ssm_checkpoint(tmp_path / "raw", ssm_cfg={"layer": "Mamba3", "d_state": 4})
    message = (
        "ssm_cfg.layer='Mamba3' cannot be converted: transformers computes mamba_ssm's 'Mamba1' (MambaForCausalLM) "
        "and 'Mamba2' (Mamba2ForCausalLM) mixers only."
    )
    with pytest.raises(ConversionError) as error:
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    assert str(error.value) == message
    assert not (tmp_path / "out").exists()


def test_mamba1_weights_under_a_mamba2_config_are_named(tmp_path):
    """The config decides the target; the Mamba-1 tensors then do not fit it, and every misfit is named."""
    write_mamba_ssm_checkpoint(tmp_path / "raw", ssm_cfg={"layer": "Mamba2", "d_state": 4, "headdim": 8})
    with pytest.raises(ConversionError, match="The checkpoint does not match the target model") as error:
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    message = str(error.value)
    # in_proj: Mamba-1 holds [x, z] (2 * 32 rows), Mamba-2 [z, x, B, C, dt] (2 * 32 + 2 * 4 + 4 heads)
    assert (
        "backbone.layers.0.mixer.in_proj.weight -> backbone.layers.0.mixer.in_proj.weight: torch.float32 (64, 16), "
        "expected torch.float32 (76, 16)"
    ) in message
    assert "A_log -> backbone.layers.0.mixer.A_log: torch.float32 (32, 4), expected torch.float32 (4,)" in message
    assert "unexpected (no target tensor):\n  backbone.layers.0.mixer.dt_proj.bias" in message
    assert "missing (no source tensor):\n  backbone.layers.0.mixer.dt_bias" in message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_mamba2_weights_under_a_mamba1_config_are_named(tmp_path):
    raw = raw_mamba2_config()
    state = random_mamba2_ssm_state(raw)
    # the config lost its "layer": with Mamba-2 settings, the Mamba-1 reading refuses them and says what to add
    without_layer = {**raw, "ssm_cfg": {k: v for k, v in raw["ssm_cfg"].items() if k != "layer"}}
    write_mamba2_ssm_checkpoint(tmp_path / "raw", without_layer, state)
    with pytest.raises(ConversionError, match="cannot be converted to transformers' MambaConfig") as error:
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    assert (
        "ssm_cfg keys ['chunk_size', 'headdim'] have no Mamba-1 equivalent (a Mamba-2 config? Then add "
        '"layer": "Mamba2")'
    ) in str(error.value)
    # with settings Mamba-1 shares, the tensors do not fit a MambaForCausalLM
    write_mamba2_ssm_checkpoint(
        tmp_path / "raw", raw_mamba_config(d_model=64, pad_vocab_size_multiple=16, ssm_cfg={"d_state": 16}), state
    )
    with pytest.raises(ConversionError, match="The checkpoint does not match the target model") as error:
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    message = str(error.value)
    assert "A_log -> backbone.layers.0.mixer.A_log: torch.float32 (8,), expected torch.float32 (128, 16)" in message
    assert "in_proj.weight: torch.float32 (296, 64), expected torch.float32 (256, 64)" in message
    assert "missing (no source tensor):" in message and "\n  backbone.layers.0.mixer.x_proj.weight\n" in message
    assert "unexpected (no target tensor):\n  backbone.layers.0.mixer.dt_bias" in message
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- command line


def test_command_line_converts_mamba2(raw_dir, tmp_path, capsys):
    argv = [str(raw_dir), str(tmp_path / "out"), "--dtype", "float16", "--max-shard-size", "50KB"]
    assert run_tool(convert_mamba_ssm_module.main, argv, prog=PROG) == 0
    assert f"Mamba2ForCausalLM saved to {tmp_path / 'out'}" in capsys.readouterr().out
    assert Mamba2ForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.float16
    assert json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["weight_map"]

    assert run_tool(convert_mamba_ssm_module.main, argv, prog=PROG) == 1
    assert "already exists; pass force=True (--force) to overwrite it." in capsys.readouterr().err
    assert run_tool(convert_mamba_ssm_module.main, [*argv[:2], "--force"], prog=PROG) == 0
    assert Mamba2ForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.float32
    assert leftovers(tmp_path) == []


def test_command_line_help_names_mamba2(capsys):
    with pytest.raises(SystemExit):
        convert_mamba_ssm_module.main(["--help"], PROG)
    assert "Mamba2ForCausalLM" in capsys.readouterr().out


def test_command_line_refuses_an_unknown_mixer_in_one_line(tmp_path, capsys):
    write_mamba_ssm_checkpoint(tmp_path / "raw", ssm_cfg={"layer": "Mamba3"})
    assert run_tool(convert_mamba_ssm_module.main, [str(tmp_path / "raw"), str(tmp_path / "out")], prog=PROG) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{PROG}: error: ssm_cfg.layer='Mamba3' cannot be converted")


def test_an_interrupted_write_leaves_nothing(raw_dir, tmp_path, monkeypatch):
    interrupt_saving(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert_mamba_ssm(raw_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- mamba_ssm itself (GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_converted_mamba2_gives_mamba_ssms_logits(tmp_path):
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")  # mamba_ssm's Mamba2 forward runs its causal conv
    from mamba_ssm.models.config_mamba import MambaConfig as RawConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from vlmamba.conversion.convert_mamba_ssm import mamba_ssm_reference

    torch.manual_seed(0)
    ssm_cfg = {"layer": "Mamba2", "headdim": 64, "d_state": 64}
    raw = RawConfig(d_model=256, n_layer=4, vocab_size=1003, ssm_cfg=ssm_cfg, pad_vocab_size_multiple=16)
    source = MambaLMHeadModel(raw, device="cuda", dtype=torch.float32).eval()
    source.save_pretrained(str(tmp_path / "raw"))  # config.json + pytorch_model.bin, mamba_ssm's own format
    out = convert_mamba_ssm(tmp_path / "raw", tmp_path / "out", reference=mamba_ssm_reference(tmp_path / "raw"))

    converted = Mamba2ForCausalLM.from_pretrained(out, dtype=torch.float32).cuda().eval()
    assert (converted.config.vocab_size, converted.config.num_heads, converted.config.n_groups) == (1008, 8, 1)
    # 300 steps: past one chunk of 256, so that the state is carried from chunk to chunk
    ids = torch.randint(0, 1003, (4, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        expected, actual = source(ids).logits.float(), converted(ids).logits
    difference = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"\nconverted Mamba-2 vs mamba_ssm: max |logits difference| {difference:.2e} (|logits| <= {scale:.2f})")
    assert actual.shape == expected.shape
    assert difference <= 1e-4
