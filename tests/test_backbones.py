"""Each language model a VL-Mamba is built on (Mamba, FalconMamba, Mamba-2), at tiny sizes on CPU: the composed model
computes its LLM's function on text, caches and pads exactly, trains in both stages and with LoRA, and keeps its type
through saving and remote code; a config that mislabels one backbone as another is refused."""

import pytest
import torch
from PIL import Image
from transformers import AutoModelForCausalLM, FalconMambaConfig, Mamba2Config, MambaConfig

from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration
from modeling_vlmamba.decode_step import decode_step, ssm_matrices
from tests.conftest import make_image, user_turn
from tests.isolated_load import chat_inputs, run_isolated
from tests.test_training import (
    arguments,
    assert_lora_trains_only_adapters_and_the_connector,
    changed_parts,
    fixed_batch_loss,
    parameters,
    write_workspace,
)
from vlmamba.conversion.hub_folder import save_folder
from vlmamba.model_cards import write_card
from vlmamba.training.sft import build_trainer, train
from vlmamba.training.tiny import SAMPLE_TEXT, TINY_TEXT, tiny_config, tiny_model, tiny_processor
from vlmamba.training.tokenizer import train_gpt_neox_tokenizer

BACKBONES = ["mamba", "falcon_mamba", "mamba2"]
CONFIG_CLASSES = {"mamba": MambaConfig, "falcon_mamba": FalconMambaConfig, "mamba2": Mamba2Config}
ATOL = 1e-5


