"""What every attack is: a named transformation of a loaded model's weights, applied temporarily.

An attack declares the parameters it touches and changes them in place; :func:`applied` snapshots those
parameters first and restores them bit for bit afterwards, so that one loaded model serves a whole sweep
of attacks. :func:`relapse.attacks.materialize` writes an attacked copy to disk instead.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from relapse.data.benchmark import Benchmark
from relapse.errors import ConfigError
from relapse.models.parts import decoder_linear_weights, embedding_weights, lm_head_weights

if TYPE_CHECKING:
    from relapse.attacks.rtn import QuantScheme


#: The key under which an attack's record lists the forget questions (indices into ``forget_qa``) that
#: its cells are to be read on, when not all: relearning on half of the forget set is read on the other
#: half (the audit's recovered shares and their intervals use those questions alone, for every model).
MEASURED_FORGET_QA = "measure_forget_qa"


@dataclass
class AttackContext:
    """What an attack may need besides the model: data (relearning, calibration), options, a seed."""

    tokenizer: Any = None
    benchmark: Benchmark | None = None
    include_embeddings: bool = False
    include_lm_head: bool = False
    seed: int = 0
    progress: bool = False
    calibration_texts: list[str] = field(default_factory=list)

    def require_benchmark(self, attack: str) -> Benchmark:
        if self.benchmark is None:
            raise ConfigError(f"attack {attack} needs benchmark data: pass --data")
        return self.benchmark


def weight_targets(model: torch.nn.Module, context: AttackContext) -> dict[str, torch.nn.Parameter]:
    """The weights a weight-space attack changes: the decoder's linear layers, plus the embeddings and
    the LM head when asked (the paper keeps both in full precision, and so does relapse by default)."""
    targets = dict(decoder_linear_weights(model))
    if context.include_embeddings:
        targets.update(embedding_weights(model))
    if context.include_lm_head:
        targets.update(lm_head_weights(model))
    seen: set[int] = set()
    unique = {}
    for name, p in targets.items():  # tied embeddings appear once
        if id(p) not in seen:
            seen.add(id(p))
            unique[name] = p
    return unique


def kept_weights(model: torch.nn.Module, changed) -> list[str]:
    """Names of the 2-D weights an attack left alone (by default the embeddings and the LM head)."""
    return sorted(name for name, p in model.named_parameters() if p.dim() == 2 and name not in changed)


class Attack(ABC):
    """A registered attack. Subclasses set ``name`` and ``kind`` and implement the two methods.

    What the audit and the report need to know about an attack is declared on it, never read back out of
    its name: ``bits`` (the weight bit width it rounds to; None unless it rounds weights to a low-bit
    format, so noise, pruning and relearning stay off the report's bits axis), ``grid`` (the RTN grid
    relapse's own rounding puts the weights on, which the weight diagnostics measure on; None for
    llm-compressor, whose observers choose their own scales, for the deployment formats, and for attacks
    that do not round), and ``requires`` (the optional package it imports, None when it needs none) with
    ``extra`` (the relapse extra that installs it, None when relapse's install never does).
    """

    name: str
    kind: str  # "quantization", "noise", "pruning" or "relearning"
    bits: int | None = None
    grid: QuantScheme | None = None
    requires: str | None = None
    extra: str | None = None

    def package_missing(self) -> bool:
        """Whether the optional package this attack needs is not installed (False when it needs none)."""
        return self.requires is not None and importlib.util.find_spec(self.requires) is None

    @abstractmethod
    def touched(self, model: torch.nn.Module, context: AttackContext) -> dict[str, torch.nn.Parameter]:
        """The parameters :meth:`apply` may change."""

    @abstractmethod
    def apply(self, model: torch.nn.Module, context: AttackContext) -> dict[str, Any]:
        """Change the model in place; return what was done (for the record)."""


class WeightRoundingAttack(Attack):
    """An attack that replaces every target weight by a rounded version of itself (fake quantization)."""

    kind = "quantization"

    def touched(self, model, context):
        return weight_targets(model, context)

    @abstractmethod
    def round_weight(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """The rounded (dequantized) weight, same shape and dtype."""

    def apply(self, model: torch.nn.Module, context: AttackContext) -> dict[str, Any]:
        targets = self.touched(model, context)
        with torch.no_grad():
            for name, p in targets.items():
                p.copy_(self.round_weight(p, name))
        return {"scheme": self.name, "quantized": sorted(targets), "kept": kept_weights(model, targets)}


@contextmanager
def applied(attack: Attack, model: torch.nn.Module, context: AttackContext) -> Iterator[dict[str, Any]]:
    """Apply ``attack`` for the duration of the block, then restore the exact original weights."""
    touched = attack.touched(model, context)
    saved = {name: p.detach().clone() for name, p in touched.items()}
    was_training = model.training
    try:
        info = attack.apply(model, context)
        model.eval()
        yield info
    finally:
        with torch.no_grad():
            for name, p in touched.items():
                p.copy_(saved[name])
        model.train(was_training)
