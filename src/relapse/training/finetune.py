"""Training the target and retrained models: from scratch (tiny Llama) or fine-tuning a given model.

``train_model`` trains on the texts and QA pairs of the chosen splits (``forget+retain`` gives the target
model, ``retain`` the retrained reference), stops once QA recall on the trained splits reaches a
threshold, checkpoints as it goes and resumes after a kill. Models are cached by a hash of the data
files, the settings, the seed and the starting model: asking again for the same model returns at once.
The device is not in that hash (a model trained on a GPU is the same model, up to float rounding), but
``train.json`` records it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from relapse.data.batching import EpochSampler, collate, tokenize_for_lm
from relapse.data.benchmark import benchmark_files, load_benchmark
from relapse.data.prompts import qa_text
from relapse.errors import ConfigError
from relapse.metrics.qa import qa_recall
from relapse.models.cached_run import open_cached_run
from relapse.models.io import (
    BFLOAT16_EMULATED,
    PRECISIONS,
    TRAIN_RECORD,
    apply_precision_,
    load_model,
    model_identity,
)
from relapse.models.tiny import TinyConfig, build_tiny
from relapse.options import option
from relapse.runtime import (
    RunContext,
    hash_files,
    resolve_device,
    stable_hash,
)
from relapse.training.loop import (
    SCHEDULES,
    LoopConfig,
    check_loop_options,
    claim_work_dir,
    run_loop,
    save_run,
)
from relapse.training.parallel import refuse_unsupported, requested_strategy, world_size

log = logging.getLogger(__name__)

TRAIN_SPLITS = ("forget+retain", "retain")
RECORD_NAME = TRAIN_RECORD
#: Bump when a change to training would give different weights for the same settings.
TRAIN_VERSION = 1


@dataclass
class TrainConfig:
    """What to train on and how; every field takes part in the cache key except the cadence fields."""

    on: str = field(default="forget+retain", metadata=option("splits to train on", choices=TRAIN_SPLITS))
    max_steps: int = field(
        default=3000,
        metadata=option(
            "maximum optimisation steps (default %(default)s)", flag="--steps", exclusive="length"
        ),
    )
    epochs: float | None = field(
        default=None, metadata=option("train for this many epochs instead", exclusive="length")
    )
    lr: float = field(default=1e-3, metadata=option("peak learning rate (default %(default)s)"))
    batch_size: int = field(default=32, metadata=option("examples per step (default %(default)s)"))
    warmup_steps: int = field(default=50, metadata=option("linear warm-up steps (default %(default)s)"))
    schedule: str = field(
        default="constant",
        metadata=option("learning-rate schedule after warm-up (default %(default)s)", choices=SCHEDULES),
    )
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    stop_recall: float | None = field(
        default=0.95,
        metadata=option(
            "stop once QA recall on every trained split reaches this (default %(default)s); 0 disables",
            off=0,  # 0 (only 0) disables the stop rule; anything else, negative or NaN too, is checked below
        ),
    )
    eval_every: int = field(default=100, metadata=option("steps between recall checks (default %(default)s)"))
    checkpoint_every: int = field(
        default=200, metadata=option("steps between checkpoints (default %(default)s)")
    )
    seed: int = field(default=0, metadata=option("random seed (default %(default)s)"))
    dtype: str = field(
        default="float32",
        metadata=option(
            "weight precision during training (default float32); bfloat16-emulated keeps weights on "
            "bfloat16 values but computes in float32",
            choices=PRECISIONS,
        ),
    )
    max_length: int = 256
    tiny: TinyConfig = field(default_factory=TinyConfig)

    def __post_init__(self) -> None:
        if self.on not in TRAIN_SPLITS:
            raise ConfigError(f"--on must be one of {', '.join(TRAIN_SPLITS)}, got {self.on!r}")
        if self.stop_recall is not None and not 0.0 < self.stop_recall <= 1.0:
            raise ConfigError(f"--stop-recall must be in (0, 1], got {self.stop_recall}")
        if self.dtype not in PRECISIONS:
            raise ConfigError(f"--dtype must be one of {', '.join(PRECISIONS)}, got {self.dtype!r}")
        self._check_numbers()

    def _check_numbers(self) -> None:
        """Refuse every numeric option outside its range, NaN and infinities included, before any work:
        a NaN ``--lr`` would otherwise train to the end and save a NaN model (options that ``relapse
        train`` has no flag for, set in experiment files, are named by their field)."""
        check_loop_options(self, {"weight_decay": "weight_decay", "max_grad_norm": "max_grad_norm"})

    def key_fields(self, from_scratch: bool) -> dict[str, Any]:
        """The settings that determine the trained weights (checkpoint cadence does not)."""
        fields = asdict(self)
        fields.pop("checkpoint_every")
        if not from_scratch:
            fields.pop("tiny")
        return fields


@dataclass
class TrainResult:
    """Where the model is, its provenance record, and whether it came from the cache."""

    path: Path
    record: dict[str, Any]
    cached: bool


def train_cache_key(data_dir: Path, config: TrainConfig, base: str | None) -> str:
    """The hash that names a trained model: data files, settings, seed and starting model."""
    return stable_hash(
        {
            "train_version": TRAIN_VERSION,
            "data": hash_files(benchmark_files(data_dir)),
            "config": config.key_fields(from_scratch=base is None),
            "base": model_identity(base) if base is not None else "scratch",
        }
    )


def train_model(
    data_dir: str | Path,
    out: str | Path | None,
    config: TrainConfig | None = None,
    base: str | None = None,
    run: RunContext | None = None,
) -> TrainResult:
    """Train (or fetch from cache) a model on a benchmark and save it to ``out``.

    Args:
        data_dir: a benchmark folder.
        out: where to save the model; ``None`` uses the cache (``$RELAPSE_CACHE/models/<key>``).
        config: training settings; defaults train a tiny model on forget + retain.
        base: a model folder or hub id to fine-tune; ``None`` builds a tiny Llama from scratch.
        run: threads, progress bar, whether to replace a different model already at ``out``, and the
            device (``auto``: a GPU when there is one; not in the cache key).
    """
    config = config or TrainConfig()
    run = run or RunContext()
    data_dir = Path(data_dir)
    target = resolve_device(run.device)  # a bad --device fails before any work
    refuse_unsupported(requested_strategy(), {"bfloat16-emulated": config.dtype == BFLOAT16_EMULATED})
    benchmark = load_benchmark(data_dir)
    key = train_cache_key(data_dir, config, base)
    opened = open_cached_run(out, key, RECORD_NAME, run.overwrite, cache="models")
    if opened.cached:
        return TrainResult(opened.out, opened.existing, cached=True)
    opened.start(run.threads, config.seed)
    if base is None:
        # Built (and initialised) on the CPU, so the starting weights are the same on every device.
        model, tokenizer = build_tiny(config.tiny, benchmark, seed=config.seed)
        apply_precision_(model, config.dtype)
        model.to(target)
    else:
        model, tokenizer = load_model(base, dtype=config.dtype, device=str(target))

    split_names = config.on.split("+")
    texts = benchmark.texts(config.on) + [qa_text(pair) for pair in benchmark.qa(config.on)]
    examples = tokenize_for_lm(tokenizer, texts, config.max_length)
    sampler = EpochSampler(len(examples), config.batch_size, config.seed)
    loop_config = LoopConfig.from_settings(config, sampler.steps_per_epoch)
    pad_id = tokenizer.pad_token_id

    def batch_for_step(step: int, micro: int) -> dict[str, torch.Tensor]:
        return collate([examples[i] for i in sampler.indices(step)], pad_id)

    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        return model(**batch).loss, {}

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return {f"recall_{s}": qa_recall(model, tokenizer, benchmark.qa(s))["value"] for s in split_names}

    def should_stop(metrics: dict[str, float]) -> bool:
        return config.stop_recall is not None and all(v >= config.stop_recall for v in metrics.values())

    result = run_loop(
        model,
        loop_config,
        batch_for_step,
        loss_fn,
        run_key=key,
        work_dir=claim_work_dir(opened.out, key, run.overwrite),
        evaluate=evaluate,
        should_stop=should_stop,
        progress=run.progress,
        description=f"train {config.on}",
        emulate_bfloat16=config.dtype == BFLOAT16_EMULATED,
    )
    model = result.model  # a plain module again after a sharded run
    final = {
        f"recall_{s}": qa_recall(model, tokenizer, benchmark.qa(s))["value"] for s in ("forget", "retain")
    }
    if config.stop_recall is not None and not result.stopped_early:
        log.warning(
            "QA recall did not reach %.2f within %d steps: %s",
            config.stop_recall,
            loop_config.max_steps,
            final,
        )
    record = {
        "kind": "relapse-train",
        "cache_key": key,
        "config": asdict(config),
        "base": base,
        "base_identity": model_identity(base) if base is not None else "scratch",
        "data": {
            "path": str(data_dir.resolve()),
            "hash": hash_files(benchmark_files(data_dir)),
            "meta": benchmark.meta,
        },
        **opened.provenance(config.seed, target, world_size()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "final": final,
        **result.to_dict(),
    }
    save_run(model, tokenizer, opened.out, record, RECORD_NAME)
    return TrainResult(opened.out, record, cached=False)
