"""NPO (Zhang et al. 2024): push each forget sequence's likelihood below the starting model's.

The starting model's summed log-likelihood of each forget example is precomputed once (one number per
example), or read from a frozen copy when ``--reference model`` is chosen or the ``muse-compatible``
variant (NPO on raw logits, as public reference code computes it) needs its logits.
"""

from __future__ import annotations

import torch

from relapse.data.batching import Example
from relapse.methods import losses
from relapse.methods.component import Batch, ForgetTerm, Reference, chunks, model_inputs


class NPO(ForgetTerm):
    name = "npo"
    summary = "negative preference optimisation on sequence log-likelihood ratios to the starting model"
    uses_reference = True
    has_muse_variant = True

    def needs_reference_model(self) -> bool:
        return self.config.variant == "muse-compatible"

    def prepare(self, model: torch.nn.Module, examples: list[Example], reference: Reference) -> None:
        super().prepare(model, examples, reference)
        self.reference_logp: torch.Tensor | None = None
        if reference.precompute:
            with torch.no_grad():
                self.reference_logp = torch.cat(
                    [
                        losses.sequence_logprob(model(**model_inputs(b)).logits, b["labels"])
                        for b in chunks(examples, self.context.pad_id, device=self.context.device)
                    ]
                )

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        logits = self.context.logits(model, batch)
        beta = self.config.beta
        if self.config.variant == "muse-compatible":
            reference_logits = self.reference.run(lambda m: m(**model_inputs(batch)).logits)
            return losses.npo_on_logits(logits, reference_logits, beta)
        seq_logp = losses.sequence_logprob(logits, batch["labels"])
        if self.reference_logp is not None:
            reference_logp = self.reference_logp[batch["index"]]
        else:
            reference_logp = self.reference.run(
                lambda m: losses.sequence_logprob(m(**model_inputs(batch)).logits, batch["labels"])
            )
        return losses.npo_loss(seq_logp, reference_logp, beta)
