"""The fused multi-token path (modeling_vlmamba/fused_mamba.py) computes what transformers' Mamba computes.

On CUDA it runs mamba_ssm's kernels (tests/test_gpu.py checks that there). Here, on the CPU, the same code runs with
the kernels' stand-ins: transformers' PyTorch versions of the conv and the scan, and a PyTorch RMSNorm with the
fused kernel's semantics. That checks what this path adds, its layouts and its masking, against transformers'
forward: logits, cache states, gradients, left padding, and a PEFT adapter on `in_proj`.
"""

import copy

import pytest
import torch
from transformers import MambaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.mamba.modeling_mamba import MambaModel

from modeling_vlmamba import fused_mamba
from modeling_vlmamba.fused_mamba import (
    FusedMambaBlock,
    FusedMambaMixer,
    FusedMambaModel,
    FusedMambaRMSNorm,
    use_fused_kernels,
)

# fp32 on CPU: the two paths differ by summation order only.
ATOL = 1e-5


def reference_rms_norm(x, norm, residual=None, residual_in_fp32=False, prenorm=False):
    """mamba_ssm's `rms_norm_fn` in PyTorch: the sum `x + residual` and its norm in fp32, `x`'s dtype out; the sum
    returned in the residual's dtype (fp32 with `residual_in_fp32` when there is none yet, else `x`'s)."""
    summed = x.float() if residual is None else x.float() + residual.float()
    residual_dtype = residual.dtype if residual is not None else (torch.float32 if residual_in_fp32 else x.dtype)
    normed = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    normed = (normed * norm.weight.float()).to(x.dtype)
    return (normed, summed.to(residual_dtype)) if prenorm else normed


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(fused_mamba, "uses_fused_kernels", lambda hidden_states: True)
    monkeypatch.setattr(fused_mamba, "rms_norm", reference_rms_norm)


def models(seed: int = 0) -> tuple[MambaModel, MambaModel]:
    config = MambaConfig(hidden_size=32, num_hidden_layers=3, state_size=8, vocab_size=64, use_cache=True)
    torch.manual_seed(seed)
    stock = MambaModel(config)
    return stock, use_fused_kernels(copy.deepcopy(stock))


def test_the_fused_classes_keep_the_modules_and_weights(fused_on_cpu):
    stock, fused = models()
    assert type(fused) is FusedMambaModel and type(fused.norm_f) is FusedMambaRMSNorm
    assert all(type(layer) is FusedMambaBlock and type(layer.mixer) is FusedMambaMixer for layer in fused.layers)
    assert stock.state_dict().keys() == fused.state_dict().keys()
    assert all(
        torch.equal(a, b) for a, b in zip(stock.state_dict().values(), fused.state_dict().values(), strict=True)
    )


def test_prefill_of_a_left_padded_batch_gives_the_same_outputs_and_states(fused_on_cpu):
    stock, fused = models()
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask, use_cache=True)
        ours = fused(input_ids=ids, attention_mask=mask, use_cache=True)
    torch.testing.assert_close(ours.last_hidden_state, expected.last_hidden_state, rtol=0, atol=ATOL)
    for layer in range(3):
        for state in ("get_conv_state", "get_recurrent_state"):
            ours_state = getattr(ours.cache_params, state)(layer, state_idx=0)
            torch.testing.assert_close(
                ours_state, getattr(expected.cache_params, state)(layer, state_idx=0), rtol=0, atol=ATOL
            )
    # the padded row equals its unpadded prompt alone (zeroed pad positions before and after the conv)
    with torch.no_grad():
        alone = fused(input_ids=ids[1:, 4:], use_cache=True).last_hidden_state
    torch.testing.assert_close(ours.last_hidden_state[1, 4:], alone[0], rtol=0, atol=ATOL)
    # a prompt shorter than the conv kernel: the conv state is zero-padded as transformers pads it
    with torch.no_grad():
        short_stock = stock(input_ids=ids[:, :2], use_cache=True).cache_params.get_conv_state(0, state_idx=0)
        short_fused = fused(input_ids=ids[:, :2], use_cache=True).cache_params.get_conv_state(0, state_idx=0)
    torch.testing.assert_close(short_fused, short_stock, rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [None, {"use_reentrant": False}, {"use_reentrant": True}])
def test_training_gives_the_same_loss_and_gradients(fused_on_cpu, checkpointing):
    """Also with gradient checkpointing, reentrant too: the carried residual must reach the previous block."""
    stock, fused = models()
    if checkpointing is not None:
        fused.activation_checkpointing_enable(checkpointing)
    ids = torch.randint(2, 64, (2, 11), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # right padding, as training batches are padded
    losses = []
    for model in (stock, fused):
        model.train()
        hidden = model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        loss = (hidden * torch.linspace(-1, 1, hidden.shape[-1])).pow(2).mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=0)
    for (name, ours), theirs in zip(fused.named_parameters(), stock.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_peft_adapter_on_in_proj_is_called_as_its_module(fused_on_cpu):
    from peft import LoraConfig, get_peft_model

    stock, fused = models()
    config = LoraConfig(r=4, target_modules=r".*\.in_proj", init_lora_weights=False)  # adapters that change outputs
    peft_stock, peft_fused = get_peft_model(stock, config), get_peft_model(fused, copy.deepcopy(config))
    peft_fused.load_state_dict(peft_stock.state_dict())
    ids = torch.randint(2, 64, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = peft_stock(input_ids=ids).last_hidden_state
        with peft_stock.disable_adapter():
            without = peft_stock(input_ids=ids).last_hidden_state
        ours = peft_fused(input_ids=ids).last_hidden_state
    assert not torch.allclose(expected, without)  # the adapters matter
    torch.testing.assert_close(ours, expected, rtol=0, atol=ATOL)


def test_decode_steps_and_the_cpu_keep_transformers_forward(monkeypatch):
    stock, fused = models()
    ids = torch.randint(2, 64, (1, 6), generator=torch.Generator().manual_seed(4))
    calls = []
    monkeypatch.setattr(fused_mamba, "rms_norm", lambda *a, **k: calls.append(a) or reference_rms_norm(*a, **k))
    with torch.no_grad():
        cache = DynamicCache(config=fused.config)
        fused(input_ids=ids, cache_params=cache, use_cache=True)  # on the CPU: transformers' forward
        step = fused(input_ids=ids[:, -1:], cache_params=cache, use_cache=True).last_hidden_state
        stock_cache = DynamicCache(config=stock.config)
        stock(input_ids=ids, cache_params=stock_cache, use_cache=True)
        expected = stock(input_ids=ids[:, -1:], cache_params=stock_cache, use_cache=True).last_hidden_state
    assert calls == []
    torch.testing.assert_close(step, expected, rtol=0, atol=0)
