"""Tokenizers built offline from a benchmark's own text, for tiny models trained from scratch.

The word-level tokenizer keeps every word whole (memorisation is then fast and a name is one token) yet
decodes back to the exact input text: spaces are carried by a ``▁`` prefix on the following word, and
punctuation and newlines are tokens of their own. The BPE alternative (byte-level) covers any text.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from relapse.errors import ConfigError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
SPACE = "▁"
TOKENIZER_KINDS = ("word", "bpe")


def _word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=True),
            pre_tokenizers.Split(Regex(rf"[^\w{SPACE}]"), behavior="isolated"),
        ]
    )


def build_tokenizer(
    texts: Iterable[str], kind: str = "word", vocab_size: int = 2000
) -> PreTrainedTokenizerFast:
    """Build a tokenizer whose vocabulary covers ``texts``.

    Args:
        texts: every string the model will see (training texts, prompts, answers).
        kind: ``"word"`` (one token per word or punctuation mark) or ``"bpe"`` (byte-level BPE).
        vocab_size: BPE only: the target vocabulary size.
    """
    texts = list(texts)
    if kind == "word":
        pre = _word_pre_tokenizer()
        words = sorted({piece for text in texts for piece, _ in pre.pre_tokenize_str(text)} | {SPACE})
        vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
        tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tokenizer.pre_tokenizer = pre
        tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never", split=True)
    elif kind == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=None))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
    else:
        raise ConfigError(f"unknown tokenizer kind {kind!r}; choose from {', '.join(TOKENIZER_KINDS)}")
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )
