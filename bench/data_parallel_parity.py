"""Data-parallel training reaches the loss curve of one process: the demo's tiny VL-Mamba, stage 2, the same global
batch, run by `training.sft` under `accelerate launch` with 1 process and with N processes (DDP and FSDP2).

    python bench/data_parallel_parity.py [--processes 2] [--strategies ddp fsdp2] [--steps 30] [--global-batch-size 32]
        [--bf16] [--cpu] [--output-dir DIR] [--tolerance 1e-4]

Every run starts from the same saved model and sees the same samples in each optimizer step (the sampler's order is
seeded, and each of the N processes takes every N-th per-device batch of it), so one process and N processes differ
only in how the gradient is summed: in fp32 the curves agree to rounding. The script prints each run's losses, the
largest relative loss difference to the single process per run, and the largest weight difference after the last
step, and exits with status 1 if a loss differs by more than `--tolerance` (relative). `--cpu` runs the processes on
the CPU (gloo, DDP only), as the tests do; otherwise one process per GPU (NCCL). Each run must report (in its model
card data) the number of processes and the parallelism asked for.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vlmamba.conversion.checkpoint import read_checkpoint  # noqa: E402
from vlmamba.training.demo import DEMO_TEXT, compose_untrained  # noqa: E402
from vlmamba.training.synthetic import generate  # noqa: E402

CONFIGS = {"ddp": ROOT / "training/configs/ddp.yaml", "fsdp2": ROOT / "training/configs/fsdp2.yaml"}


def prepare(work: Path, steps: int, global_batch_size: int, seed: int, mambapy: bool) -> tuple[Path, Path]:
    """The demo's synthetic data (enough scenes for `steps` batches) and its tiny untrained model, saved."""
    # Each scene gives at least 3 questions: no epoch ends within the run, where the last batch would split unevenly.
    data = generate(work / "data", train_scenes=steps * global_batch_size // 3 + 1, heldout_scenes=1, seed=seed)
    model, _ = compose_untrained(data, work / "untrained", seed, text={**DEMO_TEXT, "use_mambapy": mambapy})
    return data / "conversations.json", model


def launch(
    name: str, processes: int, args: argparse.Namespace, data: Path, model: Path, work: Path
) -> tuple[list[float], Path]:
    """Stage 2 through `accelerate launch ... -m vlmamba.training.sft`; returns the per-step losses and the final
    folder."""
    output_dir = work / name
    config = CONFIGS["ddp" if name == "single" else name]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--num_processes", str(processes), "--mixed_precision", "bf16" if args.bf16 else "no"]
    command += ["--main_process_port", str(free_port())]
    command += ["-m", "training.sft", "--stage", "2", "--model", str(model), "--data", str(data)]
    command += ["--output-dir", str(output_dir), "--train-vision", "--learning-rate", "1e-3"]
    command += ["--global-batch-size", str(args.global_batch_size)]
    command += ["--per-device-batch-size", str(args.global_batch_size // processes)]
    command += ["--max-steps", str(args.steps), "--save-steps", str(args.steps), "--logging-steps", "1"]
    command += ["--no-gradient-checkpointing", "--num-workers", "0", "--seed", str(args.seed)]
    command += ["--bf16" if args.bf16 else "--no-bf16"]
    print("+", " ".join(command), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.cpu:  # accelerate's `--cpu` would start one process: start N as for GPUs, and have each use the CPU
        env["ACCELERATE_USE_CPU"] = "true"
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{name} run failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    state = json.loads((output_dir / f"checkpoint-{args.steps}" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    stage = json.loads((output_dir / "final" / "card_data.json").read_text())["training"][-1]
    expected = {"single": None, "ddp": "MULTI_CPU" if args.cpu else "MULTI_GPU", "fsdp2": "FSDP"}[name]
    if stage["world_size"] != processes or expected not in (None, stage["parallelism"]):
        raise RuntimeError(
            f"the {name} run trained on {stage['world_size']} process(es) with {stage['parallelism']}, "
            f"not {processes} with {expected}"
        )
    return losses, output_dir / "final"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def compare(reference: tuple[list[float], Path], run: tuple[list[float], Path]) -> dict:
    """Largest relative loss difference over the steps, and largest weight difference after the last step."""
    (reference_losses, reference_folder), (losses, folder) = reference, run
    if len(losses) != len(reference_losses):
        raise RuntimeError(f"{len(losses)} logged losses against {len(reference_losses)} of the single process")
    loss_difference = max(abs(a - b) / abs(b) for a, b in zip(losses, reference_losses, strict=True))
    expected, actual = read_checkpoint(reference_folder), read_checkpoint(folder)
    if expected.keys() != actual.keys():
        raise RuntimeError(f"the final folders hold different tensors: {sorted(expected.keys() ^ actual.keys())}")
    weight_difference = max((actual[name].float() - expected[name].float()).abs().max().item() for name in expected)
    return {"max_relative_loss_difference": loss_difference, "max_weight_difference": weight_difference}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", choices=sorted(CONFIGS), default=["ddp", "fsdp2"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every run (default: fp32)")
    parser.add_argument(
        "--mambapy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the demo's parallel scan for transformers' PyTorch Mamba path (without mamba_ssm); its fp32 states meet "
        "bf16 weights in a matmul, which fails where FSDP2 casts the parameters to bf16 (--bf16 fsdp2)",
    )
    parser.add_argument("--cpu", action="store_true", help="processes on the CPU (gloo) instead of one per GPU")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative loss difference allowed")
    parser.add_argument("--output-dir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.global_batch_size % args.processes:
        parser.error(f"--global-batch-size {args.global_batch_size} does not split over {args.processes} processes")
    if args.cpu and "fsdp2" in args.strategies:
        parser.error("accelerate runs FSDP on GPUs only: with --cpu, pass --strategies ddp")
    if not args.cpu and torch.cuda.device_count() < args.processes:
        parser.error(f"{args.processes} processes need {args.processes} GPUs; {torch.cuda.device_count()} found")

    work = Path(args.output_dir or tempfile.mkdtemp(prefix="vlmamba-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    data, model = prepare(work, args.steps, args.global_batch_size, args.seed, args.mambapy)
    single = launch("single", 1, args, data, model, work)
    results = {"single": {"losses": single[0]}}
    for strategy in args.strategies:
        run = launch(strategy, args.processes, args, data, model, work)
        results[strategy] = {"losses": run[0], **compare(single, run)}
    for name, result in results.items():
        print(f"{name}: losses {' '.join(f'{loss:.4f}' for loss in result['losses'])}")
        if name != "single":
            print(
                f"  {args.processes} processes vs 1: loss within {result['max_relative_loss_difference']:.2e} "
                f"(relative), weights within {result['max_weight_difference']:.2e}"
            )
    results["passed"] = all(
        results[strategy]["max_relative_loss_difference"] <= args.tolerance for strategy in args.strategies
    )
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    sys.exit(0 if main()["passed"] else 1)
