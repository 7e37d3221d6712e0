"""Two-stage training with TRL on tiny models: data reading, labels, freezing, LoRA, resume, bad data."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainerCallback

from tests.conftest import make_image
from vlmamba.conversion.hub_folder import save_folder
from vlmamba.training.data import DataError, VisionCollator, read_llava_json
from vlmamba.training.sft import (
    PRESETS,
    build_parser,
    build_trainer,
    get_last_checkpoint_or_none,
    resolved_hyperparameters,
    train,
)
from vlmamba.training.synthetic import generate, texts
from vlmamba.training.tiny import tiny_config, tiny_model, tiny_processor
from vlmamba.training.tokenizer import train_gpt_neox_tokenizer

# The same run twice on CPU is bitwise reproducible; resuming reloads fp32 weights and optimizer states exactly.
RESUME_ATOL = 1e-6


def write_workspace(root: Path, text: dict | None = None) -> Path:
    """A small synthetic dataset in `root` and an untrained tiny VL-Mamba built for it (its language model from
    `text`, as `tiny_config` takes it)."""
    data = generate(root / "data", train_scenes=48, heldout_scenes=4, seed=1)
    tokenizer = train_gpt_neox_tokenizer(texts(data) + ["<|user|>\n<|assistant|>\n<|system|>\n"], vocab_size=360)
    config = tiny_config(tokenizer, text=text)
    save_folder(tiny_model(config), root / "untrained", tiny_processor(tokenizer, config))
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return write_workspace(tmp_path_factory.mktemp("training"))


def arguments(workspace: Path, stage: int, output: str, *extra: str):
    data = "captions.json" if stage == 1 else "conversations.json"
    argv = ["--stage", str(stage), "--model", str(workspace / "untrained"), "--data", str(workspace / "data" / data)]
    argv += ["--output-dir", str(workspace / output), "--global-batch-size", "8", "--per-device-batch-size", "8"]
    argv += ["--max-steps", "6", "--learning-rate", "5e-3", "--no-gradient-checkpointing", "--num-workers", "0"]
    argv += ["--logging-steps", "1", "--save-steps", "1000", "--seed", "3"]
    return build_parser().parse_args(argv + list(extra))


def parameters(model) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def changed_parts(before: dict, after: dict) -> set[str]:
    """The model parts (`multi_modal_projector`, `language_model`, ..., `lm_head`) whose parameters changed."""
    names = [name for name in before if not torch.equal(before[name], after[name])]
    return {name.split(".")[1] if name.startswith("model.") else name.split(".")[0] for name in names}


def fixed_batch_loss(model_dir: Path, workspace: Path, stage: int) -> float:
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    data = "captions.json" if stage == 1 else "conversations.json"
    rows = read_llava_json(workspace / "data" / data, stage=stage)
    batch = VisionCollator(processor, stage)([rows[i] for i in range(8)])
    with torch.no_grad():
        return model(**batch).loss.item()


# ---------------------------------------------------------------- each stage trains what it should


@pytest.mark.parametrize("stage", [1, 2])
def test_a_few_steps_lower_the_loss_and_train_only_the_stages_parts(workspace, stage):
    trainer = build_trainer(arguments(workspace, stage, f"stage{stage}"))
    before = parameters(trainer.model)
    trainer.train()
    after = parameters(trainer.model)
    expected = {"multi_modal_projector"} if stage == 1 else {"multi_modal_projector", "language_model"}
    assert changed_parts(before, after) == expected  # everything else is bitwise unchanged
    trainable = {name.split(".")[1] for name, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == expected

    final = train(arguments(workspace, stage, f"stage{stage}-run", "--max-steps", "12"))
    # evaluated deterministically on a fixed batch: the decrease is the training's; 0.05 nats is far above rounding
    before_loss = fixed_batch_loss(workspace / "untrained", workspace, stage)
    assert fixed_batch_loss(final, workspace, stage) < before_loss - 0.05
    record = json.loads((final / "card_data.json").read_text())["training"][-1]
    data = "captions.json" if stage == 1 else "conversations.json"
    assert (record["stage"], record["steps"], record["data"]) == (stage, 12, data)
    assert record["final_loss"] < record["first_loss"]
    assert (final / "modeling_vlmamba.py").is_file() and (final / "processor_config.json").is_file()
    assert f"Stage {stage}" in (final / "README.md").read_text()


def assert_lora_trains_only_adapters_and_the_connector(workspace: Path) -> None:
    """A stage-2 LoRA run changes only the language model's `in_proj` adapters and the connector (trained whole)."""
    trainer = build_trainer(arguments(workspace, 2, "lora", "--lora-r", "4"))
    before = parameters(trainer.model)
    trainer.train()
    after = parameters(trainer.model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora_" in name or "multi_modal_projector.modules_to_save" in name for name in changed)
    assert any("lora_B" in name and "language_model" in name for name in changed)
    assert any("multi_modal_projector.modules_to_save" in name for name in changed)
    targeted = {name.split(".lora_")[0] for name in before if "lora_A" in name}
    assert targeted and all(name.endswith("mixer.in_proj") and "language_model" in name for name in targeted)


def test_lora_changes_only_adapters_and_the_connector(workspace):
    assert_lora_trains_only_adapters_and_the_connector(workspace)
    with pytest.raises(ValueError, match="--lora-r applies to stage 2"):
        build_trainer(arguments(workspace, 1, "lora-stage1", "--lora-r", "4"))


class Interrupt(Exception):
    pass


class InterruptAfter(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"interrupted after step {self.step}")


def test_an_interrupted_run_resumes_to_the_same_weights(workspace):
    straight = build_trainer(arguments(workspace, 2, "straight"))
    straight.train()

    args = arguments(workspace, 2, "interrupted", "--save-steps", "3")
    interrupted = build_trainer(args)
    interrupted.add_callback(InterruptAfter(4))
    with pytest.raises(Interrupt):
        interrupted.train()
    assert (workspace / "interrupted" / "checkpoint-3").is_dir()
    with pytest.raises(FileExistsError, match=r"holds a run \(checkpoints or final/\): pass --resume"):
        build_trainer(args)
    args.resume = True
    resumed = build_trainer(args)
    started_at = []

    class RecordStart(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            started_at.append(state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            started_at.append(state.global_step)

    resumed.add_callback(RecordStart())
    checkpoint = get_last_checkpoint_or_none(workspace / "interrupted")  # as train() finds it for --resume
    assert Path(checkpoint).name == "checkpoint-3"
    resumed.train(resume_from_checkpoint=checkpoint)
    assert started_at[1:] == [4, 5, 6]  # steps 1-3 came from the checkpoint, not from training again
    reference = parameters(straight.model)
    for name, value in parameters(resumed.model).items():
        torch.testing.assert_close(value, reference[name], rtol=0, atol=RESUME_ATOL)


# ---------------------------------------------------------------- labels, token by token


def expected_tokens(processor, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """Token ids and labels of a sample rendered as (text, labelled) segments, tokenized segment by segment."""
    ids, labels = [], []
    for text, labelled in segments:
        pieces = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += pieces
        labels += pieces if labelled else [-100] * len(pieces)
    return ids, labels


def assert_labels(batch, row: int, ids: list[int], labels: list[int]) -> None:
    """The row equals `ids` where the attention mask is 1, with exactly `labels`; padding is unlabelled."""
    mask = batch["attention_mask"][row].bool()
    assert batch["input_ids"][row][mask].tolist() == ids
    assert batch["labels"][row][mask].tolist() == labels
    assert (batch["labels"][row][~mask] == -100).all()


def test_stage_1_labels_cover_exactly_the_caption(workspace):
    processor = AutoProcessor.from_pretrained(workspace / "untrained", trust_remote_code=True)
    rows = read_llava_json(workspace / "data" / "captions.json", stage=1)
    batch = VisionCollator(processor, stage=1)([rows[0], rows[1]])
    image_tokens = "<image>" * processor.image_seq_length
    records = json.loads((workspace / "data" / "captions.json").read_text())
    for row in range(2):
        caption = records[row]["conversations"][1]["value"]
        ids, labels = expected_tokens(processor, [(image_tokens, False), (caption + "<|endoftext|>", True)])
        assert_labels(batch, row, ids, labels)


def test_stage_2_labels_cover_exactly_the_assistant_turns(workspace, tmp_path):
    processor = AutoProcessor.from_pretrained(workspace / "untrained", trust_remote_code=True)
    shutil.copy(workspace / "data" / "images" / "000000.png", tmp_path / "scene.png")
    conversations = {
        "two-turns": [
            ("human", "<image>\nWhat colour is it?"),
            ("gpt", "red"),
            ("human", "Shape?"),
            ("gpt", "a circle"),
        ],
        "text-only": [("human", "How many cells?"), ("gpt", "4")],
    }
    records = [
        {"id": "two-turns", "image": "scene.png", "conversations": []},
        {"id": "text-only", "conversations": []},
    ]
    for record in records:
        record["conversations"] = [{"from": who, "value": text} for who, text in conversations[record["id"]]]
    rows = read_llava_json(write_json(tmp_path / "chat.json", records))
    batch = VisionCollator(processor, stage=2)([rows[0], rows[1]])
    image_tokens = "<image>" * processor.image_seq_length
    for row, record in enumerate(records):
        segments = []
        for turn in record["conversations"]:
            text = turn["value"].replace("<image>\n", image_tokens)
            if turn["from"] == "human":
                segments.append((f"<|user|>\n{text}<|endoftext|>\n<|assistant|>\n", False))
            else:
                segments += [(text + "<|endoftext|>", True), ("\n", False)]
        ids, labels = expected_tokens(processor, segments)
        assert_labels(batch, row, ids, labels)


# ---------------------------------------------------------------- bad data


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"id": "r1", "conversations": []}, "Record r1: 'conversations' must be a non-empty list"),
        ({"id": "r2", "conversations": [{"from": "bot", "value": "x"}]}, "Record r2: turn 0 must be"),
        (
            {"id": "r3", "conversations": [{"from": "human", "value": "hi"}]},
            "Record r3: the conversation has no assistant",
        ),
        ({"id": "r4", "image": "nope.png", "conversations": []}, "Record r4: image file not found: .*nope.png"),
        (
            {
                "id": "r5",
                "image": "a.png",
                "conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
            },
            "Record r5: 0 <image> placeholders but 1 images",
        ),
        ({"id": "r6", "image": 3, "conversations": []}, "Record r6: 'image' must be a path or a list of paths"),
    ],
)
def test_bad_records_name_the_record_and_file(tmp_path, record, message):
    make_image().save(tmp_path / "a.png")
    with pytest.raises(DataError, match=message):
        read_llava_json(write_json(tmp_path / "bad.json", [record]))


