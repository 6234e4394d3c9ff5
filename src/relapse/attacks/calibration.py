"""Calibration shared by the calibrated quantizers (GPTQ, AWQ): activation statistics of every linear
layer of every decoder block, gathered block by block.

The inputs of the first decoder block are captured once for every calibration batch; each block then
sees the outputs of the blocks before it *after* they were quantized, as in GPTQ's sequential procedure.
Per linear layer the statistics are ``H = X^T X / n`` and the mean absolute activation per input channel,
over the non-padding calibration tokens.
"""

from __future__ import annotations

import contextlib
import json
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from relapse.attacks.base import Attack, AttackContext, kept_weights
from relapse.attacks.rtn import QuantScheme
from relapse.errors import ConfigError, DataError
from relapse.models.parts import decoder_linear_weights

DEFAULT_CALIBRATION_SAMPLES = 128
DEFAULT_MAX_LENGTH = 512


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input."""

    hessian: torch.Tensor  # [in, in], X^T X / n
    mean_abs: torch.Tensor  # [in], mean |x| per input channel
    tokens: int


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once the first block's inputs are recorded."""


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks: the longest ``nn.ModuleList`` holding linear layers."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            has_linear = any(isinstance(m, torch.nn.Linear) for m in module[0].modules())
            if has_linear and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ConfigError("found no decoder blocks (an nn.ModuleList of layers) in this model")
    return best


def calibration_batches(tokenizer, texts: list[str], samples: int, max_length: int, batch_size: int = 16):
    """Tokenized calibration texts as padded batches (right padding, with attention masks)."""
    texts = [t for t in texts if t.strip()][:samples]
    if not texts:
        raise ConfigError("calibration text is needed: pass --data (its general.jsonl) or --calibration FILE")
    batches = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_length,
            padding_side="right",
        )
        batches.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return batches


def read_calibration_file(path: str | Path) -> list[str]:
    """Calibration texts from a file: JSONL with a ``text`` field per line, or plain text (one per line).

    Raises :class:`DataError` naming the file (and line) when it cannot be read.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read calibration text ({exc})") from None
    texts = []
    jsonl = path.suffix == ".jsonl"
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if not jsonl:
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path} line {lineno}: expected an object with a string field 'text'")
        texts.append(record["text"])
    if not texts:
        raise DataError(f"{path}: no calibration text in the file")
    return texts


QuantizeFn = Callable[[torch.Tensor, LayerStats, str], torch.Tensor]


@torch.no_grad()
def quantize_sequentially(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], quantize_fn: QuantizeFn
) -> list[str]:
    """Replace every decoder linear weight by ``quantize_fn(weight, stats, name)``, block by block."""
    blocks = decoder_blocks(model)
    names = {id(p): n for n, p in decoder_linear_weights(model).items()}
    device = next(model.parameters()).device  # batches are tokenized on the CPU
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    captured: list[tuple[tuple, dict]] = []

    def capture(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            with contextlib.suppress(_Captured):
                model(**batch, use_cache=False)
    finally:
        handle.remove()
    masks = [batch["attention_mask"].bool() for batch in batches]
    inputs = [args[0] if args else kwargs["hidden_states"] for args, kwargs in captured]
    quantized = []
    for block in blocks:
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        stats = _block_statistics(block, linears, inputs, captured, masks)
        for module in linears:
            name = names.get(id(module.weight), "weight")
            module.weight.copy_(quantize_fn(module.weight, stats[id(module)], name))
            quantized.append(name)
        inputs = [
            _first(block(hidden, *args[1:], **_without_hidden(kwargs)))
            for hidden, (args, kwargs) in zip(inputs, captured, strict=True)
        ]
    return quantized


def _block_statistics(block, linears, inputs, captured, masks) -> dict[int, LayerStats]:
    sums = {id(m): torch.zeros(m.in_features, m.in_features, device=m.weight.device) for m in linears}
    abs_sums = {id(m): torch.zeros(m.in_features, device=m.weight.device) for m in linears}
    counts = {id(m): 0 for m in linears}
    current_mask: list[torch.Tensor] = []

    def accumulate(module, args, output):
        x = args[0][current_mask[0]].float()  # [tokens, in] of non-padding positions
        sums[id(module)] += x.T @ x
        abs_sums[id(module)] += x.abs().sum(dim=0)
        counts[id(module)] += x.shape[0]

    hooks = [m.register_forward_hook(accumulate) for m in linears]
    try:
        for hidden, (args, kwargs), mask in zip(inputs, captured, masks, strict=True):
            current_mask[:] = [mask]
            block(hidden, *args[1:], **_without_hidden(kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    return {
        key: LayerStats(sums[key] / max(counts[key], 1), abs_sums[key] / max(counts[key], 1), counts[key])
        for key in sums
    }


def _without_hidden(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "hidden_states"}


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class CalibratedAttack(Attack):
    """A quantizer of the decoder's linear layers that needs calibration activations."""

    kind = "quantization"
    scheme: QuantScheme

    def touched(self, model, context):
        return decoder_linear_weights(model)

    @abstractmethod
    def quantize_layer(self, weight: torch.Tensor, stats: LayerStats, name: str) -> torch.Tensor:
        """The quantized (dequantized) weight of one linear layer."""

    def settings(self) -> dict[str, Any]:
        """Extra settings for the record."""
        return {}

    def apply(self, model: torch.nn.Module, context: AttackContext) -> dict[str, Any]:
        if context.include_embeddings or context.include_lm_head:
            raise ConfigError(f"{self.name} quantizes the decoder's linear layers only")
        texts = context.calibration_texts
        if not texts and context.benchmark is not None:
            texts = context.benchmark.general
        batches = calibration_batches(
            context.tokenizer, texts, DEFAULT_CALIBRATION_SAMPLES, DEFAULT_MAX_LENGTH
        )
        was_training = model.training
        model.eval()
        try:
            quantized = quantize_sequentially(model, batches, self.quantize_layer)
        finally:
            model.train(was_training)
        return {
            "scheme": self.name,
            "quantized": sorted(quantized),
            "kept": kept_weights(model, quantized),
            "calibration_texts": min(len(texts), DEFAULT_CALIBRATION_SAMPLES),
            **self.settings(),
        }
