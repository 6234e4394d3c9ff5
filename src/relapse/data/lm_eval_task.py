"""lm-evaluation-harness task folders written from a benchmark: a multiple-choice task per QA split.

Utility is often judged with lm-evaluation-harness tasks; to test that backend offline on the tiny models,
relapse writes tasks of its own from a benchmark folder. Each QA split whose pairs carry answer variants
(``paraphrased_answer`` and ``perturbed_answer``: the built-in benchmark's, or TOFU's) becomes one
multiple-choice task: the question asked the way the benchmark's models learn it (:func:`qa_prompt`),
the paraphrased answer as the correct choice and the perturbed answers as distractors. Both kinds of
choice share one phrasing (``"the town of X"``), so the task asks which value the model believes, not
which phrasing it prefers: the same comparison as TOFU's truth ratio, scored by lm-eval's ``acc``.

A folder holds ``<task>.yaml`` and ``<task>.jsonl`` per task. The YAML names its data file by absolute
path (lm-eval hands ``data_files`` to ``datasets``, which reads relative paths from the working
directory), so a moved folder is written again rather than edited. Nothing here imports lm-eval: the
folder is plain files, written without the optional package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from relapse import __version__
from relapse.data.benchmark import FORGET_QA, HOLDOUT_QA, RETAIN_QA, Benchmark, QAPair
from relapse.data.prompts import qa_prompt
from relapse.errors import DataError
from relapse.runtime import atomic_write_text

#: The QA splits a task can be built from, in the order the tasks are written; retain first (utility).
TASK_SPLITS = (RETAIN_QA, FORGET_QA, HOLDOUT_QA)
#: Bumped whenever the items of a benchmark change (choices, order, prompt): lm-eval records it.
TASK_VERSION = 1


def task_name(split: str) -> str:
    """The lm-eval task name of QA split ``split``: ``retain_qa`` gives ``relapse_retain_mc``."""
    return f"relapse_{split.removesuffix('_qa')}_mc"


def mc_item(pair: QAPair) -> dict[str, Any]:
    """One multiple-choice document: the prompt, the choices in sorted order and the correct one's index.

    Sorting places the correct choice by its text, not always first: lm-eval breaks a tie in favour of
    the first choice, so a model that scores every choice alike must not look right.
    """
    if not pair.has_variants:
        raise DataError(f"question {pair.question!r} has no paraphrased and perturbed answers")
    choices = sorted({pair.paraphrased_answer, *pair.perturbed_answers})
    if len(choices) != 1 + len(pair.perturbed_answers):
        raise DataError(f"question {pair.question!r}: a perturbed answer repeats the paraphrase or another")
    return {
        "query": qa_prompt(pair.question),
        "choices": choices,
        "gold": choices.index(pair.paraphrased_answer),
    }


def task_config(name: str, data_file: Path, split: str, source: str) -> dict[str, Any]:
    """The lm-eval task YAML of one task, as a dict: a local JSON file, ``acc`` and ``acc_norm``."""
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "multiple_choice",
        # Field names, not templates: lm-eval reads a feature of that name from each document.
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {
            "version": TASK_VERSION,
            "source": source,
            "split": split,
            "written_by": f"relapse {__version__}",
        },
    }


def write_lm_eval_tasks(
    benchmark: Benchmark, out: str | Path, splits: tuple[str, ...] | list[str] | None = None
) -> list[str]:
    """Write one multiple-choice task per QA split of ``benchmark`` into folder ``out``; their names.

    ``splits`` defaults to every split of :data:`TASK_SPLITS` whose pairs all carry answer variants; a
    split named explicitly without them is an error, as is a benchmark with no such split. Each file is
    written atomically, so a folder lm-eval reads is never half-written.
    """
    chosen = list(splits) if splits is not None else [s for s in TASK_SPLITS if _has_variants(benchmark, s)]
    for split in chosen:
        if split not in TASK_SPLITS:
            raise DataError(f"no lm-eval task for split {split!r}; choose from {', '.join(TASK_SPLITS)}")
        if not _has_variants(benchmark, split):
            raise DataError(
                f"{split}: not every QA pair has paraphrased_answer and perturbed_answer, which the "
                "multiple-choice task needs (see docs/data-format.md)"
            )
    if not chosen:
        raise DataError(
            "no QA split has paraphrased_answer and perturbed_answer on every pair, so no lm-eval task can "
            "be built (relapse data synth writes them; see docs/data-format.md)"
        )
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    source = str(Path(benchmark.root).resolve()) if benchmark.root else "in memory"
    names = []
    for split in chosen:
        name = task_name(split)
        data_file = folder / f"{name}.jsonl"
        lines = [json.dumps(mc_item(pair), ensure_ascii=False) for pair in getattr(benchmark, split)]
        atomic_write_text(data_file, "\n".join(lines) + "\n")
        config = task_config(name, data_file, split, source)
        atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(config, sort_keys=False))
        names.append(name)
    return names


def _has_variants(benchmark: Benchmark, split: str) -> bool:
    pairs = getattr(benchmark, split)
    return bool(pairs) and all(pair.has_variants for pair in pairs)
