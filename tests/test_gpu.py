"""GPU checks (run on the GPU machine with the `cuda` extra; skipped without CUDA):

- the mamba_ssm kernels give the same VL-Mamba as the PyTorch path (forward, greedy generation, training step), for
  each backbone;
- a raw mamba_ssm model converted by conversion.convert_mamba_ssm gives mamba_ssm's own logits;
- CUDA-graph decode gives the eager path's tokens and keeps the generate contract (for each backbone: Mamba,
  FalconMamba, Mamba-2), also when it decodes ahead, and the fused kernels of its decode step (residual add + RMSNorm,
  FalconMamba's dt/B/C norms) compute what transformers does;
- the fused multi-token path (prefill, training) computes what transformers' kernel path does;
- a converted Cobra decodes through the graph with the eager tokens.
"""

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmamba.training.tiny import TINY_SIGLIP, tiny_config, tiny_model, tiny_processor
from vlmamba.training.tokenizer import train_gpt_neox_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
# fp32 kernels vs PyTorch reference: the same math in another summation order.
ATOL = 1e-3
SCRIPT = Path(__file__).with_name("gpu_forward.py")


def run_forward(folder: Path, inputs: Path, out: Path, torch_path: bool) -> dict:
    command = [sys.executable, str(SCRIPT), str(folder), str(inputs), str(out)] + (
        ["--torch-path"] if torch_path else []
    )
    # IEEE fp32 in the Triton kernels (not TF32): the comparison is of the same math in another order.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRITON_F32_DEFAULT": "ieee"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


# Small language models of each backbone, at sizes the kernels take (Mamba-2: 16-wide states, 8 heads of 16 channels in
# 2 groups, so that in_proj's width is a multiple of 8 as causal-conv1d needs, chunks of 16 tokens so that prompts span
# several).
CUDA_TEXT = {
    "mamba": {"hidden_size": 64, "num_hidden_layers": 3},
    "falcon_mamba": {"model_type": "falcon_mamba", "hidden_size": 64, "num_hidden_layers": 3},
    "mamba2": {
        "model_type": "mamba2",
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "state_size": 16,
        "num_heads": 8,
        "head_dim": 16,
        "n_groups": 2,
        "chunk_size": 16,
    },
}


@pytest.mark.parametrize("backbone", sorted(CUDA_TEXT))
def test_vlmamba_kernels_match_the_pytorch_path(tmp_path, backbone):
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    from tests.conftest import make_image
    from vlmamba.training.tiny import SAMPLE_TEXT

    tokenizer = train_gpt_neox_tokenizer(SAMPLE_TEXT)
    vision = {**TINY_SIGLIP, "hidden_size": 64, "image_size": 32}
    config = tiny_config(tokenizer, vision=vision, text=CUDA_TEXT[backbone], vss_state_size=16)
    model, processor = tiny_model(config), tiny_processor(tokenizer, config)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    prompts = ["<image>What colour is the square at the top?", "<image>Count."]
    batch = processor(
        images=[make_image(), make_image(color=(9, 9, 9))], text=prompts, padding=True, return_tensors="pt"
    )
    single = processor(images=[make_image()], text=prompts[0], return_tensors="pt")
    torch.save(
        {**batch, "train_input_ids": single["input_ids"], "train_pixel_values": single["pixel_values"]},
        tmp_path / "inputs.pt",
    )
    kernels = run_forward(tmp_path / "model", tmp_path / "inputs.pt", tmp_path / "kernels.pt", torch_path=False)
    reference = run_forward(tmp_path / "model", tmp_path / "inputs.pt", tmp_path / "torch.pt", torch_path=True)
    assert kernels["kernels"] and not reference["kernels"]

    logits_difference = (kernels["logits"] - reference["logits"]).abs().max().item()
    loss_difference = (kernels["loss"] - reference["loss"]).abs().item()
    print(f"\nVL-Mamba kernels vs PyTorch path: logits {logits_difference:.2e}, loss {loss_difference:.2e}")
    torch.testing.assert_close(kernels["logits"], reference["logits"], rtol=0, atol=ATOL)
    assert torch.equal(kernels["generated"], reference["generated"])
    torch.testing.assert_close(kernels["loss"], reference["loss"], rtol=0, atol=ATOL)
    for name, grad in reference["grads"].items():
        relative = ((kernels["grads"][name] - grad).norm() / grad.norm()).item()
        print(f"  grad {name}: relative difference {relative:.2e}")
        assert relative < 1e-3, name


