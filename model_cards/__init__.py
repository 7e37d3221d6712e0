"""Model cards for VL-Mamba folders.

A folder's card is rendered from its `config.json` (architecture, parameter counts) and its `card_data.json`: what
the tools that wrote the folder knew (how it was made, base models, datasets, license, the training stages, evaluation
results). Conversion and training write both files; `conversion.push_to_hub` renders the card again before upload.
"""

import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from vlmamba.conversion.files import target_name

TEMPLATE = Path(__file__).with_name("template.md")
CARD_DATA = "card_data.json"
DEFAULT_LICENSE = "apache-2.0"
TAGS = ["mamba", "vl-mamba", "ssm", "vision-language", "custom_code"]
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def hub_ids(*names: str | Path | None) -> list[str]:
    """The names that are Hub repo ids (`org/name` and not a local path), for `base_model` / `datasets` metadata."""
    return [str(name) for name in names if name and HUB_ID.match(str(name)) and not Path(name).exists()]


def read_card_data(folder: str | Path) -> dict:
    path = Path(folder) / CARD_DATA
    return json.loads(path.read_text()) if path.is_file() else {}


def parameter_counts(config) -> dict[str, int]:
    """Parameters per part of a VL-Mamba built from `config` (on the meta device: no memory), and the total."""
    from modeling_vlmamba import VLMambaForConditionalGeneration

    with torch.device("meta"):
        model = VLMambaForConditionalGeneration(config)
    counts = {"vision_tower": 0, "multi_modal_projector": 0, "language_model": 0}
    for name, param in model.named_parameters():  # tied weights are listed once
        part = name.split(".")[1] if name.startswith("model.") else "language_model"
        counts[part] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


LANGUAGE_MODEL_NAMES = {"mamba": "Mamba", "falcon_mamba": "FalconMamba", "mamba2": "Mamba-2"}


def describe_language_model(text) -> str:
    """One line on the language model: its family, depth, width, state (and heads for Mamba-2), vocabulary (and, where
    `<image>` or a pad token grew it, the LLM's own size)."""
    heads = f", {text.num_heads} heads of {text.head_dim}" if text.model_type == "mamba2" else ""
    grown = getattr(text, "source_vocab_size", None)
    vocabulary = f"vocabulary {text.vocab_size}" + (f" (the LLM's {grown} + added tokens)" if grown else "")
    return (
        f"{LANGUAGE_MODEL_NAMES[text.model_type]}, {text.num_hidden_layers} layers, width {text.hidden_size}"
        f"{heads}, d_state {text.state_size}, {vocabulary}"
    )


def describe(config) -> dict[str, str]:
    text = config.text_config
    connector = f"`{config.projector_type}`"
    if config.uses_vss:
        connector += (
            f", {config.scan_type} scan ({2 if config.scan_type == 'bidirectional' else 4} directions), "
            f"Mamba mixer d_state={config.vss_state_size}, d_conv={config.vss_conv_kernel}, expand={config.vss_expand}"
        )
    encoders = [
        f"{'`' + name + '`: ' if name else ''}{encoder.model_type}, {encoder.num_hidden_layers} layers, width "
        f"{encoder.hidden_size}, {encoder.image_size} px in {encoder.patch_size} px patches; features of layer(s) "
        f"{config.feature_layers(name)}"
        for name, encoder in config.vision_encoders.items()
    ]
    fused = "; concatenated on channels" if config.is_fused_vision else ""
    return {
        "vision": f"{' + '.join(encoders)}{fused}, `{config.vision_feature_select_strategy}` token selection",
        "connector": connector,
        "language_model": describe_language_model(text),
    }


def render_card(
    folder: str | Path, repo_id: str | None = None, card_data: dict | None = None, **overrides
) -> ModelCard:
    """The model card of a VL-Mamba folder from its config and `card_data` (default: its `card_data.json`);
    `overrides` that are not None replace fields of the card data (e.g. `license`)."""
    from modeling_vlmamba import VLMambaConfig

    folder = Path(folder)
    config = VLMambaConfig.from_pretrained(folder)
    data = card_data if card_data is not None else read_card_data(folder)
    data = {**data, **{key: value for key, value in overrides.items() if value is not None}}
    model_name = data.get("model_name") or (repo_id.split("/")[-1] if repo_id else target_name(folder))
    evaluation = [EvalResult(task_type="image-text-to-text", **result) for result in data.get("evaluation", [])]
    card_data = ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=data.get("license", DEFAULT_LICENSE),
        base_model=data.get("base_model") or None,
        datasets=data.get("datasets") or None,
        tags=TAGS,
        eval_results=evaluation or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_name,
        description=data.get("description", "A VL-Mamba model."),
        repo_id=repo_id or "path/to/this/folder",
        parameters=parameter_counts(config),
        image_seq_length=config.image_seq_length,
        training=data.get("training", []),
        evaluation=evaluation,
        citations=data.get("citations", []),
        **describe(config),
    )


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_card(folder: str | Path, card_data: dict, repo_id: str | None = None) -> None:
    """Write `card_data.json` and the rendered `README.md` into `folder` (a complete VL-Mamba folder); each file is
    written whole or not at all."""
    folder = Path(folder)
    card = str(render_card(folder, repo_id=repo_id, card_data=card_data))  # a rendering error writes nothing
    _write_atomically(folder / CARD_DATA, json.dumps(card_data, indent=2, default=str))
    _write_atomically(folder / "README.md", card)
