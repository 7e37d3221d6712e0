"""VL-Mamba as an lmms-eval model: `lmms-eval --model vlmamba --model_args pretrained=FOLDER_OR_HUB_ID ...`.

The name `vlmamba` comes from this package's `lmms_eval.models` entry point (`lmms_eval_plugin`), with a class for
each of lmms-eval's two request modes:

- chat, `VLMambaChat` (the default, and the mode lmms-eval's model guide recommends): a request carries the task's
  `doc_to_messages`, the conversation with its images in place. Every generation task runs here, the eight
  benchmarks of the VL-Mamba paper among them (tasks without `doc_to_messages` get lmms-eval's own: the images,
  then the text).
- simple, `VLMambaSimple` (`--force_simple`): a request carries the task's text context and its `doc_to_visual`;
  the images go where the context has `<image>` placeholders, else before the text (LLaVA's layout). lmms-eval
  builds the log-likelihood requests of multiple-choice tasks in this mode only (its chat tasks are generation-only),
  so those tasks need `--force_simple`.

Both render the prompt with the model's own chat template (`processor.apply_chat_template`: a converted Cobra folder
gets its images-first template), run `batch_size` requests at a time left-padded (exact for a Mamba: pad positions
are zeroed), and decode with the model's `generate`, which runs the CUDA-graph decode on a GPU. A Mamba scores a
continuation exactly in one forward pass: `continuation_logprobs` gives the sum of its token log-probabilities.

One process, one device: lmms-eval's data-parallel launch (accelerate or torchrun with several processes) is refused.
"""

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import PIL.Image
import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages
from tqdm.auto import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from vlmamba.conversion.checkpoint import check_source
from vlmamba.training.data import IMAGE_PLACEHOLDER, content_blocks

