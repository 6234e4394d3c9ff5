"""Devices: ``--device`` is resolved and checked up front, recorded in every record, and kept out of the
cache keys and the audit's config hash. These tests run without a GPU: where CUDA matters they pretend
(``torch.cuda`` is monkeypatched, or tensors sit on the ``meta`` device), and ``benchmarks/gpu_check.py``
runs the real thing on a GPU machine."""

from __future__ import annotations

import json
from typing import NamedTuple

import pytest
import torch

from relapse.audit.sweep import AuditConfig
from relapse.cli import main
from relapse.errors import ConfigError
from relapse.experiment import parse_experiment, shipped_experiment
from relapse.methods.sure import select_top
from relapse.runtime import RunContext, check_device_name, resolve_device
from relapse.training import loop as loop_module
from relapse.training.loop import LoopConfig, run_loop, to_device
from tests.test_experiment import VALID, with_change


@pytest.fixture
def no_cuda(monkeypatch):
    """A machine where torch sees no GPU (whatever this one has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine where torch sees two GPUs, the first current (nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_auto_is_the_cpu_on_this_machine():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_auto_and_cpu_without_a_gpu(no_cuda):
    assert resolve_device("auto") == resolve_device("cpu") == resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_is_a_one_line_config_error(no_cuda, name):
    with pytest.raises(ConfigError, match="CUDA is not available") as error:
        resolve_device(name)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["gpu", "mps", "cuda:", "cuda:x", "cuda:-1", "cpu:0", ""])
def test_misspelt_devices_are_refused(name):
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        check_device_name(name)


def test_device_names_are_normalised():
    assert check_device_name(None) == "auto"
    assert check_device_name("CUDA:01") == "cuda:1"
    assert check_device_name(" cuda ") == "cuda"


def test_cuda_resolves_to_an_indexed_gpu(two_gpus):
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_each_process_of_a_launched_group_gets_its_own_gpu(two_gpus, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is respected


class Pair(NamedTuple):
    first: torch.Tensor
    second: list[torch.Tensor]


def test_to_device_moves_nested_batches_and_leaves_the_rest():
    batch = {
        "forget": {"input_ids": torch.ones(2, 3), "index": torch.arange(2)},
        "pair": Pair(torch.ones(1), [torch.zeros(1)]),
    }
    batch["note"] = "kept"
    moved = to_device(batch, torch.device("meta"))
    assert moved["forget"]["input_ids"].device.type == moved["forget"]["index"].device.type == "meta"
    assert isinstance(moved["pair"], Pair) and moved["pair"].first.is_meta and moved["pair"].second[0].is_meta
    assert moved["note"] == "kept"
    # Already on the device: the very same tensors, so CPU runs are untouched.
    same = to_device(batch, torch.device("cpu"))
    assert same["forget"]["input_ids"] is batch["forget"]["input_ids"]


def test_run_loop_moves_every_batch_to_the_models_device(monkeypatch):
    """The loop asks where the model is and moves each micro-batch there before the loss sees it (here
    the model pretends to be on ``meta``; the loss itself is computed from the real CPU weights)."""
    model = torch.nn.Linear(2, 1)
    monkeypatch.setattr(loop_module, "model_device", lambda m: torch.device("meta"))
    seen = []

    def loss_fn(m, batch):
        seen.append((batch["forget"]["input_ids"].device.type, batch["retain"][0].device.type))
        return m.weight.square().sum(), {}

    def batch_for_step(step, micro):
        return {"forget": {"input_ids": torch.ones(2, 2)}, "retain": [torch.zeros(1)]}

    config = LoopConfig(max_steps=2, grad_accum=2, eval_every=10, checkpoint_every=10)
    run_loop(model, config, batch_for_step, loss_fn, run_key="k", progress=False)
    assert seen == [("meta", "meta")] * 4


def test_sure_masks_stay_on_the_saliency_device():
    saliency = {"a": torch.tensor([3.0, 1.0]).to("meta"), "b": torch.tensor(2.0).to("meta")}
    masks = select_top(saliency, 0.5)
    assert all(mask.is_meta for mask in masks.values())


def test_exact_division_is_plain_division_on_the_cpu():
    """RTN and GGUF scales divide by a tensor (CUDA would otherwise multiply by a rounded reciprocal);
    on the CPU that is bit for bit the division by the number it replaced."""
    from relapse.attacks.rtn import exact_div

    values = torch.randn(4096) * 0.05
    for divisor in (15, 7, 127, -8, 3.0):
        assert torch.equal(exact_div(values, divisor), values / divisor)


def test_bnb_rounds_gpu_weights_on_the_cpu_when_its_cuda_library_is_missing(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from bitsandbytes import cextension

    from relapse.attacks.deploy import _bnb_runs_on

    class CpuOnlyLibrary:
        compiled_with_cuda = False

    assert _bnb_runs_on(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(cextension, "lib", CpuOnlyLibrary(), raising=False)
    assert _bnb_runs_on(torch.device("cuda", 0)) == torch.device("cpu")
    CpuOnlyLibrary.compiled_with_cuda = True
    assert _bnb_runs_on(torch.device("cuda", 0)) == torch.device("cuda", 0)


def test_the_device_is_not_part_of_the_audit_config():
    """Not in the hash: an audit may resume on another device (each cell records its own)."""
    on_cpu = AuditConfig(target="t", unlearned=["u"], data="d", device="cpu")
    on_gpu = AuditConfig(target="t", unlearned=["u"], data="d", device="cuda:1")
    assert on_cpu.to_json() == on_gpu.to_json() and "device" not in on_cpu.to_json()
    with pytest.raises(ConfigError, match="auto, cpu, cuda or cuda:N"):
        AuditConfig(target="t", unlearned=["u"], data="d", device="gpu")


def test_experiment_device_key():
    assert parse_experiment(with_change(lambda r: None), "x.yaml").device == "auto"
    # Spelling only: a file for a GPU machine reads anywhere; running it here would be the error.
    assert parse_experiment(with_change(lambda r: r.update(device="CUDA:0")), "x.yaml").device == "cuda:0"
    for bad in ("gpu", 0, None):
        with pytest.raises(ConfigError, match=r"x\.yaml: device must be") as error:
            parse_experiment(with_change(lambda r, bad=bad: r.update(device=bad)), "x.yaml")
        assert "\n" not in str(error.value)
    assert VALID.get("device") is None


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--data", "nowhere", "--out", "{tmp}/m"],
        ["unlearn", "--model", "nowhere", "--data", "nowhere", "--out", "{tmp}/u"],
        ["attack", "--model", "nowhere", "--attack", "rtn-w4-g128", "--out", "{tmp}/a"],
        ["eval", "--model", "nowhere", "--data", "nowhere", "--out", "{tmp}/e.json"],
        ["audit", "--target", "t", "--unlearned", "u", "--data", "nowhere", "--out", "{tmp}/audit"],
        ["run", "{demo}", "--out", "{tmp}/run"],
        ["demo", "--fast", "--out", "{tmp}/demo"],
    ],
)
def test_every_command_refuses_a_missing_gpu_before_any_work(argv, no_cuda, tmp_path, capsys):
    demo = str(shipped_experiment("demo-fast"))
    argv = [a.format(tmp=tmp_path, demo=demo) for a in argv] + ["--device", "cuda", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("relapse: error: device cuda: CUDA is not available") and "\n" not in err
    assert not any(tmp_path.iterdir()), "nothing may be written before the device is checked"


def test_records_name_the_device(trained_small, small_benchmark_dir, tmp_path):
    """train.json (the session's model), attack.json and the eval record all say where they ran."""
    assert trained_small.record["device"] == str(resolve_device("auto"))
    saved = json.loads((trained_small.path / "train.json").read_text())
    assert saved["device"] == trained_small.record["device"]
    common = ["--device", "cpu", "--quiet", "--threads", "1"]
    model = ["--model", str(trained_small.path)]
    code = main(["attack", *model, "--attack", "rtn-w8-ch", "--out", str(tmp_path / "a"), *common])
    assert code == 0
    assert json.loads((tmp_path / "a" / "attack.json").read_text())["device"] == "cpu"
    data = ["--data", str(small_benchmark_dir), "--metrics", "recall_forget"]
    code = main(["eval", *model, *data, "--out", str(tmp_path / "e.json"), *common])
    assert code == 0
    assert json.loads((tmp_path / "e.json").read_text())["device"] == "cpu"


def test_the_device_is_not_in_the_training_cache_key(trained_small, small_benchmark_dir):
    """Asking for the session's model on an explicit device is a cache hit: same model, same key."""
    from relapse.training.finetune import train_model
    from tests.conftest import small_train_config

    again = train_model(
        small_benchmark_dir,
        trained_small.path,
        small_train_config(),
        run=RunContext(progress=False, device="cpu"),
    )
    assert again.cached and again.record["cache_key"] == trained_small.record["cache_key"]
