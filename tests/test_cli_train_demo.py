"""The train and demo commands end to end, as a user runs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from html import escape

import pytest
import torch
from safetensors.torch import load_file

from relapse.cli import main
from relapse.experiment import load_experiment, shipped_experiment
from relapse.runtime import resolve_device
from tests.conftest import SMALL


def _run(args, env_extra=None, **kwargs):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "relapse", *args], capture_output=True, text=True, env=env, **kwargs
    )


def test_help_for_every_command():
    for args in (
        ["--help"],
        ["data", "--help"],
        ["data", "synth", "--help"],
        ["train", "--help"],
        ["demo", "--help"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 0


def test_train_command_then_cache_hit(small_benchmark_dir, tmp_path, capsys):
    args = [
        "train",
        "--data",
        str(small_benchmark_dir),
        "--out",
        str(tmp_path / "m"),
        "--on",
        "retain",
        "--steps",
        "3",
        "--stop-recall",
        "0",
        "--quiet",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "3 steps" in first
    record = json.loads((tmp_path / "m" / "train.json").read_text())
    assert (
        record["steps"] == 3
        and record["config"]["on"] == "retain"
        and record["config"]["stop_recall"] is None
    )
    assert main(args) == 0
    assert "cached" in capsys.readouterr().out
    # Different settings into the same folder: refused, the model is kept.
    assert main([*args[:-1], "--seed", "9", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((tmp_path / "m" / "train.json").read_text())["seed"] == record["seed"]


def test_bad_option_value_is_exit_2(small_benchmark_dir, tmp_path, capsys):
    code = main(
        [
            "train",
            "--data",
            str(small_benchmark_dir),
            "--out",
            str(tmp_path / "m"),
            "--stop-recall",
            "1.5",
            "--quiet",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("relapse: error:") and "--stop-recall" in err and "Traceback" not in err


@pytest.mark.slow
def test_demo_fast_end_to_end(tmp_path):
    """`relapse demo --fast --jobs 2`: the models made and audited in two processes, every cell audited, a
    verdict per method; a second run (in one process) only reads."""
    cache = {"RELAPSE_CACHE": str(tmp_path / "cache"), "RELAPSE_THREADS": "1"}
    out = tmp_path / "demo"
    first = _run(["demo", "--fast", "--out", str(out), "--quiet", "--jobs", "2"], cache, timeout=900)
    assert first.returncode == 0, first.stderr
    experiment = load_experiment(shipped_experiment("demo-fast"))
    unlearned = list(experiment.unlearn_runs)
    assert unlearned == ["ga+gdr", "npo+gdr", "sure"]
    results = json.loads((out / "audit" / "results.json").read_text())
    labels = ["target", "retrained", *unlearned]
    assert {label: info["role"] for label, info in results["models"].items()} == {
        "target": "target",
        "retrained": "retrained",
        **dict.fromkeys(unlearned, "unlearned"),
    }
    attacks = ["none", *experiment.attacks]
    assert set(results["cells"]) == {f"{m}|{a}" for m in labels for a in attacks}

    def value(model, metric):
        return results["cells"][f"{model}|none"]["metrics"][metric]["value"]

    assert value("target", "recall_forget") >= 0.95 and value("target", "recall_retain") >= 0.95
    assert value("retrained", "recall_forget") <= 0.2, "the retrained model never saw the forget people"
    assert value("retrained", "privleak") == pytest.approx(0.0, abs=1e-9)  # its own reference

    html = (out / "audit" / "report.html").read_text(encoding="utf-8")
    assert set(results["verdicts"]) == set(unlearned)
    for label in unlearned:
        text = results["verdicts"][label]["text"]
        assert f"<strong>{escape(label)}</strong>" in html and escape(text) in html
        assert any(line.startswith(label + " ") and line.endswith(text) for line in first.stdout.splitlines())

    record = json.loads((out / "experiment.json").read_text())
    assert record["seed"] == 0 and "torch" in record["versions"] and "relapse" in record["versions"]
    assert record["device"] == results["device"] == str(resolve_device("auto"))
    assert record["verdicts"] == results["verdicts"]
    assert list(record["models"]) == labels and not any(m["cached"] for m in record["models"].values())

    second = _run(["demo", "--fast", "--out", str(out), "--quiet"], cache, timeout=900)
    assert second.returncode == 0, second.stderr
    again = json.loads((out / "experiment.json").read_text())
    assert all(again["models"][label]["cached"] for label in labels)
    assert {k: m["path"] for k, m in again["models"].items()} == {
        k: m["path"] for k, m in record["models"].items()
    }
    assert json.loads((out / "audit" / "results.json").read_text())["cells"] == results["cells"]


@pytest.mark.slow
def test_sigkilled_training_resumes_to_identical_weights(tmp_path):
    """A real kill -9 of `relapse train`, then the same command again, equals an uninterrupted run."""
    data = tmp_path / "data"
    assert (
        main(
            [
                "data",
                "synth",
                "--out",
                str(data),
                "--people",
                str(SMALL["people"]),
                "--facts-per-person",
                "3",
                "--seed",
                "2",
            ]
        )
        == 0
    )
    common = [
        "--data",
        str(data),
        "--steps",
        "40",
        "--checkpoint-every",
        "10",
        "--stop-recall",
        "0",
        "--eval-every",
        "1000",
        "--quiet",
        "--threads",
        "1",
    ]
    assert _run(["train", "--out", str(tmp_path / "straight"), *common], timeout=600).returncode == 0

    env = {**os.environ, "RELAPSE_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "relapse", "train", "--out", str(tmp_path / "killed"), *common],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state = tmp_path / ".killed.work" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert state.exists(), "no checkpoint appeared"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed").exists()

    resumed = _run(["train", "--out", str(tmp_path / "killed"), *common], timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    record = json.loads((tmp_path / "killed" / "train.json").read_text())
    assert record["resumed_from_step"] is not None and record["resumed_from_step"] >= 10
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_demo_sized_benchmark_is_memorised(tmp_path):
    """The full demo's benchmark (100 people x 5 facts) reaches QA recall 0.95 within the step budget."""
    data = tmp_path / "data"
    assert main(["data", "synth", "--out", str(data), "--people", "100", "--seed", "0"]) == 0
    result = _run(
        ["train", "--data", str(data), "--out", str(tmp_path / "m"), "--eval-every", "50", "--quiet"],
        {"RELAPSE_THREADS": "1"},
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "m" / "train.json").read_text())
    assert record["stopped_early"]
    assert record["final"]["recall_forget"] >= 0.95 and record["final"]["recall_retain"] >= 0.95
