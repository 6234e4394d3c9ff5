"""Unlearning a model: a method (forget loss + regulariser), optionally SURE's mask, one training loop.

``unlearn_model`` loads the starting model, prepares forget and retain examples, computes what the
reference (the starting model) contributes once up front when it fits in memory (NPO's sequence
log-likelihoods, KLR's next-token distributions) and otherwise keeps a frozen copy, builds SURE's mask
if asked, then runs :func:`relapse.training.loop.run_loop` and saves the result with ``unlearn.json``.

Everything runs on one device (``device``: a GPU when there is one, by default): the model, the frozen
reference copy, the precomputed reference values (stored on that device, where the losses use them) and
SURE's masks. Batches are built on the CPU and moved there. The device is recorded in ``unlearn.json``
but is not part of the cache key: the same settings on another device give the same model up to float
rounding.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from relapse import options
from relapse.data.batching import EpochSampler, Example, tokenize_answers_only, tokenize_for_lm
from relapse.data.benchmark import Benchmark, benchmark_files, load_benchmark
from relapse.data.prompts import qa_prompt, qa_text
from relapse.errors import ConfigError
from relapse.methods import losses
from relapse.methods.component import Reference, TermContext, chunks, indexed_batch, model_inputs
from relapse.methods.registry import VARIANTS, MethodSpec, method_names, parse_method
from relapse.methods.robust import RobustObjective, check_grids
from relapse.methods.select import DEFAULT_UTILITY_FLOOR, select_run, utility_check
from relapse.methods.sure import GRANULARITIES, SaliencyMask, build_mask
from relapse.metrics.qa import qa_recall
from relapse.models.cached_run import open_cached_run
from relapse.models.io import BFLOAT16_EMULATED, PRECISIONS, load_model, model_identity
from relapse.runtime import (
    RunContext,
    cached_json,
    hash_files,
    resolve_device,
    stable_hash,
)
from relapse.training.loop import (
    SCHEDULES,
    LoopConfig,
    check_loop_options,
    claim_work_dir,
    model_device,
    run_loop,
    save_run,
    to_device,
)
from relapse.training.parallel import (
    refuse_unsupported,
    requested_fsdp_version,
    requested_strategy,
    world_size,
)

RECORD_NAME = "unlearn.json"
UNLEARN_VERSION = 1
DATA_CHOICES = ("text", "qa", "text+qa")
TOKEN_CHOICES = ("all", "answer")
REFERENCE_CHOICES = ("auto", "precompute", "model")
WEIGHT_CHOICES = PRECISIONS
#: Fields added after UNLEARN_VERSION 1; at their defaults they leave the cache key unchanged.
ADDED_FIELDS = (
    "simnpo_beta",
    "simnpo_gamma",
    "rmu_layer",
    "rmu_coeff",
    "sam_rho",
    "robust_to",
    "robust_margin",
    "select_lr",
    "utility_floor",
)


@dataclass
class UnlearnConfig:
    """Everything that determines an unlearned model; all fields but ``checkpoint_every`` are in its key
    (and ``lr`` when ``select_lr`` chooses it)."""

    method: str = field(
        default="npo+gdr", metadata=options.option("(default %(default)s)", choices=method_names)
    )
    alpha: float = field(default=1.0, metadata=options.option("regulariser weight (default %(default)s)"))
    beta: float = field(default=0.1, metadata=options.option("NPO temperature (default %(default)s)"))
    variant: str = field(
        default="standard",
        metadata=options.option(
            "'muse-compatible' reproduces public reference code's formulas (NPO on raw logits, KL of raw "
            "logits); they are not the published losses (default standard)",
            choices=VARIANTS,
        ),
    )
    lr: float = field(default=1e-4, metadata=options.option("learning rate (default %(default)s)"))
    max_steps: int = field(
        default=200,
        metadata=options.option("maximum steps (default %(default)s)", flag="--steps", exclusive="length"),
    )
    epochs: float | None = field(
        default=None, metadata=options.option("epochs over the forget set instead", exclusive="length")
    )
    batch_size: int = field(default=16, metadata=options.option("(default %(default)s)"))
    grad_accum: int = field(
        default=1, metadata=options.option("gradient accumulation steps (default %(default)s)")
    )
    warmup_steps: int = field(default=0, metadata=options.option("(default %(default)s)"))
    schedule: str = field(
        default="constant",
        metadata=options.option(
            "learning-rate schedule after warm-up (default %(default)s)", choices=SCHEDULES
        ),
    )
    weight_decay: float = field(default=0.0, metadata=options.option("AdamW weight decay (default 0)"))
    max_grad_norm: float | None = field(
        default=1.0,
        # 0 (only 0) turns clipping off; anything else, negative or NaN included, is checked below.
        metadata=options.option("clip norm (default 1; 0 = off)", off=0),
    )
    data: str = field(
        default="text+qa",
        metadata=options.option(
            "which forget/retain examples to train on (default %(default)s)",
            flag="--unlearn-data",
            choices=DATA_CHOICES,
        ),
    )
    tokens: str = field(
        default="all",
        metadata=options.option(
            "tokens that count in the losses: all, or answer tokens only (needs --unlearn-data qa)",
            choices=TOKEN_CHOICES,
        ),
    )
    weights: str = field(
        default="float32",
        metadata=options.option(
            "weight precision while unlearning: bfloat16 = no float32 master copy; bfloat16-emulated = "
            "the same rounding with float32 arithmetic, for CPUs (default float32)",
            choices=WEIGHT_CHOICES,
        ),
    )
    autocast_bf16: bool = field(
        default=False, metadata=options.option("bfloat16 autocast over float32 weights")
    )
    reference: str = field(
        default="auto",
        metadata=options.option(
            "NPO/KLR reference: precompute once, keep a frozen model copy, or auto (default)",
            choices=REFERENCE_CHOICES,
        ),
    )
    reference_budget_gb: float = 2.0
    sure_top: float | None = field(
        default=None,
        metadata=options.option("SURE: train only this share of the most salient weights (e.g. 0.1)"),
    )
    sure_granularity: str = field(
        default="module",
        metadata=options.option(
            "SURE saliency per weight tensor or per output row (default module)", choices=GRANULARITIES
        ),
    )
    sure_per_step: bool = field(default=False, metadata=options.option("recompute SURE's mask at every step"))
    simnpo_beta: float = field(
        default=2.5, metadata=options.option("SimNPO temperature (default %(default)s)")
    )
    simnpo_gamma: float = field(default=0.0, metadata=options.option("SimNPO margin (default %(default)g)"))
    rmu_layer: int | None = field(
        default=None,
        metadata=options.option(
            "RMU: the decoder layer whose output is steered (default: a quarter of the way up)"
        ),
    )
    rmu_coeff: float = field(
        default=20.0, metadata=options.option("RMU: the steering vector's norm c (default %(default)g)")
    )
    sam_rho: float | None = field(
        default=None,
        metadata=options.option(
            "sharpness-aware minimisation with this neighbourhood radius, on any method (e.g. 0.05)"
        ),
    )
    robust_to: list[str] | None = field(
        default=None,
        metadata=options.option(
            "also compute the loss on the weights as these grids round them (rtn-w4-ch, bnb-nf4, "
            "gguf-q4_1, ...; 'default': RTN per channel, g64 and g128, NF4, FP4 and the base model's grid), "
            "with straight-through gradients, one grid per step",
            metavar="GRID",
        ),
    )
    robust_margin: float | None = field(
        default=None,
        metadata=options.option(
            "with --robust-to: add WEIGHT x a hinge that pushes every weight unlearning moves across the "
            "edge of the target's rounding cell on uniform (RTN) grids, so rounding cannot snap it back",
            metavar="WEIGHT",
        ),
    )
    select_lr: list[float] | None = field(
        default=None,
        metadata=options.option(
            "try these learning rates (largest first) and keep the run that reaches the forget target "
            "with the highest retain recall; needs --stop-forget-recall or --stop-forget-nll",
            metavar="LR",
        ),
    )
    utility_floor: float = field(
        default=DEFAULT_UTILITY_FLOOR,
        metadata=options.option(
            "a run whose retain recall ends below this share of the starting model's is marked "
            "over-unlearned (default %(default)g)"
        ),
    )
    lora_r: int | None = field(
        default=None, metadata=options.option("train LoRA adapters of this rank (merged on save)")
    )
    stop_forget_recall: float | None = field(
        default=None, metadata=options.option("stop once forget-set QA recall is at or below this")
    )
    stop_forget_nll: float | None = field(
        default=None,
        metadata=options.option("stop once the forget examples' mean token NLL (nats) is at or above this"),
    )
    eval_every: int = field(default=25, metadata=options.option("(default %(default)s)"))
    checkpoint_every: int = field(default=50, metadata=options.option("(default %(default)s)"))
    max_length: int = 256
    seed: int = field(default=0, metadata=options.option("random seed (default %(default)s)"))

    def __post_init__(self) -> None:
        self.spec  # noqa: B018 - validates the method name
        self._check_numbers()
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
        if self.variant != "standard" and not any(t.has_muse_variant for t in self.spec.terms):
            raise ConfigError(
                f"--variant {self.variant} changes npo and klr only, and {self.spec.name} has neither"
            )
        if self.tokens == "answer" and self.data != "qa":
            raise ConfigError("--tokens answer needs --data qa (texts have no answer part)")
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
        if self.select_lr is not None:
            if not isinstance(self.select_lr, list | tuple) or not self.select_lr:
                raise ConfigError("--select-lr needs at least one learning rate")
            if not all(isinstance(x, int | float) and 0 < x < math.inf for x in self.select_lr):
                raise ConfigError(f"--select-lr takes positive, finite learning rates, got {self.select_lr}")
            self.select_lr = sorted({float(x) for x in self.select_lr}, reverse=True)
        if not 0 < self.utility_floor <= 1:
            raise ConfigError(f"--utility-floor must be in (0, 1], got {self.utility_floor}")
        if self.robust_to is not None:
            if not isinstance(self.robust_to, list | tuple) or not self.robust_to:
                raise ConfigError("--robust-to needs at least one grid (or 'default')")
            self.robust_to = [str(name).strip().lower() for name in self.robust_to]
            check_grids(self.robust_to)
            if self.lora_r is not None:
                raise ConfigError(
                    "--robust-to rounds the model's own weights; it cannot be combined with --lora-r"
                )
        if self.robust_margin is not None:
            if self.robust_to is None:
                raise ConfigError("--robust-margin adds to --robust-to's objective; give --robust-to too")
            if not 0 <= self.robust_margin < math.inf:
                raise ConfigError(f"--robust-margin must be finite and >= 0, got {self.robust_margin}")
        if self.spec.forget == "rmu" and (self.lora_r is not None or self.sure_top is not None):
            raise ConfigError("rmu chooses its own trainable weights: it takes no --lora-r or --sure-top")
        if self.weights != "float32" and self.autocast_bf16:
            raise ConfigError("--autocast-bf16 is for float32 weights; bfloat16 weights need no autocast")

    def _check_numbers(self) -> None:
        """Refuse every numeric option outside its range, NaN and infinities included, before any work:
        a NaN ``--alpha`` or a negative ``--max-grad-norm`` would otherwise run to the end and save a
        meaningless model (options with no CLI flag are named by their field)."""
        check_loop_options(self)
        for value, option in (
            (self.beta, "--beta"),
            (self.simnpo_beta, "--simnpo-beta"),
            (self.rmu_coeff, "--rmu-coeff"),
            (self.reference_budget_gb, "reference_budget_gb"),
        ):
            options.positive(value, option)
        options.non_negative(self.alpha, "--alpha")
        options.non_negative(self.simnpo_gamma, "--simnpo-gamma")
        options.optional(options.in_range, self.stop_forget_recall, "--stop-forget-recall", 0.0, 1.0)
        # A forget NLL is positive, so a target at or below zero would stop a run at its first check.
        options.optional(options.positive, self.stop_forget_nll, "--stop-forget-nll")

    @property
    def spec(self) -> MethodSpec:
        return parse_method(self.method)

    def key_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        fields.pop("checkpoint_every")
        fields["method"] = self.spec.name
        # Options added after the first version enter the key only when set, so that runs cached before
        # they existed keep their keys.
        defaults = UnlearnConfig.__dataclass_fields__
        for name in ADDED_FIELDS:
            if fields[name] == defaults[name].default:
                fields.pop(name)
        if self.select_lr is not None:
            fields.pop("lr")  # the sweep chooses it
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


def _reference(model: torch.nn.Module, config: UnlearnConfig, terms_and_examples) -> Reference:
    """How the starting model's outputs reach the terms that need them (decided once for all terms)."""
    terms = [(term, examples) for term, examples in terms_and_examples if term is not None]
    budget = sum(term.reference_bytes(model, examples) for term, examples in terms)
    return Reference(
        model,
        config.reference,
        needed=any(term.uses_reference for term, _ in terms),
        fits=budget <= config.reference_budget_gb * 2**30,
        needs_model=any(term.needs_reference_model() for term, _ in terms),
    )


