"""AWQ (Lin et al., MLSys 2024, arXiv 2306.00978): scale salient input channels up before rounding.

Channels with large activations matter most to a layer's output. AWQ multiplies the weight's input
columns by ``s = mean|x|^alpha`` (normalised so that ``max(s) * min(s) = 1``), rounds ``W * s`` on the
RTN grid, and divides by ``s`` again (in deployment the division is folded into the previous
operation). ``alpha`` is searched on a grid of ``[0, 1]`` to minimise the layer's output error on the
calibration activations, ``tr((W_hat - W) H (W_hat - W)^T)`` with ``H = X^T X / n``. ``alpha = 0`` is
plain RTN, so AWQ never does worse than RTN on the calibration data.

Differences from the reference implementation, stated plainly: every linear layer gets its own scales
(the reference shares one scale vector between layers that read the same input, such as q/k/v, so that
it can be folded into the preceding norm); and there is no weight-clipping search.
"""

from __future__ import annotations

from typing import Any

import torch

from relapse.attacks.calibration import CalibratedAttack, LayerStats
from relapse.attacks.rtn import QuantScheme, fake_quantize

DEFAULT_GRID = 20


def awq_quantize_matrix(
    weight: torch.Tensor,
    stats: LayerStats,
    scheme: QuantScheme,
    grid: int = DEFAULT_GRID,
    where: str = "weight",
) -> tuple[torch.Tensor, float]:
    """The AWQ-quantized (dequantized) ``weight`` and the chosen ``alpha``."""
    w = weight.detach().float()
    activation = stats.mean_abs.float().clamp(min=1e-8)
    best, best_loss, best_alpha = None, float("inf"), 0.0
    for step in range(grid + 1):
        alpha = step / grid
        scales = activation.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt()
        candidate = fake_quantize(w * scales, scheme, where) / scales
        delta = candidate - w
        loss = float(((delta @ stats.hessian) * delta).sum())
        if loss < best_loss:
            best, best_loss, best_alpha = candidate, loss, alpha
    return best.to(weight.dtype), best_alpha


class AWQAttack(CalibratedAttack):
    """AWQ quantization of the decoder's linear layers (calibrated on general text)."""

    def __init__(self, scheme: QuantScheme, alpha_grid: int = DEFAULT_GRID) -> None:
        # ``grid`` is the RTN grid the weights land on (Attack's declaration); ``alpha_grid`` the number
        # of steps of the search for alpha, recorded as the attack's "grid" setting.
        self.scheme, self.alpha_grid = scheme, alpha_grid
        self.grid, self.bits = scheme, scheme.bits
        self.name = scheme.name.replace("rtn-", "awq-", 1)
        self.alphas: dict[str, float] = {}

    def quantize_layer(self, weight: torch.Tensor, stats: LayerStats, name: str) -> torch.Tensor:
        quantized, self.alphas[name] = awq_quantize_matrix(weight, stats, self.scheme, self.alpha_grid, name)
        return quantized

    def settings(self) -> dict[str, Any]:
        return {"grid": self.alpha_grid, "alpha": dict(sorted(self.alphas.items()))}
