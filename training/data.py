"""Training data for both stages: the LLaVA-JSON reader, Hugging Face datasets, and the batch collator.

LLaVA JSON: `[{"id", "image"?: path or list of paths, "conversations": [{"from": "human"|"gpt", "value"}]}]` with
image paths relative to an image folder. Records become rows that hold image *paths*; the collator decodes a
batch's images when the batch is drawn, so a 665K-image dataset never sits in memory.

- Stage 1 (LLaVA "plain"): `prompt` = the record's `<image>` placeholders, `completion` = the caption, to which the
  collator appends the tokenizer's EOS; the loss covers the completion only.
- Stage 2 (chat): `messages` in TRL's structured format, images in place of each `<image>`; the loss covers the
  assistant turns only (the chat template's `{% generation %}` blocks, which a template derived from the language
  model's own marks itself: `derived_chat_template`).
"""

import json
import logging
from pathlib import Path

import datasets
import PIL.Image
from tqdm.auto import tqdm
from transformers import ProcessorMixin
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from vlmamba.conversion.files import inside_folder

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
ROLES = {"human": "user", "gpt": "assistant"}


class DataError(ValueError):
    """A record that cannot be trained on; the message names the record and, where one is involved, the file."""


def _image_paths(
    record: dict, record_id: str, image_folder: Path, verify: bool, allow_outside: bool = False
) -> list[Path]:
    images = record.get("image", [])
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(name, str) for name in images):
        raise DataError(f"Record {record_id}: 'image' must be a path or a list of paths, got {images!r}.")
    outside = [name for name in images if not inside_folder(name)]
    if outside and not allow_outside:
        raise DataError(
            f"Record {record_id}: image paths {outside} lead out of the image folder {image_folder}: give paths "
            "relative to it, or pass --allow-images-outside-folder to read them anyway."
        )
    paths = [image_folder / name for name in images]
    for path in paths:
        if not path.is_file():
            raise DataError(f"Record {record_id}: image file not found: {path}")
        if verify:
            try:
                with PIL.Image.open(path) as image:
                    image.verify()
            except (OSError, SyntaxError, PIL.Image.DecompressionBombError) as error:
                raise DataError(f"Record {record_id}: unreadable image {path}: {error}") from error
    return paths


def _turns(record: dict, record_id: str, num_images: int) -> list[tuple[str, str]]:
    conversation = record.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise DataError(f"Record {record_id}: 'conversations' must be a non-empty list.")
    turns = []
    for number, message in enumerate(conversation):
        if (
            not isinstance(message, dict)
            or message.get("from") not in ROLES
            or not isinstance(message.get("value"), str)
        ):
            raise DataError(
                f"Record {record_id}: turn {number} must be {{'from': 'human' or 'gpt', 'value': text}}, "
                f"got {message!r}."
            )
        turns.append((ROLES[message["from"]], message["value"]))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError(f"Record {record_id}: the conversation has no assistant ('gpt') turn to learn from.")
    placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
    if placeholders != num_images:
        raise DataError(
            f"Record {record_id}: {placeholders} {IMAGE_PLACEHOLDER} placeholders but {num_images} images."
        )
    return turns


def content_blocks(text: str) -> list[dict]:
    """Text with `<image>` placeholders -> structured blocks, each image where its placeholder was."""
    blocks = []
    for number, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if number > 0:
            blocks.append({"type": "image", "text": None})
            piece = piece.removeprefix("\n")  # LLaVA writes "<image>\n{question}"
        if piece:
            blocks.append({"type": "text", "text": piece})
    return blocks


