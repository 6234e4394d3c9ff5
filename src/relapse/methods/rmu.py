"""RMU (Li et al. 2024, WMDP, arXiv 2403.03218): scramble the forget data's hidden states at one layer.

On forget tokens the hidden state after decoder layer ``l`` (``--rmu-layer``) is pushed toward ``c * u``,
a fixed random unit vector ``u`` (drawn from the run's seed) scaled by ``c`` (``--rmu-coeff``); on retain
tokens the regulariser ``act`` keeps it equal to the starting model's. Only the MLP weights of layers
``l-2 .. l`` move, all three projections; every other parameter stays bit-identical. (WMDP's reference
setting moves the down projection alone of layers 5-7 when steering layer 7; relapse moves the whole
MLP of each layer, a choice of its own.) The forward pass stops at layer ``l``: nothing above it is
computed, except under DDP and FSDP, whose wrappers need each forward to finish (:func:`layer_output`).
"""

from __future__ import annotations

import torch

from relapse.data.batching import IGNORE_INDEX, Example
from relapse.errors import ConfigError
from relapse.methods import losses
from relapse.methods.component import (
    Batch,
    ForgetTerm,
    Reference,
    Regularizer,
    TermContext,
    gather_padded,
    model_inputs,
    precompute_per_example,
)
from relapse.methods.robust import GatheredRoundedView, RoundedView
from relapse.models.parts import decoder_layers, mlp_weights

#: How many layers below the steered one (inclusive of it) RMU updates.
UPDATED_LAYERS = 3


class _StopForward(Exception):
    """Raised by the capture hook: the layers above the steered one are not needed."""


def steered_layer(model: torch.nn.Module, layer: int | None) -> int:
    """``layer``, checked against the model's depth; ``None`` picks a quarter of the way up."""
    depth = len(decoder_layers(model))
    chosen = depth // 4 if layer is None else layer
    if not 0 <= chosen < depth:
        raise ConfigError(f"--rmu-layer must be between 0 and {depth - 1} for this model, got {layer}")
    return chosen


def layer_output(model: torch.nn.Module, batch: Batch, layer: int, context: TermContext) -> torch.Tensor:
    """The hidden states ``[B, T, H]`` leaving decoder layer ``layer``.

    The forward pass stops there, except through DDP or FSDP (several processes): DDP prepares its
    gradient averaging after the wrapped forward returns, so a forward cut short by an exception would
    leave each process training on its own gradient; under FSDP2 the root's post-forward hooks would
    never run (cut short, the 4-step test happened to end the same, but on state FSDP does not promise).
    There the layers above run too; their weights are frozen and the loss does not reach them, so the
    gradient is the same.
    """
    captured: dict[str, torch.Tensor] = {}
    stop = not _runs_to_the_end(model)

    def capture(module, args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(capture)
    try:
        with context.autocast():
            model(**model_inputs(batch))
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["hidden"]


def _runs_to_the_end(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model a rounded view of the robust objective runs) is wrapped for
    several processes in a way that needs its forward to finish: DDP, or FSDP2's sharded root."""
    wrappers: tuple[type, ...] = (torch.nn.parallel.DistributedDataParallel,)
    try:
        from torch.distributed.fsdp import FSDPModule

        wrappers += (FSDPModule,)
    except ImportError:  # a torch built without distributed support
        pass
    inner = getattr(model, "model", None) if isinstance(model, (RoundedView, GatheredRoundedView)) else None
    return isinstance(model, wrappers) or isinstance(inner, wrappers)


def _counted(batch: Batch) -> torch.Tensor:
    return batch["labels"] != IGNORE_INDEX


class RMU(ForgetTerm):
    name = "rmu"
    summary = (
        "RMU: steer layer --rmu-layer's hidden states on forget data to --rmu-coeff x a random unit "
        "vector; only MLP weights move (implies +act)"
    )
    implied_regularizer = "act"

    def prepare(self, model: torch.nn.Module, examples: list[Example], reference: Reference) -> None:
        super().prepare(model, examples, reference)
        self.layer = steered_layer(model, self.config.rmu_layer)
        generator = torch.Generator().manual_seed(self.config.seed)
        direction = torch.rand(model.config.hidden_size, generator=generator)
        self.control = (self.config.rmu_coeff * direction / direction.norm()).to(self.context.device)

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return mlp_weights(model, list(range(max(0, self.layer - UPDATED_LAYERS + 1), self.layer + 1)))

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        hidden = layer_output(model, batch, self.layer, self.context)
        return losses.activation_mse(hidden, self.control, _counted(batch))

    def describe(self) -> dict[str, object]:
        return {"layer": self.layer, "coeff": self.config.rmu_coeff, "updated_layers": UPDATED_LAYERS}


class ActivationRetain(Regularizer):
    name = "act"
    summary = "keep layer --rmu-layer's hidden states on retain data equal to the starting model's (RMU's)"
    uses_reference = True

    def reference_bytes(self, model: torch.nn.Module, examples: list[Example]) -> int:
        return sum(len(e.input_ids) for e in examples) * model.config.hidden_size * 4

    def prepare(self, model: torch.nn.Module, examples: list[Example], reference: Reference) -> None:
        super().prepare(model, examples, reference)
        self.layer = steered_layer(model, self.config.rmu_layer)
        self.reference_hidden: list[torch.Tensor] | None = None
        if reference.precompute:
            self.reference_hidden = precompute_per_example(
                examples,
                self.context.pad_id,
                self.context.device,
                lambda b: layer_output(model, b, self.layer, self.context),
            )

    def _reference_hidden(self, batch: Batch) -> torch.Tensor:
        if self.reference_hidden is None:
            return self.reference.run(lambda m: layer_output(m, batch, self.layer, self.context))
        return gather_padded(self.reference_hidden, batch["index"].tolist(), batch["input_ids"].shape[1])

    def loss(self, model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        hidden = layer_output(model, batch, self.layer, self.context)
        return losses.activation_mse(hidden, self._reference_hidden(batch), _counted(batch))
