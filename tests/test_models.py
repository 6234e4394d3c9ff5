"""Models: tokenizer round trips, tiny model construction, safe loading and saving."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from relapse.data import load_benchmark
from relapse.errors import ConfigError, ModelError
from relapse.models import TinyConfig, build_tiny, build_tokenizer, load_model, save_model
from relapse.models.tiny import benchmark_corpus


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_tokenizer_round_trips_every_benchmark_string(kind, small_benchmark_dir):
    benchmark = load_benchmark(small_benchmark_dir)
    corpus = benchmark_corpus(benchmark)
    tokenizer = build_tokenizer(corpus, kind=kind, vocab_size=600)
    for text in corpus:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_word_tokenizer_keeps_words_whole(small_benchmark_dir):
    benchmark = load_benchmark(small_benchmark_dir)
    tokenizer = build_tokenizer(benchmark_corpus(benchmark), kind="word")
    pair = benchmark.forget_qa[0]
    name = " ".join(pair.question.rstrip("?").split()[-2:])
    tokens = tokenizer.tokenize(f"Question: {pair.question}\nAnswer: {pair.answer}")
    for word in name.split():
        assert f"▁{word}" in tokens
    assert "\n" in tokens


def test_unknown_tokenizer_kind_is_a_clear_error():
    with pytest.raises(ConfigError, match="tokenizer"):
        TinyConfig(tokenizer="sentencepiece")
    with pytest.raises(ConfigError):
        build_tokenizer(["a b"], kind="chars")


def test_build_tiny_is_seeded_and_sized(small_benchmark_dir):
    benchmark = load_benchmark(small_benchmark_dir)
    a, tokenizer = build_tiny(TinyConfig(), benchmark, seed=3)
    b, _ = build_tiny(TinyConfig(), benchmark, seed=3)
    c, _ = build_tiny(TinyConfig(), benchmark, seed=4)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert a.config.vocab_size == len(tokenizer)
    layers = 4 * (4 * 256 * 256 + 3 * 256 * 768 + 2 * 256)
    expected = layers + 256 + 2 * 256 * len(tokenizer)
    assert sum(p.numel() for p in a.parameters()) == expected


def test_save_load_round_trip_gives_identical_logits(trained_small, tmp_path):
    model, tokenizer = load_model(trained_small.path)
    save_model(model, tokenizer, tmp_path / "copy", {"note": "copy"})
    again, tokenizer2 = load_model(tmp_path / "copy")
    batch = tokenizer(["Question: In which town", "The mother of"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, again(**batch).logits)
    assert tokenizer2("a b")["input_ids"] == tokenizer("a b")["input_ids"]
    assert tokenizer2.padding_side == "left"
    assert json.loads((tmp_path / "copy" / "train.json").read_text()) == {"note": "copy"}
    saved = load_file(str(tmp_path / "copy" / "model.safetensors"))
    assert set(saved) == set(again.state_dict())


def test_save_replaces_atomically(trained_small, tmp_path):
    model, tokenizer = load_model(trained_small.path)
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_model(model, tokenizer, target)
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "no staging folders are left behind"


def test_bfloat16_load(trained_small):
    model, _ = load_model(trained_small.path, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_load_refuses_pickled_weights(trained_small, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((trained_small.path / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(ModelError, match="never unpickles"):
        load_model(folder)


@pytest.mark.parametrize(
    ("setup", "message"),
    [("missing", "does not exist"), ("empty", "no config.json")],
)
def test_load_errors(tmp_path, setup, message):
    folder = tmp_path / "model"
    if setup == "empty":
        folder.mkdir()
    with pytest.raises(ModelError, match=message):
        load_model(folder)


def test_unknown_dtype(trained_small):
    with pytest.raises(ModelError, match="dtype"):
        load_model(trained_small.path, dtype="int3")


def test_trust_remote_code_is_off_by_default(monkeypatch, trained_small):
    seen = {}
    import relapse.models.io as io

    real = io.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(io.AutoModelForCausalLM, "from_pretrained", spy)
    load_model(trained_small.path)
    assert seen["trust_remote_code"] is False
    assert seen["use_safetensors"] is True


def test_hub_id_without_network_is_a_model_error(monkeypatch):
    import huggingface_hub.constants

    # The hub library reads HF_HUB_OFFLINE when imported, so set its constant too: no network is tried.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="cannot load model"):
        load_model("relapse-test/no-such-model")