def _restrict_trainable(model: torch.nn.Module, *terms) -> None:
    """Freeze every parameter that no term lets move, when a term restricts them (RMU)."""
    allowed: dict[str, torch.nn.Parameter] | None = None
    for term in terms:
        chosen = term.trainable(model) if term is not None else None
        if chosen is not None:
            allowed = {**(allowed or {}), **chosen}
    if allowed is None:
        return
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in allowed)


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
    run: RunContext | None = None,
) -> UnlearnResult:
    """Unlearn the forget set of ``data_dir`` from ``model`` and save the result to ``out``.

    ``out=None`` keeps the result in the cache (``$RELAPSE_CACHE/unlearned/<key>``); an ``out`` that
    already holds this exact run is returned at once. ``run.device`` (``auto``, ``cpu``, ``cuda``,
    ``cuda:N``) is where the work runs; it is recorded, not part of the cache key.
    """
    config = config or UnlearnConfig()
    run = run or RunContext()
    target = resolve_device(run.device)  # a bad --device fails before any work
    spec = config.spec
    refuse_unsupported(
        requested_strategy(),
        {
            "--sure-top": config.sure_top is not None,
            "--sure-per-step": config.sure_per_step,
            "--robust-to": config.robust_to is not None,
            "rmu": spec.forget == "rmu",
            "--lora-r": config.lora_r is not None,
            "--sam-rho": config.sam_rho is not None,
            "--grad-accum": config.grad_accum > 1,
            "bfloat16-emulated": config.weights == BFLOAT16_EMULATED,
        },
        fsdp_version=requested_fsdp_version(target),
    )
    data_dir = Path(data_dir)
    benchmark = load_benchmark(data_dir)
    key = unlearn_cache_key(str(model), data_dir, config)
    opened = open_cached_run(out, key, RECORD_NAME, run.overwrite, cache="unlearned")
    if opened.cached:
        return UnlearnResult(opened.out, opened.existing, cached=True)
    if config.select_lr is not None:

        def run_one(candidate: UnlearnConfig) -> UnlearnResult:
            return unlearn_model(model, data_dir, None, candidate, replace(run, overwrite=False))

        return select_run(model, data_dir, opened.out, key, config, run_one)
    opened.start(run.threads, config.seed)
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
    # Autocast is per device type: a CPU autocast would leave CUDA matrix products in float32.
    context = TermContext(
        config=config,
        pad_id=pad_id,
        device=target,
        autocast=(lambda: torch.autocast(target.type, dtype=torch.bfloat16))
        if config.autocast_bf16
        else nullcontext,
    )
    forget_term = spec.terms[0](context)
    retain_term = spec.terms[1](context) if spec.needs_retain else None
    reference = _reference(net, config, [(forget_term, forget), (retain_term, retain)])
    forget_term.prepare(net, forget, reference)
    if retain_term is not None:
        retain_term.prepare(net, retain, reference)
    _restrict_trainable(net, forget_term, retain_term)
    robust = (
        RobustObjective(net, config.robust_to, model, margin=bool(config.robust_margin))
        if config.robust_to
        else None
    )

    forget_sampler = EpochSampler(len(forget), config.batch_size, config.seed)
    retain_sampler = EpochSampler(max(1, len(retain)), config.batch_size, config.seed + 1)

    def batch_for_step(step: int, micro: int) -> dict[str, Any]:
        position = step * config.grad_accum + micro
        batch = {"step": step, "forget": indexed_batch(forget, forget_sampler.indices(position), pad_id)}
        if retain_term is not None:
            batch["retain"] = indexed_batch(retain, retain_sampler.indices(position), pad_id)
        return batch

    def objective(model: torch.nn.Module, batch: dict[str, Any], prefix: str = ""):
        loss_f = forget_term.loss(model, batch["forget"])
        logs = {f"{prefix}forget": float(loss_f.detach())}
        if retain_term is None:
            return loss_f, logs
        loss_r = retain_term.loss(model, batch["retain"])
        logs[f"{prefix}retain"] = float(loss_r.detach())
        return loss_f + config.alpha * loss_r, logs

    def loss_fn(model: torch.nn.Module, batch: dict[str, Any]):
        loss, logs = objective(model, batch)
        if robust is None:
            return loss, logs
        rounded_loss, rounded_logs = objective(robust.view(model, batch["step"]), batch, prefix="q_")
        loss, logs = loss + rounded_loss, {**logs, **rounded_logs}
        if config.robust_margin:
            margin = robust.margin_loss(model, batch["step"])
            if margin is not None:
                logs["margin"] = float(margin.detach())
                loss = loss + config.robust_margin * margin
        return loss, logs

    mask: SaliencyMask | None = None
    if config.sure_top is not None:
        batches = chunks(forget, pad_id, device=target)
        mask = build_mask(
            net,
            forget_term.loss,
            batches,
            config.sure_top,
            config.sure_granularity,
            per_step=config.sure_per_step,
        )
        mask.attach(net)
    if config.lora_r is not None:
        net = _wrap_lora(net, config.lora_r)

    def refresh_mask(step: int) -> None:
        mask.refresh(net, forget_term.loss, to_device(batch_for_step(step, 0)["forget"], target))

    def forget_metrics(model: torch.nn.Module) -> dict[str, float]:
        return {
            "recall_forget": qa_recall(model, tokenizer, benchmark.forget_qa)["value"],
            "nll_forget": forget_nll(model, forget, pad_id),
        }

    def check(model: torch.nn.Module) -> dict[str, float]:
        """What the stop rules read, every ``eval_every`` steps: the forget set only (retain recall, whose
        set is usually many times larger, is measured at the start and the end). With ``--robust-to`` also
        the worst of the rounded models (highest recall, lowest NLL), so a run stops only once the models
        its grids serve have forgotten too."""
        metrics = forget_metrics(model)
        if robust is not None:
            rounded = robust.rounded_metrics(model, forget_metrics)
            metrics["recall_forget_rounded"] = max(r["recall_forget"] for r in rounded.values())
            metrics["nll_forget_rounded"] = min(r["nll_forget"] for r in rounded.values())
        return metrics

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {
            **check(model),
            "recall_retain": qa_recall(model, tokenizer, benchmark.retain_qa)["value"],
        }

    def should_stop(metrics: dict[str, float]) -> bool:
        recall = max(metrics["recall_forget"], metrics.get("recall_forget_rounded", 0.0))
        nll = min(metrics["nll_forget"], metrics.get("nll_forget_rounded", math.inf))
        recall_done = config.stop_forget_recall is not None and recall <= config.stop_forget_recall
        nll_done = config.stop_forget_nll is not None and nll >= config.stop_forget_nll
        return recall_done or nll_done

    # The starting model's metrics (for the utility floor), shared by every run from the same model, data
    # and precision: a selection sweep or an experiment's methods measure them once.
    start_key = {
        "model": model_identity(str(model)),
        "data": hash_files(benchmark_files(data_dir)),
        "examples": [config.data, config.tokens, config.max_length],
        "weights": config.weights,
        "robust": robust.grids if robust is not None else None,
    }
    start_metrics = cached_json("start-metrics", start_key, lambda: evaluate(net))
    loop_config = LoopConfig.from_settings(config, forget_sampler.steps_per_epoch)

    def after_shard(sharded: torch.nn.Module, group) -> None:
        """Under FSDP2: SURE's mask and the robust objective act on the shards from here on."""
        if mask is not None:
            mask.bind(sharded, group)
        if robust is not None:
            robust.bind(sharded, group)

    result = run_loop(
        net,
        loop_config,
        batch_for_step,
        loss_fn,
        run_key=key,
        work_dir=claim_work_dir(opened.out, key, run.overwrite),
        evaluate=check,
        should_stop=should_stop,
        progress=run.progress,
        description=f"unlearn {spec.name}",
        before_step=refresh_mask if mask is not None and config.sure_per_step else None,
        after_backward=mask.after_backward if mask else None,
        after_step=mask.after_step if mask else None,
        after_shard=after_shard,
        emulate_bfloat16=config.weights == BFLOAT16_EMULATED,
    )
    net = result.model  # a plain module again after a sharded run
    if config.lora_r is not None:
        net = net.merge_and_unload()
    sure = None
    if mask is not None:
        verified = mask.verify(net)  # reads the trained weights (gathered, after a sharded run)
        sure = {**mask.summary(), **verified}
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
        **opened.provenance(config.seed, target, world_size()),
        "reference": reference.mode,
        "terms": {t.name: t.describe() for t in (forget_term, retain_term) if t is not None},
        "robust": robust.describe() if robust is not None else None,
        "examples": {"forget": len(forget), "retain": len(retain)},
        "start": start_metrics,
        "final": (final := evaluate(net)),
        "utility": utility_check(start_metrics, final, config.utility_floor),
        "weight_change": weight_change(start_state, net.state_dict()),
        "sure": sure,
        **result.to_dict(),
    }
    save_run(net, tokenizer, opened.out, record, RECORD_NAME)
    return UnlearnResult(opened.out, record, cached=False)


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
    for batch in chunks(examples, pad_id, device=model_device(model)):
        picked, mask = losses.token_logprobs(model(**model_inputs(batch)).logits, batch["labels"])
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