def test_skip_bad_samples_warns_and_counts(tmp_path, caplog):
    make_image().save(tmp_path / "a.png")
    good = {
        "id": "ok",
        "image": "a.png",
        "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
    }
    bad = {"id": "broken", "image": "missing.png", "conversations": good["conversations"]}
    with caplog.at_level(logging.WARNING):
        rows = read_llava_json(write_json(tmp_path / "mixed.json", [good, bad, good]), skip_bad_samples=True)
    assert len(rows) == 2
    assert "Record broken: image file not found" in caplog.text and "Skipped 1 bad samples of 3" in caplog.text
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json is not valid UTF-8 JSON"):
        read_llava_json(tmp_path / "broken.json")


def test_unreadable_image_names_the_record_or_is_skipped(workspace, tmp_path):
    processor = AutoProcessor.from_pretrained(workspace / "untrained", trust_remote_code=True)
    shutil.copy(workspace / "data" / "images" / "000000.png", tmp_path / "fine.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "fine", "image": "fine.png", "conversations": turns},
        {"id": "bad", "image": "corrupt.png", "conversations": turns},
    ]
    rows = read_llava_json(write_json(tmp_path / "data.json", records))
    with pytest.raises(DataError, match=r"Record bad: cannot use image .*corrupt.png"):
        VisionCollator(processor, stage=2)([rows[0], rows[1]])
    collator = VisionCollator(processor, stage=2, skip_bad_samples=True)
    batch = collator([rows[0], rows[1]])
    assert batch["input_ids"].shape[0] == 1 and collator.skipped == 1