def llava_row(
    record: dict,
    index: int,
    image_folder: Path,
    stage: int,
    verify_images: bool = False,
    allow_images_outside_folder: bool = False,
) -> dict:
    """One LLaVA-JSON record as a training row of `stage` (see the module docstring); raises `DataError`. Image
    paths must stay inside `image_folder` unless `allow_images_outside_folder`."""
    if not isinstance(record, dict):
        raise DataError(f"Record #{index} is not an object: {record!r}.")
    record_id = str(record.get("id", f"#{index}"))
    paths = _image_paths(record, record_id, image_folder, verify_images, allow_images_outside_folder)
    turns = _turns(record, record_id, len(paths))
    images = [str(path) for path in paths]
    if stage == 1:
        if [role for role, _ in turns] != ["user", "assistant"] or not paths:
            raise DataError(f"Record {record_id}: stage 1 takes one human turn with the image(s) and one gpt caption.")
        return {
            "id": record_id,
            "images": images,
            "prompt": IMAGE_PLACEHOLDER * len(paths),
            "completion": turns[1][1],
        }
    messages = [{"role": role, "content": content_blocks(text)} for role, text in turns]
    return {"id": record_id, "images": images, "messages": messages}


def read_llava_json(
    json_path: str | Path,
    image_folder: str | Path | None = None,
    stage: int = 2,
    skip_bad_samples: bool = False,
    allow_images_outside_folder: bool = False,
) -> datasets.Dataset:
    """Read a LLaVA-JSON file into a `datasets.Dataset` of stage `stage` rows (image paths, decoded per batch).

    Every record is checked: its structure, an assistant turn, one `<image>` per image, that each image path stays
    inside `image_folder` (unless `allow_images_outside_folder`), and that each image file exists. A bad record
    raises `DataError` naming it (and the file); with `skip_bad_samples` the image files are also checked to be
    readable, and a bad record is left out with a warning, and the number left out logged.
    """
    json_path = Path(json_path)
    image_folder = Path(image_folder) if image_folder is not None else json_path.parent
    if not json_path.is_file():
        raise FileNotFoundError(f"Data file not found: {json_path}")
    try:
        records = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(f"{json_path} is not valid UTF-8 JSON: {error}") from error
    if not isinstance(records, list):
        raise DataError(f"{json_path} must hold a list of records, got {type(records).__name__}.")
    rows, skipped = [], 0
    for index, record in enumerate(tqdm(records, desc=f"Reading {json_path.name}", unit="record")):
        try:
            rows.append(llava_row(record, index, image_folder, stage, skip_bad_samples, allow_images_outside_folder))
        except DataError as error:
            if not skip_bad_samples:
                raise
            skipped += 1
            logger.warning(f"Skipping a bad sample: {error}")
    if skipped:
        logger.warning(f"Skipped {skipped} bad samples of {len(records)} in {json_path}.")
    if not rows:
        raise DataError(f"{json_path} has no usable records.")
    return datasets.Dataset.from_list(rows)


def check_assistant_marks(processor: ProcessorMixin) -> None:
    """Raise `DataError` unless the processor's chat template marks an assistant turn's tokens, and they hold a token
    generation stops on (`stop_token_ids`); warn where it marks only the last turn of a conversation. Without marks
    the assistant-only loss of stage 2 would train on nothing; without a stop token the model would never learn to
    stop."""
    question, answer = {"role": "user", "content": "Is it red?"}, {"role": "assistant", "content": "Yes."}
    tokens, marks = marked_tokens(processor, [question, answer])
    if not any(marks):
        raise DataError(
            "The processor's chat template marks no assistant tokens, so stage 2 (assistant-only loss) would learn "
            "nothing: wrap each assistant turn's output in {% generation %} ... {% endgeneration %}, or rebuild the "
            "processor from the language model's tokenizer (its template is then derived with the marks: "
            "derived_chat_template)."
        )
    stops = processor.stop_token_ids()
    if not any(mark and token in stops for token, mark in zip(tokens, marks, strict=True)):
        trained = processor.tokenizer.decode([token for token, mark in zip(tokens, marks, strict=True) if mark])
        raise DataError(
            f"The chat template's assistant turns are trained as {trained!r}, which holds none of the tokens "
            f"generation stops on ({processor.tokenizer.convert_ids_to_tokens(stops)}): the model would never learn "
            "to stop. End assistant turns with the EOS token, or make the template's end-of-turn marker a special "
            "token of the tokenizer (tokenizer.add_special_tokens) before building the processor."
        )
    _, marks = marked_tokens(processor, [question, answer, question, answer])
    turns = sum(1 for before, mark in zip([0, *marks], marks, strict=False) if mark and not before)
    if turns < 2:
        logger.warning(
            f"The chat template marks {turns} of the 2 assistant turns of a two-turn conversation: earlier answers of "
            "multi-turn samples will not be trained on (the template renders an earlier turn differently once it "
            "is not the last, e.g. dropping a reasoning block)."
        )


