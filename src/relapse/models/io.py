"""Loading and saving Hugging Face causal LMs, safely.

Only safetensors weights are read (never pickled ``.bin`` files, which can run code), and
``trust_remote_code`` stays off unless the caller asks for it. Local folders and hub ids both work; hub
access needs network, which the tests never use.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from relapse.errors import ConfigError, ModelError, WeightsError

try:  # what transformers' strict configs raise for a field of the wrong type (huggingface_hub >= 0.32)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:  # pragma: no cover - older huggingface_hub: such errors arrive as ValueError

    class StrictDataclassError(Exception):
        """Stands in for huggingface_hub's, which this version does not have."""


from relapse.runtime import atomic_write_json, check_writable, hash_files, replace_dir

#: The record a fine-tuned model is saved with (``relapse train``); its cache key names the model.
TRAIN_RECORD = "train.json"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

BFLOAT16_EMULATED = "bfloat16-emulated"
PRECISIONS = ("float32", "bfloat16", BFLOAT16_EMULATED)
"""Weight precisions for training and unlearning. ``bfloat16-emulated`` stores weights, gradients and Adam
moments as bfloat16 values (rounded after every step) but computes in float32: what pure bfloat16 training
does to the weights (an update below half a bfloat16 step is lost), at float32 speed on CPUs without
bfloat16 instructions, where real bfloat16 matrix products were measured ~25x slower."""


def compute_dtype(precision: str) -> str:
    """The dtype a model is held in for a training precision: emulated bfloat16 computes in float32."""
    return "float32" if precision == BFLOAT16_EMULATED else precision


@torch.no_grad()
def round_to_bfloat16_(tensors) -> None:
    """Round each float tensor in place to the nearest bfloat16 value (ties to even), keeping its dtype."""
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.bfloat16:
            tensor.copy_(tensor.to(torch.bfloat16))


def apply_precision_(model: torch.nn.Module, precision: str) -> None:
    """Hold ``model`` in a training precision (:data:`PRECISIONS`): cast it to the precision's dtype, and
    for emulated bfloat16 round its parameters to bfloat16 values, as loading in bfloat16 would."""
    model.to(parse_dtype(compute_dtype(precision)))
    if precision == BFLOAT16_EMULATED:
        round_to_bfloat16_(model.parameters())


