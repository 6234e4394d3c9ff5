"""Provenance of a model's weights as the attacks see it: which quantization grid its base came from.

A model fetched from a GGUF file (:mod:`relapse.models.fetch`) has every decoder weight on the grid the
file stored it on. An attack that rounds onto that same grid is a no-op on the base weights and erases
small updates made after it: a weak fine-tuning returns to the pretrained base, and an unlearning update
made after a fine-tuning that survives the grid returns to the quantized target (docs/study-smollm2.md).
Whether an attack is such a no-op is measured with the attack's own quantizer, so these checks live
beside the attacks: :func:`measure_grid` (run at fetch time, stored in ``fetch.json``),
:func:`base_grid` (reads which grid a model's weights came from, following ``train.json`` and
``unlearn.json`` back to the fetched folder) and :func:`grid_warning` (the warning an audit shows).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from relapse.attacks.deploy import GGUF_BLOCK, GGUF_FORMATS, gguf_fake_quantize
from relapse.models.fetch import read_fetch_record
from relapse.models.io import read_record
from relapse.models.parts import decoder_linear_weights, embedding_weights

# llama.cpp block formats relapse fake-quantizes (:data:`GGUF_FORMATS`), with their steps:
# (max - min) / levels for the asymmetric ones, max|x| / levels for the symmetric ones.
_RANGE_LEVELS = {"q4_1": 15, "q5_1": 31}
_ABSMAX_LEVELS = {"q8_0": 127, "q4_0": 8, "q5_0": 16}
# Files following a chain of derived models back to their base (trained --from it, unlearned from it).
_PARENT_FIELDS = (("train.json", "base"), ("unlearn.json", "model"), ("attack.json", "model"))
_MAX_CHAIN = 8


def _format_of(types: dict[str, int] | str | None) -> str | None:
    """``gguf-q4_1`` when every tensor of a group has one llama.cpp type relapse can fake-quantize."""
    if isinstance(types, dict):
        if len(types) != 1:
            return None
        (types,) = types
    if types is None or types.lower() not in GGUF_FORMATS:
        return None
    return f"gguf-{types.lower()}"


def _block_steps(weight, fmt: str):
    """Quantization step of each 32-weight block of ``weight`` under the llama.cpp format ``fmt``."""
    blocks = weight.detach().float().reshape(-1, GGUF_BLOCK)
    if fmt in _RANGE_LEVELS:
        return (blocks.amax(dim=1) - blocks.amin(dim=1)) / _RANGE_LEVELS[fmt]
    return blocks.abs().amax(dim=1) / _ABSMAX_LEVELS[fmt]


def check_fixed_points(weights: dict[str, Any], attack: str) -> dict[str, Any]:
    """Measure whether ``attack`` (a ``gguf-*`` name) leaves every weight unchanged, bit for bit.

    The grid warning rests on this measurement rather than on the file's type names: a GGUF quantized
    with an importance matrix or a search for better scales stores Q4_1 codes that relapse's reference
    quantizer would not reproduce, and then the attack is not a no-op.
    """
    fmt = attack.removeprefix("gguf-")
    unchanged = total = 0
    exact_tensors = 0
    steps = []
    with torch.no_grad():
        for name, weight in weights.items():
            same = int((gguf_fake_quantize(weight, fmt, name) == weight).sum())
            unchanged += same
            total += weight.numel()
            exact_tensors += same == weight.numel()
            steps.append(_block_steps(weight, fmt))
    step = torch.cat(steps) if steps else torch.zeros(1)
    return {
        "attack": attack,
        "tensors": len(weights),
        "tensors_unchanged": exact_tensors,
        "weights": total,
        "unchanged_share": unchanged / total if total else 0.0,
        "exact": total > 0 and unchanged == total,
        "median_step": float(step.median()),
    }


def measure_grid(gguf_info: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """The grid the fetched weights sit on, with the fixed-point measurement behind each claim.

    ``gguf_info`` is :func:`relapse.models.fetch.inspect_gguf`'s summary of the file the model was read
    from; :func:`relapse.models.fetch.fetch_model` takes this function and stores what it returns as the
    ``grid`` of ``fetch.json``.
    """
    grid: dict[str, Any] = {"format": None, "block": None, "equivalent_attacks": []}
    decoder_format = _format_of(gguf_info["decoder_linear_types"])
    decoder = decoder_linear_weights(model)
    if decoder_format is not None and len(decoder) == sum(gguf_info["decoder_linear_types"].values()):
        check = check_fixed_points(decoder, decoder_format)
        grid.update(
            format=decoder_format,
            block=GGUF_BLOCK,
            equivalent_attacks=[decoder_format] if check["exact"] else [],
            median_step=check["median_step"],
            fixed_point_check=check,
        )
    embedding_format = _format_of(gguf_info["embedding_type"])
    if embedding_format is not None:
        check = check_fixed_points(embedding_weights(model), embedding_format)
        grid["embeddings"] = {
            "format": embedding_format,
            "block": GGUF_BLOCK,
            "equivalent_attacks": [embedding_format] if check["exact"] else [],
            "fixed_point_check": check,
        }
    return grid


def _parent_model(model_dir: Path) -> Path | None:
    """The folder ``model_dir`` was derived from, according to its train/unlearn/attack record.

    Records store the path as the user typed it, relative to the directory they ran in; that directory is
    tried first, then the folder beside ``model_dir`` (models of one experiment usually sit together).
    """
    for record_name, field in _PARENT_FIELDS:
        record = read_record(model_dir, record_name)
        parent = record.get(field) if record else None
        if not isinstance(parent, str) or not parent:
            continue
        candidate = Path(parent).expanduser()
        for path in (candidate, model_dir.parent / candidate):
            if path.is_dir():
                return path
        return None
    return None


def base_grid(model_dir: str | Path) -> dict[str, Any] | None:
    """The quantization grid the weights of ``model_dir`` (or of the model it was derived from) came from.

    Reads ``fetch.json``; for a model trained ``--from`` a fetched folder, unlearned from such a model or
    an attacked copy of one, follows ``train.json``/``unlearn.json``/``attack.json`` back (at most 8
    steps). Returns None for models that were not fetched from a quantized file (e.g. trained from
    scratch), otherwise e.g. ``{"format": "gguf-q4_1", "block": 32, "equivalent_attacks": ["gguf-q4_1"],
    "median_step": ..., "embeddings": {...}, "source": ..., "base_model": ...}``.
    """
    folder: Path | None = Path(model_dir).expanduser()
    seen: set[Path] = set()
    for _ in range(_MAX_CHAIN):
        if folder is None or folder.resolve() in seen:
            return None
        seen.add(folder.resolve())
        record = read_fetch_record(folder)
        if record is not None:
            grid = record.get("grid")
            if not isinstance(grid, dict) or not grid.get("format"):
                return None
            source = record.get("source", {})
            return {
                **grid,
                "source": f"{source.get('package')} {source.get('version')}, {source.get('file')}",
                "base_model": str(folder),
            }
        folder = _parent_model(folder)
    return None


def warning_for_grid(
    attack_name: str, grid: dict[str, Any] | None, include_embeddings: bool = False
) -> str | None:
    """The warning for ``attack_name`` on weights whose base came from ``grid`` (see :func:`base_grid`).

    Pure; :func:`grid_warning` reads the grid from disk. Only attacks measured to leave the base weights
    unchanged count: another 4-bit grid with blocks of 32 (``rtn-w4-g32``, ``gguf-q5_1``) rounds the base
    weights somewhere else and does not snap updates back to them.
    """
    if not grid:
        return None
    attack = attack_name.strip().lower()
    where = None
    if attack in grid.get("equivalent_attacks", []):
        where, part = grid, "decoder weights"
    elif include_embeddings and attack in (grid.get("embeddings") or {}).get("equivalent_attacks", []):
        where, part = grid["embeddings"], "input embeddings"
    if where is None:
        return None
    base = grid.get("base_model", "the base model")
    step = where.get("median_step")
    step_text = f", median step {step:.3g}" if isinstance(step, float) else ""
    return (
        f"{attack} rounds onto the grid the {part} of {base} were stored on ({where.get('format')}, "
        f"blocks of {where.get('block')}{step_text}): it leaves those weights unchanged and erases most of "
        "any update much smaller than a step, so a weakly fine-tuned target returns to the pretrained base "
        "(check the quantized target's row) and a small unlearning update snaps back to the quantized target"
    )


def grid_warning(attack_name: str, model_dir: str | Path, include_embeddings: bool = False) -> str | None:
    """A one-line warning when ``attack_name`` rounds onto the grid the base weights of ``model_dir`` sit
    on, else None. Changes nothing; reads ``fetch.json`` (via :func:`base_grid`)."""
    return warning_for_grid(attack_name, base_grid(model_dir), include_embeddings)
