"""Composing from each language model family (Mamba, FalconMamba, Mamba-2) with the LLM's own tokenizer: the
vocabulary grows for `<image>` and a pad token where the tokenizer fills it, the chat template and the end of turn
come from the tokenizer, training labels follow the derived template, and a mislabelled or foreign LLM is refused."""

import contextlib
import io
import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import decoders
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoProcessor,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from modeling_vlmamba import DEFAULT_CHAT_TEMPLATE, VLMambaForConditionalGeneration, VLMambaProcessor
from modeling_vlmamba.processing_vlmamba import chat_template_for, derived_chat_template, zephyr_chat_template
from tests.conftest import make_image
from tests.reference_mamba2 import mamba2_lm_forward, raw_mamba2_config, write_mamba2_ssm_checkpoint
from vlmamba.conversion.checkpoint import ConversionError
from vlmamba.conversion.compose import ADDED_PAD_TOKEN, compose, prepare_tokenizer
from vlmamba.conversion.hub_folder import save_folder
from vlmamba.training.data import DataError, VisionCollator, read_llava_json
from vlmamba.training.tiny import SAMPLE_TEXT, tiny_config, tiny_model
from vlmamba.training.tokenizer import train_byte_level_bpe, train_gpt_neox_tokenizer

ATOL = 1e-5
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}
VISION |= {"image_size": 16, "patch_size": 4}
# The tiny LLMs of each family; every one gets a tokenizer that fills its vocabulary exactly, as Falcon's fills
# FalconMamba's 65024 rows, so that `<image>` and a pad token make it grow.
LLMS = {
    "mamba": {"model_type": "mamba", "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8},
    "falcon_mamba": {
        "model_type": "falcon_mamba",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "state_size": 8,
        "tie_word_embeddings": False,
    },
    "mamba2": {
        "model_type": "mamba2",
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "state_size": 8,
        "head_dim": 16,
        "num_heads": 4,
        "n_groups": 1,
        "chunk_size": 8,
    },
}
# Falcon3-Mamba-Instruct style: ChatML turns, EOS `<|endoftext|>` at a non-zero id, no pad token.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
FALCON_SPECIAL_TOKENS = [">>TITLE<<", ">>ABSTRACT<<", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def falcon_like_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
    """A byte-level BPE like Falcon's: EOS `<|endoftext|>` (id 2), ChatML's `<|im_start|>` / `<|im_end|>`, no pad."""
    bpe = train_byte_level_bpe(SAMPLE_TEXT, 300, FALCON_SPECIAL_TOKENS)
    bpe.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", chat_template=chat_template)


def write_llm(folder, backbone: str, tokenizer, vocab_size: int | None = None) -> None:
    """A random `backbone` LLM with `tokenizer`, as the Hub has them; its vocabulary is the tokenizer's unless
    `vocab_size` is given."""
    token_ids = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), tokenizer.eos_token_id)
    config = AutoConfig.for_model(**LLMS[backbone], vocab_size=vocab_size or len(tokenizer), **token_ids)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def rewrite_config(folder, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


@pytest.fixture(scope="module")
def siglip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("siglip")
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(**VISION)).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def compose_backbone(backbone: str, siglip: Path, root: Path) -> tuple[str, Path, Path, str]:
    """(backbone, source LLM folder, composed VL-Mamba folder, what compose printed) for a `backbone` LLM with the
    Falcon-like tokenizer."""
    write_llm(root / "llm", backbone, falcon_like_tokenizer())
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out = compose(siglip, root / "llm", root / "vlm", projector_type="mlp")
    return backbone, root / "llm", out, printed.getvalue()


