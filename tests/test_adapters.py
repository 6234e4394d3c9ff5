"""Converters and ``relapse data convert``: tiny MUSE, TOFU and text/JSONL layouts written here by hand.

Each conversion is read back with ``load_benchmark`` and compared with exact expected contents, so the
tests check what lands in the folder, not the converters' internals.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from relapse.cli import main
from relapse.data import load_benchmark
from relapse.data.benchmark import QAPair, VerbMemItem
from relapse.data.converters import from_hf, from_muse, from_text, from_tofu
from relapse.errors import ConfigError, DataError
from tests.conftest import read_error_line

# ---------------------------------------------------------------------------------------------- helpers


def _convert(*argv: str | Path) -> int:
    return main(["data", "convert", *[str(a) for a in argv]])


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _json(path: Path, obj) -> Path:
    return _write(path, json.dumps(obj))


def _jsonl(path: Path, records: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


def _qa(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"question": q, "answer": a} for q, a in pairs]


def _pairs(records: list[dict[str, str]]) -> list[QAPair]:
    return [QAPair(r["question"], r["answer"]) for r in records]


def _same(a, b) -> None:
    for name in ("forget", "retain", "holdout", "forget_qa", "retain_qa", "icl", "general", "holdout_qa"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.verbmem == b.verbmem
    assert a.mia_forget == b.mia_forget and a.mia_holdout == b.mia_holdout
    assert a.utility_qa == b.utility_qa
    assert a.meta == b.meta


FORGET_QA = _qa(("Who wrote F1?", "Ann"))
RETAIN_QA = _qa(("Who wrote R1?", "Bob"), ("Where is R2?", "Oslo"))
FORGET_ICL = _qa(("Icl q1?", "a1"), ("Icl q2?", "a2"))
VERBMEM = [{"prompt": "Doc F1 line one.", "gt": " Line two of F1."}]
RAW_FORGET = ["Doc F1 line one.\nLine two of F1.", "Doc F2 alone.", "Doc F3 last."]
PRIV_FORGET = ["Privleak forget one.", "Privleak forget two."]
PRIV_HOLDOUT = ["Privleak holdout one."]
RAW_HOLDOUT = ["Holdout a.", "Holdout b."]


@pytest.fixture
def news(tmp_path) -> Path:
    """A MUSE news-like corpus: raw (txt and json), knowmem, verbmem, privleak and a scal fold."""
    root = tmp_path / "muse" / "news"
    # blank lines separate documents; a run of blank lines (one with spaces) is one separator
    _write(
        root / "raw/forget.txt", "Doc F1 line one.\nLine two of F1.\n\nDoc F2 alone.\n\n\n  \nDoc F3 last.\n"
    )
    _write(root / "raw/retain1.txt", "Retain one a.\n\nRetain one b.\n")
    _json(root / "raw/retain2.json", ["Retain two a.\n\nstill the same document", "Retain two b."])
    _write(root / "raw/holdout.txt", "Holdout a.\n\nHoldout b.\n")
    _json(root / "knowmem/forget_qa.json", FORGET_QA)
    _json(root / "knowmem/retain_qa.json", RETAIN_QA)
    _json(root / "knowmem/forget_qa_icl.json", FORGET_ICL)
    _json(root / "knowmem/retain_qa_icl.json", _qa(("Other icl?", "x")))
    _json(root / "verbmem/forget.json", VERBMEM)
    _json(root / "privleak/forget.json", PRIV_FORGET)
    _json(root / "privleak/retain.json", ["Retain one a."])
    _json(root / "privleak/holdout.json", PRIV_HOLDOUT)
    _write(root / "scal/forget_2.txt", "Scal doc one.\n\nScal doc two.\n")
    return root


@pytest.fixture
def books(tmp_path) -> Path:
    """A MUSE books-like corpus: raw only (no knowmem, no privleak, no verbmem)."""
    root = tmp_path / "muse" / "books"
    _write(root / "raw/forget.txt", "Chapter one.\n\nChapter two.\n")
    _write(root / "raw/retain1.txt", "Other book one.\n")
    _write(root / "raw/retain2.txt", "Other book two.\n")
    _write(root / "raw/holdout.txt", "Unseen book.\n")
    return root


TOFU_FORGET = _qa(("Who is Ava Lind?", "A novelist."), ("Where was Ava Lind born?", "In Kiev."))
TOFU_RETAIN = _qa(("Who is Bo Ek?", "A poet."), ("What did Bo Ek write?", "Sonnets."))
TOFU_HOLDOUT = _qa(
    ("Who is Cy Moe?", "A critic."),
)


@pytest.fixture
def tofu(tmp_path) -> Path:
    """A TOFU-like folder: JSONL under .json names, extra fields, utility and perturbed sets."""
    root = tmp_path / "tofu"
    _jsonl(root / "forget01.json", [dict(r, paraphrased_question="pq") for r in TOFU_FORGET])
    _jsonl(root / "retain99.json", TOFU_RETAIN)
    _jsonl(root / "holdout01.json", TOFU_HOLDOUT)
    # TOFU's general-knowledge sets: real_authors' perturbed answers only in real_authors_perturbed (as
    # TOFU ships them), world_facts' in the records themselves, one of them without any
    _jsonl(root / "real_authors.json", _qa(("Who wrote Hamlet?", "Shakespeare.")))
    _jsonl(
        root / "real_authors_perturbed.json",
        [
            dict(r, perturbed_answer=["Marlowe.", "Jonson."])
            for r in _qa(("Who wrote Hamlet?", "Shakespeare."))
        ],
    )
    _json(  # a JSON list works too
        root / "world_facts.json",
        [
            {"question": "Capital of France?", "answer": "Paris.", "perturbed_answer": ["Lyon.", "Nice."]},
            {"question": "Largest ocean?", "answer": "Pacific."},
        ],
    )
    # TOFU's answer variants: every forget question in forget01_perturbed, a subset of retain in
    # retain_perturbed (as in TOFU, whose retain_perturbed holds 400 of the retain questions)
    _jsonl(
        root / "forget01_perturbed.json",
        [
            dict(r, paraphrased_answer=f"p{i}", perturbed_answer=[f"w{i}a", f"w{i}b"])
            for i, r in enumerate(TOFU_FORGET)
        ],
    )
    _jsonl(
        root / "retain_perturbed.json",
        [dict(TOFU_RETAIN[1], paraphrased_answer="rp", perturbed_answer=["rw1", "rw2", "rw3"])],
    )
    return root


# ------------------------------------------------------------------------------------------------- MUSE


def test_muse_news_raw_texts_privleak_membership_and_knowmem(news, tmp_path):
    bench = from_muse(news)
    assert bench.forget == RAW_FORGET  # unlearning uses all of raw/forget
    assert bench.holdout == RAW_HOLDOUT
    assert bench.mia_forget == PRIV_FORGET  # membership inference compares MUSE's PrivLeak lists
    assert bench.mia_holdout == PRIV_HOLDOUT
    assert bench.retain == [
        "Retain one a.",
        "Retain one b.",
        "Retain two a.\n\nstill the same document",
        "Retain two b.",
    ]
    assert bench.forget_qa == _pairs(FORGET_QA)
    assert bench.retain_qa == _pairs(RETAIN_QA)
    assert bench.icl == _pairs(FORGET_ICL)
    assert bench.verbmem == [VerbMemItem(**VERBMEM[0])]
    assert bench.general == [] and bench.holdout_qa == []
    meta = bench.meta
    assert meta["format"] == "relapse-benchmark"
    assert meta["converted_from"] == "muse"
    assert meta["source"] == str(news)
    assert meta["muse_corpus"] == "news" and meta["fold"] is None
    assert "texts" not in meta
    assert "knowmem_prompt" not in meta  # MUSE's few-shot prompt is relapse's default
    assert meta["files"]["forget"] == ["raw/forget.txt"]
    assert meta["files"]["holdout"] == ["raw/holdout.txt"]
    assert meta["files"]["mia_forget"] == ["privleak/forget.json"]
    assert meta["files"]["mia_holdout"] == ["privleak/holdout.json"]
    assert list(meta["files"])[-2:] == ["mia_forget", "mia_holdout"]
    assert meta["files"]["retain"] == ["raw/retain1.txt", "raw/retain2.json"]
    assert meta["files"]["icl"] == ["knowmem/forget_qa_icl.json"]
    notes = " ".join(meta["notes"])
    assert "retain_qa_icl" in notes and "general.jsonl" in notes
    assert "privleak/forget and privleak/holdout" in notes and "privleak/retain.json is not used" in notes
    assert meta["counts"] == {
        "forget": 3, "retain": 4, "holdout": 2, "forget_qa": 1, "retain_qa": 2,
        "icl": 2, "general": 0, "holdout_qa": 0, "verbmem": 1, "mia_forget": 2, "mia_holdout": 1,
    }  # fmt: skip

    out = tmp_path / "out"
    bench.save(out)
    assert [json.loads(line)["text"] for line in (out / "mia_forget.jsonl").read_text().splitlines()] == (
        PRIV_FORGET
    )
    assert (out / "mia_holdout.jsonl").exists()
    loaded = load_benchmark(out)
    assert loaded.mia_forget == PRIV_FORGET and loaded.mia_holdout == PRIV_HOLDOUT
    _same(loaded, bench)


def test_muse_raw_texts_split_documents_on_blank_lines(news):
    bench = from_muse(news)
    assert bench.forget == RAW_FORGET
    assert bench.holdout == RAW_HOLDOUT


def test_muse_privleak_sample_of_raw_forget_is_not_an_overlap(news, tmp_path):
    """privleak/forget is a sample of raw/forget in MUSE by design; a missing list falls back."""
    _json(news / "privleak/forget.json", RAW_FORGET[1:])
    (news / "privleak/holdout.json").unlink()
    bench = from_muse(news)
    assert bench.forget == RAW_FORGET and bench.mia_forget == RAW_FORGET[1:]
    assert bench.mia_holdout == [] and "mia_holdout" not in bench.meta["files"]
    assert any("no privleak/holdout.json" in n for n in bench.meta["notes"])
    assert _convert("--from", "muse", news, "--out", tmp_path / "out") == 0
    assert (tmp_path / "out/mia_forget.jsonl").exists()
    assert not (tmp_path / "out/mia_holdout.jsonl").exists()
    _same(load_benchmark(tmp_path / "out"), bench)


def test_muse_fold_replaces_forget_texts(news):
    bench = from_muse(news, fold="scal/forget_2")
    assert bench.forget == ["Scal doc one.", "Scal doc two."]
    assert bench.holdout == RAW_HOLDOUT
    assert bench.mia_forget == PRIV_FORGET and bench.mia_holdout == PRIV_HOLDOUT  # PrivLeak's lists stay
    assert bench.forget_qa == _pairs(FORGET_QA)  # knowmem still refers to the base forget set
    assert bench.meta["fold"] == "scal/forget_2"
    assert bench.meta["files"]["forget"] == ["scal/forget_2.txt"]


def test_evaluator_texts_use_membership_lists_else_forget_and_holdout(news, books):
    from relapse.metrics.engine import Evaluator

    evaluator = Evaluator(None, None, from_muse(news))  # texts() only reads the benchmark
    assert evaluator.texts("mia_forget") == PRIV_FORGET
    assert evaluator.texts("mia_holdout") == PRIV_HOLDOUT
    assert evaluator.texts("mia_forget:lower") == [t.lower() for t in PRIV_FORGET]
    assert evaluator.texts("forget") == RAW_FORGET

    plain = Evaluator(None, None, from_muse(books))  # no privleak/: no membership lists
    assert plain.benchmark.mia_forget == [] and plain.benchmark.mia_holdout == []
    assert plain.texts("mia_forget") == ["Chapter one.", "Chapter two."]
    assert plain.texts("mia_holdout") == ["Unseen book."]
    assert plain.texts("mia_forget:lower") == ["chapter one.", "chapter two."]


def test_muse_books_without_knowmem(books, tmp_path):
    bench = from_muse(books)
    assert bench.forget == ["Chapter one.", "Chapter two."]
    assert bench.retain == ["Other book one.", "Other book two."]
    assert bench.holdout == ["Unseen book."]
    assert bench.forget_qa == [] and bench.retain_qa == [] and bench.icl == [] and bench.verbmem == []
    assert bench.mia_forget == [] and bench.mia_holdout == []
    assert "mia_forget" not in bench.meta["files"] and "mia_holdout" not in bench.meta["files"]
    assert bench.meta["muse_corpus"] == "books"
    assert any("no knowmem/" in n for n in bench.meta["notes"])
    assert any("no privleak/ folder" in n for n in bench.meta["notes"])
    assert _convert("--from", "muse", books, "--out", tmp_path / "out") == 0
    loaded = load_benchmark(tmp_path / "out")
    _same(loaded, bench)
    assert (tmp_path / "out/forget_qa.jsonl").read_text() == ""
    assert not (tmp_path / "out/verbmem.jsonl").exists()
    assert not (tmp_path / "out/mia_forget.jsonl").exists()
    assert not (tmp_path / "out/mia_holdout.jsonl").exists()


def test_cli_muse_convert_rerun_refuse_and_overwrite(news, books, tmp_path, capsys):
    out = tmp_path / "out"
    assert _convert("--from", "muse", news, "--out", out) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}: 3 forget, 4 retain, 2 holdout texts")
    assert "2 mia_forget, 1 mia_holdout" in printed
    _same(load_benchmark(out), from_muse(news))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    assert _convert("--from", "muse", news, "--out", out) == 0  # same source and options: nothing to do
    assert "nothing to do" in capsys.readouterr().out

    assert _convert("--from", "muse", news, "--out", out, "--fold", "scal/forget_2") == 2
    assert "pass --overwrite" in read_error_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert _convert("--from", "muse", news, "--out", out, "--fold", "scal/forget_2", "--overwrite") == 0
    assert load_benchmark(out).forget == ["Scal doc one.", "Scal doc two."]

    # a benchmark without verbmem and mia lists replaces one with them: the stale files go too
    stale = ("verbmem.jsonl", "mia_forget.jsonl", "mia_holdout.jsonl")
    assert all((out / name).exists() for name in stale)
    assert _convert("--from", "muse", books, "--out", out, "--overwrite") == 0
    assert not any((out / name).exists() for name in stale)
    _same(load_benchmark(out), from_muse(books))


def test_cli_muse_corpus_and_no_texts_option(news, tmp_path, capsys):
    assert _convert("--from", "muse", news, "--out", tmp_path / "o", "--corpus", "books") == 0
    loaded = load_benchmark(tmp_path / "o")
    assert loaded.forget == RAW_FORGET and loaded.mia_forget == PRIV_FORGET
    assert loaded.meta["muse_corpus"] == "books"
    with pytest.raises(TypeError):
        from_muse(news, texts="raw")  # type: ignore[call-arg]
    try:
        status = _convert("--from", "muse", news, "--out", tmp_path / "o2", "--texts", "raw")
    except SystemExit as exc:  # argparse refuses an unknown option
        status = exc.code
    assert status == 2
    assert "--texts" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda r: shutil.rmtree(r / "raw"), "raw: folder missing"),
        (
            lambda r: _write(r / "knowmem/forget_qa.json", json.dumps({"data": []}, indent=2)),
            "forget_qa.json: expected a JSON list of records or one JSON record per line",
        ),
        (lambda r: _json(r / "knowmem/retain_qa.json", ["just a string"]), "retain_qa.json item 1: expected"),
        (
            lambda r: _json(r / "verbmem/forget.json", [{"prompt": "p"}]),
            "forget.json item 1: missing field 'gt'",
        ),
        (lambda r: _json(r / "privleak/holdout.json", ["ok", ""]), "holdout.json item 2: empty text"),
        (lambda r: _write(r / "knowmem/forget_qa.json", "[{"), "forget_qa.json line 1: invalid JSON"),
        (lambda r: (r / "knowmem/retain_qa.json").unlink(), "retain_qa.json: file missing"),
        (lambda r: (r / "raw/holdout.txt").unlink(), "raw/holdout.txt: file missing (nor holdout.json)"),
        (lambda r: (r / "raw/forget.txt").unlink(), "raw/forget.txt: file missing (nor forget.json)"),
        (lambda r: _write(r / "raw/forget.txt", "Retain one b.\n"), "hold the same text"),
        (lambda r: _json(r / "privleak/forget.json", ["ok", 3]), "privleak/forget.json item 2: expected"),
        (lambda r: _json(r / "privleak/forget.json", []), "privleak/forget.json: no texts"),
    ],
)
def test_muse_bad_input_is_one_line_naming_the_file(news, tmp_path, capsys, damage, expected):
    damage(news)
    assert _convert("--from", "muse", news, "--out", tmp_path / "out") == 2
    line = read_error_line(capsys)
    assert expected in line, line
    assert not (tmp_path / "out").exists()


def test_muse_missing_folder(tmp_path, capsys):
    assert _convert("--from", "muse", tmp_path / "nowhere", "--out", tmp_path / "out") == 2
    assert f"MUSE corpus folder {tmp_path / 'nowhere'} does not exist" in read_error_line(capsys)


def test_muse_overlap_names_the_source_files(news):
    _json(news / "raw/forget.json", ["Retain two b."])  # .json is preferred over raw/forget.txt
    with pytest.raises(DataError) as info:
        from_muse(news)
    message = str(info.value)
    assert "forget.jsonl record 1 and retain.jsonl record 4 hold the same text" in message
    assert "raw/forget.json" in message and "raw/retain2.json" in message


def test_muse_bad_fold_and_missing_fold(news):
    with pytest.raises(ConfigError, match="scal/forget_2"):
        from_muse(news, fold="forget_2")
    with pytest.raises(DataError, match=r"sust/forget_1\.txt: file missing"):
        from_muse(news, fold="sust/forget_1")


# ------------------------------------------------------------------------------------------------- TOFU


def test_tofu_forget_retain_holdout_general(tofu, tmp_path):
    bench = from_tofu(tofu, forget="forget01")
    assert bench.forget == ["Who is Ava Lind? A novelist.", "Where was Ava Lind born? In Kiev."]
    assert bench.retain == ["Who is Bo Ek? A poet.", "What did Bo Ek write? Sonnets."]
    assert bench.holdout == ["Who is Cy Moe? A critic."]
    assert _plain(bench.forget_qa) == _pairs(TOFU_FORGET)
    assert _plain(bench.retain_qa) == _pairs(TOFU_RETAIN)
    assert bench.holdout_qa == _pairs(TOFU_HOLDOUT)
    assert bench.general == [
        "Who wrote Hamlet? Shakespeare.",
        "Capital of France? Paris.",
        "Largest ocean? Pacific.",
    ]
    assert bench.icl == [] and bench.verbmem == []
    assert bench.meta["converted_from"] == "tofu" and bench.meta["forget_split"] == "forget01"
    assert bench.meta["files"]["retain"] == ["retain99.json"]
    assert _convert("--from", "tofu", tofu, "--forget-split", "forget01", "--out", tmp_path / "o") == 0
    _same(load_benchmark(tmp_path / "o"), bench)


def _plain(pairs: list[QAPair]) -> list[QAPair]:
    return [QAPair(p.question, p.answer) for p in pairs]


def test_tofu_keeps_the_answer_variants(tofu, tmp_path):
    """paraphrased_answer and perturbed_answer come from forgetNN_perturbed and retain_perturbed, by
    question (a retain question without them stays without), and survive the folder's round trip."""
    bench = from_tofu(tofu, forget="forget01")
    assert [(p.paraphrased_answer, p.perturbed_answers) for p in bench.forget_qa] == [
        ("p0", ("w0a", "w0b")),
        ("p1", ("w1a", "w1b")),
    ]
    assert [(p.paraphrased_answer, p.perturbed_answers) for p in bench.retain_qa] == [
        (None, ()),
        ("rp", ("rw1", "rw2", "rw3")),
    ]
    assert bench.meta["files"]["forget_qa"] == ["forget01.json", "forget01_perturbed.json"]
    assert bench.meta["files"]["retain_qa"] == ["retain99.json", "retain_perturbed.json"]
    assert bench.meta["files"]["retain"] == ["retain99.json"]
    assert any("1 of 2 questions" in note for note in bench.meta["notes"])
    bench.save(tmp_path / "o")
    record = json.loads((tmp_path / "o/forget_qa.jsonl").read_text().splitlines()[0])
    assert record["paraphrased_answer"] == "p0" and record["perturbed_answer"] == ["w0a", "w0b"]
    assert load_benchmark(tmp_path / "o").retain_qa == bench.retain_qa


