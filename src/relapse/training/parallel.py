"""Several processes for one run, on 🤗 accelerate: data parallel (DDP), FSDP full sharding, DeepSpeed.

A launcher (``accelerate launch --config_file configs/accelerate/X.yaml``, or ``torchrun``) starts the
processes and sets ``WORLD_SIZE``/``RANK``; the accelerate config file chooses the strategy, and
:class:`Distributed` wraps the model and optimizer with :class:`accelerate.Accelerator` accordingly.

FSDP on the CPU is the exception: accelerate (1.16) promotes a config's FSDP only on GPUs and other
accelerators and would wrap CPU processes in plain DDP, so there relapse shards the model itself with
torch's FSDP2 (:func:`torch.distributed.fsdp.fully_shard`, each decoder layer and then the root, full
sharding) over the gloo process group accelerate set up, whose collectives it still uses
(:attr:`Distributed.self_sharded`). What relapse keeps for itself, and why:

- **Which rows each process trains on.** Every global batch is built by a pure function of the step (as
  in a single process, so resuming sees the same data), and rank ``r`` takes rows ``r, r + world, ...``
  (:meth:`Distributed.shard`). Example indices travel with the rows, so precomputed per-example values
  (NPO's reference log-likelihoods, KLR's distributions) are looked up by each process for its own rows.
  accelerate's data-loader sharding is not used: it would make the batches depend on a loader's state.
- **Checkpoints hold the full state** (the gathered weights as one safetensors file and the optimizer
  state keyed by parameter name), written by the main process, so a sharded run resumes, and the saved
  model is a plain model whatever the strategy (:meth:`Distributed.full_state`).
- **The trained model handed back** is a plain module: under FSDP the gathered weights are loaded into
  a copy built on the meta device (no memory until filled), since the sharded module cannot run alone.
- **Evaluation runs on the main process** and its numbers are broadcast, so every process takes the same
  early-stop decision even where GPU kernels are not bit-repeatable.

A single process (no launcher, or a launcher with one process and no sharding config) never builds an
:class:`~accelerate.Accelerator`: the loop then runs exactly as it always has, so its numbers (pinned by
``tests/test_method_pins.py``) cannot move, and nothing needs accelerate installed.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from relapse.errors import ConfigError

#: The strategies relapse runs, as recorded in ``train.json`` / ``unlearn.json``.
STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")


def world_size() -> int:
    """How many processes share the work (1 when run alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a launched group."""
    return int(os.environ.get("RANK", "0")) == 0


def requested_strategy() -> str:
    """The strategy the launcher's accelerate config asks for (``accelerate launch`` passes the config on
    in ``ACCELERATE_USE_*`` variables): ``fsdp``, ``deepspeed``, ``ddp`` for several processes without
    either, ``single`` otherwise."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _env_flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return "ddp" if world_size() > 1 else "single"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def setup() -> dict[str, Any]:
    """The distributed setup a record names: world size and strategy (``single`` when run alone)."""
    return {"world_size": world_size(), "strategy": requested_strategy()}


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports KiB, macOS bytes)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def barrier() -> None:
    """Wait for every process of the group (no-op when run alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@dataclass
class Distributed:
    """This process's place in a launched group, and the accelerate machinery that trains in it."""

    accelerator: Any  # accelerate.Accelerator (imported only when launched)
    strategy: str
    #: True when relapse shards the model with torch's FSDP2 itself (FSDP on CPU processes, which
    #: accelerate would run as DDP); the Accelerator then provides the process group and collectives.
    self_sharded: bool = False

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
        return self.strategy in ("fsdp", "deepspeed")

    def describe(self) -> dict[str, Any]:
        """What the record and the checkpoint say about the setup."""
        described: dict[str, Any] = {"world_size": self.world, "strategy": self.strategy}
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.self_sharded:
            described.update(fsdp_version=2, sharded_by="torch")
        elif self.strategy == "fsdp" and plugin is not None:
            described["fsdp_version"] = getattr(plugin, "fsdp_version", 1)
        return described

    def peak_memory_mib(self) -> list[float]:
        """Each process's peak resident memory so far, in MiB, in rank order (collective)."""
        from accelerate.utils import gather_object

        return [float(x) for x in gather_object([peak_rss_mib()])]

    def shard(self, batch: Any) -> Any:
        """This process's rows of a batch (dicts of tensors, nested); all rows if there are too few."""
        return shard_rows(batch, self.rank, self.world)

    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, max_grad_norm: float | None
    ) -> tuple[torch.nn.Module, Any]:
        """Wrap model and optimizer for the strategy (DDP, FSDP units, a DeepSpeed engine)."""
        if self.self_sharded:
            return fully_shard_model(model, optimizer, self.world), optimizer
        if self.strategy == "deepspeed":
            plugin = self.accelerator.state.deepspeed_plugin
            # DeepSpeed clips inside its engine; "auto" in the shipped config takes relapse's setting.
            plugin.deepspeed_config["gradient_clipping"] = max_grad_norm or 0.0
            plugin.deepspeed_config["gradient_accumulation_steps"] = 1
            plugin.deepspeed_config.setdefault("train_micro_batch_size_per_gpu", 1)
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad_norm_(self, wrapped: torch.nn.Module, max_norm: float) -> None:
        """Clip by the norm of the whole gradient, over all shards (FSDP1 needs every parameter of the
        wrapped model passed, frozen ones included; DeepSpeed clips in its engine; under relapse's own
        FSDP2 torch's clipping takes the norm over the distributed gradients, so over all shards)."""
        if self.self_sharded:
            torch.nn.utils.clip_grad_norm_([p for p in wrapped.parameters() if p.grad is not None], max_norm)
        elif self.strategy != "deepspeed":
            self.accelerator.clip_grad_norm_(wrapped.parameters(), max_norm)

    def grad_norm(self, grads: list[torch.Tensor]) -> float:
        """The norm of the whole gradient: the local one under DDP (every process holds all of it), the
        sum of squares over processes when each holds a shard."""
        squares = sum(float(_local(g).float().pow(2).sum()) for g in grads)
        if self.sharded:
            squares = self.sum(squares)
        return squares**0.5

    def sum(self, value: float) -> float:
        """The sum of a number over the processes."""
        tensor = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(tensor, reduction="sum"))

    def mean(self, value: float) -> float:
        """The mean of a number over the processes."""
        return self.sum(value) / self.world

    def all_agree(self, flag: bool) -> bool:
        """True only if ``flag`` is true in every process (so that all raise, or none, together)."""
        return self.sum(0.0 if flag else 1.0) == 0.0

    def from_main(self, value: Any) -> Any:
        """The main process's ``value`` in every process (any picklable object)."""
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def full_state(self, wrapped: torch.nn.Module, optimizer: Any) -> tuple[dict, dict]:
        """The full (gathered) model and optimizer state on the CPU, keyed by parameter name; collective:
        every process calls it, and every process gets the full state (the main one writes it)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=False)
        model_state, optim_state = get_state_dict(wrapped, _inner(optimizer), options=options)
        return _to_cpu(model_state), _to_cpu(optim_state)

    def load_full_state(
        self, wrapped: torch.nn.Module, optimizer: Any, model_state: dict, optim_state: dict
    ) -> None:
        """Load a full state (as :meth:`full_state` returns) into the wrapped model and optimizer, each
        process keeping its own shard."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(
            wrapped,
            _inner(optimizer),
            model_state_dict=model_state,
            optim_state_dict=optim_state,
            options=StateDictOptions(full_state_dict=True, strict=False),
        )

    def plain_model(self, model: torch.nn.Module, wrapped: torch.nn.Module, skeleton: Any) -> torch.nn.Module:
        """The trained model as a plain module in every process: ``model`` itself under DDP (it is the
        wrapped module's own); under sharding the gathered weights loaded into ``skeleton``."""
        if not self.sharded:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True))
        device = self.accelerator.device
        skeleton.to_empty(device=device)
        skeleton.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
        if hasattr(skeleton, "tie_weights"):
            skeleton.tie_weights()
        return skeleton


