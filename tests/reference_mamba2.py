"""A reference forward of mamba_ssm's Mamba-2 language model, written from the math of mamba_ssm's `Mamba2` module
(`mamba_ssm/modules/mamba2.py`) and `MambaLMHeadModel` (not from transformers) as a plain recurrence over time in
float64, and a writer of tiny random checkpoints in mamba_ssm's own layout."""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from tests.reference_models import pad_vocab, rms_norm

# mamba_ssm's Mamba2 normalises its gated output with this epsilon (hard-coded there), its blocks with norm_epsilon.
GATED_NORM_EPSILON = 1e-5
# The `Mamba2.__init__` defaults of the settings that shape the weights or the function.
MIXER_DEFAULTS = {
    "d_state": 128,
    "d_conv": 4,
    "expand": 2,
    "headdim": 64,
    "ngroups": 1,
    "bias": False,
    "conv_bias": True,
    "dt_limit": (0.0, math.inf),
}


def raw_mamba2_config(**overrides) -> dict:
    """A tiny mamba_ssm Mamba-2 `config.json`: 8 heads of 16 channels, chunks of 8 steps. An `ssm_cfg` among the
    overrides is merged into the default one."""
    ssm_cfg = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 8} | overrides.pop("ssm_cfg", {})
    return {
        "d_model": 64,
        "n_layer": 2,
        "vocab_size": 50,
        "ssm_cfg": ssm_cfg,
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 16,
        "tie_embeddings": True,
        **overrides,
    }


def mixer_settings(raw: dict) -> dict:
    """The mixer settings of a raw config, mamba_ssm's defaults filled in, plus the derived widths."""
    settings = MIXER_DEFAULTS | raw["ssm_cfg"]
    settings["d_inner"] = settings["expand"] * raw["d_model"]
    settings["nheads"] = settings["d_inner"] // settings["headdim"]
    settings["conv_dim"] = settings["d_inner"] + 2 * settings["ngroups"] * settings["d_state"]
    return settings


