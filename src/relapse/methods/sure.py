"""SURE (Zhang et al., ICLR 2025): move only the weights most salient for the forget set.

Saliency of a weight tensor ("module") or of one output row of it ("neuron") is the norm of the forget
loss's gradient there, at the starting weights. The top ``top`` share of candidates (by default the
weights of every ``nn.Linear`` inside the decoder blocks; embeddings and the LM head never move) is
trained; everything else is frozen.

The mask is enforced three ways, so that it really holds whatever the optimiser does (AdamW's weight
decay moves parameters whose gradient is zero): fully frozen tensors are left out of the optimiser
(``requires_grad=False``); in partly frozen tensors the frozen rows' gradients are zeroed before
clipping, and their values are restored after every optimiser step. After training
:meth:`SaliencyMask.verify` checks, by hash, that every frozen element is bit-identical to the start.
The mask is computed once at the start by default; ``per_step`` recomputes it before every step on that
step's forget batch. Saliencies, masks and the saved frozen values live on the model's device.

Under FSDP2 (each weight split by rows over the processes) the mask is still computed before sharding,
on the whole model, identically in every process (a check compares it with the main process's); once
the model is sharded :meth:`SaliencyMask.bind` points it at the sharded weights, and each process zeroes
and restores the frozen rows it holds. The end check reads the gathered weights.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from relapse.errors import ConfigError
from relapse.models.parts import decoder_linear_weights

GRANULARITIES = ("module", "neuron")


def candidate_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Weights SURE may select: the decoder's ``nn.Linear`` weights (never embeddings or the LM head)."""
    return decoder_linear_weights(model)


