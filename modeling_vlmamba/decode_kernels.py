"""The fused kernels of the CUDA-graph decode step (`decode_step`), each with its PyTorch fallback.

A graphed decode step of a 64-layer Mamba at small batch sizes is bound by the number of kernels it runs, not by
their work, so each normalisation is one kernel on CUDA:

- `add_rms_norm` does a residual add and `MambaRMSNorm` (about ten PyTorch kernels) in one Triton kernel, used on
  CUDA when Triton is installed. It computes what transformers' `MambaBlock` (or the final `norm_f`) computes: the sum
  in the promoted dtype of its operands, the norm input rounded to the weight's dtype (not for `norm_f`), the
  normalised value rounded to the norm input's dtype before the weight is applied.
- `dt_bc_rms_norm` normalises FalconMamba's dt, B and C (three weightless RMSNorms) in one Triton kernel.
- `gated_rms_norm` is Mamba-2's gated, grouped RMSNorm through mamba_ssm's Triton kernel.

Their fp32 means of squares and approximate `rsqrt` differ from PyTorch's by an ulp or so, which bf16 rounding
sometimes turns into one bf16 step.
"""

import torch
from torch import nn
from transformers.utils.import_utils import is_mamba_ssm_available, is_triton_available


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


def dt_bc_rms_norm(
    x_dbl: torch.Tensor, time_step_rank: int, state_size: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FalconMamba's x projection `(batch, time_step_rank + 2 * state_size)` split into dt, B and C, each
    RMS-normalised on its own without weights: fp32 arithmetic, results in `x_dbl`'s dtype."""
    widths = [time_step_rank, state_size, state_size]
    if x_dbl.is_cuda and is_triton_available():
        return _triton_dt_bc_rms_norm(x_dbl, time_step_rank, state_size, eps).split(widths, dim=-1)
    parts = (part.float() for part in x_dbl.split(widths, dim=-1))
    return tuple((part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + eps)).to(x_dbl.dtype) for part in parts)


def gated_rms_norm(hidden_states: torch.Tensor, gate: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """Mamba-2's `MambaRMSNormGated`: `norm(hidden_states * silu(gate))` per group of channels, `(batch, channels)`;
    on CUDA through mamba_ssm's kernel, where installed (one kernel instead of about a dozen)."""
    if hidden_states.is_cuda and is_mamba_ssm_available():
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

        return rmsnorm_fn(
            hidden_states,
            norm.weight,
            None,
            z=gate,
            eps=norm.variance_epsilon,
            group_size=norm.group_size,
            norm_before_gate=False,
        )
    return norm(hidden_states, gate)


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
    def _dt_bc_rms_norm_kernel(x_ptr, out_ptr, row_width, rank, state_size, eps, BLOCK: tl.constexpr):
        row, part = tl.program_id(0), tl.program_id(1)  # part 0: dt (rank wide), 1: B, 2: C (state_size wide)
        start = tl.where(part == 0, 0, rank + (part - 1) * state_size)
        width = tl.where(part == 0, rank, state_size)
        columns = tl.arange(0, BLOCK)
        inside = columns < width
        offsets = row * row_width + start + columns
        x = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        inverse_rms = tl.rsqrt(tl.sum(x * x, axis=0) / width.to(tl.float32) + eps)
        tl.store(out_ptr + offsets, (x * inverse_rms).to(out_ptr.dtype.element_ty), mask=inside)

    def _triton_dt_bc_rms_norm(x_dbl: torch.Tensor, rank: int, state_size: int, eps: float) -> torch.Tensor:
        x_dbl = x_dbl.contiguous()
        out = torch.empty_like(x_dbl)
        with torch.cuda.device(x_dbl.device):
            _dt_bc_rms_norm_kernel[(x_dbl.shape[0], 3)](
                x_dbl, out, x_dbl.shape[1], rank, state_size, eps, BLOCK=triton.next_power_of_2(max(rank, state_size))
            )
        return out
