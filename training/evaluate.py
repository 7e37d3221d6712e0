"""Exact-match evaluation of a VL-Mamba on held-out LLaVA-JSON questions, per question type.

    vlmamba evaluate MODEL HELDOUT_JSON [--image-folder DIR] [--batch-size 64]

Each record is one question (`conversations`: a human turn, then the gpt answer) with an optional `question_type`.
Answers are generated greedily from the chat template's generation prompt, in left-padded batches, and count when
they equal the reference after lower-casing and stripping spaces and final punctuation.
"""

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vlmamba.cli import positive_int, run_tool
from vlmamba.conversion.checkpoint import check_source
from vlmamba.training.data import read_llava_json


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".!?").strip()


def evaluate(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    heldout_json: str | Path,
    image_folder: str | Path | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 8,
    allow_images_outside_folder: bool = False,
) -> dict[str, float]:
    """Accuracy per `question_type` and `overall` on the held-out records."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}.")
    heldout_json = Path(heldout_json)
    rows = read_llava_json(
        heldout_json, image_folder, stage=2, allow_images_outside_folder=allow_images_outside_folder
    )  # checks every record first
    question_types = {
        str(record.get("id", f"#{index}")): record.get("question_type", "all")
        for index, record in enumerate(json.loads(heldout_json.read_text()))
    }
    correct, total = defaultdict(int), defaultdict(int)
    model.eval()
    for start in tqdm(range(0, len(rows), batch_size), desc="Evaluating", unit="batch"):
        batch = rows[start : start + batch_size]
        prompts, images, answers = [], [], []
        for messages, paths in zip(batch["messages"], batch["images"], strict=True):
            question, answer = messages[0], messages[1]["content"][0]["text"]
            prompts.append(processor.apply_chat_template([question], add_generation_prompt=True))
            images.extend(paths)
            answers.append(answer)
        inputs = processor(
            images=images or None, text=prompts, padding=True, padding_side="left", return_tensors="pt"
        ).to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        predictions = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for record_id, prediction, answer in zip(batch["id"], predictions, answers, strict=True):
            question_type = question_types[record_id]
            total[question_type] += 1
            correct[question_type] += normalise(prediction) == normalise(answer)
    accuracy = {question_type: correct[question_type] / total[question_type] for question_type in sorted(total)}
    accuracy["overall"] = sum(correct.values()) / sum(total.values())
    return accuracy


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model")
    parser.add_argument("heldout_json")
    parser.add_argument("--image-folder")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--max-new-tokens", type=positive_int, default=8)
    parser.add_argument(
        "--allow-images-outside-folder", action="store_true", help="read image paths that lead out of --image-folder"
    )
    args = parser.parse_args(argv)
    check_source(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True).to(device)
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    accuracy = evaluate(
        model,
        processor,
        args.heldout_json,
        args.image_folder,
        args.batch_size,
        args.max_new_tokens,
        args.allow_images_outside_folder,
    )
    for question_type, value in accuracy.items():
        print(f"{question_type:>10}: {value:.3f}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
