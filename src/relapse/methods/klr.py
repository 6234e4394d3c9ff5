"""KLR: keep the next-token distributions on retain data close to the starting model's.

The starting model's log-softmax at every counted retain position is precomputed when it fits
``--reference-budget-gb`` (positions x vocabulary x 4 bytes); otherwise a frozen copy computes it per
batch. The ``muse-compatible`` variant reproduces reference code's "KL" of raw logits (not a divergence).
"""

from __future__ import annotations

import torch

from relapse.data.batching import Example
from relapse.methods import losses
from relapse.methods.component import (
    Batch,
    Reference,
    Regularizer,
    gather_padded,
    model_inputs,
    precompute_per_example,
)


class KLRetain(Regularizer):
    name = "klr"
    summary = "KL regulariser: + alpha * KL(p_start || p_theta) on retain tokens"
    uses_reference = True
    has_muse_variant = True

    def needs_reference_model(self) -> bool:
        return self.config.variant == "muse-compatible"

    def reference_bytes(self, model: torch.nn.Module, examples: list[Example]) -> int:
        vocab = model.get_output_embeddings().weight.shape[0]
        return sum(len(e.input_ids) - 1 for e in examples) * vocab * 4

    def prepare(self, model: torch.nn.Module, examples: list[Example], reference: Reference) -> None:
        super().prepare(model, examples, reference)
        self.reference_log_probs: list[torch.Tensor] | None = None
        if reference.precompute:
            self.reference_log_probs = precompute_per_example(
                examples,
                self.context.pad_id,
                self.context.device,
                lambda b: losses.reference_log_probs(model(**model_inputs(b)).logits),
                trim=1,
            )

    def _reference_next_token(self, batch: Batch) -> torch.Tensor:
        if self.reference_log_probs is None:
            return self.reference.run(lambda m: losses.reference_log_probs(m(**model_inputs(batch)).logits))
        width = batch["input_ids"].shape[1] - 1
        return gather_padded(self.reference_log_probs, batch["index"].tolist(), width)

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = self.context.logits(model, batch)
        if self.config.variant == "muse-compatible":
            reference_logits = self.reference.run(lambda m: m(**model_inputs(batch)).logits)
            return losses.kl_on_logits(logits, reference_logits)
        return losses.klr_loss(logits, self._reference_next_token(batch), batch["labels"])
