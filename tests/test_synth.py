"""The built-in benchmark generator (``synth_benchmark``) and ``relapse data synth``.

The invariants are checked on the files as written, parsed here, without using the generator's internals.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from relapse.cli import main
from relapse.data import load_benchmark, synth_benchmark
from relapse.errors import ConfigError
from tests.conftest import one_error_line, read_error_line

# A person's full name: two capitalised words. Nothing else in a question looks like that.
NAME_RE = re.compile(r"\b[A-Z][a-z]+ [A-Z][a-z]+\b")
REQUIRED_FILES = ("forget.jsonl", "retain.jsonl", "holdout.jsonl", "forget_qa.jsonl", "retain_qa.jsonl")


# ---------------------------------------------------------------------------------------------- helpers


def _write(tmp_path: Path, name: str = "bench", **kwargs) -> Path:
    kwargs.setdefault("general", 10)
    directory = tmp_path / name
    synth_benchmark(**kwargs).save(directory)
    return directory


def _jsonl(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n"), f"{path.name} does not end with a newline"
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _stats(directory: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def _name_of(question: str) -> str:
    names = NAME_RE.findall(question)
    assert len(names) == 1, f"cannot tell whom {question!r} is about: {names}"
    return names[0]


def _template(question: str) -> str:
    return question.replace(_name_of(question), "<NAME>")


def _people(qa: list[dict]) -> dict[str, list[dict]]:
    """QA records grouped by the person they are about, in order of first appearance."""
    out: dict[str, list[dict]] = {}
    for record in qa:
        out.setdefault(_name_of(record["question"]), []).append(record)
    return out


class Parsed:
    """A written benchmark folder, parsed independently of relapse's loader."""

    def __init__(self, directory: Path):
        self.meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        self.texts = {
            s: [r["text"] for r in _jsonl(directory / f"{s}.jsonl")]
            for s in ("forget", "retain", "holdout", "general")
        }
        self.qa = {
            s: _jsonl(directory / f"{s}.jsonl") for s in ("forget_qa", "retain_qa", "holdout_qa", "icl")
        }
        self.people = {
            "forget": _people(self.qa["forget_qa"]),
            "retain": _people(self.qa["retain_qa"]),
            "holdout": _people(self.qa["holdout_qa"]),
            "icl": _people(self.qa["icl"]),
        }

    def all_qa(self) -> list[dict]:
        return [r for records in self.qa.values() for r in records]


# ------------------------------------------------------------------------------------------ determinism


def test_same_arguments_give_byte_identical_files(tmp_path):
    args = {"people": 30, "facts_per_person": 4, "forget_frac": 0.2, "seed": 11, "general": 15}
    a, b = tmp_path / "a", tmp_path / "b"
    synth_benchmark(**args).save(a)
    synth_benchmark(**args).save(b)
    files_a, files_b = _snapshot(a), _snapshot(b)
    assert set(REQUIRED_FILES) <= set(files_a)
    assert files_a.keys() == files_b.keys()
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two runs with the same seed"


