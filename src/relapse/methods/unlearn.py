"""Unlearning a model: a method (forget loss + regulariser), optionally SURE's mask, one training loop.

``unlearn_model`` loads the starting model, prepares forget and retain examples, computes what the
reference (the starting model) contributes once up front when it fits in memory (NPO's sequence
log-likelihoods, KLR's next-token distributions) and otherwise keeps a frozen copy, builds SURE's mask
if asked, then runs :func:`relapse.methods.loop.run_loop` and saves the result with ``unlearn.json``.

Everything runs on one device (``device``: a GPU when there is one, by default): the model, the frozen
reference copy, the precomputed reference values (stored on that device, where the losses use them) and
SURE's masks. Batches are built on the CPU and moved there. The device is recorded in ``unlearn.json``
but is not part of the cache key: the same settings on another device give the same model up to float
rounding.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from relapse.data.batching import EpochSampler, Example, collate, tokenize_answers_only, tokenize_for_lm
from relapse.data.benchmark import Benchmark, benchmark_files, load_benchmark
from relapse.data.prompts import qa_prompt, qa_text
from relapse.errors import ConfigError
from relapse.methods import losses
from relapse.methods.loop import (
    SCHEDULES,
    LoopConfig,
    model_device,
    run_loop,
    save_run,
    to_device,
    work_dir_for,
)
from relapse.methods.parallel import world_size
from relapse.methods.registry import VARIANTS, MethodSpec, parse_method
from relapse.methods.sure import GRANULARITIES, SaliencyMask, build_mask
from relapse.metrics.qa import qa_recall
from relapse.models.io import BFLOAT16_EMULATED, PRECISIONS, load_model, reuse_or_claim
from relapse.models.train import model_identity
from relapse.runtime import (
    cache_dir,
    hash_files,
    package_versions,
    resolve_device,
    seed_everything,
    set_threads,
    stable_hash,
)

RECORD_NAME = "unlearn.json"
UNLEARN_VERSION = 1
DATA_CHOICES = ("text", "qa", "text+qa")
TOKEN_CHOICES = ("all", "answer")
REFERENCE_CHOICES = ("auto", "precompute", "model")
WEIGHT_CHOICES = PRECISIONS


@dataclass
class UnlearnConfig:
    """Everything that determines an unlearned model; all fields but ``checkpoint_every`` are in its key."""

    method: str = "npo+gdr"
    alpha: float = 1.0
    beta: float = 0.1
    variant: str = "standard"
    lr: float = 1e-4
    max_steps: int = 200
    epochs: float | None = None
    batch_size: int = 16
    grad_accum: int = 1
    warmup_steps: int = 0
    schedule: str = "constant"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    data: str = "text+qa"
    tokens: str = "all"
    weights: str = "float32"
    autocast_bf16: bool = False
    reference: str = "auto"
    reference_budget_gb: float = 2.0
    sure_top: float | None = None
    sure_granularity: str = "module"
    sure_per_step: bool = False
    lora_r: int | None = None
    stop_forget_recall: float | None = None
    stop_forget_nll: float | None = None
    eval_every: int = 25
    checkpoint_every: int = 50
    max_length: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        self.spec  # noqa: B018 - validates the method name
        for name, value, choices in (
            ("--variant", self.variant, VARIANTS),
            ("--data", self.data, DATA_CHOICES),
            ("--tokens", self.tokens, TOKEN_CHOICES),
            ("--reference", self.reference, REFERENCE_CHOICES),
            ("--weights", self.weights, WEIGHT_CHOICES),
            ("--sure-granularity", self.sure_granularity, GRANULARITIES),
            ("--schedule", self.schedule, SCHEDULES),
        ):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.tokens == "answer" and self.data != "qa":
            raise ConfigError("--tokens answer needs --data qa (texts have no answer part)")
        if self.beta <= 0 or self.alpha < 0:
            raise ConfigError("--beta must be positive and --alpha non-negative")
        if self.sure_top is not None and not 0.0 < self.sure_top <= 1.0:
            raise ConfigError(f"--sure-top must be in (0, 1], got {self.sure_top}")
        if self.lora_r is not None and self.lora_r < 1:
            raise ConfigError(f"--lora-r must be at least 1, got {self.lora_r}")
        if self.lora_r is not None and self.sure_top is not None:
            raise ConfigError(
                "--lora-r and --sure-top cannot be combined: SURE masks the model's own weights"
            )
        if self.sure_per_step and self.sure_top is None:
            raise ConfigError("--sure-per-step needs --sure-top")
        if self.weights != "float32" and self.autocast_bf16:
            raise ConfigError("--autocast-bf16 is for float32 weights; bfloat16 weights need no autocast")

    @property
    def spec(self) -> MethodSpec:
        return parse_method(self.method)

    def key_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.pop("checkpoint_every")
        fields["method"] = self.spec.name
        return fields


@dataclass
class UnlearnResult:
    path: Path
    record: dict[str, Any]
    cached: bool


def _examples(benchmark: Benchmark, split: str, config: UnlearnConfig, tokenizer) -> list[Example]:
    texts = benchmark.texts(split) if "text" in config.data.split("+") else []
    pairs = benchmark.qa(split) if "qa" in config.data.split("+") else []
    if config.tokens == "answer":
        return tokenize_answers_only(
            tokenizer, [qa_prompt(p.question) for p in pairs], [p.answer for p in pairs], config.max_length
        )
    return tokenize_for_lm(tokenizer, texts + [qa_text(p) for p in pairs], config.max_length)


class Reference:
    """What the starting model contributes to NPO and KLR: precomputed, or a frozen copy.

    Both live on the model's device: the frozen copy because it runs on the same batches, the
    precomputed values because the losses combine them with the trained model's outputs there.
    """

    def __init__(
        self, model, forget: list[Example], retain: list[Example], config: UnlearnConfig, pad_id: int
    ) -> None:
        spec = config.spec
        self.model = None
        self.forget_logp: torch.Tensor | None = None
        self.retain_log_probs: list[torch.Tensor] | None = None
        needs_logits = config.variant == "muse-compatible" and spec.needs_reference
        device = model_device(model)
        vocab = model.get_output_embeddings().weight.shape[0]
        klr_bytes = sum(len(e.input_ids) - 1 for e in retain) * vocab * 4 if spec.regularizer == "klr" else 0
        fits = klr_bytes <= config.reference_budget_gb * 2**30
        mode = config.reference
        if mode == "auto":
            mode = "precompute" if fits and not needs_logits else "model"
        if mode == "precompute" and needs_logits:
            raise ConfigError("the muse-compatible variant needs reference logits: use --reference model")
        self.mode = mode if spec.needs_reference else "none"
        if self.mode == "model":
            self.model = copy.deepcopy(model).eval()
            for p in self.model.parameters():
                p.requires_grad_(False)
        elif self.mode == "precompute":
            with torch.no_grad():
                if spec.forget == "npo":
                    self.forget_logp = torch.cat(
                        [
                            losses.sequence_logprob(model(**_inputs(b)).logits, b["labels"])
                            for b in _chunks(forget, pad_id, device=device)
                        ]
                    )
                if spec.regularizer == "klr":
                    self.retain_log_probs = []
                    for batch in _chunks(retain, pad_id, device=device):
                        log_probs = losses.reference_log_probs(model(**_inputs(batch)).logits)
                        for row, length in enumerate(batch["attention_mask"].sum(dim=1).tolist()):
                            self.retain_log_probs.append(log_probs[row, : length - 1].clone())

    def forget_sequence_logp(self, batch) -> torch.Tensor:
        if self.forget_logp is not None:
            return self.forget_logp[batch["index"]]
        with torch.no_grad():
            return losses.sequence_logprob(self.model(**_inputs(batch)).logits, batch["labels"])

    def retain_next_token_log_probs(self, batch) -> torch.Tensor:
        if self.retain_log_probs is not None:
            width = batch["input_ids"].shape[1] - 1
            rows = [self.retain_log_probs[i] for i in batch["index"].tolist()]
            out = torch.zeros(len(rows), width, rows[0].shape[-1], dtype=rows[0].dtype, device=rows[0].device)
            for r, values in enumerate(rows):
                out[r, : values.shape[0]] = values
            return out
        with torch.no_grad():
            return losses.reference_log_probs(self.model(**_inputs(batch)).logits)

    def logits(self, batch) -> torch.Tensor:
        with torch.no_grad():
            return self.model(**_inputs(batch)).logits


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _chunks(examples: list[Example], pad_id: int, size: int = 32, device: torch.device | None = None):
    """All examples in order, as indexed batches of ``size`` (on ``device`` when given: these batches
    feed the model directly, not through the training loop that moves the others)."""
    for start in range(0, len(examples), size):
        batch = _indexed_batch(examples, list(range(start, min(start + size, len(examples)))), pad_id)
        yield batch if device is None else to_device(batch, device)


def _indexed_batch(examples: list[Example], indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate([examples[i] for i in indices], pad_id)
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    return batch


def unlearn_cache_key(model: str, data_dir: Path, config: UnlearnConfig) -> str:
    return stable_hash(
        {
            "unlearn_version": UNLEARN_VERSION,
            "model": model_identity(model),
            "data": hash_files(benchmark_files(data_dir)),
            "config": config.key_fields(),
        }
    )


def unlearn_model(
    model: str | Path,
    data_dir: str | Path,
    out: str | Path | None,
    config: UnlearnConfig | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | None = "auto",
) -> UnlearnResult:
    """Unlearn the forget set of ``data_dir`` from ``model`` and save the result to ``out``.

    ``out=None`` keeps the result in the cache (``$RELAPSE_CACHE/unlearned/<key>``); an ``out`` that
    already holds this exact run is returned at once. ``device`` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``) is where the work runs; it is recorded, not part of the cache key.
    """
    config = config or UnlearnConfig()
    target = resolve_device(device)  # a bad --device fails before any work
    spec = config.spec
    data_dir = Path(data_dir)
    benchmark = load_benchmark(data_dir)
    key = unlearn_cache_key(str(model), data_dir, config)
    out_path = Path(out) if out is not None else cache_dir() / "unlearned" / key
    existing = reuse_or_claim(out_path, key, RECORD_NAME, overwrite)
    if existing is not None:
        return UnlearnResult(out_path, existing, cached=True)
    threads_used = set_threads(threads)
    seed_everything(config.seed)
    net, tokenizer = load_model(str(model), dtype=config.weights, device=str(target))
    pad_id = tokenizer.pad_token_id
    forget = _examples(benchmark, "forget", config, tokenizer)
    retain = _examples(benchmark, "retain", config, tokenizer) if spec.needs_retain else []
    if not forget:
        raise ConfigError(f"no forget examples for --data {config.data} (is forget_qa.jsonl empty?)")
    if spec.needs_retain and not retain:
        raise ConfigError(f"{spec.name} needs retain examples, and --data {config.data} gives none")
    # A CPU copy: only weight_change reads it, and it should not double the model's GPU memory.
    start_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
    reference = Reference(net, forget, retain, config, pad_id)

    forget_sampler = EpochSampler(len(forget), config.batch_size, config.seed)
    retain_sampler = EpochSampler(max(1, len(retain)), config.batch_size, config.seed + 1)
    # Autocast is per device type: a CPU autocast would leave CUDA matrix products in float32.
    autocast = torch.autocast(target.type, dtype=torch.bfloat16) if config.autocast_bf16 else nullcontext()

    def forget_loss(model: torch.nn.Module, batch) -> torch.Tensor:
        with autocast:
            logits = model(**_inputs(batch)).logits
        if spec.forget == "ga":
            return losses.ga_loss(logits, batch["labels"])
        if config.variant == "muse-compatible":
            return losses.npo_on_logits(logits, reference.logits(batch), config.beta)
        seq_logp = losses.sequence_logprob(logits, batch["labels"])
        return losses.npo_loss(seq_logp, reference.forget_sequence_logp(batch), config.beta)

    def retain_loss(model: torch.nn.Module, batch) -> torch.Tensor:
        with autocast:
            logits = model(**_inputs(batch)).logits
        if spec.regularizer == "gdr":
            return losses.gdr_loss(logits, batch["labels"])
        if config.variant == "muse-compatible":
            return losses.kl_on_logits(logits, reference.logits(batch))
        return losses.klr_loss(logits, reference.retain_next_token_log_probs(batch), batch["labels"])

    def batch_for_step(step: int, micro: int) -> dict[str, Any]:
        position = step * config.grad_accum + micro
        batch = {"forget": _indexed_batch(forget, forget_sampler.indices(position), pad_id)}
        if spec.needs_retain:
            batch["retain"] = _indexed_batch(retain, retain_sampler.indices(position), pad_id)
        return batch

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]):
        loss_f = forget_loss(model, batch["forget"])
        logs = {"forget": float(loss_f.detach())}
        if not spec.needs_retain:
            return loss_f, logs
        loss_r = retain_loss(model, batch["retain"])
        logs["retain"] = float(loss_r.detach())
        return loss_f + config.alpha * loss_r, logs

    mask: SaliencyMask | None = None
    if config.sure_top is not None:
        batches = _chunks(forget, pad_id, device=target)
        mask = build_mask(
            net, forget_loss, batches, config.sure_top, config.sure_granularity, per_step=config.sure_per_step
        )
        mask.attach(net)
    if config.lora_r is not None:
        net = _wrap_lora(net, config.lora_r)

    def refresh_mask(step: int) -> None:
        mask.refresh(net, forget_loss, to_device(batch_for_step(step, 0)["forget"], target))

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {
            "recall_forget": qa_recall(model, tokenizer, benchmark.forget_qa)["value"],
            "recall_retain": qa_recall(model, tokenizer, benchmark.retain_qa)["value"],
            "nll_forget": forget_nll(model, forget, pad_id),
        }

    def should_stop(metrics: dict[str, float]) -> bool:
        recall_done = (
            config.stop_forget_recall is not None and metrics["recall_forget"] <= config.stop_forget_recall
        )
        nll_done = config.stop_forget_nll is not None and metrics["nll_forget"] >= config.stop_forget_nll
        return recall_done or nll_done

    loop_config = LoopConfig.from_settings(config, forget_sampler.steps_per_epoch)
    result = run_loop(
        net,
        loop_config,
        batch_for_step,
        loss_fn,
        run_key=key,
        work_dir=work_dir_for(out_path),
        evaluate=evaluate,
        should_stop=should_stop,
        progress=progress,
        description=f"unlearn {spec.name}",
        before_step=refresh_mask if mask is not None and config.sure_per_step else None,
        after_backward=mask.after_backward if mask else None,
        after_step=mask.after_step if mask else None,
        emulate_bfloat16=config.weights == BFLOAT16_EMULATED,
    )
    if config.lora_r is not None:
        net = net.merge_and_unload()
    sure = None
    if mask is not None:
        sure = {**mask.summary(), **mask.verify()}
        if not sure["frozen_elements_identical"]:
            # A bug in relapse, not bad input: keep the traceback.
            raise RuntimeError(f"SURE mask did not hold for {sure['changed_tensors']}")
    record = {
        "kind": "relapse-unlearn",
        "cache_key": key,
        "method": spec.name,
        "config": asdict(config),
        "model": str(model),
        "model_identity": model_identity(str(model)),
        "data": {"path": str(data_dir.resolve()), "hash": hash_files(benchmark_files(data_dir))},
        "seed": config.seed,
        "threads": threads_used,
        "device": str(target),
        "world_size": world_size(),
        "versions": package_versions(),
        "reference": reference.mode,
        "examples": {"forget": len(forget), "retain": len(retain)},
        "final": evaluate(net),
        "weight_change": weight_change(start_state, net.state_dict()),
        "sure": sure,
        **result.to_dict(),
    }
    save_run(net, tokenizer, out_path, record, RECORD_NAME)
    return UnlearnResult(out_path, record, cached=False)


def _wrap_lora(model: torch.nn.Module, rank: int) -> torch.nn.Module:
    """LoRA adapters (rank ``rank``, alpha ``2 * rank``) on every linear layer but the LM head."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("--lora-r needs the peft package: pip install 'relapse[lora]'") from None
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))


@torch.no_grad()
def forget_nll(model: torch.nn.Module, examples: list[Example], pad_id: int) -> float:
    """Mean cross-entropy per counted token over all forget examples (higher = more forgotten)."""
    total, count = 0.0, 0
    for batch in _chunks(examples, pad_id, device=model_device(model)):
        picked, mask = losses.token_logprobs(model(**_inputs(batch)).logits, batch["labels"])
        total -= float(picked.sum())
        count += int(mask.sum())
    return total / max(count, 1)


def weight_change(start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Mean |dW| over all weights and per tensor, and how many elements moved at all (computed on the
    device of ``start``, which may differ from the trained model's)."""
    per_tensor = {}
    total_abs, total, moved = 0.0, 0, 0
    for name, before in start.items():
        delta = (end[name].detach().to(before.device).float() - before.float()).abs()
        per_tensor[name] = float(delta.mean())
        total_abs += float(delta.sum())
        total += delta.numel()
        moved += int((delta > 0).sum())
    return {
        "mean_abs": total_abs / max(total, 1),
        "moved_share": moved / max(total, 1),
        "per_tensor": per_tensor,
    }