def test_tofu_variants_in_the_forget_file_itself_are_kept(tofu):
    """A forget file that holds the variants (TOFU's forgetNN_perturbed given as the forget split's file)
    keeps them without a *_perturbed file beside it."""
    (tofu / "forget01_perturbed.json").rename(tofu / "forget01.json")
    bench = from_tofu(tofu, forget="forget01")
    assert [p.perturbed_answers for p in bench.forget_qa] == [("w0a", "w0b"), ("w1a", "w1b")]
    assert bench.meta["files"]["forget_qa"] == ["forget01.json"]


def test_tofu_keeps_real_authors_and_world_facts_as_utility_qa_sets(tofu, tmp_path):
    """Their questions with perturbed answers (from the records, else from *_perturbed by question) become
    utility QA sets of the same names, and every question stays a general text."""
    bench = from_tofu(tofu, forget="forget01")
    assert bench.utility_qa == {
        "real_authors": [
            QAPair("Who wrote Hamlet?", "Shakespeare.", perturbed_answers=("Marlowe.", "Jonson."))
        ],
        "world_facts": [QAPair("Capital of France?", "Paris.", perturbed_answers=("Lyon.", "Nice."))],
    }
    assert len(bench.general) == 3  # "Largest ocean?" has no options: general text only
    files = bench.meta["files"]
    assert files["utility_real_authors_qa"] == ["real_authors.json", "real_authors_perturbed.json"]
    assert files["utility_world_facts_qa"] == ["world_facts.json"]
    assert files["general"] == ["real_authors.json", "world_facts.json"]
    assert list(files)[-2:] == ["utility_real_authors_qa", "utility_world_facts_qa"]
    counts = bench.meta["counts"]
    assert counts["utility_real_authors_qa"] == 1 and counts["utility_world_facts_qa"] == 1
    assert any("1 of 2 world_facts questions" in note for note in bench.meta["notes"])

    out = tmp_path / "o"
    assert _convert("--from", "tofu", tofu, "--forget-split", "forget01", "--out", out) == 0
    record = json.loads((out / "utility_real_authors_qa.jsonl").read_text().splitlines()[0])
    assert record == {
        "question": "Who wrote Hamlet?",
        "answer": "Shakespeare.",
        "perturbed_answer": ["Marlowe.", "Jonson."],
    }
    _same(load_benchmark(out), bench)

    # a later conversion without world_facts removes the stale utility file with --overwrite
    (tofu / "world_facts.json").unlink()
    assert _convert("--from", "tofu", tofu, "--forget-split", "forget01", "--out", out, "--overwrite") == 0
    assert not (out / "utility_world_facts_qa.jsonl").exists()
    assert list(load_benchmark(out).utility_qa) == ["real_authors"]


