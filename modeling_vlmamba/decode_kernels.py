"""Fused kernels of the CUDA-graph decode step (`mamba_decode_step`), with PyTorch fallbacks.

A graphed decode step of a 64-layer Mamba at small batch sizes is bound by the number of kernels it runs, not by
their work, so two Triton kernels replace the shortest ones of each layer:

- `add_rms_norm`: the residual add and `MambaRMSNorm` (about ten PyTorch kernels) as one. It computes what
  transformers' `MambaBlock` (or the final `norm_f`) computes: the sum in the promoted dtype of its operands, the norm
  input rounded to the weight's dtype (not for `norm_f`), the normalised value rounded to the norm input's dtype
  before the weight is applied.
- `selective_state_update`: the dt projection (a small matmul) fused into the one-token SSM recurrence. It computes
  what transformers' `MambaMixer` computes for a cached token: `dt_proj`'s matmul rounded to the activations' dtype,
  then its bias added, softplus and the state update in fp32, as mamba_ssm's `selective_state_update` does.

Both are used on CUDA when Triton is installed. Their fp32 sums differ from PyTorch's by summation order (and the
norm's `rsqrt` is approximate): an ulp or so, which bf16 rounding sometimes turns into one bf16 step.
"""

import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.mamba.modeling_mamba import MambaMixer, mamba_selective_state_update
from transformers.utils.import_utils import is_triton_available


