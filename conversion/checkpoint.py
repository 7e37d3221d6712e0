"""Machinery every converter shares: reading checkpoints, renaming tensors with strict key accounting, building the
target model from the converted tensors, and comparing logits with the source."""

import argparse
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import PretrainedConfig, PreTrainedModel
from transformers.initialization import no_init_weights

from vlmamba.conversion.files import inside_folder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Single files and sharded indexes, in the order they are looked for in a folder.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# fp32 logits of two implementations of the same network differ by summation order only.
LOGITS_ATOL = 1e-3
# Relative L2 error of logits allowed when the weights were rounded to fp16 / bf16 (tests/test_conversion.py shows
# that one wrongly mapped tensor of a tiny model already exceeds it).
HALF_PRECISION_RTOL = 0.05
# The parts of a VL-Mamba, as parameter-name prefixes.
CONNECTOR = "model.multi_modal_projector"
VISION_TOWER = "model.vision_tower"
LANGUAGE_MODEL = ("model.language_model", "lm_head")


class ConversionError(ValueError):
    """Source tensors that do not map exactly onto the target model; the message lists every offending key."""


def read_json(path: Path) -> dict:
    """The JSON object in `path`; a missing, unreadable or non-object file raises an error that names it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found.")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path} is not valid UTF-8 JSON ({error}): repair it or download it again.") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} must hold a JSON object, not a {type(value).__name__}.")
    return value


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        # Pickles from the Hub may execute code when loaded without weights_only.
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors, zipfile and unpickling errors share no base class
        raise ConversionError(f"Cannot read the weights in {path} ({type(error).__name__}: {error}).") from None
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path} does not hold a flat state dict of tensors.")
    return state_dict


def shard_files(index: Path) -> list[Path]:
    """The shard files a sharded checkpoint's index names, each checked to lie in the index's own folder."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise ConversionError(f"{index} has no 'weight_map' of tensor names to shard files.")
    outside = sorted({name for name in weight_map.values() if not inside_folder(name)})
    if outside:
        raise ConversionError(f"{index} names shard files outside its folder: {outside}.")
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint: a weights file (.safetensors, .bin, .pt), or a folder with one of WEIGHT_FILES."""
    path = Path(path)
    if path.is_file():
        return _load_file(path)
    for name in WEIGHT_FILES:
        candidate = path / name
        if candidate.is_file():
            if name.endswith(".index.json"):
                return {key: tensor for shard in shard_files(candidate) for key, tensor in _load_file(shard).items()}
            return _load_file(candidate)
    raise FileNotFoundError(f"No weights in {path}: looked for {', '.join(WEIGHT_FILES)}.")


@dataclass
class KeyMap:
    """How source tensor names become target names.

    `rules` are `(regex, replacement)` pairs; the first whose regex matches the whole source key renames it.
    `dropped` are regexes of source keys left out on purpose (e.g. the text tower of a full CLIP checkpoint).
    A source key matching neither is unexpected.
    """

    rules: list[tuple[str, str]]
    dropped: list[str] = field(default_factory=list)

    def rename(self, key: str) -> str | None:
        for pattern, replacement in self.rules:
            if re.fullmatch(pattern, key):
                return re.sub(pattern, replacement, key)
        return None

    def drops(self, key: str) -> bool:
        return any(re.fullmatch(pattern, key) for pattern in self.dropped)

    def then(self, other: "KeyMap") -> "KeyMap":
        """This map's rules, then `other`'s, for sources that mix layouts (e.g. vision + language weights)."""
        return KeyMap(self.rules + other.rules, self.dropped + other.dropped)


def tied_keys(model_class: type[PreTrainedModel], config: PretrainedConfig) -> dict[str, str]:
    """The `{tied name: shared name}` pairs `model_class` ties under `config`."""
    return dict(model_class._tied_weights_keys) if config.tie_word_embeddings else {}


def expected_tensors(model_class: type[PreTrainedModel], config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The target model's state dict as meta tensors (names, shapes and dtypes; no memory)."""
    with torch.device("meta"):
        return model_class(config).state_dict()