def test_tofu_utility_set_from_the_perturbed_file_alone(tofu):
    (tofu / "real_authors.json").unlink()
    bench = from_tofu(tofu, forget="forget01")
    assert bench.utility_qa["real_authors"][0].perturbed_answers == ("Marlowe.", "Jonson.")
    assert bench.meta["files"]["utility_real_authors_qa"] == ["real_authors_perturbed.json"]
    assert bench.general[0] == "Who wrote Hamlet? Shakespeare."


def test_tofu_without_perturbed_utility_answers_writes_no_utility_set(tofu, tmp_path):
    (tofu / "real_authors_perturbed.json").unlink()
    _json(tofu / "world_facts.json", _qa(("Capital of France?", "Paris.")))
    bench = from_tofu(tofu, forget="forget01")
    assert bench.utility_qa == {}
    assert bench.general == ["Who wrote Hamlet? Shakespeare.", "Capital of France? Paris."]
    assert any("no utility_real_authors_qa.jsonl" in note for note in bench.meta["notes"])
    bench.save(tmp_path / "o")
    assert not list((tmp_path / "o").glob("utility_*"))


def test_tofu_without_holdout_leaves_it_empty_and_loads(tofu, tmp_path):
    (tofu / "holdout01.json").unlink()
    bench = from_tofu(tofu, "forget01")
    assert bench.holdout == [] and bench.holdout_qa == []
    assert any("no holdout01.json" in n and "PrivLeak" in n for n in bench.meta["notes"])
    bench.save(tmp_path / "o")
    assert (tmp_path / "o/holdout.jsonl").read_text() == ""
    assert load_benchmark(tmp_path / "o").holdout == []


