"""The `vlmamba` command: one subcommand per tool (`vlmamba train --help`).

Each tool is also a module, `python -m vlmamba.<package>.<module>` (in a checkout, `python -m training.sft` and the
like), and every one of them ends a user error (bad input, a missing file or folder) with one line on stderr and exit
status 1 instead of a traceback (`VLMAMBA_TRACEBACK=1` shows the traceback).
"""

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

from huggingface_hub.errors import StrictDataclassError

# subcommand -> (module with `main(argv, prog)`, what it does)
TOOLS = {
    "tiny": ("vlmamba.training.tiny", "write a tiny random VL-Mamba folder, to try the API offline"),
    "compose": ("vlmamba.conversion.compose", "compose an untrained VL-Mamba from a vision encoder and a Mamba LLM"),
    "convert-mamba-ssm": ("vlmamba.conversion.convert_mamba_ssm", "convert a raw mamba_ssm LLM to transformers"),
    "convert-llava": ("vlmamba.conversion.convert_llava", "convert a LLaVA-style Mamba VLM or stage-1 connector"),
    "convert-cobra": ("vlmamba.conversion.convert_cobra", "convert a Cobra checkpoint (DINOv2 + SigLIP + Mamba)"),
    "train": ("vlmamba.training.sft", "train stage 1 (alignment) or 2 (instruction tuning) with TRL"),
    "evaluate": ("vlmamba.training.evaluate", "exact-match accuracy on held-out LLaVA-JSON questions"),
    "lmms-eval-task": ("vlmamba.training.lmms_eval_task", "held-out LLaVA-JSON questions as a local lmms-eval task"),
    "push": ("vlmamba.conversion.push_to_hub", "publish a VL-Mamba folder to the Hugging Face Hub"),
    "synthetic": ("vlmamba.training.synthetic", "draw the demo's synthetic dataset of coloured shapes"),
    "demo": ("vlmamba.training.demo", "the whole workflow on a synthetic task, on a CPU"),
}
# What bad input raises: our own errors (ConversionError, DataError, PublishError) are ValueErrors, missing or
# clashing files and folders OSErrors, and values of the wrong type in a config the Hub's strict dataclass errors.
# Anything else is a bug, and keeps its traceback.
USER_ERRORS = (ValueError, OSError, StrictDataclassError)
Main = Callable[[list[str] | None, str | None], None]


def positive_int(text: str) -> int:
    """An argparse `type` for counts and sizes: a positive integer, or a usage error that says so."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def run_tool(main: Main, argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run a tool's `main(argv, prog)` and return its exit status: a user error prints one line and gives 1."""
    prog = prog or Path(sys.argv[0]).name
    try:
        main(argv, prog)
    except USER_ERRORS as error:
        if os.environ.get("VLMAMBA_TRACEBACK"):
            raise
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="vlmamba",
        description="VL-Mamba tools. Run `vlmamba TOOL --help` for a tool's options.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tools:\n" + "\n".join(f"  {name:<18} {summary}" for name, (_, summary) in TOOLS.items()),
    )
    parser.add_argument("tool", choices=TOOLS, metavar="TOOL", help="one of: " + ", ".join(TOOLS))
    parser.add_argument("arguments", nargs=argparse.REMAINDER, help="the tool's own arguments")
    args = parser.parse_args(argv)
    module = importlib.import_module(TOOLS[args.tool][0])
    return run_tool(module.main, args.arguments, prog=f"vlmamba {args.tool}")