def convert_state_dict(
    source: dict[str, torch.Tensor],
    key_map: KeyMap,
    expected: dict[str, torch.Tensor],
    tied: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
    description: str = "Converting",
) -> dict[str, torch.Tensor]:
    """Rename `source` into the target's names with strict accounting.

    Every source tensor is used exactly once (or dropped on purpose), every target tensor is filled, and shapes
    and dtype kinds match. `tied` maps target names the model ties (e.g. `lm_head.weight`) to the name they share
    storage with: a source copy of such a tensor must equal it and is then left to the model's tying.
    Floating tensors are all cast to `dtype`, by default to the source's own (`dominant_dtype`), so that the output
    is uniform; source tensors must be finite, and must stay finite in that dtype. Raises `ConversionError` listing
    every problem at once.
    """
    tied = tied or {}
    used = {key: tensor for key, tensor in source.items() if not key_map.drops(key)}
    dtype = dtype or dominant_dtype(used.values())
    converted: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    unexpected, duplicated, misshaped, not_finite, overflowing = [], [], [], [], []
    for key in tqdm(sorted(used), desc=description, unit="tensor"):
        target = key_map.rename(key)
        if target is None or target not in expected:
            unexpected.append(key if target is None else f"{key} (-> {target}, not in the target model)")
            continue
        if target in converted:
            duplicated.append(f"{origin[target]} and {key} -> {target}")
            continue
        tensor, want = source[key], expected[target]
        if tensor.shape != want.shape or tensor.is_floating_point() != want.is_floating_point():
            misshaped.append(
                f"{key} -> {target}: {tensor.dtype} {tuple(tensor.shape)}, expected {want.dtype} {tuple(want.shape)}"
            )
            continue
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                not_finite.append(f"{key}: {int((~torch.isfinite(tensor)).sum())} NaN or infinite values")
                continue
            cast = tensor.to(dtype)
            if not torch.isfinite(cast).all():
                overflowing.append(
                    f"{key}: |values| up to {tensor.abs().max().item():.3g} ({dtype} holds at most "
                    f"{torch.finfo(dtype).max:.3g})"
                )
                continue
            tensor = cast
        converted[target] = tensor
        origin[target] = key

    differing_ties = []
    for target, shared in tied.items():
        if target in converted:
            if shared in converted and not torch.equal(converted[target].float(), converted[shared].float()):
                differing_ties.append(f"{origin[target]} differs from {origin[shared]}, but the config ties them")
            del converted[target]
    missing = [key for key in expected if key not in converted and key not in tied]

    problems = {
        "missing (no source tensor)": missing,
        "unexpected (no target tensor)": unexpected,
        "mapped twice": duplicated,
        "wrong shape or dtype": misshaped,
        "broken ties": differing_ties,
        "not finite in the source": not_finite,
        f"overflowing {dtype} (convert to a wider --dtype, e.g. bfloat16 or float32)": overflowing,
    }
    if any(problems.values()):
        lines = [f"{len(keys)} {what}:\n  " + _first(keys) for what, keys in problems.items() if keys]
        raise ConversionError("The checkpoint does not match the target model.\n" + "\n".join(lines))
    return converted


def dominant_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype | None:
    """The floating dtype holding most of the values among `tensors` (a checkpoint's own dtype), or None."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else None


def _first(keys: list[str], shown: int = 12) -> str:
    more = f"\n  ... and {len(keys) - shown} more" if len(keys) > shown else ""
    return "\n  ".join(keys[:shown]) + more


def build_model(
    model_class: type[PreTrainedModel],
    config: PretrainedConfig,
    state_dict: dict[str, torch.Tensor],
    initialize: Iterable[str] = (),
    seed: int = 0,
) -> PreTrainedModel:
    """Instantiate `model_class` without random init and take over the converted tensors (no copy).

    Submodules named in `initialize` (e.g. a fresh connector) get the model's own initialisation, seeded.
    """
    with no_init_weights():
        model = model_class(config)
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    fresh = tuple(f"{name}." for name in initialize)
    leftover = [
        key for key in result.missing_keys if not key.startswith(fresh) and key not in model.all_tied_weights_keys
    ]
    if leftover or result.unexpected_keys:
        raise ConversionError(f"Model build left {leftover} unfilled and {result.unexpected_keys} unused.")
    torch.manual_seed(seed)
    for name in initialize:
        model.get_submodule(name).apply(model._init_weights)
    return model.eval()


def check_round_trip(folder: Path, model_class: type[PreTrainedModel], converted: dict[str, torch.Tensor]) -> None:
    """The saved folder reloads to exactly the converted tensors."""
    reloaded = model_class.from_pretrained(folder).state_dict()
    changed = [key for key, tensor in converted.items() if not torch.equal(reloaded[key], tensor)]
    if changed:
        raise ConversionError(f"The saved folder does not reload to the converted tensors: {changed}")


def resample_position_grid(embeddings: torch.Tensor, grid: int, prefix_tokens: int, antialias: bool) -> torch.Tensor:
    """Position embeddings `(..., prefix_tokens + old**2, D)` with their square patch grid resampled to `grid` per
    side (bicubic, in float32, as vision encoders interpolate them for another image size; DINOv2 and timm
    antialias, SigLIP and CLIP do not); the prefix tokens' positions are kept."""
    prefix, patches = embeddings[..., :prefix_tokens, :], embeddings[..., prefix_tokens:, :]
    old = round(patches.shape[-2] ** 0.5)
    if old * old != patches.shape[-2]:
        raise ConversionError(f"Position embeddings of shape {tuple(embeddings.shape)} are not a square patch grid.")
    if old == grid:
        return embeddings
    image = patches.float().reshape(-1, old, old, patches.shape[-1]).permute(0, 3, 1, 2)
    image = F.interpolate(image, size=(grid, grid), mode="bicubic", antialias=antialias, align_corners=False)
    resampled = image.permute(0, 2, 3, 1).reshape(*patches.shape[:-2], grid * grid, patches.shape[-1])
    return torch.cat([prefix, resampled.to(embeddings.dtype)], dim=-2)