def test_tofu_retain_from_full_when_complement_missing(tofu):
    (tofu / "retain99.json").unlink()
    _jsonl(tofu / "full.json", TOFU_FORGET + TOFU_RETAIN)
    bench = from_tofu(tofu, "forget01")
    assert _plain(bench.retain_qa) == _pairs(TOFU_RETAIN)
    assert bench.retain_qa[1].perturbed_answers == ("rw1", "rw2", "rw3")
    assert bench.meta["files"]["retain"] == ["full.json"]


def test_tofu_errors(tofu, tmp_path, capsys):
    with pytest.raises(ConfigError, match="forget01, forget05 or forget10"):
        from_tofu(tofu, "forget_10")
    with pytest.raises(
        DataError, match=r"forget10\.json: file missing \(TOFU forget splits here: forget01\.json\)"
    ):
        from_tofu(tofu)
    (tofu / "retain99.json").unlink()
    with pytest.raises(DataError, match=r"retain99\.json: file missing"):
        from_tofu(tofu, "forget01")
    _write(tofu / "retain99.json", '{"question": "q", "answer": "a"}\n{"question": "q2"\n')
    assert _convert("--from", "tofu", tofu, "--forget-split", "forget01", "--out", tmp_path / "o") == 2
    assert "retain99.json line 2: invalid JSON" in read_error_line(capsys)
    _jsonl(tofu / "retain99.json", [{"question": "q", "answer": 3}])
    assert _convert("--from", "tofu", tofu, "--forget-split", "forget01", "--out", tmp_path / "o") == 2
    assert "retain99.json line 1: field 'answer' must be a string, got int" in read_error_line(capsys)


