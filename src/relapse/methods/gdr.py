"""GDR: gradient descent on the retain set, the plainest way to keep utility."""

from __future__ import annotations

import torch

from relapse.methods import losses
from relapse.methods.component import Batch, Regularizer


class GradientDescentRetain(Regularizer):
    name = "gdr"
    summary = "gradient descent on the retain set: + alpha * CE(retain)"

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return losses.gdr_loss(self.context.logits(model, batch), batch["labels"])
