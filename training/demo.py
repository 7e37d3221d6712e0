"""The main job: the whole VL-Mamba workflow on a synthetic task, from nothing to a Hub-ready model, on a CPU.

1. draws a synthetic dataset of coloured shapes in the LLaVA-JSON layout (`training.synthetic`);
2. trains a GPT-NeoX-style tokenizer on its text and composes a tiny VL-Mamba from scratch;
3. runs stage 1 (connector on captions) and stage 2 (connector + LLM on questions) through `training.sft`;
4. evaluates exact-match accuracy on held-out scenes per question type, next to chance;
5. reloads the saved folder with `pipeline("image-text-to-text", trust_remote_code=True)` and asks it a question.

    vlmamba demo [--output-dir demo-output] [--force]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

from modeling_vlmamba import VLMambaForConditionalGeneration
from vlmamba.cli import run_tool
from vlmamba.conversion.files import staged
from vlmamba.conversion.hub_folder import check_output_dir, save_folder
from vlmamba.model_cards import read_card_data, write_card
from vlmamba.training.data import content_blocks
from vlmamba.training.evaluate import evaluate
from vlmamba.training.sft import build_parser, train
from vlmamba.training.synthetic import CHANCE, generate, texts
from vlmamba.training.tiny import tiny_config, tiny_model, tiny_processor
from vlmamba.training.tokenizer import train_gpt_neox_tokenizer

# 32 px scenes in 8 px patches: a 4x4 grid, so each cell of the scene's 2x2 layout is 2x2 patches.
DEMO_VISION = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "vision_use_head": False,
}
DEMO_TEXT = {"hidden_size": 96, "num_hidden_layers": 2, "state_size": 8, "use_mambapy": True}
TEMPLATE_TEXT = ["<|system|>\n", "<|user|>\n", "<|assistant|>\n"]
# Small-scale settings, each an override of the stage's LLaVA-1.5 preset (see training/sft.py). The vision encoder
# is trained in stage 2 because it starts random: nothing pretrained can be downloaded here.
BATCH = ["--global-batch-size", "32", "--per-device-batch-size", "32"]
STAGE_ARGUMENTS = {
    1: ["--learning-rate", "1e-3", "--max-steps", "60", *BATCH],
    2: ["--learning-rate", "1e-3", "--max-steps", "1500", "--train-vision", *BATCH],
}
COMMON_ARGUMENTS = [
    "--no-gradient-checkpointing",
    "--num-workers",
    "0",
    "--logging-steps",
    "20",
    "--save-steps",
    "100000",
]


def compose_untrained(
    data: Path, folder: Path, seed: int, text: dict = DEMO_TEXT
) -> tuple[Path, VLMambaForConditionalGeneration]:
    """The demo's tokenizer, trained on the text of the dataset in `data`, and its tiny untrained VL-Mamba (language
    model sized by `text`), saved to `folder`. Returns the folder and the model."""
    tokenizer = train_gpt_neox_tokenizer(texts(data) + TEMPLATE_TEXT, vocab_size=400)
    config = tiny_config(tokenizer, vision=DEMO_VISION, text=text, projector_type="vss_l2", vss_state_size=8)
    model = tiny_model(config, seed)
    return save_folder(model, folder, tiny_processor(tokenizer, config), force=True), model


def losses(final_dir: Path) -> tuple[float, float]:
    """First and last logged training loss of the folder's last stage (from its model card data)."""
    stage = read_card_data(final_dir)["training"][-1]
    return stage["first_loss"], stage["final_loss"]


def run(output_dir: Path, train_scenes: int, heldout_scenes: int, seed: int) -> dict:
    started = time.time()
    torch.manual_seed(seed)
    data = generate(output_dir / "data", train_scenes, heldout_scenes, seed)
    base, model = compose_untrained(data, output_dir / "untrained", seed)
    print(f"Composed a VL-Mamba from scratch: {sum(p.numel() for p in model.parameters()):,} parameters")

    model_dir, stage_losses = base, {}
    for stage, data_file in ((1, "captions.json"), (2, "conversations.json")):
        argv = ["--stage", str(stage), "--model", str(model_dir), "--data", str(data / data_file)]
        argv += ["--output-dir", str(output_dir / f"stage{stage}"), "--seed", str(seed)]
        model_dir = train(build_parser().parse_args(argv + STAGE_ARGUMENTS[stage] + COMMON_ARGUMENTS))
        stage_losses[stage] = losses(model_dir)

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    accuracy = evaluate(model, processor, data / "heldout.json")
    card_data = read_card_data(model_dir)
    card_data["description"] = (
        "A tiny VL-Mamba trained from scratch by `vlmamba demo` on synthetic scenes of coloured shapes "
        "(`training.synthetic`): it answers questions about their colour, shape, position and count, and knows "
        "nothing else."
    )
    card_data["evaluation"] = [
        {
            "dataset_type": "synthetic-shapes",
            "dataset_name": "synthetic shapes",
            "dataset_split": "held-out",
            "metric_type": "accuracy",
            "metric_name": f"exact match, {question_type}",
            "metric_value": value,
        }
        for question_type, value in accuracy.items()
    ]
    write_card(model_dir, card_data)

    heldout = json.loads((data / "heldout.json").read_text())[0]
    question = heldout["conversations"][0]["value"]
    pipe = pipeline("image-text-to-text", model=str(model_dir), trust_remote_code=True)
    image = Image.open(data / heldout["image"])
    content = [{**block, "image": image} if block["type"] == "image" else block for block in content_blocks(question)]
    messages = [{"role": "user", "content": content}]
    reply = pipe(text=messages, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    return {
        "losses": stage_losses,
        "accuracy": accuracy,
        "example": (heldout["image"], question, reply, heldout["conversations"][1]["value"]),
        "model_dir": model_dir,
        "seconds": time.time() - started,
    }


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="demo-output")
    parser.add_argument("--train-scenes", type=int, default=10000)
    parser.add_argument("--heldout-scenes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)
    output_dir = check_output_dir(args.output_dir, args.force)
    # The run writes a staging folder that replaces the output folder only once complete: a failed or killed run
    # leaves the previous output as it was.
    with staged(output_dir) as staging:
        result = run(staging, args.train_scenes, args.heldout_scenes, args.seed)
    model_dir = output_dir / result["model_dir"].relative_to(staging)

    print("\n=== VL-Mamba demo ===")
    for stage, (first, last) in result["losses"].items():
        print(f"stage {stage} loss: {first:.3f} -> {last:.3f}")
    print("held-out exact match (chance):")
    for question_type, value in result["accuracy"].items():
        chance = f"{CHANCE[question_type]:.2f}" if question_type in CHANCE else "    "
        print(f"  {question_type:>9}: {value:.3f} ({chance})")
    image, question, reply, answer = result["example"]
    question = question.replace("<image>", "")
    print(f"pipeline on {image}: {question!r} -> {reply!r} (reference {answer!r})")
    print(f"model saved to {model_dir} (Hub-ready: remote code, processor, card) in {result['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(run_tool(main))