def test_options_of_another_source_are_refused(tofu, tmp_path, capsys):
    assert _convert("--from", "tofu", tofu, "--fold", "scal/forget_2", "--out", tmp_path / "o") == 2
    assert "--fold applies to --from muse only" in read_error_line(capsys)
    assert (
        _convert("--from", "text", "--forget", tofu / "x.txt", "--field", "body", "--out", tmp_path / "o")
        == 2
    )
    assert "--field applies to --from jsonl or hf only" in read_error_line(capsys)
    assert _convert("--from", "muse", "--out", tmp_path / "o") == 2
    assert "needs SRC" in read_error_line(capsys)


# ------------------------------------------------------------------------------------------ text / JSONL


def test_text_folder_blocks_and_qa(tmp_path):
    src = tmp_path / "src"
    _write(src / "forget.txt", "First forget doc.\nSecond line.\n\nSecond forget doc.\n")
    _write(src / "retain.txt", "A retain doc.\n")
    _write(src / "holdout.txt", "A holdout doc.\n")
    _write(src / "general.txt", "General one.\n\nGeneral two.\n")
    _jsonl(src / "forget_qa.jsonl", FORGET_QA)
    _json(src / "retain_qa.json", RETAIN_QA)
    out = tmp_path / "out"
    assert _convert("--from", "text", src, "--out", out) == 0
    loaded = load_benchmark(out)
    assert loaded.forget == ["First forget doc.\nSecond line.", "Second forget doc."]
    assert loaded.retain == ["A retain doc."] and loaded.holdout == ["A holdout doc."]
    assert loaded.general == ["General one.", "General two."]
    assert loaded.forget_qa == _pairs(FORGET_QA) and loaded.retain_qa == _pairs(RETAIN_QA)
    assert loaded.meta["converted_from"] == "text" and loaded.meta["source"] == str(src)

    out2 = tmp_path / "out2"
    assert _convert("--from", "text", src, "--one-per-line", "--out", out2) == 0
    assert load_benchmark(out2).forget == ["First forget doc.", "Second line.", "Second forget doc."]


