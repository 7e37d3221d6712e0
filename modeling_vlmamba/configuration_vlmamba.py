"""VL-Mamba model configuration."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec

PROJECTOR_TYPES = ("mlp", "vss_mlp", "vss_l2", "fused_gelu_mlp")
SCAN_TYPES = ("bidirectional", "cross")
# "full" keeps every token, "default" drops the first one (LLaVA's `patch`, meant for CLIP's CLS token), "patch"
# drops exactly the encoder's prefix tokens (CLS and registers) and keeps every patch.
FEATURE_SELECT_STRATEGIES = ("default", "full", "patch")
# Written into every saved config.json, so that each Auto class finds its class in the copied code files.
AUTO_MAP = {
    "AutoConfig": "configuration_vlmamba.VLMambaConfig",
    "AutoModel": "modeling_vlmamba.VLMambaModel",
    "AutoModelForImageTextToText": "modeling_vlmamba.VLMambaForConditionalGeneration",
}


# The language models a VL-Mamba is built on (`text_config.model_type`).
LANGUAGE_MODEL_TYPES = ("mamba", "falcon_mamba", "mamba2")
# Config fields only some of them have. A FalconMamba's weights have exactly Mamba's names, so a mislabelled config
# loads without an error and computes the wrong thing: only its fields can tell.
_FALCON_MAMBA_FIELDS = {"mixer_rms_eps"}
_MAMBA2_FIELDS = {"num_heads", "head_dim", "n_groups", "chunk_size", "time_step_limit"}
_MAMBA1_FIELDS = {"time_step_init_scheme", "time_step_scale", "use_mambapy", "intermediate_size"}
FOREIGN_FIELDS = {
    "mamba": _FALCON_MAMBA_FIELDS | _MAMBA2_FIELDS,
    "falcon_mamba": _MAMBA2_FIELDS,
    "mamba2": _FALCON_MAMBA_FIELDS | _MAMBA1_FIELDS,
}
FAMILY_OF_FIELD = {
    **dict.fromkeys(_FALCON_MAMBA_FIELDS, "falcon_mamba"),
    **dict.fromkeys(_MAMBA2_FIELDS, "mamba2"),
    **dict.fromkeys(_MAMBA1_FIELDS, "mamba or falcon_mamba"),
}


def check_language_model_config(config: PreTrainedConfig) -> None:
    """Raise `ValueError` unless `config` is a Mamba, FalconMamba or Mamba-2 config whose fields match its type."""
    if config.model_type not in LANGUAGE_MODEL_TYPES:
        raise ValueError(
            f"The language model config is a '{config.model_type}' config; a VL-Mamba's language model is one of "
            f"{', '.join(LANGUAGE_MODEL_TYPES)}."
        )
    foreign = sorted(FOREIGN_FIELDS[config.model_type] & set(config.to_dict()))
    if foreign:
        families = sorted({FAMILY_OF_FIELD[field] for field in foreign})
        raise ValueError(
            f"The language model config says model_type='{config.model_type}' but has {', '.join(foreign)}, fields "
            f"of a {' / '.join(families)} config: its weights would load without an error and compute the wrong "
            f"thing. Set model_type to what the checkpoint is (from the LLM's own config.json)."
        )


def vision_attention(attn_implementation: str | dict | None) -> str | dict | None:
    """Where an `attn_implementation` applies: a single one to this config and the vision tower, never to the Mamba
    language model, which has no attention and rejects every implementation but its own; a dict, per sub-config, is
    kept as given."""
    if isinstance(attn_implementation, dict):
        return attn_implementation
    return {"": attn_implementation, "vision_config": attn_implementation}


def num_prefix_tokens(vision_config: PreTrainedConfig) -> int:
    """The tokens a vision encoder puts before its patch tokens: the CLS token of CLIP and DINOv2, and DINOv2's
    registers."""
    if vision_config.model_type == "dinov2_with_registers":
        return 1 + vision_config.num_register_tokens
    return int(vision_config.model_type in ("clip_vision_model", "dinov2"))


def _side_pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


class VLMambaVisionConfig(PreTrainedConfig):
    r"""
    A vision tower of several encoders that see the same image on the same patch grid, their selected patch features
    concatenated on channels, in order (the paper's "combinations of vision encoders"; Cobra's DINOv2 + SigLIP).

    Pixel values stack each encoder's own normalisation of the image on the channel axis: `(num_images,
    sum of the encoders' num_channels, image_size, image_size)`, the first encoder's channels first.

    Args:
        encoders (`dict[str, dict | PreTrainedConfig]`):
            Encoder name -> vision config (any vision config `AutoModel` builds: SigLIP, CLIP, DINOv2 with or
            without registers), in the order of their features. All must share `image_size` and `patch_size`.
    """

    model_type = "vlmamba_vision"
    encoders: dict | None = None

    @property
    def _attn_implementation(self) -> str | None:
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None) -> None:
        self._attn_implementation_internal = value
        for encoder in (getattr(self, "encoders", None) or {}).values():
            if isinstance(encoder, PreTrainedConfig):
                encoder._attn_implementation = value

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.encoders = self.encoders or {}  # empty only for transformers' own defaults-diffing instance
        if not isinstance(self.encoders, dict):
            raise ValueError(f"`encoders` must be a dict of encoder names to vision configs, got {self.encoders!r}.")
        bad_names = [name for name in self.encoders if not (isinstance(name, str) and name.isidentifier())]
        if bad_names:
            raise ValueError(f"Encoder names {bad_names} must be Python identifiers (they name submodules).")
        self.encoders = {
            name: encoder if isinstance(encoder, PreTrainedConfig) else AutoConfig.for_model(**encoder)
            for name, encoder in self.encoders.items()
        }
        for encoder in self.encoders.values():
            if encoder.model_type == "siglip_vision_model":
                encoder.vision_use_head = False  # VL-Mamba uses patch features, never SigLIP's pooling head
        self._attn_implementation = self._attn_implementation_internal
        for name in ("image_size", "patch_size"):
            values = {encoder_name: getattr(encoder, name) for encoder_name, encoder in self.encoders.items()}
            if len({_side_pair(value) for value in values.values()}) > 1:
                raise ValueError(
                    f"The encoders of a fused vision tower see one image on one patch grid, but their {name}s differ: "
                    f"{values}. Give every encoder the same image_size and patch_size."
                )

    @property
    def image_size(self) -> int | tuple[int, int]:
        return next(iter(self.encoders.values())).image_size

    @property
    def patch_size(self) -> int | tuple[int, int]:
        return next(iter(self.encoders.values())).patch_size

    @property
    def num_channels(self) -> int:
        return sum(encoder.num_channels for encoder in self.encoders.values())

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["encoders"] = {
            name: {k: v for k, v in encoder.to_diff_dict().items() if k != "transformers_version"}
            for name, encoder in self.encoders.items()
        }
        return output


class VLMambaConfig(PreTrainedConfig):
    r"""
    Configuration of a VL-Mamba model (Qiao et al., 2024, arXiv 2403.13600): a vision encoder, a multimodal
    connector with an optional 2D vision selective scan (VSS), and a Mamba language model.

    The defaults describe the paper's final model: SigLIP-SO400M/14 at 384 px, the `vss_l2` connector with the
    bidirectional scan, and a Mamba-2.8B language model.

    Args:
        vision_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the vision encoder (any vision config `AutoModel` can build). Defaults to SigLIP-SO400M/14-384.
            CLIP (`clip_vision_model`) is supported with `vision_feature_select_strategy="default"` (CLS dropped).
            A `VLMambaVisionConfig` (`model_type="vlmamba_vision"`) fuses several encoders.
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the language model: a `MambaConfig` (the default, at the Mamba-2.8B shape), a
            `FalconMambaConfig` or a `Mamba2Config`. Where composing added tokens the LLM's vocabulary had no room
            for (`<image>`, a pad token), `vocab_size` is the grown size and `source_vocab_size` the LLM's own.
        projector_type (`str`, *optional*, defaults to `"vss_l2"`):
            Multimodal connector: `"mlp"` (LLaVA-1.5 two-layer MLP), `"vss_mlp"` (VSS on the vision features, then
            residual, LayerNorm and MLP), `"vss_l2"` (Linear, GELU, VSS, residual, LayerNorm, Linear) or
            `"fused_gelu_mlp"` (Cobra's three-layer MLP: Linear to 4x the vision width, GELU, Linear, GELU, Linear).
        scan_type (`str`, *optional*, defaults to `"bidirectional"`):
            2D scan of the VSS: `"bidirectional"` (row-major forward and backward, 2 directions) or `"cross"`
            (row-major and column-major, each forward and backward, 4 directions).
        vss_state_size (`int`, *optional*, defaults to 16):
            SSM state size of the Mamba mixer inside the VSS.
        vss_conv_kernel (`int`, *optional*, defaults to 4):
            Causal convolution width of the Mamba mixer inside the VSS.
        vss_expand (`int`, *optional*, defaults to 2):
            Expansion factor of the Mamba mixer inside the VSS.
        projector_hidden_act (`str`, *optional*, defaults to `"gelu"`):
            Activation of the connector.
        connector_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the connector's LayerNorm.
        vision_feature_layer (`int`, `list[int]` or `dict`, *optional*, defaults to -2):
            Hidden-state index of the vision encoder to use; a list concatenates several layers on channels. For a
            fused tower, one index (or list) for every encoder, or a dict of encoder name -> index (or list).
        vision_feature_select_strategy (`str`, *optional*):
            `"full"` keeps every token (SigLIP has no CLS token); `"default"` drops the first token (CLIP's CLS);
            `"patch"` drops exactly the encoder's prefix tokens (CLS and registers). Defaults to `"full"`, and to
            `"patch"` (the only choice) for a fused tower.
        image_token_id (`int`, *optional*, defaults to 50277):
            Token id of the `<image>` placeholder (50277 is the first free id of the padded GPT-NeoX vocabulary).
        image_seq_length (`int`, *optional*):
            Image tokens per image after the connector. Derived from the vision config when not given.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialisation of the connector's linear layers.
        tie_word_embeddings (`bool`, *optional*, defaults to `True`):
            Tie the LM head to the input embeddings; mirrored from `text_config` (Mamba ties them).
    """

    model_type = "vlmamba"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="siglip_vision_model",
            init_kwargs={
                "hidden_size": 1152,
                "intermediate_size": 4304,
                "num_hidden_layers": 27,
                "num_attention_heads": 16,
                "image_size": 384,
                "patch_size": 14,
                "vision_use_head": False,  # VL-Mamba uses patch features, never SigLIP's pooling head
            },
        ),
        "text_config": SubConfigSpec(
            config_class=AutoConfig,
            model_type="mamba",
            init_kwargs={"hidden_size": 2560, "num_hidden_layers": 64, "vocab_size": 50280},
        ),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    projector_type: str = "vss_l2"
    scan_type: str = "bidirectional"
    vss_state_size: int = 16
    vss_conv_kernel: int = 4
    vss_expand: int = 2
    projector_hidden_act: str = "gelu"
    connector_norm_eps: float = 1e-5
    vision_feature_layer: int | list[int] | dict = -2
    vision_feature_select_strategy: str | None = None
    image_token_id: int = 50277
    image_seq_length: int | None = None
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True

    @property
    def _attn_implementation(self) -> str | None:
        return self._attn_implementation_internal

    @_attn_implementation.setter
    def _attn_implementation(self, value: str | dict | None) -> None:
        PreTrainedConfig._attn_implementation.fset(self, vision_attention(value))

    def __post_init__(self, **kwargs):
        if isinstance(self.vision_config, dict) and self.vision_config.get("model_type") == "vlmamba_vision":
            # Not an AutoConfig type (remote code registers nothing): built here, then taken as it is.
            self.vision_config = VLMambaVisionConfig(**self.vision_config)
        super().__post_init__(**kwargs)
        check_language_model_config(self.text_config)
        if self.vision_config.model_type == "siglip_vision_model":
            self.vision_config.vision_use_head = False  # VL-Mamba uses patch features, never SigLIP's pooling head
        if self.vision_feature_select_strategy is None:
            self.vision_feature_select_strategy = "patch" if self.is_fused_vision else "full"
        # A Hub repo may point its auto_map at code in another repo ("owner/repo--module.Class"): keep it.
        self.auto_map = {**AUTO_MAP, **(getattr(self, "auto_map", None) or {})}
        # Tying is decided by the top-level flag, but Mamba checkpoints carry it in the text config.
        self.tie_word_embeddings = self.text_config.tie_word_embeddings
        self._check_choice("projector_type", PROJECTOR_TYPES)
        self._check_choice("scan_type", SCAN_TYPES)
        self._check_choice("vision_feature_select_strategy", FEATURE_SELECT_STRATEGIES)
        for name in ("vss_state_size", "vss_conv_kernel", "vss_expand"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        self._check_feature_layers()
        self._check_image_geometry()
        if self.is_fused_vision and not self.vision_config.encoders:
            raise ValueError("A fused vision config needs `encoders`: a dict of encoder names to vision configs.")
        if self.is_fused_vision and self.vision_feature_select_strategy != "patch":
            raise ValueError(
                f"A fused vision tower concatenates the encoders' patch features, but "
                f"vision_feature_select_strategy='{self.vision_feature_select_strategy}': use 'patch'."
            )
        rows, cols = self.patch_grid
        if self.uses_vss and self.num_vision_tokens != rows * cols:
            prefix = num_prefix_tokens(self.vision_config)
            raise ValueError(
                f"The vision selective scan needs the {rows}x{cols} patch grid, but "
                f"vision_feature_select_strategy='{self.vision_feature_select_strategy}' with "
                f"{self.vision_config.model_type} ({prefix} prefix tokens) gives "
                f"{self.num_vision_tokens} tokens per image. Use vision_feature_select_strategy='patch'."
            )
        expected = self.num_vision_tokens
        if self.image_seq_length is None:
            self.image_seq_length = expected
        elif self.image_seq_length != expected:
            raise ValueError(
                f"`image_seq_length={self.image_seq_length}` does not match the {expected} tokens per image that "
                f"{self.vision_config.model_type} (image_size={self.vision_config.image_size}, "
                f"patch_size={self.vision_config.patch_size}, strategy='{self.vision_feature_select_strategy}') "
                "produces. Leave `image_seq_length` unset to derive it."
            )
        if not 0 <= self.image_token_id < self.text_config.vocab_size:
            raise ValueError(
                f"`image_token_id={self.image_token_id}` is outside the text vocabulary "
                f"(vocab_size={self.text_config.vocab_size})."
            )
        clashes = [
            f"{name}_token_id" for name in ("bos", "eos", "pad") if self._text_token_id(name) == self.image_token_id
        ]
        if clashes:
            raise ValueError(
                f"`image_token_id={self.image_token_id}` is also the text config's {' and '.join(clashes)}; "
                "use the tokenizer's id of <image>."
            )
        if self.projector_hidden_act not in ACT2FN:
            raise ValueError(
                f"`projector_hidden_act={self.projector_hidden_act!r}` is not an activation transformers knows "
                "(e.g. gelu, gelu_pytorch_tanh, silu, relu)."
            )

    def _text_token_id(self, name: str) -> int | None:
        return getattr(self.text_config, f"{name}_token_id", None)

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in choices:
            raise ValueError(f"`{name}={value!r}` is not supported; valid choices: {', '.join(choices)}.")

    def _check_feature_layers(self) -> None:
        layers = self.vision_feature_layer
        if isinstance(layers, dict):
            if not self.is_fused_vision:
                raise ValueError("`vision_feature_layer` is a dict of encoder names only for a fused vision tower.")
            unknown = sorted(set(layers) - set(self.vision_encoders))
            if unknown:
                raise ValueError(
                    f"`vision_feature_layer` names encoders {unknown} the vision tower does not have "
                    f"({', '.join(self.vision_encoders)})."
                )
        for name, encoder in self.vision_encoders.items():
            chosen = self.feature_layers(name)
            if not chosen or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in chosen):
                raise ValueError(
                    "`vision_feature_layer` must be an int or a non-empty list of ints, got "
                    f"{self.vision_feature_layer!r}."
                )
            num_states = encoder.num_hidden_layers + 1  # embeddings + every layer
            bad = [layer for layer in chosen if not -num_states <= layer < num_states]
            if bad:
                where = f"the {name} encoder" if name else "the vision encoder"
                raise ValueError(
                    f"`vision_feature_layer` {bad} out of range: {where} has {num_states} hidden states "
                    f"(valid indices {-num_states}..{num_states - 1})."
                )

    @property
    def is_fused_vision(self) -> bool:
        return isinstance(self.vision_config, VLMambaVisionConfig)

    @property
    def vision_encoders(self) -> dict[str | None, PreTrainedConfig]:
        """Encoder name -> vision config: the fused tower's encoders, or `{None: vision_config}` for one encoder."""
        return dict(self.vision_config.encoders) if self.is_fused_vision else {None: self.vision_config}

    def feature_layers(self, encoder: str | None = None) -> list[int]:
        """The hidden-state indices whose features `encoder` (a name of `vision_encoders`) contributes."""
        layers = self.vision_feature_layer
        if isinstance(layers, dict):
            layers = layers.get(encoder, -2)
        return [layers] if isinstance(layers, int) else list(layers)

    def _check_image_geometry(self) -> None:
        vision = self.vision_config
        sides = {}
        for name in ("image_size", "patch_size"):
            value = getattr(vision, name)
            value = _side_pair(value) if isinstance(value, int | list | tuple) else (value,)
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
                raise ValueError(
                    f"The vision config's {name}={getattr(vision, name)!r} must be a positive integer (or a pair)."
                )
            sides[name] = value
        if any(size < patch for size, patch in zip(sides["image_size"], sides["patch_size"], strict=True)):
            raise ValueError(
                f"The vision config's patch_size={vision.patch_size} is larger than its image_size="
                f"{vision.image_size}: no patch fits."
            )

    @property
    def uses_vss(self) -> bool:
        return self.projector_type != "mlp"

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the vision encoder's patch grid: image_size // patch_size on each side."""
        (height, width), (patch_h, patch_w) = (
            _side_pair(self.vision_config.image_size),
            _side_pair(self.vision_config.patch_size),
        )
        return height // patch_h, width // patch_w

    def num_dropped_tokens(self, encoder: str | None = None) -> int:
        """How many of `encoder`'s leading tokens feature selection drops (see `vision_feature_select_strategy`)."""
        strategy = self.vision_feature_select_strategy
        prefix = num_prefix_tokens(self.vision_encoders[encoder])
        return {"full": 0, "default": 1, "patch": prefix}[strategy]

    @property
    def num_vision_tokens(self) -> int:
        """Tokens per image after feature selection, i.e. the connector's sequence length."""
        rows, cols = self.patch_grid
        name, encoder = next(iter(self.vision_encoders.items()))  # a fused tower's encoders all give the grid
        return rows * cols + num_prefix_tokens(encoder) - self.num_dropped_tokens(name)

    @property
    def vision_feature_size(self) -> int:
        """Channels of the selected vision features (several layers and encoders are concatenated)."""
        return sum(
            encoder.hidden_size * len(self.feature_layers(name)) for name, encoder in self.vision_encoders.items()
        )


__all__ = ["LANGUAGE_MODEL_TYPES", "VLMambaConfig", "VLMambaVisionConfig", "check_language_model_config"]
