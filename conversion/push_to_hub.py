"""Publish a VL-Mamba folder to the Hugging Face Hub, as one commit.

    vlmamba push runs/stage2/final --repo-id ORG/NAME [--private] [--revision BRANCH]
        [--create-pr] [--license apache-2.0] [--datasets ORG/DATA ...] [--base-model ORG/MODEL ...] [--dry-run]

The folder is checked (config with `auto_map`, safetensors weights, generation config, processor, tokenizer, chat
template, the three code files), copied to a staging folder with its model card rendered for the repo, and uploaded
with a single `HfApi.upload_folder` call. `--dry-run` builds the staging folder and prints its files and card,
without any network call. A bad repo id, a missing token or a missing file is reported before anything is uploaded.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from vlmamba.cli import run_tool
from vlmamba.model_cards import read_card_data, write_card

CODE_FILES = ("configuration_vlmamba.py", "decode_kernels.py", "modeling_vlmamba.py", "processing_vlmamba.py")
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    *CODE_FILES,
)
AUTO_CLASSES = ("AutoConfig", "AutoModel", "AutoModelForImageTextToText")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


class PublishError(ValueError):
    """The folder, repo id or credentials are not ready for an upload; nothing was uploaded."""


def check_folder(folder: Path) -> None:
    """Raise `PublishError` listing everything a loadable VL-Mamba repo would miss in `folder`."""
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder.")
    problems = [f"missing {name}" for name in REQUIRED_FILES if not (folder / name).is_file()]
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
        if config.get("model_type") != "vlmamba":
            problems.append(f"config.json has model_type {config.get('model_type')!r}, not 'vlmamba'")
        missing_auto = [name for name in AUTO_CLASSES if name not in config.get("auto_map", {})]
        if missing_auto:
            problems.append(f"config.json's auto_map lacks {missing_auto}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        problems += [f"missing weight shard {shard}" for shard in shards if not (folder / shard).is_file()]
    elif not (folder / "model.safetensors").is_file():
        problems.append("missing model.safetensors (or model.safetensors.index.json and its shards)")
    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickles:
        problems.append(f"pickle files {pickles}: publish safetensors only (save_pretrained writes them)")
    if problems:
        raise PublishError(f"{folder} is not ready for the Hub:\n  " + "\n  ".join(problems))


def stage_folder(folder: Path, staging: Path, repo_id: str, **card_overrides) -> Path:
    """Copy the repo's files into an empty `staging` (checkpoints and hidden files left out) and write its card
    there, rendered for `repo_id` from the folder's card data with `card_overrides` applied."""
    if staging.exists() and any(staging.iterdir()):
        raise PublishError(f"The staging folder {staging} is not empty; give an empty or new one.")
    staging.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if path.name.startswith((".", "checkpoint-")):
            continue
        if path.is_dir():
            shutil.copytree(path, staging / path.name, dirs_exist_ok=True)
        else:
            shutil.copy2(path, staging / path.name)
    card_data = {**read_card_data(folder), **{k: v for k, v in card_overrides.items() if v is not None}}
    write_card(staging, card_data, repo_id=repo_id)
    return staging


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    dry_run: bool = False,
    staging_dir: str | Path | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    **card_overrides,
) -> Path | str:
    """Check `folder`, stage it with its card, and upload it to `repo_id` in one commit.

    Returns the staging folder with `dry_run`, else the URL of the commit (or pull request). `card_overrides`
    (`license`, `datasets`, `base_model`, `evaluation`, ...) replace fields of the folder's card data.
    """
    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"Invalid repo id {repo_id!r}: {error}") from error
    if "/" not in repo_id:
        raise PublishError(f"Invalid repo id {repo_id!r}: write it as ORG/NAME (or USER/NAME).")
    check_folder(folder)
    token = token or (None if dry_run else get_token())
    if not dry_run and token is None:
        raise PublishError("No Hugging Face token: run `hf auth login` or set HF_TOKEN, then try again.")

    staging = Path(staging_dir) if staging_dir is not None else Path(tempfile.mkdtemp(prefix="vlmamba-push-"))
    stage_folder(folder, staging, repo_id, **card_overrides)
    if dry_run:
        print(f"Dry run: the repo {repo_id} would hold these files (staged in {staging}):")
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                print(f"  {path.relative_to(staging)}  ({path.stat().st_size:,} bytes)")
        print("\n" + (staging / "README.md").read_text())
        return staging

    api = api or HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=staging,
            commit_message=commit_message or f"Upload VL-Mamba from {folder.name}",
            revision=revision,
            create_pr=create_pr,
        )
    finally:
        if staging_dir is None:
            shutil.rmtree(staging, ignore_errors=True)
    url = getattr(commit, "pr_url", None) or getattr(commit, "commit_url", str(commit))
    print(f"Uploaded {folder} to {repo_id}: {url}")
    return url


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", help="a VL-Mamba folder (from conversion or training.sft's OUTPUT_DIR/final)")
    parser.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to commit to (created if needed)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--dry-run", action="store_true", help="stage and print, upload nothing")
    parser.add_argument("--staging-dir", help="where to build the folder that is uploaded (default: a temporary one)")
    parser.add_argument("--commit-message")
    parser.add_argument("--license", help="card license (default: the folder's card data, else apache-2.0)")
    parser.add_argument("--datasets", nargs="+", help="Hub ids of the training datasets, for the card")
    parser.add_argument("--base-model", nargs="+", help="Hub ids of the base models, for the card")
    args = parser.parse_args(argv)
    push_to_hub(
        args.folder,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        create_pr=args.create_pr,
        dry_run=args.dry_run,
        staging_dir=args.staging_dir,
        commit_message=args.commit_message,
        license=args.license,
        datasets=args.datasets,
        base_model=args.base_model,
    )


if __name__ == "__main__":
    sys.exit(run_tool(main))
