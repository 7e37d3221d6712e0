"""Two-stage VL-Mamba training with TRL's SFTTrainer (paper Sec. 4.1.1, the LLaVA-1.5 recipe).

Stage 1 (alignment) trains the connector on captions, vision encoder and LLM frozen. Stage 2 (instruction tuning)
trains the connector and the LLM on conversations, the vision encoder frozen (`--train-vision` unfreezes it).
Every LLaVA-1.5 hyperparameter of the stage is the default and can be overridden.

    vlmamba train --stage 1 --model vlmamba-untrained --data blip_laion_cc_sbu_558k.json \\
        --image-folder images --output-dir runs/stage1
    vlmamba train --stage 2 --model runs/stage1/final --data llava_v1_5_mix665k.json \\
        --image-folder images --output-dir runs/stage2

Checkpoints go to OUTPUT_DIR/checkpoint-*; the trained model, ready for the Hub (remote code, processor,
generation config, a model card recording the run), to OUTPUT_DIR/final. Multi-GPU: `accelerate launch --config_file
training/configs/<ddp|fsdp2|zero2>.yaml -m vlmamba.training.sft ...`.
"""

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from modeling_vlmamba import LORA_TARGET_MODULES
from vlmamba.cli import positive_int, run_tool
from vlmamba.conversion.checkpoint import CONNECTOR, DTYPES, LANGUAGE_MODEL, VISION_TOWER, check_source
from vlmamba.conversion.hub_folder import save_folder
from vlmamba.model_cards import hub_ids, read_card_data, write_card
from vlmamba.training.data import VisionCollator, load_hf_dataset, read_llava_json

logger = logging.getLogger(__name__)