def test_text_files_without_folder_and_repeated_retain(tmp_path):
    f = _write(tmp_path / "f.txt", "Forget me.\n")
    r1 = _write(tmp_path / "r1.txt", "Keep one.\n")
    r2 = _write(tmp_path / "r2.txt", "Keep two.\n")
    out = tmp_path / "out"
    assert _convert("--from", "text", "--forget", f, "--retain", r1, "--retain", r2, "--out", out) == 0
    loaded = load_benchmark(out)
    assert loaded.forget == ["Forget me."] and loaded.retain == ["Keep one.", "Keep two."]
    assert loaded.holdout == []
    assert any("no holdout file" in n for n in loaded.meta["notes"])


def test_jsonl_folder_with_field_and_override(tmp_path):
    src = tmp_path / "src"
    _jsonl(src / "forget.jsonl", [{"body": "F one.", "id": 1}, {"body": "F two."}])
    _jsonl(src / "retain.jsonl", [{"body": "R one."}])
    _jsonl(src / "holdout.jsonl", [{"body": "H one."}])
    other = _jsonl(tmp_path / "other_retain.jsonl", [{"body": "R other."}])
    out = tmp_path / "out"
    assert _convert("--from", "jsonl", src, "--field", "body", "--retain", other, "--out", out) == 0
    loaded = load_benchmark(out)
    assert loaded.forget == ["F one.", "F two."]
    assert loaded.retain == ["R other."]
    assert loaded.meta["converted_from"] == "jsonl" and loaded.meta["field"] == "body"


