"""Held-out LLaVA-JSON questions as a local lmms-eval task, asked and scored exactly as `vlmamba evaluate` does.

    vlmamba lmms-eval-task HELDOUT_JSON OUTPUT_DIR [--image-folder DIR] [--task-name vlmamba_synthetic] [--force]
    lmms-eval --model vlmamba --model_args pretrained=MODEL --tasks vlmamba_synthetic --include_path OUTPUT_DIR

OUTPUT_DIR gets the records as a `datasets` dataset on disk (`dataset/`: a `test` split of `id`, `question` with its
`<image>` placeholders, `answer`, `question_type` and the `images` themselves) and the task's YAML, which includes the
task definition of this package (`lmms_eval_tasks/_vlmamba_synthetic_template_yaml`) and adds the dataset's path and
one metric per question type. Like `vlmamba evaluate`, the task asks each record's first human turn (its images where
its placeholders are) with the chat template's generation prompt, decodes 8 tokens greedily, and counts an answer
that equals the first gpt turn after `normalise`: accuracy `overall` and per `question_type` ("all" where a record has
none). The synthetic demo's `heldout.json` (`vlmamba synthetic`) is such a file.
"""

import argparse
import json
import sys
from pathlib import Path

import datasets
import yaml

from vlmamba.cli import run_tool
from vlmamba.conversion.files import staged
from vlmamba.conversion.hub_folder import check_output_dir
from vlmamba.training.data import DataError, read_llava_json
from vlmamba.training.evaluate import normalise

TASK_NAME = "vlmamba_synthetic"
TEMPLATE = Path(__file__).resolve().parent / "lmms_eval_tasks" / "_vlmamba_synthetic_template_yaml"
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "question_type": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
    }
)


def doc_to_visual(doc: dict) -> list:
    return list(doc["images"])


def doc_to_messages(doc: dict) -> list[dict]:
    """The question as one user turn, its images at its placeholders (lmms-eval's chat mode)."""
    from vlmamba.training.lmms_eval_model import user_turn  # needs lmms-eval, which writing the task does not

    return user_turn(doc["question"], list(doc["images"]))


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Exact match after `normalise`, counted in `overall` and in the record's question type."""
    correct = float(normalise(results[0]) == normalise(doc["answer"]))
    return {"overall": correct, doc["question_type"]: correct}


def write_task(
    heldout_json: str | Path,
    output_dir: str | Path,
    image_folder: str | Path | None = None,
    task_name: str = TASK_NAME,
    force: bool = False,
    allow_images_outside_folder: bool = False,
) -> Path:
    """Write the records of `heldout_json` (checked as `vlmamba evaluate` checks them) to `output_dir` as a local
    lmms-eval task named `task_name`, and return `output_dir`: pass it to lmms-eval's `--include_path`."""
    output_dir = check_output_dir(output_dir, force).resolve()
    heldout_json = Path(heldout_json)
    rows = read_llava_json(
        heldout_json, image_folder, stage=2, allow_images_outside_folder=allow_images_outside_folder
    )  # checks every record first
    records = json.loads(heldout_json.read_text(encoding="utf-8"))
    columns = {name: [] for name in FEATURES}
    for record, record_id, messages, paths in zip(records, rows["id"], rows["messages"], rows["images"], strict=True):
        if [message["role"] for message in messages[:2]] != ["user", "assistant"]:
            raise DataError(f"Record {record_id}: a held-out record starts with a human question and its gpt answer.")
        question, answer = (turn["value"] for turn in record["conversations"][:2])
        columns["id"].append(record_id)
        columns["question"].append(question)
        columns["answer"].append(answer)
        columns["question_type"].append(record.get("question_type", "all"))
        columns["images"].append([{"bytes": Path(path).read_bytes(), "path": Path(path).name} for path in paths])
    question_types = sorted(set(columns["question_type"]))
    config = {
        "include": str(TEMPLATE),
        "task": task_name,
        "dataset_path": str(output_dir / "dataset"),
        "metric_list": [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True}
            for metric in ["overall", *question_types]
        ],
    }
    with staged(output_dir) as staging:
        dataset = datasets.Dataset.from_dict(columns, features=FEATURES)
        datasets.DatasetDict({"test": dataset}).save_to_disk(staging / "dataset")
        (staging / f"{task_name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return output_dir


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("heldout_json")
    parser.add_argument("output_dir")
    parser.add_argument("--image-folder", help="the folder the image paths are relative to (default: the JSON's)")
    parser.add_argument("--task-name", default=TASK_NAME, help="the lmms-eval task name (--tasks NAME)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    parser.add_argument(
        "--allow-images-outside-folder", action="store_true", help="read image paths that lead out of --image-folder"
    )
    args = parser.parse_args(argv)
    folder = write_task(
        args.heldout_json,
        args.output_dir,
        args.image_folder,
        args.task_name,
        args.force,
        args.allow_images_outside_folder,
    )
    print(
        f"lmms-eval task {args.task_name!r} written to {folder}: pass --tasks {args.task_name} --include_path {folder}"
    )


if __name__ == "__main__":
    sys.exit(run_tool(main))