def parse_dtype(name: str) -> torch.dtype:
    """``"float32"``/``"bfloat16"``/``"float16"`` to a torch dtype, with a clear error otherwise."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; choose from {', '.join(DTYPES)}") from None


def hub_host() -> str:
    """The model hub's host: ``$HF_ENDPOINT``'s, else huggingface.co."""
    return urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers a TCP connection within ``timeout`` seconds (False in offline mode,
    ``HF_HUB_OFFLINE=1``). Without a network the name does not even resolve, which takes milliseconds;
    transformers would instead retry for most of a minute before saying so."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((hub_host(), port), timeout=timeout).close()
    except OSError:
        return False
    return True


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """Whether the Hugging Face cache holds ``repo_id``'s config (so it loads without the hub)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except ValueError:  # not a valid repository id
        return False
    return isinstance(found, str)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def load_model(
    name_or_path: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder or a hub id.

    Args:
        name_or_path: a folder written by ``save_pretrained`` (or :func:`save_model`), or a hub id.
        dtype: weight dtype, one of ``float32``, ``bfloat16``, ``float16``, or ``bfloat16-emulated``
            (float32 holding bfloat16 values, see :data:`PRECISIONS`).
        device: a torch device string; ``"cpu"`` by default.
        trust_remote_code: allow the model repository's own Python code to run. Off by default.
        revision: hub revision (branch, tag or commit) for hub ids.

    Raises:
        ModelError: the folder is missing, has no safetensors weights, or the model cannot be loaded.
        WeightsError: a weight file is unreadable (truncated, not safetensors), lacks a tensor the config
            needs, has one it does not, has one of the wrong shape, or holds NaN or infinite values.
    """
    name = str(name_or_path)
    parse_dtype(compute_dtype(dtype))  # a bad dtype fails before any loading
    files: dict[str, Path] = {}
    if _looks_like_path(name):
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ModelError(f"model folder {folder} does not exist")
        if not (folder / "config.json").exists():
            raise ModelError(f"{folder} has no config.json; is it a Hugging Face model folder?")
        if not any(folder.glob("*.safetensors")):
            pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                p.name for p in folder.glob("*.pt")
            )
            hint = f" (found {', '.join(pickled)}: relapse never unpickles weight files)" if pickled else ""
            raise ModelError(f"{folder} has no .safetensors weights{hint}")
        files = _weight_files(folder)
        source: str = str(folder)
    else:
        source = name
    # A hub id with no hub in reach: the local Hugging Face cache only, instead of a minute of retries.
    offline = not files and not hub_reachable()
    if offline and not _in_hub_cache(name, revision):
        raise ModelError(
            f"cannot load model {name!r}: it is not a model folder here, and the hub ({hub_host()}) cannot "
            "be reached to fetch it "
            "(nor is it in the Hugging Face cache): give a folder written by save_pretrained, or check the "
            "name"
        )
    try:
        # ignore_mismatched_sizes: a misshapen tensor is reported below, by name, not as a RuntimeError.
        model, loading = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=parse_dtype(compute_dtype(dtype)),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            revision=revision,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            local_files_only=offline,
        )
        _check_loading(model, loading, name, files)
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=trust_remote_code, revision=revision, local_files_only=offline
        )
    except OSError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {name!r}: {first_line}") from None
    except (ValueError, SafetensorError, StrictDataclassError) as exc:
        # StrictDataclassError: a config.json field of the wrong type (``"hidden_size": "abc"``).
        text = " ".join(str(exc).split())
        raise ModelError(f"cannot load model {name!r}: {text or type(exc).__name__}") from None
    apply_precision_(model, dtype)
    model.to(device)
    _check_finite(model, name, files, dtype)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _weight_files(folder: Path) -> dict[str, Path]:
    """Which file of ``folder`` holds each tensor, reading only the headers of the safetensors files that
    transformers would load (``model.safetensors``, or the shards its index names).

    safetensors checks a header against the file's size, so a truncated or garbage file is refused here,
    by name, instead of failing deep inside transformers.
    """
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise WeightsError(f"{index} is not a safetensors index (no weight_map)") from None
        paths = [folder / str(shard) for shard in shards]
    elif (folder / "model.safetensors").exists():
        paths = [folder / "model.safetensors"]
    else:
        return {}  # transformers says what it misses
    files: dict[str, Path] = {}
    for path in paths:
        if not path.is_file():
            raise WeightsError(f"{index} names {path.name}, which is not in {folder}")
        try:
            with safe_open(str(path), framework="pt") as weights:
                files.update(dict.fromkeys(weights.keys(), path))
        except (SafetensorError, OSError, ValueError) as exc:
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(
                f"{path} is not a readable safetensors file ({detail}); save or fetch the model again"
            ) from None
    return files


def _where(key: str, name: str, files: dict[str, Path]) -> str:
    """The file that holds (or, for a missing tensor, should hold) ``key``: its shard, the only weight
    file, or the model's name when neither is known (a hub id, a sharded folder)."""
    if key in files:
        return str(files[key])
    paths = set(files.values())
    return str(paths.pop()) if len(paths) == 1 else name


def _first(keys) -> tuple[str, str]:
    """The first of ``keys`` in sorted order, and how an error names them: that one and how many more."""
    ordered = sorted(keys)
    return ordered[0], ordered[0] + (f" (and {len(ordered) - 1} more)" if len(ordered) > 1 else "")


def _check_loading(
    model: PreTrainedModel, loading: dict[str, Any], name: str, files: dict[str, Path]
) -> None:
    """Refuse a checkpoint whose tensors do not match the architecture, which transformers only logs: it
    starts a missing tensor at random and drops an unexpected one. A tensor tied to one that was loaded
    (``lm_head`` under ``tie_word_embeddings``) is not missing, whatever the transformers version says."""
    arch = type(model).__name__
    reported = set(loading.get("missing_keys") or ())
    tied: dict[int, set[str]] = {}  # storage -> every parameter name that uses it
    for key, parameter in model.named_parameters(remove_duplicate=False):
        tied.setdefault(parameter.data_ptr(), set()).add(key)
    loaded = {key for names in tied.values() if names - reported for key in names}
    if missing := reported - loaded:
        first, named = _first(missing)
        raise WeightsError(
            f"{_where(first, name, files)} lacks tensor {named} that {arch} needs; "
            "transformers would start it at random"
        )
    if unexpected := loading.get("unexpected_keys"):
        first, named = _first(unexpected)
        raise WeightsError(
            f"{_where(first, name, files)} has tensor {named} that {arch} does not; "
            "does config.json belong to these weights?"
        )
    mismatched = sorted(loading.get("mismatched_keys") or ())
    if mismatched:
        key, stored, expected = mismatched[0]
        raise WeightsError(
            f"{_where(key, name, files)}: tensor {key} has shape {list(stored)}, but {arch} expects "
            f"{list(expected)}; does config.json belong to these weights?"
        )
    errors = [str(e).strip() for e in loading.get("error_msgs") or () if str(e).strip()]
    if errors:
        raise WeightsError(f"cannot load the weights of {name}: {errors[0].splitlines()[0]}")


@torch.no_grad()
def all_finite(tensors) -> bool:
    """Whether every value of ``tensors`` (None skipped) is finite: the min and max of each tensor (exact,
    no overflow, no copy of the tensor; NaN propagates), checked with one synchronisation."""
    extremes = [
        torch.stack(torch.aminmax(t.detach())).float() for t in tensors if t is not None and t.numel()
    ]
    return not extremes or bool(torch.isfinite(torch.cat(extremes)).all())


@torch.no_grad()
def _check_finite(model: PreTrainedModel, name: str, files: dict[str, Path], dtype: str) -> None:
    """Refuse weights holding NaN or infinite values (a run that diverged, a damaged file): every metric
    of such a model is meaningless. One pass: each tensor's min and max (exact, no copy), NaN propagating,
    on the model's device."""
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    if all_finite(floats):  # the usual case: one synchronisation, no search
        return
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or not tensor.numel() or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        low, high = torch.aminmax(tensor)
        if math.isfinite(float(low)) and math.isfinite(float(high)):
            continue
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
        cast = "" if dtype == "float32" else f" once loaded as {dtype}"
        raise WeightsError(f"{_where(key, name, files)}: tensor {key} holds {kind} values{cast}")


def save_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out: str | Path,
    record: dict[str, Any] | None = None,
    record_name: str = "train.json",
) -> Path:
    """Save weights (safetensors), config and tokenizer to ``out``, replacing it atomically.

    Everything is written to a temporary folder beside ``out`` first, so a crash never leaves a half
    written model at ``out``. ``record`` (provenance: config, seed, versions) is saved as ``record_name``.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.saving-"))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if record is not None:
            atomic_write_json(staging / record_name, record)
        replace_dir(staging, out)
    except BaseException:  # a full disk or a kill: no half-written folder is left beside ``out``
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def read_record(folder: str | Path, record_name: str = TRAIN_RECORD) -> dict[str, Any] | None:
    """The provenance record saved with a model, or None when there is none (or it is unreadable)."""
    path = Path(folder) / record_name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None


def model_identity(name_or_path: str) -> str:
    """A stable identity for a starting model: its relapse cache key, its weights' hash, or its hub id.

    It enters the cache keys of every run derived from the model (fine-tuning, unlearning, attacks,
    audits), so it lives here, below all of them: a model relapse trained is named by the key in its
    ``train.json``, any other folder by its weights, anything else by its hub id.
    """
    record = read_record(name_or_path, TRAIN_RECORD)
    if record and "cache_key" in record:
        return f"relapse:{record['cache_key']}"
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return "files:" + hash_files(sorted(folder.glob("*.safetensors")))
    return f"hub:{name_or_path}"


def reuse_or_claim(out: Path, key: str, record_name: str, overwrite: bool) -> dict[str, Any] | None:
    """Decide what to do with an output folder before a run that would write a model there.

    Returns the saved record when ``out`` already holds the result of this exact run (same ``key``), so
    the caller can skip the work. Raises :class:`ConfigError` when ``out`` holds anything else, unless
    ``overwrite``: relapse never replaces a user's results without being told to.
    """
    out = Path(out)
    check_writable(out, "the output folder")  # before any work, not after it at save time
    if not out.exists():
        return None
    existing = read_record(out, record_name)
    if existing is not None and existing.get("cache_key") == key:
        return existing
    if out.is_dir() and not any(out.iterdir()):
        return None
    if not overwrite:
        raise ConfigError(
            f"{out} already holds a different model or other files; pass --overwrite to replace it"
        )
    return None
