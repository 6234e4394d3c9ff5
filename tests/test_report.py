"""The report: built from a hand-made results.json whose recoveries can be checked by hand."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from relapse.errors import ConfigError
from relapse.report import attack_bits, build_report
from relapse.report.plots import bits_points

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ATTACKS = ["rtn-w8-ch", "rtn-w4-g128", "relearn-retain-25", "noise-like-rtn-w4-g128"]
METRICS = ["knowmem_forget", "knowmem_retain", "recall_forget", "privleak"]
GOALS = {  # higher_is_better, best
    "knowmem_forget": (False, None),
    "knowmem_retain": (True, None),
    "recall_forget": (False, None),
    "privleak": (None, 0.0),
}
# model -> metric -> values under (none, *ATTACKS). Hand-computed recoveries (gap = target - unlearned):
# ga, knowmem_forget under rtn-w4-g128: (70 - 20) / (100 - 20) = 62.5%, control (12 - 10) / 80 = 2.5%;
# ga under relearn-retain-25: (40 - 20) / 80 = 25% (the relapse threshold); npo: rtn-w4 brings back 0.
VALUES = {
    "target": {
        "knowmem_forget": [100, 100, 98, 100, 99],
        "knowmem_retain": [60, 60, 59, 61, 60],
        "recall_forget": [0.8, 0.8, 0.8, 0.8, 0.8],
        "privleak": [40, 40, 40, 40, 40],
    },
    "retrained": {
        "knowmem_forget": [10, 10, 12, 30, 10],
        "knowmem_retain": [58, 58, 57, 59, 58],
        "recall_forget": [0.1, 0.1, 0.1, 0.1, 0.1],
        "privleak": [0, 0, 0, 0, 0],
    },
    "ga": {
        "knowmem_forget": [20, 20, 70, 40, 22],
        "knowmem_retain": [55, 55, 52, 55, 49],  # 55 >= 0.9 x the target's 60: not over-unlearned
        "recall_forget": [0.2, 0.2, 0.5, 0.2, 0.2],
        "privleak": [-10, -10, 5, -10, -10],
    },
    "npo": {
        "knowmem_forget": [30, 30, 30, 37, 30],
        "knowmem_retain": [55, 55, 55, 56, 55],
        "recall_forget": [0.3, 0.3, 0.3, 0.3, 0.3],
        "privleak": [2, 2, 2, 2, 2],
    },
}
ROLES = {"target": "target", "retrained": "retrained", "ga": "unlearned", "npo": "unlearned"}


def make_results(metrics: list[str] = METRICS, rename: dict[str, str] | None = None) -> dict:
    """A results dict in the audit's schema (relapse.audit.sweep), labels optionally renamed."""
    rename = rename or {}
    cells = {}
    for model, per_metric in VALUES.items():
        label = rename.get(model, model)
        for i, attack in enumerate(["none", *ATTACKS]):
            entries = {}
            for metric in metrics:
                higher, best = GOALS[metric]
                entries[metric] = {"value": per_metric[metric][i], "higher_is_better": higher, "best": best}
                entries[metric]["views"] = {"auc": 0.5} if metric == "privleak" else {}
            cells[f"{label}|{attack}"] = {
                "model": label,
                "attack": attack,
                "metrics": entries,
                "seconds": 1.0,
            }
    diagnostics = {
        rename.get(m, m): {
            "rtn-w8-ch": {
                "mean_abs_dw": 1.2e-4,
                "mean_dw_over_step": 0.3,
                "share_below_half_step": 0.8,
                "codes_changed": 0.2,
                "projection": 0.9,
            },
            "rtn-w4-g128": {
                "mean_abs_dw": 1.2e-4,
                "mean_dw_over_step": 0.02,
                "share_below_half_step": 0.99,
                "codes_changed": 0.01,
                "projection": 0.03,
            },
        }
        for m in ("ga", "npo")
    }
    return {
        "kind": "relapse-audit",
        "config": {"target": "t", "unlearned": ["g", "n"], "attacks": ATTACKS, "metrics": metrics, "seed": 3},
        "config_hash": "abc123",
        "models": {rename.get(m, m): {"role": role, "path": f"/models/{m}"} for m, role in ROLES.items()},
        "cells": cells,
        "diagnostics": diagnostics,
        "seed": 3,
        "versions": {"python": "3.11", "torch": "2.5"},
    }


