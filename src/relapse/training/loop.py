"""The one training loop: fine-tuning and every unlearning method run through it.

A method supplies two things: ``batch_for_step(step, micro)`` (which data a micro-batch holds; a pure
function of the step, so a resumed run sees exactly the batches an uninterrupted run would) and
``loss_fn(model, batch) -> (loss, logs)``. The loop owns everything else: AdamW, the learning-rate
schedule, gradient accumulation and clipping, periodic evaluation with an early-stop rule, checkpoints
written atomically and resumed after a kill, and a progress bar.

Resuming restores weights, optimizer state, step, history and loss curve, so a killed and resumed run ends
with the same weights as an uninterrupted one (the models used here have no dropout; a test checks this).

Several processes (``accelerate launch``, ``torchrun``): the model and optimizer are wrapped by 🤗
accelerate for the strategy the accelerate config names (DDP, FSDP, DeepSpeed; FSDP on CPU processes is
torch's FSDP2, applied by relapse over accelerate's process group), each process trains on
its rows of every batch, the main process evaluates and writes checkpoints holding the full, gathered
state (see :mod:`relapse.training.parallel`). Alone, the loop never touches accelerate.

Devices: the loop trains the model where it is. Batches are built on the CPU (by pure functions of the
step) and moved to the model's device here, in one place, just before the loss. Checkpoints hold CPU
copies, so a run killed on a GPU can resume on a CPU or another GPU: the optimizer state is loaded onto
the current device of the weights it belongs to. On a CPU, resuming gives bit-identical weights; CUDA
kernels need not be bit-repeatable, so there a resumed run matches to float tolerance.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from tqdm.auto import tqdm

from relapse import options
from relapse.errors import ConfigError, DivergenceError
from relapse.models.io import all_finite, round_to_bfloat16_, save_model
from relapse.runtime import atomic_write_json, replace_dir
from relapse.training.parallel import (
    Distributed,
    barrier,
    distributed,
    is_main_process,
    meta_skeleton,
    peak_rss_mib,
)

SCHEDULES = ("constant", "linear", "cosine")
CHECKPOINT_DIR = "checkpoint"


@dataclass
class LoopConfig:
    """Optimisation settings shared by fine-tuning and unlearning."""

    lr: float = 1e-3
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    sam_rho: float | None = None
    eval_every: int = 100
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        # The method configs check their options first, by the same rules; this catches direct callers.
        check_loop_options(self)
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")

    @classmethod
    def from_settings(cls, settings: Any, steps_per_epoch: int) -> LoopConfig:
        """The loop settings of a method's config: every field it shares with :class:`LoopConfig`, and
        ``max_steps`` from ``settings.epochs`` (rounded up to whole steps) when that is set."""
        shared = {f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)}
        epochs = getattr(settings, "epochs", None)
        if epochs is not None:
            shared["max_steps"] = max(1, math.ceil(epochs * steps_per_epoch))
        return cls(**shared)


#: The loop's options as the CLI spells them, for error messages.
LOOP_FLAGS = {
    "lr": "--lr",
    "weight_decay": "--weight-decay",
    "max_grad_norm": "--max-grad-norm",
    "sam_rho": "--sam-rho",
    "epochs": "--epochs",
    "max_steps": "--steps",
    "batch_size": "--batch-size",
    "grad_accum": "--grad-accum",
    "warmup_steps": "--warmup-steps",
    "eval_every": "--eval-every",
    "checkpoint_every": "--checkpoint-every",
    "max_length": "max_length",
}
#: Whole-number options and their minimum.
_WHOLE = {
    "max_steps": 1,
    "batch_size": 1,
    "grad_accum": 1,
    "warmup_steps": 0,
    "eval_every": 1,
    "checkpoint_every": 1,
    "max_length": 2,
}


def check_loop_options(settings: Any, flags: dict[str, str] | None = None) -> None:
    """Refuse the loop options of ``settings`` (a loop, fine-tuning or unlearning config; fields it lacks
    are skipped) outside their range, NaN and infinities included, naming each by ``flags`` (default: as
    the CLI spells it). One rule for every config that trains."""
    names = {**LOOP_FLAGS, **(flags or {})}

    def present(field_name: str) -> bool:
        return hasattr(settings, field_name)

    options.positive(settings.lr, names["lr"])
    if present("weight_decay"):
        options.non_negative(settings.weight_decay, names["weight_decay"])
    for field_name in ("max_grad_norm", "sam_rho", "epochs"):
        if present(field_name):
            options.optional(options.positive, getattr(settings, field_name), names[field_name])
    for field_name, minimum in _WHOLE.items():
        if present(field_name):
            options.whole(getattr(settings, field_name), names[field_name], minimum)


def lr_at(step: int, config: LoopConfig) -> float:
    """Learning rate for optimisation step ``step`` (0-based): linear warm-up, then the schedule."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return config.lr
    span = max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class LoopResult:
    """What happened in a run of the loop."""

    steps: int
    stopped_early: bool
    wall_time_s: float
    resumed_from_step: int | None
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_curve: list[float] = field(default_factory=list)
    #: World size and strategy (``single``, ``ddp``, ``fsdp``, ``deepspeed``), as the record names them.
    distributed: dict[str, Any] = field(default_factory=lambda: {"world_size": 1, "strategy": "single"})
    #: The trained model as a plain module: the one passed in, except after a sharded run, where it is a
    #: copy holding the gathered weights. Not part of :meth:`to_dict`.
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The record's fields (the model left out)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "model"}


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's parameters (relapse keeps a model on one device)."""
    return next(model.parameters()).device


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors, possibly in nested dicts, lists or tuples) with every tensor on ``device``.

    A tensor already there is returned as is, so on the CPU this changes nothing at all.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


