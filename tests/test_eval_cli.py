"""``relapse eval``: the JSON record, refusals with one-line errors, PrivLeak references, attacks."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from relapse.cli import main
from relapse.metrics.mia import MUSE_RETRAINED_AUC
from tests.conftest import one_error_line


@pytest.fixture
def run_eval_cli(trained_small, small_benchmark_dir, tmp_path, capsys):
    """Run ``relapse eval`` on the trained model; returns (exit code, record or None, stderr)."""

    def run(*extra: str, model=None, out=None):
        out = out or tmp_path / "eval.json"
        argv = ["eval", "--model", str(model or trained_small.path), "--data", str(small_benchmark_dir)]
        argv += ["--out", str(out), "--quiet", "--threads", "1", "--batch-size", "8", *extra]
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err
        record = json.loads(out.read_text()) if code == 0 else None
        return code, record, err

    return run


def test_default_record(run_eval_cli, tmp_path):
    code, record, err = run_eval_cli("--seed", "5")
    assert code == 0, err
    assert record["kind"] == "relapse-eval"
    assert record["seed"] == 5
    assert {"python", "torch", "transformers"} <= set(record["versions"])
    assert record["attack"] is None and record["retrained"] is None
    # Default metrics: verbmem, knowmem, utility; privleak dropped without a reference.
    assert list(record["metrics"]) == ["verbmem_forget", "knowmem_forget", "knowmem_retain", "ppl_general"]
    assert len(record["skipped"]) == 1 and record["skipped"][0].startswith("privleak")
    assert record["settings"]["batch_size"] == 8 and record["settings"]["retrained_auc"] is None
    # The tiny model memorised the benchmark.
    assert record["metrics"]["knowmem_forget"]["value"] == 100.0


def test_refuses_existing_out(run_eval_cli, tmp_path):
    out = tmp_path / "eval.json"
    out.write_text("keep me")
    code, _, err = run_eval_cli("--metrics", "mia_loss")
    assert code == 2
    assert "--overwrite" in one_error_line(err)
    assert out.read_text() == "keep me"
    code, record, err = run_eval_cli("--metrics", "mia_loss", "--overwrite")
    assert code == 0, err
    assert list(record["metrics"]) == ["mia_loss"]


def test_privleak_without_reference_is_an_error(run_eval_cli, tmp_path):
    code, _, err = run_eval_cli("--metrics", "privleak")
    assert code == 2
    assert "--retrained" in one_error_line(err)
    assert not (tmp_path / "eval.json").exists()


def test_retrained_auc_news(run_eval_cli):
    code, record, err = run_eval_cli("--metrics", "privleak,mia_mink_40", "--retrained-auc", "news")
    assert code == 0, err
    assert MUSE_RETRAINED_AUC["news"] == 0.4772
    assert record["retrained"] == {"source": "MUSE news", "auc": 0.4772}
    assert record["settings"]["retrained_auc"] == 0.4772
    leak = record["metrics"]["privleak"]
    auc = record["metrics"]["mia_mink_40"]["value"]
    assert leak["auc"] == auc and leak["retrained_auc"] == 0.4772
    assert leak["value"] == pytest.approx((auc - 0.4772) / 0.4772 * 100)
    assert record["skipped"] == []


@pytest.mark.parametrize("value", ["foo", "0", "1.5", "-0.2", "nan"])
def test_bad_retrained_auc(run_eval_cli, tmp_path, value):
    code, _, err = run_eval_cli("--metrics", "privleak", "--retrained-auc", value)
    assert code == 2
    assert "--retrained-auc" in one_error_line(err)
    assert not (tmp_path / "eval.json").exists()


def test_retrained_and_retrained_auc_exclusive(run_eval_cli, trained_small):
    code, _, err = run_eval_cli("--retrained", str(trained_small.path), "--retrained-auc", "0.5")
    assert code == 2
    assert "not both" in one_error_line(err)


def test_unknown_metric(run_eval_cli):
    code, _, err = run_eval_cli("--metrics", "verbmem,bogus")
    assert code == 2
    assert "bogus" in one_error_line(err)


def test_attack_is_applied_in_memory_only(run_eval_cli, trained_small, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained_small.path, model)

    def digest() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model.iterdir())}

    before = digest()
    code, plain, err = run_eval_cli("--metrics", "ppl_general", model=model, out=tmp_path / "plain.json")
    assert code == 0, err
    code, attacked, err = run_eval_cli(
        "--metrics", "ppl_general", "--attack", "rtn-w4-g128", model=model, out=tmp_path / "rtn.json"
    )
    assert code == 0, err
    assert attacked["attack"]["name"] == "rtn-w4-g128"
    assert digest() == before
    # The attack changed the weights that were evaluated: 4-bit rounding moves perplexity.
    assert attacked["metrics"]["ppl_general"]["value"] != plain["metrics"]["ppl_general"]["value"]


def test_tofu_group_without_a_retrained_model_skips_forget_quality(run_eval_cli):
    code, record, err = run_eval_cli("--metrics", "tofu")
    assert code == 0, err
    assert "tofu_forget_quality" not in record["metrics"]
    assert "tofu_model_utility" in record["metrics"] and "tofu_truth_ratio_forget" in record["metrics"]
    assert record["skipped"] == ["tofu_forget_quality (no --retrained)"]


def test_forget_quality_named_without_a_retrained_model_is_an_error(run_eval_cli, tmp_path):
    code, _, err = run_eval_cli("--metrics", "tofu_forget_quality")
    assert code == 2
    assert "--retrained" in one_error_line(err, "tofu_forget_quality")
    assert not (tmp_path / "eval.json").exists()


def test_forget_quality_against_the_model_itself_is_one(run_eval_cli, trained_small):
    code, record, err = run_eval_cli(
        "--metrics", "tofu_forget_quality,tofu_prob_forget", "--retrained", str(trained_small.path)
    )
    assert code == 0, err
    assert record["metrics"]["tofu_forget_quality"]["value"] == 1.0
    items = record["metrics"]["tofu_forget_quality"]["views"]["items"]
    assert record["retrained"]["forget_truth_ratio_items"] == items > 0
    assert "auc" not in record["retrained"]  # no PrivLeak asked: the AUC (which needs holdout texts) is not
    assert record["settings"]["retrained_truth_ratio_items"] == items
