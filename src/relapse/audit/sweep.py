"""The audit: models x attacks x metrics, one load per model, resumable cell by cell.

Every model (target, retrained, each unlearned one) is loaded once; every attack is applied temporarily
(:func:`relapse.attacks.applied` restores the exact weights), the metrics are computed, and the cell is
written into ``results.json`` at once (atomically), with its per-item details in ``items/``. A killed
audit started again with the same settings skips every finished cell and recomputes none; different
settings in the same folder are refused unless ``overwrite``.

``results.json`` (read back through :func:`relapse.audit.results.load_results`, whose types follow this)::

    {"kind": "relapse-audit", "config": {...}, "config_hash": str,
     "models": {label: {"role": "target" | "retrained" | "unlearned", "path": str,
                "group": str, "seed": int (repeated runs over seeds only)}},
     "cells": {"label|attack": {"model", "attack", "metrics": {name: {value, higher_is_better, best,
               views, item_values (means) | member_scores (AUCs) | text_scores (perplexity),
               truth_ratios (TOFU's forget truth ratios, per item)}},
               "attack_info": {...},
               "seconds": float}},
     "intervals": {"label|attack": {metric: [low, high]}} (bootstrap, derived by ``finish``),
     "diagnostics": {label: {attack: {mean_abs_dw, mean_dw_over_step, share_below_half_step,
                     codes_changed, projection}}},
     "device": str (where the latest run ran; each cell also names its own "device"),
     "recovery": {label: {attack: {metric: ratio | None, "metric:control": ..., "metric:kept": ...,
                  "metric:interval": [low, high], "metric:control_interval": ...,
                  "metric:net_interval": ...}}},
     "verdicts": {label: {"status", "text", "attacks": {attack: decision}, ...}}, "seed": int,
     "seed_summary": {group: {"models", "seeds", "metric", "statuses": {status: count},
                      "attacks": {attack: {"mean", "sd", "n"}}}} (groups of two or more seeds),
     "versions": {...}}

The attack ``none`` is the model as it is.

The device is not part of the config hash, so an audit killed on one machine may resume on another (a
GPU box, or a CPU when the GPU is gone), like the thread count, which is not in the hash either. Cells
computed on different devices agree up to float rounding (greedy generation can differ where two tokens
are nearly tied); each cell records its device so that a mixed audit is visible, and resuming on another
device says so.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from relapse.attacks.base import MEASURED_FORGET_QA, AttackContext, applied
from relapse.attacks.registry import get_attack
from relapse.audit.recovery import NO_ATTACK, cell_key, finish
from relapse.audit.results import RESULTS_KIND, RESULTS_NAME, load_results
from relapse.data.benchmark import benchmark_files, load_benchmark
from relapse.errors import ConfigError
from relapse.metrics.catalog import primary_choices
from relapse.metrics.engine import EvalSettings, Evaluator, forget_truth_ratios, resolve_metrics
from relapse.runtime import (
    LOCK_NAME,
    RunContext,
    atomic_write_json,
    check_device_name,
    check_writable,
    folder_lock,
    hash_files,
    package_versions,
    resolve_device,
    seed_everything,
    set_threads,
    stable_hash,
)

#: The attacks of an audit when none are named (bnb-nf4 needs bitsandbytes).
DEFAULT_ATTACKS = (
    "rtn-w8-ch",
    "rtn-w4-g128",
    "gptq-w4-g128",
    "bnb-nf4",
    "relearn-retain-25",
    "noise-like-rtn-w4-g128",
)
DEFAULT_AUDIT_METRICS = "verbmem,knowmem,privleak,utility,recall,mia_loss,mia_mink_40"
#: Metrics a verdict can follow: one-sided measures of what the forget set still holds.
PRIMARY_METRICS = primary_choices()
#: Metrics whose every cell is relative to the retrained model's unattacked cell: PrivLeak (its Min-40% AUC)
#: and TOFU's forget quality (its per-item forget truth ratios).
REFERENCE_METRICS = ("privleak", "tofu_forget_quality")


@dataclass
class AuditConfig:
    """What an audit sweeps; its hash guards a results folder against mixing runs."""

    target: str
    unlearned: list[str]
    data: str
    retrained: str | None = None
    attacks: list[str] = field(default_factory=lambda: list(DEFAULT_ATTACKS))
    metrics: list[str] = field(default_factory=lambda: resolve_metrics(DEFAULT_AUDIT_METRICS))
    labels: dict[str, str] = field(default_factory=dict)  # path -> label; default: the folder name
    seed: int = 0
    batch_size: int | None = None
    calibration: str | None = None
    primary: str | None = None  # the metric verdicts follow; None: the first measured of VERDICT_METRICS
    # Repeated runs of one method over seeds (path -> seed, path -> the run's name): each such model's
    # cells seed the stochastic attacks with its own seed, and the report summarises each group.
    model_seeds: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    device: str = "auto"  # where it runs: not in to_json() nor the hash (see the module docstring)

    def __post_init__(self) -> None:
        self.device = check_device_name(self.device)
        if not self.attacks:
            raise ConfigError("an audit needs at least one attack: without one nothing tests the forgetting")
        if self.primary is not None and self.primary not in PRIMARY_METRICS:
            raise ConfigError(f"--primary must be one of {', '.join(PRIMARY_METRICS)}, got {self.primary!r}")
        if self.primary is not None and self.primary not in self.metrics:
            raise ConfigError(
                f"--primary {self.primary} is not among the audit's metrics; add it to --metrics"
            )

    def to_json(self) -> dict[str, Any]:
        """The settings that determine the results (hashed, and saved as ``config``): all but the device,
        and ``primary`` only when declared (audits from before it existed keep their hash)."""
        settings = asdict(self)
        settings.pop("device")
        for name in ("primary", "model_seeds", "groups"):  # audits from before these keep their hash
            if not settings[name]:
                settings.pop(name)
        return settings


def model_labels(config: AuditConfig) -> dict[str, dict[str, str]]:
    """``{label: {role, path}}`` with unique labels (folder names unless ``config.labels`` says)."""
    entries = [(config.target, "target")]
    if config.retrained:
        entries.append((config.retrained, "retrained"))
    entries += [(path, "unlearned") for path in config.unlearned]
    models: dict[str, dict[str, str]] = {}
    for path, role in entries:
        base = config.labels.get(path) or Path(path.rstrip("/")).name or role
        label, n = base, 2
        while label in models:
            label, n = f"{base}-{n}", n + 1
        models[label] = {"role": role, "path": path}
        if path in config.groups:
            models[label].update(group=config.groups[path], seed=config.model_seeds.get(path, config.seed))
    return models


def _config_hash(config: AuditConfig, known: dict[str, str] | None = None) -> str:
    """The hash guarding a results folder: settings, each model's identity and the data's bytes.
    ``known`` keeps the identities and data hashes already computed, by path, so that hashing an earlier
    audit's settings beside the new ones reads each model's weights and the data once."""
    from relapse.models.io import model_identity

    known = {} if known is None else known

    def once(key: str, compute) -> str:
        if key not in known:
            known[key] = compute()
        return known[key]

    models = [p for p in [config.target, config.retrained, *config.unlearned] if p]
    return stable_hash(
        {
            "config": config.to_json(),
            "models": {p: once(f"model:{p}", lambda p=p: model_identity(p)) for p in models},
            "data": once(f"data:{config.data}", lambda: hash_files(benchmark_files(Path(config.data)))),
        }
    )


def _earlier_config(existing: dict[str, Any]) -> AuditConfig | None:
    """The settings an earlier audit's results were computed with, or None where they cannot be read."""
    try:
        return AuditConfig(**existing["config"])
    except (ConfigError, KeyError, TypeError, ValueError):
        return None


