"""Processor of VL-Mamba: an image processor plus the language model's tokenizer with one `<image>` special token."""

import re
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import PIL.Image
import PIL.ImageOps
from transformers import PreTrainedTokenizerBase, ProcessorMixin
from transformers.image_transforms import to_pil_image
from transformers.image_utils import load_image

IMAGE_TOKEN = "<image>"
EOS_TOKEN = "<|endoftext|>"  # GPT-NeoX id 0: its EOS, which ends every turn of the default chat template
PAD_TOKEN = "<|padding|>"  # GPT-NeoX id 1
IMAGE_ASPECT_RATIOS = ("pad", "resize")
# Modes PIL converts to RGB without losing meaning; with an alpha channel the image is composited on white.
RGB_CONVERTIBLE_MODES = ("1", "L", "P", "RGB", "CMYK", "YCbCr", "LAB", "HSV")
ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# How `generation` blocks are written in a chat template (transformers' marker for assistant tokens).
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


def jinja_string(text: str) -> str:
    """`text` as a Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def zephyr_chat_template(end_of_turn: str = EOS_TOKEN, images_first: bool = False) -> str:
    """The Zephyr chat format of mamba-2.8b-zephyr and Cobra: `<|user|>\\n{text}{end_of_turn}\\n<|assistant|>\\n...`,
    each turn ended by `end_of_turn` (the tokenizer's EOS: GPT-NeoX's `<|endoftext|>` by default).

    The `generation` block marks assistant tokens (end of turn included) for assistant-only loss. By default each
    image's `<image>` goes where its block is in the conversation; `images_first=True` puts every image before the
    whole conversation and strips each message's text, as Cobra's prompt builder does.
    """
    text = "{{- block['text'] | trim -}}" if images_first else "{{- block['text'] -}}"
    image = "" if images_first else "{{- '<image>' -}}"
    end = jinja_string(end_of_turn)
    leading_images = (
        "{%- for message in messages -%}{%- if message['content'] is not string -%}"
        "{%- for block in message['content'] -%}{%- if block['type'] == 'image' -%}{{- '<image>' -}}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}{%- endfor -%}"
        if images_first
        else ""
    )
    return (
        "{%- macro render(content) -%}"
        "{%- if content is string -%}{{- content" + (" | trim" if images_first else "") + " -}}"
        "{%- else -%}{%- for block in content -%}"
        "{%- if block['type'] == 'image' -%}" + image + "{%- elif block['type'] == 'text' -%}" + text + "{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{%- endmacro -%}" + leading_images + "{%- for message in messages -%}"
        "{%- if message['role'] not in ('system', 'user', 'assistant') -%}"
        "{{- raise_exception('VL-Mamba chat roles are system, user and assistant, got ' + message['role']) -}}"
        "{%- endif -%}"
        "{{- '<|' + message['role'] + '|>\\n' -}}"
        "{%- if message['role'] == 'assistant' -%}"
        "{%- generation -%}{{- render(message['content']) + " + end + " -}}{%- endgeneration -%}"
        "{%- else -%}{{- render(message['content']) + " + end + " -}}{%- endif -%}"
        "{{- '\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}"
    )


DEFAULT_CHAT_TEMPLATE = zephyr_chat_template()
# Cobra's format: the images before all text, no placeholder in the conversation.
IMAGES_FIRST_CHAT_TEMPLATE = zephyr_chat_template(images_first=True)


def derived_chat_template(template: str, image_token: str = IMAGE_TOKEN) -> str:
    """A language model's own chat template made multimodal: each message whose content is a list of blocks is
    rendered as the string of its blocks, `image_token` where each image block is (string contents as they are).

    Where `template` has no `generation` blocks, the result marks the assistant turns itself, for assistant-only
    loss: the template's rendering of the conversation up to each assistant turn (with the generation prompt) and
    through it tells where the turn's tokens are. A turn the template does not render as a prefix of the whole
    conversation, or one that opens it (templates need a message to render), is left unmarked.
    """
    image = jinja_string(image_token)
    flatten = (
        "{%- set flattened = namespace(messages=[]) -%}"
        "{%- for message in messages -%}"
        "{%- if message['content'] is not defined or message['content'] is string -%}"
        "{%- set flattened.messages = flattened.messages + [message] -%}"
        "{%- else -%}"
        "{%- set text = namespace(value='') -%}"
        "{%- for block in message['content'] -%}"
        "{%- if block['type'] == 'image' -%}{%- set text.value = text.value + " + image + " -%}"
        "{%- elif block['type'] == 'text' -%}{%- set text.value = text.value + block['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set flattened.messages = flattened.messages + [dict(message, content=text.value)] -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )
    # Jinja's whitespace control: the newline after a block tag is dropped (trim_blocks), so one is added before the
    # template, and the template's own trailing newline, which Jinja drops at the end of a template, is removed.
    if GENERATION_BLOCK.search(template):
        return flatten + "{%- set messages = flattened.messages %}\n" + template
    return (
        flatten
        + "{%- macro language_model_chat(messages, add_generation_prompt) %}\n"
        + template.removesuffix("\n")
        + "{% endmacro -%}"
        "{%- set chat = language_model_chat(flattened.messages, add_generation_prompt) -%}"
        "{%- set marked = namespace(end=0) -%}"
        "{%- for message in flattened.messages -%}"
        "{%- if message['role'] == 'assistant' and not loop.first -%}"
        "{%- set prompt = language_model_chat(flattened.messages[:loop.index0], true) -%}"
        "{%- set answered = language_model_chat(flattened.messages[:loop.index], false) -%}"
        "{%- if chat.startswith(answered) and answered.startswith(prompt) and prompt | length >= marked.end -%}"
        "{{- chat[marked.end:prompt | length] -}}"
        "{%- generation -%}{{- chat[prompt | length:answered | length] -}}{%- endgeneration -%}"
        "{%- set marked.end = answered | length -%}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- chat[marked.end:] -}}"
    )


def chat_template_for(tokenizer: PreTrainedTokenizerBase, image_token: str = IMAGE_TOKEN) -> str | dict[str, str]:
    """The chat template of a processor around `tokenizer`: the tokenizer's own chat template made multimodal
    (`derived_chat_template`; one that already places `image_token` is kept as it is), or, for a tokenizer without
    one (GPT-NeoX's), the Zephyr format with the tokenizer's EOS ending each turn."""
    template = tokenizer.chat_template
    if template is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a chat template nor an EOS token to end chat turns with: pass the "
                "processor a chat_template."
            )
        return zephyr_chat_template(str(tokenizer.eos_token))

    def multimodal(text: str) -> str:
        return text if image_token in text else derived_chat_template(text, image_token)

    if isinstance(template, dict):  # named templates
        return {name: multimodal(text) for name, text in template.items()}
    return multimodal(template)


def _flatten(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten(item)]
    return [images]


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """Upright RGB copy of `image`; transparency is composited on white. Raises for modes with no RGB meaning."""
    image = PIL.ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode not in RGB_CONVERTIBLE_MODES:
        raise ValueError(
            f"Image mode '{image.mode}' is not supported (supported: "
            f"{', '.join(RGB_CONVERTIBLE_MODES + ALPHA_MODES)}). Scale it to 8 bits per channel and convert it to RGB."
        )
    return image.convert("RGB")


def expand_to_square(image: PIL.Image.Image, background: tuple[int, int, int], name: str = "image") -> PIL.Image.Image:
    """Pad the shorter side symmetrically to a square (LLaVA-1.5's `expand2square`).

    PIL bounds the pixels of what it decodes (`PIL.Image.MAX_IMAGE_PIXELS`), not of this canvas: a 20000x1 image
    would pad to 400 million pixels. The canvas is held to the same bound, with an error naming the image.
    """
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    limit = PIL.Image.MAX_IMAGE_PIXELS
    if limit is not None and side * side > limit:
        raise ValueError(
            f"{name} is {width}x{height}: padding it to a square would take {side}x{side} = {side * side:,} pixels, "
            f"over PIL's limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS). Crop it, or use image_aspect_ratio='resize'."
        )
    square = PIL.Image.new("RGB", (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def output_size(image_processor) -> tuple[int, int]:
    """(height, width) of the images `image_processor` outputs: its crop size where it crops, else its size."""
    size = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else image_processor.size
    size = dict(size or {})
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    if "shortest_edge" in size:  # square outputs only come from a crop; without one, the side is the shortest edge
        return size["shortest_edge"], size["shortest_edge"]
    raise ValueError(
        f"Cannot tell the output size of {type(image_processor).__name__} (size={size}): pass image_seq_length, "
        "the model config's value."
    )


def load_rgb_image(image) -> PIL.Image.Image:
    """A PIL image, a local path or `file://` URL, an http(s) URL, a `data:image/...;base64,` URI, or an (H, W, C) /
    (C, H, W) array or tensor -> an RGB PIL image. A file that cannot be decoded (missing, a folder, truncated,
    corrupt, or over PIL's pixel limit) raises an error that names it."""
    if isinstance(image, str) and image.startswith("file://"):
        image = Path(url2pathname(urlparse(image).path))
    if isinstance(image, Path) or (isinstance(image, str) and not image.startswith(("http://", "https://", "data:"))):
        path = Path(image)
        if path.is_dir():
            raise IsADirectoryError(f"Image file '{path}' is a folder: pass the path of an image file.")
        if not path.is_file():
            raise FileNotFoundError(f"Image file not found: '{path}'.")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                return to_rgb(opened)
        except PIL.UnidentifiedImageError as error:
            raise ValueError(f"Cannot read image file '{path}': it is not an image format PIL can decode.") from error
        except PIL.Image.DecompressionBombError as error:
            raise ValueError(f"Image file '{path}' is too large to decode: {error}") from error
        except OSError as error:
            raise ValueError(f"Cannot read image file '{path}' ({error}): it is truncated or corrupt.") from error
    if isinstance(image, str):
        try:
            image = load_image(image)
        except PIL.Image.DecompressionBombError as error:
            raise ValueError(f"Image {image[:80]!r} is too large to decode: {error}") from error
    elif not isinstance(image, PIL.Image.Image):
        try:
            image = to_pil_image(image)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"Unsupported image of type {type(image).__name__}: pass a PIL image, a file path, a URL, "
                "or an (H, W, C) / (C, H, W) array."
            ) from error
    return to_rgb(image)


class VLMambaProcessor(ProcessorMixin):
    r"""
    Builds VL-Mamba inputs: images become `pixel_values` and every `<image>` placeholder in the text is expanded to
    `image_seq_length` image tokens.

    Args:
        image_processor: the vision encoder's image processor (e.g. `SiglipImageProcessorPil`).
        tokenizer: the language model's tokenizer (GPT-NeoX for Mamba and Mamba-2, Falcon's for FalconMamba), in
            which `image_token` is a single (special) token.
        image_seq_length (`int`, *optional*): tokens per image after the connector, the model config's
            `image_seq_length`. Derived when not given: one token per patch of the image processor's output size in
            `patch_size` patches (729 for SigLIP at 384 px, 576 for CLIP at 336 px).
        patch_size (`int`, defaults to 14): the vision encoder's patch size, to derive `image_seq_length`.
        image_aspect_ratio (`str`, defaults to `"pad"`): `"pad"` pads each image to a square with the image
            processor's mean colour before resizing (LLaVA-1.5); `"resize"` hands it to the image processor as it is.
        image_token (`str`, defaults to `"<image>"`): the placeholder token.
        chat_template (`str`, *optional*): defaults to `chat_template_for(tokenizer)`: the tokenizer's own chat
            template made multimodal, or for a tokenizer without one the Zephyr-style `DEFAULT_CHAT_TEMPLATE` (with
            the tokenizer's EOS ending each turn). `IMAGES_FIRST_CHAT_TEMPLATE` puts the images before the whole
            conversation (Cobra).
        image_normalizations (`list[dict]`, *optional*): for a fused vision tower, each encoder's `{"mean": [...],
            "std": [...]}`, in the tower's order. The image processor then resizes and rescales each image once, and
            `pixel_values` stack its normalisation for every encoder on the channel axis: `(num_images,
            3 * len(image_normalizations), height, width)`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        image_seq_length: int | None = None,
        patch_size: int = 14,
        image_aspect_ratio: str = "pad",
        image_token: str = IMAGE_TOKEN,
        chat_template: str | None = None,
        image_normalizations: list[dict] | None = None,
        **kwargs,
    ):
        if image_aspect_ratio not in IMAGE_ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio={image_aspect_ratio!r} is not supported; valid choices: "
                f"{', '.join(IMAGE_ASPECT_RATIOS)}."
            )
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}.")
        if image_seq_length is None:
            height, width = output_size(image_processor)
            image_seq_length = (height // patch_size) * (width // patch_size)
        if not isinstance(image_seq_length, int) or isinstance(image_seq_length, bool) or image_seq_length < 1:
            raise ValueError(
                f"image_seq_length must be a positive integer (the model config's image_seq_length), got "
                f"{image_seq_length!r}."
            )
        token_ids = tokenizer.encode(image_token, add_special_tokens=False)
        if len(token_ids) != 1:
            raise ValueError(
                f"The tokenizer splits {image_token!r} into {len(token_ids)} tokens; it must be one special token. "
                f"Add it with tokenizer.add_tokens([{image_token!r}], special_tokens=True)."
            )
        if image_normalizations is not None and not (
            isinstance(image_normalizations, list | tuple)
            and image_normalizations
            and all(
                isinstance(norm, dict) and set(norm) == {"mean", "std"} and len(norm["mean"]) == len(norm["std"])
                for norm in image_normalizations
            )
        ):
            raise ValueError(
                "image_normalizations must be a non-empty list of {'mean': [...], 'std': [...]}, one per encoder, "
                f"got {image_normalizations!r}."
            )
        self.image_seq_length = image_seq_length
        self.patch_size = patch_size
        self.image_normalizations = None if image_normalizations is None else [dict(n) for n in image_normalizations]
        self.image_aspect_ratio = image_aspect_ratio
        self.image_token = image_token
        self.image_token_id = token_ids[0]
        chat_template = chat_template or chat_template_for(tokenizer, image_token)
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    def stop_token_ids(self) -> list[int]:
        """The ids generation stops on: the tokenizer's EOS, and the special token that ends an assistant turn in
        the chat template where that is another one (ChatML's `<|im_end|>`)."""
        answer = "Yes."
        conversation = [{"role": "user", "content": "Is it red?"}, {"role": "assistant", "content": answer}]
        rendered = self.apply_chat_template(conversation)
        end = rendered.rfind(answer)
        after = rendered[end + len(answer) :] if end >= 0 else ""
        special = set(self.tokenizer.all_special_ids) | {
            index for index, token in self.tokenizer.added_tokens_decoder.items() if token.special
        }
        ids = self.tokenizer.encode(after, add_special_tokens=False)
        end_of_turn = next((index for index in ids if index in special), None)
        stops = [index for index in (self.tokenizer.eos_token_id, end_of_turn) if index is not None]
        return list(dict.fromkeys(stops))

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if isinstance(text, list | tuple) and not text:
            raise ValueError("text is an empty list: give one prompt per sample (e.g. ['<image>\\nDescribe it.']).")
        _, text, videos, audio = super().prepare_inputs_layout(text=text, videos=videos, audio=audio, **kwargs)
        if text is not None and any(not sample.strip() for sample in text):
            raise ValueError("Got an empty text prompt; every sample needs text (e.g. '<image>\\nDescribe it.').")
        if images is not None:
            # Images nested per sample (`[[a, b], [c]]`) keep their nesting until `validate_inputs` has checked them.
            per_sample = (
                isinstance(images, (list, tuple))
                and images
                and all(isinstance(item, (list, tuple)) for item in images)
            )
            images = (
                [[self.prepare_image(image) for image in _flatten(sample)] for sample in images]
                if per_sample
                else [self.prepare_image(image) for image in _flatten(images)]
            )
        return images, text, videos, audio

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if text is not None:
            counts = [sample.count(self.image_token) for sample in text]
            nested = images is not None and all(isinstance(sample, list) for sample in images)
            if nested and len(images) != len(text):
                raise ValueError(f"Images are nested for {len(images)} samples but there are {len(text)} texts.")
            if nested:
                for index, (placeholders, sample) in enumerate(zip(counts, images, strict=True)):
                    if placeholders != len(sample):
                        raise ValueError(
                            f"Sample {index} has {placeholders} {self.image_token} placeholders but {len(sample)} "
                            f"images: put one {self.image_token} in its text for every image, in order."
                        )
            num_images = 0 if images is None else len(_flatten(images))
            if sum(counts) != num_images:
                raise ValueError(
                    f"{sum(counts)} {self.image_token} placeholders but {num_images} images: put one "
                    f"{self.image_token} in the text for every image, in order."
                )
        super().validate_inputs(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def _process_images(self, images, **kwargs):
        images = _flatten(images)
        if self.image_normalizations is None:
            return super()._process_images(images, **kwargs)
        # One resize (and rescale to [0, 1]), then every encoder's normalisation, stacked on the channel axis.
        kwargs = {**kwargs, "do_normalize": False, "return_tensors": "np"}
        processed, replacements = super()._process_images(images, **kwargs)
        pixels = np.asarray(processed["pixel_values"], dtype=np.float32)
        processed["pixel_values"] = np.concatenate(
            [
                (pixels - np.float32(norm["mean"])[:, None, None]) / np.float32(norm["std"])[:, None, None]
                for norm in self.image_normalizations
            ],
            axis=1,
        )
        return processed, replacements

    def prepare_image(self, image) -> PIL.Image.Image:
        """Any image input `load_rgb_image` takes -> the RGB PIL image the image processor gets (padded to a square
        with `image_aspect_ratio="pad"`)."""
        name = f"Image file '{image}'" if isinstance(image, str | Path) else "An image"
        image = load_rgb_image(image)
        if self.image_aspect_ratio == "pad":
            # int(), as LLaVA's expand2square computes the background (the first encoder's mean for a fused tower)
            means = (
                self.image_normalizations[0]["mean"] if self.image_normalizations else self.image_processor.image_mean
            )
            mean = tuple(int(255 * mean) for mean in means)
            image = expand_to_square(image, mean, name)
        return image

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * self.image_seq_length


__all__ = [
    "VLMambaProcessor",
    "DEFAULT_CHAT_TEMPLATE",
    "IMAGES_FIRST_CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "chat_template_for",
    "derived_chat_template",
    "zephyr_chat_template",
]