def random_mamba2_ssm_state(raw: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of a mamba_ssm Mamba-2 `MambaLMHeadModel` under its own key names (`lm_head` tied unless
    `tie_embeddings` is false). Time steps span 0.02..0.5 and decays exp(-dt * A) with A in 1..4, so that the
    state carries across chunks."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=0.3):
        return torch.randn(*shape, generator=generator) * scale

    def uniform(n, low, high):
        return low + (high - low) * torch.rand(n, generator=generator)

    d, s = raw["d_model"], mixer_settings(raw)
    inner, heads, conv_dim = s["d_inner"], s["nheads"], s["conv_dim"]
    vocab = pad_vocab(raw["vocab_size"], raw["pad_vocab_size_multiple"])
    state = {"backbone.embedding.weight": randn(vocab, d, scale=0.1)}
    for i in range(raw["n_layer"]):
        prefix = f"backbone.layers.{i}."
        dt = torch.exp(uniform(heads, math.log(0.02), math.log(0.5)))
        state |= {
            prefix + "norm.weight": 1 + randn(d, scale=0.1),
            # output order [z, x, B, C, dt]
            prefix + "mixer.in_proj.weight": randn(
                2 * inner + 2 * s["ngroups"] * s["d_state"] + heads, d, scale=d**-0.5
            ),
            prefix + "mixer.conv1d.weight": randn(conv_dim, 1, s["d_conv"]),
            prefix + "mixer.dt_bias": dt + torch.log(-torch.expm1(-dt)),  # softplus(dt_bias) = dt
            prefix + "mixer.A_log": torch.log(uniform(heads, 1.0, 4.0)),
            prefix + "mixer.D": 1 + randn(heads, scale=0.1),
            prefix + "mixer.norm.weight": 1 + randn(inner, scale=0.1),
            prefix + "mixer.out_proj.weight": randn(d, inner, scale=inner**-0.5),
        }
        if s["conv_bias"]:
            state[prefix + "mixer.conv1d.bias"] = randn(conv_dim, scale=0.1)
        if s["bias"]:
            state[prefix + "mixer.in_proj.bias"] = randn(state[prefix + "mixer.in_proj.weight"].shape[0], scale=0.1)
            state[prefix + "mixer.out_proj.bias"] = randn(d, scale=0.1)
    state["backbone.norm_f.weight"] = 1 + randn(d, scale=0.1)
    # tied, as mamba_ssm saves it: the same tensor under both names
    state["lm_head.weight"] = (
        state["backbone.embedding.weight"] if raw["tie_embeddings"] else randn(vocab, d, scale=0.1)
    )
    return state


def write_mamba2_ssm_checkpoint(
    folder: Path, raw: dict | None = None, state: dict | None = None, seed: int = 0
) -> dict:
    """A random mamba_ssm Mamba-2 checkpoint in its own format: `config.json` + pickled `pytorch_model.bin`.
    Returns the state."""
    raw = raw_mamba2_config() if raw is None else raw
    state = random_mamba2_ssm_state(raw, seed) if state is None else state
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    torch.save(state, folder / "pytorch_model.bin")
    return state


def mamba2_mixer(x: torch.Tensor, p: dict[str, torch.Tensor], settings: dict) -> torch.Tensor:
    """mamba_ssm's `Mamba2.forward` (rmsnorm on, norm_before_gate off, D per head), one time step after another,
    for `x` of shape (B, L, D)."""
    batch, length, _ = x.shape
    inner, heads, conv_dim = settings["d_inner"], settings["nheads"], settings["conv_dim"]
    groups, n_state, kernel = settings["ngroups"], settings["d_state"], settings["d_conv"]
    z, xbc, dt = F.linear(x, p["in_proj.weight"], p.get("in_proj.bias")).split([inner, conv_dim, heads], dim=-1)
    # causal depthwise convolution over [x, B, C], then SiLU
    xbc = F.conv1d(xbc.transpose(1, 2), p["conv1d.weight"], p.get("conv1d.bias"), padding=kernel - 1, groups=conv_dim)
    xbc = F.silu(xbc[..., :length].transpose(1, 2))
    hidden, b, c = xbc.split([inner, groups * n_state, groups * n_state], dim=-1)
    hidden = hidden.reshape(batch, length, heads, settings["headdim"])
    # head h reads the B and C of group h // (heads per group)
    group_of_head = torch.arange(heads) // (heads // groups)
    b = b.reshape(batch, length, groups, n_state)[:, :, group_of_head]
    c = c.reshape(batch, length, groups, n_state)[:, :, group_of_head]
    low, high = settings["dt_limit"]
    dt = F.softplus(dt + p["dt_bias"]).clamp(min=low, max=high)  # (B, L, H)
    a = -torch.exp(p["A_log"])  # one scalar per head
    state = torch.zeros(batch, heads, settings["headdim"], n_state, dtype=x.dtype)
    outputs = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * a)[:, :, None, None]
        state = decay * state + dt[:, t, :, None, None] * hidden[:, t, :, :, None] * b[:, t, :, None, :]
        outputs.append((state * c[:, t, :, None, :]).sum(-1) + p["D"][:, None] * hidden[:, t])
    y = torch.stack(outputs, dim=1).reshape(batch, length, inner)
    # gated RMSNorm per group (norm_before_gate=False: gate first, then normalise)
    gated = (y * F.silu(z)).reshape(batch, length, groups, inner // groups)
    y = rms_norm(gated, torch.ones(()), GATED_NORM_EPSILON).reshape(batch, length, inner) * p["norm.weight"]
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias"))


def mamba2_lm_forward(state: dict, raw: dict, input_ids: torch.LongTensor) -> torch.Tensor:
    """mamba_ssm's Mamba-2 `MambaLMHeadModel` in float64: blocks `(hidden, residual) -> (mixer(norm(hidden +
    residual)), hidden + residual)`, `norm_f(hidden + residual)`, then the LM head. Returns float32 logits
    (B, L, V)."""
    state = {key: tensor.double() for key, tensor in state.items()}
    settings = mixer_settings(raw)
    hidden, residual = state["backbone.embedding.weight"][input_ids], None
    for i in range(raw["n_layer"]):
        prefix = f"backbone.layers.{i}.mixer."
        layer = {key.removeprefix(prefix): value for key, value in state.items() if key.startswith(prefix)}
        residual = hidden if residual is None else hidden + residual
        hidden = mamba2_mixer(rms_norm(residual, state[f"backbone.layers.{i}.norm.weight"]), layer, settings)
    hidden = rms_norm(hidden + residual, state["backbone.norm_f.weight"])
    return (hidden @ state["lm_head.weight"].T).float()
