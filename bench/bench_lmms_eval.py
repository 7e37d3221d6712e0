"""Throughput of VL-Mamba through lmms-eval at the paper's 2.8B shape (random weights) on the local synthetic task.

    python bench/bench_lmms_eval.py [--items 128] [--batch-sizes 1 16]
    python bench/bench_lmms_eval.py --tiny          # a tiny model on the CPU, to check that the script runs

Needs the eval install (README, "Evaluate") and, for speed, the `cuda` extra. Builds the default `VLMambaConfig`
(SigLIP-SO400M/14 at 384 px, `vss_l2` + bidirectional connector, Mamba-2.8B) with random weights in bf16 on the GPU,
and a tokenizer trained on the synthetic task's text; writes `--items` held-out questions of the synthetic scene
generator (384 px images) as the local lmms-eval task (`vlmamba lmms-eval-task`), and runs that task through
lmms-eval's evaluator in this process (`simple_evaluate` with a `VLMambaChat` on the model object: chat mode,
left-padded batches, greedy, 8 new tokens, CUDA-graph decode) at each batch size, first once to warm up (kernel
compilation, graph capture), then timed. Samples/s = items / wall time of the timed evaluation (loading the task's
dataset, building the requests, generation and scoring; the model and lmms-eval's task index are built once, outside
it), and the same for the time spent in the model's `generate_until` alone. With random weights every answer is
wrong: the accuracy only shows that the task ran.
"""

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def build(tiny: bool, data: Path, device: str, dtype: torch.dtype):
    """(model, processor): the paper's shape (or the tests' tiny one) with random weights, on `device`."""
    from modeling_vlmamba import VLMambaConfig, VLMambaForConditionalGeneration
    from vlmamba.training.synthetic import texts
    from vlmamba.training.tiny import tiny_config, tiny_processor
    from vlmamba.training.tokenizer import IMAGE_TOKEN, train_gpt_neox_tokenizer

    tokenizer = train_gpt_neox_tokenizer(texts(data) + ["<|user|>\n<|assistant|>\n"])
    if tiny:
        config = tiny_config(tokenizer)
    else:  # the defaults: SigLIP-SO400M/14-384 + vss_l2 (bidirectional) + Mamba-2.8B, vocabulary 50280
        config = VLMambaConfig(image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    torch.manual_seed(0)
    with torch.device(device):
        model = VLMambaForConditionalGeneration(config).to(dtype).eval()
    return model, tiny_processor(tokenizer, config)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def evaluate_once(model, processor, task_manager, task_name: str, batch_size: int) -> tuple[float, float, dict]:
    """(wall seconds of one in-process lmms-eval evaluation at `batch_size`, seconds of it spent in the model's
    `generate_until`, lmms-eval's results of the task)."""
    from lmms_eval.evaluator import simple_evaluate

    from vlmamba.training.lmms_eval_model import VLMambaChat

    class TimedVLMambaChat(VLMambaChat):
        generation_seconds = 0.0

        def generate_until(self, requests):
            synchronize(self.device)
            start = time.perf_counter()
            answers = super().generate_until(requests)
            synchronize(self.device)
            self.generation_seconds += time.perf_counter() - start
            return answers

    lm = TimedVLMambaChat(pretrained=model, processor=processor, batch_size=batch_size)
    synchronize(model.device)
    start = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=[task_name], task_manager=task_manager, log_samples=False)
    synchronize(model.device)
    return time.perf_counter() - start, lm.generation_seconds, results["results"][task_name]


def kernels_in_use() -> bool:
    from transformers.utils.import_utils import is_causal_conv1d_available, is_mamba_ssm_available

    return torch.cuda.is_available() and is_mamba_ssm_available() and is_causal_conv1d_available()


def run(args: argparse.Namespace, work: Path) -> None:
    from lmms_eval.tasks import TaskManager

    from vlmamba.training.lmms_eval_task import TASK_NAME, write_task
    from vlmamba.training.synthetic import generate

    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)
    data = generate(work / "data", train_scenes=0, heldout_scenes=args.items // 3 + 1, size=384)
    records = json.loads((data / "heldout.json").read_text())[: args.items]  # 3 or 4 questions a scene
    (data / "bench.json").write_text(json.dumps(records))
    task_dir = write_task(data / "bench.json", work / "task")
    model, processor = build(args.tiny, data, device, dtype)
    task_manager = TaskManager(include_path=str(task_dir))  # indexes every lmms-eval task once, outside the timing

    shape = "tiny (tests' config)" if args.tiny else "2.8B shape (SigLIP-SO400M-384 + vss_l2 + Mamba-2.8B)"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    kernels = "mamba_ssm + causal_conv1d kernels" if kernels_in_use() else "PyTorch Mamba path (no kernels)"
    print(f"\nlmms-eval {TASK_NAME}, {args.items} items, VL-Mamba {shape}, random weights, {str(dtype)[6:]}, {gpu}")
    print(f"{datetime.date.today()}, torch {torch.__version__}, {kernels}, greedy, 8 new tokens, chat mode")
    rows = []
    for batch_size in args.batch_sizes:
        evaluate_once(model, processor, task_manager, TASK_NAME, batch_size)  # warm-up
        seconds, generation, results = evaluate_once(model, processor, task_manager, TASK_NAME, batch_size)
        rows.append((batch_size, seconds, generation, results["overall,none"]))
        print(
            f"  batch {batch_size:>3}: {args.items / seconds:8.2f} samples/s ({seconds:.2f} s, of which "
            f"{generation:.2f} s in generate_until: {args.items / generation:.2f} samples/s)",
            flush=True,
        )
    print("\n| batch | samples/s (evaluation) | wall s | generate_until s | samples/s (generate_until) | accuracy |")
    print("|---|---|---|---|---|---|")
    for batch_size, seconds, generation, accuracy in rows:
        print(
            f"| {batch_size} | {args.items / seconds:.2f} | {seconds:.2f} | {generation:.2f} | "
            f"{args.items / generation:.2f} | {accuracy:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=128, help="held-out questions in the task")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model on the CPU (checks the script)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("the 2.8B shape needs a CUDA GPU; pass --tiny to check the script on a CPU")
    if args.items < 1 or min(args.batch_sizes) < 1:
        parser.error("--items and --batch-sizes must be positive")
    with tempfile.TemporaryDirectory(prefix="vlmamba-lmms-eval-bench-") as work:
        run(args, Path(work))


if __name__ == "__main__":
    main()
