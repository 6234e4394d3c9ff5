"""``relapse eval --lm-eval`` and ``relapse data lm-eval-task``: lm-evaluation-harness as a utility backend.

The central check runs relapse's multiple-choice tasks through lm-eval on the tiny trained model and
compares lm-eval's accuracy, item by item, with an independent computation: each choice's summed
log-likelihood after the prompt, from the model directly, and the argmax against the paraphrased answer
(lm-eval's ``acc``: raw log-likelihoods, no length normalisation). The tests that need lm-eval skip
without it; the refusal without it and the task files are checked either way.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from relapse.cli import main
from relapse.data.benchmark import load_benchmark
from relapse.data.lm_eval_task import TASK_SPLITS, mc_item, task_name, write_lm_eval_tasks
from relapse.data.prompts import qa_prompt
from relapse.errors import DataError
from relapse.models.io import load_model
from tests.conftest import one_error_line


@pytest.fixture
def lm_eval(monkeypatch, tmp_path):
    """lm-eval, or a skip; datasets' cache (where lm-eval's JSON tasks are converted) kept in the test's
    own folder rather than the user's."""
    module = pytest.importorskip("lm_eval")
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    return module


def eval_cli(capsys, model, data, out, *extra: str) -> tuple[int, str]:
    """``relapse eval`` quietly on one thread; (exit code, stderr)."""
    capsys.readouterr()
    argv = ["eval", "--model", str(model), "--data", str(data), "--out", str(out), "--quiet"]
    code = main([*argv, "--threads", "1", "--batch-size", "8", *extra])
    return code, capsys.readouterr().err


def test_without_lm_eval_one_line_names_the_extra(small_benchmark_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    # A model that does not exist: the refusal comes before any model is loaded.
    code, err = eval_cli(
        capsys, tmp_path / "nowhere", small_benchmark_dir, tmp_path / "e.json", "--lm-eval", "x"
    )
    assert code == 2
    one_error_line(err, "pip install 'relapse[lm-eval]'")
    assert not (tmp_path / "e.json").exists()


def test_lm_eval_options_need_lm_eval(small_benchmark_dir, tmp_path, capsys):
    code, err = eval_cli(
        capsys, tmp_path / "m", small_benchmark_dir, tmp_path / "e.json", "--lm-eval-limit", "3"
    )
    assert code == 2
    one_error_line(err, "--lm-eval TASKS")


def test_task_files(small_benchmark_dir, tmp_path, capsys):
    """One YAML and one JSONL per QA split; the correct choice is the paraphrase, among its distractors."""
    benchmark = load_benchmark(small_benchmark_dir)
    assert (
        main(["data", "lm-eval-task", "--data", str(small_benchmark_dir), "--out", str(tmp_path / "t")]) == 0
    )
    for split in TASK_SPLITS:
        name = task_name(split)
        config = yaml.safe_load((tmp_path / "t" / f"{name}.yaml").read_text())
        assert config["task"] == name and config["output_type"] == "multiple_choice"
        data_file = config["dataset_kwargs"]["data_files"]["test"]
        assert data_file == str((tmp_path / "t" / f"{name}.jsonl").resolve())
        items = [json.loads(line) for line in Path(data_file).read_text().splitlines()]
        pairs = getattr(benchmark, split)
        assert len(items) == len(pairs)
        for item, pair in zip(items, pairs, strict=True):
            assert item["query"] == qa_prompt(pair.question)
            assert item["choices"][item["gold"]] == pair.paraphrased_answer
            assert sorted(item["choices"]) == sorted([pair.paraphrased_answer, *pair.perturbed_answers])
        # Sorted choices: the correct one is not always first (lm-eval breaks ties toward the first).
        assert len({item["gold"] for item in items}) > 1
    # A second run refuses to replace them; a benchmark without variants has no task to write.
    code = main(["data", "lm-eval-task", "--data", str(small_benchmark_dir), "--out", str(tmp_path / "t")])
    assert code == 2
    one_error_line(capsys.readouterr().err, "--overwrite")
    bare = load_benchmark(small_benchmark_dir)
    bare.retain_qa = [type(p)(p.question, p.answer) for p in bare.retain_qa]
    with pytest.raises(DataError, match="perturbed_answer"):
        write_lm_eval_tasks(bare, tmp_path / "bare", ["retain_qa"])
    with pytest.raises(DataError, match="perturbed"):
        mc_item(bare.retain_qa[0])


def direct_accuracy(model, tokenizer, pairs) -> list[float]:
    """Per question, 1.0 when the paraphrased answer has the highest summed log-likelihood of all choices
    after the prompt (each continuation led by a space), computed with the model alone."""
    correct = []
    for pair in pairs:
        prompt = qa_prompt(pair.question)
        context = tokenizer(prompt)["input_ids"]
        scores = {}
        for choice in (pair.paraphrased_answer, *pair.perturbed_answers):
            ids = tokenizer(f"{prompt} {choice}")["input_ids"]
            assert ids[: len(context)] == context  # the choice's tokens follow the prompt's unchanged
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0].double()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            targets = torch.tensor(ids[1:])
            per_token = logprobs.gather(1, targets[:, None])[:, 0]
            scores[choice] = float(per_token[len(context) - 1 :].sum())
        correct.append(float(max(scores, key=scores.get) == pair.paraphrased_answer))
    return correct


