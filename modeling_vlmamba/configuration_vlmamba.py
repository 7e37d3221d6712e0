"""VL-Mamba model configuration."""

from transformers import AutoConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec

PROJECTOR_TYPES = ("mlp", "vss_mlp", "vss_l2")
SCAN_TYPES = ("bidirectional", "cross")
FEATURE_SELECT_STRATEGIES = ("default", "full")
# Vision configs whose encoder prepends a CLS token to the patch tokens.
VISION_MODEL_TYPES_WITH_CLS = ("clip_vision_model",)
# Written into every saved config.json, so that each Auto class finds its class in the copied code files.
AUTO_MAP = {
    "AutoConfig": "configuration_vlmamba.VLMambaConfig",
    "AutoModel": "modeling_vlmamba.VLMambaModel",
    "AutoModelForImageTextToText": "modeling_vlmamba.VLMambaForConditionalGeneration",
}


def vision_attention(attn_implementation: str | dict | None) -> str | dict | None:
    """Where an `attn_implementation` applies: a single one to this config and the vision tower, never to the Mamba
    language model, which has no attention and rejects every implementation but its own; a dict, per sub-config, is
    kept as given."""
    if isinstance(attn_implementation, dict):
        return attn_implementation
    return {"": attn_implementation, "vision_config": attn_implementation}


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
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            Config of the Mamba language model. Defaults to the Mamba-2.8B shape.
        projector_type (`str`, *optional*, defaults to `"vss_l2"`):
            Multimodal connector: `"mlp"` (LLaVA-1.5 two-layer MLP), `"vss_mlp"` (VSS on the vision features, then
            residual, LayerNorm and MLP) or `"vss_l2"` (Linear, GELU, VSS, residual, LayerNorm, Linear).
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
        vision_feature_layer (`int` or `list[int]`, *optional*, defaults to -2):
            Hidden-state index of the vision encoder to use; a list concatenates several layers on channels.
        vision_feature_select_strategy (`str`, *optional*, defaults to `"full"`):
            `"full"` keeps every token (SigLIP has no CLS token); `"default"` drops the first (CLS) token (CLIP).
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
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "full"
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
        super().__post_init__(**kwargs)
        if self.vision_config.model_type == "siglip_vision_model":
            self.vision_config.vision_use_head = False  # VL-Mamba uses patch features, never SigLIP's pooling head
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
        rows, cols = self.patch_grid
        if self.uses_vss and self.num_vision_tokens != rows * cols:
            fix = "default" if self.vision_has_cls_token else "full"
            raise ValueError(
                f"The vision selective scan needs the {rows}x{cols} patch grid, but "
                f"vision_feature_select_strategy='{self.vision_feature_select_strategy}' with "
                f"{self.vision_config.model_type} ({'a' if self.vision_has_cls_token else 'no'} CLS token) gives "
                f"{self.num_vision_tokens} tokens per image. Use vision_feature_select_strategy='{fix}'."
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
        layers = [layers] if isinstance(layers, int) else layers
        if not layers or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in layers):
            raise ValueError(f"`vision_feature_layer` must be an int or a non-empty list of ints, got {layers!r}.")
        num_states = self.vision_config.num_hidden_layers + 1  # embeddings + every layer
        bad = [layer for layer in layers if not -num_states <= layer < num_states]
        if bad:
            raise ValueError(
                f"`vision_feature_layer` {bad} out of range: the vision encoder has {num_states} hidden states "
                f"(valid indices {-num_states}..{num_states - 1})."
            )

    def _check_image_geometry(self) -> None:
        vision = self.vision_config
        sides = {}
        for name in ("image_size", "patch_size"):
            value = getattr(vision, name)
            value = (value, value) if isinstance(value, int) else tuple(value)
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
    def vision_has_cls_token(self) -> bool:
        return self.vision_config.model_type in VISION_MODEL_TYPES_WITH_CLS

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of the vision encoder's patch grid: image_size // patch_size on each side."""
        size, patch = self.vision_config.image_size, self.vision_config.patch_size
        height, width = (size, size) if isinstance(size, int) else size
        patch_h, patch_w = (patch, patch) if isinstance(patch, int) else patch
        return height // patch_h, width // patch_w

    @property
    def num_vision_tokens(self) -> int:
        """Tokens per image after feature selection, i.e. the connector's sequence length."""
        rows, cols = self.patch_grid
        # "default" drops the first token: the CLS token of CLIP, a real patch of SigLIP (as LLaVA's "patch" does).
        return rows * cols + int(self.vision_has_cls_token) - int(self.vision_feature_select_strategy == "default")

    @property
    def vision_feature_size(self) -> int:
        """Channels of the selected vision features (several layers are concatenated)."""
        layers = self.vision_feature_layer
        return self.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))


__all__ = ["VLMambaConfig"]
