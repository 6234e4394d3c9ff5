"""Batched log-prob scoring: one forward pass per batch feeds every likelihood metric.

For each text we keep, per predicted token (every token after the first), the log-probability the model
gives the true token and the mean and standard deviation of the log-probability under the model's own
next-token distribution (what Min-K%++ normalises by). LOSS, zlib, lowercase, Min-K%, Min-K%++ and
perplexity are then pure functions of these arrays (see :mod:`relapse.metrics.mia`), so a sweep over
MIA variants costs one pass.

Texts are sorted by length so that each batch holds texts of similar length, and padded on the right
with an attention mask. Under causal attention the logits of real tokens do not depend on padding to
their right, so the numbers equal scoring one text at a time (a test checks this to 1e-5).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from relapse.metrics.generation import padding_id

#: Texts longer than this many tokens are cut (the model's own limit applies when it is smaller).
DEFAULT_MAX_TOKENS = 2048


@dataclass(frozen=True)
class TokenScores:
    """Per-token statistics of one text under one model (float64 arrays of equal length)."""

    token_ids: np.ndarray
    logprobs: np.ndarray
    mean_logprob: np.ndarray
    std_logprob: np.ndarray
    #: The model's most likely next token at each position (the argmax of its distribution, first index
    #: on a tie, as ``torch.argmax``): ``top_ids[t] == token_ids[t + 1]`` where the model would have
    #: predicted the true token (TOFU's exact memorisation and extraction strength).
    top_ids: np.ndarray | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.logprobs.shape[0])

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per predicted token (the LOSS attack's statistic)."""
        return float(-self.logprobs.mean()) if self.n_tokens else float("nan")


def model_max_tokens(model: PreTrainedModel, limit: int = DEFAULT_MAX_TOKENS) -> int:
    positions = getattr(model.config, "max_position_embeddings", None)
    return min(limit, int(positions)) if positions else limit


def encode_for_scoring(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_tokens: int
) -> list[list[int]]:
    """Token ids with the tokenizer's special tokens (BOS), cut to ``max_tokens``."""
    return [list(tokenizer(text)["input_ids"])[:max_tokens] for text in texts]


def auto_batch_size(
    model: PreTrainedModel, max_len: int, device: torch.device | None = None, cap: int = 64
) -> int:
    """A batch size whose activations and logits fit a quarter of the free memory.

    Per sequence we count the float32 logits and their softmax (2 x length x vocab) and the hidden
    states of every layer (length x hidden x layers x 6, a generous bound for attention and MLP
    intermediates). On a CPU the free memory comes from ``/proc/meminfo``; on CUDA from the driver.
    Large batches buy little on a CPU, hence the cap.
    """
    device = device or next(model.parameters()).device
    config = model.config
    vocab = int(getattr(config, "vocab_size", 32000))
    hidden = int(getattr(config, "hidden_size", 1024))
    layers = int(getattr(config, "num_hidden_layers", 12))
    per_sequence = 4 * max(1, max_len) * (2 * vocab + 6 * hidden * layers)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = _available_cpu_memory()
    return max(1, min(cap, int(free // 4 // per_sequence)))


def _available_cpu_memory() -> int:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 4 << 30


@torch.no_grad()
def score_token_ids(
    model: PreTrainedModel,
    encoded: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int | None = None,
    progress: bool = False,
    desc: str = "score",
) -> list[TokenScores]:
    """Per-token statistics of each sequence of ids, batched, in the caller's order."""
    if not encoded:
        return []
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    batch_size = batch_size or auto_batch_size(model, len(encoded[order[0]]), device)
    results: list[TokenScores | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=desc, leave=False)
    try:
        for chunk in batches:
            scored = _score_batch(model, [encoded[i] for i in chunk], pad_id, device)
            for i, scores in zip(chunk, scored, strict=True):
                results[i] = scores
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def _score_batch(model, sequences, pad_id, device) -> list[TokenScores]:
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1, :].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    top_ids = logits.argmax(dim=-1)
    del logits
    targets = input_ids[:, 1:]
    token_logprobs = log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    probs = log_probs.exp()
    # Where a probability underflows to 0 its log may be -inf; its term is 0, not nan.
    weighted = torch.where(probs > 0, probs * log_probs, torch.zeros_like(probs))
    mean = weighted.sum(-1)
    del weighted
    # Centred (two-pass) variance: E[x^2] - E[x]^2 cancels badly in float32 when the distribution is
    # near uniform (mean near -log V, small variance).
    centred = (log_probs - mean.unsqueeze(-1)).square()
    variance = torch.where(probs > 0, probs * centred, torch.zeros_like(probs)).sum(-1)
    del centred
    std = variance.clamp(min=0).sqrt()
    del probs, log_probs
    out = []
    for row, ids in enumerate(sequences):
        n = max(0, len(ids) - 1)
        out.append(
            TokenScores(
                token_ids=np.asarray(ids, dtype=np.int64),
                logprobs=token_logprobs[row, :n].double().cpu().numpy(),
                mean_logprob=mean[row, :n].double().cpu().numpy(),
                std_logprob=std[row, :n].double().cpu().numpy(),
                top_ids=top_ids[row, :n].cpu().numpy(),
            )
        )
    return out


def score_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
    desc: str = "score",
) -> list[TokenScores]:
    """Per-token statistics of each text (with the tokenizer's BOS), batched."""
    limit = max_tokens or model_max_tokens(model)
    encoded = encode_for_scoring(tokenizer, texts, limit)
    return score_token_ids(model, encoded, padding_id(tokenizer), batch_size, progress=progress, desc=desc)


def perplexity(scores: Sequence[TokenScores]) -> float:
    """exp of the token-weighted mean NLL over all texts (how corpus perplexity is usually reported)."""
    total = sum(float(-s.logprobs.sum()) for s in scores)
    count = sum(s.n_tokens for s in scores)
    return math.exp(total / count) if count else float("nan")
