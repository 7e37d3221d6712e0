"""PyTorch VL-Mamba: vision encoder -> multimodal connector (MLP or vision selective scan) -> Mamba language model."""

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, MambaConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationConfig, GenerationMode
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import slice_logits_to_keep
from transformers.models.mamba.modeling_mamba import MambaMixer
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple
from transformers.utils.import_utils import torch_compilable_check
from transformers.utils.output_capturing import selected_hidden_states

from .configuration_vlmamba import VLMambaConfig, VLMambaVisionConfig, vision_attention
from .decode_graph import MAX_DECODE_GRAPHS, DecodeAhead, DecodeGraph
from .decode_step import decode_step
from .fused_mamba import FusedMambaMixer, use_fused_kernels

IGNORE_INDEX = -100
# PEFT LoRA `target_modules` for the language model: on Mamba-1, `in_proj` is the one projection every path (the fused
# training kernel, prefill, the decode step) calls as a module; the others are read as raw weights by the kernels, so
# adapters on them would train in one path and be ignored in another. The pattern leaves out the connector's own
# Mamba mixer and the vision tower.
LORA_TARGET_MODULES = r".*language_model.*\.in_proj"


def cross_scan(grid: torch.Tensor, scan_type: str) -> torch.Tensor:
    """Unfold a patch grid into the scan directions, stacked on the batch axis (direction-major).

    Args:
        grid: `(batch, height, width, channels)` patch features.
        scan_type: `"bidirectional"`: row-major, row-major reversed (K=2); `"cross"`: row-major, column-major,
            row-major reversed, column-major reversed (K=4, VMamba's CrossScan order).

    Returns:
        `(K * batch, height * width, channels)`.
    """
    batch, height, width, channels = grid.shape
    rows = grid.reshape(batch, height * width, channels)
    if scan_type == "bidirectional":
        return torch.cat([rows, rows.flip(1)])
    columns = grid.transpose(1, 2).reshape(batch, height * width, channels)
    return torch.cat([rows, columns, rows.flip(1), columns.flip(1)])


def merge_scans(sequences: torch.Tensor, height: int, width: int, scan_type: str) -> torch.Tensor:
    """Map every direction of `cross_scan` back to row-major patch order and sum them (VMamba's CrossMerge).

    Args:
        sequences: `(K * batch, height * width, channels)`, in the order `cross_scan` produced.

    Returns:
        `(batch, height * width, channels)`.
    """
    num_directions = 2 if scan_type == "bidirectional" else 4
    directions = sequences.unflatten(0, (num_directions, -1))
    if scan_type == "bidirectional":
        return directions[0] + directions[1].flip(1)
    batch, _, channels = directions[0].shape

    def columns_to_rows(columns: torch.Tensor) -> torch.Tensor:
        return columns.reshape(batch, width, height, channels).transpose(1, 2).reshape(batch, -1, channels)

    return (
        directions[0] + columns_to_rows(directions[1]) + directions[2].flip(1) + columns_to_rows(directions[3].flip(1))
    )


