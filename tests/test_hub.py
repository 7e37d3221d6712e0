"""Saved folders: files, weight tying, remote code in a clean process, and the image-text-to-text pipeline."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText, pipeline

from tests.conftest import make_image
from tests.isolated_load import MAX_NEW_TOKENS, QUESTION, chat_inputs, conversation, run_isolated

EXPECTED_FILES = {
    "config.json",
    "configuration_vlmamba.py",
    "decode_graph.py",
    "decode_kernels.py",
    "decode_step.py",
    "fused_mamba.py",
    "modeling_vlmamba.py",
    "processing_vlmamba.py",
    "model.safetensors",
    "generation_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, processor) -> Path:
    folder = tmp_path_factory.mktemp("vlmamba-tiny")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_saved_folder_is_a_complete_hub_repo(saved):
    assert EXPECTED_FILES <= {path.name for path in saved.iterdir()}
    config = json.loads((saved / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vlmamba.VLMambaConfig",
        "AutoModel": "modeling_vlmamba.VLMambaModel",
        "AutoModelForImageTextToText": "modeling_vlmamba.VLMambaForConditionalGeneration",
    }
    assert config["architectures"] == ["VLMambaForConditionalGeneration"]
    processor_config = json.loads((saved / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_vlmamba.VLMambaProcessor"}
    generation = json.loads((saved / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (0, 1)


def test_weight_tying_survives_save_and_load(saved, model):
    with safe_open(saved / "model.safetensors", "pt") as weights:
        assert "lm_head.weight" not in weights.keys()
    loaded = AutoModelForImageTextToText.from_pretrained(saved)
    embeddings = loaded.model.language_model.embeddings.weight
    assert loaded.lm_head.weight is embeddings
    torch.testing.assert_close(embeddings, model.lm_head.weight, rtol=0, atol=0)


def test_generation_settings_survive_save_and_load(saved, model, processor):
    loaded = AutoModelForImageTextToText.from_pretrained(saved)
    assert loaded.generation_config.cuda_graph_decode is True
    assert loaded.generation_config.suppress_tokens == [model.config.image_token_id]
    inputs = processor(images=[make_image()], text=f"<image>{QUESTION}", return_tensors="pt")
    assert (
        loaded.generate(**inputs, max_new_tokens=2, cuda_graph_decode=False).shape[1]
        == inputs["input_ids"].shape[1] + 2
    )


def test_remote_code_round_trip_in_a_process_that_cannot_import_the_package(saved, model, processor, tmp_path):
    image_path = tmp_path / "square.png"
    make_image().save(image_path)
    remote = run_isolated(saved, image_path, tmp_path)
    assert remote["importable"] is False
    assert remote["model_module"].startswith("transformers_modules.")
    assert remote["processor_module"].startswith("transformers_modules.")
    assert remote["base_class"] == "VLMambaModel"

    from PIL import Image

    inputs = chat_inputs(processor, Image.open(image_path))
    assert torch.equal(remote["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(remote["logits"], model(**inputs).logits, rtol=0, atol=0)
    local = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert torch.equal(remote["generated"], local)
    new_tokens = local[0, inputs["input_ids"].shape[1] :]
    assert remote["pipeline_text"] == processor.decode(new_tokens, skip_special_tokens=True)


def test_pipeline_answers_chat_messages_and_plain_text(saved, model, processor):
    pipe = pipeline("image-text-to-text", model=str(saved), trust_remote_code=True)
    image = make_image()

    chat = pipe(text=conversation(image), max_new_tokens=MAX_NEW_TOKENS)
    reply = chat[0]["generated_text"][-1]
    assert reply["role"] == "assistant"
    inputs = chat_inputs(processor, image)
    expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert reply["content"] == processor.decode(expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    prompt = f"<image>{QUESTION}"
    plain = pipe(images=[image], text=prompt, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    expected = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert plain[0]["generated_text"] == processor.decode(
        expected[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