BatchFn = Callable[[int, int], Any]
LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]
StopFn = Callable[[dict[str, float]], bool]


def run_loop(
    model: torch.nn.Module,
    config: LoopConfig,
    batch_for_step: BatchFn,
    loss_fn: LossFn,
    *,
    run_key: str,
    work_dir: Path | None = None,
    evaluate: EvalFn | None = None,
    should_stop: StopFn | None = None,
    progress: bool = True,
    description: str = "training",
    before_step: Callable[[int], None] | None = None,
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    after_shard: Callable[[torch.nn.Module, Distributed], None] | None = None,
    emulate_bfloat16: bool = False,
) -> LoopResult:
    """Optimise ``model`` in place and return what happened.

    Args:
        model: parameters with ``requires_grad`` are trained, on the device they are on; every batch is
            moved there before ``loss_fn`` sees it.
        config: optimisation settings.
        batch_for_step: ``(step, micro_index) -> batch``; must depend on nothing but its arguments.
        loss_fn: ``(model, batch) -> (loss, logs)``; ``logs`` values are averaged into the progress bar.
        run_key: identifies the run; a checkpoint is resumed only when its key matches.
        work_dir: where checkpoints go (``work_dir/checkpoint``); None disables checkpoints.
        evaluate: called every ``eval_every`` steps and at the end; its dict goes into the history.
        should_stop: given the latest evaluation, whether to stop early.
        progress: show a progress bar (on a terminal).
        before_step: called with the step index before its micro-batches (e.g. to recompute a mask).
        after_backward: called once the step's gradients are complete, before clipping (e.g. to zero
            the gradients of frozen weights).
        after_step: called right after each optimiser step (e.g. to restore frozen weights).
        after_shard: called in every process with the sharded model and the group once the model is
            sharded (FSDP), before any step or resumed checkpoint (e.g. to point a mask at the shards).
        emulate_bfloat16: keep the trainable weights, their gradients and the Adam moments on bfloat16
            values while computing in float32 (see :data:`relapse.models.io.PRECISIONS`). The weights
            should start on bfloat16 values, as ``load_model(..., dtype="bfloat16-emulated")`` leaves them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL (under a data-parallel launcher) works on the current GPU
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    group = distributed(device)
    # ``wrapped`` is what the loss sees (DDP, FSDP or DeepSpeed around ``model``; ``model`` itself alone).
    wrapped, skeleton = model, None
    if group is not None:
        skeleton = meta_skeleton(model) if group.sharded else None  # before FSDP changes the module
        wrapped, optimizer = group.prepare(model, optimizer, config.max_grad_norm)
        params = [p for p in wrapped.parameters() if p.requires_grad]
        if group.sharded and after_shard is not None:
            after_shard(wrapped, group)
    is_main = group is None or group.is_main
    history: list[dict[str, Any]] = []
    loss_curve: list[float] = []
    start_step, elapsed_before = 0, 0.0
    resumed_from = None
    checkpoint = Path(work_dir) / CHECKPOINT_DIR if work_dir is not None else None
    if checkpoint is not None and (checkpoint / "state.json").exists():
        if group is None:
            state = _load_checkpoint(checkpoint, model, optimizer, run_key)
        else:
            state = _load_full_checkpoint(checkpoint, wrapped, optimizer, run_key, group)
        start_step, history, loss_curve = state["step"], state["history"], state["loss_curve"]
        elapsed_before = state["elapsed_s"]
        resumed_from = start_step
    saved_step = resumed_from  # the step of the checkpoint on disk, if any

    wrapped.train()
    started = time.perf_counter()
    stopped_early = bool(history and history[-1].get("stopped"))
    bar = tqdm(
        total=config.max_steps,
        initial=start_step,
        desc=description,
        disable=None if progress and is_main else True,  # None: shown on a terminal only
        dynamic_ncols=True,
        leave=False,
    )
    step = start_step
    try:
        while step < config.max_steps and not stopped_early:
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr_at(step, config)
            if before_step is not None:
                before_step(step)

            def gradients(step: int = step) -> tuple[float, dict[str, float]]:
                return _step_gradients(
                    wrapped, params, config, step, batch_for_step, loss_fn, group, device, emulate_bfloat16
                )

            total, logs_sum = gradients()
            if not math.isfinite(total):
                raise _diverged(f"the loss is {total}", step, config, description, checkpoint, saved_step)
            if after_backward is not None:
                after_backward()
            if config.sam_rho is not None:
                norm = group.grad_norm if group is not None else None
                _sharpness_aware_gradients(params, config.sam_rho, gradients, norm)
                if after_backward is not None:
                    after_backward()
            # A finite loss can still give NaN or infinite gradients (an overflow in the backward pass);
            # one step with them would leave NaN weights, and after the last step nothing would notice.
            finite = all_finite(_local(p.grad) for p in params if p.grad is not None)
            if not (finite if group is None else group.all_agree(finite)):
                raise _diverged(
                    "the gradient is not finite", step, config, description, checkpoint, saved_step
                )
            if config.max_grad_norm is not None:
                if group is None:
                    torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                else:
                    group.clip_grad_norm_(wrapped, config.max_grad_norm)
            optimizer.step()
            if emulate_bfloat16:
                round_to_bfloat16_(_local(p.data) for p in params)
                round_to_bfloat16_(_local(m) for m in _adam_moments(optimizer))
            if after_step is not None:
                after_step()
            step += 1
            loss_curve.append(total)
            bar.update(1)
            bar.set_postfix({"loss": f"{total:.4f}", **{k: f"{v:.4f}" for k, v in logs_sum.items()}})
            if evaluate is not None and (step % config.eval_every == 0 or step == config.max_steps):
                metrics = _evaluate(evaluate, model, wrapped, group, skeleton)
                wrapped.train()
                entry = {"step": step, "loss": total, **metrics}
                if should_stop is not None and should_stop(metrics):
                    entry["stopped"] = stopped_early = True
                history.append(entry)
                if is_main and progress:
                    bar.write(
                        f"{description}: step {step} "
                        + " ".join(f"{k}={_fmt(v)}" for k, v in entry.items() if k != "step")
                    )
            if checkpoint is not None and step % config.checkpoint_every == 0 and step < config.max_steps:
                elapsed = elapsed_before + time.perf_counter() - started
                progress_state = {"step": step, "history": history, "loss_curve": loss_curve}
                if group is None:
                    _save_checkpoint(checkpoint, model, optimizer, run_key, progress_state, elapsed)
                else:  # collective: every process gathers, the main one writes
                    model_state, optim_state = group.full_state(wrapped, optimizer)
                    if is_main:
                        _save_full_checkpoint(
                            checkpoint, model_state, optim_state, run_key, progress_state, elapsed, group
                        )
                    group.barrier()
                saved_step = step
    finally:
        bar.close()
    wrapped.eval()
    trained = model if group is None else group.plain_model(model, wrapped, skeleton)
    trained.eval()
    return LoopResult(
        steps=step,
        stopped_early=stopped_early,
        wall_time_s=elapsed_before + time.perf_counter() - started,
        resumed_from_step=resumed_from,
        history=history,
        loss_curve=loss_curve,
        distributed={
            **(group.describe() if group is not None else {"world_size": 1, "strategy": "single"}),
            "peak_rss_mib": group.peak_memory_mib() if group is not None else [peak_rss_mib()],
        },
        model=trained,
    )


def _evaluate(
    evaluate: EvalFn,
    model: torch.nn.Module,
    wrapped: torch.nn.Module,
    group: Distributed | None,
    skeleton: torch.nn.Module | None,
) -> dict[str, float]:
    """``evaluate`` on the plain model. With several processes the main one evaluates and every process
    gets its numbers, so all take the same early-stop decision (under sharding the weights are gathered
    into ``skeleton`` first: a shard cannot run alone)."""
    if group is None:
        return evaluate(model)
    plain = group.plain_model(model, wrapped, skeleton)
    metrics = evaluate(plain) if group.is_main else None
    return group.from_main(metrics)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (FSDP2 holds parameters and gradients as distributed tensors)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def _diverged(
    what: str,
    step: int,
    config: LoopConfig,
    description: str,
    checkpoint: Path | None,
    saved_step: int | None,
) -> DivergenceError:
    """The one-line error for a run that diverged at (0-based) ``step``, raised before that step changes
    the weights. The last checkpoint, written at a step whose loss and gradients were finite, is kept."""
    kept = ""
    if checkpoint is not None and saved_step is not None and (checkpoint / "state.json").exists():
        kept = f"; the checkpoint of step {saved_step} stays in {checkpoint.parent}"
    return DivergenceError(
        f"{description} diverged: {what} at step {step + 1} of {config.max_steps}; nothing was saved "
        f"(try a lower learning rate){kept}"
    )


def _step_gradients(
    model, params, config, step, batch_for_step, loss_fn, group, device, emulate_bfloat16
) -> tuple[float, dict[str, float]]:
    """Fill ``.grad`` with the step's gradient (all micro-batches; averaged over processes by the
    wrapper accelerate put around ``model``; on bfloat16 values when emulating) and return the step's
    mean loss (over processes too) and logs."""
    for p in params:
        p.grad = None
    logs_sum: dict[str, float] = {}
    total = 0.0
    for micro in range(config.grad_accum):
        batch = batch_for_step(step, micro)
        if group is not None:
            batch = group.shard(batch)
        loss, logs = loss_fn(model, to_device(batch, device))
        if group is None:
            (loss / config.grad_accum).backward()
        else:
            group.backward(loss / config.grad_accum)
        total += float(loss.detach()) / config.grad_accum
        for key, value in logs.items():
            logs_sum[key] = logs_sum.get(key, 0.0) + value / config.grad_accum
    if group is not None:
        total = group.mean(total)
    if emulate_bfloat16:
        round_to_bfloat16_(_local(p.grad) for p in params if p.grad is not None)
    return total, logs_sum


def _sharpness_aware_gradients(
    params, rho: float, gradients: Callable[[], Any], norm_of: Callable[[list], float] | None = None
) -> None:
    """Replace ``.grad`` by SAM's gradient (Foret et al. 2021): the gradient at the nearby weights
    ``w + rho * g / ||g||`` where the loss rises fastest, to be applied at ``w``.

    The weights are put back from a copy, not by subtracting, so they (and frozen weights) are
    bit-identical afterwards; a missing gradient counts as zero. ``norm_of`` gives the norm of the
    whole gradient when each process holds a shard of it (default: these gradients' own norm).
    """
    saved = [p.detach().clone() for p in params]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if norm_of is None:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    else:
        norm = norm_of(grads)
    scale = rho / (float(norm) + 1e-12)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g, alpha=scale)
    gradients()
    with torch.no_grad():
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)


def _adam_moments(optimizer: torch.optim.Optimizer):
    """AdamW's moment tensors (not its step counter, which must stay exact)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # inside accelerate's wrapper
    for state in optimizer.state.values():
        for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if name in state:
                yield state[name]


def work_dir_for(out: Path) -> Path:
    """Where a run that will save to ``out`` keeps its checkpoints: a hidden folder beside ``out``."""
    return out.with_name(f".{out.name}.work")


def claim_work_dir(out: Path, run_key: str, overwrite: bool) -> Path:
    """The work folder of a run that will save to ``out``. With ``overwrite``, a checkpoint there that
    belongs to another run, or cannot be read, is removed first: without it the run would refuse to
    start (a checkpoint of the same run is kept and resumed)."""
    work = work_dir_for(out)
    if overwrite and work.exists() and _checkpoint_key(work / CHECKPOINT_DIR) != run_key:
        shutil.rmtree(work, ignore_errors=True)
    return work


def _checkpoint_key(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))["run_key"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save_run(model, tokenizer, out: Path, record: dict[str, Any], record_name: str) -> None:
    """Save a finished run's model and record (main process only), drop its checkpoints, and wait
    for the other processes of a data-parallel group."""
    if is_main_process():
        save_model(model, tokenizer, out, record, record_name)
        shutil.rmtree(work_dir_for(out), ignore_errors=True)
    barrier()


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _save_checkpoint(path: Path, model, optimizer, run_key, progress_state, elapsed) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".checkpoint-"))
    save_safetensors_model(model, str(staging / "model.safetensors"))  # safetensors writes CPU bytes
    torch.save(to_device(optimizer.state_dict(), torch.device("cpu")), staging / "optimizer.pt")
    atomic_write_json(staging / "state.json", {"run_key": run_key, "elapsed_s": elapsed, **progress_state})
    replace_dir(staging, path)


