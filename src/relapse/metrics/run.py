"""``relapse eval``: load a model, optionally attack it, compute metrics, write one JSON record."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relapse.data.benchmark import load_benchmark
from relapse.errors import ConfigError
from relapse.metrics.catalog import metric_info
from relapse.metrics.engine import (
    DEFAULT_METRICS,
    EvalSettings,
    Evaluator,
    forget_truth_ratios,
    resolve_metrics,
)
from relapse.metrics.mia import MUSE_RETRAINED_AUC, PRIVLEAK_K
from relapse.runtime import (
    RunContext,
    atomic_write_json,
    package_versions,
    resolve_device,
    seed_everything,
    set_threads,
)

if TYPE_CHECKING:
    from relapse.metrics.harness import LmEvalRequest

RECORD_KIND = "relapse-eval"


def retrained_auc_of(model: str, benchmark, settings: EvalSettings, device: str | None = "auto") -> float:
    """The Min-40% AUC of a retrained model on ``benchmark`` (PrivLeak's reference), computed on
    ``device``."""
    return retrained_references(model, benchmark, settings, device)["auc"]


def retrained_references(
    model: str,
    benchmark,
    settings: EvalSettings,
    device: str | None = "auto",
    auc: bool = True,
    truth_ratios: bool = False,
) -> dict[str, Any]:
    """What other models are measured against, from one load of the retrained model: its Min-40% AUC
    (``auc``, PrivLeak's reference) and its per-item forget truth ratios (``truth_ratios``, TOFU's forget
    quality's)."""
    from relapse.models.io import load_model

    net, tokenizer = load_model(str(model), device=str(resolve_device(device)))
    evaluator = Evaluator(net, tokenizer, benchmark, settings)
    out: dict[str, Any] = {}
    if auc:
        out["auc"] = float(evaluator.compute(f"mia_mink_{round(PRIVLEAK_K * 100)}")["value"])
    if truth_ratios:
        out["truth_ratios"] = forget_truth_ratios(evaluator)
    return out


def run_eval(
    model: str,
    data: str | Path,
    metrics: str | None = None,
    out: Path | None = None,
    attack: str | None = None,
    retrained: str | None = None,
    retrained_auc: float | str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    calibration: str | Path | None = None,
    run: RunContext | None = None,
    lm_eval: LmEvalRequest | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` (after ``attack``, applied temporarily) on the benchmark in ``data``.

    ``metrics`` defaults to :data:`DEFAULT_METRICS`. ``retrained_auc`` may be a number or
    ``news``/``books`` (MUSE's published retrained AUCs). Without a retrained reference the default list
    drops ``privleak``; naming it explicitly is then an error. The record is written atomically to
    ``out`` when given. Models are evaluated on ``run.device`` (``auto``: a GPU when there is one), which the
    record names. ``lm_eval`` also runs lm-evaluation-harness tasks on the same loaded (and attacked) model,
    after relapse's metrics; their results go into the record's ``lm_eval`` entry
    (:mod:`relapse.metrics.harness`). Its tasks are checked before the evaluated model is loaded.
    """
    run = run or RunContext()
    if out is not None and Path(out).exists() and not run.overwrite:
        raise ConfigError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    target = resolve_device(run.device)
    threads_used = set_threads(run.threads)
    seed_everything(seed)
    benchmark = load_benchmark(data)
    settings = EvalSettings(batch_size=batch_size, progress=run.progress)
    names = resolve_metrics(metrics or DEFAULT_METRICS)
    if lm_eval is not None:
        from relapse.metrics.harness import require_lm_eval

        require_lm_eval()  # before the retrained reference is loaded, so its absence fails at once
    quality = "tofu_forget_quality" in names
    reference = _reference_auc(
        retrained, retrained_auc, benchmark, settings, str(target), quality, "privleak" in names
    )
    settings.retrained_auc = reference.get("auc") if reference else None
    dropped = []
    if quality and (reference is None or "truth_ratios" not in reference):
        named = metrics is not None and "tofu_forget_quality" in [n.strip() for n in metrics.split(",")]
        if named:
            raise ConfigError(
                "tofu_forget_quality needs the retrained model's forget truth ratios: pass --retrained MODEL"
            )
        names.remove("tofu_forget_quality")
        dropped.append("tofu_forget_quality (no --retrained)")
    elif quality:
        settings.retrained_truth_ratios = reference.pop("truth_ratios")
        reference["forget_truth_ratio_items"] = len(settings.retrained_truth_ratios)
    if reference is None and "privleak" in names:
        if metrics is not None:
            raise ConfigError(
                "privleak needs the retrained model's AUC: pass --retrained MODEL or --retrained-auc X "
                f"(MUSE's: news {MUSE_RETRAINED_AUC['news']}, books {MUSE_RETRAINED_AUC['books']})"
            )
        names.remove("privleak")
        dropped.append("privleak (no --retrained or --retrained-auc)")

    from relapse.models.io import load_model

    attack_record = None
    harness_plan = harness_record = None
    stack = contextlib.ExitStack()
    with stack:
        if lm_eval is not None:
            from relapse.metrics.harness import plan_lm_eval

            harness_plan = stack.enter_context(plan_lm_eval(lm_eval, benchmark, batch_size))
        net, tokenizer = load_model(str(model), device=str(target))
        if attack:
            from relapse.attacks.base import AttackContext, applied
            from relapse.attacks.calibration import read_calibration_file
            from relapse.attacks.registry import get_attack

            context = AttackContext(
                tokenizer=tokenizer,
                benchmark=benchmark,
                seed=seed,
                progress=run.progress,
                calibration_texts=read_calibration_file(calibration) if calibration else [],
            )
            chosen = get_attack(attack)
            info = stack.enter_context(applied(chosen, net, context))
            attack_record = {"name": chosen.name, "kind": chosen.kind, "info": info}
        results = Evaluator(net, tokenizer, benchmark, settings).run(names)
        if harness_plan is not None:
            from relapse.metrics.harness import run_lm_eval

            harness_record = run_lm_eval(harness_plan, net, tokenizer, run.progress)
    versions = package_versions()
    if harness_record is not None:
        versions["lm_eval"] = harness_record["version"]
    record = {
        "kind": RECORD_KIND,
        "model": str(model),
        "data": str(data),
        "attack": attack_record,
        "retrained": reference,
        "metrics": results,
        "skipped": dropped,
        "settings": settings.to_json(),
        "seed": seed,
        "threads": threads_used,
        "device": str(target),
        "versions": versions,
    }
    if harness_record is not None:
        record["lm_eval"] = harness_record
    if out is not None:
        atomic_write_json(Path(out), record)
    return record


def _reference_auc(
    retrained,
    retrained_auc,
    benchmark,
    settings,
    device: str,
    truth_ratios: bool = False,
    privleak: bool = True,
) -> dict[str, Any] | None:
    """The retrained reference: ``{"source", "auc"}``, with the forget truth ratios when ``truth_ratios``
    (and without the AUC when only they are needed: a benchmark without holdout texts has no AUC)."""
    if retrained and retrained_auc is not None:
        raise ConfigError("give --retrained or --retrained-auc, not both")
    if retrained:
        found = retrained_references(
            retrained,
            benchmark,
            settings,
            device,
            auc=privleak or not truth_ratios,
            truth_ratios=truth_ratios,
        )
        return {"source": str(retrained), **found}
    if retrained_auc is None:
        return None
    if isinstance(retrained_auc, str) and retrained_auc in MUSE_RETRAINED_AUC:
        return {"source": f"MUSE {retrained_auc}", "auc": MUSE_RETRAINED_AUC[retrained_auc]}
    try:
        value = float(retrained_auc)
    except ValueError:
        raise ConfigError(
            f"--retrained-auc must be a number in (0, 1] or one of {', '.join(MUSE_RETRAINED_AUC)}, "
            f"got {retrained_auc!r}"
        ) from None
    if not 0 < value <= 1:
        raise ConfigError(f"--retrained-auc must be in (0, 1], got {value}")
    return {"source": "given", "auc": value}


def format_results(record: dict[str, Any]) -> str:
    """The metrics of an eval record as an aligned table."""
    rows = [("metric", "value", "goal", "views")]
    for name, result in record["metrics"].items():
        rows.append((name, _number(result["value"]), _goal(name), _views(result.get("views", {}))))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:<{widths[2]}}  {d}".rstrip() for a, b, c, d in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    for note in record.get("skipped", []):
        lines.append(f"skipped: {note}")
    if record.get("lm_eval"):
        from relapse.metrics.harness import format_lm_eval

        lines += ["", format_lm_eval(record["lm_eval"])]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"


def _goal(name: str) -> str:
    info = metric_info(name)
    return (info.goal if info else None) or ""


def _views(views: dict[str, float]) -> str:
    return "  ".join(f"{name}={_number(value)}" for name, value in views.items())
