"""The ``relapse`` command line.

Every subcommand has ``--help``. Problems with the user's input end with a one-line ``relapse: error:``
message and exit status 2, never a traceback; results are never overwritten without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from relapse import __version__
from relapse.errors import RelapseError

EXIT_USAGE = 2

COMMAND_HELP = {  # every command's one-line help, in the order --help lists them
    "data": "benchmark data: generate the built-in benchmark, convert MUSE, TOFU, text or JSONL data",
    "models": "real pretrained models without a hub: list and fetch them",
    "train": "train a target or retrained model (tiny from scratch, or fine-tune --from a model)",
    "unlearn": "unlearn the forget set from a model (GA, NPO, +GDR/KLR, optionally SURE's mask)",
    "attack": "write an attacked copy of a model (quantized, noised, pruned or relearned)",
    "diff": "weight diagnostics of an unlearning update under a quantizer (no evaluation)",
    "eval": "measure forgetting and utility: VerbMem, KnowMem, PrivLeak, MIAs, perplexity",
    "audit": "did the model really forget? sweep models x attacks x metrics and write the report",
    "report": "rebuild an audit's report from its results.json",
    "run": "run an experiment file: data, training, unlearning, audit and report",
    "demo": "run the main job on the built-in benchmark: train, unlearn, attack, audit, report",
    "plan": "memory per GPU for unlearning a model, per sharding strategy and precision (no weights loaded)",
}


def _add_synth(subparsers) -> None:
    from relapse.data.synth import FACT_KINDS

    p = subparsers.add_parser(
        "synth",
        help="generate the built-in benchmark of fictitious people",
        description="Write the built-in benchmark (fictitious people with facts, as biographies and QA "
        "pairs) to a folder in relapse's benchmark format. Deterministic from --seed.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write the benchmark to")
    p.add_argument("--people", type=int, default=200, help="people in forget + retain (default 200)")
    p.add_argument(
        "--facts-per-person",
        type=int,
        default=5,
        help=f"facts per person, 1..{len(FACT_KINDS)} (default 5)",
    )
    p.add_argument("--forget-frac", type=float, default=0.1, help="share of people to forget (default 0.1)")
    p.add_argument(
        "--holdout",
        type=int,
        default=None,
        help="people never trained on, for membership inference (default: as many as forget)",
    )
    p.add_argument("--general", type=int, default=200, help="general sentences for perplexity (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different benchmark already in --out")
    p.set_defaults(func=_cmd_synth)


def _cmd_synth(args) -> int:
    from relapse.data.synth import synth_benchmark
    from relapse.errors import ConfigError

    benchmark = synth_benchmark(
        people=args.people,
        facts_per_person=args.facts_per_person,
        forget_frac=args.forget_frac,
        holdout=args.holdout,
        seed=args.seed,
        general=args.general,
    )
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} is a file; give a folder")
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        if not benchmark.is_saved_in(args.out):
            raise ConfigError(
                f"{args.out} is not empty and holds something else; pass --overwrite to replace it"
            )
        print(f"{args.out} already holds this benchmark (same settings and seed); nothing to do")
        return 0
    benchmark.save(args.out)
    counts = benchmark.meta["counts"]
    print(
        f"wrote {args.out}: {counts['forget_people']} forget, {counts['retain_people']} retain, "
        f"{counts['holdout_people']} holdout people; {counts['forget_qa']} forget and "
        f"{counts['retain_qa']} retain QA pairs (seed {args.seed})"
    )
    return 0


def _add_common_training(p: argparse.ArgumentParser) -> None:
    """The options every command that runs a model shares: where (--device), how many threads, quiet."""
    p.add_argument(
        "--device",
        default=None,
        metavar="{auto,cpu,cuda,cuda:N}",
        help="where models run (default: auto = the GPU when torch sees one, else the CPU); recorded in "
        "the results, not part of any cache key",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: $RELAPSE_THREADS, else 1 on a machine with <= 2 cores, "
        "else one per core)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def _add_jobs(p: argparse.ArgumentParser) -> None:
    """--jobs, for the commands that make or audit several independent models."""
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="processes working on different models at once (default: $RELAPSE_JOBS, else one per core "
        "on a CPU with <= 2 cores, else 1); the results do not depend on it",
    )


def _add_seeds(p: argparse.ArgumentParser) -> None:
    """--seeds, for the commands that run an experiment."""
    p.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="repeat every unlearning run with this many seeds (seed, seed + 1, ...), audit each, and "
        "report the spread over seeds (default: the experiment file's seeds, else 1)",
    )


def _add_train(subparsers) -> None:
    from relapse.models.io import PRECISIONS
    from relapse.training.finetune import TRAIN_SPLITS, TrainConfig

    defaults = TrainConfig()
    p = subparsers.add_parser(
        "train",
        help=COMMAND_HELP["train"],
        description="Train on a benchmark's texts and QA pairs until QA recall reaches --stop-recall. "
        "'--on forget+retain' gives the target model, '--on retain' the retrained reference. Checkpoints "
        "are written as it goes and a killed run resumes; a model already trained with the same data, "
        "settings and seed is returned at once.",
    )
    p.add_argument("--data", required=True, type=Path, help="benchmark folder")
    p.add_argument("--out", required=True, type=Path, help="folder to save the model to")
    p.add_argument("--on", choices=TRAIN_SPLITS, default=defaults.on, help="splits to train on")
    p.add_argument(
        "--from",
        dest="base",
        default=None,
        help="model folder or hub id to fine-tune (default: a tiny Llama from scratch)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--steps",
        type=int,
        default=defaults.max_steps,
        help=f"maximum optimisation steps (default {defaults.max_steps})",
    )
    length.add_argument("--epochs", type=float, default=None, help="train for this many epochs instead")
    p.add_argument(
        "--lr", type=float, default=defaults.lr, help=f"peak learning rate (default {defaults.lr})"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"examples per step (default {defaults.batch_size})",
    )
    p.add_argument(
        "--warmup-steps",
        type=int,
        default=defaults.warmup_steps,
        help=f"linear warm-up steps (default {defaults.warmup_steps})",
    )
    p.add_argument(
        "--schedule",
        choices=("constant", "linear", "cosine"),
        default=defaults.schedule,
        help=f"learning-rate schedule after warm-up (default {defaults.schedule})",
    )
    p.add_argument(
        "--stop-recall",
        type=float,
        default=defaults.stop_recall,
        help=f"stop once QA recall on every trained split reaches this (default {defaults.stop_recall}); "
        "0 disables",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help=f"steps between recall checks (default {defaults.eval_every})",
    )
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=defaults.checkpoint_every,
        help=f"steps between checkpoints (default {defaults.checkpoint_every})",
    )
    p.add_argument(
        "--dtype",
        choices=PRECISIONS,
        default=defaults.dtype,
        help="weight precision during training (default float32); bfloat16-emulated keeps weights on "
        "bfloat16 values but computes in float32",
    )
    p.add_argument(
        "--tokenizer",
        choices=("word", "bpe"),
        default=defaults.tiny.tokenizer,
        help="tokenizer for a model built from scratch (default word)",
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different model already in --out")
    _add_common_training(p)
    p.set_defaults(func=_cmd_train)


def _run_context(args: argparse.Namespace):
    """How a command runs, from its options: ``--threads``, ``--quiet`` (no bars, no log lines),
    ``--overwrite`` and ``--device``."""
    from relapse.runtime import RunContext

    return RunContext(
        threads=args.threads,
        progress=not args.quiet,
        overwrite=args.overwrite,
        log=None if args.quiet else print,
        device=args.device,
    )


def _run_summary(result, done_before: str) -> str:
    """``PATH: N steps in T s; QA recall forget F, retain R`` for a train or unlearn result."""
    record = result.record
    how = done_before if result.cached else f"{record['steps']} steps in {record['wall_time_s']:.0f} s"
    final = record["final"]
    return f"{how}; QA recall forget {final['recall_forget']:.3f}, retain {final['recall_retain']:.3f}"


def _cmd_train(args) -> int:
    from relapse.models.tiny import TinyConfig
    from relapse.training.finetune import TrainConfig, train_model
    from relapse.training.parallel import is_main_process

    config = TrainConfig(
        on=args.on,
        max_steps=args.steps,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        # 0 (only 0) disables the stop rule; anything else, negative or NaN too, is TrainConfig's to check.
        stop_recall=None if args.stop_recall == 0 else args.stop_recall,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        dtype=args.dtype,
        tiny=TinyConfig(tokenizer=args.tokenizer),
    )
    result = train_model(
        args.data,
        args.out,
        config,
        base=args.base,
        run=_run_context(args),
    )
    if not is_main_process():  # under a data-parallel launcher only the main process reports
        return 0
    print(f"{result.path}: {_run_summary(result, 'cached, trained earlier')}")
    return 0


def _add_unlearn(subparsers) -> None:
    from relapse.methods.registry import VARIANTS, method_names, term_summaries
    from relapse.methods.unlearn import (
        DATA_CHOICES,
        REFERENCE_CHOICES,
        TOKEN_CHOICES,
        WEIGHT_CHOICES,
        UnlearnConfig,
    )

    d = UnlearnConfig()
    losses_help = "; ".join(f"{k}: {v}" for k, v in term_summaries().items())
    p = subparsers.add_parser(
        "unlearn",
        help=COMMAND_HELP["unlearn"],
        description="Unlearn a benchmark's forget set from a model and save the result with unlearn.json "
        f"(settings, seed, versions, loss curve, recall history, weight change, SURE mask). {losses_help}.",
    )
    p.add_argument("--model", required=True, help="model folder or hub id to unlearn from")
    p.add_argument("--data", required=True, type=Path, help="benchmark folder")
    p.add_argument("--out", required=True, type=Path, help="folder to save the unlearned model to")
    p.add_argument("--method", default=d.method, choices=method_names(), help=f"(default {d.method})")
    p.add_argument("--alpha", type=float, default=d.alpha, help=f"regulariser weight (default {d.alpha})")
    p.add_argument("--beta", type=float, default=d.beta, help=f"NPO temperature (default {d.beta})")
    p.add_argument(
        "--simnpo-beta",
        type=float,
        default=d.simnpo_beta,
        help=f"SimNPO temperature (default {d.simnpo_beta})",
    )
    p.add_argument(
        "--simnpo-gamma",
        type=float,
        default=d.simnpo_gamma,
        help=f"SimNPO margin (default {d.simnpo_gamma:g})",
    )
    p.add_argument(
        "--rmu-layer",
        type=int,
        default=d.rmu_layer,
        help="RMU: the decoder layer whose output is steered (default: a quarter of the way up)",
    )
    p.add_argument(
        "--rmu-coeff",
        type=float,
        default=d.rmu_coeff,
        help=f"RMU: the steering vector's norm c (default {d.rmu_coeff:g})",
    )
    p.add_argument(
        "--sam-rho",
        type=float,
        default=None,
        help="sharpness-aware minimisation with this neighbourhood radius, on any method (e.g. 0.05)",
    )
    p.add_argument(
        "--variant",
        choices=VARIANTS,
        default=d.variant,
        help="'muse-compatible' reproduces public reference code's formulas (NPO on raw logits, KL of raw "
        "logits); they are not the published losses (default standard)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=int, default=d.max_steps, help=f"maximum steps (default {d.max_steps})"
    )
    length.add_argument("--epochs", type=float, default=None, help="epochs over the forget set instead")
    p.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"(default {d.batch_size})")
    p.add_argument(
        "--grad-accum", type=int, default=d.grad_accum, help="gradient accumulation steps (default 1)"
    )
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="(default 0)")
    p.add_argument("--schedule", choices=("constant", "linear", "cosine"), default=d.schedule)
    p.add_argument(
        "--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default 0)"
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=d.max_grad_norm, help="clip norm (default 1; 0 = off)"
    )
    p.add_argument(
        "--unlearn-data",
        dest="unlearn_data",
        choices=DATA_CHOICES,
        default=d.data,
        help=f"which forget/retain examples to train on (default {d.data})",
    )
    p.add_argument(
        "--tokens",
        choices=TOKEN_CHOICES,
        default=d.tokens,
        help="tokens that count in the losses: all, or answer tokens only (needs --unlearn-data qa)",
    )
    p.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default=d.weights,
        help="weight precision while unlearning: bfloat16 = no float32 master copy; bfloat16-emulated = "
        "the same rounding with float32 arithmetic, for CPUs (default float32)",
    )
    p.add_argument("--autocast-bf16", action="store_true", help="bfloat16 autocast over float32 weights")
    p.add_argument(
        "--reference",
        choices=REFERENCE_CHOICES,
        default=d.reference,
        help="NPO/KLR reference: precompute once, keep a frozen model copy, or auto (default)",
    )
    p.add_argument(
        "--sure-top",
        type=float,
        default=None,
        help="SURE: train only this share of the most salient weights (e.g. 0.1)",
    )
    p.add_argument(
        "--sure-granularity",
        choices=("module", "neuron"),
        default=d.sure_granularity,
        help="SURE saliency per weight tensor or per output row (default module)",
    )
    p.add_argument("--sure-per-step", action="store_true", help="recompute SURE's mask at every step")
    p.add_argument(
        "--lora-r", type=int, default=None, help="train LoRA adapters of this rank (merged on save)"
    )
    p.add_argument(
        "--stop-forget-recall",
        type=float,
        default=None,
        help="stop once forget-set QA recall is at or below this",
    )
    p.add_argument(
        "--stop-forget-nll",
        type=float,
        default=None,
        help="stop once the forget examples' mean token NLL (nats) is at or above this",
    )
    p.add_argument(
        "--robust-to",
        nargs="+",
        default=None,
        metavar="GRID",
        help="also compute the loss on the weights as these grids round them (rtn-w4-ch, bnb-nf4, "
        "gguf-q4_1, ...; 'default': RTN per channel, g64 and g128, NF4, FP4 and the base model's grid), "
        "with straight-through gradients, one grid per step",
    )
    p.add_argument(
        "--robust-margin",
        type=float,
        default=None,
        metavar="WEIGHT",
        help="with --robust-to: add WEIGHT x a hinge that pushes every weight unlearning moves across the "
        "edge of the target's rounding cell on uniform (RTN) grids, so rounding cannot snap it back",
    )
    p.add_argument(
        "--select-lr",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help="try these learning rates (largest first) and keep the run that reaches the forget target "
        "with the highest retain recall; needs --stop-forget-recall or --stop-forget-nll",
    )
    p.add_argument(
        "--utility-floor",
        type=float,
        default=d.utility_floor,
        help="a run whose retain recall ends below this share of the starting model's is marked "
        f"over-unlearned (default {d.utility_floor:g})",
    )
    p.add_argument("--eval-every", type=int, default=d.eval_every, help=f"(default {d.eval_every})")
    p.add_argument(
        "--checkpoint-every", type=int, default=d.checkpoint_every, help=f"(default {d.checkpoint_every})"
    )
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different model already in --out")
    _add_common_training(p)
    p.set_defaults(func=_cmd_unlearn)


def _candidate_text(row: dict) -> str:
    """One learning rate of a selection sweep, as ``unlearn`` prints it."""
    if "skipped" in row or "diverged" in row:
        return f"{row['lr']:g}: {'skipped' if 'skipped' in row else 'diverged'}"
    final = row["final"]
    text = f"{row['lr']:g}: {row['steps']} steps, forget {final['recall_forget']:.2f}, "
    return text + f"retain {final['recall_retain']:.2f}" + ("" if row["reached_target"] else " (no target)")


def _cmd_unlearn(args) -> int:
    from relapse.methods.unlearn import UnlearnConfig, unlearn_model
    from relapse.training.parallel import is_main_process

    config = UnlearnConfig(
        method=args.method,
        alpha=args.alpha,
        beta=args.beta,
        simnpo_beta=args.simnpo_beta,
        simnpo_gamma=args.simnpo_gamma,
        rmu_layer=args.rmu_layer,
        rmu_coeff=args.rmu_coeff,
        sam_rho=args.sam_rho,
        robust_to=args.robust_to,
        robust_margin=args.robust_margin,
        select_lr=args.select_lr,
        utility_floor=args.utility_floor,
        variant=args.variant,
        lr=args.lr,
        max_steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        # 0 (only 0) turns clipping off; anything else, negative or NaN included, is UnlearnConfig's to check.
        max_grad_norm=None if args.max_grad_norm == 0 else args.max_grad_norm,
        data=args.unlearn_data,
        tokens=args.tokens,
        weights=args.weights,
        autocast_bf16=args.autocast_bf16,
        reference=args.reference,
        sure_top=args.sure_top,
        sure_granularity=args.sure_granularity,
        sure_per_step=args.sure_per_step,
        lora_r=args.lora_r,
        stop_forget_recall=args.stop_forget_recall,
        stop_forget_nll=args.stop_forget_nll,
        eval_every=args.eval_every,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    )
    result = unlearn_model(
        args.model,
        args.data,
        args.out,
        config,
        run=_run_context(args),
    )
    if not is_main_process():  # under a data-parallel launcher only the main process reports
        return 0
    record = result.record
    print(
        f"{result.path}: {record['method']}, {_run_summary(result, 'cached, unlearned earlier')}; "
        f"mean |dW| {record['weight_change']['mean_abs']:.3g}"
    )
    selection = record.get("selection")
    if selection:
        tried = "; ".join(_candidate_text(row) for row in selection["candidates"])
        print(f"selected lr {selection['chosen_lr']:g} of: {tried}")
    if (record.get("utility") or {}).get("over_unlearned"):
        utility = record["utility"]
        print(
            f"over-unlearned: retain recall {utility['final_recall_retain']:.2f} is below "
            f"{utility['floor']:.0%} of the starting model's {utility['start_recall_retain']:.2f}"
        )
    if record.get("robust"):
        print(f"robust to: {', '.join(record['robust']['grids'])} (one grid per step, straight-through)")
    if record.get("sure"):
        sure = record["sure"]
        print(
            f"SURE ({sure['granularity']}, top {sure['top']}): "
            f"{sure['trainable_share']:.1%} of weights trainable; "
            f"frozen weights bit-identical: {sure['frozen_elements_identical']}"
        )
    return 0


def _add_attack_targets(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include-embeddings", action="store_true", help="also attack the input embeddings")
    p.add_argument("--include-lm-head", action="store_true", help="also attack the LM head")


def _add_attack(subparsers) -> None:
    from relapse.attacks.registry import EXAMPLES

    p = subparsers.add_parser(
        "attack",
        help=COMMAND_HELP["attack"],
        description="Apply a registered attack to a model and save the result with attack.json. "
        f"Attack names: {', '.join(EXAMPLES)} (see docs/attacks.md). By default only the decoder's linear "
        "layers are changed; embeddings and the LM head stay in full precision.",
    )
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--attack", required=True, help="attack name, e.g. rtn-w4-g128")
    p.add_argument("--out", required=True, type=Path, help="folder to save the attacked model to")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="benchmark folder (relearn-* train on it; GPTQ/AWQ calibrate on it)",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="calibration text for GPTQ/AWQ instead of the benchmark's general.jsonl: .jsonl with 'text', "
        "or plain text with one sample per line",
    )
    _add_attack_targets(p)
    p.add_argument("--seed", type=int, default=0, help="seed for noise and relearning (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a different model already in --out")
    _add_common_training(p)
    p.set_defaults(func=_cmd_attack)


def _cmd_attack(args) -> int:
    from relapse.attacks.materialize import materialize

    path, record, cached = materialize(
        args.model,
        args.attack,
        args.out,
        data_dir=args.data,
        include_embeddings=args.include_embeddings,
        include_lm_head=args.include_lm_head,
        seed=args.seed,
        calibration=args.calibration,
        run=_run_context(args),
    )
    changed = record["info"].get("quantized") or record["info"].get("rms") or record["info"].get("zeroed")
    what = f"{len(changed)} weight tensors changed" if changed else record["attack_kind"]
    kept = record["info"].get("kept")
    kept_text = f"; kept in full precision: {', '.join(kept)}" if kept else ""
    print(f"{path}: {record['attack']} ({'cached' if cached else what}){kept_text}")
    return 0


def _add_diff(subparsers) -> None:
    p = subparsers.add_parser(
        "diff",
        help=COMMAND_HELP["diff"],
        description="Compare model B (e.g. unlearned) with model A (e.g. the target) under an RTN "
        "quantizer: mean |dW|, |dW| relative to the quantization step, the share of integer codes that "
        "differ between Q(A) and Q(B), and the projection <Q(B)-Q(A), B-A>/||B-A||^2 (1: rounding keeps "
        "the update; 0: it erases it), per weight tensor and in total.",
    )
    p.add_argument("--a", required=True, help="the reference model, e.g. the target")
    p.add_argument("--b", required=True, help="the changed model, e.g. the unlearned one")
    p.add_argument("--attack", default="rtn-w4-g128", help="RTN quantizer name (default rtn-w4-g128)")
    _add_attack_targets(p)
    p.add_argument("--json", type=Path, default=None, help="also write the full report here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--per-tensor", action="store_true", help="print every tensor, not only the total")
    p.set_defaults(func=_cmd_diff)


def _cmd_diff(args) -> int:
    from relapse.attacks.materialize import diff_models
    from relapse.errors import ConfigError
    from relapse.runtime import atomic_write_json

    if args.json and args.json.exists() and not args.overwrite:  # before any work
        raise ConfigError(f"--json {args.json} exists; pass --overwrite to replace it")
    report = diff_models(args.a, args.b, args.attack, args.include_embeddings, args.include_lm_head)
    rows = list(report["per_tensor"].items()) if args.per_tensor else []
    rows.append(("total", report["total"]))
    width = max(len(name) for name, _ in rows)
    print(
        f"{'tensor':<{width}} {'mean|dW|':>10} {'|dW|/step':>10} {'<step/2':>8} "
        f"{'codes chg':>10} {'projection':>10}"
    )
    for name, row in rows:
        projection = "n/a" if row["projection"] is None else f"{row['projection']:.3f}"
        print(
            f"{name:<{width}} {row['mean_abs_dw']:>10.3g} {row['mean_dw_over_step']:>10.3g} "
            f"{row['share_below_half_step']:>8.1%} {row['codes_changed']:>10.2%} {projection:>10}"
        )
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def _add_eval(subparsers) -> None:
    from relapse.metrics.engine import DEFAULT_METRICS, GROUPS

    groups = "; ".join(f"{name} = {', '.join(names)}" for name, names in GROUPS.items() if name != "mia")
    p = subparsers.add_parser(
        "eval",
        help=COMMAND_HELP["eval"],
        description="Compute metrics of a model on a benchmark folder, optionally after an attack applied "
        "in memory (the weights on disk are not changed), print a table and write a JSON record. Metric "
        f"groups: {groups}; mia = LOSS, zlib, lowercase, Min-K%% and Min-K%%++ AUCs. See docs/metrics.md.",
    )
    p.add_argument("--model", required=True, help="model folder or hub id")
    p.add_argument("--data", required=True, type=Path, help="benchmark folder")
    p.add_argument(
        "--metrics",
        default=None,
        help=f"comma-separated metric names or groups (default {DEFAULT_METRICS}; privleak only with a "
        "retrained reference)",
    )
    p.add_argument("--attack", default=None, help="evaluate after this attack, e.g. rtn-w4-g128")
    p.add_argument("--calibration", type=Path, default=None, help="calibration text for GPTQ/AWQ attacks")
    p.add_argument("--retrained", default=None, help="the retrained model, PrivLeak's reference")
    p.add_argument(
        "--retrained-auc",
        default=None,
        help="PrivLeak's reference AUC instead of --retrained: a number, or news / books for MUSE's",
    )
    p.add_argument("--batch-size", type=int, default=None, help="batch size (default: from free memory)")
    p.add_argument("--out", type=Path, default=Path("eval.json"), help="JSON record (default ./eval.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--seed", type=int, default=0, help="seed for noise and relearning attacks (default 0)")
    _add_common_training(p)
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    from relapse.errors import ConfigError
    from relapse.metrics.run import format_results, run_eval

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    record = run_eval(
        args.model,
        args.data,
        args.metrics,
        out=args.out,
        attack=args.attack,
        retrained=args.retrained,
        retrained_auc=args.retrained_auc,
        batch_size=args.batch_size,
        seed=args.seed,
        calibration=args.calibration,
        run=_run_context(args),
    )
    title = args.model + (f" after {record['attack']['name']}" if record["attack"] else "")
    print(title)
    print(format_results(record))
    print(f"\nwrote {args.out}")
    return 0


def _add_audit(subparsers) -> None:
    from relapse.audit.sweep import DEFAULT_ATTACKS, DEFAULT_AUDIT_METRICS

    p = subparsers.add_parser(
        "audit",
        help=COMMAND_HELP["audit"],
        description="Evaluate the target, the retrained reference and each unlearned model as they are and "
        "under each attack (applied in memory, one load per model), write results.json after every cell "
        "(a killed audit resumes where it stopped), compute the recovered share of the forgetting gap per "
        "metric and attack, the weight diagnostics, a verdict per unlearned model, and the report "
        "(report.md, report.html, plots). See docs/audit.md.",
    )
    p.add_argument("--target", required=True, help="the model before unlearning")
    p.add_argument("--unlearned", required=True, nargs="+", help="one or more unlearned models")
    p.add_argument("--retrained", default=None, help="the model trained without the forget set (control)")
    p.add_argument("--data", required=True, type=Path, help="benchmark folder")
    p.add_argument(
        "--attacks",
        default=",".join(DEFAULT_ATTACKS),
        help=f"comma-separated (default {','.join(DEFAULT_ATTACKS)})",
    )
    p.add_argument(
        "--metrics", default=DEFAULT_AUDIT_METRICS, help=f"names or groups (default {DEFAULT_AUDIT_METRICS})"
    )
    p.add_argument(
        "--primary",
        default=None,
        help="the metric verdicts follow, declared before the sweep (knowmem_forget, verbmem_forget, "
        "recall_forget or nll_forget; default: the first of the first three that is measured)",
    )
    p.add_argument("--calibration", type=Path, default=None, help="calibration text for GPTQ/AWQ attacks")
    p.add_argument(
        "--batch-size", type=int, default=None, help="evaluation batch size (default: from memory)"
    )
    p.add_argument("--out", required=True, type=Path, help="folder for results.json and the report")
    p.add_argument("--overwrite", action="store_true", help="replace an audit with other settings in --out")
    p.add_argument("--seed", type=int, default=0, help="seed for noise and relearning attacks (default 0)")
    _add_common_training(p)
    _add_jobs(p)
    p.set_defaults(func=_cmd_audit)


def _cmd_audit(args) -> int:
    from relapse.attacks.registry import parse_attacks
    from relapse.audit.sweep import AuditConfig, run_audit
    from relapse.metrics.engine import resolve_metrics

    metrics = resolve_metrics(args.metrics)
    if args.retrained is None and "privleak" in metrics:
        metrics.remove("privleak")
        print("note: no --retrained model, so no privleak (and no control for the recovery ratios)")
    config = AuditConfig(
        target=args.target,
        unlearned=list(args.unlearned),
        retrained=args.retrained,
        data=str(args.data),
        attacks=[a.name for a in parse_attacks(args.attacks)],
        metrics=metrics,
        seed=args.seed,
        batch_size=args.batch_size,
        calibration=str(args.calibration) if args.calibration else None,
        primary=args.primary,
        device=args.device or "auto",
    )
    results = run_audit(
        config,
        args.out,
        run=_run_context(args),
        jobs=args.jobs,
    )
    from relapse.demo import verdict_table
    from relapse.report import build_report

    paths = build_report(args.out)
    print(verdict_table(results))
    print(f"\nreport: {paths['report.html']}")
    return 0


def _add_report(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help=COMMAND_HELP["report"],
        description="Recompute recovery ratios and verdicts from DIR/results.json and write report.md, "
        "report.html and the plots into DIR (nothing is evaluated again).",
    )
    p.add_argument("directory", type=Path, help="an audit's --out folder")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args) -> int:
    from relapse.audit.recovery import finish
    from relapse.demo import verdict_table
    from relapse.report import build_report, load_results

    paths = build_report(args.directory)
    print(verdict_table(finish(load_results(args.directory))))
    print(f"\nreport: {paths['report.html']}")
    return 0


def _add_demo(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help=COMMAND_HELP["demo"],
        description="Generate the built-in benchmark, train the target (forget + retain) and retrained "
        "(retain only) models, unlearn with GA, GA+GDR, NPO, NPO+GDR, NPO+KLR, SimNPO+GDR, RMU, SURE "
        "(each at the learning rate that keeps the most utility) and NPO+GDR in bfloat16, audit every "
        "model under quantization, relearning and noise, print a verdict per "
        "method and write the report. Runs the shipped experiment file demo.yaml (see docs/experiments.md); "
        "models are cached, so a second run takes a fraction of the time.",
    )
    p.add_argument(
        "--out", type=Path, default=Path("relapse-demo"), help="output folder (default ./relapse-demo)"
    )
    p.add_argument("--fast", action="store_true", help="a smaller version that runs in about two minutes")
    p.add_argument("--overwrite", action="store_true", help="replace an audit with other settings in --out")
    _add_common_training(p)
    _add_jobs(p)
    _add_seeds(p)
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args) -> int:
    from relapse.demo import run_demo

    result = run_demo(
        args.out,
        fast=args.fast,
        run=_run_context(args),
        jobs=args.jobs,
        seeds=args.seeds,
    )
    _print_experiment(result)
    return 0


def _add_run(subparsers) -> None:
    p = subparsers.add_parser(
        "run",
        help=COMMAND_HELP["run"],
        description="Run every step of a YAML experiment file (see docs/experiments.md; `relapse demo` "
        "runs the shipped demo.yaml). Each step is cached or resumable, so a rerun only reads.",
    )
    p.add_argument("experiment", type=Path, help="the experiment file (.yaml)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an audit with other settings in --out")
    _add_common_training(p)
    _add_jobs(p)
    _add_seeds(p)
    p.set_defaults(func=_cmd_run)


def _cmd_run(args) -> int:
    from relapse.experiment import load_experiment, run_experiment

    result = run_experiment(
        load_experiment(args.experiment),
        args.out,
        run=_run_context(args),  # device None: the experiment file's device key, else auto
        jobs=args.jobs,
        seeds=args.seeds,
    )
    _print_experiment(result)
    return 0


def _print_experiment(result) -> None:
    from relapse.demo import models_table, verdict_table

    print()
    print(models_table(result))
    print()
    print(verdict_table(result.results))
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nreport: {result.report['report.html']}")
    print(f"took {result.seconds:.0f} s; results in {result.out / 'audit' / 'results.json'}")


def _add_data(commands) -> None:
    data = commands.add_parser(
        "data",
        help=COMMAND_HELP["data"],
        description="Commands that write benchmark folders.",
    )
    data_commands = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    _add_synth(data_commands)
    from relapse.data.convert_cli import add_convert_parser

    add_convert_parser(data_commands)


def _add_models(commands) -> None:
    from relapse.models.fetch_cli import add_models_parser

    add_models_parser(commands, COMMAND_HELP["models"])


def _add_plan(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help=COMMAND_HELP["plan"],
        description="Count a Llama-family model's parameters from its config.json alone and print, per "
        "strategy (data parallel, ZeRO-2, FSDP full shard / ZeRO-3, LoRA) and precision (float32, bfloat16 "
        "with float32 master weights, pure bfloat16), the memory each GPU holds while unlearning: weights, "
        "gradients, AdamW state and the activations of one micro-batch. See docs/scale.md.",
    )
    p.add_argument(
        "model", help="a preset (llama-2-7b, llama-3.1-8b, smollm2-135m), a model folder or a config.json"
    )
    p.add_argument("--gpus", type=int, default=1, help="GPUs the work is sharded over (default 1)")
    p.add_argument("--batch-size", type=int, default=1, help="micro-batch per GPU (default 1)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per sequence (default 2048)")
    p.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8)")
    p.add_argument(
        "--no-checkpointing", action="store_true", help="without gradient checkpointing (more activations)"
    )
    p.add_argument(
        "--gpu-memory", type=float, default=80.0, help="GiB per GPU, for the fits column (default 80)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_plan)


def _cmd_plan(args) -> int:
    import json

    from relapse.models.plan import load_architecture, plan_json, plan_memory, plan_table

    arch, source = load_architecture(args.model)
    settings = {
        "gpus": args.gpus,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lora_rank": args.lora_r,
        "checkpointing": not args.no_checkpointing,
        "gpu_memory_gb": args.gpu_memory,
    }
    rows = plan_memory(arch, **settings)
    if args.json:
        print(json.dumps(plan_json(arch, source, rows, settings), indent=2))
    else:
        print(plan_table(arch, source, rows, args.gpu_memory))
    return 0


COMMAND_ADDERS = {
    "data": _add_data,
    "models": _add_models,
    "train": _add_train,
    "unlearn": _add_unlearn,
    "attack": _add_attack,
    "diff": _add_diff,
    "eval": _add_eval,
    "audit": _add_audit,
    "report": _add_report,
    "run": _add_run,
    "demo": _add_demo,
    "plan": _add_plan,
}


def build_parser(only: str | None = None, *, lazy: bool = False) -> argparse.ArgumentParser:
    """The CLI's argument parser.

    Building a command's options imports torch and transformers (for defaults and choices), which takes
    seconds. With ``lazy``, only the command named ``only`` is built in full and every other command is
    listed by name and help line, so ``relapse --help`` answers at once; without it every command is built.
    """
    parser = argparse.ArgumentParser(
        prog="relapse",
        description="LLM unlearning that does not fool itself: unlearn, attack, measure, report.",
    )
    parser.add_argument("--version", action="version", version=f"relapse {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging detail")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, add in COMMAND_ADDERS.items():
        if lazy and name != only:
            commands.add_parser(name, help=COMMAND_HELP[name])
        else:
            add(commands)
    return parser


def _requested_command(argv: Sequence[str]) -> str | None:
    """The command word of a command line: its first argument that is not an option (the top-level
    options take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 success, 2 a problem with the input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_requested_command(argv), lazy=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="relapse: %(levelname)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_transformers()
    try:
        return args.func(args)
    except RelapseError as exc:
        print(f"relapse: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        from relapse.runtime import WRITE_ERRNOS

        if exc.errno not in WRITE_ERRNOS:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"relapse: error: cannot write{where}: {exc.strerror}; finished work is saved, and a rerun "
            "resumes once there is room (or permission)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("relapse: interrupted; finished work is saved and a rerun resumes", file=sys.stderr)
        return 130


def _quiet_transformers() -> None:
    """Hide transformers' per-file progress bars; relapse prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