class VisionSelectiveScan(nn.Module):
    """VSS (paper Sec. 3.2.3): a 2D scan of the patch grid through ONE Mamba mixer shared by all directions.

    The direction sequences run as one batch through transformers' `MambaMixer` (mamba_ssm kernels when installed),
    and their outputs are merged back into patch order by summation.
    """

    def __init__(self, hidden_size: int, config: VLMambaConfig):
        super().__init__()
        self.height, self.width = config.patch_grid
        self.scan_type = config.scan_type
        mixer_config = MambaConfig(
            hidden_size=hidden_size,
            state_size=config.vss_state_size,
            conv_kernel=config.vss_conv_kernel,
            expand=config.vss_expand,
            num_hidden_layers=1,
            # One switch for the torch fallback of every Mamba-1 mixer; a Mamba-2 text config has none.
            use_mambapy=getattr(config.text_config, "use_mambapy", False),
        )
        self.mixer = FusedMambaMixer(mixer_config, layer_idx=0)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(batch, height * width, channels)` -> `(batch, height * width, channels)`."""
        batch, num_tokens, channels = hidden_states.shape
        if num_tokens != self.height * self.width:
            raise ValueError(
                f"The vision selective scan got {num_tokens} tokens per image, which is not the "
                f"{self.height}x{self.width} patch grid of the vision config. A CLS token must be dropped "
                "(vision_feature_select_strategy='default'), and images must have the configured image_size."
            )
        grid = hidden_states.reshape(batch, self.height, self.width, channels)
        scanned = self.mixer(cross_scan(grid, self.scan_type))
        return merge_scans(scanned, self.height, self.width, self.scan_type)


class VLMambaMultiModalProjector(nn.Module):
    """The multimodal connector (paper Sec. 3.2.3); V is `(num_images, N, Dv)` and the output `(num_images, N, Dt)`.

    - `mlp`:            Linear(Dt, Dt)(GELU(Linear(Dv, Dt)(V)))
    - `vss_mlp`:        V = LayerNorm(VSS_Dv(V) + V), then the MLP above
    - `vss_l2`:         V' = Linear(Dv, Dt)(V);  Linear(Dt, Dt)(LayerNorm(VSS_Dt(GELU(V')) + V'))
    - `fused_gelu_mlp`: Linear(Dt, Dt)(GELU(Linear(4 Dv, Dt)(GELU(Linear(Dv, 4 Dv)(V))))), Cobra's connector
    """

    def __init__(self, config: VLMambaConfig):
        super().__init__()
        vision_size, text_size = config.vision_feature_size, config.text_config.hidden_size
        self.projector_type = config.projector_type
        self.act = ACT2FN[config.projector_hidden_act]
        if self.projector_type == "fused_gelu_mlp":
            self.linear_1 = nn.Linear(vision_size, 4 * vision_size)
            self.linear_2 = nn.Linear(4 * vision_size, text_size)
            self.linear_3 = nn.Linear(text_size, text_size)
            return
        self.linear_1 = nn.Linear(vision_size, text_size)
        self.linear_2 = nn.Linear(text_size, text_size)
        if config.uses_vss:
            scan_size = vision_size if self.projector_type == "vss_mlp" else text_size
            self.vss = VisionSelectiveScan(scan_size, config)
            self.norm = nn.LayerNorm(scan_size, eps=config.connector_norm_eps)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        if self.projector_type == "fused_gelu_mlp":
            return self.linear_3(self.act(self.linear_2(self.act(self.linear_1(image_features)))))
        if self.projector_type == "vss_mlp":
            image_features = self.norm(self.vss(image_features) + image_features)
        hidden_states = self.linear_1(image_features)
        if self.projector_type == "vss_l2":
            # The residual adds the pre-GELU projection, as in the paper's formula.
            return self.linear_2(self.norm(self.vss(self.act(hidden_states)) + hidden_states))
        return self.linear_2(self.act(hidden_states))


@dataclass
class VLMambaModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Final hidden states of the language model.
    cache_params (`Cache`, *optional*):
        Recurrent and convolution states of every Mamba layer after the last token, for cached decoding.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden states of the language model after every layer (with `output_hidden_states=True`).
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, image_seq_length, hidden_size)`, *optional*):
        Connector outputs that were scattered into the image-token positions.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache_params: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class VLMambaCausalLMOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` (a scalar), *optional*):
        Next-token cross-entropy over the labelled positions (image positions never count).
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Prediction scores, in float32.
    cache_params (`Cache`, *optional*):
        Recurrent and convolution states of every Mamba layer after the last token, for cached decoding.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*):
        Hidden states of the language model after every layer (with `output_hidden_states=True`).
    image_hidden_states (`torch.FloatTensor` of shape `(num_images, image_seq_length, hidden_size)`, *optional*):
        Connector outputs that were scattered into the image-token positions.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache_params: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    image_hidden_states: torch.FloatTensor | None = None


def keep_requested_states(
    hidden_states: tuple[torch.Tensor | None, ...] | None, requested: bool | int | list[int] | None
) -> tuple[torch.Tensor | None, ...] | None:
    """The hidden states a caller asked for with `output_hidden_states`: all of them for `True`, only the indexed
    ones for an index or a list of indices (the others `None`, as transformers' output capturing returns them), and
    none for `False` or `None`."""
    selected = selected_hidden_states(requested)
    if hidden_states is None or selected is None:
        return hidden_states if requested else None
    count = len(hidden_states)
    keep = {index % count for index in selected if -count <= index < count}
    return tuple(state if index in keep else None for index, state in enumerate(hidden_states))


class VLMambaPreTrainedModel(PreTrainedModel):
    config: VLMambaConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _is_stateful = True
    # What the vision tower supports (the Mamba language model has no attention; see `vision_attention`).
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    @classmethod
    def is_custom_code(cls) -> bool:
        # For custom code, transformers' `_initialize_weights` skips every module without parameters of its own (for
        # remote code that writes weights in place), so SigLIP's attention and MLP blocks, which SigLIP initialises at
        # that level, would get nn.Linear's defaults when missing from a checkpoint. Every `_init_weights` here goes
        # through `transformers.initialization`, which tracks what a checkpoint filled, as in-library models do.
        return False

    def set_attn_implementation(self, attn_implementation: str | dict, allow_all_kernels: bool = False) -> None:
        """`attn_implementation` for the vision tower (a plain string), or per sub-config (a dict)."""
        super().set_attn_implementation(vision_attention(attn_implementation), allow_all_kernels=allow_all_kernels)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # The connector's Mamba mixer; the language model initialises its own mixers (same scheme as MambaModel).
        if isinstance(module, MambaMixer):
            module.init_mamba_weights()
            init.kaiming_uniform_(module.conv1d.weight, a=math.sqrt(5))
            if module.conv1d.bias is not None:
                init.zeros_(module.conv1d.bias)
            init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))

    def post_init(self) -> None:
        super().post_init()
        # The children's lists name modules this model does not build (SigLIP's pooling head and text embeddings),
        # and not the fused subclasses it builds instead of transformers' Mamba blocks; FSDP's auto-wrap refuses any
        # class name it cannot find in the model. So: the classes built that are, or derive from, a named one.
        named = set(self._no_split_modules)
        self._no_split_modules = {
            type(module).__name__
            for module in self.modules()
            if any(cls.__name__ in named for cls in type(module).__mro__)
        }


class VLMambaVisionTower(PreTrainedModel):
    """A fused vision tower (`VLMambaVisionConfig`): its encoders see the same image, each on its own channels of
    `pixel_values` `(num_images, sum of the encoders' num_channels, height, width)`, in their config's order."""

    config: VLMambaVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def __init__(self, config: VLMambaVisionConfig):
        super().__init__(config)
        for name, encoder in config.encoders.items():
            if hasattr(self, name):
                raise ValueError(f"Encoder name {name!r} is taken by the vision tower's own attributes: rename it.")
            # Direct children, so that post_init gathers their `_no_split_modules` and the like.
            self.add_module(name, AutoModel.from_config(encoder))
        self.post_init()

    @property
    def encoders(self) -> dict[str, PreTrainedModel]:
        """Encoder name -> model, in the order of their channels and features."""
        return {name: getattr(self, name) for name in self.config.encoders}

    def forward(
        self, pixel_values: torch.FloatTensor, output_hidden_states: dict[str, bool | list[int]], **kwargs
    ) -> dict[str, BaseModelOutputWithPooling]:
        """Every encoder's outputs on its channels; `output_hidden_states` says, per encoder, what to capture."""
        outputs, start = {}, 0
        for name, encoder in self.encoders.items():
            end = start + encoder.config.num_channels
            outputs[name] = encoder(
                pixel_values[:, start:end].to(encoder.dtype),
                output_hidden_states=output_hidden_states[name],
                return_dict=True,
                **kwargs,
            )
            start = end
        return outputs


def image_token_mismatch(num_tokens: int, num_images: int, per_image: int, image_token_id: int) -> str:
    """The error for inputs whose image tokens cannot hold `num_images` images of `per_image` tokens each: the
    images do not match the placeholders, the processor expands each placeholder to another count, or its <image>
    token is not the config's `image_token_id`."""
    if num_tokens == 0:
        return (
            f"The inputs hold no image token (id {image_token_id}, the config's image_token_id) but {num_images} "
            "images were given: put one <image> placeholder in the text for each image. If the text has them, "
            "the processor's <image> token is not the config's image_token_id: compare config.json with "
            "processor.image_token_id."
        )
    other_count = num_tokens // num_images if num_images and num_tokens % num_images == 0 else None
    expanded = f" (here {other_count} per image)" if other_count not in (None, per_image) else ""
    return (
        f"The inputs hold {num_tokens} image tokens, but {num_images} images need {num_images * per_image} "
        f"(the config's image_seq_length={per_image} each). Pass one image per <image> placeholder, and build the "
        f"inputs with this model's processor (AutoProcessor.from_pretrained of its folder, or VLMambaProcessor(..., "
        f"image_seq_length={per_image})): a processor built for another vision encoder or image size expands each "
        f"<image> to another number of tokens{expanded}."
    )


class VLMambaModel(VLMambaPreTrainedModel):
    """Vision encoder, multimodal connector and Mamba language model, without the LM head."""

    def __init__(self, config: VLMambaConfig):
        super().__init__(config)
        self.vision_tower = (
            VLMambaVisionTower(config.vision_config)
            if config.is_fused_vision
            else AutoModel.from_config(config.vision_config)
        )
        self.multi_modal_projector = VLMambaMultiModalProjector(config)
        self.language_model = use_fused_kernels(AutoModel.from_config(config.text_config))
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(
                f"pixel_values must be a torch.Tensor of shape (num_images, channels, height, width), got a "
                f"{type(pixel_values).__name__}: build the inputs with VLMambaProcessor(..., return_tensors='pt')."
            )
        vision = self.config.vision_config
        size = (vision.image_size,) * 2 if isinstance(vision.image_size, int) else tuple(vision.image_size)
        expected = (vision.num_channels, *size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values have shape {tuple(pixel_values.shape)} but the vision tower expects "
                f"(num_images, {', '.join(map(str, expected))}). Prepare images with VLMambaProcessor."
            )
        torch_compilable_check(
            torch.isfinite(pixel_values).all(),
            lambda: (
                f"pixel_values hold {int((~torch.isfinite(pixel_values)).sum())} NaN or infinite values: check how "
                "the images were decoded and normalised (VLMambaProcessor gives finite values for any image)."
            ),
        )

    @can_return_tuple
    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """Encode images and project them into the language model's embedding space.

        Args:
            pixel_values: `(num_images, channels, height, width)` at the vision config's `image_size` (a fused
                tower: every encoder's channels, stacked in its order).
            kwargs: passed to the vision encoder(s) (`output_hidden_states` as a flag or as layer indices,
                `output_attentions`, ...); `return_dict=False` (or `config.return_dict=False`) returns a tuple.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` holds the connector output, `(num_images,
            image_seq_length, text_hidden_size)`. One encoder: its own last hidden state, and the hidden states and
            attentions asked for. A fused tower: the concatenated patch features `(num_images, image_seq_length,
            vision_feature_size)` as `last_hidden_state`, and per encoder, in order, those asked for.
        """
        self._check_pixel_values(pixel_values)
        requested = kwargs.pop("output_hidden_states", None)
        # Capture the selected layers (and those the caller asked for) only: the others are never stored.
        capture = {
            name: True
            if requested is True
            else self.config.feature_layers(name) + (selected_hidden_states(requested) or [])
            for name in self.config.vision_encoders
        }
        if self.config.is_fused_vision:
            outputs = self.vision_tower(pixel_values, output_hidden_states=capture, **kwargs)
        else:
            tower = self.vision_tower
            outputs = {
                None: tower(
                    pixel_values.to(tower.dtype), output_hidden_states=capture[None], return_dict=True, **kwargs
                )
            }
        features = torch.cat(
            [
                torch.cat([output.hidden_states[layer] for layer in self.config.feature_layers(name)], dim=-1)[
                    :, self.config.num_dropped_tokens(name) :
                ]
                for name, output in outputs.items()
            ],
            dim=-1,
        )
        if not self.config.is_fused_vision:
            (output,) = outputs.values()
            return BaseModelOutputWithPooling(
                last_hidden_state=output.last_hidden_state,
                pooler_output=self.multi_modal_projector(features),
                hidden_states=keep_requested_states(output.hidden_states, requested),
                attentions=output.attentions,
            )
        # A fused tower: the concatenated patch features, and each encoder's hidden states and attentions in turn.
        return BaseModelOutputWithPooling(
            last_hidden_state=features,
            pooler_output=self.multi_modal_projector(features),
            hidden_states=tuple(keep_requested_states(o.hidden_states, requested) for o in outputs.values())
            if requested
            else None,
            attentions=tuple(o.attentions for o in outputs.values()) if kwargs.get("output_attentions") else None,
        )

    def image_token_mask(
        self, input_ids: torch.LongTensor | None, inputs_embeds: torch.FloatTensor | None = None
    ) -> torch.BoolTensor:
        """`(batch, seq)` positions of the image token: by id, or without `input_ids` by the image token's embedding
        in `inputs_embeds` (as Llava does)."""
        if input_ids is not None:
            return input_ids == self.config.image_token_id
        image_embedding = self.get_input_embeddings()(
            torch.tensor(self.config.image_token_id, device=inputs_embeds.device)
        )
        return (inputs_embeds == image_embedding.to(inputs_embeds.dtype)).all(-1)

    def get_placeholder_mask(
        self,
        input_ids: torch.LongTensor | None,
        inputs_embeds: torch.FloatTensor,
        image_features: torch.Tensor,
    ) -> torch.BoolTensor:
        """`image_token_mask`, checked to hold `image_features` `(num_images, image_seq_length, hidden)` exactly."""
        mask = self.image_token_mask(input_ids, inputs_embeds)
        num_images, per_image = image_features.shape[:2]
        torch_compilable_check(
            mask.sum() == num_images * per_image,
            lambda: image_token_mismatch(int(mask.sum()), num_images, per_image, self.config.image_token_id),
        )
        return mask

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        cache_params: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> VLMambaModelOutput:
        r"""
        Args:
            input_ids: `(batch, seq)` token ids, each image expanded to `image_seq_length` image tokens.
            pixel_values: `(num_images, channels, height, width)`, images in the order of their placeholders.
            attention_mask: `(batch, seq)`, 0 on (left) padding; pad positions are zeroed inside the Mamba layers.
            inputs_embeds: `(batch, seq, hidden)` instead of `input_ids`; image positions are then those holding the
                image token's embedding.
            output_hidden_states: the language model's hidden states after every layer (`True`), or only those of
                the given layer index or indices (the others `None`).
            cache_params: states from a previous call; `input_ids` then holds only the new tokens.
            mm_encoder_outputs: `{"image": get_image_features(pixel_values)}` computed beforehand, instead of
                `pixel_values` (`generate` encodes the images once this way, before the prefill).
            kwargs: ignored (e.g. `position_ids`, which a recurrent model does not use).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and mm_encoder_outputs:
            raise ValueError("Pass pixel_values or mm_encoder_outputs, not both.")
        # Prompts are checked; decode steps (one token after a filled cache) are not: generate chooses those tokens
        # itself, never the image token (suppress_tokens), and each check costs a device synchronisation.
        is_prompt = input_ids is not None and (
            input_ids.shape[1] > 1 or cache_params is None or not cache_params.has_previous_state()
        )
        if is_prompt:
            vocab_size = self.config.text_config.vocab_size
            torch_compilable_check(
                ((input_ids >= 0) & (input_ids < vocab_size)).all(),
                lambda: (
                    f"input_ids hold token ids from {int(input_ids.min())} to {int(input_ids.max())}, outside the "
                    f"vocabulary of {vocab_size}: tokenize with this model's tokenizer."
                ),
            )
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)

        image_features = None
        if pixel_values is not None:
            image_features = self.get_image_features(pixel_values, return_dict=True).pooler_output
        elif mm_encoder_outputs and mm_encoder_outputs.get("image") is not None:
            image_features = mm_encoder_outputs["image"].pooler_output
        if image_features is not None:
            mask = self.get_placeholder_mask(input_ids, inputs_embeds, image_features)
            inputs_embeds = inputs_embeds.masked_scatter(mask.unsqueeze(-1), image_features.to(inputs_embeds))
        elif is_prompt:
            torch_compilable_check(
                ~(input_ids == self.config.image_token_id).any(),
                "input_ids contain image tokens but no pixel_values were given; pass the images.",
            )

        if attention_mask is not None:
            # With a cache the mask may span past tokens too; Mamba needs it for the current tokens only.
            attention_mask = attention_mask[:, -inputs_embeds.shape[1] :]

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache_params=cache_params,
            use_cache=use_cache,
            output_hidden_states=None if output_hidden_states is None else bool(output_hidden_states),
            return_dict=True,
        )
        return VLMambaModelOutput(
            last_hidden_state=outputs.last_hidden_state,
            cache_params=outputs.cache_params,
            hidden_states=keep_requested_states(
                outputs.hidden_states, True if output_hidden_states is None else output_hidden_states
            ),
            image_hidden_states=image_features,
        )


class VLMambaForConditionalGeneration(VLMambaPreTrainedModel, GenerationMixin):
    """VL-Mamba with the language-modelling head (tied to the input embeddings)."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embeddings.weight"}

    def __init__(self, config: VLMambaConfig):
        super().__init__(config)
        self.model = VLMambaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()
        # The image token is a placeholder for image features, never an answer.
        self.generation_config.suppress_tokens = [config.image_token_id]
        # Decode through CUDA graphs on CUDA (see DecodeGraph); `generate(..., cuda_graph_decode=False)` turns it off.
        self.generation_config.cuda_graph_decode = True
        # Saved as a customised generation config, so that the switch above is kept when the model is reloaded.
        self.generation_config._from_model_config = False
        self._decode_graphs: dict[int, DecodeGraph] = {}
        self._decode_graph_in_use: DecodeGraph | None = None  # of the `generate` call under way

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> VLMambaMultiModalProjector:
        return self.model.multi_modal_projector

    def get_image_features(self, pixel_values: torch.FloatTensor, **kwargs) -> BaseModelOutputWithPooling:
        """See `VLMambaModel.get_image_features`."""
        return self.model.get_image_features(pixel_values, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        cache_params: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict[str, BaseModelOutputWithPooling] | None = None,
        **kwargs,
    ) -> VLMambaCausalLMOutput:
        r"""
        Args:
            labels: `(batch, seq)` targets, unshifted (`labels = input_ids` is fine); -100 is ignored, and the
                image-token positions are always ignored.
            logits_to_keep: compute logits for the last `logits_to_keep` positions only (0 keeps all; with labels
                it must be 0).
            kwargs: passed to the loss (e.g. `num_items_in_batch` from the Trainer).

        See `VLMambaModel.forward` for the other arguments.
        """
        if labels is not None and not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0 when training.")
        graph = getattr(cache_params, "decode_graph", None)
        one_token = input_ids is not None and input_ids.shape[1] == 1 and pixel_values is None
        if graph is not None and one_token and cache_params.has_previous_state() and not output_hidden_states:
            return VLMambaCausalLMOutput(logits=graph.step(self, input_ids), cache_params=cache_params)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            cache_params=cache_params,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            mm_encoder_outputs=mm_encoder_outputs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()

        loss = None
        if labels is not None:
            labels = labels.masked_fill(self.model.image_token_mask(input_ids, inputs_embeds), IGNORE_INDEX)
            loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
            )

        return VLMambaCausalLMOutput(
            loss=loss,
            logits=logits,
            cache_params=outputs.cache_params,
            hidden_states=outputs.hidden_states,
            image_hidden_states=outputs.image_hidden_states,
        )

    def decode_logits(self, input_ids: torch.LongTensor, cache_params: Cache, ssm_A: torch.Tensor) -> torch.Tensor:
        """One cached decode step (`decode_step`): `(batch, 1)` ids -> `(batch, 1, vocab)` fp32 logits."""
        hidden_states = decode_step(self.model.language_model, input_ids, cache_params, ssm_A)
        return self.lm_head(hidden_states.to(self.lm_head.weight.dtype)).float()

    @functools.wraps(GenerationMixin.generate)
    def generate(self, *args, **kwargs):
        try:
            return super().generate(*args, **kwargs)
        finally:  # a step decoded ahead may still run: later work on the current stream must come after it
            if self._decode_graph_in_use is not None:
                self._decode_graph_in_use.join()
            self._decode_graph_in_use = None

    def _prepare_cache_for_generation(
        self,
        generation_config: GenerationConfig,
        model_kwargs: dict,
        generation_mode: GenerationMode,
        batch_size: int,
        max_cache_length: int,
    ) -> None:
        """Hand greedy and sampling `generate` calls on one CUDA device the persistent cache of a DecodeGraph."""
        devices = set(getattr(self, "hf_device_map", {}).values())
        use_graph = (
            getattr(generation_config, "cuda_graph_decode", True)
            and generation_config.use_cache
            and self.device.type == "cuda"
            and len(devices) <= 1
            and not self.training
            and model_kwargs.get("cache_params") is None
            and generation_mode in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE)
        )
        self._decode_graph_in_use = None
        if not use_graph:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        batch_size *= generation_config.num_return_sequences
        graph, key = self._decode_graphs.get(batch_size), self.decode_graph_key()
        if graph is None or graph.key != key:  # new batch size, weights or adapter state
            if graph is None and len(self._decode_graphs) >= MAX_DECODE_GRAPHS:
                self._decode_graphs.pop(next(iter(self._decode_graphs)))  # the oldest batch size
            graph = self._decode_graphs[batch_size] = DecodeGraph(self, batch_size, key)
        # Decoding ahead leaves the states a step past the last token: not where the caller gets the cache back,
        # or asks for per-step outputs that the graph step does not give.
        returns_cache = generation_config.return_dict_in_generate
        per_step_outputs = generation_config.output_hidden_states or generation_config.output_attentions
        graph.reset(self, decode_ahead=not (returns_cache or per_step_outputs))
        self._decode_graph_in_use = graph
        model_kwargs["cache_params"] = graph.cache

    def _get_stopping_criteria(
        self,
        generation_config: GenerationConfig,
        stopping_criteria: StoppingCriteriaList | None,
        tokenizer=None,
    ) -> StoppingCriteriaList:
        """`generate`'s stopping criteria, and last `DecodeAhead` where this call decodes through a graph."""
        criteria = super()._get_stopping_criteria(generation_config, stopping_criteria, tokenizer)
        graph = self._decode_graph_in_use
        if graph is not None and graph.ahead_enabled:
            criteria.append(DecodeAhead(graph, generation_config.max_length))
        return criteria

    def decode_graph_key(self) -> tuple:
        """What a captured decode graph depends on besides its inputs, which must stay the same for a replay: where the
        parameters live (their values may change in place), and the state of any PEFT adapter layer (enabled, active,
        merged, LoRA scaling), on which the captured Python branches and constants depend."""
        adapters = tuple(
            (
                module.disable_adapters,
                tuple(module.active_adapters),
                tuple(module.merged_adapters),
                tuple(sorted(getattr(module, "scaling", {}).items())),
            )
            for module in self.modules()
            if hasattr(module, "merged_adapters")  # a PEFT tuner layer (peft itself is not needed here)
        )
        return tuple(param.data_ptr() for param in self.parameters()), adapters

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        cache_params = kwargs.get("cache_params")
        graph_step = hasattr(cache_params, "decode_graph") and not is_first_iteration
        if graph_step and cache_params.has_previous_state() and not kwargs.get("output_hidden_states"):
            # A graph decode step reads only the new token and the cache (see `forward`); the generic preparation
            # below costs more host time than the replay takes to launch.
            return {"input_ids": input_ids[:, -1:], "cache_params": cache_params, "use_cache": True}
        model_inputs = super().prepare_inputs_for_generation(
            input_ids,
            attention_mask=attention_mask,
            use_cache=use_cache,
            is_first_iteration=is_first_iteration,
            **kwargs,
        )
        # After prefill the recurrent state already accounts for the padding: decode steps need no mask.
        if use_cache and not is_first_iteration:
            model_inputs["attention_mask"] = None
        return model_inputs


__all__ = [
    "LORA_TARGET_MODULES",
    "DecodeAhead",
    "DecodeGraph",
    "decode_step",
    "VLMambaForConditionalGeneration",
    "VLMambaModel",
    "VLMambaPreTrainedModel",
    "VLMambaMultiModalProjector",
    "VLMambaVisionTower",
    "VisionSelectiveScan",
    "cross_scan",
    "merge_scans",
]