def test_max_length_cutting_image_tokens_and_stage_1_datasets_are_refused(workspace):
    processor = AutoProcessor.from_pretrained(workspace / "untrained", trust_remote_code=True)
    rows = read_llava_json(workspace / "data" / "conversations.json", stage=2)
    with pytest.raises(DataError, match=r"--max-length 8 cuts through image tokens in a batch of records scene-0-"):
        VisionCollator(processor, stage=2, max_length=8)([rows[0]])
    with pytest.raises(ValueError, match="Stage 1 trains on LLaVA-JSON captions"):
        argv = ["--stage", "1", "--model", str(workspace / "untrained"), "--dataset", "some/dataset"]
        build_trainer(build_parser().parse_args(argv + ["--output-dir", str(workspace / "s1-dataset")]))


def test_stage_presets_and_their_overrides(workspace):
    stage_1 = resolved_hyperparameters(
        build_parser().parse_args(["--stage", "1", "--model", "m", "--data", "d", "--output-dir", "o"])
    )
    assert stage_1["learning_rate"] == PRESETS[1]["learning_rate"] == 1e-3
    assert stage_1["global_batch_size"] == 256 and stage_1["gradient_accumulation_steps"] == 8
    stage_2 = build_parser().parse_args(["--stage", "2", "--model", "m", "--data", "d", "--output-dir", "o"])
    assert resolved_hyperparameters(stage_2)["gradient_accumulation_steps"] == 128 // 16
    odd = build_parser().parse_args(
        ["--stage", "2", "--model", "m", "--data", "d", "--output-dir", "o", "--global-batch-size", "100"]
    )
    with pytest.raises(ValueError, match="--global-batch-size 100 is not a multiple of the per-device batch 16"):
        resolved_hyperparameters(odd)


