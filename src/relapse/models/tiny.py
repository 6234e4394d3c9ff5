"""Tiny Llama models built from scratch on a benchmark, for fast, fully offline experiments.

The default (4 layers, hidden 256, word-level vocabulary of a few hundred words) has about 3.8M
parameters and memorises the default built-in benchmark in minutes on two CPU cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from relapse.data.benchmark import Benchmark
from relapse.data.prompts import qa_text
from relapse.errors import ConfigError
from relapse.models.tokenizer import TOKENIZER_KINDS, build_tokenizer
from relapse.options import option


@dataclass(frozen=True)
class TinyConfig:
    """Architecture of a tiny Llama and of the tokenizer built for it."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 768  # divisible by 32, 64 and 128, the usual quantization group sizes
    max_positions: int = 512
    tie_embeddings: bool = False
    tokenizer: str = field(
        default="word",
        metadata=option("tokenizer for a model built from scratch (default word)", choices=TOKENIZER_KINDS),
    )
    bpe_vocab_size: int = 2000

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.tokenizer not in TOKENIZER_KINDS:
            raise ConfigError(
                f"unknown tokenizer {self.tokenizer!r}; choose from {', '.join(TOKENIZER_KINDS)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def benchmark_corpus(benchmark: Benchmark) -> list[str]:
    """Every string a model may meet on this benchmark: texts, QA in prompt form, few-shot examples."""
    pairs = benchmark.forget_qa + benchmark.retain_qa + benchmark.holdout_qa + benchmark.icl
    texts = benchmark.forget + benchmark.retain + benchmark.holdout + benchmark.general
    return texts + [qa_text(pair) + "\n\n" for pair in pairs]


def build_tiny(
    config: TinyConfig, benchmark: Benchmark, seed: int = 0
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """A freshly initialised tiny Llama and a tokenizer built from ``benchmark``'s text.

    Initialisation is seeded by ``seed`` alone, so the same arguments give the same weights.
    """
    tokenizer = build_tokenizer(benchmark_corpus(benchmark), config.tokenizer, config.bpe_vocab_size)
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=config.max_positions,
        tie_word_embeddings=config.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