def test_same_arguments_give_identical_files_under_another_hash_seed(tmp_path):
    """A fresh interpreter with a different PYTHONHASHSEED writes the same bytes ("on every machine")."""
    here, there = tmp_path / "here", tmp_path / "there"
    synth_benchmark(people=25, seed=5, general=10).save(here)
    hash_seed = "4242" if os.environ.get("PYTHONHASHSEED") != "4242" else "4343"
    code = (
        "import sys; from relapse.data import synth_benchmark; "
        "synth_benchmark(people=25, seed=5, general=10).save(sys.argv[1])"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-c", code, str(there)], check=True, env=env, timeout=120)
    assert _snapshot(here) == _snapshot(there)


def test_different_seed_gives_different_data(tmp_path):
    a = Parsed(_write(tmp_path, "a", people=20, seed=1))
    b = Parsed(_write(tmp_path, "b", people=20, seed=2))
    assert a.texts["forget"] != b.texts["forget"]
    assert a.texts["retain"] != b.texts["retain"]
    assert a.qa["forget_qa"] != b.qa["forget_qa"]
    assert set(a.people["retain"]) != set(b.people["retain"])
    assert a.meta["seed"] == 1 and b.meta["seed"] == 2


def _without_variants_digest(directory: Path) -> str:
    """A digest of a benchmark folder's content as generator version 1 wrote it: the answer variants and
    the version fields left out."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name == "meta.json":
            meta = json.loads(path.read_text(encoding="utf-8"))
            for key in ("generator_version", "perturbed_answers", "relapse_version"):
                meta.pop(key, None)
            digest.update(json.dumps(meta, sort_keys=True).encode())
            continue
        for record in _jsonl(path):
            record.pop("paraphrased_answer", None)
            record.pop("perturbed_answer", None)
            digest.update(json.dumps(record, sort_keys=True).encode())
    return digest.hexdigest()


def test_the_answer_variants_leave_everything_else_as_version_1_drew_it(tmp_path):
    """The variants come from a generator of their own, so the people, facts, texts and questions of a
    seed are the ones generator version 1 wrote (digest computed with version 1, commit b9352e3)."""
    directory = _write(tmp_path, people=40, facts_per_person=5, forget_frac=0.1, seed=0, general=10)
    assert _without_variants_digest(directory) == (
        "7ebd8cd5789557eb60167226df0220fdfb068f482d9cf7d613c316aab4720266"
    )


# ------------------------------------------------------------------------------------------- invariants


@pytest.mark.parametrize(
    ("people", "facts", "frac", "holdout"),
    [
        (20, 5, 0.1, None),  # the defaults' shape: 2 forget, holdout defaults to 2
        (25, 3, 0.2, 7),  # explicit holdout
        (20, 1, 0.01, None),  # round(0.2) == 0 -> at least one forget person
        (20, 2, 0.18, None),  # 3.6 rounds to 4, not down to 3
        (40, 9, 0.5, 3),  # every fact kind, half forgotten
    ],
)
def test_counts_match_arguments_and_meta(tmp_path, people, facts, frac, holdout):
    p = Parsed(
        _write(tmp_path, people=people, facts_per_person=facts, forget_frac=frac, holdout=holdout, general=12)
    )
    n_forget = max(1, int(people * frac + 0.5))
    n_holdout = n_forget if holdout is None else holdout
    expected_people = {"forget": n_forget, "retain": people - n_forget, "holdout": n_holdout}
    counts = p.meta["counts"]
    for split, n in expected_people.items():
        assert len(p.texts[split]) == n, split
        assert len(p.people[split]) == n, split
        assert counts[f"{split}_people"] == n, split
        assert all(len(records) == facts for records in p.people[split].values()), split
    assert len(p.qa["forget_qa"]) == counts["forget_qa"] == n_forget * facts
    assert len(p.qa["retain_qa"]) == counts["retain_qa"] == (people - n_forget) * facts
    assert len(p.qa["holdout_qa"]) == n_holdout * facts
    assert len(p.qa["icl"]) == counts["icl"] >= 1
    assert len(p.texts["general"]) == counts["general"] == 12
    assert (p.meta["people"], p.meta["facts_per_person"], p.meta["forget_frac"]) == (people, facts, frac)


def test_retain_is_never_empty(tmp_path):
    p = Parsed(_write(tmp_path, people=2, forget_frac=0.9))
    assert len(p.texts["forget"]) == 1
    assert len(p.texts["retain"]) == 1


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> Parsed:
    directory = tmp_path_factory.mktemp("synth") / "bench"
    synth_benchmark(people=60, facts_per_person=6, forget_frac=0.25, holdout=10, seed=7, general=20).save(
        directory
    )
    return Parsed(directory)


def test_written_benchmark_passes_the_loader(parsed, tmp_path):
    directory = _write(
        tmp_path, people=60, facts_per_person=6, forget_frac=0.25, holdout=10, seed=7, general=20
    )
    loaded = load_benchmark(directory)
    assert loaded.forget == parsed.texts["forget"]
    assert [qa.question for qa in loaded.retain_qa] == [r["question"] for r in parsed.qa["retain_qa"]]


def test_names_are_unique_across_all_splits(parsed):
    groups = parsed.people
    total = sum(len(g) for g in groups.values())
    everyone = set().union(*(set(g) for g in groups.values()))
    assert len(everyone) == total, "a name appears in two splits"
    assert total == 60 + 10 + len(parsed.qa["icl"])


def test_every_text_is_about_exactly_one_person_of_its_split(parsed):
    for split in ("forget", "retain", "holdout"):
        names = set(parsed.people[split])
        for text in parsed.texts[split]:
            mentioned = [n for n in names if n in text]
            assert len(mentioned) == 1, (split, text, mentioned)


def test_holdout_and_icl_people_never_appear_in_forget_or_retain(parsed):
    trained_texts = parsed.texts["forget"] + parsed.texts["retain"]
    trained_questions = [r["question"] for r in parsed.qa["forget_qa"] + parsed.qa["retain_qa"]]
    trained_answers = [r["answer"] for r in parsed.qa["forget_qa"] + parsed.qa["retain_qa"]]
    unseen = list(parsed.people["holdout"]) + list(parsed.people["icl"])
    assert unseen
    for name in unseen:
        assert not any(name in t for t in trained_texts), name
        assert not any(name in q for q in trained_questions), name
        assert name not in trained_answers, name
    for name in parsed.people["icl"]:
        assert not any(name in t for t in parsed.texts["holdout"]), name


def test_general_text_mentions_no_person(parsed):
    everyone = [n for group in parsed.people.values() for n in group]
    for text in parsed.texts["general"]:
        assert not any(n in text for n in everyone), text


def test_no_answer_occurs_in_its_question(parsed):
    records = parsed.all_qa()
    assert records
    for r in records:
        assert r["answer"].strip(), r
        assert r["answer"] not in r["question"], r
        assert r["answer"].lower() not in r["question"].lower(), r


def test_every_answer_is_in_the_biography_of_its_person(parsed):
    for split in ("forget", "retain", "holdout"):
        pool = parsed.texts["forget"] + parsed.texts["retain"] if split != "holdout" else parsed.texts[split]
        for name, records in parsed.people[split].items():
            bios = [t for t in pool if name in t]
            assert len(bios) == 1, (name, len(bios))
            (bio,) = bios
            assert bio in parsed.texts[split], f"{name}'s biography is not in {split}.jsonl"
            for r in records:
                assert r["answer"] in bio, (name, r)


def test_each_person_has_facts_of_distinct_kinds(parsed):
    for split, group in parsed.people.items():
        for name, records in group.items():
            templates = [_template(r["question"]) for r in records]
            assert len(set(templates)) == len(templates), (split, name, templates)
            assert all(t.count("<NAME>") == 1 for t in templates)


def test_people_get_different_mixes_of_fact_kinds(parsed):
    mixes = {
        frozenset(_template(r["question"]) for r in records)
        for group in parsed.people.values()
        for records in group.values()
    }
    assert len(mixes) > 1


def test_answer_pools_are_large_enough_that_guessing_is_unlikely(tmp_path):
    p = Parsed(_write(tmp_path, people=200, facts_per_person=9, forget_frac=0.1, seed=0, general=5))
    answers: dict[str, list[str]] = {}
    for r in p.all_qa():
        answers.setdefault(_template(r["question"]), []).append(r["answer"])
    assert len(answers) == 9, sorted(answers)  # nine facts per person, all of distinct kinds
    for template, values in answers.items():
        distinct = Counter(values)
        assert len(distinct) >= 20, (template, len(distinct))
        # and no single answer dominates: the most common one is a small share of all draws
        assert distinct.most_common(1)[0][1] / len(values) <= 0.15, (template, distinct.most_common(3))


def test_an_answer_never_names_a_person_in_the_benchmark(parsed):
    everyone = {n for group in parsed.people.values() for n in group}
    for r in parsed.all_qa():
        assert r["answer"] not in everyone, r


# ------------------------------------------------------------------------------------------ bad arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"people": 1},
        {"people": 0},
        {"people": -5},
        {"facts_per_person": 0},
        {"facts_per_person": 10},
        {"forget_frac": 0.0},
        {"forget_frac": 1.0},
        {"forget_frac": -0.1},
        {"forget_frac": 1.5},
        {"holdout": 0},
        {"holdout": -1},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_bad_arguments_raise_config_error(kwargs):
    args = {"people": 20, "general": 5, **kwargs}
    with pytest.raises(ConfigError) as exc:
        synth_benchmark(**args)
    message = str(exc.value)
    assert message and "\n" not in message
    (option,) = kwargs
    assert option.replace("_", "-") in message, message


# ------------------------------------------------------------------------------------------------- CLI


def _synth_cli(out: Path, *extra: str) -> int:
    return main(["data", "synth", "--out", str(out), "--people", "20", *extra])


def test_cli_synth_writes_the_benchmark(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _synth_cli(out, "--seed", "3") == 0
    printed = capsys.readouterr()
    assert str(out) in printed.out
    assert printed.err == ""
    reference = tmp_path / "reference"
    synth_benchmark(people=20, seed=3).save(reference)
    assert _snapshot(out) == _snapshot(reference)
    assert json.loads((out / "meta.json").read_text())["seed"] == 3


def test_cli_synth_again_with_same_args_changes_nothing(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _synth_cli(out, "--seed", "3") == 0
    before, stats = _snapshot(out), _stats(out)
    capsys.readouterr()
    assert _synth_cli(out, "--seed", "3") == 0
    printed = capsys.readouterr()
    assert "nothing" in printed.out.lower()
    assert printed.err == ""
    assert _snapshot(out) == before
    assert _stats(out) == stats, "files were rewritten"


def test_cli_synth_refuses_to_replace_a_different_benchmark(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _synth_cli(out, "--seed", "3") == 0
    before, stats = _snapshot(out), _stats(out)
    capsys.readouterr()
    assert _synth_cli(out, "--seed", "4") == 2
    one_error_line(capsys.readouterr().err, str(out), "--overwrite")
    assert _snapshot(out) == before
    assert _stats(out) == stats


def test_cli_synth_refuses_a_folder_holding_other_files(tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _synth_cli(out) == 2
    assert capsys.readouterr().err.startswith("relapse: error: ")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_cli_synth_overwrite_replaces_a_different_benchmark(tmp_path, capsys):
    out = tmp_path / "bench"
    assert _synth_cli(out, "--seed", "3") == 0
    old = _snapshot(out)
    assert _synth_cli(out, "--seed", "4", "--overwrite") == 0
    assert capsys.readouterr().err == ""
    reference = tmp_path / "reference"
    synth_benchmark(people=20, seed=4).save(reference)
    assert _snapshot(out) == _snapshot(reference)
    assert _snapshot(out)["forget.jsonl"] != old["forget.jsonl"]


def test_cli_synth_bad_option_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["data", "synth", "--out", str(out), "--people", "1"]) == 2
    read_error_line(capsys, "--people")
    assert not out.exists()


def test_cli_synth_corrupt_meta_in_out_is_a_clean_error(tmp_path, capsys):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "meta.json").write_text("{not json")
    assert _synth_cli(out) == 2
    assert capsys.readouterr().err.startswith("relapse: error: ")


def test_cli_synth_out_is_a_file_is_a_clean_error(tmp_path, capsys):
    out = tmp_path / "bench"
    out.write_text("a file")
    assert _synth_cli(out) == 2
    assert capsys.readouterr().err.startswith("relapse: error: ")


def test_cli_synth_rerun_leaves_a_complete_benchmark(tmp_path):
    out = tmp_path / "bench"
    assert _synth_cli(out, "--seed", "3") == 0
    (out / "forget.jsonl").unlink()
    status = _synth_cli(out, "--seed", "3")
    # Either the rerun restores the files or it says the folder is broken; "nothing to do" is wrong.
    assert status == 2 or (status == 0 and (out / "forget.jsonl").exists())


# -------------------------------------------------------------------------------------- answer variants


def test_every_qa_pair_has_a_paraphrase_and_perturbed_answers_of_the_right_type(parsed):
    """The paraphrase holds the answer in other words; each perturbed answer is the same phrase around
    another person's value of the same fact kind (wrong, of the right type), never the true one."""
    values: dict[str, set[str]] = {}
    for r in parsed.all_qa():
        values.setdefault(_template(r["question"]), set()).add(r["answer"])
    for r in parsed.all_qa():
        paraphrase, perturbed = r["paraphrased_answer"], r["perturbed_answer"]
        assert r["answer"] in paraphrase and paraphrase != r["answer"], r
        assert isinstance(perturbed, list) and 1 <= len(perturbed) <= 4, r
        assert len(set(perturbed)) == len(perturbed), r
        start, end = paraphrase.split(r["answer"], 1)
        for wrong in perturbed:
            assert wrong.startswith(start) and wrong.endswith(end), (r, wrong)
            value = wrong[len(start) : len(wrong) - len(end)]
            assert value != r["answer"], r
            assert value in values[_template(r["question"])], (r, value)
    assert all(len(r["perturbed_answer"]) == 4 for r in parsed.all_qa())  # 60 people: enough values


def test_the_variants_load_and_their_words_are_in_the_tiny_models_vocabulary(tmp_path):
    from relapse.models.tiny import benchmark_corpus
    from relapse.models.tokenizer import build_tokenizer

    loaded = load_benchmark(_write(tmp_path, people=40, facts_per_person=3, seed=2))
    tokenizer = build_tokenizer(benchmark_corpus(loaded), "word")
    pairs = loaded.forget_qa + loaded.retain_qa + loaded.holdout_qa
    assert pairs and all(pair.has_variants for pair in pairs)
    for pair in pairs:
        for variant in (pair.paraphrased_answer, *pair.perturbed_answers):
            ids = tokenizer(" " + variant, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids, variant
