"""The tables the CLI prints after an audit or an experiment (the report writes its own, richer ones)."""

from __future__ import annotations

from typing import Any


def models_table(result: Any) -> str:
    """The trained and unlearned models of an ``ExperimentResult`` with their QA recall, one row each."""
    header = (
        f"{'model':<14} {'made by':<30} {'steps':>6} {'seconds':>8} {'cached':>7} {'forget':>7} {'retain':>7}"
    )
    lines = [header, "-" * len(header)]
    for label, row in result.models.items():
        final = row["final"]
        lines.append(
            f"{label:<14} {row['how']:<30} {row['steps'] or 0:>6} {row['seconds'] or 0:>8.1f} "
            f"{'yes' if row['cached'] else 'no':>7} {final.get('recall_forget', float('nan')):>7.3f} "
            f"{final.get('recall_retain', float('nan')):>7.3f}"
        )
    return "\n".join(lines)


def verdict_table(results: dict) -> str:
    """One line per unlearned model: the audit's answer and why."""
    rows = [(label, v["status"], v["text"]) for label, v in results.get("verdicts", {}).items()]
    width = max([len("model"), *(len(label) for label, _, _ in rows)])
    lines = [f"{'model':<{width}}  {'verdict':<14}  why", "-" * (width + 66)]
    lines += [f"{label:<{width}}  {status:<14}  {text}" for label, status, text in rows]
    return "\n".join(lines)


def print_experiment(result: Any) -> None:
    """What ``relapse run`` and ``relapse demo`` print when an experiment is done."""
    print()
    print(models_table(result))
    print()
    print(verdict_table(result.results))
    for note in result.notes:
        print(f"note: {note}")
    print(f"\nreport: {result.report['report.html']}")
    print(f"took {result.seconds:.0f} s; results in {result.out / 'audit' / 'results.json'}")
