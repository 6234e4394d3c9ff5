"""The shipped pretrained-model experiment, end to end: SmolLM2-135M fine-tuned, unlearned and audited."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from relapse.experiment import load_experiment, shipped_experiment
from tests.test_fetch import needs_smollm2


@pytest.mark.slow
@needs_smollm2
def test_smollm2_experiment_runs_and_warns_about_the_q4_1_grid(tmp_path):
    """Fine-tune (target and retrained), three unlearning runs and the audit, in two processes (what a
    2-core machine does by default; one process took 35-45 minutes)."""
    out = tmp_path / "smollm2"
    env = {**os.environ, "RELAPSE_CACHE": str(tmp_path / "cache"), "RELAPSE_THREADS": "1"}
    source = shipped_experiment("smollm2")
    command = ["run", str(source), "--out", str(out), "--quiet", "--device", "cpu", "--jobs", "2"]
    done = subprocess.run(
        [sys.executable, "-m", "relapse", *command],
        capture_output=True,
        text=True,
        env=env,
        timeout=4 * 3600,
    )
    assert done.returncode == 0, done.stderr
    experiment = load_experiment(source)
    results = json.loads((out / "audit" / "results.json").read_text())
    labels = ["target", "retrained", *experiment.unlearn_runs]
    assert set(results["cells"]) == {f"{m}|{a}" for m in labels for a in ["none", *experiment.attacks]}

    def value(model, attack, metric):
        return results["cells"][f"{model}|{attack}"]["metrics"][metric]["value"]

    # Fine-tuning taught the pretrained model the fictitious people; the retrained model never saw the
    # forget people; unlearning moved the forget answers away from the target's.
    assert value("target", "none", "recall_forget") >= 0.9
    assert value("retrained", "none", "recall_forget") <= 0.2
    for run in experiment.unlearn_runs:
        assert value(run, "none", "nll_forget") > value("target", "none", "nll_forget")
    # The base weights came from a Q4_1 file: the audit says that gguf-q4_1 rounds onto that grid.
    assert any("gguf-q4_1" in warning for warning in results["warnings"])
    assert (out / "audit" / "report.html").is_file()
    record = json.loads((out / "experiment.json").read_text())
    assert record["models"]["target"]["how"].startswith("train") and record["seed"] == 0