def gradient_saliency(
    model: torch.nn.Module,
    forget_loss: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    granularity: str,
) -> dict[str, torch.Tensor]:
    """Saliency of each candidate: gradient norm of the forget loss summed over ``batches``.

    Returns a scalar per tensor for ``module`` granularity, a vector over output rows for ``neuron``.
    """
    if granularity not in GRANULARITIES:
        raise ConfigError(f"unknown SURE granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    candidates = candidate_parameters(model)
    if not candidates:
        raise ConfigError("SURE found no nn.Linear weights to select from in this model")
    previous = {name: (p.requires_grad, p.grad) for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in candidates.values():
        p.requires_grad_(True)
    try:
        for batch in batches:
            forget_loss(model, batch).backward()
        saliency = {}
        for name, p in candidates.items():
            grad = p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            saliency[name] = grad.norm() if granularity == "module" else grad.norm(dim=1)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(previous[name][0])
            p.grad = previous[name][1]
    return saliency


def select_top(saliency: dict[str, torch.Tensor], top: float) -> dict[str, torch.Tensor]:
    """Boolean keep-masks: the ``top`` share of all saliency entries with the largest values.

    Ties at the threshold are broken by order (tensor order, then row), so exactly
    ``ceil(top * count)`` entries are kept.
    """
    if not 0.0 < top <= 1.0:
        raise ConfigError(f"--sure-top must be in (0, 1], got {top}")
    names = list(saliency)
    flat = torch.cat([saliency[n].reshape(-1).float() for n in names])
    # round() first: 0.07 * 100 is 7.000000000000001 in floating point, and must keep 7, not 8.
    keep_count = max(1, math.ceil(round(top * flat.numel(), 9)))
    order = torch.sort(flat, descending=True, stable=True).indices[:keep_count]
    # On the saliency's device (the model's): indices on a GPU cannot index a CPU tensor.
    keep_flat = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep_flat[order] = True
    masks, offset = {}, 0
    for name in names:
        size = saliency[name].numel()
        masks[name] = keep_flat[offset : offset + size].reshape(saliency[name].shape)
        offset += size
    return masks


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:
        data = data.view(torch.int16)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


@dataclass
class SaliencyMask:
    """Which weights may move, and the machinery that keeps the others bit-identical.

    ``keep`` maps each candidate weight to a bool: a scalar for ``module`` granularity, one per output row
    for ``neuron``. With ``per_step`` the mask is recomputed before every optimiser step
    (:meth:`refresh`) and each step leaves the rows that were masked for it unchanged.
    """

    granularity: str
    top: float
    keep: dict[str, torch.Tensor]
    saliency: dict[str, torch.Tensor]
    per_step: bool = False
    refreshes: int = 0
    _params: dict[str, torch.nn.Parameter] = field(default_factory=dict, repr=False)
    #: The rows of each weight this process holds (under FSDP2; absent: all of them).
    _spans: dict[str, slice] = field(default_factory=dict, repr=False)
    _frozen_values: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _start_digests: dict[str, str] = field(default_factory=dict, repr=False)

    def attach(self, model: torch.nn.Module) -> None:
        """Freeze everything not selected and remember the frozen values (call before training)."""
        self._params, self._spans = dict(model.named_parameters()), {}
        missing = set(self.keep) - set(self._params)
        if missing:
            raise ConfigError(f"SURE mask names weights the model lacks: {sorted(missing)[:3]}")
        for name, p in self._params.items():
            keep = self.keep.get(name)
            # With a per-step mask every candidate may be selected at some step, so all stay trainable.
            p.requires_grad_(keep is not None and (self.per_step or bool(keep.any())))
        self._start_digests = {name: _digest(self._frozen_part(name)) for name in self._params}
        self._snapshot()

    def bind(self, model: torch.nn.Module, group: Any) -> None:
        """Point the mask at the weights of ``model`` once it is sharded by FSDP2 (each weight a DTensor
        split by rows): each process then zeroes the gradients of, and restores, the frozen rows it
        holds. ``group`` (:class:`~relapse.training.parallel.Distributed`) checks first that every
        process chose the main process's mask (each computed it on the whole model before sharding)."""
        from relapse.training.parallel import local_rows

        mine = _digest(torch.cat([self.keep[name].reshape(-1) for name in self.keep]))
        if not group.all_agree(mine == group.from_main(mine)):
            raise RuntimeError("SURE's mask differs between processes (a near tie in saliency)")
        params = dict(model.named_parameters())
        missing = set(self._params) - set(params)
        if missing:
            raise RuntimeError(f"sharding renamed weights SURE masks: {sorted(missing)[:3]}")
        self._params = {name: params[name] for name in self._params}
        self._spans = {}
        for name in self.keep:
            span = local_rows(self._params[name])
            if span is not None:
                self._spans[name] = span
        self._snapshot()

    def refresh(self, model: torch.nn.Module, forget_loss, batch) -> None:
        """Per-step mode: recompute saliency on ``batch`` at the current weights and select anew."""
        self.saliency = gradient_saliency(model, forget_loss, [batch], self.granularity)
        self.keep = select_top(self.saliency, self.top)
        self.refreshes += 1
        self._snapshot()

    def _full_rows(self, name: str) -> torch.Tensor:
        """The keep mask of a candidate as one bool per output row."""
        keep = self.keep[name]
        return keep.expand(self._params[name].shape[0]) if keep.dim() == 0 else keep

    def _rows(self, name: str) -> torch.Tensor:
        """The keep mask of the output rows this process holds (all of them unless sharded)."""
        rows = self._full_rows(name)
        span = self._spans.get(name)
        return rows if span is None else rows[span]

    def _data(self, name: str) -> torch.Tensor:
        """The weight's values this process holds (a view: writing to it writes the weight)."""
        return _local(self._params[name].detach())

    def _snapshot(self) -> None:
        self._frozen_values = {}
        with torch.no_grad():
            for name in self.keep:
                p = self._params[name]
                rows = self._rows(name)
                if p.requires_grad and not bool(rows.all()):
                    self._frozen_values[name] = self._data(name)[~rows].clone()

    def _frozen_part(self, name: str) -> torch.Tensor:
        p = self._params[name].detach()
        if name not in self.keep:
            return p
        return p[~self._full_rows(name)]

    def after_backward(self) -> None:
        """Zero the gradients of frozen rows, so that clipping and the optimiser never see them."""
        for name in self._frozen_values:
            grad = self._params[name].grad
            if grad is not None:
                _local(grad)[~self._rows(name)] = 0

    def after_step(self) -> None:
        """Put frozen rows back to their values before the step (undoes weight decay and momentum)."""
        with torch.no_grad():
            for name, values in self._frozen_values.items():
                self._data(name)[~self._rows(name)] = values

    def verify(self, model: torch.nn.Module | None = None) -> dict[str, Any]:
        """Check, by hash, that every element frozen from the start is bit-identical to the start.

        ``model``: the trained model as a plain module (after a sharded run, the one holding the gathered
        weights), which the check then reads; by default the weights the mask was attached to.
        A per-step mask has no fixed frozen set; there each step restores the rows masked for it, and
        the non-candidates (embeddings, LM head, norms) are what is checked.
        """
        if model is not None:
            params = dict(model.named_parameters())
            self._params, self._spans = {name: params[name] for name in self._params}, {}
        names = [n for n in self._params if n not in self.keep] if self.per_step else list(self._params)
        changed = [n for n in names if _digest(self._frozen_part(n)) != self._start_digests[n]]
        return {
            "frozen_elements_identical": not changed,
            "changed_tensors": changed,
            "checked_tensors": len(names),
        }

    def summary(self) -> dict[str, Any]:
        """What was selected (at the start, or at the last refresh for a per-step mask)."""
        total = sum(p.numel() for p in self._params.values())
        trainable = 0
        selected = []
        for name in self.keep:
            p = self._params[name]
            rows = int(self._full_rows(name).sum())
            trainable += rows * (p.numel() // p.shape[0])
            if self.granularity == "module" and rows:
                selected.append({"name": name, "saliency": float(self.saliency[name])})
            elif rows:
                selected.append({"name": name, "rows": rows, "of_rows": int(p.shape[0])})
        return {
            "granularity": self.granularity,
            "top": self.top,
            "per_step": self.per_step,
            "refreshes": self.refreshes,
            "candidates": len(self.keep),
            "selected": selected,
            "trainable_elements": trainable,
            "total_elements": total,
            "trainable_share": trainable / total if total else 0.0,
        }


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (FSDP2 holds weights and gradients as DTensors)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def build_mask(
    model: torch.nn.Module,
    forget_loss: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    top: float,
    granularity: str = "module",
    per_step: bool = False,
) -> SaliencyMask:
    """Compute saliency at the model's current weights and select the top share."""
    saliency = gradient_saliency(model, forget_loss, batches, granularity)
    return SaliencyMask(granularity, top, select_top(saliency, top), saliency, per_step=per_step)