def shard_rows(batch: Any, rank: int, world: int) -> Any:
    """Rows ``rank, rank + world, ...`` of every tensor of a (nested) batch; all rows if there are fewer
    than ``world`` (averaging then changes nothing)."""
    if isinstance(batch, dict):
        return {key: shard_rows(value, rank, world) for key, value in batch.items()}
    if isinstance(batch, torch.Tensor) and batch.dim() > 0 and batch.shape[0] >= world:
        return batch[rank::world]
    return batch


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``model``'s structure with its tensors on the meta device (no memory), to be filled
    with the gathered weights once a sharded run ends. Made before wrapping: FSDP changes the module."""
    memo: dict[int, Any] = {}
    for p in model.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=p.requires_grad)
    for b in model.buffers():
        memo[id(b)] = b.detach().to("meta")
    # deepcopy looks every object up in the memo first: each tensor becomes its meta copy (tied weights
    # stay tied), and nothing real is copied.
    return copy.deepcopy(model, memo)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly distributed) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _to_cpu(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return _local(state).detach().to("cpu")
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_to_cpu(value) for value in state)
    return state


def distributed(device: torch.device) -> Distributed | None:
    """The launched group this process belongs to, with its Accelerator; None when run alone.

    FSDP on the CPU, which accelerate (1.16) would run as plain DDP (it promotes a config's FSDP only on
    GPUs and other accelerators), is sharded by relapse itself with torch's FSDP2 over accelerate's gloo
    group (:func:`fully_shard_model`). Refuses, with a one-line error, any other setup accelerate would
    run other than as asked, DeepSpeed without a GPU or without the deepspeed package, and FSDP settings
    relapse's own sharding does not honour.
    """
    strategy = requested_strategy()
    if strategy == "single":
        return None
    if strategy == "deepspeed":
        if device.type != "cuda":
            raise ConfigError("DeepSpeed needs GPUs; on the CPU use configs/accelerate/ddp-cpu.yaml")
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise ConfigError(
                "the DeepSpeed config needs the deepspeed package: pip install deepspeed"
            ) from None
    try:
        from accelerate import Accelerator
        from accelerate.utils import DistributedType
    except ImportError:
        raise ConfigError("several processes need the accelerate package: pip install accelerate") from None
    threads = torch.get_num_threads()
    accelerator = Accelerator(cpu=device.type == "cpu")
    # On the CPU accelerate sets torch's threads to cores / processes when OMP_NUM_THREADS is unset;
    # relapse has already chosen them (--threads, RELAPSE_THREADS) and records them.
    torch.set_num_threads(threads)
    actual = {
        DistributedType.FSDP: "fsdp",
        DistributedType.DEEPSPEED: "deepspeed",
    }.get(accelerator.distributed_type, "ddp")
    if strategy == "fsdp" and actual == "ddp" and device.type == "cpu":
        refuse_fsdp_settings_not_applied()
        return Distributed(accelerator, "fsdp", self_sharded=True)
    if actual != strategy:
        import accelerate

        raise ConfigError(
            f"the accelerate config asks for {strategy.upper()}, but accelerate {accelerate.__version__} "
            f"runs it as {actual.upper()} on {device.type.upper()} (its FSDP needs a GPU); relapse refuses "
            "rather than run unsharded: use configs/accelerate/ddp-cpu.yaml on the CPU"
        )
    return Distributed(accelerator, actual)


def refuse_fsdp_settings_not_applied() -> None:
    """Refuse the accelerate FSDP settings (passed on as ``FSDP_*`` variables) that relapse's own FSDP2
    sharding on the CPU would not apply, rather than ignore them."""
    if os.environ.get("FSDP_VERSION", "2") != "2":
        raise ConfigError(
            "on the CPU relapse shards with torch's FSDP2 itself; set fsdp_version: 2 in the accelerate "
            "config (configs/accelerate/fsdp-cpu.yaml)"
        )
    for name, setting in (
        ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
        ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing"),
    ):
        if _env_flag(name):
            raise ConfigError(
                f"{setting} is not supported by relapse's own FSDP2 sharding on the CPU; set it to false "
                "(configs/accelerate/fsdp-cpu.yaml)"
            )


def fully_shard_model(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, world: int
) -> torch.nn.Module:
    """Shard ``model`` in place with torch's FSDP2 over every process of the default group (full
    sharding, each parameter split along its first dimension): each decoder layer is its own unit, the
    rest (embeddings, final norm, an untied or tied head) the root's. ``optimizer``, built on the
    unsharded parameters and not stepped yet, is pointed at the sharded ones by name.

    The decoder layers are the modules whose class the accelerate config names
    (``fsdp_transformer_layer_cls_to_wrap``) or, by default, the classes transformers marks as not to be
    split (``_no_split_modules``, e.g. ``LlamaDecoderLayer``); failing both, the model's
    ``get_decoder().layers``.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if any(optimizer.state.values()):
        raise RuntimeError("the optimizer must not have stepped before sharding")
    names = {id(p): name for name, p in model.named_parameters()}
    groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() != "false"
    mesh = init_device_mesh("cpu", (world,))
    for layer in reversed(decoder_layers(model)):  # inner units before any that contain them
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
    sharded = dict(model.named_parameters())
    for group, group_names in zip(optimizer.param_groups, groups, strict=True):
        group["params"] = [sharded[name] for name in group_names]
    if hasattr(model, "config") and getattr(model.config, "tie_word_embeddings", False):
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        if outputs is not None and outputs.weight is not inputs.weight:
            raise RuntimeError("sharding untied the tied input and output embeddings")
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformer, each to be its own FSDP unit (see :func:`fully_shard_model`)."""
    named = os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").strip()
    classes = {c.strip() for c in named.split(",") if c.strip()} if named else set()
    if not classes:
        classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if m is not model and type(m).__name__ in classes]
    if layers:
        return layers
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return list(getattr(decoder, "layers", []))


#: Why an option cannot run when each process holds a shard of the weights (FSDP, DeepSpeed ZeRO-3).
_SHARDED_REFUSALS = {
    "--sure-per-step": (
        "recomputing SURE's mask at every step changes which weights train after the sharded optimizer "
        "is built; a mask chosen once at the start (--sure-top alone) runs under FSDP2"
    ),
    "--lora-r": "LoRA adapters under sharding are not supported yet",
}
#: What runs under FSDP2 (each weight a DTensor split by rows: SURE's row masks map to each process's
#: rows, the robust objective rounds the gathered weights inside each decoder layer's forward, RMU's
#: forward runs to the end) but not where the weights are flat shards: FSDP1 and DeepSpeed ZeRO-3.
_FLAT_SHARD_REFUSALS = {
    "--sure-top": "SURE masks rows of whole weight tensors, which this sharding flattens and splits",
    "--robust-to": "the robust objective rounds whole weight tensors, which this sharding flattens",
    "rmu": (
        "RMU's forward stops at its layer, which leaves this sharding's layers above half gathered "
        "(relapse runs it to the end under DDP and FSDP2 only)"
    ),
}
#: And why more cannot run under DeepSpeed, whose engine takes the optimiser step inside the backward
#: pass: nothing can act on the complete gradient, or on the weights, between the two.
_DEEPSPEED_REFUSALS = {
    "--sam-rho": "SAM needs a second gradient before the step, and DeepSpeed steps inside backward",
    "--grad-accum": "DeepSpeed accumulates in its own engine; use a larger --batch-size",
    "bfloat16-emulated": "the emulation rounds weights after each step, which DeepSpeed's engine holds",
}


def refuse_unsupported(strategy: str, features: dict[str, bool], fsdp_version: int = 2) -> None:
    """Refuse, with a one-line error naming the option, what cannot work under ``strategy``.

    ``features`` maps an option as the CLI spells it (a key of the tables above) to whether the run
    uses it; ``fsdp_version`` is the FSDP a ``fsdp`` strategy runs (:func:`requested_fsdp_version`).
    Called before any work, so a refused run costs nothing.
    """
    why = dict(_SHARDED_REFUSALS) if strategy in ("fsdp", "deepspeed") else {}
    if strategy == "deepspeed" or (strategy == "fsdp" and fsdp_version != 2):
        why.update(_FLAT_SHARD_REFUSALS)
    if strategy == "deepspeed":
        why.update(_DEEPSPEED_REFUSALS)
    name = "FSDP1" if strategy == "fsdp" and fsdp_version != 2 else strategy.upper()
    for option, used in features.items():
        if used and option in why:
            raise ConfigError(
                f"{option} cannot run under {name}: {why[option]}; use DDP (configs/accelerate/ddp.yaml)"
            )


def requested_fsdp_version(device: torch.device) -> int:
    """The FSDP version a run on ``device`` gets: 2 on the CPU (relapse's own FSDP2; a config asking for
    1 is refused there), elsewhere the accelerate config's ``fsdp_version`` (accelerate's default, 1,
    when it names none)."""
    if device.type == "cpu":
        return 2
    return int(os.environ.get("FSDP_VERSION", "1") or "1")


def local_rows(tensor: torch.Tensor) -> slice | None:
    """The rows (along dim 0) of a full tensor that this process holds of ``tensor``: None for a plain
    tensor (it holds all of them), the slice of its shard for a DTensor split along dim 0, as FSDP2
    splits every parameter (``torch.chunk`` over the processes: ceil(rows / world) each, the last ones
    shorter or empty)."""
    if not hasattr(tensor, "to_local"):
        return None
    from torch.distributed.tensor import Shard

    placements = tuple(tensor.placements)
    if len(placements) != 1 or not (isinstance(placements[0], Shard) and placements[0].dim == 0):
        raise RuntimeError(f"expected a tensor sharded along dim 0 over one mesh dimension, got {placements}")
    mesh = tensor.device_mesh
    rows, world, rank = tensor.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // world)
    start = min(rank * chunk, rows)
    span = slice(start, min(start + chunk, rows))
    if span.stop - span.start != tensor.to_local().shape[0]:
        raise RuntimeError(f"a shard of {rows} rows holds {tensor.to_local().shape[0]}, not rows {span}")
    return span