def add_rms_norm(
    residual: torch.Tensor, mixer_output: torch.Tensor | None, norm: nn.Module, block_norm: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual + mixer_output` and its RMSNorm, both `(batch, hidden)`.

    Returns the new residual (the promoted dtype of the two) and the normalised hidden states. `block_norm=True`
    normalises as a `MambaBlock` does (the sum cast to the norm weight's dtype first, the result in that dtype);
    `block_norm=False` as `MambaModel`'s final `norm_f` does (the sum as it is, the result in the promoted dtype of it
    and the weight). `mixer_output=None` normalises `residual` alone. `norm` is a `MambaRMSNorm`.
    """
    if residual.is_cuda and is_triton_available():
        return _triton_add_rms_norm(residual, mixer_output, norm.weight, norm.variance_epsilon, block_norm)
    if mixer_output is not None:
        residual = residual + mixer_output
    return residual, norm(residual.to(norm.weight.dtype) if block_norm else residual)


def selective_state_update(
    mixer: MambaMixer,
    state: torch.Tensor,
    x: torch.Tensor,
    time_step: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    gate: torch.Tensor,
    A: torch.Tensor,
) -> torch.Tensor:
    """One token of `mixer`'s SSM, from the low-rank time step: returns `y` `(batch, intermediate)`.

    `state` `(batch, intermediate, state_size)` advances in place; `x` and `gate` are `(batch, intermediate)`,
    `time_step` `(batch, time_step_rank)`, `B` and `C` `(batch, state_size)` and `A` `(intermediate, state_size)`
    fp32 (`-exp(A_log)`). `dt = softplus(dt_proj(time_step))` is computed inside the kernel.
    """
    weight, bias = mixer.dt_proj.weight, mixer.dt_proj.bias
    if x.is_cuda and is_triton_available():
        return _triton_selective_state_update(state, x, time_step, weight, bias, A, B, C, mixer.D, gate)
    return mamba_selective_state_update(
        state, x, F.linear(time_step, weight), A, B, C, mixer.D, z=gate, dt_bias=bias, dt_softplus=True
    )


if is_triton_available():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(
        residual_ptr,
        mixer_output_ptr,
        weight_ptr,
        residual_out_ptr,
        normed_ptr,
        width,
        eps,
        HAS_MIXER_OUTPUT: tl.constexpr,
        BLOCK_NORM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        offsets = row * width + columns
        total = tl.load(residual_ptr + offsets, mask=inside, other=0.0)
        if HAS_MIXER_OUTPUT:
            mixer_output = tl.load(mixer_output_ptr + offsets, mask=inside, other=0.0)
            total = (total.to(tl.float32) + mixer_output.to(tl.float32)).to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + offsets, total, mask=inside)
        weight = tl.load(weight_ptr + columns, mask=inside, other=0.0)
        norm_input = total.to(weight.dtype) if BLOCK_NORM else total
        x = norm_input.to(tl.float32)
        inverse_rms = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
        normed = (x * inverse_rms).to(norm_input.dtype).to(tl.float32)
        tl.store(normed_ptr + offsets, (weight.to(tl.float32) * normed).to(normed_ptr.dtype.element_ty), mask=inside)

    def _triton_add_rms_norm(
        residual: torch.Tensor,
        mixer_output: torch.Tensor | None,
        weight: torch.Tensor,
        eps: float,
        block_norm: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = residual.contiguous()
        rows, width = residual.shape
        total_dtype = (
            residual.dtype if mixer_output is None else torch.promote_types(residual.dtype, mixer_output.dtype)
        )
        residual_out = torch.empty_like(residual, dtype=total_dtype)
        normed_dtype = weight.dtype if block_norm else torch.promote_types(weight.dtype, total_dtype)
        normed = torch.empty_like(residual, dtype=normed_dtype)
        block = triton.next_power_of_2(width)
        with torch.cuda.device(residual.device):  # Triton launches on the current device
            _add_rms_norm_kernel[(rows,)](
                residual,
                residual if mixer_output is None else mixer_output.contiguous(),
                weight,
                residual_out,
                normed,
                width,
                eps,
                HAS_MIXER_OUTPUT=mixer_output is not None,
                BLOCK_NORM=block_norm,
                BLOCK=block,
                num_warps=min(max(block // 256, 1), 8),
            )
        return residual_out, normed

    @triton.jit
    def _selective_state_update_kernel(
        state_ptr,
        x_ptr,
        time_step_ptr,
        weight_ptr,
        bias_ptr,
        A_ptr,
        B_ptr,
        C_ptr,
        D_ptr,
        gate_ptr,
        y_ptr,
        batch,
        channels,
        rank,
        state_size,
        stride_x,
        stride_time_step,
        stride_B,
        stride_C,
        stride_gate,
        BLOCK_BATCH: tl.constexpr,
        BLOCK_CHANNELS: tl.constexpr,
        BLOCK_RANK: tl.constexpr,
        BLOCK_STATE: tl.constexpr,
    ):
        # One program: BLOCK_BATCH sequences x BLOCK_CHANNELS channels, so that each dt_proj weight tile is read once
        # per BLOCK_BATCH sequences. `state`, `A`, `weight` and `y` are contiguous; the inputs may be column slices.
        rows = tl.program_id(1) * BLOCK_BATCH + tl.arange(0, BLOCK_BATCH)
        channels_here = tl.program_id(0) * BLOCK_CHANNELS + tl.arange(0, BLOCK_CHANNELS)
        states = tl.arange(0, BLOCK_STATE)
        row_in, channel_in, state_in = rows < batch, channels_here < channels, states < state_size
        row_channel = row_in[:, None] & channel_in[None, :]

        # dt = time_step @ weight.T, rounded to the activations' dtype like the mixer's matmul, then the fp32 bias
        dt = tl.zeros((BLOCK_BATCH, BLOCK_CHANNELS), dtype=tl.float32)
        for start in range(0, rank, BLOCK_RANK):
            ranks = start + tl.arange(0, BLOCK_RANK)
            rank_in = ranks < rank
            time_step = tl.load(
                time_step_ptr + rows[:, None] * stride_time_step + ranks[None, :],
                mask=row_in[:, None] & rank_in[None, :],
                other=0.0,
            )
            weight_t = tl.load(
                weight_ptr + channels_here[None, :] * rank + ranks[:, None],
                mask=rank_in[:, None] & channel_in[None, :],
                other=0.0,
            )
            # in fp32 (products of bf16 or fp16 values are exact there), never TF32
            dt = tl.dot(time_step.to(tl.float32), weight_t.to(tl.float32), dt, input_precision="ieee")
        dt = dt.to(time_step_ptr.dtype.element_ty).to(tl.float32)
        dt += tl.load(bias_ptr + channels_here, mask=channel_in, other=0.0).to(tl.float32)[None, :]
        dt = tl.where(dt <= 20.0, tl.log(tl.exp(dt) + 1.0), dt)

        x = tl.load(x_ptr + rows[:, None] * stride_x + channels_here[None, :], mask=row_channel, other=0.0)
        x = x.to(tl.float32)
        gate = tl.load(gate_ptr + rows[:, None] * stride_gate + channels_here[None, :], mask=row_channel, other=0.0)
        gate = gate.to(tl.float32)
        row_state = row_in[:, None] & state_in[None, :]
        B = tl.load(B_ptr + rows[:, None] * stride_B + states[None, :], mask=row_state, other=0.0).to(tl.float32)
        C = tl.load(C_ptr + rows[:, None] * stride_C + states[None, :], mask=row_state, other=0.0).to(tl.float32)
        channel_state = channels_here[:, None] * state_size + states[None, :]
        A = tl.load(A_ptr + channel_state, mask=channel_in[:, None] & state_in[None, :], other=0.0)
        D = tl.load(D_ptr + channels_here, mask=channel_in, other=0.0).to(tl.float32)

        state_offsets = rows[:, None, None] * (channels * state_size) + channel_state[None, :, :]
        state_mask = row_channel[:, :, None] & state_in[None, None, :]
        state = tl.load(state_ptr + state_offsets, mask=state_mask, other=0.0).to(tl.float32)
        dA = tl.exp(A[None, :, :] * dt[:, :, None])
        dB = B[:, None, :] * dt[:, :, None]
        state = state * dA + dB * x[:, :, None]
        tl.store(state_ptr + state_offsets, state.to(state_ptr.dtype.element_ty), mask=state_mask)
        y = tl.sum(state * C[:, None, :], axis=2) + x * D[None, :]
        y *= gate * tl.sigmoid(gate)
        tl.store(y_ptr + rows[:, None] * channels + channels_here[None, :], y.to(y_ptr.dtype.element_ty), row_channel)

    def _triton_selective_state_update(
        state: torch.Tensor,
        x: torch.Tensor,
        time_step: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor,
        gate: torch.Tensor,
    ) -> torch.Tensor:
        batch, channels, state_size = state.shape
        rank = time_step.shape[1]
        if not (state.is_contiguous() and A.is_contiguous() and weight.is_contiguous()):
            raise ValueError("selective_state_update needs a contiguous state, A and dt_proj weight")
        if any(tensor.stride(1) != 1 for tensor in (x, time_step, B, C, gate)):
            raise ValueError("selective_state_update needs x, time_step, B, C and gate with contiguous rows")
        y = torch.empty(batch, channels, dtype=x.dtype, device=x.device)
        block_batch, block_channels = 16, 32  # tl.dot needs 16 or more on every side
        grid = (triton.cdiv(channels, block_channels), triton.cdiv(batch, block_batch))
        with torch.cuda.device(x.device):
            _selective_state_update_kernel[grid](
                state,
                x,
                time_step,
                weight,
                bias,
                A,
                B,
                C,
                D,
                gate,
                y,
                batch,
                channels,
                rank,
                state_size,
                x.stride(0),
                time_step.stride(0),
                B.stride(0),
                C.stride(0),
                gate.stride(0),
                BLOCK_BATCH=block_batch,
                BLOCK_CHANNELS=block_channels,
                BLOCK_RANK=32,
                BLOCK_STATE=triton.next_power_of_2(state_size),
                num_warps=8,
            )
        return y