def test_converted_mamba_ssm_gives_mamba_ssms_logits(tmp_path):
    pytest.importorskip("mamba_ssm")
    from mamba_ssm.models.config_mamba import MambaConfig as RawConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from transformers import MambaForCausalLM

    from vlmamba.conversion.convert_mamba_ssm import convert_mamba_ssm, mamba_ssm_reference

    torch.manual_seed(0)
    raw = RawConfig(d_model=256, n_layer=4, vocab_size=1003, ssm_cfg={}, pad_vocab_size_multiple=8)
    source = MambaLMHeadModel(raw, device="cuda", dtype=torch.float32).eval()
    source.save_pretrained(str(tmp_path / "raw"))
    out = convert_mamba_ssm(tmp_path / "raw", tmp_path / "out", reference=mamba_ssm_reference(tmp_path / "raw"))

    converted = MambaForCausalLM.from_pretrained(out, dtype=torch.float32).cuda().eval()
    ids = torch.randint(0, 1003, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        expected, actual = source(ids).logits.float(), converted(ids).logits
    difference = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    print(f"\nconverted vs mamba_ssm: max |logits difference| {difference:.2e} (|logits| <= {scale:.1f})")
    assert actual.shape == expected.shape
    assert difference < ATOL


def tiny_cuda_model(dtype=torch.float32, backbone: str = "mamba"):
    from vlmamba.training.tiny import SAMPLE_TEXT

    tokenizer = train_gpt_neox_tokenizer(SAMPLE_TEXT)
    vision = {**TINY_SIGLIP, "hidden_size": 64, "image_size": 32}
    config = tiny_config(tokenizer, vision=vision, text=CUDA_TEXT[backbone], vss_state_size=16)
    return tiny_model(config).to("cuda", dtype), tiny_processor(tokenizer, config)


@pytest.mark.parametrize("backbone", sorted(CUDA_TEXT))
def test_graph_decode_gives_the_eager_greedy_tokens_and_keeps_the_generate_contract(backbone):
    pytest.importorskip("mamba_ssm")
    from transformers import TextIteratorStreamer

    from tests.conftest import make_image

    model, processor = tiny_cuda_model(backbone=backbone)
    prompts = ["<image>What colour is the square at the top left?", "<image>Count."]
    images = [make_image(), make_image(color=(9, 9, 9))]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to("cuda")
    settings = {"max_new_tokens": 24, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    eager = model.generate(**inputs, cuda_graph_decode=False, **settings)
    assert not model._decode_graphs
    graphed = model.generate(**inputs, **settings)
    (graph,) = model._decode_graphs.values()
    assert graph.graph is not None
    assert torch.equal(graphed.sequences, eager.sequences)
    for graphed_step, eager_step in zip(graphed.scores, eager.scores, strict=True):
        torch.testing.assert_close(graphed_step, eager_step, rtol=0, atol=ATOL)

    captured = graph.graph
    again = model.generate(**inputs, repetition_penalty=1.3, **settings)  # a logits processor; same graph reused
    assert model._decode_graphs[2].graph is captured
    eager_again = model.generate(**inputs, repetition_penalty=1.3, cuda_graph_decode=False, **settings)
    assert torch.equal(again.sequences, eager_again.sequences)

    single = processor(images=images[:1], text=prompts[:1], return_tensors="pt").to("cuda")
    torch.manual_seed(5)
    sampled = model.generate(**single, max_new_tokens=16, do_sample=True, top_k=20)
    torch.manual_seed(5)
    assert torch.equal(
        sampled, model.generate(**single, max_new_tokens=16, do_sample=True, top_k=20, cuda_graph_decode=False)
    )
    assert len(model._decode_graphs) == 2  # a new batch size, a new graph

    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    streamed = model.generate(**single, max_new_tokens=10, do_sample=False, streamer=streamer)
    text = "".join(streamer)
    assert text == processor.decode(streamed[0, single["input_ids"].shape[1] :])


# Not Mamba-2: its graph step's gated RMSNorm is mamba_ssm's kernel, which rounds to bf16 once where transformers'
# module rounds twice, so bf16 logits differ by a rounding step (fp32 tokens are checked above).
@pytest.mark.parametrize("backbone", ["mamba", "falcon_mamba"])
def test_graph_decode_in_bf16_gives_the_eager_tokens(backbone):
    pytest.importorskip("mamba_ssm")
    from tests.conftest import make_image

    model, processor = tiny_cuda_model(torch.bfloat16, backbone)
    inputs = processor(images=[make_image()], text="<image>Describe it.", return_tensors="pt").to("cuda")
    eager = model.generate(**inputs, max_new_tokens=32, do_sample=False, cuda_graph_decode=False)
    graphed = model.generate(**inputs, max_new_tokens=32, do_sample=False)
    assert torch.equal(graphed, eager)


def test_graph_decode_on_a_reloaded_model_with_a_one_token_prompt_and_replaced_weights(tmp_path):
    pytest.importorskip("mamba_ssm")
    from transformers import AutoModelForImageTextToText

    model, processor = tiny_cuda_model()
    model.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).cuda().eval()
    settings = {"max_new_tokens": 12, "do_sample": False}
    one_token = torch.tensor([[processor.tokenizer.eos_token_id]], device="cuda")
    assert torch.equal(
        model.generate(input_ids=one_token, **settings),
        model.generate(input_ids=one_token, cuda_graph_decode=False, **settings),
    )
    prompt = processor(text="Describe a picture.", return_tensors="pt").to("cuda")
    first = model.generate(**prompt, **settings)
    graph = model._decode_graphs[1]
    with torch.no_grad():  # replacing the parameters (as a reload or an adapter merge may) must not replay stale ones
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.flip(0))
    changed = model.generate(**prompt, **settings)
    assert model._decode_graphs[1] is not graph
    assert torch.equal(changed, model.generate(**prompt, cuda_graph_decode=False, **settings))
    assert not torch.equal(changed, first)


