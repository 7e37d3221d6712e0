import pytest
from transformers import AutoConfig, CLIPVisionConfig, MambaConfig, SiglipVisionConfig

from modeling_vlmamba import VLMambaConfig
from vlmamba.training.tiny import TINY_CLIP, TINY_MAMBA, TINY_SIGLIP, tiny_config


def test_defaults_are_the_papers_final_model():
    config = VLMambaConfig()
    assert isinstance(config.vision_config, SiglipVisionConfig)
    assert isinstance(config.text_config, MambaConfig)
    assert (config.projector_type, config.scan_type) == ("vss_l2", "bidirectional")
    assert config.patch_grid == (27, 27)
    assert config.image_seq_length == 729
    assert config.vision_feature_size == 1152
    assert config.text_config.hidden_size == 2560
    assert config.tie_word_embeddings is True
    assert config.get_text_config(decoder=True) is config.text_config


def test_round_trip_preserves_values_and_sub_config_types(tmp_path, tokenizer):
    config = tiny_config(
        tokenizer, projector_type="vss_mlp", scan_type="cross", vision_feature_layer=[-1, -2], vss_expand=3
    )
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is VLMambaConfig
    assert isinstance(loaded.vision_config, SiglipVisionConfig)
    assert isinstance(loaded.text_config, MambaConfig)
    assert loaded.to_diff_dict() == config.to_diff_dict()
    assert loaded.vision_feature_layer == [-1, -2] and loaded.vision_feature_size == 64
    assert loaded.auto_map["AutoModelForImageTextToText"] == "modeling_vlmamba.VLMambaForConditionalGeneration"


def test_tie_word_embeddings_mirrors_text_config(tokenizer):
    untied = VLMambaConfig(
        vision_config=dict(TINY_SIGLIP), text_config={**TINY_MAMBA, "tie_word_embeddings": False}, image_token_id=5
    )
    assert untied.tie_word_embeddings is False
    assert tiny_config(tokenizer).tie_word_embeddings is True


def test_clip_drops_cls_and_siglip_keeps_every_patch(tokenizer):
    clip = VLMambaConfig(
        vision_config={**TINY_CLIP, "image_size": 336, "patch_size": 14},
        text_config=dict(TINY_MAMBA),
        vision_feature_select_strategy="default",
        image_token_id=5,
    )
    assert isinstance(clip.vision_config, CLIPVisionConfig)
    assert clip.image_seq_length == 576
    siglip = VLMambaConfig(
        vision_config={**TINY_SIGLIP, "image_size": 384, "patch_size": 14},
        text_config=dict(TINY_MAMBA),
        image_token_id=5,
    )
    assert siglip.image_seq_length == 729
    clip_mlp_full = VLMambaConfig(
        vision_config=dict(TINY_CLIP), text_config=dict(TINY_MAMBA), projector_type="mlp", image_token_id=5
    )
    assert clip_mlp_full.image_seq_length == 17  # 4x4 patches + CLS: an MLP connector does not need a grid


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"projector_type": "mlp3x"},
            "`projector_type='mlp3x'` is not supported; valid choices: mlp, vss_mlp, vss_l2",
        ),
        ({"scan_type": "diagonal"}, "`scan_type='diagonal'` is not supported; valid choices: bidirectional, cross"),
        ({"vision_feature_select_strategy": "cls"}, "valid choices: default, full"),
        ({"vss_state_size": 0}, "`vss_state_size` must be a positive integer"),
        ({"vss_expand": 1.5}, "`vss_expand` must be a positive integer"),
        ({"vision_feature_layer": 7}, "`vision_feature_layer` [7] out of range"),
        ({"vision_feature_layer": []}, "non-empty list of ints"),
        ({"image_seq_length": 10}, "`image_seq_length=10` does not match the 16 tokens"),
        ({"image_token_id": 5000}, "`image_token_id=5000` is outside the text vocabulary"),
        ({"image_token_id": 0}, "`image_token_id=0` is also the text config's bos_token_id and eos_token_id"),
        ({"projector_hidden_act": "swoosh"}, "`projector_hidden_act='swoosh'` is not an activation"),
    ],
)
def test_bad_values_are_rejected_with_the_field_and_choices(tokenizer, kwargs, message):
    with pytest.raises(ValueError) as error:
        tiny_config(tokenizer, **kwargs)
    assert message in str(error.value)


def test_a_vision_scan_needs_exactly_the_patch_grid():
    with pytest.raises(
        ValueError, match=r"needs the 4x4 patch grid.*clip_vision_model \(1 prefix tokens\) gives 17 tokens"
    ):
        VLMambaConfig(vision_config=dict(TINY_CLIP), text_config=dict(TINY_MAMBA), image_token_id=5)
    with pytest.raises(ValueError, match=r"\(0 prefix tokens\) gives 15 tokens.*strategy='patch'"):
        VLMambaConfig(
            vision_config=dict(TINY_SIGLIP),
            text_config=dict(TINY_MAMBA),
            vision_feature_select_strategy="default",
            image_token_id=5,
        )
    # LLaVA's "patch" selection on SigLIP drops a real patch; an MLP connector can represent that checkpoint.
    siglip_mlp = VLMambaConfig(
        vision_config=dict(TINY_SIGLIP),
        text_config=dict(TINY_MAMBA),
        vision_feature_select_strategy="default",
        projector_type="mlp",
        image_token_id=5,
    )
    assert siglip_mlp.image_seq_length == 15


def test_siglip_pooling_head_is_never_built(tmp_path):
    """Whatever the SigLIP config says (a hand-built SiglipVisionConfig keeps transformers' vision_use_head=True)."""
    from modeling_vlmamba import VLMambaForConditionalGeneration

    vision = SiglipVisionConfig(**{k: v for k, v in TINY_SIGLIP.items() if k not in ("model_type", "vision_use_head")})
    assert vision.vision_use_head is True
    config = VLMambaConfig(vision_config=vision, text_config=dict(TINY_MAMBA), image_token_id=5)
    for built in (
        config,
        VLMambaConfig(
            vision_config={**TINY_SIGLIP, "vision_use_head": True}, text_config=dict(TINY_MAMBA), image_token_id=5
        ),
    ):
        assert built.vision_config.vision_use_head is False
        model = VLMambaForConditionalGeneration(built)
        assert not any(".head." in name for name, _ in model.named_parameters())
    config.save_pretrained(tmp_path)
    assert VLMambaConfig.from_pretrained(tmp_path).vision_config.vision_use_head is False


@pytest.mark.parametrize(
    ("vision", "message"),
    [
        ({"patch_size": 0}, r"patch_size=0 must be a positive integer"),
        ({"image_size": -16}, r"image_size=-16 must be a positive integer"),
        ({"image_size": 16, "patch_size": 32}, r"patch_size=32 is larger than its image_size=16"),
    ],
)
def test_impossible_image_geometry_is_refused_at_construction(tokenizer, vision, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tokenizer, vision={**TINY_SIGLIP, **vision})
