"""Converters: every source format written by a reference implementation of its own forward pass, converted, and
compared with that forward; every failure is a clear error that leaves nothing on disk."""

import json
import sys

import pytest
import torch
from transformers import (
    AutoProcessor,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    MambaConfig,
    MambaForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from modeling_vlmamba import VLMambaForConditionalGeneration
from tests.conftest import interrupt_saving, leftovers, make_image
from tests.reference_models import (
    collapse_image_tokens,
    llava_mamba_forward,
    mamba_lm_forward,
    random_mamba_ssm_state,
    raw_mamba_config,
    write_llava_mamba_checkpoint,
    write_mamba_ssm_checkpoint,
)
from vlmamba.conversion import compose as compose_module
from vlmamba.conversion import convert_llava as convert_llava_module
from vlmamba.conversion import convert_mamba_ssm as convert_mamba_ssm_module
from vlmamba.conversion.checkpoint import ConversionError, read_checkpoint
from vlmamba.conversion.compose import compose
from vlmamba.conversion.convert_llava import convert_llava, load_mm_projector
from vlmamba.conversion.convert_mamba_ssm import convert_mamba_ssm
from vlmamba.training.tiny import SAMPLE_TEXT
from vlmamba.training.tokenizer import train_gpt_neox_tokenizer

# Two fp32 implementations of the same network (sequential reference scan vs transformers) differ by rounding.
ATOL = 1e-4
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
VISION |= {"image_size": 16, "patch_size": 4}


@pytest.fixture
def raw_dir(tmp_path):
    write_mamba_ssm_checkpoint(tmp_path / "raw")
    return tmp_path / "raw"


def raw_reference(raw_dir):
    state = torch.load(raw_dir / "pytorch_model.bin", weights_only=True)
    n_layer = json.loads((raw_dir / "config.json").read_text())["n_layer"]
    return lambda input_ids: mamba_lm_forward(state, n_layer, input_ids)


# ---------------------------------------------------------------- raw mamba_ssm -> MambaForCausalLM


def test_raw_mamba_ssm_converts_to_the_same_function(raw_dir, tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path / "tok")
    out = convert_mamba_ssm(
        raw_dir, tmp_path / "out", tokenizer_dir=tmp_path / "tok", reference=raw_reference(raw_dir)
    )
    model = MambaForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 56  # 50 padded to a multiple of 8, as mamba_ssm does
    assert model.lm_head.weight is model.backbone.embeddings.weight
    ids = torch.randint(0, 56, (3, 20), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, raw_reference(raw_dir)(ids), rtol=0, atol=ATOL)
    assert (out / "tokenizer.json").is_file()
    assert leftovers(tmp_path) == []


def test_dtype_option_casts_and_still_verifies(raw_dir, tmp_path):
    out = convert_mamba_ssm(raw_dir, tmp_path / "out", dtype=torch.bfloat16, reference=raw_reference(raw_dir))
    assert MambaForCausalLM.from_pretrained(out).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rms_norm": False}, "rms_norm=false"),
        ({"ssm_cfg": {"d_state": 4, "headdim": 64, "ngroups": 1}}, "ssm_cfg keys ['headdim', 'ngroups']"),
        ({"d_intermediate": 64}, "d_intermediate=64"),
        ({"attn_layer_idx": [1]}, "attn_layer_idx=[1]"),
    ],
)
def test_unrepresentable_raw_configs_are_rejected(tmp_path, overrides, message):
    raw = raw_mamba_config()
    write_mamba_ssm_checkpoint(tmp_path / "raw", state=random_mamba_ssm_state(raw), **overrides)
    with pytest.raises(ConversionError, match="cannot be converted to transformers' MambaConfig") as error:
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def broken(state: dict, how: str) -> dict:
    state = dict(state)
    if how == "missing":
        del state["backbone.layers.1.mixer.dt_proj.bias"]
    elif how == "extra":
        state["backbone.layers.0.mixer.bonus"] = torch.zeros(3)
    elif how == "shape":
        state["backbone.layers.0.mixer.out_proj.weight"] = state["backbone.layers.0.mixer.out_proj.weight"].T
    elif how == "tie":
        state["lm_head.weight"] = state["backbone.embedding.weight"] + 1
    return state


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing", r"1 missing \(no source tensor\):\n  backbone.layers.1.mixer.dt_proj.bias"),
        ("extra", r"1 unexpected \(no target tensor\):\n  backbone.layers.0.mixer.bonus"),
        ("shape", r"out_proj.weight -> .*: torch.float32 \(32, 16\), expected torch.float32 \(16, 32\)"),
        ("tie", r"lm_head.weight differs from backbone.embedding.weight, but the config ties them"),
    ],
)
def test_key_accounting_names_every_bad_tensor(tmp_path, how, message):
    raw = raw_mamba_config()
    write_mamba_ssm_checkpoint(tmp_path / "raw", state=broken(random_mamba_ssm_state(raw), how))
    with pytest.raises(ConversionError, match=message):
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_existing_output_needs_force(raw_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        convert_mamba_ssm(raw_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert_mamba_ssm(raw_dir, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "model.safetensors").is_file() and not (tmp_path / "out" / "keep.txt").exists()


def test_interrupted_write_leaves_nothing(raw_dir, tmp_path, monkeypatch):
    interrupt_saving(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        convert_mamba_ssm(raw_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_failed_verification_leaves_nothing_and_keeps_what_force_would_replace(raw_dir, tmp_path):
    wrong = raw_reference(raw_dir)
    with pytest.raises(ConversionError, match="Converted logits differ from the source model"):
        convert_mamba_ssm(raw_dir, tmp_path / "out", reference=lambda ids: wrong(ids) + 0.1)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("previous")
    with pytest.raises(ConversionError):
        convert_mamba_ssm(raw_dir, tmp_path / "out", force=True, reference=lambda ids: wrong(ids) + 0.1)
    assert (tmp_path / "out" / "keep.txt").read_text() == "previous" and leftovers(tmp_path) == []


def test_half_precision_verification_still_catches_a_wrong_tensor(raw_dir, tmp_path):
    """bf16 rounding passes the relative tolerance; a swap of two layers' in_proj does not."""
    state = torch.load(raw_dir / "pytorch_model.bin", weights_only=True)
    swapped = dict(state)
    first, second = "backbone.layers.0.mixer.in_proj.weight", "backbone.layers.1.mixer.in_proj.weight"
    swapped[first], swapped[second] = state[second], state[first]
    with pytest.raises(ConversionError, match=r"bfloat16 logits differ from the source model by .* relative L2"):
        convert_mamba_ssm(
            raw_dir, tmp_path / "out", dtype=torch.bfloat16, reference=lambda ids: mamba_lm_forward(swapped, 2, ids)
        )


def test_output_folder_is_checked_before_any_work(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        convert_mamba_ssm(tmp_path / "no-such-source", tmp_path / "out")
    with pytest.raises(FileExistsError, match="already exists"):
        compose(tmp_path / "no-vision", tmp_path / "no-llm", tmp_path / "out")


# ---------------------------------------------------------------- compose from pretrained parts


@pytest.fixture
def parts(tmp_path, tokenizer):
    """A SigLIP vision model, a full CLIP model, a transformers Mamba LLM and a raw mamba_ssm LLM, on disk."""
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(tmp_path / "siglip")
    text = {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 1, "num_attention_heads": 2}
    clip = CLIPConfig(
        text_config=text | {"vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1}, vision_config=VISION
    )
    CLIPModel(clip).save_pretrained(tmp_path / "clip")
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "clip"
    )
    MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=328)).save_pretrained(
        tmp_path / "mamba"
    )
    tokenizer.save_pretrained(tmp_path / "mamba")
    write_mamba_ssm_checkpoint(tmp_path / "raw", vocab_size=len(tokenizer))
    return tmp_path


def test_compose_siglip_and_transformers_mamba(parts, tokenizer):
    out = compose(parts / "siglip", parts / "mamba", parts / "vlm", projector_type="vss_l2", seed=3)
    model = VLMambaForConditionalGeneration.from_pretrained(out)
    assert (model.config.vision_config.model_type, model.config.image_seq_length) == ("siglip_vision_model", 16)
    vision = SiglipVisionModel.from_pretrained(parts / "siglip")
    torch.testing.assert_close(
        model.model.vision_tower.embeddings.patch_embedding.weight, vision.embeddings.patch_embedding.weight
    )
    assert not hasattr(model.model.vision_tower, "head")
    llm = MambaForCausalLM.from_pretrained(parts / "mamba")
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, llm(ids).logits, rtol=0, atol=1e-6)
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_seq_length == 16 and processor.tokenizer.padding_side == "left"
    inputs = processor(images=[make_image()], text="<image>What is it?", return_tensors="pt")
    assert model.generate(**inputs, max_new_tokens=3).shape[1] == inputs["input_ids"].shape[1] + 3

    again = compose(parts / "siglip", parts / "mamba", parts / "vlm-again", projector_type="vss_l2", seed=3)
    other_seed = compose(parts / "siglip", parts / "mamba", parts / "vlm-seed4", projector_type="vss_l2", seed=4)
    connector = VLMambaForConditionalGeneration.from_pretrained(again).model.multi_modal_projector.state_dict()
    reseeded = VLMambaForConditionalGeneration.from_pretrained(other_seed).model.multi_modal_projector.state_dict()
    for name, tensor in model.model.multi_modal_projector.state_dict().items():
        assert torch.isfinite(tensor).all()
        torch.testing.assert_close(connector[name], tensor, rtol=0, atol=0)
    assert not torch.equal(reseeded["linear_1.weight"], connector["linear_1.weight"])


def test_compose_accepts_transformers_4_vision_checkpoints(parts):
    """Older checkpoints prefix the tower with `vision_model.` and carry the `position_ids` buffer."""
    old = parts / "siglip-v4"
    old.mkdir()
    state = SiglipVisionModel.from_pretrained(parts / "siglip").state_dict()
    state = {f"vision_model.{key}": value for key, value in state.items()}
    state["vision_model.embeddings.position_ids"] = torch.arange(16)[None]
    torch.save(state, old / "pytorch_model.bin")
    for name in ("config.json", "preprocessor_config.json"):
        (old / name).write_text((parts / "siglip" / name).read_text())
    out = compose(old, parts / "mamba", parts / "vlm-v4")
    composed = VLMambaForConditionalGeneration.from_pretrained(out).model.vision_tower
    torch.testing.assert_close(
        composed.embeddings.position_embedding.weight, state["vision_model.embeddings.position_embedding.weight"]
    )


def test_compose_full_clip_and_raw_mamba_ssm(parts, tokenizer):
    out = compose(parts / "clip", parts / "raw", parts / "vlm", tokenizer=parts / "mamba", projector_type="mlp")
    model = VLMambaForConditionalGeneration.from_pretrained(out)
    config = model.config
    assert config.vision_feature_select_strategy == "default" and config.image_seq_length == 16
    clip = CLIPVisionModel.from_pretrained(parts / "clip")
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ours = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(ours, clip(pixels, output_hidden_states=True).hidden_states[-2])
    raw_state = torch.load(parts / "raw" / "pytorch_model.bin", weights_only=True)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, mamba_lm_forward(raw_state, 2, ids), rtol=0, atol=ATOL)
    assert AutoProcessor.from_pretrained(out).image_processor.crop_size == {"height": 16, "width": 16}


def test_compose_rejects_other_encoders(parts, tokenizer):
    """(A tokenizer larger than the LLM's vocabulary makes compose grow it: tests/test_backbone_tokenizers.py.)"""
    with pytest.raises(
        ConversionError, match="holds a 'mamba' model; the vision encoder must be SigLIP, CLIP or DINOv2"
    ):
        compose(parts / "mamba", parts / "mamba", parts / "vlm")
    assert not (parts / "vlm").exists() and leftovers(parts) == []


# ---------------------------------------------------------------- LLaVA-style Mamba VLMs


@pytest.fixture(scope="module")
def plain_tokenizer():
    """A GPT-NeoX-style tokenizer without <image>, as LLaVA checkpoints ship (they mark images with id -200)."""
    return train_gpt_neox_tokenizer(SAMPLE_TEXT, image_token=False)


@pytest.fixture
def llava(tmp_path):
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    vision.save_pretrained(tmp_path / "clip-tower")
    CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        tmp_path / "clip-tower"
    )
    return tmp_path, vision


