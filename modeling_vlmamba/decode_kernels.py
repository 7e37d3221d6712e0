"""The fused kernel of the CUDA-graph decode step (`mamba_decode_step`), with its PyTorch fallback.

A graphed decode step of a 64-layer Mamba at small batch sizes is bound by the number of kernels it runs, not by
their work. `add_rms_norm` does a residual add and `MambaRMSNorm` (about ten PyTorch kernels) in one Triton kernel,
used on CUDA when Triton is installed. It computes what transformers' `MambaBlock` (or the final `norm_f`) computes:
the sum in the promoted dtype of its operands, the norm input rounded to the weight's dtype (not for `norm_f`), the
normalised value rounded to the norm input's dtype before the weight is applied. Its fp32 mean of squares and
approximate `rsqrt` differ from PyTorch's by an ulp or so, which bf16 rounding sometimes turns into one bf16 step.
"""

import torch
from torch import nn
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