def _extended(
    existing: dict[str, Any], config: AuditConfig, key: str, known: dict[str, str] | None = None
) -> dict[str, Any] | None:
    """``existing`` carried over to ``config`` when ``config`` only adds attacks or models to it, else None.

    Every finished cell stays valid when the earlier audit's hash still holds for the models and data
    on disk now (none was retrained or edited since), every other setting is equal, and nothing is
    taken away: no attack, no model, no label changed. A retrained model added to an audit that had none
    leaves the cells valid unless a metric is relative to it (PrivLeak, forget quality). The new cells
    are then computed like a resumed audit's; derived parts (recovery, verdicts) are rebuilt at the end.
    ``known``: the identities :func:`_config_hash` already computed for ``key``.
    """
    earlier = _earlier_config(existing)
    if earlier is None or _config_hash(earlier, known) != existing.get("config_hash"):
        return None
    reference = set(REFERENCE_METRICS) & set(config.metrics)
    if earlier.retrained != config.retrained and (earlier.retrained is not None or reference):
        return None
    free = {"attacks", "unlearned", "labels", "retrained", "model_seeds", "groups"}
    before, after = earlier.to_json(), config.to_json()
    if {k: v for k, v in before.items() if k not in free} != {
        k: v for k, v in after.items() if k not in free
    }:
        return None
    if not set(earlier.attacks) <= set(config.attacks):
        return None
    old_models, new_models = model_labels(earlier), model_labels(config)
    if any(new_models.get(label) != row for label, row in old_models.items()):
        return None
    return {**existing, "config": after, "config_hash": key, "models": new_models}


