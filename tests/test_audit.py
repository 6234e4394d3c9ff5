"""The audit: recovery ratios and verdicts on hand-built results, then a real small audit on a tiny model."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from relapse.attacks.rtn import QuantScheme
from relapse.audit import sweep
from relapse.audit.recovery import (
    NO_ATTACK,
    finish,
    gap_kept,
    min_gap,
    recovery_ratio,
    recovery_table,
    share_of_gap,
    verdict,
)
from relapse.audit.sweep import AuditConfig, diagnostic_scheme, run_audit
from relapse.cli import main
from relapse.data.benchmark import load_benchmark
from relapse.errors import ConfigError
from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.metrics.engine import EvalSettings, Evaluator
from relapse.models.io import load_model
from relapse.models.parts import decoder_linear_weights
from relapse.runtime import RunContext, atomic_write_json, resolve_device
from tests.conftest import one_error_line

# --- recovery ratios on constructed values -----------------------------------------------------------


def test_recovery_ratio_is_the_recovered_share_of_the_gap():
    assert recovery_ratio(70, 20, 100) == 0.625  # (70 - 20) / (100 - 20)
    assert recovery_ratio(20, 20, 100) == 0.0
    assert recovery_ratio(100, 20, 100) == 1.0
    assert recovery_ratio(10, 20, 100) == pytest.approx(-0.125)
    assert share_of_gap(40.0, 20.0, 100.0) == 0.5


def test_recovery_ratio_needs_a_gap_above_min_gap():
    # min_gap(100) = 1: a gap of 1 is too small, a gap of 2 is not.
    assert recovery_ratio(100, 99, 100) is None
    assert recovery_ratio(100, 99.5, 100) is None
    assert recovery_ratio(100, 98, 100) == 1.0
    assert recovery_ratio(0.5, 0.0, 0.0) is None  # no gap at all
    # Near zero the absolute floor of 0.01 rules: a memorised answer's NLL (0.0208) against an unlearned
    # model that barely moved (0.0211) is no gap, however the attacked value falls (this once gave -3018).
    assert recovery_ratio(0.809, 0.0211, 0.0208, higher_is_better=False) is None
    assert recovery_ratio(0.5, 0.0, 0.02) == pytest.approx(25.0)  # a gap of 0.02 is one


def test_recovery_ratio_direction_of_the_gap():
    # A forget metric (lower = forgotten) where the unlearned model scores above the target: nothing to
    # recover. A two-sided metric (higher_is_better None) may have a negative gap.
    assert recovery_ratio(50, 60, 40, higher_is_better=False) is None
    assert recovery_ratio(50, 60, 40, higher_is_better=None) == 0.5  # (50 - 60) / (40 - 60)
    assert recovery_ratio(50, 60, 40) == 0.5
    assert recovery_ratio(60, 20, 100, higher_is_better=False) == 0.5


@pytest.mark.parametrize(
    ("attacked", "unlearned", "target"),
    [(None, 20, 100), (70, None, 100), (70, 20, None), (math.nan, 20.0, 100.0), (70.0, math.nan, 100.0)],
)
def test_recovery_ratio_missing_values_give_none(attacked, unlearned, target):
    assert recovery_ratio(attacked, unlearned, target) is None


def test_gap_kept_compares_the_attacked_target_with_the_attacked_unlearned_model():
    # Target 100, unlearned 20 (gap 80). The attack takes the target down to 60 and the unlearned model up
    # to 55: recovery against the float target says 35/80, but the attacked models are 5 apart, 5/80 kept.
    assert recovery_ratio(55, 20, 100, higher_is_better=False) == pytest.approx(35 / 80)
    assert gap_kept(60, 55, 20, 100, higher_is_better=False) == pytest.approx(5 / 80)
    assert gap_kept(100, 20, 20, 100, higher_is_better=False) == pytest.approx(1.0)  # nothing changes
    assert gap_kept(None, 20, 20, 100) is None
    assert gap_kept(60, 55, 99.5, 100) is None  # no gap (below min_gap)
    assert gap_kept(60, 55, 120, 100, higher_is_better=False) is None  # did not forget


def test_recovery_ratio_nan_target_gives_none():
    assert recovery_ratio(70.0, 20.0, math.nan) is None
    assert share_of_gap(None, 20.0, 100.0) is None


# --- recovery table and verdicts on a hand-built results dict ----------------------------------------

ATTACKS = ["rtn-w4-g128", "relearn-retain-25", "noise-like-rtn-w4-g128"]
# knowmem_forget (lower = forgotten) per model and attack; a missing attack is an unmeasured cell.
# Gap of every unlearned model: target 100 - unlearned 20 = 80. Retrained control per attack:
# rtn (40 - 40) / 80 = 0, relearn (64 - 40) / 80 = 30%, noise (16 - 40) / 80 = -30% (counted as 0).
KNOWMEM = {
    "target": {"none": 100, "rtn-w4-g128": 100, "relearn-retain-25": 100, "noise-like-rtn-w4-g128": 100},
    "retrained": {"none": 40, "rtn-w4-g128": 40, "relearn-retain-25": 64, "noise-like-rtn-w4-g128": 16},
    # rtn 32/80 = 40% (net 40%: relapse); relearn 40% - 30% = 10%; noise 16/80 = 20% (net 20%)
    "uncovers": {"none": 20, "rtn-w4-g128": 52, "relearn-retain-25": 52, "noise-like-rtn-w4-g128": 36},
    # relearning brings back 40% but the control moves 30%: net 10% < 25%
    "teaches": {"none": 20, "rtn-w4-g128": 20, "relearn-retain-25": 52, "noise-like-rtn-w4-g128": 20},
    # gap 0.5 < min_gap(100): did not forget
    "never": {"none": 99.5, "rtn-w4-g128": 99.5, "relearn-retain-25": 99.5, "noise-like-rtn-w4-g128": 99.5},
    # only one attack measured (5/80 = 6.25%)
    "partial": {"none": 20, "rtn-w4-g128": 25},
    # rtn 40/80 = 50% (net 50%), relearn 52/80 = 65% (net 35%): two relapses, rtn first
    "both": {"none": 20, "rtn-w4-g128": 60, "relearn-retain-25": 72, "noise-like-rtn-w4-g128": 20},
}
UNLEARNED = ["uncovers", "teaches", "never", "partial", "both"]


def hand_results(metrics: tuple[str, ...] = ("knowmem_forget",)) -> dict:
    roles = {"target": "target", "retrained": "retrained", **{m: "unlearned" for m in UNLEARNED}}
    cells = {}
    for label, values in KNOWMEM.items():
        for attack, value in values.items():
            entry = {"value": value, "higher_is_better": False, "best": None, "views": {}}
            cells[f"{label}|{attack}"] = {
                "model": label,
                "attack": attack,
                "metrics": {m: dict(entry) for m in metrics},
            }
    return {
        "kind": "relapse-audit",
        "config": {"attacks": list(ATTACKS), "metrics": list(metrics)},
        "models": {label: {"role": role, "path": f"/models/{label}"} for label, role in roles.items()},
        "cells": cells,
    }


def test_recovery_table_on_hand_built_results():
    table = recovery_table(hand_results())
    assert set(table) == set(UNLEARNED)
    row = table["uncovers"]
    assert row["rtn-w4-g128"]["knowmem_forget"] == pytest.approx(0.4)
    assert row["rtn-w4-g128"]["knowmem_forget:control"] == pytest.approx(0.0)
    assert row["relearn-retain-25"]["knowmem_forget"] == pytest.approx(0.4)
    assert row["relearn-retain-25"]["knowmem_forget:control"] == pytest.approx(0.3)
    assert row["noise-like-rtn-w4-g128"]["knowmem_forget"] == pytest.approx(0.2)
    assert row["noise-like-rtn-w4-g128"]["knowmem_forget:control"] == pytest.approx(-0.3)
    assert table["partial"]["rtn-w4-g128"]["knowmem_forget"] == pytest.approx(0.0625)
    assert table["partial"]["relearn-retain-25"]["knowmem_forget"] is None  # the cell is missing
    # The target scores 100 under every attack: rtn leaves the attacked models 100 - 52 = 48 of 80 apart.
    assert row["rtn-w4-g128"]["knowmem_forget:kept"] == pytest.approx(0.6)
    assert table["partial"]["relearn-retain-25"]["knowmem_forget:kept"] is None
    assert all(v is None for attack in ATTACKS for v in table["never"][attack].values())


def test_relearning_on_half_the_forget_set_is_read_on_the_other_half():
    """relearn-forget-half trains on questions 0, 2 and reads 1, 3: every model's values (unlearned, target,
    retrained, before and after) are means over the untaught questions. By hand, per question:
    target 1 1 1 1; unlearned 0 0 0 0; after relearning 1 1 1 0 (the taught questions 0 and 2 came back,
    and question 1): read on 1 and 3, recall comes back (0.5 - 0) / (1 - 0) = 50%, where all four
    questions would say 75%. The retrained model answers 0 0 0 0 and 1 0 1 0 after: its taught questions
    only, so its control on the untaught ones is 0 (on all four it would be 50%)."""
    attack = "relearn-forget-half-25"
    per_question = {
        ("target", NO_ATTACK): [1, 1, 1, 1],
        ("target", attack): [1, 1, 1, 1],
        ("u", NO_ATTACK): [0, 0, 0, 0],
        ("u", attack): [1, 1, 1, 0],
        ("retrained", NO_ATTACK): [0, 0, 0, 0],
        ("retrained", attack): [1, 0, 1, 0],
    }
    cells = {}
    for (model, name), values in per_question.items():
        metric = {
            "value": sum(values) / 4,
            "higher_is_better": False,
            "item_values": [float(v) for v in values],
        }
        cells[f"{model}|{name}"] = {
            "model": model,
            "attack": name,
            "metrics": {"recall_forget": metric},
            "attack_info": {"measure_forget_qa": [1, 3]} if name == attack else {},
        }
    results = {
        "config": {"attacks": [attack], "metrics": ["recall_forget"]},
        "models": {
            m: {"role": m if m != "u" else "unlearned", "path": m} for m in ("target", "retrained", "u")
        },
        "cells": cells,
    }
    row = recovery_table(results)["u"][attack]
    assert row["recall_forget"] == pytest.approx(0.5)
    assert row["recall_forget:control"] == pytest.approx(0.0)
    assert row["recall_forget:kept"] == pytest.approx(0.5)  # attacked target 1 vs 0.5 on the untaught half
    # The paired intervals draw from the two untaught questions alone: every replicate's share is 0, 0.5 or 1.
    low, high = row["recall_forget:interval"]
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    # Without the record of the measured questions (an attack read on all of them) the shares are 75% and 50%.
    for cell in cells.values():
        cell["attack_info"] = {}
    row = recovery_table(results)["u"][attack]
    assert row["recall_forget"] == pytest.approx(0.75) and row["recall_forget:control"] == pytest.approx(0.5)


def test_verdict_relapses_names_the_attack_and_the_share():
    results = hand_results()
    found = verdict(results, "uncovers")
    assert found["status"] == "relapses"
    assert found["text"] == (
        "rtn-w4-g128 brings back 40% of the knowmem_forget gap (retrained control 0%; gap kept 60%)"
    )
    assert [r["attack"] for r in found["relapses"]] == ["rtn-w4-g128"]
    assert found["relapses"][0]["recovered"] == pytest.approx(0.4)
    assert found["relapses"][0]["net_of_control"] == pytest.approx(0.4)


def test_verdict_nets_out_the_retrained_control():
    found = verdict(hand_results(), "teaches")  # 40% recovered - 30% control = 10% < 25%
    assert found["status"] == "holds"
    assert found["text"] == "forgetting holds on knowmem_forget under all 3 attacks"
    assert found["relapses"] == []


def test_verdict_several_relapses_sorted_by_net_share():
    found = verdict(hand_results(), "both")
    assert found["status"] == "relapses"
    assert [r["attack"] for r in found["relapses"]] == ["rtn-w4-g128", "relearn-retain-25"]
    assert [r["net_of_control"] for r in found["relapses"]] == pytest.approx([0.5, 0.35])
    assert found["text"] == (
        "rtn-w4-g128 brings back 50% of the knowmem_forget gap (retrained control 0%; gap kept 50%), "
        "relearn-retain-25 brings back 65% (retrained control 30%)"
    )


def test_verdict_not_forgotten_when_there_is_no_gap():
    found = verdict(hand_results(), "never")
    assert found["status"] == "not-forgotten"
    assert found["text"] == "did not forget: knowmem_forget 99.5 vs target 100"


def test_verdict_counts_only_measured_attacks():
    found = verdict(hand_results(), "partial")
    assert found["status"] == "holds"
    assert found["text"] == "forgetting holds on knowmem_forget under the one attack measured"


def test_verdict_unknown_without_a_verdict_metric():
    results = hand_results(metrics=("mia_loss",))
    assert verdict(results, "uncovers")["status"] == "unknown"


def test_finish_adds_recovery_and_verdicts_and_replaces_stale_ones():
    results = hand_results()
    results["verdicts"] = {"gone": {"status": "holds"}}
    results["recovery"] = {"gone": {}}
    expected_table = recovery_table(copy.deepcopy(results))
    assert finish(results) is results
    assert results["recovery"] == expected_table
    assert set(results["verdicts"]) == set(UNLEARNED)
    statuses = {label: v["status"] for label, v in results["verdicts"].items()}
    assert statuses == {
        "uncovers": "relapses",
        "teaches": "holds",
        "never": "not-forgotten",
        "partial": "holds",
        "both": "relapses",
    }


# --- diagnostic schemes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gptq-w4-g128", "awq-w4-g128", "gptq-w4-g128-act", "rtn-w4-g128"])
def test_diagnostic_scheme_of_grid_attacks(name):
    assert diagnostic_scheme(name) == QuantScheme(4, 128, False)


def test_diagnostic_scheme_per_channel_and_symmetric():
    assert diagnostic_scheme("rtn-w8-ch") == QuantScheme(8, None, False)
    assert diagnostic_scheme("gptq-w3-g64-sym") == QuantScheme(3, 64, True)


@pytest.mark.parametrize(
    "name", ["noise-like-rtn-w4-g128", "bnb-nf4", "relearn-retain-25", "prune-30", "gguf-q4_0"]
)
def test_diagnostic_scheme_none_for_attacks_without_a_grid(name):
    assert diagnostic_scheme(name) is None


# --- a real small audit ------------------------------------------------------------------------------

AUDIT_ATTACKS = ["rtn-w8-ch", "rtn-w4-g128", "noise-like-rtn-w4-g128"]
AUDIT_METRICS = ["recall_forget", "knowmem_forget", "mia_loss"]


@pytest.fixture(scope="module")
def unlearned_small(trained_small, small_benchmark_dir, tmp_path_factory):
    """Five steps of gradient ascent on the trained tiny model: enough to forget most forget QA pairs."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("unlearned") / "ga"
    config = UnlearnConfig(method="ga", lr=1e-4, max_steps=5, eval_every=5)
    return unlearn_model(
        trained_small.path, small_benchmark_dir, out, config, run=RunContext(threads=1, progress=False)
    )


