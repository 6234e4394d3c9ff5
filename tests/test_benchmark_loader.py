"""``load_benchmark``: a valid folder round-trips; every bad input is one clear ``DataError`` line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relapse.cli import main
from relapse.data import Benchmark, QAPair, benchmark_files, load_benchmark, synth_benchmark
from relapse.errors import DataError, RelapseError
from relapse.runtime import hash_files
from tests.conftest import one_error_line

REQUIRED_FILES = ("forget.jsonl", "retain.jsonl", "holdout.jsonl", "forget_qa.jsonl", "retain_qa.jsonl")
OPTIONAL_FILES = ("icl.jsonl", "general.jsonl", "holdout_qa.jsonl", "meta.json")


@pytest.fixture
def original() -> Benchmark:
    return synth_benchmark(people=20, facts_per_person=3, forget_frac=0.2, seed=1, general=8)


@pytest.fixture
def bench(tmp_path, original) -> Path:
    directory = tmp_path / "bench"
    original.save(directory)
    return directory


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def _write_lines(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _replace_line(path: Path, lineno: int, new: str) -> None:
    lines = _lines(path)
    lines[lineno - 1] = new
    _write_lines(path, lines)


def _append(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _data_error(directory: Path, *must_name: str) -> str:
    """Load ``directory``, expect one DataError line naming each of ``must_name``; return the message."""
    with pytest.raises(DataError) as exc:
        load_benchmark(directory)
    message = str(exc.value)
    assert message.strip(), "empty message"
    assert "\n" not in message, message
    for name in must_name:
        assert name in message, f"{name!r} not in {message!r}"
    return message


def _has_line(message: str, lineno: int) -> bool:
    return re.search(rf"\bline {lineno}\b", message) is not None


# ------------------------------------------------------------------------------------------- valid data


def test_valid_benchmark_round_trips(bench, original):
    loaded = load_benchmark(bench)
    assert isinstance(loaded, Benchmark)
    for name in ("forget", "retain", "holdout", "forget_qa", "retain_qa", "icl", "general", "holdout_qa"):
        assert getattr(loaded, name) == getattr(original, name), name
        assert getattr(loaded, name), f"{name} is empty; the round trip checks nothing"
    assert loaded.meta == original.meta
    assert all(isinstance(qa, QAPair) for qa in loaded.forget_qa + loaded.retain_qa + loaded.icl)
    assert Path(loaded.root) == bench


def test_accepts_a_str_path(bench, original):
    assert load_benchmark(str(bench)).forget == original.forget


def test_optional_files_may_be_absent(bench, original):
    for name in OPTIONAL_FILES:
        (bench / name).unlink()
    loaded = load_benchmark(bench)
    assert loaded.icl == [] and loaded.general == [] and loaded.holdout_qa == []
    assert loaded.meta == {}
    assert loaded.forget == original.forget
    assert loaded.retain_qa == original.retain_qa


def test_blank_lines_are_skipped(bench, original):
    forget = _lines(bench / "forget.jsonl")
    _write_lines(bench / "forget.jsonl", ["", *forget[:1], "   ", "\t", *forget[1:], "", ""])
    qa = _lines(bench / "retain_qa.jsonl")
    (bench / "retain_qa.jsonl").write_text("\n\n".join(qa) + "\n\n", encoding="utf-8")
    loaded = load_benchmark(bench)
    assert loaded.forget == original.forget
    assert loaded.retain_qa == original.retain_qa


def test_last_line_without_newline_and_crlf_are_read(bench, original):
    (bench / "retain.jsonl").write_text("\r\n".join(_lines(bench / "retain.jsonl")), encoding="utf-8")
    assert load_benchmark(bench).retain == original.retain


def test_extra_fields_are_ignored(bench, original):
    lines = [json.dumps({**json.loads(line), "source": "x"}) for line in _lines(bench / "forget_qa.jsonl")]
    _write_lines(bench / "forget_qa.jsonl", lines)
    assert load_benchmark(bench).forget_qa == original.forget_qa


def _strip_variants(directory: Path) -> None:
    """Make ``directory`` an old-format folder: QA records without the answer variants."""
    for name in ("forget_qa.jsonl", "retain_qa.jsonl", "holdout_qa.jsonl", "icl.jsonl"):
        records = [json.loads(line) for line in _lines(directory / name)]
        for record in records:
            record.pop("paraphrased_answer", None)
            record.pop("perturbed_answer", None)
        _write_lines(directory / name, [json.dumps(r) for r in records])


def test_the_answer_variants_round_trip(bench, original):
    loaded = load_benchmark(bench)
    assert all(qa.has_variants for qa in loaded.forget_qa + loaded.retain_qa)
    assert [qa.perturbed_answers for qa in loaded.forget_qa] == [
        qa.perturbed_answers for qa in original.forget_qa
    ]
    record = json.loads(_lines(bench / "forget_qa.jsonl")[0])
    assert isinstance(record["perturbed_answer"], list) and isinstance(record["paraphrased_answer"], str)


def test_an_old_folder_without_answer_variants_loads_and_saves_the_same_bytes(bench, original, tmp_path):
    _strip_variants(bench)
    loaded = load_benchmark(bench)
    assert [qa.question for qa in loaded.forget_qa] == [qa.question for qa in original.forget_qa]
    assert [qa.answer for qa in loaded.retain_qa] == [qa.answer for qa in original.retain_qa]
    assert not any(qa.has_variants or qa.paraphrased_answer for qa in loaded.forget_qa + loaded.retain_qa)
    assert loaded.is_saved_in(bench)  # no new fields appear when an old folder is written back


def test_a_single_perturbed_answer_string_is_read_as_a_list_of_one(bench):
    lines = _lines(bench / "forget_qa.jsonl")
    record = {**json.loads(lines[0]), "perturbed_answer": "a wrong answer"}
    _replace_line(bench / "forget_qa.jsonl", 1, json.dumps(record))
    assert load_benchmark(bench).forget_qa[0].perturbed_answers == ("a wrong answer",)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("paraphrased_answer", 3),
        ("paraphrased_answer", "  "),
        ("perturbed_answer", []),
        ("perturbed_answer", ["ok", ""]),
        ("perturbed_answer", ["ok", 5]),
        ("perturbed_answer", {"a": "b"}),
    ],
)
def test_a_bad_answer_variant_names_file_line_and_field(bench, field, value):
    lines = _lines(bench / "retain_qa.jsonl")
    _replace_line(bench / "retain_qa.jsonl", 2, json.dumps({**json.loads(lines[1]), field: value}))
    message = _data_error(bench, "retain_qa.jsonl", field)
    assert _has_line(message, 2), message


# ------------------------------------------------------------------------------------------- bad inputs


def test_missing_folder(tmp_path):
    missing = tmp_path / "no-such-benchmark"
    message = _data_error(missing, str(missing))
    assert "exist" in message


def test_data_error_is_a_relapse_error(tmp_path):
    with pytest.raises(RelapseError):
        load_benchmark(tmp_path / "nope")


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_required_file_missing(bench, name):
    (bench / name).unlink()
    message = _data_error(bench, str(bench / name))
    assert "missing" in message


@pytest.mark.parametrize("name", ["forget.jsonl", "holdout.jsonl", "retain_qa.jsonl", "icl.jsonl"])
def test_bad_json_line_names_file_and_line(bench, name):
    _replace_line(bench / name, 3, '{"text": "unterminated')
    message = _data_error(bench, name)
    assert _has_line(message, 3), message
    assert not _has_line(message, 1) and not _has_line(message, 2), message
    assert "JSON" in message


def test_line_numbers_count_blank_lines(bench):
    lines = _lines(bench / "retain.jsonl")
    _write_lines(bench / "retain.jsonl", [lines[0], "", "", "{oops", *lines[1:]])
    message = _data_error(bench, "retain.jsonl")
    assert _has_line(message, 4), message


def test_bad_meta_json(bench):
    (bench / "meta.json").write_text("{not json", encoding="utf-8")
    _data_error(bench, "meta.json")


@pytest.mark.parametrize("line", ['["a list"]', '"just a string"', "42", "null"])
def test_json_line_that_is_not_an_object(bench, line):
    _replace_line(bench / "forget_qa.jsonl", 2, line)
    message = _data_error(bench, "forget_qa.jsonl")
    assert _has_line(message, 2), message
    assert "object" in message


@pytest.mark.parametrize(
    ("name", "record", "field"),
    [
        ("forget.jsonl", {"txt": "a misspelt key"}, "text"),
        ("holdout.jsonl", {}, "text"),
        ("forget_qa.jsonl", {"answer": "Paris"}, "question"),
        ("retain_qa.jsonl", {"question": "Who wrote this test?"}, "answer"),
        ("icl.jsonl", {"question": "Where?"}, "answer"),
        ("general.jsonl", {"body": "general text"}, "text"),
    ],
)
def test_missing_field(bench, name, record, field):
    _append(bench / name, record)
    lineno = len(_lines(bench / name))
    message = _data_error(bench, name, field)
    assert _has_line(message, lineno), message


@pytest.mark.parametrize(
    ("name", "record", "field"),
    [
        ("forget.jsonl", {"text": 5}, "text"),
        ("retain.jsonl", {"text": ["a", "b"]}, "text"),
        ("forget_qa.jsonl", {"question": None, "answer": "x"}, "question"),
        ("retain_qa.jsonl", {"question": "What is six times seven?", "answer": 42}, "answer"),
        ("holdout_qa.jsonl", {"question": "Q?", "answer": {"a": 1}}, "answer"),
    ],
)
def test_non_string_field(bench, name, record, field):
    _append(bench / name, record)
    lineno = len(_lines(bench / name))
    message = _data_error(bench, name, field)
    assert _has_line(message, lineno), message


@pytest.mark.parametrize("content", ["", "\n", "\n   \n\t\n"], ids=["empty", "newline", "blank-lines"])
def test_empty_forget_set(bench, content):
    (bench / "forget.jsonl").write_text(content, encoding="utf-8")
    message = _data_error(bench, "forget.jsonl")
    assert "empty" in message


def test_empty_optional_file_is_allowed(bench):
    (bench / "holdout_qa.jsonl").write_text("", encoding="utf-8")
    assert load_benchmark(bench).holdout_qa == []


@pytest.mark.parametrize(
    ("source", "target"),
    [("forget.jsonl", "retain.jsonl"), ("forget.jsonl", "holdout.jsonl"), ("retain.jsonl", "holdout.jsonl")],
)
def test_text_in_two_splits(bench, source, target):
    shared = json.loads(_lines(bench / source)[1])["text"]
    _append(bench / target, {"text": shared})
    _data_error(bench, source, target)


def test_text_in_two_splits_despite_surrounding_whitespace(bench):
    shared = json.loads(_lines(bench / "forget.jsonl")[0])["text"]
    _append(bench / "retain.jsonl", {"text": f"  {shared}\n"})
    _data_error(bench, "forget.jsonl", "retain.jsonl")


def test_question_in_forget_qa_and_retain_qa(bench):
    question = json.loads(_lines(bench / "forget_qa.jsonl")[0])["question"]
    _append(bench / "retain_qa.jsonl", {"question": question, "answer": "a different answer"})
    _data_error(bench, "forget_qa.jsonl", "retain_qa.jsonl")


def test_overlap_message_stays_one_line_for_multiline_text(bench):
    text = "first line\nsecond line\n\nthird paragraph " + "x" * 200
    _append(bench / "forget.jsonl", {"text": text})
    _append(bench / "retain.jsonl", {"text": text})
    message = _data_error(bench, "forget.jsonl", "retain.jsonl")
    assert len(message) < 600, message


def test_non_utf8_file(bench):
    (bench / "retain.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    _data_error(bench, "retain.jsonl")


def test_data_file_that_is_a_folder(bench):
    (bench / "forget.jsonl").unlink()
    (bench / "forget.jsonl").mkdir()
    _data_error(bench, "forget.jsonl")


# ------------------------------------------------------------------------------- utility QA sets (TOFU)

#: The files of a folder without utility QA sets, in the order benchmark_files listed them before the sets
#: existed (the order the data hash, and so every trained model's cache key, depends on).
FILES_BEFORE_UTILITY_SETS = (
    *REQUIRED_FILES,
    "icl.jsonl",
    "holdout_qa.jsonl",
    "general.jsonl",
    "verbmem.jsonl",
    "mia_forget.jsonl",
    "mia_holdout.jsonl",
)

UTILITY_RECORDS = [
    {"question": "Who wrote Hamlet?", "answer": "Shakespeare", "perturbed_answer": ["Marlowe", "Jonson"]},
    {"question": "Capital of France?", "answer": "Paris", "perturbed_answer": ["Lyon"]},
]


def _write_utility(directory: Path, name: str, records: list[dict] = UTILITY_RECORDS) -> Path:
    path = directory / f"utility_{name}_qa.jsonl"
    _write_lines(path, [json.dumps(r) for r in records])
    return path


def test_a_folder_without_utility_sets_keeps_its_file_list_and_data_hash(bench, original):
    """benchmark_files of an old folder (with every optional file, and the built-in benchmark's own
    folder) lists what it listed before utility QA sets existed, in that order, so its hash is unchanged."""
    assert [p.name for p in benchmark_files(bench)] == [
        name for name in FILES_BEFORE_UTILITY_SETS if (bench / name).exists()
    ]
    assert load_benchmark(bench).utility_qa == {} and original.utility_qa == {}
    assert not any(name.startswith("utility_") for name in original.file_contents())
    (bench / "verbmem.jsonl").write_text('{"prompt": "a", "gt": "b"}\n', encoding="utf-8")
    for name in ("mia_forget.jsonl", "mia_holdout.jsonl"):
        (bench / name).write_text('{"text": "t"}\n', encoding="utf-8")
    listed = benchmark_files(bench)
    assert [p.name for p in listed] == list(FILES_BEFORE_UTILITY_SETS)
    assert hash_files(listed) == hash_files([bench / name for name in FILES_BEFORE_UTILITY_SETS])


def test_utility_sets_are_hashed_last_by_name_only_when_present(bench):
    before = hash_files(benchmark_files(bench))
    _write_utility(bench, "world_facts")
    _write_utility(bench, "real_authors")
    names = [p.name for p in benchmark_files(bench)]
    assert names[-2:] == ["utility_real_authors_qa.jsonl", "utility_world_facts_qa.jsonl"]
    assert hash_files(benchmark_files(bench)) != before
    for path in bench.glob("utility_*"):
        path.unlink()
    assert hash_files(benchmark_files(bench)) == before


def test_utility_sets_load_save_and_round_trip(bench, original, tmp_path):
    _write_utility(bench, "real_authors")
    _write_utility(bench, "world_facts", UTILITY_RECORDS[1:])
    loaded = load_benchmark(bench)
    assert list(loaded.utility_qa) == ["real_authors", "world_facts"]
    assert loaded.utility_qa["real_authors"] == [
        QAPair("Who wrote Hamlet?", "Shakespeare", perturbed_answers=("Marlowe", "Jonson")),
        QAPair("Capital of France?", "Paris", perturbed_answers=("Lyon",)),
    ]
    assert loaded.forget_qa == original.forget_qa and loaded.general == original.general
    assert loaded.is_saved_in(bench)
    assert not original.is_saved_in(bench)  # loading the folder would add the sets the benchmark lacks
    loaded.save(tmp_path / "copy")
    assert load_benchmark(tmp_path / "copy").utility_qa == loaded.utility_qa
    assert benchmark_files(tmp_path / "copy")[-1].name == "utility_world_facts_qa.jsonl"


@pytest.mark.parametrize("name", ["Real", "forget", "retain", "holdout", "", "1st", "with-dash"])
def test_a_bad_utility_set_name_is_one_line(bench, name):
    path = _write_utility(bench, name)
    message = _data_error(bench, path.name, "utility QA set")
    assert repr(name) in message


def test_a_utility_question_without_perturbed_answers_names_file_and_line(bench):
    records = [*UTILITY_RECORDS, {"question": "Largest ocean?", "answer": "Pacific"}]
    path = _write_utility(bench, "world_facts", records)
    message = _data_error(bench, path.name, "perturbed_answer")
    assert _has_line(message, 3), message


@pytest.mark.parametrize("value", [[], "", ["ok", 3]])
def test_a_bad_utility_perturbed_answer_names_file_and_line(bench, value):
    records = [UTILITY_RECORDS[0], {**UTILITY_RECORDS[1], "perturbed_answer": value}]
    path = _write_utility(bench, "world_facts", records)
    message = _data_error(bench, path.name, "perturbed_answer")
    assert _has_line(message, 2), message


def test_an_empty_utility_set_is_refused(bench):
    path = _write_utility(bench, "world_facts", [])
    message = _data_error(bench, path.name)
    assert "no questions" in message


def test_a_utility_set_built_in_python_is_validated(original):
    original.utility_qa = {"world_facts": [QAPair("Capital of France?", "Paris")]}
    with pytest.raises(DataError, match=r"utility_world_facts_qa\.jsonl record 1: no 'perturbed_answer'"):
        original.validate()
    original.utility_qa = {"Bad Name": [QAPair("q?", "a", perturbed_answers=("b",))]}
    with pytest.raises(DataError, match="cannot name a utility QA set"):
        original.validate()


# ---------------------------------------------------------------------------------------------- the CLI


def _train(data: Path, out: Path) -> int:
    return main(["train", "--data", str(data), "--out", str(out), "--quiet"])


def test_cli_train_missing_file(bench, tmp_path, capsys):
    (bench / "retain_qa.jsonl").unlink()
    out = tmp_path / "m"
    assert _train(bench, out) == 2
    printed = capsys.readouterr()
    one_error_line(printed.err, "retain_qa.jsonl")
    assert not out.exists(), "a model folder was created from a broken benchmark"


def test_cli_train_bad_json_line(bench, tmp_path, capsys):
    _replace_line(bench / "forget.jsonl", 2, "{broken")
    out = tmp_path / "m"
    assert _train(bench, out) == 2
    line = one_error_line(capsys.readouterr().err, "forget.jsonl")
    assert _has_line(line, 2), line
    assert not out.exists()


def test_cli_train_missing_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert _train(missing, tmp_path / "m") == 2
    one_error_line(capsys.readouterr().err, str(missing))


def test_cli_train_overlapping_splits(bench, tmp_path, capsys):
    _append(bench / "retain.jsonl", {"text": json.loads(_lines(bench / "forget.jsonl")[0])["text"]})
    assert _train(bench, tmp_path / "m") == 2
    one_error_line(capsys.readouterr().err, "forget.jsonl", "retain.jsonl")


def test_cli_train_bad_benchmark_in_a_subprocess(bench, tmp_path):
    _replace_line(bench / "holdout.jsonl", 1, '{"text": 7}')
    out = tmp_path / "m"
    proc = subprocess.run(
        [sys.executable, "-m", "relapse", "train", "--data", str(bench), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("relapse:")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("relapse: error: ")
    assert "holdout.jsonl" in errors[0] and _has_line(errors[0], 1) and "text" in errors[0]
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert not out.exists()
