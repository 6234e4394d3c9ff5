"""lm-evaluation-harness as an optional utility backend of ``relapse eval`` (``--lm-eval TASKS``).

Users judge utility with lm-eval's tasks (MMLU and the like) and compare with published tables, so
``relapse eval`` can run them on the model it has already loaded. lm-eval wraps that model object (its
``HFLM`` takes a model and tokenizer), so relapse's loading rules hold for lm-eval too: safetensors only,
``trust_remote_code`` off, and any ``--attack`` already applied in memory. Tasks come from lm-eval's own
registry, from folders of task YAMLs (``--lm-eval-include``), and from the benchmark itself: relapse's
multiple-choice tasks (:mod:`relapse.data.lm_eval_task`) are written from ``--data`` into a temporary
folder whenever one is named, so they need no hub and no separate step.

lm-eval is optional (``pip install 'relapse[lm-eval]'``): nothing here imports it at module level, and
:func:`require_lm_eval` turns its absence into one line naming that command.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from relapse.data.benchmark import Benchmark
from relapse.data.lm_eval_task import TASK_SPLITS, task_name, write_lm_eval_tasks
from relapse.errors import ConfigError

#: What a user runs to get the backend; every refusal for its absence names it.
INSTALL_HINT = "pip install 'relapse[lm-eval]'"
#: relapse's own task names (one per QA split), written from the benchmark when asked for.
RELAPSE_TASKS = {task_name(split): split for split in TASK_SPLITS}


def require_lm_eval() -> ModuleType:
    """The ``lm_eval`` module, or a :class:`ConfigError` saying how to install it."""
    try:
        import lm_eval
    except ImportError:
        raise ConfigError(
            f"--lm-eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}"
        ) from None
    return lm_eval


def parse_tasks(spec: str) -> list[str]:
    """Task names from a comma-separated list, in order, without repeats or empty names."""
    names: list[str] = []
    for name in (item.strip() for item in spec.split(",")):
        if name and name not in names:
            names.append(name)
    if not names:
        raise ConfigError("--lm-eval names no task; give comma-separated lm-eval task names")
    return names


@dataclass(frozen=True)
class LmEvalRequest:
    """What the user asked lm-eval to run (``--lm-eval`` and its options), before anything is checked."""

    tasks: str | tuple[str, ...]
    include: tuple[str | Path, ...] = ()
    num_fewshot: int | None = None
    limit: int | None = None


@dataclass
class LmEvalPlan:
    """A checked request: the task names, the folders they are found in, and lm-eval's TaskManager."""

    tasks: list[str]
    include: list[Path]
    num_fewshot: int | None
    limit: int | None
    batch_size: int | None
    #: lm-eval's TaskManager over the include folders and relapse's own tasks, and over lm-eval's registry
    #: when some task is in neither.
    task_manager: Any = None
    #: Whether lm-eval's own registry was searched (it is skipped when every task is found locally:
    #: indexing its thousands of YAMLs takes seconds).
    registry: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "include": [str(p) for p in self.include],
            "registry": self.registry,
            "num_fewshot": self.num_fewshot,
            "limit": self.limit,
        }


@contextlib.contextmanager
def plan_lm_eval(
    request: LmEvalRequest, benchmark: Benchmark, batch_size: int | None = None
) -> Iterator[LmEvalPlan]:
    """Check ``request`` and find every task; yields the plan, and removes relapse's task folder after.

    relapse's own tasks (:data:`RELAPSE_TASKS`) named in the request are written from ``benchmark`` into
    a temporary folder searched after the include folders, so they always describe the benchmark being
    evaluated. lm-eval missing, an unknown task name, a missing include folder, a bad count or a task's
    data out of reach (every task is loaded once here) is one :class:`ConfigError` line, raised here,
    before the evaluated model is loaded.
    """
    import tempfile

    require_lm_eval()
    spec = request.tasks if isinstance(request.tasks, str) else ",".join(request.tasks)
    names = parse_tasks(spec)
    checks = (("--lm-eval-fewshot", request.num_fewshot, 0), ("--lm-eval-limit", request.limit, 1))
    for option, value, least in checks:
        if value is not None and value < least:
            raise ConfigError(f"{option} must be at least {least}, got {value}")
    folders = [Path(p) for p in request.include]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"--lm-eval-include {folder} is not a folder of lm-eval task YAMLs")
    ours = [name for name in names if name in RELAPSE_TASKS]
    with tempfile.TemporaryDirectory(prefix="relapse-lm-eval-") as scratch:
        paths = list(folders)
        if ours:
            write_lm_eval_tasks(benchmark, scratch, [RELAPSE_TASKS[name] for name in ours])
            paths.append(Path(scratch))
        plan = LmEvalPlan(names, folders, request.num_fewshot, request.limit, batch_size)
        plan.task_manager, plan.registry = _task_manager(names, paths)
        with _quiet_lm_eval(), _data_errors(), _offline_without_hub():
            # Load every task's data now (datasets keeps it for the run), so a task whose data cannot be
            # had (the hub out of reach) fails before relapse's metrics are spent, not after.
            manager = plan.task_manager
            # Newer lm-eval has ``load`` (and deprecates the other); older, only ``load_task_or_group``.
            (manager.load if hasattr(manager, "load") else manager.load_task_or_group)(names)
        yield plan


