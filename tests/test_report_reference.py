"""A reference table beside the measured one (``relapse report DIR --reference FILE``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from relapse.cli import main
from relapse.errors import ConfigError
from relapse.report import build_report
from relapse.report.markdown import reference_view
from relapse.report.reference import REFERENCE_NAME, load_reference, parse_reference
from tests.conftest import read_error_line
from tests.test_report import _write, make_results

REFERENCE = {
    "source": "a paper, table 3",
    "rows": {"target": {"knowmem_forget": 64.0, "privleak": -99.8}, "ga": {"knowmem_forget": 0.0}},
}


def test_each_row_shows_the_measured_value_of_its_model_beside_the_reference():
    # make_results: unattacked, the target has knowmem_forget 100 and privleak 40; ga 20 and -10.
    table = reference_view(make_results(), parse_reference(REFERENCE, "ref"))
    assert table.header == [
        "model",
        "knowmem_forget (measured / reference)",
        "privleak (measured / reference)",
    ]
    assert table.rows == [["target", "100 / 64", "40 / -99.8"], ["ga", "20 / 0", "-10 / –"]]
    assert "reference: a paper, table 3" in table.notes


def test_a_row_named_by_role_finds_the_audits_only_model_of_that_role():
    results = make_results(rename={"target": "llama-7b-news"})
    table = reference_view(results, parse_reference(REFERENCE, "ref"))
    assert table.rows[0][:2] == ["target (llama-7b-news)", "100 / 64"]


def test_a_row_without_a_model_shows_the_reference_alone():
    reference = parse_reference({"source": "s", "rows": {"whp": {"knowmem_forget": 21.2}}}, "ref")
    assert reference_view(make_results(), reference).rows == [["whp", "– / 21.2"]]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"rows": {"ga": {"knowmem_forget": 1}}}, "'source' must say where"),
        ({"source": "s", "rows": {}}, "'rows' must map"),
        ({"source": "s", "rows": {"ga": {"knowmem": 1}}}, "'knowmem' is not a relapse metric"),
        ({"source": "s", "rows": {"ga": {"privleak": "high"}}}, "privleak must be a finite number"),
        ({"source": "s", "rows": {"ga": {"privleak": float("nan")}}}, "privleak must be a finite number"),
        ({"source": "s", "rows": {"ga": []}}, "row 'ga' must map metric names"),
        ({"source": "s", "rows": {"ga": {"privleak": 1}}, "notes": 1}, "'source' and 'rows' only"),
    ],
)
def test_a_malformed_reference_is_one_config_error(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_reference(raw, "ref.yaml")


def test_the_report_shows_the_reference_and_keeps_it_for_later_builds(tmp_path):
    _write(tmp_path / "audit", make_results())
    (tmp_path / "ref.yaml").write_text(yaml.safe_dump(REFERENCE), encoding="utf-8")
    build_report(tmp_path / "audit", reference=tmp_path / "ref.yaml")
    kept = json.loads((tmp_path / "audit" / REFERENCE_NAME).read_text())
    assert kept == {"source": "a paper, table 3", "rows": REFERENCE["rows"]}
    (tmp_path / "ref.yaml").unlink()
    build_report(tmp_path / "audit")  # no --reference: the kept one is shown again
    for name in ("report.md", "report.html"):
        text = (tmp_path / "audit" / name).read_text(encoding="utf-8")
        assert "Measured beside the reference" in text and "100 / 64" in text and "a paper, table 3" in text


def test_cli_reference_errors_are_one_line(tmp_path, capsys):
    _write(tmp_path / "audit", make_results())
    assert main(["report", str(tmp_path / "audit"), "--reference", str(tmp_path / "nowhere.yaml")]) == 2
    assert "nowhere.yaml does not exist" in read_error_line(capsys)
    (tmp_path / "bad.yaml").write_text("rows: [1, 2\n", encoding="utf-8")
    assert main(["report", str(tmp_path / "audit"), "--reference", str(tmp_path / "bad.yaml")]) == 2
    assert "bad.yaml: cannot read it" in read_error_line(capsys)


SHIPPED = sorted((Path(__file__).parent.parent / "docs" / "references").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda path: path.stem)
def test_the_shipped_references_load(path):
    reference = load_reference(path)  # known metric names and finite values, or a ConfigError
    assert reference.source and "target" in reference.rows and "retrained" in reference.rows
    # The header comment says where the numbers were read and how they were put on relapse's scales.
    assert path.read_text(encoding="utf-8").startswith("# ")


def test_a_quantized_reference_row_stands_beside_no_unattacked_model():
    path = next(path for path in SHIPPED if path.stem == "quantization-muse-news-4bit")
    table = reference_view(make_results(), load_reference(path))
    by_label = {row[0].split(" ")[0]: row for row in table.rows}
    assert all(cell.startswith("– / ") for cell in by_label["target-4bit"][1:])
    assert not all(cell.startswith("– / ") for cell in by_label["target"][1:])  # the target role is measured
