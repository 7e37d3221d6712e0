"""The language model's multi-token forward (prefill and training) through mamba_ssm's fused kernels on CUDA.

transformers' Mamba runs each residual add and RMSNorm as about ten PyTorch kernels in fp32, and lays the mixer's
projections out so that the kernels copy them: on the 2.8B shape its prefill and training step take 1.5x to 1.8x
mamba_ssm's own (bench/RESULTS.md). The classes here are subclasses of transformers' `MambaModel`, `MambaBlock`,
`MambaMixer` and `MambaRMSNorm` with the same parameters (no key changes), which `use_fused_kernels` puts in place of
a built `MambaModel`'s. On CUDA, with mamba_ssm and causal-conv1d installed, a multi-token forward then computes what
mamba_ssm's `MixerModel`, `Block` and `Mamba` compute:

- the residual is carried from block to block, and each residual add + RMSNorm is mamba_ssm's fused Triton kernel
  (with autograd), the residual kept in fp32 by it;
- an attention mask without padding is dropped once, rather than multiplied in twice per layer;
- the input projection is one `weight @ x` matmul whose output the scan kernels read without a copy (a PEFT adapter
  on `in_proj` is called as its module instead);
- training without a cache runs mamba_ssm's fused `mamba_inner_fn`; prefill and other forwards run the causal conv
  and the selective scan on contiguous inputs, zeroing padded positions before and after the conv, as transformers
  does, so that left padding stays exact, and writing the conv and scan states into the cache.

Everything else (single-token decode steps, CPU, no kernels, hidden states asked for layer by layer) takes
transformers' own forward. The blocks are still called as modules, so gradient checkpointing, FSDP2's hooks and PEFT
work on this path as on transformers'.

A FalconMamba keeps transformers' forward, but is trained through it too (`UnfusedTrainingFalconMambaMixer`): the
fused training kernel transformers calls for it computes another function.
"""

import functools

import torch
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaMixer, FalconMambaModel
from transformers.models.mamba.modeling_mamba import (
    MambaBlock,
    MambaMixer,
    MambaModel,
    MambaOutput,
    MambaRMSNorm,
    apply_mask_to_padding_states,
    causal_conv1d_fn,
    mamba_inner_fn,
    mamba_selective_scan,
)
from transformers.utils.import_utils import is_causal_conv1d_available, is_mamba_ssm_available


@functools.cache
def _kernels_installed() -> bool:
    return is_mamba_ssm_available() and is_causal_conv1d_available()


def uses_fused_kernels(hidden_states: torch.Tensor) -> bool:
    """Whether a multi-token forward of `hidden_states` runs through the fused kernels (CUDA, kernels installed)."""
    return hidden_states.is_cuda and _kernels_installed()