def _save_full_checkpoint(
    path: Path, model_state, optim_state, run_key, progress_state, elapsed, group: Distributed
) -> None:
    """A checkpoint of a run of several processes: the gathered weights (each tensor its own copy, so
    tied weights do not trouble safetensors), the optimizer state keyed by parameter name, and the setup
    it was written under (resuming needs the same one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=".checkpoint-"))
    save_file({k: v.contiguous().clone() for k, v in model_state.items()}, str(staging / "model.safetensors"))
    torch.save(optim_state, staging / "optimizer.pt")
    state = {"run_key": run_key, "elapsed_s": elapsed, "distributed": group.describe(), **progress_state}
    atomic_write_json(staging / "state.json", state)
    replace_dir(staging, path)


def _damaged(path: Path) -> str:
    return f"the checkpoint in {path} is damaged; pass --overwrite to start again (or remove it)"


def _read_state(path: Path, run_key: str) -> dict[str, Any]:
    """A checkpoint's ``state.json``, refused unless it belongs to the run named ``run_key``."""
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError(_damaged(path)) from None
    if not isinstance(state, dict) or state.get("run_key") != run_key:
        raise ConfigError(
            f"the checkpoint in {path} belongs to a different run (settings or data changed); "
            "remove it, or pass --overwrite to start again"
        )
    return state


