"""Publishing: model cards of composed, converted and trained folders; the dry-run folder loading as remote code
in a clean process; and the upload path through a recording stand-in for `HfApi`."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    MambaConfig,
    MambaForCausalLM,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from tests.conftest import make_image
from tests.isolated_load import MAX_NEW_TOKENS, chat_inputs, run_isolated
from vlmamba.conversion.compose import compose
from vlmamba.conversion.push_to_hub import PublishError, push_to_hub
from vlmamba.model_cards import parameter_counts, render_card
from vlmamba.training.sft import build_parser, train
from vlmamba.training.synthetic import generate, texts
from vlmamba.training.tokenizer import train_gpt_neox_tokenizer

VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
VISION |= {"image_size": 16, "patch_size": 4}
EXPECTED_UPLOAD = {
    "README.md",
    "card_data.json",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "configuration_vlmamba.py",
    "decode_graph.py",
    "decode_kernels.py",
    "decode_step.py",
    "fused_mamba.py",
    "modeling_vlmamba.py",
    "processing_vlmamba.py",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A composed VL-Mamba, and the same after a short stage-1 training run."""
    root = tmp_path_factory.mktemp("publish")
    data = generate(root / "data", train_scenes=16, heldout_scenes=1, seed=2)
    tokenizer = train_gpt_neox_tokenizer(texts(data) + ["<|user|>\n<|assistant|>\n"], vocab_size=340)
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(root / "siglip")
    MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, vocab_size=352)).save_pretrained(
        root / "mamba"
    )
    tokenizer.save_pretrained(root / "mamba")
    composed = compose(root / "siglip", root / "mamba", root / "composed", projector_type="vss_l2")
    argv = ["--stage", "1", "--model", str(composed), "--data", str(data / "captions.json")]
    argv += ["--output-dir", str(root / "stage1"), "--max-steps", "2", "--global-batch-size", "4"]
    argv += [
        "--per-device-batch-size",
        "4",
        "--num-workers",
        "0",
        "--no-gradient-checkpointing",
        "--logging-steps",
        "1",
    ]
    trained = train(build_parser().parse_args(argv))
    return {"composed": composed, "trained": trained, "root": root}


def metadata(card: ModelCard) -> dict:
    """The card's YAML metadata, validated by rebuilding `ModelCardData` from it (raises on bad eval results)."""
    data = card.data.to_dict()
    ModelCardData(**data, ignore_metadata_errors=False)
    return data


