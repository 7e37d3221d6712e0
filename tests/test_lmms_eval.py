"""VL-Mamba in lmms-eval: the real CLI on the local synthetic task against `vlmamba evaluate`, exact log-likelihoods,
batched and multi-round generation, both request modes, a fused-encoder model, an eval install that leaves the image
processors on PIL, and the GPU benchmark's script on a tiny model."""

import glob
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoProcessor

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from tests.conftest import make_image  # noqa: E402
from vlmamba.training.data import content_blocks  # noqa: E402
from vlmamba.training.demo import compose_untrained  # noqa: E402
from vlmamba.training.evaluate import evaluate  # noqa: E402
from vlmamba.training.lmms_eval_model import VLMambaChat, VLMambaSimple  # noqa: E402
from vlmamba.training.lmms_eval_task import TASK_NAME, doc_to_messages, doc_to_visual, write_task  # noqa: E402
from vlmamba.training.sft import build_parser, train  # noqa: E402
from vlmamba.training.synthetic import generate  # noqa: E402
from vlmamba.training.tiny import TINY_FUSED, build_tiny_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# fp32 on CPU: a left-padded batch and a lone unpadded sequence differ only by summation order.
LOGPROB_ATOL = 1e-5
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's tiny VL-Mamba after 150 stage-2 steps (about 20 s): its answers depend on the question and the
    image, some right and some wrong. Returns (model folder, held-out JSON)."""
    root = tmp_path_factory.mktemp("lmms-eval")
    data = generate(root / "data", train_scenes=100, heldout_scenes=8, seed=1)
    untrained, _ = compose_untrained(data, root / "untrained", seed=0)
    argv = ["--stage", "2", "--model", str(untrained), "--data", str(data / "conversations.json")]
    argv += ["--output-dir", str(root / "run"), "--max-steps", "150", "--learning-rate", "1e-3", "--train-vision"]
    argv += ["--global-batch-size", "16", "--per-device-batch-size", "16", "--no-gradient-checkpointing"]
    argv += ["--num-workers", "0", "--logging-steps", "50", "--save-steps", "1000", "--seed", "3"]
    return train(build_parser().parse_args(argv)), data / "heldout.json"


@pytest.fixture(scope="module")
def task_dir(trained, tmp_path_factory) -> Path:
    return write_task(trained[1], tmp_path_factory.mktemp("task") / "synthetic")


def load(folder: Path):
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def docs(task_dir: Path) -> datasets.DatasetDict:
    return datasets.load_from_disk(str(task_dir / "dataset"))


def instance(request_type: str, arguments: tuple, doc_id: int = 0, task: str = TASK_NAME) -> Instance:
    return Instance(request_type, arguments, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})


def generation_requests(dataset: datasets.Dataset, gen_kwargs: dict) -> list[Instance]:
    """lmms-eval's chat-mode requests: (context, doc_to_messages, gen_kwargs, doc_id, task, split)."""
    return [
        instance("generate_until", (doc["question"], doc_to_messages, dict(gen_kwargs), doc_id, TASK_NAME, "test"))
        for doc_id, doc in enumerate(dataset)
    ]


def plugin(cls, folder: Path, task_dict: dict, batch_size: int):
    lm = cls(pretrained=str(folder), batch_size=batch_size, dtype="float32", device="cpu")
    lm.task_dict = task_dict
    return lm


# ---------------------------------------------------------------- the local task through the real CLI


