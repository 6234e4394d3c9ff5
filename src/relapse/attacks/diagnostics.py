"""Weight-space diagnostics of an unlearning update under a quantizer, with no evaluation at all.

For a target model A, an unlearned model B (``dW = B - A``) and an RTN quantizer Q, per tensor and in
total:

- ``mean_abs_dw``: mean |dW|;
- ``mean_dw_over_step``: mean of |dW| divided by the quantization step of A's grid at that element
  (well below 0.5 means most elements cannot leave their rounding cell);
- ``share_below_half_step``: share of elements with |dW| < step / 2;
- ``codes_changed``: share of integer codes that differ between Q(A) and Q(B), each on its own grid;
- ``projection``: ``<Q(B) - Q(A), B - A> / ||B - A||^2``: 1 when rounding keeps the update, 0 when it
  erases it (the quantized unlearned model is then the quantized target: the forgetting relapses).
"""

from __future__ import annotations

from typing import Any

import torch

from relapse.attacks.rtn import QuantScheme, quantize


def tensor_diagnostics(a: torch.Tensor, b: torch.Tensor, scheme: QuantScheme, where: str = "weight") -> dict:
    """The diagnostics of one weight matrix (see the module docstring), plus the sums for totals."""
    qa, qb = quantize(a, scheme, where), quantize(b, scheme, where)
    delta = b.float() - a.float()
    quantized_delta = qb.dequantize() - qa.dequantize()
    ratio = delta.abs() / qa.step()
    numerator = float((quantized_delta * delta).sum())
    denominator = float(delta.pow(2).sum())
    count = delta.numel()
    changed = int((qa.codes != qb.codes).sum())
    return {
        "elements": count,
        "mean_abs_dw": float(delta.abs().mean()),
        "mean_dw_over_step": float(ratio.mean()),
        "share_below_half_step": float((ratio < 0.5).float().mean()),
        "codes_changed": changed / count,
        "projection": numerator / denominator if denominator > 0 else None,
        "_sums": {
            "abs_dw": float(delta.abs().sum()),
            "ratio": float(ratio.sum()),
            "below_half": int((ratio < 0.5).sum()),
            "changed": changed,
            "numerator": numerator,
            "denominator": denominator,
        },
    }


def weight_diagnostics(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names: list[str], scheme: QuantScheme
) -> dict[str, Any]:
    """Per-tensor diagnostics of ``names`` and their totals over all elements."""
    per_tensor = {}
    totals = {
        "elements": 0,
        "abs_dw": 0.0,
        "ratio": 0.0,
        "below_half": 0,
        "changed": 0,
        "numerator": 0.0,
        "denominator": 0.0,
    }
    for name in names:
        result = tensor_diagnostics(a[name], b[name], scheme, name)
        sums = result.pop("_sums")
        per_tensor[name] = result
        totals["elements"] += result["elements"]
        for key, value in sums.items():
            totals[key] += value
    n = max(totals["elements"], 1)
    total = {
        "elements": totals["elements"],
        "mean_abs_dw": totals["abs_dw"] / n,
        "mean_dw_over_step": totals["ratio"] / n,
        "share_below_half_step": totals["below_half"] / n,
        "codes_changed": totals["changed"] / n,
        "projection": totals["numerator"] / totals["denominator"] if totals["denominator"] > 0 else None,
    }
    return {"scheme": scheme.name, "total": total, "per_tensor": per_tensor}
