"""Weight-space attacks: RTN fake-quantization, Gaussian noise of a quantizer's size, magnitude pruning."""

from __future__ import annotations

import math
from typing import Any

import torch

from relapse.attacks.base import Attack, AttackContext, WeightRoundingAttack, kept_weights, weight_targets
from relapse.attacks.rtn import QuantScheme, fake_quantize
from relapse.errors import ConfigError


class RTNAttack(WeightRoundingAttack):
    """Round every target weight to its RTN grid (fake quantization: the dequantized values are kept)."""

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = self.grid = scheme
        self.bits = scheme.bits
        self.name = scheme.name

    def round_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        return fake_quantize(weight, self.scheme, name)


class NoiseAttack(Attack):
    """Gaussian noise whose per-tensor RMS equals a quantizer's error on that tensor.

    The control for a quantization result: if this recovers as much as the quantizer, the recovery is a
    matter of perturbation size, not of the grid.
    """

    kind = "noise"

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = scheme
        self.name = f"noise-like-{scheme.name}"

    def touched(self, model, context):
        return weight_targets(model, context)

    def apply(self, model: torch.nn.Module, context: AttackContext) -> dict[str, Any]:
        # Drawn on the CPU from a seeded generator and copied to the weights' device: the same seed gives
        # the same noise on every device (a GPU generator would give other numbers), so a noise cell of an
        # audit does not change when the audit resumes on another device.
        generator = torch.Generator().manual_seed(context.seed)
        rms = {}
        with torch.no_grad():
            for name, p in self.touched(model, context).items():
                error = fake_quantize(p, self.scheme, name).float() - p.float()
                rms[name] = float(error.pow(2).mean().sqrt())
                noise = torch.randn(p.shape, generator=generator) * rms[name]
                p.add_(noise.to(p.dtype).to(p.device))
        return {"like": self.scheme.name, "seed": context.seed, "rms": rms, "kept": kept_weights(model, rms)}


class PruneAttack(Attack):
    """Magnitude pruning: zero the given share of smallest-magnitude elements of every target tensor."""

    kind = "pruning"

    def __init__(self, share: float) -> None:
        if not 0.0 < share < 1.0:
            raise ConfigError(f"pruning share must be between 0 and 1 (prune-30 = 30%), got {share}")
        self.share = share
        self.name = f"prune-{share * 100:.12g}"  # prune-12.5 keeps its half percent

    def touched(self, model, context):
        return weight_targets(model, context)

    def apply(self, model: torch.nn.Module, context: AttackContext) -> dict[str, Any]:
        pruned = {}
        with torch.no_grad():
            for name, p in self.touched(model, context).items():
                count = math.floor(self.share * p.numel())
                order = torch.sort(p.detach().abs().reshape(-1).float(), stable=True).indices[:count]
                p.view(-1)[order] = 0
                pruned[name] = count
        return {"share": self.share, "zeroed": pruned}