def test_synthetic_data_is_deterministic_and_holds_out_unseen_layouts(tmp_path):
    from vlmamba.training.synthetic import CHANCE, COLOURS, POSITIONS, SHAPES

    first, second = generate(tmp_path / "a", 400, 40, seed=5), generate(tmp_path / "b", 400, 40, seed=5)
    for name in ("captions.json", "conversations.json", "heldout.json"):
        assert (first / name).read_text() == (second / name).read_text()

    def layouts(name: str) -> set:
        records = json.loads((first / name).read_text())
        return {
            (r["layout"]["colour"], r["layout"]["shape"], tuple(r["layout"]["cells"]))
            for r in records
            if "layout" in r
        }

    training, heldout = layouts("conversations.json"), layouts("heldout.json")
    assert heldout and not training & heldout  # held-out scenes show layouts never trained on
    assert {layout[0] for layout in training} == set(COLOURS) and {layout[1] for layout in training} == set(SHAPES)
    assert {cell for layout in training for cell in layout[2]} == set(POSITIONS)
    records = json.loads((first / "heldout.json").read_text())
    assert {record["question_type"] for record in records} == set(CHANCE)


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("zero2", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(
        str(Path(__file__).resolve().parents[1] / "training" / "configs" / f"{name}.yaml")
    )
    assert (config.distributed_type.name, config.mixed_precision) == (kind, "bf16")
    if name == "fsdp2":
        assert (
            config.fsdp_config["fsdp_version"] == 2 and config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
        )
    if name == "zero2":
        assert config.deepspeed_config["zero_stage"] == 2


def test_two_processes_reach_the_loss_curve_of_one(tmp_path):
    """`accelerate launch` with the DDP config on 2 CPU processes (gloo) against 1 process at the same global batch:
    the same samples per step, so in fp32 the losses and final weights agree to rounding."""
    from bench.data_parallel_parity import main as parity

    results = parity(
        ["--cpu", "--strategies", "ddp", "--steps", "3", "--global-batch-size", "8", "--output-dir", str(tmp_path)]
    )
    single, ddp = results["single"]["losses"], results["ddp"]["losses"]
    assert results["passed"] and ddp[-1] < ddp[0]
    assert ddp == pytest.approx(single, rel=1e-5)
    assert results["ddp"]["max_weight_difference"] < 1e-4


# ---------------------------------------------------------------- hostile data and interrupted runs


def test_resume_without_a_checkpoint_says_so_and_keeps_final(workspace):
    args = arguments(workspace, 1, "nothing-to-resume", "--resume")
    final = workspace / "nothing-to-resume" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="--resume: .* holds no complete checkpoint-N to resume from"):
        train(args)
    assert (final / "config.json").read_text() == "{}"