@pytest.fixture(scope="module", params=list(LLMS))
def composed(request, siglip, tmp_path_factory):
    return compose_backbone(request.param, siglip, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def falcon(siglip, tmp_path_factory):
    """A FalconMamba VL-Mamba with the ChatML tokenizer (the template and tokens are the same for every backbone)."""
    return compose_backbone("falcon_mamba", siglip, tmp_path_factory.mktemp("falcon"))


# ---------------------------------------------------------------- each backbone composes to its own function


def test_each_backbone_composes_to_its_llms_function(composed):
    backbone, llm_dir, out, _ = composed
    model = VLMambaForConditionalGeneration.from_pretrained(out).eval()
    source = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    assert model.config.text_config.model_type == source.config.model_type == backbone
    assert type(model.config.text_config) is type(source.config)
    ids = torch.randint(0, source.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits[..., : source.config.vocab_size], source(ids).logits, rtol=0, atol=ATOL)


def test_a_raw_mamba2_checkpoint_composes_to_its_function(siglip, tmp_path):
    """A mamba_ssm Mamba-2 folder (state-spaces/mamba2-*) is converted on the way and verified as a Mamba2."""
    tokenizer = train_gpt_neox_tokenizer(SAMPLE_TEXT, image_token=False)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    raw = raw_mamba2_config(vocab_size=len(tokenizer))
    state = write_mamba2_ssm_checkpoint(tmp_path / "raw", raw)
    out = compose(siglip, tmp_path / "raw", tmp_path / "vlm", tokenizer=tmp_path / "tokenizer", projector_type="mlp")
    model = VLMambaForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.text_config.model_type == "mamba2"
    ids = torch.randint(0, raw["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[..., : state["backbone.embedding.weight"].shape[0]]
    torch.testing.assert_close(logits, mamba2_lm_forward(state, raw, ids).float(), rtol=0, atol=ATOL)


def test_the_vocabulary_grows_by_the_added_tokens_with_mean_rows(composed, tmp_path):
    backbone, llm_dir, out, printed = composed
    source = AutoModelForCausalLM.from_pretrained(llm_dir)
    model = VLMambaForConditionalGeneration.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    rows = source.config.vocab_size
    added = [processor.tokenizer.convert_ids_to_tokens(index) for index in range(rows, len(processor.tokenizer))]
    assert added == ["<image>", ADDED_PAD_TOKEN]  # the tokenizer filled the LLM's vocabulary, as Falcon's does
    text_config = model.config.text_config
    assert (text_config.vocab_size, text_config.source_vocab_size) == (rows + 2, rows)
    assert json.loads((out / "config.json").read_text())["text_config"]["source_vocab_size"] == rows

    embeddings = model.get_input_embeddings().weight
    source_embeddings = source.get_input_embeddings().weight
    assert embeddings.shape == (rows + 2, source.config.hidden_size)
    torch.testing.assert_close(embeddings[:rows], source_embeddings, rtol=0, atol=0)
    for row in embeddings[rows:]:
        torch.testing.assert_close(row, source_embeddings.mean(dim=0), rtol=0, atol=1e-7)
    tied = backbone == "mamba"  # MambaConfig ties by default; the FalconMamba and Mamba-2 here do not
    assert model.config.tie_word_embeddings is tied
    assert (model.lm_head.weight.data_ptr() == embeddings.data_ptr()) is tied
    if not tied:
        source_head = source.lm_head.weight
        assert model.lm_head.weight.shape == (rows + 2, source.config.hidden_size)
        torch.testing.assert_close(model.lm_head.weight[:rows], source_head, rtol=0, atol=0)
        for row in model.lm_head.weight[rows:]:
            torch.testing.assert_close(row, source_head.mean(dim=0), rtol=0, atol=1e-7)
    assert f"grows to {rows + 2} rows" in printed and f"source_vocab_size={rows}" in printed
    assert ("and of lm_head" in printed) is not tied

    model.save_pretrained(tmp_path / "again")  # as training saves it: the grown model stays what it is
    again = VLMambaForConditionalGeneration.from_pretrained(tmp_path / "again")
    assert (again.config.text_config.vocab_size, again.config.text_config.source_vocab_size) == (rows + 2, rows)
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


# ---------------------------------------------------------------- the tokenizer decides padding, template and stops


def test_generation_stops_at_the_chat_templates_end_of_turn(falcon):
    _, _, out, _ = falcon
    processor = AutoProcessor.from_pretrained(out)
    tokenizer = processor.tokenizer
    generation = json.loads((out / "generation_config.json").read_text())
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation["eos_token_id"] == [tokenizer.eos_token_id, end_of_turn] == processor.stop_token_ids()
    assert generation["pad_token_id"] == tokenizer.convert_tokens_to_ids(ADDED_PAD_TOKEN)
    assert tokenizer.eos_token_id == 2 and tokenizer.padding_side == "left"


def test_a_gpt_neox_mamba_stops_at_eos_and_pads_on_the_left_without_growing(siglip, tmp_path):
    """GPT-NeoX in Mamba's padded vocabulary (50277 tokens in 50280 rows): <image> fits, the Zephyr default ends a
    turn with EOS, and the saved tokenizer pads on the left although the Hub's says nothing of it."""
    tokenizer = train_gpt_neox_tokenizer(SAMPLE_TEXT, image_token=False)
    tokenizer.init_kwargs.pop("padding_side")  # as EleutherAI/gpt-neox-20b's: it pads on the right
    tokenizer.padding_side = "right"
    write_llm(tmp_path / "llm", "mamba", tokenizer, vocab_size=328)
    out = compose(siglip, tmp_path / "llm", tmp_path / "vlm")
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (0, 1)
    text_config = VLMambaForConditionalGeneration.from_pretrained(out).config.text_config
    assert text_config.vocab_size == 328 and not hasattr(text_config, "source_vocab_size")
    processor = AutoProcessor.from_pretrained(out)
    assert processor.chat_template == DEFAULT_CHAT_TEMPLATE and processor.tokenizer.padding_side == "left"


def test_the_pad_token_is_the_tokenizers_then_gpt_neoxs_then_added():
    falcon = prepare_tokenizer(falcon_like_tokenizer())
    assert falcon.pad_token == ADDED_PAD_TOKEN and falcon.pad_token_id == len(falcon) - 1
    assert falcon.padding_side == "left" and len(falcon.encode("<image>", add_special_tokens=False)) == 1
    own = falcon_like_tokenizer()
    own.pad_token = ">>TITLE<<"  # a pad token of its own, other than EOS: kept
    assert prepare_tokenizer(own).pad_token == ">>TITLE<<" and len(own) == 301
    same_as_eos = train_gpt_neox_tokenizer(SAMPLE_TEXT)
    same_as_eos.pad_token = same_as_eos.eos_token
    assert prepare_tokenizer(same_as_eos).pad_token == "<|padding|>"


def test_a_chatml_template_is_made_multimodal(falcon):
    _, llm_dir, out, _ = falcon
    processor = AutoProcessor.from_pretrained(out)
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red."}]},
        {
            "role": "user",
            "content": [{"type": "text", "text": "And "}, {"type": "image"}, {"type": "text", "text": "?"}],
        },
    ]
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>What colour?<|im_end|>\n"
        "<|im_start|>assistant\nRed.<|im_end|>\n"
        "<|im_start|>user\nAnd <image>?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    text_only = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    source_tokenizer = PreTrainedTokenizerFast.from_pretrained(llm_dir)
    for prompt in (True, False):  # string contents render exactly as the LLM's own template renders them
        expected = source_tokenizer.apply_chat_template(text_only, tokenize=False, add_generation_prompt=prompt)
        assert processor.apply_chat_template(text_only, add_generation_prompt=prompt) == expected

    conversation[1]["content"][0]["image"] = make_image()
    conversation[3]["content"][1]["image"] = make_image(color=(0, 200, 0))
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (inputs["input_ids"] == image_token_id).sum() == 2 * processor.image_seq_length
    assert inputs["pixel_values"].shape == (2, 3, 16, 16)
    model = VLMambaForConditionalGeneration.from_pretrained(out)
    assert model(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_the_gpt_neox_default_template_is_unchanged_and_ends_turns_with_eos():
    gpt_neox = train_gpt_neox_tokenizer(SAMPLE_TEXT)
    assert chat_template_for(gpt_neox) == zephyr_chat_template("<|endoftext|>") == DEFAULT_CHAT_TEMPLATE
    other_eos = falcon_like_tokenizer(chat_template=None)
    other_eos.eos_token = ">>ABSTRACT<<"  # no chat template, another EOS: the Zephyr format ends turns with it
    other_eos.add_tokens(["<image>"], special_tokens=True)
    processor = VLMambaProcessor(SiglipImageProcessorPil(size={"height": 16, "width": 16}), other_eos, patch_size=4)
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert (
        processor.apply_chat_template(conversation) == "<|user|>\nHi>>ABSTRACT<<\n<|assistant|>\nHello.>>ABSTRACT<<\n"
    )
    assert processor.stop_token_ids() == [other_eos.eos_token_id]


# ---------------------------------------------------------------- training on the derived template


@pytest.fixture
def chatml_processor(falcon):
    return AutoProcessor.from_pretrained(falcon[2])


def write_records(folder, records) -> list:
    make_image().save(folder / "scene.png")
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def labelled_text(processor, batch, row: int) -> tuple[str, list[str]]:
    """The row's text without padding, and the texts of its labelled runs of tokens."""
    keep = batch["attention_mask"][row].bool()
    ids, labels = batch["input_ids"][row][keep].tolist(), batch["labels"][row][keep].tolist()
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != -100:
            current.append(token)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    text = processor.tokenizer.decode(ids).replace("<image>" * processor.image_seq_length, "<image>")
    return text, [processor.tokenizer.decode(run) for run in runs]


def test_stage_2_labels_cover_exactly_the_assistant_turns_of_the_derived_template(chatml_processor, tmp_path):
    record = {
        "id": "two-turns",
        "image": "scene.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Shape?"},
            {"from": "gpt", "value": "a circle"},
        ],
    }
    text_only = {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "4"}]}
    rows = read_llava_json(write_records(tmp_path, [record, text_only]))
    batch = VisionCollator(chatml_processor, stage=2)([rows[0], rows[1]])
    text, labelled = labelled_text(chatml_processor, batch, 0)
    assert text == (
        "<|im_start|>user\n<image>What colour is it?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n"
        "<|im_start|>user\nShape?<|im_end|>\n<|im_start|>assistant\na circle<|im_end|>\n"
    )
    assert labelled == ["red<|im_end|>\n", "a circle<|im_end|>\n"]
    assert labelled_text(chatml_processor, batch, 1)[1] == ["4<|im_end|>\n"]


