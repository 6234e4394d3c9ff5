"""Deployment formats as fake-quantization: llama.cpp GGUF block formats and bitsandbytes.

GGUF (``gguf-q8_0``, ``gguf-q4_0``, ``gguf-q4_1``, ``gguf-q5_0``, ``gguf-q5_1``): blocks of 32
consecutive weights of a row, as llama.cpp's reference quantizer defines them (our own torch code; the
tests compare it with the ``gguf`` package's quantize/dequantize round trip):

- Q8_0: ``d = max|x| / 127``, ``q = roundf(x / d)`` (halves away from zero), value ``d * q``;
- Q4_0 / Q5_0: ``d = m / -8`` (``/ -16``) with ``m`` the element of largest magnitude, sign kept;
  ``q = trunc(x / d + 8.5)`` (``16.5``) clipped to 4 (5) bits; value ``d * (q - 8)`` (``- 16``);
- Q4_1 / Q5_1: ``d = (max - min) / 15`` (``/ 31``); ``q = trunc((x - min) / d + 0.5)``; value
  ``d * q + min``.

The block scale (and minimum) is stored as float16, so values use the float16-rounded ``d`` and ``min``.
The K-quant formats (Q4_K, Q6_K) are not offered: the ``gguf`` package has no quantizer for them.

bitsandbytes (``bnb-nf4``, ``bnb-fp4``: 4-bit with blocks of 64, the setting behind the paper's "4-bit"
results; ``bnb-int8``: LLM.int8's per-row absmax int8): the library's own quantize/dequantize functions,
which run on the CPU in bitsandbytes >= 0.45. Needs ``pip install 'relapse[bnb]'``.

Devices: the GGUF code is plain torch and runs wherever the weights are, with the same results
(block scales use :func:`relapse.attacks.rtn.exact_div`). bitsandbytes runs on the weights'
GPU with its own CUDA kernels (what a deployment on that GPU computes) when its CUDA library is loaded;
with a CPU-only bitsandbytes build, weights on a GPU are rounded on the CPU and copied back.
"""

from __future__ import annotations

import logging

import torch

from relapse.attacks.base import WeightRoundingAttack
from relapse.attacks.rtn import exact_div
from relapse.errors import ConfigError

GGUF_BLOCK = 32
GGUF_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BNB_FORMATS = ("nf4", "fp4", "int8")
#: The weight bit width of each format (a GGUF format's digit after the ``q``).
FORMAT_BITS = {"q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "nf4": 4, "fp4": 4, "int8": 8}
BNB_BLOCK = 64


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def gguf_fake_quantize(weight: torch.Tensor, fmt: str, where: str = "weight") -> torch.Tensor:
    """``weight`` rounded as llama.cpp's ``fmt`` block format would store it (same dtype and shape)."""
    if fmt not in GGUF_FORMATS:
        raise ConfigError(f"unknown GGUF format {fmt!r}; choose from {', '.join(GGUF_FORMATS)}")
    if weight.shape[-1] % GGUF_BLOCK:
        raise ConfigError(f"{where}: last dimension {weight.shape[-1]} is not a multiple of {GGUF_BLOCK}")
    x = weight.detach().float().reshape(-1, GGUF_BLOCK)
    if fmt == "q8_0":
        d = exact_div(x.abs().amax(dim=1, keepdim=True), 127)
        value = _fp16(d) * _roundf(x * _inverse(d))
    elif fmt in ("q4_0", "q5_0"):
        levels = 8 if fmt == "q4_0" else 16
        signed_max = torch.gather(x, 1, x.abs().argmax(dim=1, keepdim=True))
        d = exact_div(signed_max, -levels)
        q = torch.trunc(x * _inverse(d) + (levels + 0.5)).clamp(0, 2 * levels - 1)
        value = _fp16(d) * (q - levels)
    else:
        top = 15 if fmt == "q4_1" else 31
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        d = exact_div(hi - lo, top)
        q = torch.trunc((x - lo) * _inverse(d) + 0.5).clamp(0, top)
        value = _fp16(d) * q + _fp16(lo)
    return value.reshape(weight.shape).to(weight.dtype)


class _DropKernelHubNotice(logging.Filter):
    """Drops bitsandbytes' notice that it could not fetch an optional CPU kernel from the Hugging Face hub
    (relapse loads no remote code; bitsandbytes then uses its own CPU kernels, with the same results)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def _import_bitsandbytes():
    """``bitsandbytes.functional``, imported without its kernel-hub notice (printed once per process on
    CPUs with AVX-512 BF16 otherwise)."""
    notices = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropKernelHubNotice) for f in notices.filters):
        notices.addFilter(_DropKernelHubNotice())
    import bitsandbytes.functional

    return bitsandbytes.functional


def _bnb_runs_on(device: torch.device) -> torch.device:
    """Where bitsandbytes can round a tensor that lives on ``device``: there, unless it is a GPU and the
    installed bitsandbytes has no CUDA library loaded (its CPU kernels are then the only ones)."""
    if device.type != "cuda":
        return device
    _import_bitsandbytes()
    from bitsandbytes import cextension

    library = getattr(cextension, "lib", None)
    return device if getattr(library, "compiled_with_cuda", True) else torch.device("cpu")


def bnb_fake_quantize(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """``weight`` after a bitsandbytes quantize/dequantize round trip (same dtype, shape and device)."""
    try:
        bnb_functional = _import_bitsandbytes()
    except ImportError:
        raise ConfigError("bnb-* attacks need bitsandbytes: pip install 'relapse[bnb]'") from None
    x = weight.detach().to(_bnb_runs_on(weight.device))
    if fmt == "int8":
        codes, row_scale, _ = bnb_functional.int8_vectorwise_quant(x.to(torch.float16))
        rounded = bnb_functional.int8_vectorwise_dequant(codes, row_scale)
    else:
        packed, state = bnb_functional.quantize_4bit(x.float(), blocksize=BNB_BLOCK, quant_type=fmt)
        rounded = bnb_functional.dequantize_4bit(packed, state).reshape(weight.shape)
    return rounded.to(device=weight.device, dtype=weight.dtype)


class DeploymentAttack(WeightRoundingAttack):
    """Fake-quantize the target weights as a deployment format stores them."""

    def __init__(self, family: str, fmt: str) -> None:
        formats = GGUF_FORMATS if family == "gguf" else BNB_FORMATS
        if fmt not in formats:
            raise ConfigError(f"unknown {family} format {fmt!r}; choose from {', '.join(formats)}")
        self.family, self.fmt = family, fmt
        self.name = f"{family}-{fmt}"
        self.bits = FORMAT_BITS[fmt]
        if family == "bnb":  # the GGUF formats are relapse's own torch code
            self.requires, self.extra = "bitsandbytes", "bnb"

    def round_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if self.family == "gguf":
            return gguf_fake_quantize(weight, self.fmt, name)
        return bnb_fake_quantize(weight, self.fmt)