def test_cards_of_composed_converted_and_trained_folders(folders):
    composed = ModelCard.load(folders["composed"] / "README.md")
    data = metadata(composed)
    assert (data["library_name"], data["pipeline_tag"]) == ("transformers", "image-text-to-text")
    assert {"mamba", "vl-mamba", "custom_code"} <= set(data["tags"]) and data["license"] == "apache-2.0"
    counts = parameter_counts(AutoModelForImageTextToText.from_pretrained(folders["composed"]).config)
    model = AutoModelForImageTextToText.from_pretrained(folders["composed"])
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert f"{counts['multi_modal_projector']:,}" in composed.text and "untrained VL-Mamba composed" in composed.text
    assert "`vss_l2`, bidirectional scan (2 directions)" in composed.text
    assert "vision encoder `siglip` and the language model `mamba`" in composed.text  # names, not local paths

    trained = ModelCard.load(folders["trained"] / "README.md")
    metadata(trained)
    assert "Stage 1 (connector alignment): trained the connector" in trained.text
    assert "data `captions.json`" in trained.text and "2 optimizer steps" in trained.text

    evaluated = render_card(
        folders["trained"],
        repo_id="org/vlmamba-test",
        base_model=["google/siglip-so400m-patch14-384", "state-spaces/mamba-2.8b-hf"],
        datasets=["liuhaotian/LLaVA-Pretrain"],
        evaluation=[
            {
                "dataset_type": "synthetic",
                "dataset_name": "shapes",
                "dataset_split": "heldout",
                "metric_type": "accuracy",
                "metric_name": "exact match",
                "metric_value": 0.5,
            }
        ],
    )
    data = metadata(evaluated)
    assert data["base_model"] == ["google/siglip-so400m-patch14-384", "state-spaces/mamba-2.8b-hf"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert 'pipeline("image-text-to-text", model="org/vlmamba-test", trust_remote_code=True)' in evaluated.text


class RecordingHfApi:
    """Stands in for `HfApi` at its boundary: records every call, touches no network."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def record(*args, **kwargs):
            if name == "upload_folder":
                kwargs["files"] = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
            self.calls.append((name, kwargs))
            return type("Commit", (), {"commit_url": "https://hf.co/org/name/commit/1", "pr_url": None})()

        return record


def test_upload_is_one_commit_with_every_file(folders):
    api = RecordingHfApi()
    push_to_hub(folders["trained"], "org/vlmamba-test", token="hf_test", api=api, private=True)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    upload = api.calls[1][1]
    assert set(upload["files"]) == EXPECTED_UPLOAD
    assert (upload["revision"], upload["create_pr"]) == (None, False)
    assert api.calls[0][1]["private"] is True

    api = RecordingHfApi()
    push_to_hub(folders["trained"], "org/vlmamba-test", token="hf_test", api=api, revision="v1")
    assert [name for name, _ in api.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[1][1]["branch"] == "v1" and api.calls[2][1]["revision"] == "v1"

    api = RecordingHfApi()
    push_to_hub(folders["trained"], "org/vlmamba-test", token="hf_test", api=api, create_pr=True, revision="main")
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[1][1]["create_pr"] is True and api.calls[1][1]["revision"] == "main"


def test_problems_are_reported_before_any_upload(folders, tmp_path, monkeypatch):
    api = RecordingHfApi()
    with pytest.raises(PublishError, match="Invalid repo id 'not a repo'"):
        push_to_hub(folders["trained"], "not a repo", token="hf_test", api=api)
    with pytest.raises(PublishError, match="write it as ORG/NAME"):
        push_to_hub(folders["trained"], "justaname", token="hf_test", api=api)
    monkeypatch.setattr("vlmamba.conversion.push_to_hub.get_token", lambda: None)
    with pytest.raises(PublishError, match="No Hugging Face token: run `hf auth login` or set HF_TOKEN"):
        push_to_hub(folders["trained"], "org/vlmamba-test", api=api)
    broken = tmp_path / "broken"
    shutil.copytree(folders["trained"], broken)
    (broken / "modeling_vlmamba.py").unlink()
    (broken / "chat_template.jinja").unlink()
    torch.save({}, broken / "pytorch_model.bin")
    with pytest.raises(PublishError, match=r"missing chat_template.jinja\n  missing modeling_vlmamba.py") as error:
        push_to_hub(broken, "org/vlmamba-test", token="hf_test", api=api)
    assert "pickle files ['pytorch_model.bin']" in str(error.value)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "old-shard.safetensors").write_text("stale")
    with pytest.raises(PublishError, match="staging folder .* is not empty"):
        push_to_hub(folders["trained"], "org/vlmamba-test", token="hf_test", api=api, staging_dir=occupied)
    assert api.calls == []


def test_dry_run_folder_loads_as_remote_code_in_a_clean_process(folders, tmp_path, capsys):
    staged = push_to_hub(
        folders["trained"], "org/vlmamba-test", dry_run=True, staging_dir=tmp_path / "staged", license="mit"
    )
    printed = capsys.readouterr().out
    assert json.loads((staged / "card_data.json").read_text())["license"] == "mit"
    assert "license: mit" in (staged / "README.md").read_text()
    assert str(folders["root"]) not in (staged / "card_data.json").read_text()  # no local paths are published
    assert "model.safetensors" in printed and "library_name: transformers" in printed
    copy = tmp_path / "copy"
    shutil.copytree(staged, copy)
    assert {path.name for path in copy.iterdir()} == EXPECTED_UPLOAD

    image_path = tmp_path / "picture.png"
    make_image().save(image_path)
    remote = run_isolated(copy, image_path, tmp_path)
    assert remote["importable"] is False and remote["model_module"].startswith("transformers_modules.")

    model = AutoModelForImageTextToText.from_pretrained(folders["trained"]).eval()
    processor = AutoProcessor.from_pretrained(folders["trained"])
    inputs = chat_inputs(processor, Image.open(image_path))
    local = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    assert torch.equal(remote["generated"], local)
    assert remote["pipeline_text"] == processor.decode(
        local[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )


def test_the_committed_example_card_is_valid():
    card = ModelCard.load(Path(__file__).resolve().parents[1] / "model_cards" / "examples" / "vlmamba-demo-tiny.md")
    data = metadata(card)
    assert data["pipeline_tag"] == "image-text-to-text" and "vl-mamba" in data["tags"]
    assert [metric["name"] for metric in data["model-index"][0]["results"][0]["metrics"]][-1] == "exact match, overall"


def test_links_out_of_the_folder_and_pickles_anywhere_are_refused(folders, tmp_path):
    import pickle

    secret = tmp_path / "secrets.env"
    secret.write_text("HF_TOKEN=hf_secret")
    linked = tmp_path / "linked"
    shutil.copytree(folders["trained"], linked)
    (linked / "notes.txt").symlink_to(secret)
    (linked / "etc").symlink_to(tmp_path, target_is_directory=True)
    api = RecordingHfApi()
    with pytest.raises(PublishError, match=r"symbolic link etc points outside the folder") as error:
        push_to_hub(linked, "org/vlmamba-test", token="hf_test", api=api)
    assert "symbolic link notes.txt points outside the folder" in str(error.value)

    pickled = tmp_path / "pickled"
    shutil.copytree(folders["trained"], pickled)
    (pickled / "extra").mkdir()
    for name in ("extra/evil.bin", "model.ckpt", "weights.pickle", "OPT.BIN"):
        (pickled / name).write_bytes(b"whatever")
    (pickled / "extra" / "notes.data").write_bytes(pickle.dumps({"a": 1}, protocol=4))
    torch.save({"w": torch.zeros(2)}, pickled / "blob.dat")  # a zip holding data.pkl
    with pytest.raises(PublishError, match="pickle files") as error:
        push_to_hub(pickled, "org/vlmamba-test", token="hf_test", api=api)
    for name in ("extra/evil.bin", "model.ckpt", "weights.pickle", "OPT.BIN", "extra/notes.data", "blob.dat"):
        assert f"'{name}'" in str(error.value)
    assert api.calls == []


def test_a_dry_run_leaves_no_staging_folder_and_names_extra_files(folders, tmp_path, caplog, capsys):
    import logging

    folder = tmp_path / "model"
    shutil.copytree(folders["trained"], folder)
    (folder / "optimizer_dump.npy").write_bytes(b"\0" * 4096)
    with caplog.at_level(logging.WARNING):
        assert push_to_hub(folder, "org/vlmamba-test", dry_run=True) is None
    assert "1 files of" in caplog.text and "optimizer_dump.npy  (4,096 bytes)" in caplog.text
    assert "optimizer_dump.npy" in capsys.readouterr().out
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # nothing staged is left behind