def test_from_text_python_api(tmp_path):
    f = _jsonl(tmp_path / "f.jsonl", [{"text": "Alpha."}, "Beta."])  # objects or bare strings
    r = _write(tmp_path / "r.txt", "Gamma.\n\nDelta.\n")
    qa = _jsonl(tmp_path / "qa.jsonl", FORGET_QA)
    vm = _json(tmp_path / "vm.json", VERBMEM)
    bench = from_text(forget=f, retain=[r], forget_qa=qa, verbmem=vm)
    assert bench.forget == ["Alpha.", "Beta."] and bench.retain == ["Gamma.", "Delta."]
    assert bench.forget_qa == _pairs(FORGET_QA) and bench.verbmem == [VerbMemItem(**VERBMEM[0])]


@pytest.mark.parametrize(
    ("files", "args", "expected"),
    [
        ({"forget.txt": " \n\n \n"}, [], "forget.txt: no texts (the forget set would be empty)"),
        ({"retain.txt": "x\n"}, [], "forget.txt: file missing"),
        (
            {"forget.txt": "Same.\n", "retain.txt": "Other.\n\nSame.\n"},
            [],
            "record 1 and retain.jsonl record 2",
        ),
        (
            {"forget.txt": "x\n", "forget_qa.jsonl": '{"question": "q"}\n'},
            [],
            "line 1: missing field 'answer'",
        ),
        ({"forget.txt": "x\n", "forget_qa.jsonl": "[1, 2]\n"}, [], "item 1: expected a JSON object"),
        ({"forget.txt": b"\xff\xfe".decode("latin-1")}, [], None),
    ],
)
def test_text_bad_input_is_one_line(tmp_path, capsys, files, args, expected):
    src = tmp_path / "src"
    for name, text in files.items():
        _write(src / name, text)
    if expected is None:  # bytes that are not UTF-8
        (src / "forget.txt").write_bytes(b"ok\n\xff\n")
        expected = "forget.txt: not UTF-8 text"
    assert _convert("--from", "text", src, *args, "--out", tmp_path / "out") == 2
    line = read_error_line(capsys)
    assert expected in line, line


