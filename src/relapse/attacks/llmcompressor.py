"""llm-compressor's GPTQ and AWQ as attacks (``llmc-gptq-w4-g128``, ``llmc-awq-w4-g128``, ``-sym``).

Why: our ``gptq-*`` and ``awq-*`` attacks are our own implementations of the papers; the 4-bit
checkpoints that people serve with vLLM are mostly made with llm-compressor. Running that library itself
answers "does the tool a deployer uses bring the forgotten knowledge back?" without trusting that our
reimplementation rounds the same way. It is an optional extra for GPU users: llm-compressor pins its own
transformers version, so it belongs in a separate virtual environment (``pip install llmcompressor``),
never in relapse's dependencies, and it is imported only when one of these attacks runs.

How (our own glue code around the library's ``oneshot``):

- llm-compressor attaches quantization parameters, observers and a quantizing forward to the modules it
  gets, so it runs on a deep copy of the model; its config is saved to a temporary folder because
  ``oneshot`` rereads the config from ``config.name_or_path``.
- Calibration uses the same texts as our calibrated attacks (up to 128 of ``general.jsonl`` or
  ``--calibration``, at most 512 tokens), one text per batch: llm-compressor's Hessians and AWQ
  statistics count padding tokens, so unpadded batches give it exactly the tokens our GPTQ sees.
- Afterwards every quantized linear layer's weight is replaced by what its forward computes (the stored
  weight fake-quantized with its scale and zero point) and copied into the live model, so that
  :func:`relapse.attacks.applied` restores the original bit for bit as for every attack.
- AWQ divides the RMSNorm weights in front of the layers it balances by its scales (and scales ``v_proj``
  and ``up_proj`` rows for ``o_proj`` and ``down_proj``). Its touched set is therefore every parameter of
  the decoder blocks, and the live model then computes exactly what llm-compressor's model computes.
- Schemes are llm-compressor's presets: ``W4A16_ASYM`` (4 bits, groups of 128, asymmetric: the grid of
  our ``gptq-w4-g128``) and ``W4A16`` (symmetric, ``-sym``). Everything else keeps the library's
  defaults: GPTQ with dampening 0.01, blocks of 128 and static activation ordering; AWQ with duo scaling,
  a grid of 20 and the mappings it infers for the architecture, then round-to-nearest.
- On a machine without an accelerator llm-compressor 0.14's AWQ fails pinning CPU memory (which only
  speeds up copies to an accelerator), so there the pinning is skipped for the duration of the run.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch

from relapse.attacks.base import Attack, AttackContext, kept_weights
from relapse.attacks.calibration import (
    DEFAULT_CALIBRATION_SAMPLES,
    DEFAULT_MAX_LENGTH,
    calibration_batches,
    decoder_blocks,
)
from relapse.attacks.rtn import QuantScheme, parse_rtn_name
from relapse.errors import ConfigError
from relapse.models.parts import decoder_linear_weights

ALGORITHMS = ("gptq", "awq")
#: Our grid name to llm-compressor's preset scheme of the same grid.
PRESETS = {QuantScheme(4, 128): "W4A16_ASYM", QuantScheme(4, 128, symmetric=True): "W4A16"}
INSTALL_HINT = "pip install llmcompressor (in a separate virtual environment: it pins transformers)"
_LOGGER_NAMES = ("llmcompressor", "compressed_tensors")


def require_llmcompressor() -> Any:
    """The imported ``llmcompressor`` package, or a one-line :class:`ConfigError` saying how to get it."""
    try:
        import llmcompressor
    except ImportError as exc:
        if getattr(exc, "name", None) == "llmcompressor":
            raise ConfigError(f"llmc-* attacks need llm-compressor: {INSTALL_HINT}") from None
        raise ConfigError(f"llm-compressor failed to import ({exc}); {INSTALL_HINT}") from None
    return llmcompressor


def parse_llmc_name(name: str) -> tuple[str, QuantScheme]:
    """``llmc-gptq-w4-g128[-sym]`` / ``llmc-awq-w4-g128[-sym]`` to the algorithm and our grid."""
    algorithm, _, grid = name.strip().lower().removeprefix("llmc-").partition("-")
    try:
        scheme = parse_rtn_name("rtn-" + grid) if algorithm in ALGORITHMS else None
    except ConfigError:
        scheme = None
    if scheme not in PRESETS:
        raise ConfigError(
            f"cannot read {name!r}: llm-compressor's presets give llmc-gptq-w4-g128, llmc-awq-w4-g128 "
            "and their -sym variants"
        )
    return algorithm, scheme


class LLMCompressorAttack(Attack):
    """llm-compressor's GPTQ or AWQ on a copy of the model, its fake-quantized weights copied back."""

    kind = "quantization"
    # Installed by the user in a separate environment, never by relapse's own extras (module docstring).
    requires = "llmcompressor"
    # ``grid`` stays None: the library's observers choose the scales, so its codes are not relapse's RTN
    # grid, and the weight diagnostics (which measure on that grid) do not apply.

    def __init__(self, algorithm: str, scheme: QuantScheme) -> None:
        if algorithm not in ALGORITHMS or scheme not in PRESETS:
            raise ConfigError(f"no llm-compressor preset for {algorithm} with {scheme.name}")
        self.algorithm, self.scheme, self.preset = algorithm, scheme, PRESETS[scheme]
        self.bits = scheme.bits
        self.name = scheme.name.replace("rtn-", f"llmc-{algorithm}-", 1)

    def touched(self, model: torch.nn.Module, context: AttackContext) -> dict[str, torch.nn.Parameter]:
        targets = dict(decoder_linear_weights(model))
        if self.algorithm == "awq":  # AWQ folds its scales into norms and preceding layers
            blocks = {id(p) for p in decoder_blocks(model).parameters()}
            targets.update({n: p for n, p in model.named_parameters() if id(p) in blocks})
        return targets

    def recipe(self, model: torch.nn.Module) -> list[Any]:
        """The llm-compressor modifiers: every decoder linear layer quantized, all else ignored."""
        from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

        linear_names = {n.removesuffix(".weight") for n in decoder_linear_weights(model)}
        ignore = sorted(
            n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in linear_names
        )
        quant = {"targets": ["Linear"], "scheme": self.preset, "ignore": ignore}
        if self.algorithm == "gptq":
            return [GPTQModifier(**quant)]
        try:
            from llmcompressor.modifiers.transform import AWQModifier
        except ImportError:  # releases before the transform package: the combined modifier
            from llmcompressor.modifiers.awq import AWQModifier

            return [AWQModifier(**quant)]
        return [AWQModifier(), QuantizationModifier(**quant)]

    def apply(self, model: torch.nn.Module, context: AttackContext) -> dict[str, Any]:
        llmcompressor = require_llmcompressor()
        if context.include_embeddings or context.include_lm_head:
            raise ConfigError(f"{self.name} quantizes the decoder's linear layers only")
        targets = self.touched(model, context)
        group = self.scheme.group_size
        for name, p in decoder_linear_weights(model).items():
            if group is not None and p.shape[1] % group:
                raise ConfigError(
                    f"{name}: input dimension {p.shape[1]} is not divisible by group size {group}"
                )
        texts = context.calibration_texts
        if not texts and context.benchmark is not None:
            texts = context.benchmark.general
        batches = calibration_batches(
            context.tokenizer, texts, DEFAULT_CALIBRATION_SAMPLES, DEFAULT_MAX_LENGTH, batch_size=1
        )
        with _quiet(not context.progress):  # the imports log too
            new_values, quantized = self._run(model, context, batches)
        with torch.no_grad():
            for name, p in targets.items():
                if name in new_values:
                    p.copy_(new_values[name])
        quantized_names = sorted(quantized)
        return {
            "scheme": self.name,
            "quantized": quantized_names,
            "kept": kept_weights(model, quantized_names),
            "rescaled": sorted(n for n in new_values if n not in quantized and n in targets),
            "calibration_texts": len(batches),
            "library": f"llmcompressor {getattr(llmcompressor, '__version__', '?')}",
            "preset": self.preset,
        }

    def _run(
        self, model: torch.nn.Module, context: AttackContext, batches: list[dict[str, torch.Tensor]]
    ) -> tuple[dict[str, torch.Tensor], set[str]]:
        """Run ``oneshot`` on a copy; return the copy's changed parameters (by name) and the quantized."""
        from compressed_tensors.quantization import forward_quantize
        from llmcompressor import oneshot
        from llmcompressor.core import reset_session
        from torch.utils.data import DataLoader

        parallelism = os.environ.get("TOKENIZERS_PARALLELISM")  # oneshot sets it for the whole process
        work = copy.deepcopy(model).eval()
        original = dict(model.named_parameters())
        try:
            with tempfile.TemporaryDirectory() as folder, _no_cpu_pinning():
                work.config.save_pretrained(folder)
                work.config._name_or_path = folder
                oneshot(
                    model=work,
                    processor=context.tokenizer,
                    dataset=DataLoader(batches, batch_size=None),
                    recipe=self.recipe(work),
                    num_calibration_samples=len(batches),
                )
            values, quantized = {}, set()
            with torch.no_grad():
                modules = dict(work.named_modules())
                for name, p in work.named_parameters():
                    if name not in original:  # scales and zero points the library added
                        continue
                    module_name, _, leaf = name.rpartition(".")
                    module = modules[module_name]
                    args = getattr(getattr(module, "quantization_scheme", None), "weights", None)
                    # The library may leave the copy dispatched to an accelerator: compare and keep
                    # the values on the live parameter's device.
                    device = original[name].device
                    if leaf == "weight" and args is not None and hasattr(module, "weight_scale"):
                        values[name] = forward_quantize(module, p, "weight", args).detach().to(device).clone()
                        quantized.add(name)
                    elif not torch.equal(p.detach().to(device), original[name]):
                        values[name] = p.detach().to(device).clone()
        finally:
            reset_session()  # the library's global session holds the copy
            del work
            if parallelism is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
        return values, quantized


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Silence llm-compressor's log lines and progress bars (it logs every layer) unless asked for."""
    if not enabled:
        yield
        return
    from loguru import logger

    for name in _LOGGER_NAMES:
        logger.disable(name)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if os.environ.get("LLM_COMPRESSOR_LOG_DISABLED", "").lower() != "true":  # the library's own switch
            for name in _LOGGER_NAMES:
                logger.enable(name)


@contextlib.contextmanager
def _no_cpu_pinning() -> Iterator[None]:
    """Skip llm-compressor's pinning of cached activations where there is no accelerator to copy to."""
    from llmcompressor.pipelines import cache

    accelerator = getattr(torch, "accelerator", None)
    has_accelerator = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    target = getattr(cache, "IntermediatesCache", None)
    if has_accelerator or target is None or not hasattr(target, "pin_memory"):
        yield
        return
    original = target.pin_memory
    target.pin_memory = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        target.pin_memory = original