def test_accuracy_equals_direct_loglikelihoods(lm_eval, trained_small, small_benchmark_dir, tmp_path, capsys):
    """relapse's retain task (written by relapse eval from --data) and a user's own task folder (here the
    holdout task, written by ``relapse data lm-eval-task`` and renamed) through lm-eval on the loaded model:
    the accuracy lm-eval reports is the one computed directly, item by item."""
    folder = tmp_path / "mine"
    assert main(["data", "lm-eval-task", "--data", str(small_benchmark_dir), "--out", str(folder)]) == 0
    holdout = task_name("holdout_qa")
    config = yaml.safe_load((folder / f"{holdout}.yaml").read_text())
    config["task"] = "my_holdout_mc"
    (folder / "my_holdout_mc.yaml").write_text(yaml.safe_dump(config))
    for split in TASK_SPLITS:
        (folder / f"{task_name(split)}.yaml").unlink()  # only the user's task is found in the folder

    out = tmp_path / "eval.json"
    tasks = f"{task_name('retain_qa')},my_holdout_mc"
    code, err = eval_cli(
        capsys,
        trained_small.path,
        small_benchmark_dir,
        out,
        "--metrics",
        "knowmem_retain",
        "--lm-eval",
        tasks,
        "--lm-eval-include",
        str(folder),
    )
    assert code == 0, err
    record = json.loads(out.read_text())
    entry = record["lm_eval"]
    assert entry["version"] == lm_eval.__version__ == record["versions"]["lm_eval"]
    assert entry["registry"] is False  # every task was found locally: lm-eval's registry was not indexed
    assert list(record["metrics"]) == ["knowmem_retain"]  # relapse's metrics sit beside lm-eval's

    model, tokenizer = load_model(trained_small.path)
    benchmark = load_benchmark(small_benchmark_dir)
    seen = []
    for name, pairs in (
        (task_name("retain_qa"), benchmark.retain_qa),
        ("my_holdout_mc", benchmark.holdout_qa),
    ):
        result = entry["results"][name]
        expected = direct_accuracy(model, tokenizer, pairs)
        assert result["samples"] == len(pairs)
        assert result["per_item"]["acc"] == expected, name
        assert result["acc"] == pytest.approx(sum(expected) / len(expected), abs=1e-12)
        seen += expected
    # The check can fail: the model gets some choices right and some wrong.
    assert 0 < sum(seen) < len(seen)


def test_unknown_task_is_one_line(lm_eval, small_benchmark_dir, tmp_path, capsys):
    code, err = eval_cli(
        capsys,
        tmp_path / "nowhere",
        small_benchmark_dir,
        tmp_path / "e.json",
        "--lm-eval",
        "relapse_retain_mc,no_such_task_here",
    )
    assert code == 2
    one_error_line(err, "no_such_task_here", "relapse_retain_mc")


def test_task_data_out_of_reach_is_one_line(lm_eval, small_benchmark_dir, tmp_path, capsys):
    """A task whose data is on the hub, where it cannot be had (offline here; online the dataset does not
    exist), fails in one line before the model is loaded, not in a traceback after relapse's metrics."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    config = {
        "task": "hub_only_mc",
        "dataset_path": "relapse-tests/no-such-dataset",
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
    }
    (folder / "hub_only_mc.yaml").write_text(yaml.safe_dump(config))
    code, err = eval_cli(
        capsys,
        tmp_path / "nowhere",
        small_benchmark_dir,
        tmp_path / "e.json",
        "--lm-eval",
        "hub_only_mc",
        "--lm-eval-include",
        str(folder),
    )
    assert code == 2
    one_error_line(err, "could not load a task's data", "relapse-tests/no-such-dataset")
