"""A quantization-robust objective: unlearn the model as it will be served, not only as it is stored.

Unlearning that moves weights by less than a quantization step is undone by rounding
(docs/study-smollm2.md): the quantized unlearned model answers like the quantized target. With
``--robust-to GRIDS`` every step also computes the method's loss (forget term and regulariser alike) on
the weights as one of those grids rounds them, ``Q(w)``, with straight-through gradients
(``w + (Q(w) - w).detach()``: the value is ``Q(w)``, the gradient flows to ``w`` as if rounding were the
identity). The loss minimised is ``L(w) + L(Q(w))``, so the rounded model is trained to forget and to
keep its utility, not only the float one. One grid per step, in turn (step ``s`` uses grid ``s mod n``):
the cost is one extra forward and backward pass per step, whatever the number of grids. The stop rules
(``--stop-forget-recall``, ``--stop-forget-nll``) then read the worst of the float model and its rounded
versions: a run stops once the models its grids would serve have forgotten too.

Grids are attack names whose attack rounds weights (``rtn-w4-ch``, ``rtn-w4-g64``, ``bnb-nf4``,
``gguf-q4_1``, ...; see docs/attacks.md); ``default`` stands for RTN per channel and with groups of 64
and 128, bitsandbytes NF4 and FP4 when bitsandbytes is installed, and the grid the starting model's
weights were stored on when its provenance names one (a model fetched from a GGUF file, and everything
trained or unlearned from it). The rounded weights are the attacks' own: the decoder's linear layers.

Under FSDP2 (each weight split by rows over the processes; :meth:`RobustObjective.bind`) the rounded
view rounds each linear layer's gathered weight inside its forward, while FSDP holds it whole, so every
grid (block formats such as NF4 included) rounds exactly the tensor one process would; the straight-
through gradient reaches the gathered weight and FSDP averages and splits it like any other. The cost:
the rounded copies are kept for the backward pass, one full copy of the decoder's linear weights per
process while a step runs. The margin term is computed on each process's rows and averaged over the
moved weights of all processes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from relapse.errors import ConfigError

#: The margin term counts a weight as moved once it is this share of the grid's step from its start.
MOVED = 0.1
#: How far past the edge of the target's rounding cell (in steps) the margin term asks a moved weight
#: to go, so that rounding lands it in the next cell rather than on the edge.
BEYOND_EDGE = 0.05

#: What ``default`` stands for (bitsandbytes formats only where bitsandbytes is installed).
DEFAULT_GRIDS = ("rtn-w4-ch", "rtn-w4-g64", "rtn-w4-g128", "bnb-nf4", "bnb-fp4")


def check_grids(names: list[str]) -> None:
    """Refuse names that are not rounding attacks (``default`` is always accepted)."""
    from relapse.attacks.base import WeightRoundingAttack
    from relapse.attacks.registry import get_attack

    for name in names:
        if name == "default":
            continue
        if not isinstance(get_attack(name), WeightRoundingAttack):
            raise ConfigError(
                f"--robust-to takes grids that round weights (rtn-*, gguf-*, bnb-*), not {name!r}"
            )


def resolve_grids(names: list[str], model: str | Path) -> list[str]:
    """The grid names a run trains against: ``default`` expanded for ``model``, duplicates dropped."""
    from relapse.attacks.provenance import base_grid
    from relapse.attacks.registry import get_attack

    resolved: list[str] = []
    for name in names:
        if name != "default":
            resolved.append(name.strip().lower())
            continue
        resolved += [g for g in DEFAULT_GRIDS if not get_attack(g).package_missing()]
        grid = base_grid(model) if Path(str(model)).expanduser().exists() else None
        resolved += list((grid or {}).get("equivalent_attacks", [])[:1])
    return list(dict.fromkeys(resolved))


class RoundedView(torch.nn.Module):
    """``model`` run with some of its weights replaced (by straight-through rounded copies).

    A thin wrapper: its forward is the model's forward on the replacement weights
    (:func:`torch.func.functional_call`), hooks on the model's modules still fire, and gradients reach
    the model's own parameters through the replacements.
    """

    def __init__(self, model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.weights = weights

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.func.functional_call(self.model, self.weights, args, kwargs)


class GatheredRoundedView(torch.nn.Module):
    """``model``, sharded by FSDP2, run with each named linear weight replaced by its straight-through
    rounded copy. The rounding happens inside the linear layer's forward, where FSDP has gathered the
    weight whole (replacing the sharded parameters from outside, as :class:`RoundedView` does, would be
    undone by FSDP's own gathering); hooks on the model's modules still fire."""

    def __init__(self, model: torch.nn.Module, attack: Any, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.attack = attack
        self.names = names

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        modules = [(name, self.model.get_submodule(name.rsplit(".", 1)[0])) for name in self.names]
        try:
            for name, module in modules:
                module.forward = _rounded_linear(module, self.attack, name)
            return self.model(*args, **kwargs)
        finally:
            for _, module in modules:
                module.__dict__.pop("forward", None)


def _rounded_linear(module: torch.nn.Linear, attack: Any, name: str) -> Callable[..., torch.Tensor]:
    """A forward for ``module`` on its (gathered) weight as ``attack`` rounds it, straight-through."""

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        weight = module.weight
        if hasattr(weight, "to_local"):
            raise RuntimeError(f"{name} is still sharded inside its layer's forward")
        with torch.no_grad():
            rounded = attack.round_weight(weight.detach(), name)
        return torch.nn.functional.linear(inputs, weight + (rounded - weight).detach(), module.bias)

    return forward


class RobustObjective:
    """Builds, for a step, the view of the model through that step's grid."""

    def __init__(
        self, model: torch.nn.Module, names: list[str], model_path: str | Path, margin: bool = False
    ) -> None:
        from relapse.attacks.base import AttackContext
        from relapse.attacks.registry import get_attack

        explicit = {name for name in names if name != "default"}
        self.grids: list[str] = []
        self.attacks = []
        self.left_out: dict[str, str] = {}
        targets: dict[str, torch.nn.Parameter] | None = None
        for name in resolve_grids(names, model_path):
            attack = get_attack(name)
            # The weights the attacks round (the decoder's linear layers), by name.
            targets = targets if targets is not None else attack.touched(model, AttackContext())
            problem = _misfit(attack, targets)
            if problem is not None and name in explicit:
                raise ConfigError(f"--robust-to {name} cannot round this model: {problem}")
            if problem is not None:  # a default grid this model's shapes do not take (RTN g128 on 576)
                self.left_out[name] = problem
                continue
            self.grids.append(name)
            self.attacks.append(attack)
        if not self.grids:
            raise ConfigError("--robust-to: no grid can round this model")
        self.names = list(targets or {})
        # The margin term measures moves from the target's weights: kept now, before any step (a resumed
        # run builds this before its checkpoint is loaded, so it too keeps the target's).
        parameters = dict(model.named_parameters())
        self._start = {name: parameters[name].detach().clone() for name in self.names} if margin else None
        self._cells: dict[Any, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        #: Set by :meth:`bind` under FSDP2: the sharded weights, the rows each holds, the process group.
        self._sharded: dict[str, torch.nn.Parameter] | None = None
        self._spans: dict[str, slice | None] = {}
        self._group: Any = None

    def bind(self, model: torch.nn.Module, group: Any) -> None:
        """From now on act on ``model`` as sharded by FSDP2 (each weight a DTensor split by rows over the
        processes of ``group``, a :class:`~relapse.training.parallel.Distributed`): the view rounds the
        gathered weights inside each linear layer's forward, the margin term reads this process's rows."""
        from relapse.training.parallel import local_rows

        parameters = dict(model.named_parameters())
        self._sharded = {name: parameters[name] for name in self.names}
        self._spans = {name: local_rows(weight) for name, weight in self._sharded.items()}
        self._group = group
        if self._start is not None:  # keep this process's rows only (the grids round row by row)
            if self._cells:
                raise RuntimeError("bind the robust objective before its margin term first runs")
            self._start = {
                name: start if self._spans[name] is None else start[self._spans[name]].clone()
                for name, start in self._start.items()
            }
        for name in self.names:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if not (isinstance(module, torch.nn.Linear) and name.endswith(".weight")):
                raise ConfigError(f"--robust-to under FSDP rounds nn.Linear weights only, not {name}")

    def margin_loss(self, model: torch.nn.Module, step: int) -> torch.Tensor | None:
        """The margin term for ``grid_at(step)``: for every rounded weight that unlearning has moved by
        more than :data:`MOVED` of the grid's step from where it started (the target), how far it still
        is from leaving the target's rounding cell in the direction it moves, in steps, plus
        :data:`BEYOND_EDGE` (a hinge: zero once it is past the edge). Its gradient pushes each moved
        weight on across the boundary, so that rounding does not snap it back to the target's code.

        Uniform grids only (RTN, and GPTQ and AWQ, whose grids are RTN's), where the step is known; a
        step on NF4, FP4 or a GGUF grid adds nothing (None). The mean is over moved weights.
        """
        attack = self.attacks[step % len(self.attacks)]
        scheme = getattr(attack, "scheme", None)
        if scheme is None:
            return None
        from relapse.attacks.rtn import quantize

        if self._start is None:
            raise ValueError("RobustObjective(margin=True) keeps the starting weights the margin needs")
        if scheme not in self._cells:  # the target's cells on this grid: step sizes and centres
            self._cells[scheme] = {}
            for name, start in self._start.items():
                if start.shape[0] == 0:  # a process holding no rows of this weight (more than rows)
                    self._cells[scheme][name] = (start, start)
                    continue
                grid = quantize(start, scheme, name)
                self._cells[scheme][name] = (grid.step().to(start.dtype), grid.dequantize().to(start.dtype))
        parameters = self._sharded if self._sharded is not None else dict(unwrapped(model).named_parameters())
        total = torch.zeros((), device=self._start[self.names[0]].device)
        moved_count = 0
        for name in self.names:
            weight, start = parameters[name], self._start[name]
            step_size, centre = self._cells[scheme][name]
            if self._spans.get(name) is not None:  # its rows here (the gradient reaches the shard)
                weight = weight.to_local()
            with torch.no_grad():
                direction = torch.sign(weight - start)
                moved = (weight - start).abs() > MOVED * step_size
            if not bool(moved.any()):
                continue
            reach = direction * (weight - centre) / step_size  # in steps, past the cell's centre
            total = total + torch.relu(0.5 + BEYOND_EDGE - reach)[moved].sum()
            moved_count += int(moved.sum())
        if self._group is None:
            return total / max(moved_count, 1)
        # Sharded: the mean over the moved weights of every process. Each process's gradient is that of
        # its own rows (not averaged by FSDP: it reaches the shard directly); the value is the whole
        # term's in every process, so the loss the loop averages over the processes is the same.
        count = max(self._group.sum(moved_count), 1)
        whole = self._group.sum(float(total.detach())) / count
        local = total / count
        return local + (whole - local.detach())

    def grid_at(self, step: int) -> str:
        return self.grids[step % len(self.grids)]

    def view(self, model: torch.nn.Module, step: int) -> RoundedView:
        """The model as ``grid_at(step)`` rounds it, with straight-through gradients."""
        attack = self.attacks[step % len(self.attacks)]
        if self._sharded is not None:
            return GatheredRoundedView(model, attack, self.names)
        model = unwrapped(model)
        parameters = dict(model.named_parameters())
        weights = {}
        for name in self.names:
            weight = parameters[name]
            with torch.no_grad():
                rounded = attack.round_weight(weight.detach(), name)
            weights[name] = weight + (rounded - weight).detach()
        return RoundedView(model, weights)

    def rounded_metrics(
        self, model: torch.nn.Module, measure: Callable[[torch.nn.Module], dict[str, float]]
    ) -> dict[str, dict[str, float]]:
        """``measure(model)`` with the model's weights rounded by each grid in turn (restored after)."""
        from relapse.attacks.base import AttackContext, applied

        out = {}
        for name, attack in zip(self.grids, self.attacks, strict=True):
            with applied(attack, model, AttackContext()):
                out[name] = measure(model)
        return out

    def describe(self) -> dict[str, Any]:
        return {
            "grids": self.grids,
            "left_out": self.left_out,
            "rounded_weights": len(self.names),
            "schedule": "one grid per step",
        }


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (several processes), whose parameter names are the model's own.

    The rounded view calls the inner model directly: DDP still averages its gradients, because the
    same step's float loss went through the wrapper and DDP's hooks fire on each parameter's total
    gradient, whichever forward passes it came from."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _misfit(attack, targets: dict[str, torch.nn.Parameter]) -> str | None:
    """Why ``attack`` cannot round these weights (a group or block size that does not divide a row), or
    None. Tried on each weight's first row, which has the row length that matters."""
    for name, weight in targets.items():
        try:
            with torch.no_grad():
                attack.round_weight(weight.detach()[:1], name)
        except ConfigError as exc:
            return str(exc)
    return None
