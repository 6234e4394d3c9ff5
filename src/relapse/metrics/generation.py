"""Batched greedy generation with left padding and the KV cache.

Prompts are sorted by length so that a batch holds prompts of similar length (little padding), every
batch stops as soon as each of its sequences produced EOS or a stop string, and results are returned in
the caller's order. Under float32 the generated tokens equal one-prompt-at-a-time greedy decoding (a test
checks this against a plain reference loop).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from functools import cache

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@cache
def _cache_argument(model_class: type) -> str:
    """The keyword a model's forward takes its KV cache by (transformers 5: ``cache``)."""
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@cache
def _last_logits_only(model_class: type) -> dict[str, int]:
    """The forward keyword that computes the logits of the last position alone, where the model has one
    (generation reads no other; over a prompt the LM head would otherwise run at every position)."""
    parameters = inspect.signature(model_class.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    cut = len(text)
    for stop in stop_strings:
        index = text.find(stop)
        if index != -1:
            cut = min(cut, index)
    return text[:cut], cut < len(text)


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id to pad batches with: the tokenizer's pad token, else its EOS (never attended to)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad or 0


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 64,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, cut at the first stop string or EOS)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]), reverse=True)
    pad_id = padding_id(tokenizer)
    eos_id = tokenizer.eos_token_id
    results: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            texts = _generate_batch(
                model,
                tokenizer,
                [encoded[i] for i in chunk],
                max_new_tokens,
                pad_id,
                eos_id,
                stop_strings,
                device,
            )
            for i, text in zip(chunk, texts, strict=True):
                results[i] = text
    finally:
        model.train(was_training)
    return results


def _generate_batch(model, tokenizer, prompts_ids, max_new_tokens, pad_id, eos_id, stop_strings, device):
    """Greedy decoding of one batch. A row that ends (EOS or a stop string) leaves the batch at once: its
    KV cache is dropped and later steps compute only the rows still going, so a batch costs what its
    rows need rather than what its longest row needs. Stop strings are looked for in the last few
    tokens' text only (decoding the whole continuation at every step grew quadratically)."""
    width = max(len(ids) for ids in prompts_ids)
    input_ids = torch.full((len(prompts_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompts_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generated: list[list[int]] = [[] for _ in prompts_ids]
    rows: list[int | None] = list(range(len(prompts_ids)))  # each batch position's original row
    # Enough tokens to hold any stop string (every token is at least one character), and two more.
    tail = max((len(stop) for stop in stop_strings), default=0) + 2
    past = None
    cache_kw = _cache_argument(type(model))
    last_only = _last_logits_only(type(model))
    step_ids, step_positions = input_ids, position_ids
    for _ in range(max_new_tokens):
        out = model(
            input_ids=step_ids,
            attention_mask=attention_mask,
            position_ids=step_positions,
            use_cache=True,
            **{cache_kw: past},
            **last_only,
        )
        past = out[cache_kw]
        next_ids = out.logits[:, -1, :].argmax(dim=-1).tolist()
        going = []
        for position, (row, token) in enumerate(zip(rows, next_ids, strict=True)):
            if row is None or token == eos_id:  # None: ended earlier, in a cache that keeps its rows
                continue
            generated[row].append(token)
            if stop_strings and _cut_at_stop(tokenizer.decode(generated[row][-tail:]), stop_strings)[1]:
                continue
            going.append(position)
        if not going:
            break
        if len(going) < sum(row is not None for row in rows):
            if hasattr(past, "batch_select_indices"):
                keep = torch.tensor(going, device=device)
                past.batch_select_indices(keep)
                attention_mask, step_positions = attention_mask[keep], step_positions[keep]
                rows, next_ids = [rows[p] for p in going], [next_ids[p] for p in going]
            else:  # a cache that cannot drop rows: ended rows stay, fed padding
                kept = set(going)
                rows = [row if p in kept else None for p, row in enumerate(rows)]
                next_ids = [token if p in kept else pad_id for p, token in enumerate(next_ids)]
        step_ids = torch.tensor(next_ids, dtype=torch.long, device=device)[:, None]
        step_positions = step_positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
    return [
        _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)[0] for ids in generated
    ]