@pytest.fixture(scope="module", params=BACKBONES)
def backbone(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer():
    return train_gpt_neox_tokenizer(SAMPLE_TEXT)


@pytest.fixture(scope="module")
def built(backbone, tokenizer):
    config = tiny_config(tokenizer, text={"model_type": backbone})
    return tiny_model(config), tiny_processor(tokenizer, config)


def chat_batch(processor, questions: list[str]) -> dict:
    conversations = [user_turn(question) for question in questions]
    prompts = [processor.apply_chat_template(turns, add_generation_prompt=True) for turns in conversations]
    images = [make_image(color=(40 * i, 200 - 30 * i, 30)) for i in range(len(questions))]
    return processor(images=images, text=prompts, padding=True, return_tensors="pt")


def test_the_language_model_is_the_backbones_own(built, backbone):
    model, _ = built
    assert isinstance(model.config.text_config, CONFIG_CLASSES[backbone])
    source_class = type(AutoModelForCausalLM.from_config(model.config.text_config).backbone)
    assert isinstance(model.language_model, source_class)
    tied = model.lm_head.weight is model.language_model.get_input_embeddings().weight
    assert tied == model.config.text_config.tie_word_embeddings == TINY_TEXT[backbone].get("tie_word_embeddings", True)


def test_text_only_logits_equal_the_source_llms(built, backbone):
    """The source LLM's weights in the VL-Mamba give the source LLM's logits on text."""
    model, _ = built
    torch.manual_seed(1)
    source = AutoModelForCausalLM.from_config(model.config.text_config).eval()
    weights = {
        name.replace("backbone.", "model.language_model.", 1): value for name, value in source.state_dict().items()
    }
    composed = VLMambaForConditionalGeneration(model.config).eval()
    missing, unexpected = composed.load_state_dict(weights, strict=False)
    assert not unexpected and all("language_model" not in name and name != "lm_head.weight" for name in missing)
    input_ids = torch.randint(2, model.config.image_token_id, (2, 21))  # longer than a Mamba-2 chunk (8)
    with torch.no_grad():
        expected = source(input_ids).logits
        actual = composed(input_ids=input_ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


def test_cached_and_uncached_greedy_decoding_agree(built):
    model, processor = built
    inputs = chat_batch(processor, ["What colour is the square at the top left?"])
    cached = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=10, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_a_left_padded_batch_gives_each_prompts_own_tokens(built):
    model, processor = built
    questions = ["What colour is the square at the top left?", "How many?"]
    batch = chat_batch(processor, questions)
    assert (batch["attention_mask"] == 0).any()  # the second prompt is padded
    together = model.generate(**batch, max_new_tokens=8, do_sample=False)
    for row, question in enumerate(questions):
        alone = chat_batch(processor, [question])
        alone["pixel_values"] = batch["pixel_values"][row : row + 1]  # the image of that row
        alone_tokens = model.generate(**alone, max_new_tokens=8, do_sample=False)
        assert torch.equal(together[row, -8:], alone_tokens[0, -8:])
        with torch.no_grad():
            padded = model(**batch).logits[row, -1]
            torch.testing.assert_close(model(**alone).logits[0, -1], padded, rtol=0, atol=ATOL)


def test_the_decode_step_refuses_a_language_model_it_has_no_step_for(built):
    model, processor = built
    inputs = chat_batch(processor, ["Describe it."])
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache_params
    language_model = model.language_model
    original = language_model.config.model_type
    try:
        language_model.config.model_type = "jamba"
        with pytest.raises(NotImplementedError, match="No decode step for a 'jamba' language model"):
            decode_step(language_model, inputs["input_ids"][:, -1:], cache, ssm_matrices(language_model))
    finally:
        language_model.config.model_type = original


def test_the_model_card_names_the_backbone(built, backbone, tmp_path):
    model, processor = built
    folder = save_folder(model, tmp_path / "saved", processor, finalize=lambda folder: write_card(folder, {}))
    name = {"mamba": "Mamba, 2 layers", "falcon_mamba": "FalconMamba, 2 layers", "mamba2": "Mamba-2, 2 layers"}[
        backbone
    ]
    card = (folder / "README.md").read_text()
    assert f"| language model | {name}, width 32" in card
    assert "\n# saved\n" in card  # titled after the folder, not the staging folder it was written in


def test_saving_and_remote_code_keep_the_backbone(built, backbone, tmp_path):
    model, processor = built
    folder = save_folder(model, tmp_path / "saved", processor)
    reloaded = VLMambaForConditionalGeneration.from_pretrained(folder)
    assert type(reloaded.config.text_config) is CONFIG_CLASSES[backbone]
    assert type(reloaded.language_model) is type(model.language_model)
    image_path = tmp_path / "square.png"
    make_image().save(image_path)
    remote = run_isolated(folder, image_path, tmp_path)
    assert remote["model_module"].startswith("transformers_modules.")
    with torch.no_grad():
        local = model(**chat_inputs(processor, Image.open(image_path))).logits
    torch.testing.assert_close(remote["logits"], local, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ({"model_type": "mamba", "mixer_rms_eps": 1e-6}, "model_type='mamba' but has mixer_rms_eps"),
        ({"model_type": "falcon_mamba", "num_heads": 4}, "model_type='falcon_mamba' but has num_heads"),
        (
            {"model_type": "mamba2", "num_heads": 4, "head_dim": 16, "use_mambapy": False},
            "model_type='mamba2' but has use_mambapy",
        ),
        ({"model_type": "llama"}, "is a 'llama' config; a VL-Mamba's language model is one of"),
    ],
)
def test_a_mislabelled_or_unsupported_language_model_config_is_refused(text, message):
    with pytest.raises(ValueError, match=message):
        VLMambaConfig(text_config={"hidden_size": 32, "num_hidden_layers": 2, "vocab_size": 60000, **text})


# ---------------------------------------------------------------- training, for the two new backbones


@pytest.fixture(scope="module")
def workspace(backbone, tmp_path_factory):
    """Synthetic data and an untrained tiny VL-Mamba on `backbone` (the Mamba one is tests/test_training.py's)."""
    if backbone == "mamba":
        pytest.skip("tests/test_training.py trains the Mamba backbone")
    return write_workspace(tmp_path_factory.mktemp(f"training-{backbone}"), text={"model_type": backbone})


@pytest.mark.parametrize("stage", [1, 2])
def test_both_stages_lower_the_loss_and_train_only_their_parts(workspace, stage):
    trainer = build_trainer(arguments(workspace, stage, f"stage{stage}"))
    before = parameters(trainer.model)
    trainer.train()
    expected = {"multi_modal_projector"}
    if stage == 2:  # the whole LLM, its head too where it is not the (tied) embedding
        expected |= {"language_model"} | ({"lm_head"} if "lm_head.weight" in before else set())
    assert changed_parts(before, parameters(trainer.model)) == expected
    final = train(arguments(workspace, stage, f"stage{stage}-run", "--max-steps", "12"))
    # Deterministic on a fixed batch, so any drop is the training's. FalconMamba's connector-only stage moves it least
    # at this size (dt, B and C are normalised whatever the image features' scale): 0.025 nats in 12 steps.
    assert (
        fixed_batch_loss(final, workspace, stage) < fixed_batch_loss(workspace / "untrained", workspace, stage) - 0.02
    )


def test_lora_trains_only_the_adapters_and_the_connector(workspace):
    assert_lora_trains_only_adapters_and_the_connector(workspace)


def test_falcon_mamba_trains_through_the_function_it_computes(tokenizer, monkeypatch):
    """FalconMamba is never trained through the fused kernel transformers calls for it where mamba_ssm is installed,
    which normalises dt after the dt projection instead of before: training computes the eval-mode loss."""
    from transformers.models.falcon_mamba import modeling_falcon_mamba

    def fused_training_kernel(*args, **kwargs):
        raise AssertionError("mamba_ssm's fused FalconMamba training kernel was called")

    monkeypatch.setattr(modeling_falcon_mamba, "mamba_inner_fn", fused_training_kernel)
    model = tiny_model(tiny_config(tokenizer, text={"model_type": "falcon_mamba"}))
    input_ids = torch.randint(2, model.config.image_token_id, (2, 12))
    with torch.no_grad():
        inferred = model(input_ids=input_ids, labels=input_ids).loss
    model.train()
    trained = model(input_ids=input_ids, labels=input_ids).loss
    trained.backward()
    torch.testing.assert_close(trained, inferred, rtol=0, atol=1e-6)
    assert all(layer.mixer.training for layer in model.language_model.layers)  # left in training mode
    assert model.language_model.layers[0].mixer.in_proj.weight.grad is not None


def test_the_tiny_tool_builds_each_backbone(backbone, tmp_path, capsys):
    from vlmamba.training.tiny import main

    main([str(tmp_path / "tiny"), "--llm", backbone])
    assert "Tiny VL-Mamba saved to" in capsys.readouterr().out
    reloaded = VLMambaForConditionalGeneration.from_pretrained(tmp_path / "tiny")
    assert type(reloaded.config.text_config) is CONFIG_CLASSES[backbone]
