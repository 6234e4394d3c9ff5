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
    width = max(len(ids) for ids in prompts_ids)
    input_ids = torch.full((len(prompts_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompts_ids):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    generated: list[list[int]] = [[] for _ in prompts_ids]
    finished = torch.zeros(len(prompts_ids), dtype=torch.bool, device=device)
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
        next_ids = out.logits[:, -1, :].argmax(dim=-1)
        for row in range(len(prompts_ids)):
            if finished[row]:
                continue
            token = int(next_ids[row])
            if token == eos_id:
                finished[row] = True
                continue
            generated[row].append(token)
            if stop_strings and _cut_at_stop(tokenizer.decode(generated[row]), stop_strings)[1]:
                finished[row] = True
        if bool(finished.all()):
            break
        next_ids = torch.where(finished, torch.full_like(next_ids, pad_id), next_ids)
        step_ids = next_ids[:, None]
        step_positions = step_positions[:, -1:] + 1
        attention_mask = torch.cat([attention_mask, torch.ones_like(step_ids)], dim=1)
    return [
        _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop_strings)[0] for ids in generated
    ]
