"""GPTQ (Frantar et al., ICLR 2023, arXiv 2210.17323): quantize weights column by column, moving each
column's rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's reconstruction error on calibration activations.

Implementation notes (our own code, following the paper's algorithm):

- Decoder blocks are processed in order, each calibrated on the outputs of the already-quantized
  blocks before it (:mod:`relapse.attacks.calibration`).
- Per linear layer, ``H = X^T X / n`` over the non-padding calibration tokens; columns that never see a
  non-zero input are zeroed; ``H`` is damped by ``damp * mean(diag H)``; the upper Cholesky factor of
  ``H^-1`` drives blocked "lazy batch" updates (``block_size`` columns at a time).
- Grid parameters come from :mod:`relapse.attacks.rtn` (same asymmetric/symmetric grids), computed per
  output row, or per group of ``group_size`` columns when the first column of the group is reached.
- ``act_order`` processes columns by decreasing ``diag(H)``; groups then follow that order.
"""

from __future__ import annotations

from typing import Any

import torch

from relapse.attacks.calibration import CalibratedAttack, LayerStats
from relapse.attacks.rtn import QuantScheme, grid_params, to_codes
from relapse.errors import ConfigError


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
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, device=H.device)
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


class GPTQAttack(CalibratedAttack):
    """GPTQ quantization of the decoder's linear layers (calibrated on general text)."""

    def __init__(self, scheme: QuantScheme, act_order: bool = False, damp: float = 0.01) -> None:
        self.scheme, self.act_order, self.damp = scheme, act_order, damp
        self.grid, self.bits = scheme, scheme.bits
        self.name = scheme.name.replace("rtn-", "gptq-", 1) + ("-act" if act_order else "")

    def quantize_layer(self, weight: torch.Tensor, stats: LayerStats, name: str) -> torch.Tensor:
        return gptq_quantize_matrix(
            weight, stats.hessian, self.scheme, self.damp, act_order=self.act_order, where=name
        )

    def settings(self) -> dict[str, Any]:
        return {"damp": self.damp, "act_order": self.act_order}