# LLaVA-1.5 (scripts/v1_5/pretrain.sh, finetune.sh): the global batch is split over devices and accumulation.
PRESETS = {
    1: {"learning_rate": 1e-3, "global_batch_size": 256, "per_device_batch_size": 32},
    2: {"learning_rate": 2e-5, "global_batch_size": 128, "per_device_batch_size": 16},
}
PATH_ARGUMENTS = ("model", "data", "dataset", "image_folder", "output_dir")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stage", type=int, choices=[1, 2], required=True)
    parser.add_argument("--model", required=True, help="VL-Mamba folder or Hub id (conversion.compose, or stage 1)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="LLaVA-JSON file")
    source.add_argument("--dataset", help="Hugging Face dataset (folder or Hub id) with images + messages columns")
    parser.add_argument("--image-folder", help="folder the JSON's image paths are relative to (default: its folder)")
    parser.add_argument("--output-dir", required=True)
    preset = parser.add_argument_group("hyperparameters (defaults: the LLaVA-1.5 values of the stage)")
    preset.add_argument("--learning-rate", type=float)
    preset.add_argument(
        "--global-batch-size", type=positive_int, help="per-device batch x devices x accumulation steps"
    )
    preset.add_argument("--per-device-batch-size", type=positive_int)
    preset.add_argument("--epochs", type=float, default=1.0)
    preset.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    preset.add_argument("--warmup-ratio", type=float, default=0.03)
    preset.add_argument("--weight-decay", type=float, default=0.0)
    preset.add_argument("--lr-scheduler", default="cosine")
    preset.add_argument("--max-length", type=positive_int, help="truncate longer samples (default: no truncation)")
    parser.add_argument("--train-vision", action="store_true", help="also train the vision encoder")
    parser.add_argument("--lora-r", type=int, default=0, help="LoRA rank on the LLM's in_proj (stage 2; 0: off)")
    parser.add_argument("--lora-alpha", type=positive_int, help="LoRA alpha (default: 2 x rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="default: on where CUDA supports it")
    parser.add_argument(
        "--save-dtype", choices=sorted(DTYPES), help="dtype of the final model (default: bf16 if trained in bf16)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--logging-steps", type=positive_int, default=10)
    parser.add_argument("--save-steps", type=positive_int, default=500)
    parser.add_argument("--save-total-limit", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=4, help="dataloader workers decoding images")
    parser.add_argument("--report-to", default="none", help="e.g. tensorboard, wandb")
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    parser.add_argument(
        "--skip-bad-samples", action="store_true", help="warn about and count bad samples instead of stopping"
    )
    parser.add_argument(
        "--allow-images-outside-folder",
        action="store_true",
        help="read image paths of the data that lead out of --image-folder (absolute, or with ..): refused by default",
    )
    return parser


def resolved_hyperparameters(args: argparse.Namespace) -> dict:
    """The stage preset with the command line's overrides, and the accumulation steps the global batch implies."""
    values = {**PRESETS[args.stage]}
    for name in values:
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = values["per_device_batch_size"] * world_size
    if values["global_batch_size"] % per_step:
        raise ValueError(
            f"--global-batch-size {values['global_batch_size']} is not a multiple of the per-device batch "
            f"{values['per_device_batch_size']} x {world_size} devices; change one of them."
        )
    values["gradient_accumulation_steps"] = values["global_batch_size"] // per_step
    return values


def set_trainable(model: torch.nn.Module, stage: int, train_vision: bool = False, lora: bool = False) -> dict:
    """Freeze per stage: stage 1 trains the connector; stage 2 the connector and the LLM (not with LoRA, whose
    adapters PEFT adds); `train_vision` adds the vision encoder. Returns the trainable parameter count per part."""
    trainable = (CONNECTOR,)
    if stage == 2 and not lora:
        trainable += LANGUAGE_MODEL
    if train_vision:
        trainable += (VISION_TOWER,)
    counts = {}
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(trainable)
        if param.requires_grad:
            part = name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
            counts[part] = counts.get(part, 0) + param.numel()
    return counts


def lora_config(args: argparse.Namespace) -> LoraConfig | None:
    if not args.lora_r:
        return None
    if args.stage == 1:
        raise ValueError("--lora-r applies to stage 2: stage 1 trains the connector only.")
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha or 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=LORA_TARGET_MODULES,
        modules_to_save=["multi_modal_projector"] + (["vision_tower"] if args.train_vision else []),
    )


def build_trainer(args: argparse.Namespace) -> SFTTrainer:
    """The SFTTrainer of a stage: model frozen per stage, data, collator, presets and optional LoRA."""
    output_dir = Path(args.output_dir)
    if not args.resume and (get_last_checkpoint_or_none(output_dir) is not None or (output_dir / "final").exists()):
        raise FileExistsError(
            f"{output_dir} holds a run (checkpoints or final/): pass --resume to continue, or another --output-dir."
        )
    if args.resume and resumable_checkpoint(output_dir) is None:
        raise FileNotFoundError(
            f"--resume: {output_dir} holds no complete checkpoint-N to resume from; run without --resume to start "
            "the stage from the beginning."
        )
    if args.stage == 1 and args.dataset:
        raise ValueError("Stage 1 trains on LLaVA-JSON captions (--data): a messages dataset is for stage 2.")
    hyper = resolved_hyperparameters(args)
    bf16_supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if args.bf16 and not bf16_supported:
        raise ValueError("--bf16 needs a CUDA GPU with bfloat16 support, and this machine has none: leave it out.")
    bf16 = bf16_supported if args.bf16 is None else args.bf16
    check_source(args.model, "--model")
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
    lora = lora_config(args)
    set_trainable(model, args.stage, args.train_vision, lora=lora is not None)
    if args.data:
        dataset = read_llava_json(
            args.data, args.image_folder, args.stage, args.skip_bad_samples, args.allow_images_outside_folder
        )
    else:
        dataset = load_hf_dataset(args.dataset)
    config = SFTConfig(
        output_dir=str(output_dir),
        learning_rate=hyper["learning_rate"],
        per_device_train_batch_size=hyper["per_device_batch_size"],
        gradient_accumulation_steps=hyper["gradient_accumulation_steps"],
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type=args.lr_scheduler,
        warmup_steps=args.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=args.weight_decay,
        bf16=bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=args.logging_steps,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=args.num_workers,
        report_to=args.report_to,
        max_length=args.max_length,
        remove_unused_columns=False,  # the collator needs the record id for its errors
    )
    collator = VisionCollator(processor, args.stage, args.max_length, args.skip_bad_samples)
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        peft_config=lora,
    )
    if trainer.is_fsdp_enabled and lora is not None:
        raise ValueError("LoRA under FSDP is not supported (the final merge needs the full adapters): use DDP.")
    return trainer


def get_last_checkpoint_or_none(output_dir: Path) -> str | None:
    return get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None


