"""GA: gradient ascent on the forget set, the simplest forget term."""

from __future__ import annotations

import torch

from relapse.methods import losses
from relapse.methods.component import Batch, ForgetTerm


class GradientAscent(ForgetTerm):
    name = "ga"
    summary = "gradient ascent: minimise -CE on the forget set"

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        return losses.ga_loss(self.context.logits(model, batch), batch["labels"])