def _open_results(out: Path, config: AuditConfig, overwrite: bool) -> tuple[dict[str, Any], str | None]:
    """The results to resume in ``out`` (new ones where there are none), and a note when an earlier audit
    there is extended by more attacks or models."""
    known: dict[str, str] = {}
    key = _config_hash(config, known)
    path = out / RESULTS_NAME
    if path.exists():
        try:
            existing = load_results(out)
        except ConfigError:  # not an audit's results (or not readable): other settings, as far as we know
            existing = None
        if existing and existing.get("config_hash") == key:
            return existing, None
        if existing and not overwrite:
            extended = _extended(existing, config, key, known)
            if extended is not None:
                added = [a for a in config.attacks if a not in existing["config"]["attacks"]]
                added += [m for m in extended["models"] if m not in existing["models"]]
                return extended, (
                    f"extending the audit in {out} by {', '.join(added)}: "
                    f"its {len(existing['cells'])} finished cells are kept"
                )
        if not overwrite:
            raise ConfigError(
                f"{path} holds an audit with other settings, models or data; pass --overwrite to replace "
                "it or choose another --out (an audit that only adds attacks or models to it extends it)"
            )
        shutil.rmtree(out / "items", ignore_errors=True)
    elif out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    elif out.is_dir() and not overwrite:
        # Without results.json nothing here is an audit's, but for the items a killed audit leaves first.
        foreign = sorted(p.name for p in out.iterdir() if p.name not in ("items", LOCK_NAME))
        if foreign:
            raise ConfigError(
                f"--out {out} holds files an audit did not write ({', '.join(foreign[:3])}); "
                "choose another --out, or pass --overwrite to write the audit there"
            )
    return {
        "kind": RESULTS_KIND,
        "config": config.to_json(),
        "config_hash": key,
        "models": model_labels(config),
        "cells": {},
        "diagnostics": {},
        "seed": config.seed,
    }, None


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of a metric: all but the per-item details (in ``items/``), with the
    per-item values of a mean and the membership scores of an AUC (a few hundred numbers) kept for the
    bootstrap intervals."""
    summary = {k: result.get(k) for k in ("value", "higher_is_better", "best", "views", "seconds")}
    for key in ("item_values", "member_scores", "text_scores", "truth_ratios"):
        if key in result:
            summary[key] = result[key]
    return summary


def _small_info(info: dict[str, Any]) -> dict[str, Any]:
    """The scalar parts of an attack's record (lists of tensor names go to the items file), and the forget
    questions its cells are read on where it says (relearning on half of the forget set)."""
    kept = {k: v for k, v in info.items() if isinstance(v, int | float | str | bool) or v is None}
    if info.get(MEASURED_FORGET_QA):
        kept[MEASURED_FORGET_QA] = list(info[MEASURED_FORGET_QA])
    return kept


def run_audit(
    config: AuditConfig,
    out: str | Path,
    run: RunContext | None = None,
    jobs: int | None = None,
    pool=None,
) -> dict[str, Any]:
    """Run (or resume) the audit into ``out``; returns the final results (also in ``results.json``).

    Models are loaded onto ``config.device`` (``auto``: a GPU when there is one), one at a time per
    process; ``jobs`` processes audit different models at once (``None``: :func:`relapse.workers.
    default_jobs`, both cores of a 2-core CPU), or the processes of ``pool`` (a
    :class:`relapse.workers.Workers` already started, as an experiment passes its own). The numbers do
    not depend on ``jobs``: every cell seeds itself and runs on one process's threads. ``run`` gives the
    threads, progress bars, whether to replace another audit's results in ``out``, and where lines are
    logged; the device is ``config.device`` (``run.device`` is not read).
    """
    run = run or RunContext()
    from relapse.workers import check_jobs

    device = resolve_device(config.device)  # a bad or missing device fails before any work
    if jobs is not None:
        check_jobs(jobs)
    out = Path(out)
    attacks = [get_attack(name) for name in config.attacks]  # unknown names fail before any work
    config.attacks = [a.name for a in attacks]
    config.metrics = resolve_metrics(config.metrics)
    for name in REFERENCE_METRICS:
        if name in config.metrics and not config.retrained:
            raise ConfigError(
                f"{name} needs the retrained model: pass --retrained or drop {name} from --metrics"
            )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    check_writable(out, "the audit folder")
    with folder_lock(out, "audit"):
        return _run_audit(config, out, run, device, jobs, pool)


@dataclass(frozen=True)
class _ModelCells:
    """The cells of one model that one process computes (a task of :func:`_audit_model`)."""

    label: str
    role: str
    path: str
    attacks: tuple[str, ...]
    config: AuditConfig
    out: Path
    retrained_auc: float | None
    progress: bool
    retrained_truth_ratios: list[float] | None = None


def _run_audit(config, out: Path, run: RunContext, device, jobs, pool) -> dict[str, Any]:
    """:func:`run_audit`'s work, inside the folder's lock."""
    from relapse.workers import Task, workers

    progress, log = run.progress, run.log

    load_benchmark(config.data)  # a broken benchmark fails here, before any process starts
    results, extension = _open_results(out, config, run.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    threads_used = set_threads(run.threads)
    earlier = sorted({cell.get("device", "cpu") for cell in results["cells"].values()} - {str(device)})
    results.update(
        threads=threads_used,
        device=str(device),
        versions=package_versions(),
        warnings=_grid_warnings(config),
    )
    if log:
        if extension:
            log(f"note: {extension}")
        for warning in results["warnings"]:
            log(f"warning: {warning}")
        if earlier:
            log(
                f"note: finished cells of this audit ran on {', '.join(earlier)}; the rest run on {device} "
                "(numbers agree up to float rounding)"
            )
    models = results["models"]
    todo = {
        label: [a for a in [NO_ATTACK, *config.attacks] if cell_key(label, a) not in results["cells"]]
        for label in sorted(models, key=lambda label: _ROLE_ORDER.get(models[label]["role"], 2))
    }

    def keep(cell: dict[str, Any]) -> None:  # one finished cell: saved at once, so a kill loses no more
        results["cells"][cell_key(cell["model"], cell["attack"])] = cell["summary"]
        atomic_write_json(out / RESULTS_NAME, results)
        if log:
            log(cell["line"])

    with nullcontext(pool) if pool is not None else workers(jobs, run.threads, config.device) as processes:
        labels = [label for label in todo if todo[label]]
        parallel = processes.jobs > 1 and len(labels) > 1
        retrained = next((label for label in labels if models[label]["role"] == "retrained"), None)
        if retrained and NO_ATTACK in todo[retrained] and set(REFERENCE_METRICS) & set(config.metrics):
            # PrivLeak (forget quality) of every cell is relative to the retrained model's unattacked AUC
            # (forget truth ratios): before any other model's task is made, that cell (several processes)
            # or the whole retrained model (one).
            first = [NO_ATTACK] if parallel else todo[retrained]
            job = _job(results, config, out, retrained, first, progress and not parallel)
            processes.run([Task(_audit_model, (job,))], on_event=keep)
            todo[retrained] = [attack for attack in todo[retrained] if attack not in first]
            labels = [label for label in labels if todo[label]]
        if parallel:  # each process takes whole models (one load each), the ones with most cells first
            labels.sort(key=lambda label: -len(todo[label]))
            if log:
                log(f"auditing {len(labels)} models in {min(processes.jobs, len(labels))} processes")
        tasks = [
            Task(_audit_model, (_job(results, config, out, label, todo[label], progress and not parallel),))
            for label in labels
        ]
        processes.run(tasks, on_event=keep)
    results["diagnostics"] = _diagnostics(results, config, device)
    finish(results)
    atomic_write_json(out / RESULTS_NAME, results)
    return results


#: The order models are audited in when one process does it all (the retrained model's AUC first).
_ROLE_ORDER = {"retrained": 0, "target": 1}


def _job(results, config, out, label: str, attacks: Sequence[str], progress: bool) -> _ModelCells:
    info = results["models"][label]
    return _ModelCells(
        label=label,
        role=info["role"],
        path=info["path"],
        attacks=tuple(attacks),
        config=config,
        out=out,
        retrained_auc=_retrained_auc(results),
        progress=progress,
        retrained_truth_ratios=_retrained_truth_ratios(results),
    )


def _audit_model(job: _ModelCells, emit) -> None:
    """Load one model and compute its cells (in this process or a worker), writing each cell's items file
    and emitting ``{"model", "attack", "summary", "line"}`` for the caller to keep."""
    from relapse.attacks.calibration import read_calibration_file
    from relapse.models.io import load_model

    config = job.config
    device = resolve_device(config.device)  # in a worker on a machine with several GPUs: its own
    benchmark = load_benchmark(config.data)
    calibration = read_calibration_file(config.calibration) if config.calibration else []
    settings = EvalSettings(batch_size=config.batch_size)
    attacks = {attack.name: attack for attack in map(get_attack, config.attacks)}
    net, tokenizer = load_model(job.path, device=str(device))
    retrained_auc = job.retrained_auc
    retrained_ratios = job.retrained_truth_ratios
    seed = config.model_seeds.get(job.path, config.seed)
    for attack_name in job.attacks:
        seed_everything(seed)
        settings.retrained_auc = retrained_auc
        settings.retrained_truth_ratios = retrained_ratios
        started = time.perf_counter()
        if attack_name == NO_ATTACK:
            metrics, info = _measure(net, tokenizer, benchmark, settings, config.metrics), {}
            if job.role == "retrained" and "privleak" in metrics:
                retrained_auc = metrics["privleak"]["views"]["auc"]
            if job.role == "retrained" and "tofu_forget_quality" in metrics:
                retrained_ratios = metrics["tofu_forget_quality"]["truth_ratios"]
        else:
            context = AttackContext(
                tokenizer=tokenizer,
                benchmark=benchmark,
                seed=seed,
                progress=job.progress,
                calibration_texts=calibration,
            )
            with applied(attacks[attack_name], net, context) as info:
                metrics = _measure(net, tokenizer, benchmark, settings, config.metrics)
        seconds = time.perf_counter() - started
        atomic_write_json(
            job.out / "items" / job.label / f"{attack_name}.json",
            {"model": job.label, "attack": attack_name, "attack_info": info, "metrics": metrics},
        )
        summary = {
            "model": job.label,
            "attack": attack_name,
            "metrics": {name: _summary(r) for name, r in metrics.items()},
            "attack_info": _small_info(info),
            "seconds": seconds,
            "device": str(device),
        }
        line = _cell_line(job.label, attack_name, metrics, seconds)
        emit({"model": job.label, "attack": attack_name, "summary": summary, "line": line})


def _grid_warnings(config: AuditConfig) -> list[str]:
    """Attacks that round onto the grid the target's base weights came from (e.g. a model fetched from a
    Q4_1 GGUF file): on such a grid small updates snap back to the base model by construction."""
    from relapse.attacks.provenance import grid_warning

    found = (grid_warning(name, config.target) for name in config.attacks)
    return [warning for warning in found if warning]


def _retrained_auc(results: dict[str, Any]) -> float | None:
    """PrivLeak's reference: the retrained model's Min-40% AUC, unattacked (as MUSE compares)."""
    for label, info in results["models"].items():
        if info["role"] == "retrained":
            cell = results["cells"].get(cell_key(label, NO_ATTACK))
            if cell and "privleak" in cell["metrics"]:
                return cell["metrics"]["privleak"]["views"]["auc"]
            return None
    return None


def _retrained_truth_ratios(results: dict[str, Any]) -> list[float] | None:
    """Forget quality's reference: the retrained model's per-item forget truth ratios, unattacked."""
    for label, info in results["models"].items():
        if info["role"] == "retrained":
            cell = results["cells"].get(cell_key(label, NO_ATTACK))
            if cell and "tofu_forget_quality" in cell["metrics"]:
                return cell["metrics"]["tofu_forget_quality"].get("truth_ratios")
            return None
    return None


def _measure(net, tokenizer, benchmark, settings, metrics: Sequence[str]) -> dict[str, Any]:
    names = list(metrics)
    evaluator = Evaluator(net, tokenizer, benchmark, settings)
    # The retrained model's own unattacked cell: its AUC (forget truth ratios) is the reference, so its
    # PrivLeak is 0 and its forget quality 1 by definition.
    if "privleak" in names and settings.retrained_auc is None:
        settings.retrained_auc = evaluator.compute("mia_mink_40")["value"]
    if "tofu_forget_quality" in names and settings.retrained_truth_ratios is None:
        settings.retrained_truth_ratios = forget_truth_ratios(evaluator)
    return evaluator.run(names)


def _cell_line(label: str, attack: str, metrics: dict[str, Any], seconds: float) -> str:
    shown = ", ".join(f"{name}={r['value']:.3g}" for name, r in list(metrics.items())[:4])
    return f"audit {label} | {attack}: {shown} ({seconds:.1f} s)"


def _diagnostics(results: dict[str, Any], config: AuditConfig, device: torch.device) -> dict[str, Any]:
    """Weight diagnostics of each unlearned model against the target under each grid-based attack, on
    ``device`` (the target and one unlearned model at a time)."""
    from relapse.attacks.diagnostics import weight_diagnostics
    from relapse.models.io import load_model
    from relapse.models.parts import decoder_linear_weights

    schemes = {name: diagnostic_scheme(name) for name in config.attacks}
    schemes = {name: scheme for name, scheme in schemes.items() if scheme is not None}
    if not schemes:
        return {}
    models = results["models"]
    target_label = next(label for label, info in models.items() if info["role"] == "target")
    target, _ = load_model(models[target_label]["path"], device=str(device))
    names = sorted(decoder_linear_weights(target))
    target_state = target.state_dict()
    report: dict[str, Any] = {}
    for label, info in models.items():
        if info["role"] != "unlearned":
            continue
        model, _ = load_model(info["path"], device=str(device))
        state = model.state_dict()
        report[label] = {
            attack: weight_diagnostics(target_state, state, names, scheme)["total"]
            for attack, scheme in schemes.items()
        }
    return report


def diagnostic_scheme(attack_name: str):
    """The RTN grid an attack rounds to (its declared ``grid``: GPTQ and AWQ round to RTN's grid), or
    ``None`` for attacks that do not round to relapse's grid (noise, pruning, relearning, the deployment
    formats, llm-compressor) and for names this version does not know."""
    from relapse.attacks.registry import attack_or_none

    attack = attack_or_none(attack_name)
    return attack.grid if attack else None