def random_token_ids(vocab_size: int, batch: int = 2, length: int = 12, seed: int = 0) -> torch.LongTensor:
    """The fixed random input every conversion is verified on."""
    return torch.randint(0, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


# Logits of the source model for some input ids, for the final check of a conversion.
ReferenceForward = Callable[[torch.LongTensor], torch.Tensor]


def compare_logits(
    converted: torch.Tensor, reference: torch.Tensor, what: str, weights_dtype: torch.dtype = torch.float32
) -> float:
    """Check converted fp32 logits against the source's; returns the max |difference|.

    With fp32 weights the two may differ by summation order only (max |difference| <= LOGITS_ATOL). With half
    precision weights the rounding moves the logits a little: their relative L2 error must stay within
    HALF_PRECISION_RTOL, far below the error of a wrongly mapped tensor. Raises `ConversionError` otherwise.
    """
    converted, reference = converted.float(), reference.float().to(converted.device)
    difference = (converted - reference).abs().max().item()
    relative = ((converted - reference).norm() / reference.norm()).item()
    if weights_dtype == torch.float32 and not difference <= LOGITS_ATOL:
        raise ConversionError(f"Converted logits differ from {what} by {difference:.3g} (> {LOGITS_ATOL:g}).")
    if weights_dtype != torch.float32 and not relative <= HALF_PRECISION_RTOL:
        raise ConversionError(
            f"Converted {weights_dtype} logits differ from {what} by {relative:.3g} relative L2 "
            f"(> {HALF_PRECISION_RTOL:g})."
        )
    return difference


def verification_device() -> torch.device:
    """Where verification runs: with mamba_ssm installed its kernels take every Mamba call, and they need CUDA."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def verify_folder(
    folder: Path,
    model_class: type[PreTrainedModel],
    converted: dict[str, torch.Tensor],
    inputs: dict[str, torch.Tensor],
    reference_logits: torch.Tensor | None,
    weights_dtype: torch.dtype = torch.float32,
    vocab_size: int | None = None,
) -> PreTrainedModel | None:
    """The final check of a conversion, on the saved folder: it reloads to exactly the converted tensors, and
    (given the source's logits for `inputs`) its fp32 logits match them, on the first `vocab_size` tokens' columns
    if given (the source's vocabulary, where the converted one grew). Raises `ConversionError` otherwise.

    Returns the fp32 reloaded model when logits were compared, for further checks.
    """
    check_round_trip(folder, model_class, converted)
    if reference_logits is None:
        print("Verified: the saved folder reloads to the converted tensors (no source forward to compare with).")
        return None
    model = model_class.from_pretrained(folder, dtype=torch.float32).to(verification_device()).eval()
    with torch.no_grad():
        logits = model(**{name: tensor.to(model.device) for name, tensor in inputs.items()}).logits[..., :vocab_size]
    difference = compare_logits(logits, reference_logits, "the source model", weights_dtype)
    print(f"Verified: logits match the source model on a fixed random input (max |difference| {difference:.2e}).")
    return model


def check_source(name_or_path: str | Path, what: str = "Model") -> str:
    """`name_or_path` if it is an existing local path or reads as a Hub repo id (`ORG/NAME`); otherwise a
    `FileNotFoundError` saying that the path does not exist (the Hub would only say "Repo id must be in the form")."""
    name = str(name_or_path)
    if Path(name).exists():
        return name
    looks_local = name.startswith((".", "/", "~")) or "\\" in name or name.count("/") != 1
    try:
        validate_repo_id(name)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise FileNotFoundError(
            f"{what} {name!r} does not exist: give an existing folder or a Hub repo id (ORG/NAME)."
        )
    return name


def resolve_folder(name_or_path: str | Path, what: str = "Model") -> Path:
    """A local folder as is; otherwise a Hub repo id, downloaded (configs, weights, tokenizer and processor files)."""
    repo_id = check_source(name_or_path, what)
    path = Path(repo_id)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"{path} is a file; pass the folder that holds it.")
    from huggingface_hub import list_repo_files, snapshot_download

    has_safetensors = any(name.endswith(".safetensors") for name in list_repo_files(repo_id))
    weights = ["*.safetensors", "*.safetensors.index.json"] if has_safetensors else ["*.bin", "*.bin.index.json"]
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.model", "*.jinja", *weights]))


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every converter shares."""
    parser.add_argument("output_dir", help="folder to write (must not exist unless --force)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating weights (default: keep the source's)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output folder")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default: 5GB)")


def parse_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else DTYPES[name]