def test_the_lmms_eval_cli_scores_the_local_task_exactly_as_vlmamba_evaluate(trained, task_dir, tmp_path):
    folder, heldout = trained
    command = [str(Path(sys.executable).with_name("lmms-eval")), "--model", "vlmamba"]
    command += ["--model_args", f"pretrained={folder},dtype=float32,device=cpu", "--tasks", TASK_NAME]
    command += ["--include_path", str(task_dir), "--batch_size", str(BATCH_SIZE), "--output_path", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    (results_file,) = glob.glob(str(tmp_path / "**" / "*_results.json"), recursive=True)
    results = json.loads(Path(results_file).read_text())
    assert results["config"]["model_backend"].endswith("VLMambaChat (chat)")
    scores = {key.removesuffix(",none"): value for key, value in results["results"][TASK_NAME].items()}

    model, processor = load(folder)
    expected = evaluate(model, processor, heldout, batch_size=BATCH_SIZE)
    assert set(expected) == {"colour", "shape", "position", "count", "overall"}
    assert {name: scores[name] for name in expected} == expected  # exactly: the same items, the same answers
    assert 0 < expected["overall"] < 1  # neither all right nor all wrong, so a changed answer changes a score


# ---------------------------------------------------------------- log-likelihoods


def reference_logprob(model, processor, context: str, continuation: str, images: list) -> tuple[float, bool]:
    """The continuation's summed token log-probabilities from one unpadded forward pass, and whether each of its
    tokens is the argmax: the prompt as `vlmamba evaluate` renders it, the continuation's tokens after it."""
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content_blocks(context)}], add_generation_prompt=True
    )
    inputs = processor(images=images or None, text=[prompt], return_tensors="pt")
    continuation_ids = torch.tensor(processor.tokenizer(continuation, add_special_tokens=False)["input_ids"])
    input_ids = torch.cat([inputs["input_ids"][0], continuation_ids])[None]
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=inputs.get("pixel_values")).logits[0]
    predictions = logits[inputs["input_ids"].shape[1] - 1 : -1].log_softmax(-1)
    logprob = predictions.gather(-1, continuation_ids[:, None]).sum().item()
    return logprob, bool((predictions.argmax(-1) == continuation_ids).all())


def loglikelihood_cases(dataset: datasets.Dataset) -> list[tuple[str, str, int | None]]:
    """(context, continuation, doc_id or None for no image): contexts and continuations of different lengths."""
    return [
        (dataset[0]["question"], dataset[0]["answer"], 0),
        (dataset[1]["question"], " " + dataset[1]["answer"], 1),
        (dataset[2]["question"], "top left corner, I think", 2),
        ("Which colours can the shapes have?", " red, green, blue or yellow", None),
        (dataset[3]["question"], dataset[3]["answer"], 3),
    ]


def loglikelihood_requests(cases) -> list[Instance]:
    requests = []
    for context, continuation, doc_id in cases:
        if doc_id is None:  # lmms-eval's unconditional form: (context, continuation) only
            requests.append(instance("loglikelihood", (context, continuation)))
        else:
            arguments = (context, continuation, doc_to_visual, doc_id, TASK_NAME, "test")
            requests.append(instance("loglikelihood", arguments, doc_id))
    return requests


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_is_the_sum_of_the_continuations_token_logprobs(trained, task_dir, batch_size):
    folder, _ = trained
    dataset = docs(task_dir)
    lm = plugin(VLMambaSimple, folder, {TASK_NAME: dataset}, batch_size)
    cases = loglikelihood_cases(dataset["test"])
    requests = loglikelihood_requests(cases)
    model, processor = load(folder)
    expected = [
        reference_logprob(
            model, processor, context, continuation, [] if doc_id is None else dataset["test"][doc_id]["images"]
        )
        for context, continuation, doc_id in cases
    ]
    logprobs = lm.continuation_logprobs(requests)
    for (logprob, greedy), (expected_logprob, expected_greedy) in zip(logprobs, expected, strict=True):
        assert logprob == pytest.approx(expected_logprob, abs=LOGPROB_ATOL) and greedy == expected_greedy
    assert all(logprob < 0 for logprob, _ in logprobs)
    # lmms-eval's multiple-choice scoring takes the lowest value: loglikelihood hands it the negative log-likelihood
    assert lm.loglikelihood(requests) == [(-logprob, greedy) for logprob, greedy in logprobs]