class _Page(HTMLParser):
    """Collects the images, the verdict boxes' text and all text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.verdicts: list[str] = []
        self.text: list[str] = []
        self.external: list[str] = []
        self._depth = 0

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes)
        if tag in ("script", "link") or (
            tag == "img" and not (attributes.get("src") or "").startswith("data:")
        ):
            self.external.append(tag)
        if self._depth:
            self._depth += 1
        elif tag == "div" and "verdict" in (attributes.get("class") or "").split():
            self._depth = 1
            self.verdicts.append("")

    def handle_endtag(self, tag):
        if self._depth:
            self._depth -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self._depth:
            self.verdicts[-1] += data


def _write(directory: Path, results: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "results.json"
    path.write_text(json.dumps(results), encoding="utf-8")
    return path


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_report_writes_markdown_html_and_embeds_every_plot(tmp_path):
    source = _write(tmp_path, make_results())
    before = source.read_bytes()
    written = build_report(tmp_path)
    plots = sorted(name for name in written if name.endswith(".png"))
    assert plots == ["plot_bits.png", "plot_recovery.png", "plot_tradeoff.png"]
    assert {"report.md", "report.html"} <= set(written)
    assert all(path.is_file() and path.parent == tmp_path for path in written.values())
    assert source.read_bytes() == before  # recovery is recomputed, never written back
    assert not list(tmp_path.glob(".*.tmp"))

    page = _parse(written["report.html"])
    assert page.external == []
    assert len(page.images) == len(plots)
    embedded = []
    for image in page.images:
        src = image["src"] or ""
        assert src.startswith("data:image/png;base64,") and image.get("alt")
        embedded.append(base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True))
    assert all(data.startswith(PNG_MAGIC) for data in embedded)
    assert sorted(embedded) == sorted(written[name].read_bytes() for name in plots)

    verdicts = {text.split(":")[0].strip(): text for text in page.verdicts}
    assert set(verdicts) == {"ga", "npo"}
    assert "No, it will relapse" in verdicts["ga"] and "rtn-w4-g128" in verdicts["ga"]
    assert "holds" in verdicts["npo"]
    text = "".join(page.text)
    markdown = written["report.md"].read_text(encoding="utf-8")
    for document in (text, markdown):
        # the recovery table follows the primary metric (knowmem_forget here), computed by hand
        assert "Recovery under each attack (knowmem_forget)" in document
        assert "62.5% (control 2.5%)" in document  # ga under rtn-w4-g128
        assert "25.0%" in document  # ga under relearn-retain-25
        assert "At a glance (knowmem_forget)" in document and "relapses 62%" in document
        assert "npo: 4-bit rounding (rtn-w4-g128) brought nothing back" in document
        assert "ga: 4-bit rounding (rtn-w4-g128) brought back 62.5% of the knowmem_forget gap" in document
        assert "projection" in document and "1 = rounding keeps the update, 0 = erases it" in document
        assert "abc123" in document and "torch" in document
    for model in ("ga", "npo"):
        assert any(line.startswith(f"- **{model}**: ") for line in markdown.splitlines())
    assert "- **ga**: No, it will relapse: rtn-w4-g128 brings back 62% of the knowmem_forget gap" in markdown
    assert "### knowmem_forget (goal: lower)" in markdown
    assert "### knowmem_retain (goal: higher)" in markdown
    assert "### privleak (goal: near 0)" in markdown
    assert "| ga | unlearned | 20 | 20 | 70 | 40 | 22 |" in markdown
    assert "<details>" in written["report.html"].read_text(encoding="utf-8")


def test_a_plot_without_its_metrics_is_skipped_with_a_note(tmp_path):
    (tmp_path / "plot_tradeoff.png").write_bytes(b"stale")
    _write(tmp_path, make_results(metrics=["knowmem_forget", "privleak"]))
    written = build_report(tmp_path)
    plots = [name for name in written if name.endswith(".png")]
    assert sorted(plots) == ["plot_bits.png", "plot_recovery.png"]
    assert not (tmp_path / "plot_tradeoff.png").exists()  # a stale plot of other results is removed
    assert (
        "plot_tradeoff.png skipped: none of knowmem_retain, recall_retain" in written["report.md"].read_text()
    )
    page = _parse(written["report.html"])
    assert len(page.images) == len(plots)


def test_html_escapes_text_from_the_results(tmp_path):
    _write(tmp_path, make_results(rename={"npo": "<b>npo</b>"}))
    written = build_report(tmp_path)
    html = written["report.html"].read_text(encoding="utf-8")
    assert "<b>npo</b>" not in html and "&lt;b&gt;npo&lt;/b&gt;" in html
    assert any(text.startswith("<b>npo</b>:") for text in _parse(written["report.html"]).verdicts)


def test_a_folder_without_results_json_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"no results\.json in .*relapse audit --out"):
        build_report(tmp_path)
    with pytest.raises(ConfigError, match=r"no results\.json"):
        build_report(tmp_path / "missing")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", r"not valid JSON \(line 1"),
        ("[]", "top level is not a JSON object"),
        (json.dumps({"kind": "relapse-audit", "models": {}, "cells": {}}), "'config' is missing"),
        (json.dumps({"config": {"attacks": "rtn"}, "models": {}, "cells": {}}), "config.attacks"),
        (json.dumps({"config": {"attacks": []}, "models": {"a": {}}, "cells": {}}), "model 'a' has no role"),
        (
            json.dumps(
                {"config": {"attacks": []}, "models": {}, "cells": {"a|none": {"metrics": {"m": {}}}}}
            ),
            "metric 'm' of cell 'a|none' has no numeric 'value'",
        ),
    ],
)
def test_a_malformed_results_json_is_a_config_error(tmp_path, text, message):
    (tmp_path / "results.json").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        build_report(tmp_path)
    assert not (tmp_path / "report.md").exists()


@pytest.mark.parametrize(
    ("name", "bits"),
    [
        ("none", 16),
        ("rtn-w8-ch", 8),
        ("rtn-w4-g128", 4),
        ("rtn-w4-g128-sym", 4),
        ("rtn-w3-g128", 3),
        ("rtn-w2-g64", 2),
        ("gptq-w4-g128", 4),
        ("gptq-w4-g128-act", 4),
        ("awq-w4-g128", 4),
        ("llmc-gptq-w4-g128", 4),
        ("bnb-nf4", 4),
        ("bnb-fp4", 4),
        ("bnb-int8", 8),
        ("gguf-q4_0", 4),
        ("gguf-q4_1", 4),
        ("gguf-q5_0", 5),
        ("gguf-q5_1", 5),
        ("gguf-q8_0", 8),
        ("noise-like-rtn-w4-g128", None),
        ("relearn-retain-25", None),
        ("prune-30", None),
    ],
)
def test_attack_bits(name, bits):
    assert attack_bits(name) == bits


def test_bits_points_prefer_rtn_when_attacks_share_a_width():
    results = make_results()
    results["config"]["attacks"] = ["gptq-w4-g128", *ATTACKS]
    for model in VALUES:
        cell = json.loads(json.dumps(results["cells"][f"{model}|rtn-w4-g128"]))
        cell["metrics"]["knowmem_forget"]["value"] = -1.0
        results["cells"][f"{model}|gptq-w4-g128"] = cell
    points = bits_points(results, "ga", "knowmem_forget")
    assert points == [(4, "rtn-w4-g128", 70.0), (8, "rtn-w8-ch", 20.0), (16, "none", 20.0)]


def test_labels_with_dollar_signs_are_drawn_not_parsed_as_math(tmp_path):
    _write(tmp_path, make_results(rename={"ga": "ga $x^$", "npo": "npo$_{2}$"}))
    written = build_report(tmp_path)
    assert "plot_tradeoff.png" in written and "plot_recovery.png" in written
