"""Load a saved VL-Mamba folder as remote code, in a process where the `modeling_vlmamba` package cannot be imported.

Usage: python tests/isolated_load.py FOLDER IMAGE OUT.pt
Runs the Auto classes and the pipeline on one chat turn about IMAGE and saves what they produced to OUT.pt, for the
calling test to compare with the in-process model.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline


class BlockProjectImports:
    """A meta-path finder that makes the project's packages unimportable, wherever they are installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_vlmamba", "training", "conversion", "tests"):
            raise ImportError(f"{name} is blocked: this process must run on remote code only")
        return None


QUESTION = "What colour is the square?"
MAX_NEW_TOKENS = 6


def conversation(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]


def chat_inputs(processor, image) -> dict:
    """The model inputs of one chat turn asking QUESTION about `image`, ready for generation."""
    return processor.apply_chat_template(
        conversation(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def run_isolated(folder: Path, image_path: Path, workdir: Path) -> dict:
    """Run this script on `folder` in a fresh process (offline, project unimportable) and return what it saved."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(workdir / "modules"))
    out_path = workdir / "remote.pt"
    result = subprocess.run(
        [sys.executable, __file__, str(folder), str(image_path), str(out_path)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out_path, weights_only=False)


def main(folder: str, image_path: str, out_path: str) -> None:
    sys.meta_path.insert(0, BlockProjectImports())
    try:
        import modeling_vlmamba  # noqa: F401

        importable = True
    except ImportError:
        importable = False
    image = Image.open(image_path)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = chat_inputs(processor, image)
    with torch.no_grad():
        logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    answer = pipe(text=conversation(image), max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    torch.save(
        {
            "importable": importable,
            "model_module": type(model).__module__,
            "processor_module": type(processor).__module__,
            "base_class": type(base).__name__,
            "input_ids": inputs["input_ids"],
            "logits": logits,
            "generated": generated,
            "pipeline_text": answer[0]["generated_text"],
        },
        out_path,
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
