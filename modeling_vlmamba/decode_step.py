"""The language model's one-token decode step (`decode_step`), the step `DecodeGraph` captures, for each backbone a
VL-Mamba is built on: Mamba, FalconMamba (Mamba's mixer with weightless RMSNorms on dt, B and C) and Mamba-2 (the
multi-head SSD mixer with a gated RMSNorm).

Each computes what `language_model(input_ids, cache_params=cache)` computes for one token, with fewer and cheaper
kernels: each residual add and RMSNorm is one kernel (`add_rms_norm`), `A` comes precomputed (`ssm_matrices`), and
every projection is a single `(batch, features)` matmul. The conv and SSM states in `cache` advance in place through
the same kernels (or PyTorch fallbacks) as the mixers'. The backbone is told by the text config's `model_type`, never
by the modules' names: a FalconMamba has exactly Mamba's parameter names.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache
from transformers.models.mamba.modeling_mamba import causal_conv1d_update, mamba_selective_state_update
from transformers.models.mamba2.modeling_mamba2 import mamba2_selective_state_update

from .decode_kernels import add_rms_norm, dt_bc_rms_norm, gated_rms_norm


def ssm_matrices(language_model: PreTrainedModel) -> torch.Tensor:
    """Every layer's state matrix `A = -exp(A_log)`, as its mixer computes it, fp32: `(layers, intermediate, state)`
    for Mamba and FalconMamba, `(layers, heads)` for Mamba-2 (one scalar per head)."""
    return -torch.exp(torch.stack([layer.mixer.A_log for layer in language_model.layers]).float())


def conv_step(mixer: nn.Module, x: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
    """The mixer's causal conv (and activation) for one token `(batch, channels)`; `conv_state` advances in place."""
    return causal_conv1d_update(
        x.unsqueeze(-1), conv_state, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation=mixer.activation
    ).squeeze(-1)


def mamba_mixer_step(
    mixer: nn.Module,
    hidden_states: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    A: torch.Tensor,
    dt_bc_rms_eps: float | None = None,
) -> torch.Tensor:
    """A Mamba-1 mixer (`MambaMixer`, or `FalconMambaMixer` with `dt_bc_rms_eps`, the eps of its weightless RMSNorms on
    dt, B and C) for one token: `(batch, hidden)` -> `(batch, hidden)`."""
    x, gate = mixer.in_proj(hidden_states).chunk(2, dim=-1)
    x = conv_step(mixer, x, conv_state)
    x_dbl = mixer.x_proj(x)
    if dt_bc_rms_eps is None:
        time_step, B, C = torch.split(
            x_dbl, [mixer.time_step_rank, mixer.ssm_state_size, mixer.ssm_state_size], dim=-1
        )
    else:
        time_step, B, C = dt_bc_rms_norm(x_dbl, mixer.time_step_rank, mixer.ssm_state_size, dt_bc_rms_eps)
    y = mamba_selective_state_update(
        ssm_state,
        x,
        nn.functional.linear(time_step, mixer.dt_proj.weight),  # its bias is added in fp32, as the mixer does
        A,
        B,
        C,
        mixer.D,
        z=gate,
        dt_bias=mixer.dt_proj.bias,
        dt_softplus=True,
    )
    return mixer.out_proj(y)


def falcon_mamba_mixer_step(
    mixer: nn.Module, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, A: torch.Tensor
) -> torch.Tensor:
    """A `FalconMambaMixer` for one token: Mamba's step with dt, B and C RMS-normalised (no weights)."""
    return mamba_mixer_step(mixer, hidden_states, conv_state, ssm_state, A, dt_bc_rms_eps=mixer.rms_eps)


def mamba2_mixer_step(
    mixer: nn.Module, hidden_states: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, A: torch.Tensor
) -> torch.Tensor:
    """A `Mamba2Mixer` for one token, as mamba_ssm's `Mamba2.step`: `(batch, hidden)` -> `(batch, hidden)`; `A` is
    `(heads,)`, `ssm_state` `(batch, heads, head_dim, state)`."""
    batch = hidden_states.shape[0]
    heads, head_dim, state_size, groups = mixer.num_heads, mixer.head_dim, mixer.ssm_state_size, mixer.n_groups
    gate, xBC, dt = mixer.in_proj(hidden_states).split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
    x, B, C = conv_step(mixer, xBC, conv_state).split(
        [mixer.intermediate_size, groups * state_size, groups * state_size], dim=-1
    )
    # Per-head scalars broadcast over the head's channels (stride 0), which the kernel reads as one value per head.
    y = mamba2_selective_state_update(
        ssm_state,
        x.view(batch, heads, head_dim),
        dt[..., None].expand(-1, -1, head_dim),
        A[:, None, None].expand(-1, head_dim, state_size),
        B.view(batch, groups, state_size),
        C.view(batch, groups, state_size),
        mixer.D[:, None].expand(-1, head_dim),
        z=None,
        dt_bias=mixer.dt_bias[:, None].expand(-1, head_dim),
        dt_softplus=True,
    )
    return mixer.out_proj(gated_rms_norm(y.view(batch, -1), gate, mixer.norm))


MixerStep = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# The text config's model_type -> its mixer's one-token step.
MIXER_STEPS: dict[str, MixerStep] = {
    "mamba": mamba_mixer_step,
    "falcon_mamba": falcon_mamba_mixer_step,
    "mamba2": mamba2_mixer_step,
}


def decode_step(
    language_model: PreTrainedModel, input_ids: torch.LongTensor, cache: Cache, ssm_A: torch.Tensor
) -> torch.Tensor:
    """One cached token through the language model: `(batch, 1)` ids -> `(batch, 1, hidden)` final hidden states.

    `language_model` is a `MambaModel`, `FalconMambaModel` or `Mamba2Model`; `ssm_A` is `ssm_matrices` of it."""
    model_type = language_model.config.model_type
    if model_type not in MIXER_STEPS:
        raise NotImplementedError(
            f"No decode step for a '{model_type}' language model; known: {', '.join(MIXER_STEPS)}."
        )
    mixer_step = MIXER_STEPS[model_type]
    embeds = language_model.embeddings(input_ids[:, 0])
    residual, mixer_output = embeds.float() if language_model.config.residual_in_fp32 else embeds, None
    for layer_idx, (layer, A) in enumerate(zip(language_model.layers, ssm_A, strict=True)):
        residual, hidden_states = add_rms_norm(residual, mixer_output, layer.norm)
        mixer_output = mixer_step(
            layer.mixer,
            hidden_states,
            cache.get_conv_state(layer_idx, state_idx=0),
            cache.get_recurrent_state(layer_idx, state_idx=0),
            A,
        )
    _, hidden_states = add_rms_norm(residual, mixer_output, language_model.norm_f, block_norm=False)
    return hidden_states[:, None]