logger = logging.getLogger(__name__)

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The generation kwargs of lmms-eval tasks that `generate` is given; `until` becomes its stop strings.
GENERATION_KWARGS = ("max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "num_beams", "repetition_penalty")


@dataclass
class Prompt:
    """A conversation rendered by the chat template, with its images in the order of their placeholders."""

    text: str
    images: list = field(default_factory=list)


def user_turn(context: str, images: list) -> list[dict]:
    """A text context and its images as lmms-eval chat messages of one user turn: each image at its `<image>`
    placeholder (LLaVA's layout, as `vlmamba evaluate` reads it), or all of them before the text where the context
    has none."""
    if IMAGE_PLACEHOLDER not in context:
        return [
            {
                "role": "user",
                "content": [{"type": "image", "url": image} for image in images] + [{"type": "text", "text": context}],
            }
        ]
    blocks = content_blocks(context)
    placeholders = sum(block["type"] == "image" for block in blocks)
    if placeholders != len(images):
        raise ValueError(
            f"The context has {placeholders} {IMAGE_PLACEHOLDER} placeholders but the task gives {len(images)} "
            f"images: {context[:120]!r}."
        )
    remaining = iter(images)
    content = [{"type": "image", "url": next(remaining)} if block["type"] == "image" else block for block in blocks]
    return [{"role": "user", "content": content}]


class VLMambaSimple(lmms):
    """VL-Mamba in lmms-eval's simple mode (see the module docstring); `VLMambaChat` is the chat mode.

    Args:
        pretrained: a VL-Mamba folder or Hub repo id, or a loaded `VLMambaForConditionalGeneration` (then pass its
            `processor`; it is used on the device it is on).
        processor: the processor of a loaded `pretrained` model; loaded with the model otherwise.
        revision: the Hub revision of `pretrained`.
        dtype: `auto` (the checkpoint's), `float32`, `bfloat16` or `float16`.
        device: where the model runs; `cuda` if available, else `cpu`.
        batch_size: requests per forward pass or `generate` call (lmms-eval's `--batch_size`).
        max_new_tokens: the generation limit of tasks that set none.
        trust_remote_code: load the folder's own code (a Hub repo needs it unless this package is installed).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str | PreTrainedModel,
        processor: ProcessorMixin | None = None,
        revision: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 1,
        max_new_tokens: int = 256,
        trust_remote_code: bool = True,
    ) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                "vlmamba evaluates in one process: run lmms-eval without accelerate or torchrun (one GPU), or one "
                "process per task."
            )
        if str(batch_size).isdigit() and int(batch_size) > 0:
            self.batch_size = int(batch_size)
        else:
            raise ValueError(
                f"batch_size must be a positive integer (automatic sizes are not offered), got {batch_size!r}."
            )
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; valid choices: {', '.join(DTYPES)}.")
        self.max_new_tokens = int(max_new_tokens)
        if isinstance(pretrained, PreTrainedModel):
            if processor is None:
                raise ValueError("A loaded model needs its processor: pass processor=... along with it.")
            self.model = pretrained.eval()
        else:
            check_source(pretrained)
            self.model = AutoModelForImageTextToText.from_pretrained(
                pretrained,
                revision=revision,
                dtype=DTYPES[dtype],
                device_map=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                trust_remote_code=trust_remote_code,
            ).eval()
            processor = AutoProcessor.from_pretrained(
                pretrained, revision=revision, trust_remote_code=trust_remote_code
            )
        self.processor = processor
        self._warned_kwargs: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self.model.device

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Each request's answer: its prompt decoded up to the task's `until` strings (cut from the text) or its
        `max_new_tokens`, greedily unless the task's generation kwargs ask for sampling. Requests run in batches of
        `batch_size` in lmms-eval's order, those with the same generation kwargs together."""
        answers: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="Model Responding", unit="request") as progress:
            for gen_kwargs, indices in self._batches(requests):
                prompts = [self._prompt(requests[index]) for index in indices]
                for index, answer in zip(indices, self._generate(prompts, gen_kwargs), strict=True):
                    answers[index] = answer
                progress.update(len(indices))
        return answers

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each request's answers, one per round. Round 0 is the request's own prompt; each later round is the
        prompt that the task builds from the answers so far (lmms-eval's protocol: the task decides what of the
        earlier rounds the next prompt holds), until the task ends the conversation. The rounds of all requests run
        side by side, in batches of `batch_size`."""
        rounds: list[list[str]] = [[] for _ in requests]
        round_info: list[object] = [None] * len(requests)
        prompts = {index: self._prompt(request) for index, request in enumerate(requests)}
        with tqdm(total=len(requests), desc="Model Responding (multi-round)", unit="request") as progress:
            while prompts:
                for gen_kwargs, indices in self._batches(requests, list(prompts)):
                    answers = self._generate([prompts[index] for index in indices], gen_kwargs)
                    for index, answer in zip(indices, answers, strict=True):
                        rounds[index].append(answer)
                following = {}
                for index in prompts:
                    prompt, round_info[index] = self._next_round(requests[index], rounds[index], round_info[index])
                    if prompt is None:
                        progress.update(1)
                    else:
                        following[index] = prompt
                prompts = following
        return rounds

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(the continuation's negative log-likelihood, whether greedy decoding produces it) per request: the
        negated sum of `continuation_logprobs`.

        lmms-eval's API documents a log-probability here, but its multiple-choice scoring (`ConfigurableTask.
        process_results`, and every task of 0.7.3 that scores options) takes the option with the *lowest* value,
        because its own models return their loss (EvolvingLMMs-Lab/lmms-eval#370). The negated sum is what makes
        those tasks pick the most likely option; `continuation_logprobs` gives the log-probabilities themselves.
        """
        return [(-logprob, greedy) for logprob, greedy in self.continuation_logprobs(requests)]

    def continuation_logprobs(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities given the context and images, whether greedy
        decoding from the context produces the continuation) per loglikelihood request, in batches of
        `batch_size`.

        The context is rendered as a user turn by the chat template with its generation prompt; the continuation
        is tokenized on its own and follows it. The probabilities are the model's softmax over its vocabulary, in
        float32, from one left-padded forward pass per batch.
        """
        results = []
        for start in tqdm(range(0, len(requests), self.batch_size), desc="Scoring", unit="batch"):
            results += self._score(
                [self._loglikelihood_inputs(request) for request in requests[start : start + self.batch_size]]
            )
        return results

    def _doc(self, task: str, split: str, doc_id: int) -> dict:
        return self.task_dict[task][split][doc_id]

    def _visuals(self, doc_to_visual: Callable | None, doc: dict) -> list[PIL.Image.Image]:
        return self._images((doc_to_visual(doc) if doc_to_visual is not None else None) or [])

    @staticmethod
    def _images(visuals: list) -> list[PIL.Image.Image]:
        for visual in visuals:
            if not isinstance(visual, PIL.Image.Image):
                raise ValueError(
                    f"VL-Mamba reads images, but the task gives a {type(visual).__name__} ({str(visual)[:80]!r}): "
                    "video and audio tasks are not supported."
                )
        return list(visuals)

    def _gen_kwargs(self, request: Instance) -> dict:
        return request.args[1]

    def _prompt(self, request: Instance) -> Prompt:
        context, _, doc_to_visual, doc_id, task, split = request.args
        return self.context_prompt(context, self._visuals(doc_to_visual, self._doc(task, split, doc_id)))

    def _next_round(self, request: Instance, answers: list[str], info: object) -> tuple[Prompt | None, object]:
        """The next round's prompt from the task's `doc_to_text` (None once the task ends the conversation) and the
        task's round info for the round after. The task may rewrite the answers so far (lmms-eval's protocol)."""
        _, _, _, doc_to_text, doc_id, task, split = request.args
        visuals, text, terminal, rewritten, info = doc_to_text(
            self._doc(task, split, doc_id),
            previous_output=list(answers),
            round_idx=len(answers),
            previous_round_info=info,
        )
        if rewritten is not None:
            answers[:] = rewritten
        return (None if terminal else self.context_prompt(text, self._images(visuals or []))), info

    def context_prompt(self, context: str, images: list) -> Prompt:
        """A text context and its images (see `user_turn`) rendered by the model's chat template."""
        return self.chat_prompt(user_turn(context, images))

    def chat_prompt(self, messages: list[dict]) -> Prompt:
        """lmms-eval chat messages (`lmms_eval.protocol.ChatMessages`: images as `{"type": "image", "url": ...}`
        blocks) rendered by the model's chat template with its generation prompt."""
        conversation, images = [], []
        for message in ChatMessages(messages=messages).messages:
            content = []
            for block in message.content:
                if block.type == "text":
                    content.append({"type": "text", "text": block.text})
                elif block.type == "image":
                    content.append({"type": "image"})
                    images.append(block.url)
                else:
                    raise ValueError(f"VL-Mamba reads text and images, but the task gives a {block.type} block.")
            conversation.append({"role": message.role, "content": content})
        return Prompt(self.processor.apply_chat_template(conversation, add_generation_prompt=True), images)

    def _batches(self, requests: list[Instance], indices: list[int] | None = None) -> Iterator[tuple[dict, list[int]]]:
        """(generation kwargs, indices of up to `batch_size` requests that share them), in request order."""
        groups: dict[str, tuple[dict, list[int]]] = {}
        for index in range(len(requests)) if indices is None else indices:
            gen_kwargs = self._gen_kwargs(requests[index]) or {}
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, (gen_kwargs, []))[1].append(index)
        for gen_kwargs, group in groups.values():
            for start in range(0, len(group), self.batch_size):
                yield gen_kwargs, group[start : start + self.batch_size]

    def _generation_options(self, gen_kwargs: dict) -> dict:
        """`generate` arguments from a task's generation kwargs: greedy unless `do_sample` (or a temperature above
        0 without `do_sample`) asks for sampling; the model's `max_new_tokens` where the task sets none."""
        ignored = set(gen_kwargs) - set(GENERATION_KWARGS) - {"until"} - self._warned_kwargs
        if ignored:
            logger.warning(f"vlmamba ignores the generation kwargs {sorted(ignored)}: it uses {GENERATION_KWARGS}.")
            self._warned_kwargs |= ignored
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0))
        options = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "do_sample": do_sample,
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
        }
        if gen_kwargs.get("repetition_penalty") is not None:
            options["repetition_penalty"] = float(gen_kwargs["repetition_penalty"])
        if do_sample:
            if temperature > 0:
                options["temperature"] = temperature
            for name, cast in (("top_p", float), ("top_k", int)):
                if gen_kwargs.get(name) is not None:
                    options[name] = cast(gen_kwargs[name])
        return options

    def _generate(self, prompts: list[Prompt], gen_kwargs: dict) -> list[str]:
        """One left-padded `generate` call; each answer decoded without special tokens, cut at the first `until`."""
        until = gen_kwargs.get("until") or []
        until = [stop for stop in ([until] if isinstance(until, str) else until) if stop]
        options = self._generation_options(gen_kwargs)
        if until:
            options.update(stop_strings=until, tokenizer=self.processor.tokenizer)
        images = [image for prompt in prompts for image in prompt.images]
        inputs = self.processor(
            images=images or None,
            text=[prompt.text for prompt in prompts],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(self.device)
        with torch.no_grad():
            output = self.model.generate(**inputs, **options)
        answers = self.processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [
            answer[: min([answer.find(stop) for stop in until if stop in answer], default=len(answer))]
            for answer in answers
        ]

    def _loglikelihood_inputs(self, request: Instance) -> tuple[dict, list[int]]:
        """(processor outputs of the request's context prompt, token ids of its continuation)."""
        if len(request.args) == 2:  # lmms-eval's unconditional requests (`acc_mutual_info`): no document, no image
            (context, continuation), images = request.args, []
        else:
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            doc = self._doc(task, split, doc_id)
            continuation = continuation(doc) if callable(continuation) else continuation
            images = self._visuals(doc_to_visual, doc)
        prompt = self.context_prompt(context, images)
        inputs = self.processor(images=prompt.images or None, text=[prompt.text], return_tensors="pt")
        return inputs, self.processor.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def _score(self, batch: list[tuple[dict, list[int]]]) -> list[tuple[float, bool]]:
        """(sum of continuation token log-probabilities, greedy) for each (context inputs, continuation ids)."""
        sequences = [
            torch.cat([inputs["input_ids"][0], torch.tensor(continuation, dtype=torch.long)])
            for inputs, continuation in batch
        ]
        length = max(len(sequence) for sequence in sequences)
        pad_id = self.processor.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, sequence in enumerate(sequences):  # left padding: every sequence ends at the last position
            input_ids[row, length - len(sequence) :] = sequence
            attention_mask[row, length - len(sequence) :] = 1
        pixel_values = [inputs["pixel_values"] for inputs, _ in batch if "pixel_values" in inputs]
        keep = max(len(continuation) for _, continuation in batch) + 1
        with torch.no_grad():
            logits = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask.to(self.device),
                pixel_values=torch.cat(pixel_values).to(self.device) if pixel_values else None,
                logits_to_keep=keep,
                use_cache=False,
            ).logits
        log_probs = logits.float().log_softmax(-1).cpu()
        results = []
        for row, (_, continuation) in enumerate(batch):
            # position keep - 1 is the last token's prediction; those of the continuation come just before it
            predicted = log_probs[row, keep - 1 - len(continuation) : keep - 1]
            target = torch.tensor(continuation, dtype=torch.long)
            logprob = predicted.gather(-1, target[:, None]).sum().item()
            results.append((logprob, bool((predicted.argmax(-1) == target).all())))
        return results


class VLMambaChat(VLMambaSimple):
    """VL-Mamba in lmms-eval's chat mode: requests carry the task's `doc_to_messages` (see the module docstring)."""

    is_simple = False

    def _gen_kwargs(self, request: Instance) -> dict:
        return request.args[2]

    def _prompt(self, request: Instance) -> Prompt:
        _, doc_to_messages, _, doc_id, task, split = request.args
        return self.chat_prompt(doc_to_messages(self._doc(task, split, doc_id)))

    def _next_round(self, request: Instance, answers: list[str], info: object) -> tuple[Prompt | None, object]:
        """The next round's messages from the task's `doc_to_messages` (None once the task ends the conversation,
        or gives no next round) and the task's round info for the round after."""
        _, doc_to_messages, _, doc_id, task, split = request.args
        payload = doc_to_messages(
            self._doc(task, split, doc_id),
            round_idx=len(answers),
            previous_output=list(answers),
            previous_round_info=info,
        )
        if not (isinstance(payload, tuple) and len(payload) == 4):
            return None, info
        messages, terminal, _, info = payload
        return (None if terminal else self.chat_prompt(messages)), info