def test_stage_1_captions_end_with_the_tokenizers_eos(chatml_processor, tmp_path):
    chatml_processor.tokenizer.eos_token = "<|im_end|>"  # as ChatML tokenizers that end every text with it
    record = {
        "id": "caption",
        "image": "scene.png",
        "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": "A red square."}],
    }
    rows = read_llava_json(write_records(tmp_path, [record]), stage=1)
    batch = VisionCollator(chatml_processor, stage=1)([rows[0]])
    assert labelled_text(chatml_processor, batch, 0) == ("<image>A red square.<|im_end|>", ["A red square.<|im_end|>"])


def test_a_template_that_marks_no_assistant_tokens_is_refused_for_stage_2(chatml_processor):
    unmarked = VLMambaProcessor(
        chatml_processor.image_processor, chatml_processor.tokenizer, patch_size=4, chat_template=CHATML_TEMPLATE
    )
    with pytest.raises(DataError, match="chat template marks no assistant tokens, so stage 2"):
        VisionCollator(unmarked, stage=2)
    VisionCollator(unmarked, stage=1)  # stage 1 labels its completions, not chat turns


def test_a_template_whose_assistant_turns_hold_no_stop_token_is_refused_for_stage_2(chatml_processor):
    """Turns ended by plain text (a newline, or an end-of-turn marker that is not a special token) would train a
    model that never learns to stop."""
    plain = (
        "{% for message in messages %}{{ '### ' + message['role'] + ': ' + message['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant: ' }}{% endif %}"
    )
    for template in (plain, CHATML_TEMPLATE.replace("<|im_end|>", "<end>")):
        processor = VLMambaProcessor(
            chatml_processor.image_processor,
            chatml_processor.tokenizer,
            patch_size=4,
            chat_template=derived_chat_template(template),
        )
        with pytest.raises(DataError, match="holds none of the tokens generation stops on"):
            VisionCollator(processor, stage=2)
    VisionCollator(chatml_processor, stage=2)  # <|im_end|> is a special token: its turns end in a stop token