def _load_checkpoint(path: Path, model, optimizer, run_key) -> dict[str, Any]:
    damaged = _damaged(path)
    state = _read_state(path, run_key)
    if "distributed" in state:
        raise ConfigError(
            f"the checkpoint in {path} was written by {_setup_text(state['distributed'])}; resume it under "
            "the same launcher setup, or pass --overwrite to start again"
        )
    try:
        # The file holds CPU tensors; loading copies them into the parameters wherever those are.
        load_safetensors_model(model, str(path / "model.safetensors"))
        # Our own file, written by _save_checkpoint; weights_only refuses anything but tensors and plain
        # data. load_state_dict moves each state tensor to its parameter's device (AdamW's step counts
        # stay on the CPU, where AdamW keeps them).
        state_dict = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state_dict)
        for name in ("step", "history", "loss_curve", "elapsed_s"):
            state[name]
    except Exception:  # a truncated file, a refused pickle, missing fields: all mean start again
        raise ConfigError(damaged) from None
    return state


def _setup_text(setup: Any) -> str:
    if not isinstance(setup, dict):
        return "another setup"
    return f"{setup.get('world_size', '?')} processes ({setup.get('strategy', '?')})"


def _load_full_checkpoint(path: Path, wrapped, optimizer, run_key, group: Distributed) -> dict[str, Any]:
    """Resume a run of several processes from :func:`_save_full_checkpoint`'s files (every process reads
    them and keeps its shard); refused unless written by the same world size and strategy."""
    damaged = _damaged(path)
    state = _read_state(path, run_key)
    here = group.describe()
    written = state.get("distributed") or {"world_size": 1, "strategy": "single"}
    if {k: written.get(k) for k in ("world_size", "strategy")} != {
        k: here[k] for k in ("world_size", "strategy")
    }:
        raise ConfigError(
            f"the checkpoint in {path} was written by {_setup_text(written)}, this run has "
            f"{_setup_text(here)}; resume it under the same setup, or pass --overwrite to start again"
        )
    try:
        model_state = load_file(str(path / "model.safetensors"))
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        for name in ("step", "history", "loss_curve", "elapsed_s"):
            state[name]
    except Exception:  # a truncated file, a refused pickle, missing fields: all mean start again
        raise ConfigError(damaged) from None
    group.load_full_state(wrapped, optimizer, model_state, optim_state)
    return state
