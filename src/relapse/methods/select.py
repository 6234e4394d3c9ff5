"""Utility-preserving selection: the learning rate that forgets with the least damage.

A method's numbers depend on its learning rate more than on anything else: too small and it never
forgets, too large and it forgets by breaking the model. Comparing methods at one fixed rate therefore
compares rates, not methods. ``--select-lr`` runs a method at several rates, each until the run's forget
target (``--stop-forget-recall`` / ``--stop-forget-nll``), and keeps the run that reaches the target with
the highest retain recall, the way MUSE picks the checkpoints it reports. The whole sweep is recorded.

Rates are tried from the largest down: a rate that does not reach the target within ``max_steps`` is
the last one tried, since smaller ones move the weights less in the same number of steps; a rate whose
run diverges (a non-finite loss) is recorded as such and the next one is tried. Every
candidate is an ordinary cached unlearning run, so a sweep resumes and a second sweep only reads.
Selection costs no extra evaluation: each run already evaluates forget and retain recall at every check
(``eval_every``) for its stop rule, and the choice reads those numbers.

A run whose retain recall ends below ``utility_floor`` times the starting model's is *over-unlearned*:
it forgot by losing the utility the forgetting was supposed to keep. Every run records this; the audit
repeats it beside the verdict.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relapse.errors import ConfigError, DivergenceError
from relapse.runtime import atomic_write_json, replace_dir

if TYPE_CHECKING:
    from relapse.methods.unlearn import UnlearnConfig, UnlearnResult

#: Retain utility below this share of the starting model's marks a run over-unlearned.
DEFAULT_UTILITY_FLOOR = 0.9


def utility_check(start: dict[str, float], final: dict[str, float], floor: float) -> dict[str, Any]:
    """Whether a run kept its utility: final retain recall against ``floor`` x the starting model's."""
    before, after = start.get("recall_retain"), final.get("recall_retain")
    if before is None or after is None:
        return {"floor": floor, "over_unlearned": None}
    return {
        "floor": floor,
        "start_recall_retain": before,
        "final_recall_retain": after,
        "over_unlearned": after < floor * before,
    }


def reached_target(record: dict[str, Any]) -> bool:
    """Whether a finished run met its forget target (its stop rule fired)."""
    return bool(record.get("stopped_early"))


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The run to keep: of those that reached the target, the highest final retain recall (a tie goes to
    the larger rate, which took fewer steps); if none did, the one that forgot most."""
    reached = [r for r in rows if r["reached_target"]]
    if reached:
        return max(reached, key=lambda r: (r["final"].get("recall_retain", 0.0), r["lr"]))
    return min(rows, key=lambda r: (r["final"].get("recall_forget", 1.0), -r["lr"]))


def select_run(
    model: str | Path,
    data_dir: Path,
    out_path: Path,
    key: str,
    config: UnlearnConfig,
    run_one,
) -> UnlearnResult:
    """Run ``config`` at each of ``config.select_lr`` (through ``run_one(config)``, which caches) and
    save the chosen run to ``out_path`` with the sweep in its record."""
    from relapse.methods.unlearn import RECORD_NAME, UnlearnResult

    if config.stop_forget_recall is None and config.stop_forget_nll is None:
        raise ConfigError("--select-lr needs a forget target: --stop-forget-recall or --stop-forget-nll")
    rows: list[dict[str, Any]] = []
    results = {}
    rates = sorted(set(config.select_lr), reverse=True)
    for position, lr in enumerate(rates):
        try:
            result = run_one(replace(config, lr=lr, select_lr=None))
        except DivergenceError as exc:  # too large a rate: the smaller ones may still work
            rows.append({"lr": lr, "diverged": str(exc)})
            continue
        record = result.record
        row = {
            "lr": lr,
            "steps": record["steps"],
            "reached_target": reached_target(record),
            "final": record["final"],
            "over_unlearned": record.get("utility", {}).get("over_unlearned"),
            "seconds": record.get("wall_time_s"),
            "path": str(result.path),
        }
        rows.append(row)
        results[lr] = result
        if not row["reached_target"]:
            rows += [
                {
                    "lr": smaller,
                    "skipped": f"lr {lr:g} did not reach the forget target in {record['steps']} steps",
                }
                for smaller in rates[position + 1 :]
            ]
            break
    tried = [r for r in rows if "final" in r]
    if not tried:
        raise DivergenceError(f"every learning rate of --select-lr diverged: {rows[-1]['diverged']}")
    chosen = choose(tried)
    source = results[chosen["lr"]]
    record = {
        **source.record,
        "cache_key": key,
        "config": {**asdict(config), "lr": chosen["lr"]},
        "selection": {
            "rule": "highest final recall_retain among runs that reached the forget target",
            "chosen_lr": chosen["lr"],
            "reached_target": chosen["reached_target"],
            "candidates": rows,
            "seconds": sum(r["seconds"] or 0.0 for r in tried),
        },
    }
    _copy_model(source.path, out_path, record, RECORD_NAME)
    return UnlearnResult(out_path, record, cached=False)


def _copy_model(source: Path, out: Path, record: dict[str, Any], record_name: str) -> None:
    """Copy a saved model folder to ``out`` atomically, with ``record`` replacing its record."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.saving-"))
    try:
        shutil.copytree(source, staging, dirs_exist_ok=True)
        atomic_write_json(staging / record_name, record)
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
