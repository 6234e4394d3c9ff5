"""The one reader of an audit's ``results.json``: its name, its shape as types, a loader with clear errors.

The audit (:mod:`relapse.audit.sweep`) writes the file; the report, ``relapse report``, the experiment
and the benchmark scripts read it through :func:`load_results`, which checks the structure they rely on
so that a broken or foreign file is one :class:`~relapse.errors.ConfigError` line saying what is wrong,
not a ``KeyError`` from deep inside a table. This module imports nothing heavy (no torch): reading
results must stay cheap.

The types describe the file as :mod:`relapse.audit.sweep`'s docstring lays it out; ``total=False`` marks
the parts an unfinished or older audit may lack.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, TypedDict

from relapse.errors import ConfigError

#: The file an audit folder keeps its results in.
RESULTS_NAME = "results.json"

#: What ``kind`` says in an audit's results.
RESULTS_KIND = "relapse-audit"

Role = Literal["target", "retrained", "unlearned"]
ROLES: tuple[Role, ...] = ("target", "retrained", "unlearned")


class MetricSummary(TypedDict, total=False):
    """One metric of one cell: its value and declared direction, with what its intervals resample."""

    value: float | None
    higher_is_better: bool | None
    best: float | None
    views: dict[str, float]
    seconds: float
    item_values: list[float]
    member_scores: dict[str, list[float]]
    text_scores: dict[str, list[float]]


class Cell(TypedDict, total=False):
    """One model under one attack (``"label|attack"`` in ``cells``)."""

    model: str
    attack: str
    metrics: dict[str, MetricSummary]
    attack_info: dict[str, Any]
    seconds: float
    device: str


class ModelEntry(TypedDict, total=False):
    """One audited model: its role and folder (and its group and seed when run over several seeds)."""

    role: Role
    path: str
    group: str
    seed: int


class AuditResults(TypedDict, total=False):
    """A whole ``results.json``; ``intervals``, ``recovery``, ``verdicts`` and ``seed_summary`` are
    derived from the cells by :func:`relapse.audit.recovery.finish`."""

    kind: str
    config: dict[str, Any]
    config_hash: str
    models: dict[str, ModelEntry]
    cells: dict[str, Cell]
    diagnostics: dict[str, dict[str, dict[str, float]]]
    seed: int
    threads: int
    device: str
    versions: dict[str, str]
    warnings: list[str]
    intervals: dict[str, dict[str, list[float] | None]]
    recovery: dict[str, dict[str, dict[str, Any]]]
    verdicts: dict[str, dict[str, Any]]
    seed_summary: dict[str, Any]


def load_results(directory: str | Path) -> AuditResults:
    """Read and check ``directory/results.json``; a missing or malformed file is a :class:`ConfigError`.

    Only the structure the readers rely on is checked (see :func:`schema_problem`).
    """
    path = Path(directory) / RESULTS_NAME
    if not path.is_file():
        raise ConfigError(
            f"no {RESULTS_NAME} in {directory}: give the folder an audit wrote (relapse audit --out DIR)"
        )
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from None
    problem = schema_problem(results)
    if problem:
        raise ConfigError(f"{path} is not an audit's results: {problem}")
    return results


def schema_problem(results: Any) -> str | None:
    """The first thing the readers need that ``results`` lacks, or ``None``."""
    if not isinstance(results, dict):
        return "the top level is not a JSON object"
    if results.get("kind", RESULTS_KIND) != RESULTS_KIND:
        return f"its kind is {results.get('kind')!r}, not '{RESULTS_KIND}'"
    for key in ("config", "models", "cells"):
        if not isinstance(results.get(key), dict):
            return f"'{key}' is missing or not an object"
    config = results["config"]
    if not isinstance(config.get("attacks"), list) or not all(isinstance(a, str) for a in config["attacks"]):
        return "'config.attacks' is missing or not a list of names"
    if not isinstance(config.get("metrics", []), list):
        return "'config.metrics' is not a list of names"
    for label, info in results["models"].items():
        if not isinstance(info, dict) or info.get("role") not in ROLES:
            return f"model {label!r} has no role of target, retrained or unlearned"
    for key, cell in results["cells"].items():
        if not isinstance(cell, dict) or not isinstance(cell.get("metrics"), dict):
            return f"cell {key!r} has no 'metrics' object"
        for name, entry in cell["metrics"].items():
            number = entry.get("value", "") if isinstance(entry, dict) else ""
            if number is not None and (isinstance(number, bool) or not isinstance(number, int | float)):
                return f"metric {name!r} of cell {key!r} has no numeric 'value'"
    for key in ("diagnostics", "versions"):
        if results.get(key) is not None and not isinstance(results[key], dict):
            return f"'{key}' is not an object"
    return None