def test_out_is_a_file(tmp_path, books, capsys):
    _write(tmp_path / "file", "x")
    assert _convert("--from", "muse", books, "--out", tmp_path / "file") == 2
    assert "is a file" in read_error_line(capsys)


# --------------------------------------------------------------------------------------------------- hf


def test_hf_argument_validation():
    with pytest.raises(ConfigError, match="dataset name"):
        from_hf("", forget="forget")
    with pytest.raises(ConfigError, match="forget: a split spec is required"):
        from_hf("muse-bench/MUSE-News", forget=[])
    with pytest.raises(ConfigError, match="bad split spec"):
        from_hf("muse-bench/MUSE-News", forget="raw:forget+:x")
    with pytest.raises(ConfigError, match="bad split spec"):
        from_hf("muse-bench/MUSE-News", forget="raw:")


def test_hf_without_datasets_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(ConfigError, match="pip install datasets"):
        from_hf("muse-bench/MUSE-News", config="raw", forget="forget", retain="retain1+retain2")
    assert (
        _convert("--from", "hf", "muse-bench/MUSE-News", "--forget", "raw:forget", "--out", tmp_path / "o")
        == 2
    )
    assert "pip install datasets" in read_error_line(capsys)
    assert _convert("--from", "hf", "some/name", "--out", tmp_path / "o") == 2
    assert "needs --forget" in read_error_line(capsys)


def test_hf_reads_rows_through_datasets(monkeypatch):
    """The row mapping and error wrapping, with a stand-in ``datasets`` (no hub here)."""
    calls = []
    tables = {
        ("raw", "forget"): [{"text": "F one."}],
        ("raw", "retain1"): [{"text": "R one."}],
        ("raw", "retain2"): [{"text": "R two."}],
        ("knowmem", "forget_qa"): [{"question": "Q?", "answer": "A", "extra": 1}],
        ("verbmem", "forget"): [{"prompt": "F", "gt": " one."}],
        ("raw", "bad"): [{"body": "no text field"}],
    }

    def load_dataset(name, config, *, split, revision, data_files):
        calls.append((name, config, split, revision))
        if (config, split) not in tables:
            raise ValueError(f'Unknown split "{split}".\nShould be one of ...')
        return tables[config, split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    bench = from_hf(
        "org/muse-like",
        config="raw",
        revision="v1",
        forget="forget",
        retain="retain1+raw:retain2",
        forget_qa="knowmem:forget_qa",
        verbmem=["verbmem:forget"],
    )
    assert bench.forget == ["F one."] and bench.retain == ["R one.", "R two."]
    assert bench.forget_qa == [QAPair("Q?", "A")] and bench.verbmem == [VerbMemItem("F", " one.")]
    assert ("org/muse-like", "raw", "retain2", "v1") in calls
    assert bench.meta["files"]["retain"] == ["raw:retain1", "raw:retain2"]
    assert bench.meta["source"] == "org/muse-like" and bench.meta["revision"] == "v1"
    with pytest.raises(
        DataError, match=r"org/muse-like \(raw\) split 'nope': cannot load \(Unknown split \"nope\"\.\)$"
    ):
        from_hf("org/muse-like", config="raw", forget="nope")
    with pytest.raises(DataError, match=r"split 'bad' row 1: missing field 'text'"):
        from_hf("org/muse-like", config="raw", forget="bad")


def test_hf_local_json_files(tmp_path):
    pytest.importorskip("datasets")
    files = {
        "forget": str(_jsonl(tmp_path / "f.jsonl", [{"text": "F one."}, {"text": "F two."}])),
        "retain": str(_jsonl(tmp_path / "r.jsonl", [{"text": "R one."}])),
        "fqa": str(_jsonl(tmp_path / "q.jsonl", FORGET_QA)),
    }
    bench = from_hf("json", data_files=files, forget="forget", retain="retain", forget_qa="fqa")
    assert bench.forget == ["F one.", "F two."] and bench.retain == ["R one."]
    assert bench.forget_qa == _pairs(FORGET_QA)
    assert bench.meta["converted_from"] == "hf" and bench.meta["source"] == "json"
    bench.save(tmp_path / "o")
    _same(load_benchmark(tmp_path / "o"), bench)