def marked_tokens(processor: ProcessorMixin, conversation: list[dict]) -> tuple[list[int], list[int]]:
    """The token ids of `conversation` in the processor's chat template, and its assistant-token marks (1 or 0)."""
    rendered = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(rendered["input_ids"][0]), list(rendered["assistant_masks"][0])


class VisionCollator:
    """Builds training batches: decodes each batch's images, then lets TRL's vision collator tokenize and label it.

    Stage-1 completions end with the tokenizer's EOS. Labels are -100 on prompts (stage 1) or non-assistant turns
    (stage 2), on padding, and always on image tokens (TRL's fused loss reads these labels without going through the
    model's own image-position masking). Stage 2 needs a chat template that marks assistant tokens
    (`check_assistant_marks`).
    A sample whose image cannot be decoded raises `DataError` naming the record and file; with `skip_bad_samples`
    it is dropped with a warning and counted in `skipped` (per process: dataloader workers count their own). A
    `max_length` that would cut through a sample's image tokens raises `DataError` naming the records.
    """

    def __init__(self, processor: ProcessorMixin, stage: int, max_length: int | None = None, skip_bad_samples=False):
        if stage == 2:
            check_assistant_marks(processor)
        self.collator = DataCollatorForVisionLanguageModeling(
            processor,
            max_length=max_length,
            completion_only_loss=stage == 1,
            assistant_only_loss=stage == 2,
        )
        self.processor = processor
        self.stage = stage
        self.image_token_id = processor.image_token_id
        self.image_seq_length = processor.image_seq_length
        self.max_length = max_length
        self.skip_bad_samples = skip_bad_samples
        self.skipped = 0

    def _decode(self, example: dict) -> dict | None:
        images = []
        for image in example.get("images") or []:
            try:
                images.append(self.processor.prepare_image(image))
            except (OSError, ValueError) as error:
                message = f"Record {example.get('id', '?')}: cannot use image {image}: {error}"
                if not self.skip_bad_samples:
                    raise DataError(message) from error
                self.skipped += 1
                logger.warning(f"Skipping a bad sample: {message}")
                return None
        decoded = {**example, "images": images}
        if self.stage == 1:  # the caption ends as the tokenizer ends a text
            decoded["completion"] += self.processor.tokenizer.eos_token
        return decoded

    def __call__(self, examples: list[dict]) -> dict:
        batch = [decoded for decoded in map(self._decode, examples) if decoded is not None]
        if not batch:
            raise DataError("Every sample of a batch had an unreadable image; check the image folder.")
        try:
            output = self.collator(batch)
        except ValueError as error:
            if self.max_length is None or "token count" not in str(error):
                raise
            ids = ", ".join(str(example.get("id", "?")) for example in batch)
            raise DataError(
                f"--max-length {self.max_length} cuts through image tokens in a batch of records {ids}; raise it "
                f"(each image takes {self.image_seq_length} tokens) or leave it unset."
            ) from error
        output["labels"][output["input_ids"] == self.image_token_id] = -100
        return output


def load_hf_dataset(name_or_path: str, split: str = "train") -> datasets.Dataset:
    """A Hugging Face dataset (saved folder or Hub id) with `images` and `messages` columns."""
    path = Path(name_or_path)
    if (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        dataset = datasets.load_from_disk(str(path))
        dataset = dataset[split] if isinstance(dataset, datasets.DatasetDict) else dataset
    else:
        dataset = datasets.load_dataset(name_or_path, split=split)
    missing = {"images", "messages"} - set(dataset.column_names)
    if missing:
        raise DataError(f"{name_or_path} lacks the column(s) {sorted(missing)}; it needs 'images' and 'messages'.")
    return dataset
