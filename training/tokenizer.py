"""Small tokenizers trained offline, for tiny models (tests, the demo) where none can be downloaded."""

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPTNeoXTokenizer

from modeling_vlmamba.processing_vlmamba import EOS_TOKEN, IMAGE_TOKEN, PAD_TOKEN


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with `special_tokens` first (ids 0, 1, ...)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    return bpe


def train_gpt_neox_tokenizer(
    texts: Iterable[str], vocab_size: int = 320, image_token: bool = True
) -> GPTNeoXTokenizer:
    """Train a byte-level BPE on `texts` and wrap it in transformers' `GPTNeoXTokenizer`.

    The result has the GPT-NeoX special tokens (`<|endoftext|>` id 0, `<|padding|>` id 1), `<image>` as one added
    special token (unless `image_token=False`, like the real GPT-NeoX tokenizer), and left padding for batched
    generation: the same code paths as the tokenizer of `state-spaces/mamba-*-hf`.
    """
    bpe = train_byte_level_bpe(texts, vocab_size, [EOS_TOKEN, PAD_TOKEN])
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = GPTNeoXTokenizer(vocab=bpe.get_vocab(), merges=merges, padding_side="left")
    if image_token:
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return tokenizer