def test_the_greedy_continuation_is_greedy(trained, task_dir):
    folder, _ = trained
    dataset = docs(task_dir)
    task_dict = {TASK_NAME: dataset}
    request = generation_requests(dataset["test"].select([0]), {"max_new_tokens": 3, "until": []})
    (answer,) = plugin(VLMambaChat, folder, task_dict, 1).generate_until(request)
    arguments = (dataset["test"][0]["question"], answer, doc_to_visual, 0, TASK_NAME, "test")
    [(logprob, greedy)] = plugin(VLMambaSimple, folder, task_dict, 1).continuation_logprobs(
        [instance("loglikelihood", arguments)]
    )
    assert greedy and logprob < 0


# ---------------------------------------------------------------- generation


def test_batched_generation_gives_the_answers_of_batch_size_1_and_until_cuts_them(trained, task_dir):
    folder, _ = trained
    dataset = docs(task_dir)
    task_dict = {TASK_NAME: dataset}
    records = dataset["test"].select(range(12))  # questions of every type, of different lengths
    gen_kwargs = {"max_new_tokens": 8, "do_sample": False, "until": []}
    single = plugin(VLMambaChat, folder, task_dict, 1).generate_until(generation_requests(records, gen_kwargs))
    lm = plugin(VLMambaChat, folder, task_dict, 8)
    assert lm.generate_until(generation_requests(records, gen_kwargs)) == single
    assert len(set(single)) > 3  # the answers differ between questions
    # a stop string ends each answer before its first occurrence
    cut = lm.generate_until(generation_requests(records, {**gen_kwargs, "until": ["e"]}))
    assert cut == [answer.split("e")[0] for answer in single] != single


def test_simple_mode_places_the_images_at_their_placeholders_as_chat_mode_does(trained, task_dir):
    folder, _ = trained
    dataset = docs(task_dir)
    task_dict = {TASK_NAME: dataset}
    gen_kwargs = {"max_new_tokens": 8, "until": []}
    chat = plugin(VLMambaChat, folder, task_dict, BATCH_SIZE).generate_until(
        generation_requests(dataset["test"], gen_kwargs)
    )
    requests = [
        instance("generate_until", (doc["question"], dict(gen_kwargs), doc_to_visual, doc_id, TASK_NAME, "test"))
        for doc_id, doc in enumerate(dataset["test"])
    ]
    assert plugin(VLMambaSimple, folder, task_dict, BATCH_SIZE).generate_until(requests) == chat


def test_multi_round_generation_asks_each_round_the_task_builds(trained, task_dir):
    """Two rounds per request, the second asking the next record's question with its image (the protocol of
    lmms-eval's `doc_to_messages` in rounds): each round's answer is the single-round answer to its prompt."""
    folder, _ = trained
    dataset = docs(task_dir)["test"]
    position = {doc["id"]: index for index, doc in enumerate(dataset)}

    def next_record(doc: dict) -> dict:
        return dataset[(position[doc["id"]] + 1) % len(dataset)]

    def doc_to_messages_in_rounds(doc, round_idx=None, previous_output=None, previous_round_info=None):
        if round_idx is None:
            return doc_to_messages(doc)
        if round_idx == 2:
            return None, True, previous_output, previous_round_info
        return doc_to_messages(next_record(doc)), False, previous_output, {"first": previous_output[0]}

    gen_kwargs = {"max_new_tokens": 6, "until": []}
    first = dataset.select(range(3))
    requests = [
        instance(
            "generate_until_multi_round",
            (doc["question"], doc_to_messages_in_rounds, gen_kwargs, i, TASK_NAME, "test"),
        )
        for i, doc in enumerate(first)
    ]
    lm = plugin(VLMambaChat, folder, {TASK_NAME: {"test": dataset}}, 2)
    rounds = lm.generate_until_multi_round(requests)
    answers = lm.generate_until(generation_requests(dataset, gen_kwargs))
    assert rounds == [[answers[position[doc["id"]]], answers[position[next_record(doc)["id"]]]] for doc in first]


