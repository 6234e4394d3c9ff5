"""What an unlearning method is made of: a forget term and, optionally, a retain regulariser.

Each term is one small class in its own module (``methods/ga.py``, ``methods/npo.py``, ...), registered
by one line in :mod:`relapse.methods.registry`. A term declares what it needs from the unlearning run,
and owns its own precompute:

- ``uses_reference``: whether it needs the starting model's outputs (NPO, KLR, RMU's retain term). The
  run decides once, for all terms, whether those are precomputed or come from a frozen copy
  (:class:`Reference`); ``reference_bytes`` says how much memory a precompute would take and
  ``needs_reference_model`` forces the frozen copy (reference code's on-logits formulas need it).
- ``implied_regularizer``: a forget term that comes with its own retain term (RMU) names it, so the
  method ``rmu`` means ``rmu+act``.
- ``trainable``: which parameters may move (RMU moves only a few MLP weights); ``None`` means all.

``prepare`` runs once, before training, on the starting weights; ``loss`` runs on every batch and is
what the training loop minimises (the regulariser's is weighted by ``alpha``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from relapse.data.batching import Example, collate
from relapse.errors import ConfigError
from relapse.training.loop import to_device

if TYPE_CHECKING:
    from relapse.methods.unlearn import UnlearnConfig

Batch = dict[str, torch.Tensor]


def model_inputs(batch: Batch) -> Batch:
    """The model's inputs of a batch (it also carries labels and example indices)."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def indexed_batch(examples: list[Example], indices: list[int], pad_id: int) -> Batch:
    """``examples[indices]`` collated, with their indices (precomputed values are looked up by them)."""
    batch = collate([examples[i] for i in indices], pad_id)
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    return batch


def chunks(
    examples: list[Example], pad_id: int, size: int = 32, device: torch.device | None = None
) -> Iterator[Batch]:
    """All examples in order, as indexed batches of ``size`` (on ``device`` when given: these batches
    feed the model directly, not through the training loop that moves the others)."""
    for start in range(0, len(examples), size):
        batch = indexed_batch(examples, list(range(start, min(start + size, len(examples)))), pad_id)
        yield batch if device is None else to_device(batch, device)


def precompute_per_example(
    examples: list[Example],
    pad_id: int,
    device: torch.device,
    compute: Callable[[Batch], torch.Tensor],
    trim: int = 0,
) -> list[torch.Tensor]:
    """``compute(batch)`` (``[B, T, ...]``) for every example, without gradients, as one tensor per
    example cut to its own length less ``trim`` positions (padding is not kept)."""
    rows = []
    with torch.no_grad():
        for batch in chunks(examples, pad_id, device=device):
            values = compute(batch)
            for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
                rows.append(values[row, : length - trim].clone())
    return rows


def gather_padded(rows: list[torch.Tensor], indices: list[int], width: int) -> torch.Tensor:
    """``rows[indices]`` stacked into ``[len(indices), width, ...]``, zero-padded at the end."""
    picked = [rows[i] for i in indices]
    first = picked[0]
    out = torch.zeros(len(picked), width, *first.shape[1:], dtype=first.dtype, device=first.device)
    for r, values in enumerate(picked):
        out[r, : values.shape[0]] = values
    return out


@dataclass
class TermContext:
    """What every term of one unlearning run shares: its settings and how the model is run."""

    config: UnlearnConfig
    pad_id: int
    device: torch.device
    autocast: Callable[[], AbstractContextManager]

    def logits(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        """The model's logits on a batch, under the run's autocast setting."""
        with self.autocast():
            return model(**model_inputs(batch)).logits


class Reference:
    """The starting model's contribution to the terms that need it: precomputed, or a frozen copy.

    ``mode`` is ``precompute`` (each term computes what it needs once, in :meth:`Term.prepare`),
    ``model`` (a frozen copy of the starting model runs beside the trained one) or ``none``. With
    ``auto`` the copy is kept only when a term needs raw reference logits or the precompute would not fit
    ``budget_gb``. Both live on the model's device.
    """

    def __init__(
        self, model: torch.nn.Module, mode: str, *, needed: bool, fits: bool, needs_model: bool
    ) -> None:
        if mode == "auto":
            mode = "precompute" if fits and not needs_model else "model"
        if mode == "precompute" and needs_model:
            raise ConfigError("the muse-compatible variant needs reference logits: use --reference model")
        self.mode = mode if needed else "none"
        self.model: torch.nn.Module | None = None
        if self.mode == "model":
            self.model = copy.deepcopy(model).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)

    @property
    def precompute(self) -> bool:
        return self.mode == "precompute"

    def run(self, fn: Callable[[torch.nn.Module], torch.Tensor]) -> torch.Tensor:
        """``fn(frozen copy)`` without gradients."""
        with torch.no_grad():
            return fn(self.model)


class Term:
    """One term of an unlearning objective. Subclasses set the class attributes and ``loss``."""

    #: The registered name (``npo``, ``gdr``).
    name: ClassVar[str]
    #: One line for ``--help`` and the docs.
    summary: ClassVar[str]
    uses_reference: ClassVar[bool] = False
    implied_regularizer: ClassVar[str | None] = None
    #: Whether ``--variant muse-compatible`` changes this term (reference code's on-logits formulas).
    has_muse_variant: ClassVar[bool] = False

    def __init__(self, context: TermContext) -> None:
        self.context = context
        self.config = context.config
        self.reference: Reference | None = None

    def needs_reference_model(self) -> bool:
        """Whether this term needs the frozen copy itself, not precomputed values."""
        return False

    def reference_bytes(self, model: torch.nn.Module, examples: list[Example]) -> int:
        """Memory a precompute over ``examples`` would take."""
        return 0

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter] | None:
        """The parameters this term lets move, by name; ``None``: every parameter."""
        return None

    def prepare(self, model: torch.nn.Module, examples: list[Example], reference: Reference) -> None:
        """Precompute what the term needs from the starting model (called once, before training).

        Terms that override this call ``super().prepare`` first, which keeps ``reference``.
        """
        self.reference = reference

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings this term chose for itself, recorded in ``unlearn.json`` (empty by default)."""
        return {}


class ForgetTerm(Term):
    """A loss on forget batches; minimising it makes the forget data less likely."""


class Regularizer(Term):
    """A loss on retain batches that keeps the model's utility; weighted by ``alpha``."""