def test_a_template_that_marks_only_the_last_assistant_turn_is_warned_about(chatml_processor, caplog):
    """A template that renders an earlier assistant turn differently once it is not the last (as reasoning templates
    drop the reasoning) leaves those turns unmarked: training goes on, with a warning."""
    earlier = "(' [earlier]' if message['role'] == 'assistant' and not loop.last else '')"
    turn_end = "message['content'] + '<|im_end|>'"
    last_only = CHATML_TEMPLATE.replace(turn_end, f"message['content'] + {earlier} + '<|im_end|>'")
    processor = VLMambaProcessor(
        chatml_processor.image_processor,
        chatml_processor.tokenizer,
        patch_size=4,
        chat_template=derived_chat_template(last_only),
    )
    with caplog.at_level(logging.WARNING):
        VisionCollator(processor, stage=2)
    assert "marks 1 of the 2 assistant turns" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        VisionCollator(chatml_processor, stage=2)
    assert "assistant turns of a two-turn conversation" not in caplog.text


def test_a_model_that_could_never_stop_is_not_saved(siglip, tmp_path):
    tokenizer = falcon_like_tokenizer(chat_template=None)
    tokenizer.eos_token = None
    processor = VLMambaProcessor(
        SiglipImageProcessorPil(size={"height": 16, "width": 16}),
        prepare_tokenizer(tokenizer),
        patch_size=4,
        chat_template="{% for message in messages %}{{ message['content'] + '\\n' }}{% endfor %}",
    )
    config = tiny_config(processor.tokenizer, text={"vocab_size": len(processor.tokenizer)})
    with pytest.raises(ValueError, match="Generation would never stop"):
        save_folder(tiny_model(config), tmp_path / "out", processor)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- what compose refuses