def llava_reference(state, raw, vision, image_token_id):
    def forward(input_ids, pixel_values):
        return llava_mamba_forward(state, raw, vision, collapse_image_tokens(input_ids, image_token_id), pixel_values)

    return forward


@pytest.mark.parametrize("with_vision_tower", [True, False], ids=["tower-in-checkpoint", "tower-from-folder"])
def test_llava_checkpoint_converts_to_the_same_function(llava, plain_tokenizer, with_vision_tower):
    root, vision = llava
    state, raw = write_llava_mamba_checkpoint(
        root / "llava", vision, plain_tokenizer, with_vision_tower=with_vision_tower
    )
    image_token_id = len(plain_tokenizer)  # the converter appends <image> to the tokenizer
    reference = llava_reference(state, raw, vision, image_token_id)
    out = convert_llava(root / "llava", root / "out", vision=root / "clip-tower", reference=reference)

    model = VLMambaForConditionalGeneration.from_pretrained(out)
    assert model.config.projector_type == "mlp" and model.config.image_token_id == image_token_id
    processor = AutoProcessor.from_pretrained(out)
    assert processor.image_aspect_ratio == "pad" and processor.image_token_id == image_token_id
    images = [make_image(), make_image(color=(10, 200, 10))]
    inputs = processor(images=images, text=["Look: <image> and <image>, which?"], return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs).logits
    theirs = reference(inputs["input_ids"], inputs["pixel_values"])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    ("mm", "message"),
    [
        ({"mm_projector_type": "linear"}, "mm_projector_type='linear' is not supported"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature='cls' is not supported"),
        ({"image_aspect_ratio": "anyres"}, "image_aspect_ratio='anyres' is not supported"),
        ({"mm_hidden_size": 1024}, "mm_hidden_size=1024 but .* gives 32-wide features"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end=true is not supported"),
    ],
)
def test_llava_options_vl_mamba_cannot_express_are_rejected(llava, plain_tokenizer, mm, message):
    root, vision = llava
    write_llava_mamba_checkpoint(root / "llava", vision, plain_tokenizer, **mm)
    with pytest.raises(ConversionError, match=message):
        convert_llava(root / "llava", root / "out", vision=root / "clip-tower")
    assert not (root / "out").exists()


def test_llava_checkpoints_of_other_language_models_or_oversized_tokenizers_are_refused(llava, plain_tokenizer):
    """The LLaVA converter reads Mamba-1 LLMs and keeps their vocabulary: a Mamba-2 LLM, or a tokenizer that needs
    more rows than the checkpoint's embeddings have, is an error naming the config."""
    root, vision = llava
    write_llava_mamba_checkpoint(root / "mamba2", vision, plain_tokenizer, ssm_cfg={"layer": "Mamba2", "d_state": 4})
    with pytest.raises(
        ConversionError, match=r"(?s)mamba2/config.json: the language model is not a Mamba-1 model, .*layer='Mamba2'"
    ):
        convert_llava(root / "mamba2", root / "out", vision=root / "clip-tower")
    write_llava_mamba_checkpoint(root / "full", vision, plain_tokenizer, vocab_size=len(plain_tokenizer))
    with pytest.raises(
        ConversionError, match=r"has \d+ tokens with <image> and its pad token but the LLM's vocabulary"
    ):
        convert_llava(root / "full", root / "out", vision=root / "clip-tower")
    write_llava_mamba_checkpoint(root / "small", vision, plain_tokenizer, vocab_size=8)
    with pytest.raises(ConversionError, match=r"more than the LLM's vocabulary of 8: it is not this LLM's tokenizer"):
        convert_llava(root / "small", root / "out", vision=root / "clip-tower")
    assert not (root / "out").exists()


def test_stage_1_mm_projector_goes_into_a_composed_model(parts):
    generator = torch.Generator().manual_seed(5)
    projector = {  # LLaVA stage 1 saves `model.mm_projector.*` only: CLIP width 32 -> LLM width 32
        f"model.mm_projector.{name}": torch.randn(*shape, generator=generator)
        for name, shape in {"0.weight": (32, 32), "0.bias": (32,), "2.weight": (32, 32), "2.bias": (32,)}.items()
    }
    torch.save(projector, parts / "mm_projector.bin")
    base = compose(parts / "clip", parts / "mamba", parts / "base", projector_type="mlp")
    out = load_mm_projector(parts / "mm_projector.bin", base, parts / "stage1")
    connector = VLMambaForConditionalGeneration.from_pretrained(out).model.multi_modal_projector
    torch.testing.assert_close(connector.linear_1.weight, projector["model.mm_projector.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(connector.linear_2.bias, projector["model.mm_projector.2.bias"], rtol=0, atol=0)
    vss_base = compose(parts / "clip", parts / "mamba", parts / "vss", projector_type="vss_mlp")
    with pytest.raises(ConversionError, match="has a 'vss_mlp' connector; mm_projector.bin holds LLaVA's mlp2x_gelu"):
        load_mm_projector(parts / "mm_projector.bin", vss_base, parts / "stage1-vss")
    del projector["model.mm_projector.2.bias"]
    torch.save(projector, parts / "incomplete.bin")
    with pytest.raises(
        ConversionError, match=r"missing \(no source tensor\):\n  model.multi_modal_projector.linear_2.bias"
    ):
        load_mm_projector(parts / "incomplete.bin", base, parts / "stage1-incomplete")
    assert leftovers(parts) == []


# ---------------------------------------------------------------- command lines


@pytest.mark.parametrize("module", [convert_mamba_ssm_module, compose_module, convert_llava_module])
def test_every_converter_has_a_command_line(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module.__name__, "--help"])
    with pytest.raises(SystemExit) as exit_code:
        module.main()
    assert exit_code.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_command_line_converts(raw_dir, tmp_path, monkeypatch, capsys):
    argv = ["convert_mamba_ssm", str(raw_dir), str(tmp_path / "out"), "--dtype", "float16", "--max-shard-size", "1MB"]
    monkeypatch.setattr(sys, "argv", argv)
    convert_mamba_ssm_module.main()
    assert "MambaForCausalLM saved to" in capsys.readouterr().out
    assert MambaForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.float16


# ---------------------------------------------------------------- hostile and broken sources


def test_an_overflow_to_float16_is_an_error_not_verified(tmp_path):
    state = random_mamba_ssm_state(raw_mamba_config())
    state["backbone.layers.1.mixer.out_proj.weight"][0, 0] = 1e6  # beyond float16's 65504
    write_mamba_ssm_checkpoint(tmp_path / "raw", state=state)
    with pytest.raises(
        ConversionError, match=r"overflowing torch.float16.*\n  backbone.layers.1.mixer.out_proj.weight"
    ):
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out", dtype=torch.float16)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    convert_mamba_ssm(tmp_path / "raw", tmp_path / "out", dtype=torch.bfloat16)  # wide enough


def test_non_finite_source_weights_are_named(tmp_path):
    state = random_mamba_ssm_state(raw_mamba_config())
    state["backbone.layers.0.mixer.D"][3] = float("nan")
    state["backbone.norm_f.weight"][0] = float("inf")
    write_mamba_ssm_checkpoint(tmp_path / "raw", state=state)
    with pytest.raises(ConversionError, match=r"2 not finite in the source:\n  backbone.layers.0.mixer.D: 1 NaN"):
        convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_mixed_precision_source_converts_to_one_dtype(tmp_path):
    state = random_mamba_ssm_state(raw_mamba_config())
    state["backbone.layers.0.mixer.D"] = state["backbone.layers.0.mixer.D"].half()
    write_mamba_ssm_checkpoint(tmp_path / "raw", state=state)
    out = convert_mamba_ssm(tmp_path / "raw", tmp_path / "out")
    from safetensors.torch import load_file

    assert {tensor.dtype for tensor in load_file(out / "model.safetensors").values()} == {torch.float32}


def rewrite_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ssm_cfg": ["d_state", 4]}, r"ssm_cfg=\['d_state', 4\] must be an object of mixer settings"),
        ({"d_model": "16"}, "d_model='16' must be a positive integer"),
        ({"n_layer": -2}, "n_layer=-2 must be a positive integer"),
        ({"ssm_cfg": {"d_state": 0}}, "ssm_cfg.d_state=0 must be a positive integer"),
    ],
)
def test_wrong_typed_raw_config_values_are_named(raw_dir, tmp_path, change, message):
    rewrite_config(raw_dir, **change)
    with pytest.raises(ConversionError, match=message):
        convert_mamba_ssm(raw_dir, tmp_path / "out")


