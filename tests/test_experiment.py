"""Experiment files: validation with one-line errors, the shipped demos, attacks this installation lacks."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest

from relapse.errors import ConfigError
from relapse.experiment import available_attacks, load_experiment, parse_experiment, shipped_experiment
from relapse.runtime import RunContext

VALID = {
    "name": "tiny",
    "seed": 3,
    "data": {"synth": {"people": 10, "facts_per_person": 2}},
    "train": {"eval_every": 25},
    "unlearn": {"defaults": {"lr": 1.0e-4, "max_steps": 5}, "runs": {"ga": {"method": "ga"}, "npo": None}},
    "audit": {"attacks": ["rtn-w8-ch", "relearn-retain-25"], "metrics": ["knowmem", "recall_forget"]},
}


def with_change(change) -> dict:
    raw = copy.deepcopy(VALID)
    change(raw)
    return raw


def test_valid_experiment_parses():
    experiment = parse_experiment(copy.deepcopy(VALID), "tiny.yaml")
    assert experiment.name == "tiny" and experiment.seed == 3
    assert experiment.data == {"synth": {"people": 10, "facts_per_person": 2}}
    assert experiment.unlearn_defaults == {"lr": 1.0e-4, "max_steps": 5}
    assert experiment.unlearn_runs == {"ga": {"method": "ga"}, "npo": {}}
    assert experiment.attacks == ["rtn-w8-ch", "relearn-retain-25"]
    assert experiment.metrics == ["knowmem_forget", "knowmem_retain", "recall_forget"]  # groups resolved
    assert experiment.primary is None
    declared = parse_experiment(with_change(lambda r: r["audit"].update(primary="recall_forget")), "t.yaml")
    assert declared.primary == "recall_forget"


def test_name_defaults_to_the_file_stem():
    raw = with_change(lambda r: r.pop("name"))
    assert parse_experiment(raw, "some/where/mine.yaml").name == "mine"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda r: r.update(extras=1), "'extras'"),
        (lambda r: r["unlearn"]["runs"]["ga"].update(lrr=1e-3), "'lrr'"),
        (lambda r: r["unlearn"]["defaults"].update(lrr=1e-3), "'lrr'"),
        (lambda r: r["train"].update(stepz=3), "'stepz'"),
        (lambda r: r["data"]["synth"].update(persons=3), "'persons'"),
        (lambda r: r["unlearn"]["runs"]["ga"].update(method="gaa"), "'gaa'"),
        (lambda r: r["audit"].update(attacks=["rtn-w8-ch", "quantum-4"]), "'quantum-4'"),
        (lambda r: r["audit"].update(metrics=["recal"]), "'recal'"),
        (lambda r: r["data"].update(path="/some/benchmark"), "exactly one of 'synth'"),
        (lambda r: r.update(data={}), "exactly one of 'synth'"),
        (lambda r: r["unlearn"].pop("runs"), "unlearn.runs is missing"),
        (lambda r: r["unlearn"].update(runs={}), "unlearn.runs names no run"),
        (lambda r: r.update(seed="zero"), "seed must be an integer"),
        (lambda r: r.update(seed=True), "seed must be an integer"),
        (lambda r: r["unlearn"]["runs"]["ga"].update(sure_top=2.0), "--sure-top"),
        (lambda r: r["audit"].update(primary="privleak"), "audit.primary"),  # not measured here
        (lambda r: r["audit"].update(primary=["knowmem_forget"]), "audit.primary"),
        (lambda r: r["unlearn"]["runs"]["ga"].update(select_lr=[]), "--select-lr"),
        (lambda r: r["unlearn"]["runs"]["ga"].update(robust_to=["relearn-retain-25"]), "round weights"),
    ],
)
def test_invalid_experiment_names_the_problem(change, named):
    with pytest.raises(ConfigError) as error:
        parse_experiment(with_change(change), "tiny.yaml")
    message = str(error.value)
    assert named in message
    assert "\n" not in message


def test_not_a_mapping_is_an_error():
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_experiment(["name", "x"], "list.yaml")


def test_shipped_demo_parses_with_every_method():
    demo = load_experiment(shipped_experiment("demo"))
    assert demo.name == "demo" and demo.seed == 0
    assert set(demo.unlearn_runs) == {
        "ga",
        "ga+gdr",
        "npo",
        "npo+gdr",
        "npo+klr",
        "simnpo+gdr",
        "rmu",
        "sure",
        "npo+gdr-bf16",
    }
    # Every float32 method is tuned by selection; the bfloat16 run is not (it is the relapsing baseline).
    selected = {
        name for name, run in demo.unlearn_runs.items() if {**demo.unlearn_defaults, **run}["select_lr"]
    }
    assert selected == set(demo.unlearn_runs) - {"npo+gdr-bf16"}
    bf16 = [name for name, run in demo.unlearn_runs.items() if run.get("weights") == "bfloat16"]
    assert bf16 == ["npo+gdr-bf16"]
    assert demo.unlearn_runs["sure"]["sure_top"] == 0.1
    assert "bnb-nf4" in demo.attacks and "gptq-w4-g128" in demo.attacks


def test_shipped_fast_demo_parses():
    fast = load_experiment(shipped_experiment("demo-fast"))
    assert set(fast.unlearn_runs) == {"ga+gdr", "npo+gdr", "sure"}
    assert fast.attacks == ["rtn-w8-ch", "rtn-w4-g128", "relearn-retain-25", "noise-like-rtn-w4-g128"]
    assert fast.data == {"synth": {"people": 30, "facts_per_person": 3}}


def test_unknown_shipped_experiment():
    with pytest.raises(ConfigError, match="'nope'"):
        shipped_experiment("nope")


def test_invalid_yaml_reports_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nseed: 0\ndata: a: b\nunlearn: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3$"):
        load_experiment(path)


def test_missing_experiment_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment(tmp_path / "nothing.yaml")


def test_experiment_file_round_trip(tmp_path):
    import yaml

    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(VALID), encoding="utf-8")
    experiment = load_experiment(path)
    assert experiment.source == str(path) and experiment.raw == VALID


# --- attacks this installation cannot run -------------------------------------------------------------


def fake_find_spec(has_bitsandbytes: bool):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "bitsandbytes":
            return real("json") if has_bitsandbytes else None  # any spec stands for "installed"
        return real(name, *args, **kwargs)

    return find_spec


def test_available_attacks_drops_bnb_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(False))
    runnable, notes = available_attacks(["rtn-w8-ch", "bnb-nf4", "relearn-retain-25", "bnb-fp4"])
    assert runnable == ["rtn-w8-ch", "relearn-retain-25"]
    assert len(notes) == 2
    assert notes[0].startswith("bnb-nf4 skipped") and "bitsandbytes" in notes[0]
    assert notes[1].startswith("bnb-fp4 skipped")


def test_available_attacks_keeps_bnb_with_bitsandbytes(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec(True))
    assert available_attacks(["rtn-w8-ch", "bnb-nf4"]) == (["rtn-w8-ch", "bnb-nf4"], [])


def test_a_key_written_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("name: x\nseed: 0\nunlearn:\n  defaults:\n    lr: 1.0e-4\n    lr: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"key 'lr' appears twice \(line 6\)"):
        load_experiment(path)
    # YAML's own object tags stay refused: this is still the safe loader.
    path.write_text("name: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_experiment(path)


def test_an_audit_without_attacks_is_refused_and_a_missing_list_means_the_defaults():
    from relapse.audit.sweep import DEFAULT_ATTACKS, AuditConfig

    with pytest.raises(ConfigError, match=r"audit\.attacks names no attack"):
        parse_experiment(with_change(lambda r: r["audit"].update(attacks=[])), "t.yaml")
    assert parse_experiment(with_change(lambda r: r["audit"].pop("attacks")), "t.yaml").attacks == list(
        DEFAULT_ATTACKS
    )
    with pytest.raises(ConfigError, match="at least one attack"):
        AuditConfig(target="t", unlearned=["u"], data="d", attacks=[])


def test_seeds_must_be_a_whole_number_of_at_least_one():
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="seeds must be a whole number >= 1"):
            parse_experiment(with_change(lambda r, bad=bad: r.update(seeds=bad)), "t.yaml")
    experiment = parse_experiment(with_change(lambda r: r.update(seeds=3)), "t.yaml")
    assert experiment.unlearn_seeds() == [3, 4, 5] and experiment.label("ga", 4) == "ga@4"
    assert parse_experiment(copy.deepcopy(VALID), "t.yaml").label("ga", 3) == "ga"


def test_an_experiment_over_two_seeds_audits_each_and_summarises_the_spread(tmp_path):
    """Each unlearning run twice (seeds 3 and 4): two models per method, audited with their own seeds,
    and a summary per method over the seeds, in results.json and in the report."""
    from relapse.experiment import run_experiment

    raw = with_change(
        lambda r: r.update(
            seeds=2,
            unlearn={
                "defaults": {"lr": 1.0e-4, "max_steps": 4, "eval_every": 2},
                "runs": {"ga": {"method": "ga"}},
            },
            audit={"attacks": ["rtn-w4-g128", "relearn-retain-25"], "metrics": ["recall_forget", "knowmem"]},
        )
    )
    result = run_experiment(
        parse_experiment(raw, "seeds.yaml"), tmp_path / "out", run=RunContext(progress=False, log=None)
    )
    results = result.results
    assert list(result.models) == ["target", "retrained", "ga@3", "ga@4"]
    assert result.models["ga@3"]["path"] != result.models["ga@4"]["path"]
    assert {label: (info.get("group"), info.get("seed")) for label, info in results["models"].items()} == {
        "target": (None, None),
        "retrained": (None, None),
        "ga@3": ("ga", 3),
        "ga@4": ("ga", 4),
    }
    assert sorted(results["config"]["model_seeds"].values()) == [3, 4]
    summary = results["seed_summary"]["ga"]
    assert summary["models"] == ["ga@3", "ga@4"] and summary["seeds"] == [3, 4]
    assert sum(summary["statuses"].values()) == 2
    for attack, stats in summary["attacks"].items():
        shares = [results["recovery"][m][attack][summary["metric"]] for m in ("ga@3", "ga@4")]
        shares = [s for s in shares if s is not None]
        assert stats["n"] == len(shares)
        if len(shares) == 2:
            assert stats["mean"] == pytest.approx(sum(shares) / 2)
            assert stats["sd"] == pytest.approx(abs(shares[0] - shares[1]) / 2**0.5)
    report = (tmp_path / "out" / "audit" / "report.md").read_text(encoding="utf-8")
    assert f"Across seeds ({summary['metric']})" in report
    assert json.loads((tmp_path / "out" / "experiment.json").read_text())["seeds"] == [3, 4]