def test_resume_passes_over_a_checkpoint_whose_save_was_interrupted(workspace, caplog):
    args = arguments(workspace, 1, "killed-while-saving", "--save-steps", "3")
    run = build_trainer(args)
    run.add_callback(InterruptAfter(4))
    with pytest.raises(Interrupt):
        run.train()
    output = workspace / "killed-while-saving"
    partial = output / "checkpoint-6"  # a save killed before its last file, trainer_state.json
    shutil.copytree(output / "checkpoint-3", partial)
    (partial / "trainer_state.json").unlink()
    args.resume = True
    with caplog.at_level(logging.WARNING):
        final = train(args)
    assert f"{partial} is incomplete" in caplog.text
    assert (final / "model.safetensors").is_file()


def test_image_paths_stay_inside_the_image_folder_unless_allowed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    make_image().save(tmp_path / "outside.png")
    turns = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    for name in ("../outside.png", str(tmp_path / "outside.png"), "/etc/passwd"):
        data = write_json(tmp_path / "data.json", [{"id": "r", "image": name, "conversations": turns}])
        with pytest.raises(DataError, match=r"Record r: image paths .* lead out of the image folder .*allow-images"):
            read_llava_json(data, images)
    allowed = write_json(tmp_path / "ok.json", [{"id": "r", "image": "../outside.png", "conversations": turns}])
    rows = read_llava_json(allowed, images, allow_images_outside_folder=True)
    assert rows[0]["images"] == [str(images / "../outside.png")]


def test_decompression_bombs_name_the_record_and_are_skipped_on_request(workspace, tmp_path, monkeypatch, caplog):
    processor = AutoProcessor.from_pretrained(workspace / "untrained", trust_remote_code=True)
    make_image().save(tmp_path / "fine.png")
    Image.new("RGB", (20000, 1)).save(tmp_path / "sliver.png")  # pads to 400 million pixels
    Image.new("RGB", (64, 64)).save(tmp_path / "dense.png")
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": name, "image": f"{name}.png", "conversations": turns} for name in ("fine", "sliver", "dense")]
    rows = read_llava_json(write_json(tmp_path / "data.json", records))
    with pytest.raises(DataError, match=r"Record sliver: cannot use image .*sliver.png: .* is 20000x1: padding"):
        VisionCollator(processor, stage=2)([rows[0], rows[1]])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is then over twice the limit: PIL refuses it
    with pytest.raises(DataError, match=r"Record dense: cannot use image .*dense.png: .*too large to decode"):
        VisionCollator(processor, stage=2)([rows[0], rows[2]])
    with caplog.at_level(logging.WARNING):  # --skip-bad-samples checks every image while reading
        assert read_llava_json(tmp_path / "data.json", skip_bad_samples=True)["id"] == ["fine"]
    assert "Record dense: unreadable image" in caplog.text and "Record sliver: unreadable image" in caplog.text
    collator = VisionCollator(processor, stage=2, skip_bad_samples=True)
    assert collator([rows[0], rows[1], rows[2]])["input_ids"].shape[0] == 1 and collator.skipped == 2


def test_evaluate_refuses_a_json_that_is_not_a_list_and_an_empty_batch(workspace, tmp_path):
    from vlmamba.training.evaluate import evaluate, main

    model = AutoModelForImageTextToText.from_pretrained(workspace / "untrained", trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(workspace / "untrained", trust_remote_code=True)
    data = write_json(tmp_path / "questions.json", {"questions": []})
    with pytest.raises(DataError, match="questions.json must hold a list of records, got dict"):
        evaluate(model, processor, data)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        evaluate(model, processor, workspace / "data" / "heldout.json", batch_size=0)
    with pytest.raises(SystemExit):  # argparse's usage error, exit status 2
        main([str(workspace / "untrained"), str(data), "--batch-size", "0"])


def test_demo_force_keeps_the_previous_output_until_the_new_one_is_complete(tmp_path, monkeypatch):
    from vlmamba.training import demo

    output = tmp_path / "demo-output"
    output.mkdir()
    (output / "previous.txt").write_text("the last complete run")

    def killed_run(folder, *args):
        (folder / "data").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", killed_run)
    with pytest.raises(KeyboardInterrupt):
        demo.main(["--output-dir", str(output), "--force"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["demo-output"]
    assert (output / "previous.txt").read_text() == "the last complete run"