@contextlib.contextmanager
def _offline_without_hub() -> Iterator[None]:
    """``datasets`` and ``huggingface_hub`` in offline mode while the hub is out of reach: a task whose
    data is on the hub then fails at once (from the local cache) instead of after most of a minute of
    retries and a warning per retry, and local files load as always."""
    import datasets.config
    import huggingface_hub.constants

    from relapse.models.io import hub_reachable

    if hub_reachable():
        yield
        return
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


@contextlib.contextmanager
def _data_errors() -> Iterator[None]:
    """A task's data that cannot be loaded (no hub, a missing data file) as one :class:`ConfigError` line:
    ``datasets`` raises ``ConnectionError`` or ``FileNotFoundError``, both ``OSError``s."""
    try:
        yield
    except OSError as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(
            f"lm-eval could not load a task's data: {text} (tasks of lm-eval's registry fetch their data "
            "from the Hugging Face hub; offline, use tasks whose YAML names local files)"
        ) from None


def _task_manager(names: list[str], paths: list[Path]) -> tuple[Any, bool]:
    """lm-eval's TaskManager over ``paths``, with its own registry only when some task is not there."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        if paths:
            local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
            if all(name in local.all_tasks for name in names):
                return local, False
        manager = TaskManager(include_path=[str(p) for p in paths] or None)
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        where = "lm-eval's registry" + (" nor the --lm-eval-include folders" if paths else "")
        raise ConfigError(
            f"unknown lm-eval task{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: not in {where} "
            f"(relapse's own: {', '.join(RELAPSE_TASKS)})"
        )
    return manager, True


def run_lm_eval(plan: LmEvalPlan, model, tokenizer, progress: bool = True) -> dict[str, Any]:
    """Run the plan's tasks on ``model`` (already loaded, and attacked if asked) with lm-eval.

    Returns the record's ``lm_eval`` entry: lm-eval's version, the plan, and per task each metric of
    lm-eval's results (``acc``, ``acc_norm``, their standard errors; a filter other than ``none`` keeps
    lm-eval's ``metric,filter`` name), the number of documents, and the per-document values of each
    metric (``per_item``, in document order) so a result can be checked item by item. Without
    ``progress``, lm-eval's and datasets' progress bars are hidden (``--quiet``).
    """
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    batch: int | str = plan.batch_size or ("auto" if model.device.type == "cuda" else 8)
    quiet = contextlib.nullcontext() if progress else _no_progress_bars()
    with _quiet_lm_eval(), _data_errors(), _offline_without_hub(), quiet:
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch)
        out = lm_eval.simple_evaluate(
            model=wrapped,
            tasks=plan.tasks,
            task_manager=plan.task_manager,
            num_fewshot=plan.num_fewshot,
            limit=plan.limit,
            log_samples=True,
        )
    tasks: dict[str, Any] = {}
    for name, result in out["results"].items():
        entry: dict[str, Any] = {}
        for key, value in result.items():
            if "," not in key:
                continue
            metric, filt = key.split(",", 1)
            entry[metric if filt == "none" else key] = _number(value)
        entry["samples"] = out.get("n-samples", {}).get(name, {}).get("effective")
        entry["n_shot"] = out.get("n-shot", {}).get(name)
        entry["task_version"] = out.get("versions", {}).get(name)
        samples = out.get("samples", {}).get(name)
        if samples:
            ordered = sorted(samples, key=lambda s: s["doc_id"])
            metrics = ordered[0].get("metrics", [])
            entry["per_item"] = {m: [_number(s[m]) for s in ordered] for m in metrics if m in ordered[0]}
        tasks[name] = entry
    return {
        "version": getattr(lm_eval, "__version__", None) or _version("lm_eval"),
        **plan.to_json(),
        "batch_size": batch,
        "results": tasks,
    }


def format_lm_eval(entry: dict[str, Any]) -> str:
    """The lm-eval part of an eval record as an aligned table: task, acc, acc_norm, documents."""
    rows = [("lm-eval task", "acc", "acc_norm", "docs")]
    for name, result in entry["results"].items():
        rows.append(
            (name, _cell(result.get("acc")), _cell(result.get("acc_norm")), str(result.get("samples") or ""))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [f"{a:<{widths[0]}}  {b:>{widths[1]}}  {c:>{widths[2]}}  {d:>{widths[3]}}" for a, b, c, d in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"lm-eval {entry['version']}")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _number(value: Any) -> Any:
    """A JSON-safe number: lm-eval writes ``"N/A"`` for a missing standard error, and NaN is not JSON."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        return None if isinstance(value, float) and math.isnan(value) else value
    return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval logs a warning for every model object passed in and every task it reads; relapse prints
    its own summary, so its loggers show errors only (everything with ``relapse -v``)."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


#: The lm-eval modules that draw progress bars with a module-level ``tqdm`` (some with no way to turn
#: them off from outside).
_TQDM_MODULES = ("lm_eval.api.task", "lm_eval.api.model", "lm_eval.models.huggingface")


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Hide the progress bars of lm-eval and datasets for ``--quiet``: lm-eval builds its requests under a
    ``tqdm`` it offers no switch for, so its modules' ``tqdm`` is swapped for a disabled one meanwhile."""
    import importlib

    import datasets
    from tqdm import tqdm

    def silent(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    modules = [importlib.import_module(name) for name in _TQDM_MODULES]
    saved = [module.tqdm for module in modules]
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    for module in modules:
        module.tqdm = silent
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            module.tqdm = original
        if bars:
            datasets.enable_progress_bars()
