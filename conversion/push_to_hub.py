"""Publish a VL-Mamba folder to the Hugging Face Hub, as one commit.

    vlmamba push runs/stage2/final --repo-id ORG/NAME [--private] [--revision BRANCH]
        [--create-pr] [--license apache-2.0] [--datasets ORG/DATA ...] [--base-model ORG/MODEL ...] [--dry-run]

The folder is checked (config with `auto_map`, safetensors weights, generation config, processor, tokenizer, chat
template, the seven code files; no pickle anywhere in it, by name or by content; no symbolic link leading out of it),
staged with its model card rendered for the repo (hidden files and training checkpoints left out, files that are not
part of a VL-Mamba repo named in a warning), and uploaded with a single `HfApi.upload_folder` call. `--dry-run` stages
and prints the files and the card, without any network call, and removes the staging folder unless `--staging-dir`
names one. A bad repo id, a missing token or a missing file is reported before anything is uploaded.
"""

import argparse
import json
import logging
import os
import shutil
import sys
import zipfile
from pathlib import Path

from huggingface_hub import HfApi, get_token
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from vlmamba.cli import run_tool
from vlmamba.conversion.files import staging_folder
from vlmamba.model_cards import read_card_data, write_card

CODE_FILES = (
    "configuration_vlmamba.py",
    "decode_graph.py",
    "decode_kernels.py",
    "decode_step.py",
    "fused_mamba.py",
    "modeling_vlmamba.py",
    "processing_vlmamba.py",
)
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
# Files a VL-Mamba repo may hold besides the required ones; anything else is staged with a warning.
KNOWN_FILES = (
    "README.md",
    "card_data.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
# Pickle protocols 2 to 5 open with the PROTO opcode and their number; torch.save writes a zip holding `data.pkl`.
PICKLE_PROTOCOL_HEADERS = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


logger = logging.getLogger(__name__)


class PublishError(ValueError):
    """The folder, repo id or credentials are not ready for an upload; nothing was uploaded."""


def is_pickle(path: Path) -> bool:
    """Whether `path` holds a pickle: by its name, or by its first bytes where the name says nothing."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return True
    with path.open("rb") as file:
        head = file.read(4)
    if head[:2] in PICKLE_PROTOCOL_HEADERS:
        return True
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith(".pkl") for name in archive.namelist())
        except zipfile.BadZipFile:
            return False
    return False


def published_files(folder: Path) -> list[Path]:
    """The files of `folder` that a repo gets, relative to it: all but hidden ones and training checkpoints."""
    files = []
    for root, directories, names in os.walk(folder):
        relative_root = Path(root).relative_to(folder)
        directories[:] = sorted(
            name
            for name in directories
            if not name.startswith(".") and not (relative_root == Path(".") and name.startswith("checkpoint-"))
        )
        files += [relative_root / name for name in sorted(names) if not name.startswith(".")]
    return files


def link_problems(folder: Path) -> list[str]:
    """Every symbolic link in `folder` that points outside it (or nowhere): publishing would follow it."""
    problems, root = [], folder.resolve()
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            target = path.resolve()
            if not target.exists():
                problems.append(f"symbolic link {path.relative_to(folder)} points to nothing ({os.readlink(path)})")
            elif not target.is_relative_to(root):
                problems.append(
                    f"symbolic link {path.relative_to(folder)} points outside the folder, to {target}: "
                    "replace it with the file itself, or remove it"
                )
    return problems


def check_folder(folder: Path) -> None:
    """Raise `PublishError` listing everything a loadable VL-Mamba repo would miss in `folder`, every pickle it
    would publish and every symbolic link leading out of it."""
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
    links = link_problems(folder)
    problems += links
    if not links:  # only then are the files below all inside the folder
        pickles = [str(name) for name in published_files(folder) if is_pickle(folder / name)]
        if pickles:
            problems.append(f"pickle files {pickles}: publish safetensors only (save_pretrained writes them)")
    if problems:
        raise PublishError(f"{folder} is not ready for the Hub:\n  " + "\n  ".join(problems))


def extra_files(folder: Path) -> list[Path]:
    """Published files that are not part of a VL-Mamba repo (staged all the same, with a warning)."""
    known = set(REQUIRED_FILES) | set(KNOWN_FILES)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        known |= set(json.loads(index.read_text())["weight_map"].values())
    return [name for name in published_files(folder) if str(name) not in known]


def _link_or_copy(source: Path, destination: Path) -> None:
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source.resolve(), destination)  # no second copy of the weights where the file system allows it
    except OSError:
        shutil.copy2(source, destination)


def stage_folder(folder: Path, staging: Path, repo_id: str, **card_overrides) -> Path:
    """Put the repo's files into an empty `staging` (checkpoints and hidden files left out) and write its card
    there, rendered for `repo_id` from the folder's card data with `card_overrides` applied. Files not part of a
    VL-Mamba repo are staged with a warning that names them and their size."""
    if staging.exists() and any(staging.iterdir()):
        raise PublishError(f"The staging folder {staging} is not empty; give an empty or new one.")
    staging.mkdir(parents=True, exist_ok=True)
    for name in published_files(folder):
        _link_or_copy(folder / name, staging / name)
    extras = extra_files(folder)
    if extras:
        sizes = [(name, (folder / name).stat().st_size) for name in extras]
        listed = "\n".join(f"  {name}  ({size:,} bytes)" for name, size in sizes)
        total = sum(size for _, size in sizes)
        logger.warning(
            f"{len(extras)} files of {folder} are not part of a VL-Mamba repo ({total:,} bytes), and are "
            f"published too; remove them from the folder if they should not be:\n{listed}"
        )
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
) -> Path | str | None:
    """Check `folder`, stage it with its card, and upload it to `repo_id` in one commit.

    Returns the URL of the commit (or pull request); with `dry_run`, the staging folder if `staging_dir` was given
    (it is kept), else None (the temporary one is removed). `card_overrides` (`license`, `datasets`, `base_model`,
    `evaluation`, ...) replace fields of the folder's card data.
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

    # By default, a staging folder next to `folder` (its weights are hard links there, not copies), always removed.
    staging = Path(staging_dir) if staging_dir is not None else staging_folder(folder.with_name(f"{folder.name}-push"))
    try:
        stage_folder(folder, staging, repo_id, **card_overrides)
        if dry_run:
            kept = f" (staged in {staging})" if staging_dir is not None else ""
            print(f"Dry run: the repo {repo_id} would hold these files{kept}:")
            for path in sorted(staging.rglob("*")):
                if path.is_file():
                    print(f"  {path.relative_to(staging)}  ({path.stat().st_size:,} bytes)")
            print("\n" + (staging / "README.md").read_text())
            return staging if staging_dir is not None else None
        api = api or HfApi(token=token)
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