# ---------------------------------------------------------------- a fused-encoder model, errors, the install


def test_a_fused_encoder_model_generates_and_scores_through_the_plugin(tmp_path):
    folder = build_tiny_folder(str(tmp_path / "fused"), vision=TINY_FUSED, projector_type="fused_gelu_mlp")
    model, processor = load(folder)
    records = [
        {"question": f"What colour is picture {i}?<image>", "images": [make_image(color=(200, 60 * i, 30))]}
        for i in range(3)
    ]
    lm = VLMambaChat(pretrained=str(folder), batch_size=2)
    lm.task_dict = {"fused": {"test": records}}
    gen_kwargs = {"max_new_tokens": 5, "until": []}
    requests = [
        instance("generate_until", ("", doc_to_messages, dict(gen_kwargs), i, "fused", "test"), i, "fused")
        for i in range(len(records))
    ]
    expected = []
    for record in records:
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": content_blocks(record["question"])}], add_generation_prompt=True
        )
        inputs = processor(images=record["images"], text=[prompt], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        expected.append(processor.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    assert lm.generate_until(requests) == expected
    scored = [
        instance("loglikelihood", (record["question"], " red", doc_to_visual, i, "fused", "test"), i, "fused")
        for i, record in enumerate(records)
    ]
    for (logprob, greedy), record in zip(lm.continuation_logprobs(scored), records, strict=True):
        expected_logprob, expected_greedy = reference_logprob(
            model, processor, record["question"], " red", record["images"]
        )
        assert logprob == pytest.approx(expected_logprob, abs=LOGPROB_ATOL) and greedy == expected_greedy


def test_model_args_and_task_folders_that_cannot_work_say_why(trained, task_dir, tmp_path):
    folder, heldout = trained
    with pytest.raises(ValueError, match="dtype='fp8' is not supported; valid choices: auto, float32, bfloat16"):
        VLMambaChat(pretrained=str(folder), dtype="fp8")
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        VLMambaChat(pretrained=str(folder), batch_size="auto")
    with pytest.raises(FileNotFoundError, match="does not exist: give an existing folder or a Hub repo id"):
        VLMambaChat(pretrained=str(tmp_path / "missing"))
    with pytest.raises(FileExistsError, match="already exists; pass force=True"):
        write_task(heldout, task_dir)


def test_lmms_eval_finds_the_plugin_and_the_image_processors_stay_on_pil(trained):
    """The eval install (the `eval` extra, then lmms-eval without its dependencies) brings no torchvision, whose
    index build replaces a CPU torch and whose mere presence moves transformers to torchvision backends: the image
    processors stay on PIL. Where a torchvision was installed on purpose, it must at least import."""
    from lmms_eval.models import get_model

    assert get_model("vlmamba") is VLMambaChat and get_model("vlmamba", force_simple=True) is VLMambaSimple
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision  # noqa: F401  (one built for another torch fails here: "operator torchvision::nms ...")
    else:
        image_processor = AutoImageProcessor.from_pretrained(trained[0])
        assert type(image_processor).__name__.endswith("Pil"), type(image_processor)
        pixel_values = image_processor(images=[make_image()], return_tensors="pt")["pixel_values"]
        assert pixel_values.shape == (1, 3, 32, 32)


def test_the_gpu_benchmark_runs_on_a_cpu_with_a_tiny_model(tmp_path):
    command = [sys.executable, str(ROOT / "bench" / "bench_lmms_eval.py"), "--tiny", "--items", "8"]
    command += ["--batch-sizes", "1", "4"]
    env = {**os.environ, "TMPDIR": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "lmms-eval vlmamba_synthetic, 8 items" in result.stdout
    assert "| 1 |" in result.stdout and "| 4 |" in result.stdout
    assert list(tmp_path.glob("vlmamba-lmms-eval-bench-*")) == []  # its work folder is removed
