"""A published table beside the measured one: ``relapse report DIR --reference FILE``.

A user who converted MUSE or TOFU (``relapse data convert``) wants to compare their numbers with the
papers' and with other toolkits' reproductions, on the same metrics. The reference file names its source
and gives, per row (a model label of the audit, ``target``, ``retrained``, or a method name), the values
of relapse metrics on relapse's own scale (KnowMem and VerbMem as ROUGE x 100, PrivLeak in percent)::

    source: "open-unlearning docs/results.md (commit 8f9872c): MUSE News, Llama-2-7B"
    rows:
      target: {knowmem_forget: 64, verbmem_forget: 58, privleak: -99.81, knowmem_retain: 55}
      retrained: {knowmem_forget: 33, verbmem_forget: 21, privleak: 0, knowmem_retain: 56}

The report then shows, for each row and metric, the measured value of the unattacked model of that
label (or role) next to the reference value. The file is read once and kept in the audit folder as
``reference.json``, so a later ``relapse report DIR`` shows it again; ``docs/references/`` ships such
files with their sources.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relapse.errors import ConfigError
from relapse.metrics.catalog import metric_info

REFERENCE_NAME = "reference.json"


@dataclass(frozen=True)
class Reference:
    """A reference table: where it comes from, and ``{row label: {metric: value}}`` in file order."""

    source: str
    rows: dict[str, dict[str, float]]

    def to_json(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows}


def parse_reference(raw: Any, where: str) -> Reference:
    """A :class:`Reference` from a file's parsed contents; one-line errors name what is wrong."""
    if not isinstance(raw, dict) or set(raw) - {"source", "rows"}:
        raise ConfigError(f"{where}: a reference holds 'source' and 'rows' only")
    source = raw.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{where}: 'source' must say where the numbers come from")
    rows = raw.get("rows")
    if not isinstance(rows, dict) or not rows:
        raise ConfigError(f"{where}: 'rows' must map a model label to its metric values")
    parsed: dict[str, dict[str, float]] = {}
    for label, values in rows.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{where}: row {label!r} must map metric names to numbers")
        parsed[str(label)] = {}
        for metric, number in values.items():
            if metric_info(str(metric)) is None:
                raise ConfigError(f"{where}: row {label!r}: {metric!r} is not a relapse metric")
            if isinstance(number, bool) or not isinstance(number, numbers.Real) or not math.isfinite(number):
                raise ConfigError(f"{where}: row {label!r}: {metric} must be a finite number, got {number!r}")
            parsed[str(label)][str(metric)] = float(number)
    return Reference(source.strip(), parsed)


def load_reference(path: str | Path) -> Reference:
    """Read a reference file (YAML or JSON, by its suffix; YAML is read safely)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"reference file {path} does not exist")
    import yaml

    text = path.read_text(encoding="utf-8")
    try:
        raw = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: cannot read it: {str(error).splitlines()[0]}") from None
    return parse_reference(raw, str(path))


def measured_label(results: dict[str, Any], label: str) -> str | None:
    """The audit's model a reference row stands for: the same label, else the only model of that role
    (``target``, ``retrained``)."""
    models = results.get("models", {})
    if label in models:
        return label
    of_role = [name for name, info in models.items() if info.get("role") == label]
    return of_role[0] if len(of_role) == 1 else None