def falcon_norms(folder) -> None:
    """Add FalconMamba's B/C/dt norm buffers to the folder's weights, as a checkpoint that saved them holds."""
    weights = load_file(folder / "model.safetensors")
    weights |= {f"backbone.layers.0.mixer.{name}_layernorm.weight": torch.ones(8) for name in ("b", "c")}
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("backbone", "claimed", "tamper", "message"),
    [
        ("falcon_mamba", "mamba", None, r"config.json: .*model_type='mamba'.* mixer_rms_eps"),
        ("mamba2", "mamba", None, r"config.json: .*model_type='mamba'.* head_dim, n_groups, num_heads"),
        ("mamba2", "falcon_mamba", None, r"config.json: .*model_type='falcon_mamba'.* head_dim, n_groups, num_heads"),
        ("mamba", "mamba", falcon_norms, "says model_type='mamba' but its weights hold FalconMamba's B/C/dt norms"),
    ],
)
def test_a_mislabelled_llm_is_refused(siglip, tmp_path, backbone, claimed, tamper, message):
    write_llm(tmp_path / "llm", backbone, falcon_like_tokenizer())
    rewrite_config(tmp_path / "llm", model_type=claimed)
    if tamper is not None:
        tamper(tmp_path / "llm")
    with pytest.raises(ConversionError, match=message):
        compose(siglip, tmp_path / "llm", tmp_path / "vlm")
    assert not (tmp_path / "vlm").exists()


def test_another_llms_tokenizer_is_refused_not_grown_into(siglip, tmp_path):
    """Growing is for `<image>` and a pad token only: a tokenizer already larger than the LLM's vocabulary is another
    LLM's (its ids would mean other tokens), whatever number of mean rows it would take."""
    write_llm(tmp_path / "llm", "falcon_mamba", falcon_like_tokenizer(), vocab_size=280)
    with pytest.raises(ConversionError, match="has 300 tokens, more than the LLM's vocabulary of 280: it is not"):
        compose(siglip, tmp_path / "llm", tmp_path / "vlm", projector_type="mlp")
    assert not (tmp_path / "vlm").exists()


def test_an_llm_of_another_family_is_refused_naming_the_three(siglip, tmp_path):
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    with pytest.raises(ConversionError, match=r"holds a 'llama' model; the LLM must be a transformers mamba, "):
        compose(siglip, tmp_path / "llama", tmp_path / "vlm")
    with pytest.raises(ConversionError, match="mamba, falcon_mamba, mamba2 model, or a raw mamba_ssm one"):
        compose(siglip, tmp_path / "llama", tmp_path / "vlm")
    assert not (tmp_path / "vlm").exists()
