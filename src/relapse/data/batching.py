"""Turning texts into token batches, in an order that is a pure function of (seed, step).

Because the batch of step ``s`` depends only on the seed and ``s``, a run resumed from a checkpoint sees
exactly the batches the uninterrupted run would have seen, without saving any sampler state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100


class Example(NamedTuple):
    """One training sequence: token ids and the labels that count (``-100`` where a token does not)."""

    input_ids: list[int]
    labels: list[int]


def tokenize_for_lm(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int
) -> list[Example]:
    """Each text as token ids (with the tokenizer's BOS where it adds one) plus EOS, every token counted."""
    eos = tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        if eos is not None:
            ids.append(eos)
        ids = ids[:max_length]
        out.append(Example(ids, list(ids)))
    return out


def tokenize_answers_only(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], max_length: int
) -> list[Example]:
    """``prompt + " " + answer`` plus EOS, with only the answer tokens and EOS counted in the labels."""
    eos = tokenizer.eos_token_id
    out = []
    for prompt, answer in zip(prompts, answers, strict=True):
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        ids = list(tokenizer(f"{prompt} {answer}")["input_ids"])
        if eos is not None:
            ids.append(eos)
        shared = 0  # tokenizers may merge across the boundary: count the common prefix only
        while shared < min(len(prompt_ids), len(ids) - 1) and prompt_ids[shared] == ids[shared]:
            shared += 1
        ids = ids[:max_length]
        labels = [IGNORE_INDEX] * min(shared, len(ids)) + ids[shared:]
        out.append(Example(ids, labels))
    return out


@dataclass(frozen=True)
class EpochSampler:
    """Indices of the batch for a step: each epoch is a fresh seeded permutation of the examples."""

    num_examples: int
    batch_size: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.num_examples // self.batch_size))

    def indices(self, step: int) -> list[int]:
        epoch, position = divmod(step, self.steps_per_epoch)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.num_examples, generator=generator)
        return order[position * self.batch_size : (position + 1) * self.batch_size].tolist()


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example.input_ids)
        input_ids[row, :length] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, :length] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