def test_broken_files_are_named_with_the_fix(raw_dir, tmp_path):
    (raw_dir / "config.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(ConversionError, match=r"raw/config.json is not valid UTF-8 JSON .*: repair it"):
        convert_mamba_ssm(raw_dir, tmp_path / "out")
    (raw_dir / "config.json").write_text("{oops")
    with pytest.raises(ConversionError, match=r"raw/config.json is not valid UTF-8 JSON"):
        convert_mamba_ssm(raw_dir, tmp_path / "out")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ConversionError, match="index.json has no 'weight_map'"):
        read_checkpoint(sharded)
    (sharded / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../../secret.safetensors"}})
    )
    with pytest.raises(ConversionError, match=r"names shard files outside its folder: \['../../secret.safetensors'\]"):
        read_checkpoint(sharded)
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ConversionError, match="Cannot read the weights in .*corrupt.safetensors"):
        read_checkpoint(tmp_path / "corrupt.safetensors")
    with pytest.raises(FileNotFoundError, match="'runs/mamba-raw/typo' does not exist: give an existing folder"):
        convert_mamba_ssm("runs/mamba-raw/typo", tmp_path / "out")


def test_llava_without_a_vision_tower_and_mixed_projector_prefixes_are_named(llava, plain_tokenizer, parts):
    root, vision = llava
    write_llava_mamba_checkpoint(root / "llava", vision, plain_tokenizer)
    config = json.loads((root / "llava" / "config.json").read_text())
    del config["mm_vision_tower"]
    (root / "llava" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="names no mm_vision_tower: pass the vision tower .* \\(--vision"):
        convert_llava(root / "llava", root / "out")

    generator = torch.Generator().manual_seed(5)
    mixed = {"model.mm_projector.0.weight": torch.randn(32, 32, generator=generator)}
    mixed |= {"mm_projector.0.bias": torch.randn(32), "mm_projector.2.weight": torch.randn(32, 32)}
    mixed |= {"mm_projector.2.bias": torch.randn(32)}
    torch.save(mixed, parts / "mixed.bin")
    base = compose(parts / "clip", parts / "mamba", parts / "base-mixed", projector_type="mlp")
    with pytest.raises(ConversionError, match=r"mixes key prefixes \['mm_projector.', 'model.mm_projector.'\]"):
        load_mm_projector(parts / "mixed.bin", base, parts / "stage1-mixed")