def folder_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def small_audit_config(trained_small, unlearned_small, data) -> AuditConfig:
    """The target and the GA model under AUDIT_ATTACKS and AUDIT_METRICS."""
    return AuditConfig(
        target=str(trained_small.path),
        unlearned=[str(unlearned_small.path)],
        data=str(data),
        attacks=list(AUDIT_ATTACKS),
        metrics=list(AUDIT_METRICS),
    )


@pytest.fixture(scope="module")
def audited(trained_small, unlearned_small, small_benchmark_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    before = {p: folder_digest(p) for p in (trained_small.path, unlearned_small.path)}
    config = small_audit_config(trained_small, unlearned_small, small_benchmark_dir)
    results = run_audit(config, out, run=RunContext(threads=1, progress=False, log=None))
    return {"out": out, "results": results, "before": before}


def test_audit_writes_every_cell_and_item_file(audited):
    out, results = audited["out"], audited["results"]
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["models"] == {
        "target": {"role": "target", "path": on_disk["config"]["target"]},
        "ga": {"role": "unlearned", "path": on_disk["config"]["unlearned"][0]},
    }
    expected = {f"{m}|{a}" for m in ("target", "ga") for a in ["none", *AUDIT_ATTACKS]}
    assert set(on_disk["cells"]) == expected
    assert on_disk["device"] == str(resolve_device("auto")) and "device" not in on_disk["config"]
    for key, cell in on_disk["cells"].items():
        label, attack = key.split("|")
        assert (cell["model"], cell["attack"]) == (label, attack)
        assert cell["device"] == on_disk["device"]
        assert list(cell["metrics"]) == AUDIT_METRICS
        items = json.loads((out / "items" / label / f"{attack}.json").read_text())
        assert (items["model"], items["attack"]) == (label, attack)
        for name in AUDIT_METRICS:
            assert items["metrics"][name]["value"] == cell["metrics"][name]["value"]
        n_forget_qa = len(items["metrics"]["recall_forget"]["per_item"])
        # recall is a share of forget QA pairs answered: a whole number of them
        assert cell["metrics"]["recall_forget"]["value"] * n_forget_qa == pytest.approx(
            round(cell["metrics"]["recall_forget"]["value"] * n_forget_qa)
        )
    assert on_disk["cells"]["target|none"]["metrics"]["recall_forget"]["value"] == 1.0
    assert on_disk["cells"]["ga|none"]["metrics"]["recall_forget"]["value"] < 0.5
    assert on_disk["verdicts"] == results["verdicts"] and set(on_disk["verdicts"]) == {"ga"}


def test_audit_in_two_processes_equals_one(
    audited, trained_small, unlearned_small, small_benchmark_dir, tmp_path
):
    """--jobs 2 audits the two models in two worker processes; every number and item equals one process's."""
    config = small_audit_config(trained_small, unlearned_small, small_benchmark_dir)
    lines: list[str] = []
    results = run_audit(
        config, tmp_path / "two", jobs=2, run=RunContext(threads=1, progress=False, log=lines.append)
    )
    one = audited["results"]
    assert lines[0] == "auditing 2 models in 2 processes"
    assert sorted(line.split(":")[0] for line in lines[1:]) == sorted(
        "audit " + key.replace("|", " | ") for key in one["cells"]
    )

    def numbers(cell):
        return {name: (m["value"], m["views"]) for name, m in cell["metrics"].items()}

    assert set(results["cells"]) == set(one["cells"])
    for key, cell in one["cells"].items():
        assert numbers(results["cells"][key]) == numbers(cell), key
        label, attack = key.split("|")
        item_one = json.loads((audited["out"] / "items" / label / f"{attack}.json").read_text())
        item_two = json.loads((tmp_path / "two" / "items" / label / f"{attack}.json").read_text())
        for name in AUDIT_METRICS:
            assert item_two["metrics"][name]["per_item"] == item_one["metrics"][name]["per_item"]
    assert results["recovery"] == one["recovery"] and results["verdicts"] == one["verdicts"]
    on_disk = json.loads((tmp_path / "two" / "results.json").read_text())
    assert set(on_disk["cells"]) == set(one["cells"])


@pytest.mark.parametrize("jobs", [1, 2])
def test_every_privleak_is_relative_to_the_retrained_models_unattacked_auc(
    trained_small, unlearned_small, small_benchmark_dir, tmp_path, jobs
):
    """Whether one process audits every model or several do, the retrained model's unattacked Min-40% AUC
    is measured first and is the reference of every cell's PrivLeak (the GA model stands in for the
    retrained one: any model with another AUC shows the reference at work)."""
    config = AuditConfig(
        target=str(trained_small.path),
        retrained=str(unlearned_small.path),
        unlearned=[str(trained_small.path)],
        data=str(small_benchmark_dir),
        attacks=["rtn-w4-g128"],
        metrics=["privleak"],
    )
    results = run_audit(
        config, tmp_path / "audit", jobs=jobs, run=RunContext(threads=1, progress=False, log=None)
    )
    assert set(results["cells"]) == {
        f"{m}|{a}" for m in ("ga", "target", "target-2") for a in ("none", "rtn-w4-g128")
    }
    reference = results["cells"]["ga|none"]["metrics"]["privleak"]["views"]["auc"]
    assert results["cells"]["ga|none"]["metrics"]["privleak"]["value"] == 0.0
    for key, cell in results["cells"].items():
        auc = cell["metrics"]["privleak"]["views"]["auc"]
        assert cell["metrics"]["privleak"]["value"] == pytest.approx((auc - reference) / reference * 100), key
    assert results["cells"]["target|none"]["metrics"]["privleak"]["value"] != 0.0


@pytest.mark.parametrize("jobs", [1, 2])
def test_forget_quality_is_relative_to_the_retrained_models_forget_truth_ratios_and_can_be_primary(
    trained_small, unlearned_small, small_benchmark_dir, tmp_path, jobs
):
    """As PrivLeak's AUC: the retrained model's unattacked cell comes first, its forget quality is 1, and
    every other cell's is the KS p-value of its forget truth ratios against that cell's (the GA model
    stands in for the retrained one). Declared primary, forget quality is the metric verdicts follow."""
    from relapse.metrics import tofu

    config = AuditConfig(
        target=str(trained_small.path),
        retrained=str(unlearned_small.path),
        unlearned=[str(trained_small.path)],
        data=str(small_benchmark_dir),
        attacks=["rtn-w4-g128"],
        metrics=["tofu_forget_quality", "tofu_model_utility"],
        primary="tofu_forget_quality",
    )
    results = run_audit(
        config, tmp_path / "audit", jobs=jobs, run=RunContext(threads=1, progress=False, log=None)
    )
    reference = results["cells"]["ga|none"]["metrics"]["tofu_forget_quality"]["truth_ratios"]
    assert results["cells"]["ga|none"]["metrics"]["tofu_forget_quality"]["value"] == 1.0
    for key, cell in results["cells"].items():
        quality = cell["metrics"]["tofu_forget_quality"]
        expected = tofu.ks_2samp(quality["truth_ratios"], reference)[1]
        assert quality["value"] == pytest.approx(expected, rel=1e-12), key
    assert results["cells"]["target|none"]["metrics"]["tofu_forget_quality"]["value"] < 1.0
    assert results["verdicts"]["target-2"]["metric"] == "tofu_forget_quality"
    assert "tofu_forget_quality" in results["recovery"]["target-2"]["rtn-w4-g128"]
    if jobs == 1:  # the report reads an audit of TOFU's metrics like any other
        from relapse.report.build import build_report

        written = build_report(tmp_path / "audit")
        assert "tofu_forget_quality" in (tmp_path / "audit" / "report.md").read_text()
        assert written


def test_forget_quality_needs_a_retrained_model_in_the_audit(trained_small, small_benchmark_dir, tmp_path):
    config = AuditConfig(
        target=str(trained_small.path),
        unlearned=[str(trained_small.path)],
        data=str(small_benchmark_dir),
        attacks=["rtn-w4-g128"],
        metrics=["tofu_forget_quality"],
    )
    with pytest.raises(ConfigError, match="tofu_forget_quality needs the retrained model"):
        run_audit(config, tmp_path / "audit", run=RunContext(threads=1, progress=False, log=None))


def test_audit_gives_every_measured_value_its_interval(audited):
    """Means (recall, KnowMem) and the membership AUC alike: every cell's value lies in its interval."""
    results = audited["results"]
    for key, cell in results["cells"].items():
        for metric in AUDIT_METRICS:
            low, high = results["intervals"][key][metric]
            value = cell["metrics"][metric]["value"]
            assert low - 1e-9 <= value <= high + 1e-9, (key, metric)
    assert (
        results["intervals"]["ga|none"]["recall_forget"][1]
        > results["intervals"]["ga|none"]["recall_forget"][0]
    )


def test_audit_none_cell_equals_a_direct_evaluation(
    audited, trained_small, unlearned_small, small_benchmark_dir
):
    cells = audited["results"]["cells"]
    benchmark = load_benchmark(small_benchmark_dir)
    for label, path in (("target", trained_small.path), ("ga", unlearned_small.path)):
        net, tokenizer = load_model(str(path))
        direct = Evaluator(net, tokenizer, benchmark, EvalSettings()).run(AUDIT_METRICS)
        for name in AUDIT_METRICS:
            assert cells[f"{label}|none"]["metrics"][name]["value"] == direct[name]["value"], (label, name)


def test_audit_leaves_weights_on_disk_unchanged(audited, trained_small, unlearned_small):
    for path, digest in audited["before"].items():
        assert folder_digest(path) == digest


def test_audit_recovery_matches_the_cells(audited):
    results = audited["results"]
    cells = results["cells"]

    def value(label, attack, metric):
        return cells[f"{label}|{attack}"]["metrics"][metric]["value"]

    for attack in AUDIT_ATTACKS:
        for metric in ("recall_forget", "knowmem_forget"):
            t, u, a = (
                value("target", "none", metric),
                value("ga", "none", metric),
                value("ga", attack, metric),
            )
            assert results["recovery"]["ga"][attack][metric] == pytest.approx((a - u) / (t - u))
        assert not any(k.endswith(":control") for k in results["recovery"]["ga"][attack])  # no retrained


def test_audit_diagnostics_for_grid_attacks_only(audited, trained_small, unlearned_small):
    diagnostics = audited["results"]["diagnostics"]
    assert set(diagnostics) == {"ga"}
    assert set(diagnostics["ga"]) == {"rtn-w8-ch", "rtn-w4-g128"}  # noise rounds to no grid
    target, _ = load_model(str(trained_small.path))
    changed, _ = load_model(str(unlearned_small.path))
    names = decoder_linear_weights(target)
    a, b = target.state_dict(), changed.state_dict()
    elements = sum(a[n].numel() for n in names)
    mean_abs_dw = sum(float((b[n] - a[n]).abs().sum()) for n in names) / elements
    assert mean_abs_dw > 0
    for attack in ("rtn-w8-ch", "rtn-w4-g128"):
        total = diagnostics["ga"][attack]
        assert total["elements"] == elements
        assert total["mean_abs_dw"] == pytest.approx(mean_abs_dw, rel=1e-5)
    # a 4-bit step is about 16 times an 8-bit one: the same update is a smaller share of it
    assert (
        diagnostics["ga"]["rtn-w4-g128"]["mean_dw_over_step"]
        < diagnostics["ga"]["rtn-w8-ch"]["mean_dw_over_step"]
    )


# --- resuming ---------------------------------------------------------------------------------------


class Stop(Exception):
    """Raised from the log callback to interrupt an audit between cells."""


def resume_config(trained_small, unlearned_small, data, **overrides) -> AuditConfig:
    settings = {
        "target": str(trained_small.path),
        "unlearned": [str(unlearned_small.path)],
        "data": str(data),
        "attacks": ["rtn-w8-ch", "rtn-w4-g128", "prune-30"],
        "metrics": ["recall_forget"],
    }
    settings.update(overrides)
    return AuditConfig(**settings)


def test_interrupted_audit_resumes_computing_only_missing_cells(
    trained_small, unlearned_small, small_benchmark_dir, tmp_path, monkeypatch
):
    out = tmp_path / "audit"
    lines: list[str] = []

    def stop_after_three(line):
        lines.append(line)
        if len(lines) == 3:
            raise Stop

    config = resume_config(trained_small, unlearned_small, small_benchmark_dir)
    with pytest.raises(Stop):
        run_audit(config, out, run=RunContext(threads=1, progress=False, log=stop_after_three))
    first = json.loads((out / "results.json").read_text())
    done = ["target|none", "target|rtn-w8-ch", "target|rtn-w4-g128"]
    assert list(first["cells"]) == done
    # Pretend the finished cells ran on a GPU: the device is not in the config hash, so they are kept,
    # and the resumed run says that the audit now mixes devices.
    for key in done:
        first["cells"][key]["device"] = "cuda:0"
    atomic_write_json(out / "results.json", first)
    assert "verdicts" not in first
    done_items = {k: (out / "items" / k.replace("|", "/")).with_suffix(".json").read_bytes() for k in done}

    measured = []
    real_measure = sweep._measure

    def counting_measure(*args, **kwargs):
        measured.append(1)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(sweep, "_measure", counting_measure)
    computed: list[str] = []
    config = resume_config(trained_small, unlearned_small, small_benchmark_dir)
    results = run_audit(config, out, run=RunContext(threads=1, progress=False, log=computed.append))
    notes = [line for line in computed if line.startswith("note: ")]
    computed = [line for line in computed if not line.startswith("note: ")]
    assert len(notes) == 1 and "ran on cuda:0" in notes[0]
    missing = ["target|prune-30", "ga|none", "ga|rtn-w8-ch", "ga|rtn-w4-g128", "ga|prune-30"]
    assert len(measured) == len(missing)
    assert [line.split(": ")[0].removeprefix("audit ").replace(" | ", "|") for line in computed] == missing
    second = json.loads((out / "results.json").read_text())
    assert set(second["cells"]) == set(done) | set(missing)
    for key in done:
        assert json.dumps(second["cells"][key], sort_keys=True) == json.dumps(
            first["cells"][key], sort_keys=True
        )
        assert (out / "items" / key.replace("|", "/")).with_suffix(".json").read_bytes() == done_items[key]
    assert set(results["verdicts"]) == {"ga"}

    # A third run with the same settings computes nothing.
    measured.clear()
    again = resume_config(trained_small, unlearned_small, small_benchmark_dir)
    run_audit(again, out, run=RunContext(threads=1, progress=False, log=None))
    assert measured == []


def test_other_settings_in_the_same_folder_need_overwrite(
    trained_small, unlearned_small, small_benchmark_dir, tmp_path
):
    out = tmp_path / "audit"
    config = resume_config(trained_small, unlearned_small, small_benchmark_dir, attacks=["prune-30"])
    run_audit(config, out, run=RunContext(threads=1, progress=False, log=None))
    before = (out / "results.json").read_bytes()
    other = resume_config(trained_small, unlearned_small, small_benchmark_dir, attacks=["rtn-w8-ch"])
    with pytest.raises(ConfigError, match="overwrite"):
        run_audit(other, out, run=RunContext(threads=1, progress=False, log=None))
    assert (out / "results.json").read_bytes() == before
    other = resume_config(trained_small, unlearned_small, small_benchmark_dir, attacks=["rtn-w8-ch"])
    results = run_audit(other, out, run=RunContext(threads=1, progress=False, overwrite=True, log=None))
    assert set(results["cells"]) == {f"{m}|{a}" for m in ("target", "ga") for a in ("none", "rtn-w8-ch")}
    assert not (out / "items" / "target" / "prune-30.json").exists()  # no stale per-item files
    assert json.loads((out / "results.json").read_text())["config"]["attacks"] == ["rtn-w8-ch"]


def test_an_audit_that_adds_attacks_or_models_extends_the_earlier_one(
    trained_small, unlearned_small, small_benchmark_dir, tmp_path, monkeypatch
):
    """More attacks or models in the same folder: the finished cells are kept as they were and only the
    new ones are computed; taking an attack away, or a model changed since, still needs --overwrite."""
    from relapse.audit import sweep

    measured: list[int] = []
    real_measure = sweep._measure

    def counting_measure(*args, **kwargs):
        measured.append(1)
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(sweep, "_measure", counting_measure)
    out = tmp_path / "audit"
    first = resume_config(
        trained_small, unlearned_small, small_benchmark_dir, unlearned=[], attacks=["prune-30"]
    )
    run_audit(first, out, run=RunContext(threads=1, progress=False, log=None))
    before = json.loads((out / "results.json").read_text())
    item_before = (out / "items" / "target" / "prune-30.json").read_bytes()
    measured.clear()
    lines: list[str] = []
    wider = resume_config(
        trained_small, unlearned_small, small_benchmark_dir, attacks=["prune-30", "rtn-w8-ch"]
    )
    results = run_audit(wider, out, run=RunContext(threads=1, progress=False, log=lines.append))
    label = Path(unlearned_small.path).name
    computed = [
        line.split(": ")[0].removeprefix("audit ").replace(" | ", "|")
        for line in lines
        if line.startswith("audit ")
    ]
    assert sorted(computed) == sorted(
        ["target|rtn-w8-ch", f"{label}|none", f"{label}|prune-30", f"{label}|rtn-w8-ch"]
    )
    assert len(measured) == 4
    assert any("extending the audit" in line and "rtn-w8-ch" in line and label in line for line in lines)
    for key, cell in before["cells"].items():
        assert json.dumps(results["cells"][key], sort_keys=True) == json.dumps(cell, sort_keys=True)
    assert (out / "items" / "target" / "prune-30.json").read_bytes() == item_before
    saved = json.loads((out / "results.json").read_text())
    assert saved["config"]["attacks"] == ["prune-30", "rtn-w8-ch"] and label in saved["models"]
    assert set(results["verdicts"]) == {label}

    # Fewer attacks than the folder holds: refused, nothing changed.
    after = (out / "results.json").read_bytes()
    narrower = resume_config(trained_small, unlearned_small, small_benchmark_dir, attacks=["rtn-w8-ch"])
    with pytest.raises(ConfigError, match="overwrite"):
        run_audit(narrower, out, run=RunContext(threads=1, progress=False, log=None))
    assert (out / "results.json").read_bytes() == after

    # The earlier audit's hash no longer holds (its data changed since): not extended.
    monkeypatch.setattr(sweep, "hash_files", lambda files: "edited")
    more = resume_config(
        trained_small, unlearned_small, small_benchmark_dir, attacks=["prune-30", "rtn-w8-ch", "rtn-w4-g128"]
    )
    with pytest.raises(ConfigError, match="overwrite"):
        run_audit(more, out, run=RunContext(threads=1, progress=False, log=None))
    assert (out / "results.json").read_bytes() == after


def test_audit_warns_when_an_attack_rounds_onto_the_base_models_grid(
    trained_small, unlearned_small, small_benchmark_dir, tmp_path, monkeypatch
):
    """A target fine-tuned from a GGUF Q4_1 file: gguf-q4_1 rounds onto that grid; the audit says so in
    results.json, in its log and in both reports (the grid logic itself is tested in test_fetch.py)."""
    from relapse.attacks import provenance
    from relapse.report import build_report

    seen = []

    def fake_warning(attack, model_dir, include_embeddings=False):
        seen.append((attack, str(model_dir)))
        return f"{attack} rounds onto the base grid" if attack == "prune-30" else None

    monkeypatch.setattr(provenance, "grid_warning", fake_warning)
    config = resume_config(
        trained_small, unlearned_small, small_benchmark_dir, attacks=["rtn-w8-ch", "prune-30"]
    )
    logged: list[str] = []
    results = run_audit(config, tmp_path / "a", run=RunContext(threads=1, progress=False, log=logged.append))
    assert results["warnings"] == ["prune-30 rounds onto the base grid"]
    assert ("rtn-w8-ch", str(trained_small.path)) in seen
    assert "warning: prune-30 rounds onto the base grid" in logged
    build_report(tmp_path / "a")
    assert "prune-30 rounds onto the base grid" in (tmp_path / "a" / "report.md").read_text()
    assert "prune-30 rounds onto the base grid" in (tmp_path / "a" / "report.html").read_text()


# --- the command line ------------------------------------------------------------------------------


def verdict_line(printed: str, label: str) -> str:
    """The verdict of ``label`` in the table printed by the CLI: its status and text, space-separated."""
    found = [
        " ".join(line.removeprefix(label).split())
        for line in printed.splitlines()
        if line.startswith(label + " ")
    ]
    assert len(found) == 1, printed
    return found[0]


def test_cli_audit_then_report(trained_small, unlearned_small, small_benchmark_dir, tmp_path, capsys):
    out = tmp_path / "audit"
    argv = [
        "audit",
        "--target",
        str(trained_small.path),
        "--unlearned",
        str(unlearned_small.path),
        "--data",
        str(small_benchmark_dir),
        "--attacks",
        "rtn-w8-ch",
        "--metrics",
        "recall_forget",
        "--out",
        str(out),
        "--quiet",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert set(results["cells"]) == {f"{m}|{a}" for m in ("target", "ga") for a in ("none", "rtn-w8-ch")}
    found = results["verdicts"]["ga"]
    text, line = found["text"], f"{found['status']} {found['text']}"
    assert verdict_line(printed, "ga") == line
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert text in (out / "report.md").read_text()

    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert verdict_line(capsys.readouterr().out, "ga") == line
    assert text in (out / "report.md").read_text()
    assert json.loads((out / "results.json").read_text()) == results  # the report never writes it back


def test_cli_report_without_results_is_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    captured = capsys.readouterr()
    one_error_line(captured.err, "results.json")
    assert captured.out == ""


def _with_retain(results: dict, values: dict[str, float]) -> dict:
    """``results`` with knowmem_retain (higher is better) added to each model's unattacked cell."""
    for label, value in values.items():
        results["cells"][f"{label}|none"]["metrics"]["knowmem_retain"] = {
            "value": value,
            "higher_is_better": True,
            "best": None,
            "views": {},
        }
    return results


def test_utility_gate_marks_a_model_below_the_floor_over_unlearned():
    # target 80: the floor is 0.9 * 80 = 72; 71.9 is below it, 72 is not.
    results = _with_retain(hand_results(), {"target": 80, "uncovers": 71.9, "teaches": 72})
    low = verdict(results, "uncovers")
    assert low["status"] == "over-unlearned"  # labelled so first, whatever its relapse verdict
    assert low["relapse_status"] == "relapses"
    assert low["utility"] == {
        "metric": "knowmem_retain",
        "value": 71.9,
        "target": 80,
        "floor": 0.9,
        "over_unlearned": True,
    }
    assert low["text"].startswith("knowmem_retain 71.9 is below 90% of the target's 80 and it relapses: ")
    assert low["text"].endswith(
        "brings back 40% of the knowmem_forget gap (retrained control 0%; gap kept 60%)"
    )
    kept = verdict(results, "teaches")
    assert kept["utility"]["over_unlearned"] is False and kept["status"] == "holds"
    assert kept["text"] == "forgetting holds on knowmem_forget under all 3 attacks"


def test_utility_gate_is_unknown_without_a_retain_metric():
    found = verdict(hand_results(), "uncovers")
    assert found["utility"]["over_unlearned"] is None
    assert "over-unlearned" not in found["text"]


def test_the_verdict_follows_the_declared_primary_metric_only():
    # Two forget metrics; recall_forget is flat everywhere (no relapse on it), knowmem_forget relapses.
    results = hand_results(metrics=("knowmem_forget", "recall_forget"))
    for cell in results["cells"].values():
        cell["metrics"]["recall_forget"]["value"] = 0.2 if cell["model"] != "target" else 1.0
    assert verdict(results, "uncovers")["status"] == "relapses"  # default: the first, knowmem_forget
    results["config"]["primary"] = "recall_forget"
    found = verdict(results, "uncovers")
    assert found["status"] == "holds" and found["metric"] == "recall_forget"
    assert found["text"] == "forgetting holds on recall_forget under all 3 attacks"


def test_a_quantizer_that_erases_the_target_gives_no_test():
    # Under rtn the target falls to 41, within knowmem's minimum gap of the retrained model's 40: the
    # unlearned model's 52 there says nothing about relapse.
    results = hand_results()
    results["cells"]["target|rtn-w4-g128"]["metrics"]["knowmem_forget"]["value"] = 41
    found = verdict(results, "uncovers")
    assert found["no_test"] == ["rtn-w4-g128"]
    assert found["status"] == "holds"
    assert found["text"] == (
        "forgetting holds on knowmem_forget under 2 of 3 attacks; no test under rtn-w4-g128 (the quantized "
        "target fell to the retrained level)"
    )
    # Relearning is not a quantizer: the guard does not apply to it.
    results["cells"]["target|relearn-retain-25"]["metrics"]["knowmem_forget"]["value"] = 40
    assert "relearn-retain-25" not in verdict(results, "uncovers")["no_test"]


def test_each_metric_has_its_own_minimum_gap():
    assert min_gap(-100.0, "privleak") == 5.0  # a PrivLeak gap of 2.3 points is no gap
    assert recovery_ratio(-100.0, -97.7, -100.0, metric="privleak") is None
    assert recovery_ratio(-100.0, -90.0, -100.0, metric="privleak") == pytest.approx(1.0)
    assert min_gap(0.96, "recall_forget") == 0.02 and min_gap(0.5, "mia_loss") == 0.02
    assert min_gap(96.5, "knowmem_forget") == pytest.approx(1.0) and min_gap(0.7, "nll_forget") == 0.05
    assert min_gap(100.0) == 1.0  # without a metric, the general rule


def test_audit_config_checks_the_primary_metric_and_keeps_old_hashes():
    plain = AuditConfig(target="t", unlearned=["u"], data="d", metrics=["knowmem_forget", "recall_forget"])
    assert "primary" not in plain.to_json()  # audits from before --primary keep their results folder
    declared = AuditConfig(
        target="t",
        unlearned=["u"],
        data="d",
        metrics=["knowmem_forget", "recall_forget"],
        primary="recall_forget",
    )
    assert declared.to_json()["primary"] == "recall_forget"
    with pytest.raises(ConfigError, match="not among the audit's metrics"):
        AuditConfig(
            target="t", unlearned=["u"], data="d", metrics=["recall_forget"], primary="knowmem_forget"
        )
    with pytest.raises(ConfigError, match="--primary must be one of"):
        AuditConfig(target="t", unlearned=["u"], data="d", metrics=["privleak"], primary="privleak")


def test_a_cell_keeps_the_forget_questions_its_attack_is_read_on():
    from relapse.audit.sweep import _small_info

    info = {"split": "forget-half", "steps": 25, "loss_curve": [1.0, 0.5], "measure_forget_qa": [1, 3]}
    assert _small_info(info) == {"split": "forget-half", "steps": 25, "measure_forget_qa": [1, 3]}
    assert "measure_forget_qa" not in _small_info({"split": "retain", "measure_forget_qa": []})


def test_which_changes_extend_an_earlier_audit(monkeypatch):
    """Only additions extend: more attacks, more models, a retrained model no metric is relative to.
    Anything else (another seed, a model taken away or relabelled, a retrained model that PrivLeak would
    be measured against) leaves the earlier cells unusable."""
    from relapse.audit import sweep
    from relapse.runtime import stable_hash

    monkeypatch.setattr(sweep, "_config_hash", lambda config, known=None: stable_hash(config.to_json()))

    def config(**changes) -> AuditConfig:
        settings = {
            "target": "/m/target",
            "unlearned": ["/m/u"],
            "data": "/d",
            "attacks": ["prune-30"],
            "metrics": ["recall_forget"],
        }
        return AuditConfig(**{**settings, **changes})

    def extends(earlier: AuditConfig, later: AuditConfig) -> bool:
        existing = {
            "config": earlier.to_json(),
            "config_hash": sweep._config_hash(earlier),
            "models": sweep.model_labels(earlier),
            "cells": {},
        }
        return sweep._extended(existing, later, sweep._config_hash(later)) is not None

    earlier = config()
    assert extends(earlier, config(attacks=["prune-30", "rtn-w8-ch"]))
    assert extends(earlier, config(unlearned=["/m/u", "/m/v"]))
    assert extends(earlier, config(retrained="/m/r"))
    assert not extends(earlier, config(seed=1))
    assert not extends(earlier, config(unlearned=["/m/v"]))
    assert not extends(earlier, config(labels={"/m/u": "renamed"}))
    assert not extends(earlier, config(attacks=["rtn-w8-ch"]))
    with_privleak = config(metrics=["recall_forget", "privleak"])
    assert not extends(with_privleak, config(metrics=["recall_forget", "privleak"], retrained="/m/r"))
    # An earlier audit whose hash no longer matches its own settings (its models or data changed since).
    assert not sweep._extended(
        {"config": earlier.to_json(), "config_hash": "stale", "models": {}, "cells": {}},
        config(attacks=["prune-30", "rtn-w8-ch"]),
        "new",
    )
