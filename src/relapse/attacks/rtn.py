"""Round-to-nearest (RTN) weight quantization, as pure functions of a weight matrix.

Grids (per output row, or per group of ``group_size`` consecutive input columns of a row):

- asymmetric (min-max): the range is ``[min(w_min, 0), max(w_max, 0)]`` (so that 0 is exactly
  representable, as in the GPTQ reference code and torchao), ``scale = range / (2^b - 1)``,
  ``zero = round(-lo / scale)``, codes ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)`` and the
  dequantized weight is ``(q - zero) * scale``.
- symmetric (absmax): ``scale = max|w| / (2^(b-1) - 1)``, codes ``q = clamp(round(w / scale),
  -2^(b-1), 2^(b-1) - 1)`` and the dequantized weight is ``q * scale``.

``torch.round`` rounds halves to even, like torchao. Every element's error is at most half a step
(``scale / 2``). The grids are computed with correctly rounded divisions (:func:`exact_div`), so the same
weights get the same grid, codes and rounded values on a CPU and on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from relapse.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class QuantScheme:
    """Bits, grouping and grid of an RTN quantizer."""

    bits: int
    group_size: int | None  # None: one group per output row ("per channel")
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"RTN supports {', '.join(map(str, SUPPORTED_BITS))} bits, not {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ConfigError(f"group size must be positive, got {self.group_size}")

    @property
    def name(self) -> str:
        group = f"g{self.group_size}" if self.group_size else "ch"
        return f"rtn-w{self.bits}-{group}" + ("-sym" if self.symmetric else "")


@dataclass
class Quantized:
    """Integer codes and the per-group scale and zero point of a quantized matrix."""

    codes: torch.Tensor  # [rows, groups, group_size], int32
    scale: torch.Tensor  # [rows, groups, 1]
    zero: torch.Tensor  # [rows, groups, 1] (0 for symmetric grids)
    shape: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        return ((self.codes.float() - self.zero) * self.scale).reshape(self.shape)

    def step(self) -> torch.Tensor:
        """The quantization step (scale) of every element, shaped like the matrix."""
        return self.scale.expand(self.codes.shape).reshape(self.shape)


def _grouped(weight: torch.Tensor, group_size: int | None, where: str) -> torch.Tensor:
    if weight.dim() != 2:
        raise ConfigError(f"{where}: RTN quantizes 2-D weights, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    size = cols if group_size is None else group_size
    if cols % size:
        raise ConfigError(f"{where}: input dimension {cols} is not divisible by group size {size}")
    return weight.float().reshape(rows, cols // size, size)


def exact_div(values: torch.Tensor, divisor: float) -> torch.Tensor:
    """``values / divisor``, correctly rounded on every device.

    On CUDA, torch turns division by a Python number into multiplication by its reciprocal, which can be
    one unit in the last place off; on a grid's scale that moves codes across rounding boundaries, and
    the same weights would round differently on a GPU than on a CPU. Dividing by a tensor on the same
    device is a true division everywhere (and on a CPU gives exactly what dividing by the number did).
    """
    return values / torch.tensor(divisor, dtype=values.dtype, device=values.device)


def grid_params(values: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of the grid for ``values`` grouped along the last dimension (float32)."""
    eps = torch.finfo(torch.float32).eps
    values = values.float()
    if scheme.symmetric:
        qmax = 2 ** (scheme.bits - 1) - 1
        scale = exact_div(values.abs().amax(dim=-1, keepdim=True), qmax).clamp(min=eps)
        return scale, torch.zeros_like(scale)
    qmax = 2**scheme.bits - 1
    lo = values.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = values.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = exact_div(hi - lo, qmax).clamp(min=eps)
    return scale, torch.clamp(torch.round(-lo / scale), 0, qmax)


def to_codes(
    values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, scheme: QuantScheme
) -> torch.Tensor:
    """Integer codes (as floats) of ``values`` on the grid ``(scale, zero)``."""
    if scheme.symmetric:
        qmax = 2 ** (scheme.bits - 1) - 1
        return torch.clamp(torch.round(values.float() / scale), -qmax - 1, qmax)
    return torch.clamp(torch.round(values.float() / scale) + zero, 0, 2**scheme.bits - 1)


def quantize(weight: torch.Tensor, scheme: QuantScheme, where: str = "weight") -> Quantized:
    """RTN codes, scales and zero points of a 2-D ``weight`` (computed in float32)."""
    groups = _grouped(weight, scheme.group_size, where)
    scale, zero = grid_params(groups, scheme)
    codes = to_codes(groups, scale, zero, scheme)
    return Quantized(codes.to(torch.int32), scale, zero, tuple(weight.shape))


def fake_quantize(weight: torch.Tensor, scheme: QuantScheme, where: str = "weight") -> torch.Tensor:
    """``weight`` rounded to the RTN grid, in its own dtype and shape."""
    return quantize(weight, scheme, where).dequantize().to(weight.dtype)


def parse_rtn_name(name: str) -> QuantScheme:
    """``rtn-w4-g128``, ``rtn-w4-g128-sym``, ``rtn-w8-ch`` (per channel) to a :class:`QuantScheme`."""
    parts = name.lower().split("-")
    try:
        if parts[0] != "rtn" or not parts[1].startswith("w") or len(parts) not in (3, 4):
            raise ValueError
        bits = int(parts[1][1:])
        group = (
            None if parts[2] == "ch" else int(parts[2].removeprefix("g")) if parts[2].startswith("g") else -1
        )
        symmetric = len(parts) == 4
        if group == -1 or (symmetric and parts[3] != "sym"):
            raise ValueError
    except (ValueError, IndexError):
        raise ConfigError(
            f"cannot read {name!r}: write rtn-w<bits>-g<group>[-sym] or rtn-w<bits>-ch[-sym]"
        ) from None
    return QuantScheme(bits, group, symmetric)