def rms_norm(
    hidden_states: torch.Tensor,
    norm: MambaRMSNorm,
    residual: torch.Tensor | None = None,
    residual_in_fp32: bool = False,
    prenorm: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """mamba_ssm's fused `RMSNorm(hidden_states + residual)` with `norm`'s weight, in `hidden_states`' dtype; with
    `prenorm`, also the sum itself (in fp32 with `residual_in_fp32`), the next block's residual."""
    from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

    return rms_norm_fn(
        hidden_states,
        norm.weight,
        None,
        residual=residual,
        eps=norm.variance_epsilon,
        prenorm=prenorm,
        residual_in_fp32=residual_in_fp32,
    )


class FusedMambaRMSNorm(MambaRMSNorm):
    """`MambaRMSNorm` (the final `norm_f`) that, given the last block's residual, adds it in the fused kernel."""

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return super().forward(hidden_states)
        return rms_norm(hidden_states, self, residual=residual)


class FusedMambaMixer(MambaMixer):
    """`MambaMixer` whose multi-token forward (no previous state) runs as mamba_ssm's `Mamba.forward` does."""

    def forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs) -> torch.Tensor:
        """`(batch, seq, hidden)` -> `(batch, seq, hidden)`; the conv and scan states go into `cache_params`."""
        continuing = cache_params is not None and cache_params.has_previous_state(self.layer_idx)
        if continuing or not uses_fused_kernels(hidden_states):
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        batch, seq_len, _ = hidden_states.shape
        xz = self._project_in(apply_mask_to_padding_states(hidden_states, attention_mask))
        A = -torch.exp(self.A_log.float())
        if self.training and cache_params is None:
            fused = mamba_inner_fn(
                xz,
                self.conv1d.weight,
                self.conv1d.bias,
                self.x_proj.weight,
                self.dt_proj.weight,
                self.out_proj.weight,
                self.out_proj.bias,
                A,
                None,  # input-dependent B
                None,  # input-dependent C
                self.D.float(),
                delta_bias=self.dt_proj.bias.float(),
                delta_softplus=True,
            )
            if fused is not None:  # None from transformers' stand-in where mamba_ssm is missing
                return fused
        x, z = xz.chunk(2, dim=1)
        conv_input = x
        if cache_params is not None:  # prefill: the conv state is the last inputs, zero-padded if they are fewer
            conv_input = cache_params.update_conv_state(x, self.layer_idx, conv_kernel_size=self.conv_kernel_size)
        x = causal_conv1d_fn(conv_input, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation=self.activation)
        x = x[..., -seq_len:]
        if attention_mask is not None:  # pad positions stay zero after the conv too: left padding is exact
            x = x * attention_mask[:, None, :].to(x.dtype)
        x_dbl = self.x_proj(x.transpose(1, 2).reshape(batch * seq_len, -1))
        time_step, B, C = torch.split(x_dbl, [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1)
        time_step = (self.dt_proj.weight @ time_step.t()).view(-1, batch, seq_len).transpose(0, 1)
        B = B.view(batch, seq_len, -1).transpose(1, 2).contiguous()
        C = C.view(batch, seq_len, -1).transpose(1, 2).contiguous()
        scanned = mamba_selective_scan(
            x,
            time_step,
            A,
            B,
            C,
            self.D.float(),
            z=z,
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
            return_last_state=cache_params is not None,
            use_mambapy=self.use_mambapy,
        )
        if cache_params is not None:
            scanned, last_state = scanned
            cache_params.update_recurrent_state(last_state, self.layer_idx)
        # Contiguous first: on a transposed view the matmul falls back to a batched GEMM several times slower.
        return self.out_proj(scanned.transpose(1, 2).contiguous())

    def _project_in(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`in_proj` as `(batch, 2 * intermediate, seq)` laid out as the scan kernels read it (last axis contiguous):
        mamba_ssm's `weight @ x`, or, for a PEFT adapter around `in_proj`, its module call."""
        batch, seq_len, width = hidden_states.shape
        if type(self.in_proj) is not nn.Linear:
            return self.in_proj(hidden_states).transpose(1, 2)
        projected = self.in_proj.weight @ hidden_states.reshape(batch * seq_len, width).t()
        if self.in_proj.bias is not None:
            projected = projected + self.in_proj.bias.to(projected.dtype)[:, None]
        return projected.view(-1, batch, seq_len).transpose(0, 1)


class FusedMambaBlock(MambaBlock):
    """`MambaBlock` that, called by `FusedMambaModel` with `carry_residual`, runs as mamba_ssm's `Block`: the previous
    block's residual add and this block's RMSNorm in one fused kernel, the mixer's output returned with the residual
    instead of added to it. Called as a `MambaBlock` (decode steps, hidden states asked for), it is one."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        cache_params=None,
        attention_mask=None,
        residual: torch.Tensor | None = None,
        carry_residual: bool = False,
        **kwargs,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """With `carry_residual`: `hidden_states` (the previous mixer's output, or the embeddings for the first block)
        and `residual` (None for the first block) -> `(mixer output, residual)`, each `(batch, seq, hidden)`."""
        if not carry_residual:
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask)
        normed, residual = rms_norm(
            hidden_states, self.norm, residual=residual, residual_in_fp32=self.residual_in_fp32, prenorm=True
        )
        return self.mixer(normed, cache_params=cache_params, attention_mask=attention_mask), residual


class FusedMambaModel(MambaModel):
    """`MambaModel` whose multi-token forward on CUDA carries the residual from block to block as mamba_ssm's
    `MixerModel` does, so that each residual add happens inside the next RMSNorm's fused kernel."""

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_params=None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple | MambaOutput:
        embeddings = self.embeddings.weight if inputs_embeds is None else inputs_embeds
        tokens = input_ids if inputs_embeds is None else inputs_embeds
        per_layer = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        if (
            (input_ids is None) == (inputs_embeds is None)
            or tokens.shape[1] == 1
            or per_layer
            or not uses_fused_kernels(embeddings)
        ):
            return super().forward(
                input_ids=input_ids,
                inputs_embeds=inputs_embeds,
                cache_params=cache_params,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                return_dict=return_dict,
                attention_mask=attention_mask,
                **kwargs,
            )
        # From here, what MambaModel.forward does, with the residual carried.
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        use_cache = use_cache and not (self.gradient_checkpointing and self.training)
        if use_cache and cache_params is None:
            cache_params = DynamicCache(config=self.config)
        if attention_mask is not None and bool(attention_mask.all()):  # nothing to zero: skip a pass per mask use
            attention_mask = None
        hidden_states = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        residual = None
        for block in self.layers:
            # positional: reentrant gradient checkpointing passes only positional tensors through
            hidden_states, residual = block(hidden_states, cache_params, attention_mask, residual, True)
        hidden_states = self.norm_f(hidden_states, residual=residual)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if not return_dict:
            return tuple(v for v in (hidden_states, cache_params if use_cache else None) if v is not None)
        return MambaOutput(last_hidden_state=hidden_states, cache_params=cache_params if use_cache else None)


class UnfusedTrainingFalconMambaMixer(FalconMambaMixer):
    """`FalconMambaMixer` trained through the kernels of its forward without a cache (causal conv, selective scan:
    both differentiable), never through the fused training kernel transformers calls for it when mamba_ssm is
    installed. That kernel (`mamba_inner_fn` with B/C/dt norms) RMS-normalises dt after the dt projection, over
    `intermediate_size` channels, where the forward normalises it before, over `time_step_rank`: it would train another
    function than the one the model computes at inference (on a tiny model, a loss 2.9e-3 apart)."""

    def forward(self, hidden_states: torch.Tensor, cache_params=None, attention_mask=None, **kwargs) -> torch.Tensor:
        if not self.training or cache_params is not None:
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        self.training = False  # the mixer's only use of it is to pick the fused training kernel
        try:
            return super().forward(hidden_states, cache_params=cache_params, attention_mask=attention_mask, **kwargs)
        finally:
            self.training = True


def use_fused_kernels(language_model: nn.Module) -> nn.Module:
    """Give a built `MambaModel` the fused subclasses of itself, its blocks, mixers and final norm, and a
    `FalconMambaModel` its `UnfusedTrainingFalconMambaMixer`s (in place: same modules, parameters and state-dict keys).
    Models of other types are returned as they are."""
    if type(language_model) is FalconMambaModel:
        for layer in language_model.layers:
            layer.mixer.__class__ = UnfusedTrainingFalconMambaMixer
        return language_model
    if type(language_model) is not MambaModel:
        return language_model
    language_model.__class__ = FusedMambaModel
    language_model.norm_f.__class__ = FusedMambaRMSNorm
    for layer in language_model.layers:
        layer.__class__ = FusedMambaBlock
        layer.mixer.__class__ = FusedMambaMixer
    return language_model