def spy_on_decode_ahead(graph) -> list[bool]:
    """For each decode step of `graph` from now on, whether it had been launched ahead."""
    launched_ahead, step = [], graph.step

    def spying_step(model, input_ids):
        launched_ahead.append(graph.ahead_token is not None)
        return step(model, input_ids)

    graph.step = spying_step
    return launched_ahead


def test_decode_ahead_gives_the_eager_tokens_and_a_clean_state_after_an_early_stop():
    pytest.importorskip("mamba_ssm")
    from tests.conftest import make_image

    model, processor = tiny_cuda_model()
    model.generation_config.eos_token_id = None  # random weights: every run lasts max_new_tokens unless told
    prompts = ["<image>What colour is the square at the top left?", "<image>Count."]
    images = [make_image(), make_image(color=(9, 9, 9))]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to("cuda")
    settings = {"max_new_tokens": 24, "do_sample": False}
    eager = model.generate(**inputs, cuda_graph_decode=False, **settings)
    model.generate(**inputs, **settings)  # captures the graph at its first decode step
    launched_ahead = spy_on_decode_ahead(model._decode_graphs[2])
    assert torch.equal(model.generate(**inputs, **settings), eager)
    assert launched_ahead == [True] * 23  # every decode step; none after the last token

    # Asking for the cache back turns decoding ahead off: the returned states are those after the last token.
    launched_ahead.clear()
    returned = model.generate(**inputs, return_dict_in_generate=True, **settings)
    eager_returned = model.generate(**inputs, return_dict_in_generate=True, cuda_graph_decode=False, **settings)
    assert launched_ahead == [False] * 23 and torch.equal(returned.sequences, eager)
    for graphed_layer, eager_layer in zip(
        returned.past_key_values.layers, eager_returned.past_key_values.layers, strict=True
    ):
        torch.testing.assert_close(
            graphed_layer.recurrent_states[0], eager_layer.recurrent_states[0], atol=ATOL, rtol=0
        )

    # An end-of-sequence token stops generation with one step decoded ahead for nothing; the next call starts clean.
    # Sampled (seeded), so that the tiny random model's tokens vary and one can serve as end of sequence.
    single = processor(images=images[:1], text=prompts[:1], return_tensors="pt").to("cuda")
    length = single["input_ids"].shape[1]

    def sample(**kwargs):
        torch.manual_seed(3)
        return model.generate(**single, **(settings | {"do_sample": True, "top_k": 0}), **kwargs)

    eager_single = sample(cuda_graph_decode=False)
    generated = eager_single[0, length:].tolist()
    stop_at = next(i for i in range(4, len(generated)) if generated[i] not in generated[:i])
    eos = {"eos_token_id": generated[stop_at], "pad_token_id": 0}
    sample()
    launched_ahead = spy_on_decode_ahead(model._decode_graphs[1])
    stopped = sample(**eos)
    assert stopped.shape[1] == length + stop_at + 1
    assert torch.equal(stopped, sample(**eos, cuda_graph_decode=False))
    assert launched_ahead == [True] * stop_at
    assert torch.equal(sample(), eager_single)

    graph = model._decode_graphs[1]  # a step launched ahead for other input_ids than the next step's is refused
    graph.launch_ahead(eager_single)
    with pytest.raises(RuntimeError, match="already ran the step of the token generate chose"):
        graph.step(model, eager_single[:, -2:-1])