def resumable_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` of `output_dir`, or None. The Trainer writes `trainer_state.json` last, so
    a checkpoint whose save was interrupted has none (or half of one): it is named in a warning and passed over."""
    if not output_dir.is_dir():
        return None
    steps = {path: re.fullmatch(r"checkpoint-(\d+)", path.name) for path in output_dir.iterdir() if path.is_dir()}
    for checkpoint in sorted((p for p, m in steps.items() if m), key=lambda p: int(steps[p][1]), reverse=True):
        try:
            json.loads((checkpoint / TRAINER_STATE_NAME).read_text())
            return checkpoint
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            logger.warning(
                f"{checkpoint} is incomplete (no readable {TRAINER_STATE_NAME}: its save was interrupted), so an "
                "older checkpoint is used; delete it to silence this warning (it is rewritten at that step anyway)."
            )
    return None


def stage_record(trainer: SFTTrainer, args: argparse.Namespace) -> dict:
    """What the model card says about this stage: what was trained on what, how, and the loss it reached."""
    hyper = resolved_hyperparameters(args)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    parts = ["the connector"] + (["the language model"] if args.stage == 2 else [])
    parts += ["the vision encoder"] if args.train_vision else []
    trained = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    trained += " (the language model as LoRA adapters on in_proj, merged)" if args.lora_r else ""
    return {
        "stage": args.stage,
        "trained": trained,
        "data": Path(args.data).name if args.data else args.dataset,
        "learning_rate": hyper["learning_rate"],
        "global_batch_size": hyper["global_batch_size"],
        "steps": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "parallelism": trainer.accelerator.distributed_type.value,  # NO, MULTI_GPU, MULTI_CPU, FSDP, DEEPSPEED
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        # file names only: the card is published, the paths of this machine are not
        "arguments": {
            key: Path(value).name if key in PATH_ARGUMENTS and value else value for key, value in vars(args).items()
        },
    }


def save_final(trainer: SFTTrainer, args: argparse.Namespace) -> Path:
    """Write OUTPUT_DIR/final: the trained model (LoRA merged), processor, remote code and a model card that
    records this stage after those of the input model. The trainer's model is merged and cast in place: call this
    once the training is over."""
    final_dir = Path(args.output_dir) / "final"
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_fsdp_enabled:  # sharded parameters: gather a full copy of the weights
        state_dict = trainer.accelerator.get_state_dict(trainer.model)
        if not trainer.is_world_process_zero():
            return final_dir
        model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, dtype=torch.float32)
        model.load_state_dict(state_dict)
    if not trainer.is_world_process_zero():
        return final_dir
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    save_dtype = args.save_dtype or ("bfloat16" if trainer.args.bf16 else "float32")
    model = model.to(DTYPES[save_dtype]).eval()
    card_data = read_card_data(args.model)
    card_data["training"] = card_data.get("training", []) + [stage_record(trainer, args)]
    card_data["base_model"] = hub_ids(args.model) or card_data.get("base_model", [])
    card_data["datasets"] = card_data.get("datasets", []) + hub_ids(args.dataset)
    card_data["description"] = (
        f"A VL-Mamba after training stage {args.stage} "
        f"({'connector alignment' if args.stage == 1 else 'instruction tuning'}) with `training.sft`."
    )
    save_folder(
        model,
        final_dir,
        trainer.processing_class,
        force=True,
        finalize=lambda folder: write_card(folder, card_data),
    )
    return final_dir


def train(args: argparse.Namespace) -> Path:
    """Run one stage end to end; returns the final folder."""
    trainer = build_trainer(args)
    checkpoint = resumable_checkpoint(Path(args.output_dir)) if args.resume else None
    if checkpoint is not None and trainer.is_world_process_zero():
        print(f"Resuming from {checkpoint}")
    trainer.train(resume_from_checkpoint=None if checkpoint is None else str(checkpoint))
    skipped = trainer.data_collator.skipped
    if skipped and trainer.is_world_process_zero():
        print(f"Skipped {skipped} samples whose images could not be decoded (this process).")
    final_dir = save_final(trainer, args)
    trainer.accelerator.wait_for_everyone()
    return final_dir


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = build_parser(prog).parse_args(argv)
    print(f"Stage {args.stage} model saved to {train(args)}")


if __name__ == "__main__":
    sys.exit(run_tool(main))
