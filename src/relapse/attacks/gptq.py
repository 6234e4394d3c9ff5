"""GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323): quantize weights column by column, moving each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction error on calibration activations.

Implementation notes (our own code, following the paper's algorithm):

- Decoder blocks are processed in order. The inputs of the first block are captured once for every
  calibration batch; each block then sees the outputs of the already-quantized blocks before it, as in
  the paper's sequential procedure.
- Per linear layer, ``H = X^T X / n`` over the non-padding calibration tokens; columns that never see a
  non-zero input are zeroed; ``H`` is damped by ``damp * mean(diag H)``; the upper Cholesky factor of
  ``H^-1`` drives blocked "lazy batch" updates (``block_size`` columns at a time).
- Grid parameters come from :mod:`relapse.attacks.rtn` (same asymmetric/symmetric grids), computed per
  output row, or per group of ``group_size`` columns when the first column of the group is reached.
- ``act_order`` processes columns by decreasing ``diag(H)``; groups then follow that order.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from relapse.attacks.base import Attack, AttackContext
from relapse.attacks.rtn import QuantScheme, grid_params, to_codes
from relapse.errors import ConfigError
from relapse.models.parts import decoder_linear_weights

DEFAULT_CALIBRATION_SAMPLES = 128
DEFAULT_MAX_LENGTH = 512


class _Captured(Exception):
    """Raised by a hook to stop a forward pass once the first block's inputs are recorded."""


def gptq_quantize_matrix(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    where: str = "weight",
) -> torch.Tensor:
    """The GPTQ-quantized (dequantized) version of ``weight`` ``[out, in]`` given ``H`` ``[in, in]``."""
    cols = weight.shape[1]
    group = scheme.group_size
    if group is not None and cols % group:
        raise ConfigError(f"{where}: input dimension {cols} is not divisible by group size {group}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    try:
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise ConfigError(
            f"{where}: the calibration Hessian is not positive definite; raise damping"
        ) from None
    Q = torch.zeros_like(W)
    if group is None:
        scale, zero = grid_params(W, scheme)  # one grid per output row
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        W1 = W[:, start:end].clone()
        Q1 = torch.zeros_like(W1)
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if group is not None and column % group == 0:
                scale, zero = grid_params(W[:, column : column + group], scheme)
            w = W1[:, i : i + 1]
            q = (to_codes(w, scale, zero, scheme) - zero) * scale
            Q1[:, i : i + 1] = q
            error = (w - q) / Hinv1[i, i]
            W1[:, i:] -= error @ Hinv1[i : i + 1, i:]
            E1[:, i : i + 1] = error
        Q[:, start:end] = Q1
        W[:, end:] -= E1 @ Hinv[start:end, end:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(weight.dtype)


def decoder_blocks(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's list of decoder blocks: the longest ``nn.ModuleList`` holding linear layers."""
    best = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            has_linear = any(isinstance(m, torch.nn.Linear) for m in module[0].modules())
            if has_linear and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ConfigError("GPTQ found no decoder blocks (an nn.ModuleList of layers) in this model")
    return best


def calibration_batches(tokenizer, texts: list[str], samples: int, max_length: int, batch_size: int = 16):
    """Tokenized calibration texts as padded batches (right padding, with attention masks)."""
    texts = [t for t in texts if t.strip()][:samples]
    if not texts:
        raise ConfigError("GPTQ needs calibration text: the benchmark's general.jsonl, or --calibration FILE")
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


@torch.no_grad()
def gptq_quantize_model(
    model: torch.nn.Module,
    batches: list[dict[str, torch.Tensor]],
    scheme: QuantScheme,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> list[str]:
    """Quantize every linear layer of every decoder block in place; returns the quantized names."""
    blocks = decoder_blocks(model)
    names = {id(p): n for n, p in decoder_linear_weights(model).items()}
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
        hessians = _block_hessians(block, linears, inputs, captured, masks)
        for module in linears:
            name = names.get(id(module.weight), "weight")
            hessian = hessians[id(module)]
            module.weight.copy_(
                gptq_quantize_matrix(module.weight, hessian, scheme, damp, block_size, act_order, name)
            )
            quantized.append(name)
        inputs = [
            _first(block(hidden, *args[1:], **_without_hidden(kwargs)))
            for hidden, (args, kwargs) in zip(inputs, captured, strict=True)
        ]
    return quantized


def _block_hessians(block, linears, inputs, captured, masks) -> dict[int, torch.Tensor]:
    """``X^T X / n`` of every linear layer's inputs over the non-padding calibration tokens."""
    sums = {id(m): torch.zeros(m.in_features, m.in_features) for m in linears}
    counts = {id(m): 0 for m in linears}
    current_mask: list[torch.Tensor] = []

    def accumulate(module, args, output):
        x = args[0][current_mask[0]].float()  # [tokens, in] of non-padding positions
        sums[id(module)] += x.T @ x
        counts[id(module)] += x.shape[0]

    hooks = [m.register_forward_hook(accumulate) for m in linears]
    try:
        for hidden, (args, kwargs), mask in zip(inputs, captured, masks, strict=True):
            current_mask[:] = [mask]
            block(hidden, *args[1:], **_without_hidden(kwargs))
    finally:
        for hook in hooks:
            hook.remove()
    return {key: sums[key] / max(counts[key], 1) for key in sums}


def _without_hidden(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k != "hidden_states"}


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class GPTQAttack(Attack):
    """GPTQ quantization of the decoder's linear layers (calibrated on general text)."""

    kind = "quantization"

    def __init__(self, scheme: QuantScheme, act_order: bool = False, damp: float = 0.01) -> None:
        self.scheme, self.act_order, self.damp = scheme, act_order, damp
        self.name = scheme.name.replace("rtn-", "gptq-", 1) + ("-act" if act_order else "")

    def touched(self, model, context):
        return decoder_linear_weights(model)

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
            quantized = gptq_quantize_model(model, batches, self.scheme, self.damp, act_order=self.act_order)
        finally:
            model.train(was_training)
        return {
            "scheme": self.name,
            "quantized": sorted(quantized),
            "calibration_texts": min(len(texts), DEFAULT_CALIBRATION_SAMPLES),
            "damp": self.damp,
            "act_order": self.act_order,
        }