@pytest.mark.parametrize(
    ("dtype", "residual_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),  # residual_in_fp32 with bf16 weights, the usual inference setting
        (torch.float32, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("block_norm", [True, False])
def test_fused_add_rms_norm_computes_what_mamba_does(dtype, residual_dtype, block_norm):
    pytest.importorskip("triton")
    from transformers.models.mamba.modeling_mamba import MambaRMSNorm

    from modeling_vlmamba.decode_kernels import add_rms_norm

    torch.manual_seed(0)
    norm = MambaRMSNorm(2560, eps=1e-5).to("cuda", dtype)
    with torch.no_grad():
        norm.weight.normal_(1, 0.2)
    residual = torch.randn(64, 2560, device="cuda", dtype=residual_dtype)
    mixer_output = torch.randn(64, 2560, device="cuda", dtype=dtype)  # the mixer computes in the weight dtype
    for added in (None, mixer_output):
        fused_residual, fused = add_rms_norm(residual, added, norm, block_norm=block_norm)
        expected_residual = residual if added is None else residual + added
        # MambaBlock casts its norm input to the weight dtype; MambaModel's norm_f takes the residual as it is
        norm_input = expected_residual.to(dtype) if block_norm else expected_residual
        expected = norm(norm_input)
        assert fused_residual.dtype == expected_residual.dtype and fused.dtype == expected.dtype
        assert torch.equal(fused_residual, expected_residual)
        # The only difference allowed is in the fp32 mean of squares and rsqrt: a few fp32 ulps, which the rounding of
        # the normalised value to the norm input's dtype absorbs in all but a few values when that is bf16.
        eps = torch.finfo(norm_input.dtype).eps
        torch.testing.assert_close(fused.float(), expected.float(), rtol=4 * eps, atol=eps)
        unequal = (fused != expected).float().mean().item()
        print(f"\nweights {dtype}, norm input {norm_input.dtype}, block_norm={block_norm}: differs in {unequal:.2%}")
        if norm_input.dtype == torch.bfloat16:
            assert unequal < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_decode_steps_norm_kernels_compute_what_transformers_does(dtype):
    """FalconMamba's dt/B/C norms (Falcon3-Mamba-7B widths) and Mamba-2's gated RMSNorm (mamba2-2.7b's, two groups
    too) through the decode step's kernels, against transformers' modules."""
    pytest.importorskip("mamba_ssm")
    from transformers.models.falcon_mamba.modeling_falcon_mamba import FalconMambaWeightlessRMSNorm
    from transformers.models.mamba2.modeling_mamba2 import MambaRMSNormGated

    from modeling_vlmamba.decode_kernels import dt_bc_rms_norm, gated_rms_norm

    torch.manual_seed(0)
    eps = torch.finfo(dtype).eps
    x_dbl = 3 * torch.randn(16, 256 + 2 * 16, device="cuda", dtype=dtype)
    expected = [
        FalconMambaWeightlessRMSNorm(width, eps=1e-6)(part)
        for width, part in zip((256, 16, 16), x_dbl.split([256, 16, 16], -1), strict=True)
    ]
    for actual, wanted in zip(dt_bc_rms_norm(x_dbl, 256, 16, 1e-6), expected, strict=True):
        assert actual.dtype == wanted.dtype
        torch.testing.assert_close(actual.float(), wanted.float(), rtol=4 * eps, atol=eps)
    for groups in (1, 2):
        norm = MambaRMSNormGated(5120, group_size=5120 // groups, eps=1e-5).to("cuda", dtype)
        with torch.no_grad():
            norm.weight.normal_(1, 0.2)
        y, gate = torch.randn(2, 16, 5120, device="cuda", dtype=dtype).unbind(0)
        # One bf16 rounding (the kernel's) against two (the module's: before and after the weight).
        torch.testing.assert_close(
            gated_rms_norm(y, gate, norm).float(), norm(y, gate).float(), rtol=8 * eps, atol=8 * eps
        )


def test_a_converted_cobra_decodes_through_the_graph_with_the_eager_tokens(tmp_path):
    """The tiny Cobra run of tests/test_cobra.py, converted (fused DINOv2 + SigLIP tower), on CUDA in fp32."""
    pytest.importorskip("mamba_ssm")
    from modeling_vlmamba import VLMambaForConditionalGeneration, VLMambaProcessor
    from tests.conftest import make_image
    from tests.test_cobra import cobra_inputs, convert, write_tiny_cobra

    folder = convert(write_tiny_cobra(tmp_path), "converted")
    model = VLMambaForConditionalGeneration.from_pretrained(folder).to("cuda").eval()
    processor = VLMambaProcessor.from_pretrained(folder)
    single = cobra_inputs(processor, make_image((30, 20))).to("cuda")
    settings = {"max_new_tokens": 16, "do_sample": False}
    eager = model.generate(**single, cuda_graph_decode=False, **settings)
    graphed = model.generate(**single, **settings)
    assert model._decode_graphs and torch.equal(graphed, eager)


@contextlib.contextmanager
def transformers_multi_token_path():
    """transformers' own Mamba forward (its kernels) instead of the fused multi-token path, for the duration."""
    from modeling_vlmamba import fused_mamba

    original = fused_mamba.uses_fused_kernels
    fused_mamba.uses_fused_kernels = lambda hidden_states: False
    try:
        yield
    finally:
        fused_mamba.uses_fused_kernels = original


def test_the_fused_multi_token_path_computes_what_transformers_kernel_path_does():
    """fp32: logits within 1e-4, the same greedy tokens, every gradient within 1e-5 relative (with and without
    gradient checkpointing; the key biases' zero gradient at rounding noise in both), and the same loss over 5 AdamW
    steps; bf16: logits within 1e-2 relative L2."""
    pytest.importorskip("mamba_ssm")
    pytest.importorskip("causal_conv1d")
    from tests.conftest import make_image

    model, processor = tiny_cuda_model()
    reference = copy.deepcopy(model)
    prompts = ["<image>What colour is the square at the top left?", "<image>Count."]
    images = [make_image(), make_image(color=(9, 9, 9))]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt").to("cuda")
    with torch.no_grad():
        fused_logits = model(**inputs).logits
        with transformers_multi_token_path():
            stock_logits = reference(**inputs).logits
    difference = (fused_logits - stock_logits).abs().max().item()
    print(f"\nfused vs transformers multi-token path, fp32 logits: max |difference| {difference:.2e}")
    assert difference < 1e-4
    settings = {"max_new_tokens": 16, "do_sample": False}
    fused_tokens = model.generate(**inputs, **settings)
    with transformers_multi_token_path():
        assert torch.equal(fused_tokens, reference.generate(**inputs, cuda_graph_decode=False, **settings))

    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)

    def gradients(m, checkpointing: bool) -> dict[str, torch.Tensor]:
        m.zero_grad(set_to_none=True)
        if checkpointing:
            m.activation_checkpointing_enable()
        m.train()(**inputs, labels=labels).loss.backward()
        if checkpointing:
            m.activation_checkpointing_disable()
        return {name: p.grad.clone() for name, p in m.named_parameters() if p.grad is not None}

    with transformers_multi_token_path():
        expected = gradients(reference, checkpointing=False)
    # The attention key biases' gradient is zero in exact arithmetic (a softmax ignores what is added to all its
    # scores): what either path gives there is rounding noise, ~1e-8, whose relative difference means nothing.
    noise = {name for name in expected if name.endswith("k_proj.bias")}
    scale = max(g.norm().item() for g in expected.values())
    for checkpointing in (False, True):
        ours = gradients(model, checkpointing)
        assert ours.keys() == expected.keys()
        worst = max(((ours[k] - g).norm() / g.norm()).item() for k, g in expected.items() if k not in noise)
        print(f"gradients (checkpointing={checkpointing}): worst relative difference {worst:.2e}")
        assert worst < 1e-5
        assert all(max(ours[k].norm(), expected[k].norm()) < 1e-6 * scale for k in noise)

    def losses(m) -> list[float]:
        optimizer = torch.optim.AdamW(m.parameters(), lr=1e-3)
        curve = []
        for _ in range(5):
            loss = m.train()(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            curve.append(loss.item())
        return curve

    ours_curve = losses(model)
    with transformers_multi_token_path():
        stock_curve = losses(reference)
    print(f"loss curves: fused {ours_curve}, transformers {stock_curve}")
    torch.testing.assert_close(torch.tensor(ours_curve), torch.tensor(stock_curve), rtol=1e-5, atol=0)

    bf16 = tiny_cuda_model(torch.bfloat16)[0]
    bf16_reference = copy.deepcopy(bf16)
    half = {**inputs, "pixel_values": inputs["pixel_values"].to(torch.bfloat16)}
    with torch.no_grad():
        fused_half = bf16.eval()(**half).logits
        with transformers_multi_token_path():
            stock_half = bf16_reference.eval()(**half).logits
    relative = ((fused_half - stock_half).norm() / stock_half.norm()).item()
    print(f"bf16 logits: relative L2 difference {relative:.2e}")
    assert relative < 1e-2
