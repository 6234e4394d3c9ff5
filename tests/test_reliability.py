"""Bad input ends with one ``relapse: error:`` line and exit status 2, never a traceback and never a
silently wrong result, and nothing is written when input is refused: numeric options are checked before
any work, a model's weight files are checked when it is loaded, and a run whose loss or gradient stops
being finite ends with an error naming the step instead of saving a broken model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import relapse.methods.losses as losses_module
import relapse.methods.unlearn as unlearn_module
from relapse.cli import main
from relapse.errors import ConfigError, DivergenceError, ModelError, WeightsError
from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.models import load_model, save_model
from relapse.models.io import _check_loading
from relapse.runtime import LOCK_NAME, RunContext
from relapse.training.finetune import TrainConfig
from relapse.training.loop import LoopConfig, run_loop, work_dir_for
from tests.conftest import read_error_line

NAN, INF = float("nan"), float("inf")
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


# --------------------------------------------------------------------------------------------------
# Options are checked before any work.


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--alpha", "nan"], "--alpha"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--weight-decay=-1"], "--weight-decay"),
        (["--max-grad-norm=-1"], "--max-grad-norm"),
        (["--max-grad-norm", "nan"], "--max-grad-norm"),
        (["--beta", "inf"], "--beta"),
        (["--epochs", "inf"], "--epochs"),
        (["--grad-accum", "0"], "--grad-accum"),
        (["--stop-forget-recall", "nan"], "--stop-forget-recall"),
    ],
)
def test_cli_unlearn_refuses_bad_numbers_before_any_work(
    trained_small, small_benchmark_dir, tmp_path, capsys, args, option
):
    out = tmp_path / "unlearned"
    argv = ["unlearn", "--model", str(trained_small.path), "--data", str(small_benchmark_dir)]
    if "--epochs" not in args:
        argv += ["--steps", "2"]  # should the check be missing, the run is short
    assert main([*argv, "--out", str(out), "--quiet", *args]) == 2
    assert option in read_error_line(capsys)
    assert list(tmp_path.iterdir()) == [], "a refused command writes nothing"


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--lr", "nan"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--lr", "inf"], "--lr"),
        (["--stop-recall=-1"], "--stop-recall"),
        (["--warmup-steps=-1"], "--warmup-steps"),
    ],
)
def test_cli_train_refuses_bad_numbers_before_any_work(small_benchmark_dir, tmp_path, capsys, args, option):
    out = tmp_path / "model"
    argv = ["train", "--data", str(small_benchmark_dir), "--out", str(out), "--steps", "2", "--quiet"]
    assert main([*argv, *args]) == 2
    assert option in read_error_line(capsys)
    assert list(tmp_path.iterdir()) == [], "a refused command writes nothing"


@pytest.mark.parametrize(("value", "expected"), [("0", None), ("0.5", 0.5)])
def test_cli_max_grad_norm_zero_is_off(monkeypatch, tmp_path, capsys, value, expected):
    """Only 0 means "no clipping"; -1 must not be read as off (it is refused above)."""
    seen = {}

    def capture(model, data, out, config, **kwargs):
        seen["config"] = config
        raise ConfigError("captured")

    monkeypatch.setattr(unlearn_module, "unlearn_model", capture)
    argv = ["unlearn", "--model", "m", "--data", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*argv, "--max-grad-norm", value]) == 2
    assert "captured" in read_error_line(capsys)
    assert seen["config"].max_grad_norm == expected


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("lr", NAN, "--lr"),
        ("lr", 0.0, "--lr"),
        ("lr", "1e-4", "--lr"),  # what YAML makes of 1e-4 without a dot
        ("alpha", -0.5, "--alpha"),
        ("alpha", INF, "--alpha"),
        ("beta", 0.0, "--beta"),
        ("simnpo_beta", NAN, "--simnpo-beta"),
        ("simnpo_gamma", INF, "--simnpo-gamma"),
        ("rmu_coeff", NAN, "--rmu-coeff"),
        ("weight_decay", NAN, "--weight-decay"),
        ("max_grad_norm", 0.0, "--max-grad-norm"),
        ("max_grad_norm", INF, "--max-grad-norm"),
        ("sam_rho", INF, "--sam-rho"),
        ("warmup_steps", -1, "--warmup-steps"),
        ("max_steps", 0, "--steps"),
        ("max_steps", 2.5, "--steps"),
        ("batch_size", True, "--batch-size"),
        ("epochs", 0.0, "--epochs"),
        ("epochs", NAN, "--epochs"),
        ("eval_every", 0, "--eval-every"),
        ("checkpoint_every", 0, "--checkpoint-every"),
        ("stop_forget_recall", 1.5, "--stop-forget-recall"),
        ("stop_forget_recall", -0.1, "--stop-forget-recall"),
        ("stop_forget_nll", INF, "--stop-forget-nll"),
        ("stop_forget_nll", 0.0, "--stop-forget-nll"),
        ("reference_budget_gb", NAN, "reference_budget_gb"),
        ("max_length", 1, "max_length"),
    ],
)
def test_unlearn_config_refuses_bad_numbers(field, value, option):
    with pytest.raises(ConfigError, match=option) as error:
        UnlearnConfig(**{field: value})
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("lr", NAN, "--lr"),
        ("lr", -1e-3, "--lr"),
        ("max_steps", 0, "--steps"),
        ("epochs", INF, "--epochs"),
        ("batch_size", 0, "--batch-size"),
        ("warmup_steps", -5, "--warmup-steps"),
        ("weight_decay", -1.0, "weight_decay"),
        ("max_grad_norm", -1.0, "max_grad_norm"),
        ("max_grad_norm", NAN, "max_grad_norm"),
        ("eval_every", 0, "--eval-every"),
        ("checkpoint_every", 0, "--checkpoint-every"),
        ("max_length", 0, "max_length"),
    ],
)
def test_train_config_refuses_bad_numbers(field, value, option):
    with pytest.raises(ConfigError, match=option):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    ("field", "value", "option"),
    [
        ("lr", NAN, "--lr"),
        ("lr", INF, "--lr"),
        ("weight_decay", NAN, "--weight-decay"),
        ("max_grad_norm", -1.0, "--max-grad-norm"),
        ("sam_rho", NAN, "--sam-rho"),
        ("grad_accum", 0, "--grad-accum"),
        ("warmup_steps", -1, "--warmup-steps"),
        ("batch_size", 0, "--batch-size"),
    ],
)
def test_loop_config_refuses_bad_numbers(field, value, option):
    with pytest.raises(ConfigError, match=option):
        LoopConfig(**{field: value})


def test_good_numbers_are_accepted():
    UnlearnConfig(
        max_grad_norm=None, epochs=0.5, stop_forget_recall=0.0, stop_forget_nll=4.0, alpha=0.0, lr=1
    )
    TrainConfig(max_grad_norm=None, epochs=2, warmup_steps=0, weight_decay=0.0)
    LoopConfig(max_grad_norm=None, sam_rho=0.05)


# --------------------------------------------------------------------------------------------------
# Loading a model checks its weight files.


def _copy(trained_small, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(trained_small.path, folder)
    return folder


def _edit_tensors(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _drop_q_proj(folder: Path) -> None:
    _edit_tensors(folder, lambda t: t.pop(Q_PROJ))


def _add_tensor(folder: Path) -> None:
    _edit_tensors(folder, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(4)}))


def _reshape(folder: Path) -> None:
    _edit_tensors(folder, lambda t: t.update({Q_PROJ: t[Q_PROJ][:, : t[Q_PROJ].shape[1] // 2].clone()}))


def _poison(value: float):
    def damage(folder: Path) -> None:
        def edit(tensors):
            tensors[Q_PROJ][3, 5] = value

        _edit_tensors(folder, edit)

    return damage


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 64)


DAMAGES = {
    "missing tensor": (_drop_q_proj, f"lacks tensor {Q_PROJ}"),
    "unexpected tensor": (_add_tensor, "has tensor model.layers.0.extra.weight"),
    "wrong shape": (_reshape, f"tensor {Q_PROJ} has shape"),
    "nan": (_poison(NAN), f"tensor {Q_PROJ} holds NaN"),
    "inf": (_poison(-INF), f"tensor {Q_PROJ} holds infinite"),
    "truncated": (_truncate, "is not a readable safetensors file"),
    "garbage": (_garbage, "is not a readable safetensors file"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_load_model_refuses_damaged_weights(trained_small, tmp_path, damage):
    folder = _copy(trained_small, tmp_path)
    make, message = DAMAGES[damage]
    make(folder)
    with pytest.raises(ConfigError) as error:
        load_model(folder)
    text = str(error.value)
    assert message in text
    assert str(folder / "model.safetensors") in text, "the error names the file"
    assert "\n" not in text
    assert isinstance(error.value, WeightsError) and isinstance(error.value, ModelError)


@pytest.mark.parametrize("value", ["abc", [1, 2]])
def test_a_config_field_of_the_wrong_type_is_one_line(trained_small, tmp_path, value):
    folder = _copy(trained_small, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError) as error:
        load_model(folder)
    text = str(error.value)
    assert "hidden_size" in text and "expected int" in text and "\n" not in text


def test_load_model_checks_weights_in_the_precision_asked(trained_small, tmp_path):
    """A float32 weight beyond float16's range is infinite once loaded as float16."""
    folder = _copy(trained_small, tmp_path)
    _poison(1e6)(folder)
    load_model(folder)  # finite in float32
    with pytest.raises(WeightsError, match="holds infinite values once loaded as float16"):
        load_model(folder, dtype="float16")


def test_tied_lm_head_is_not_missing(trained_small, tmp_path):
    """With tie_word_embeddings the checkpoint has no lm_head; that is no missing tensor, whichever way a
    transformers version reports it."""
    model, tokenizer = load_model(trained_small.path)
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    save_model(model, tokenizer, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    tied, _ = load_model(tmp_path / "tied")
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    # Older transformers list a tied lm_head among the missing keys: accepted when it is tied ...
    _check_loading(tied, {"missing_keys": ["lm_head.weight"]}, "tied", {})
    # ... and refused when it is not.
    untied, _ = load_model(trained_small.path)
    with pytest.raises(WeightsError, match=r"lacks tensor lm_head\.weight"):
        _check_loading(untied, {"missing_keys": ["lm_head.weight"]}, "untied", {})


@pytest.mark.parametrize("damage", ["missing tensor", "truncated", "nan"])
def test_cli_refuses_damaged_models(trained_small, small_benchmark_dir, tmp_path, capsys, damage):
    folder = _copy(trained_small, tmp_path)
    make, message = DAMAGES[damage]
    make(folder)
    data = str(small_benchmark_dir)
    record = tmp_path / "eval.json"
    assert main(["eval", "--model", str(folder), "--data", data, "--out", str(record), "--quiet"]) == 2
    assert message in read_error_line(capsys)
    assert not record.exists()
    out = tmp_path / "unlearned"
    argv = ["unlearn", "--model", str(folder), "--data", data, "--out", str(out), "--steps", "2", "--quiet"]
    assert main(argv) == 2
    assert message in read_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"], "nothing is written"


# --------------------------------------------------------------------------------------------------
# A run that diverges stops with an error and saves nothing.


def _nan_from_third_call(monkeypatch) -> dict[str, int]:
    real = losses_module.ga_loss
    calls = {"n": 0}

    def ga_loss(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * NAN if calls["n"] >= 3 else loss

    monkeypatch.setattr(losses_module, "ga_loss", ga_loss)
    return calls


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(
    trained_small, small_benchmark_dir, tmp_path, monkeypatch
):
    calls = _nan_from_third_call(monkeypatch)
    out = tmp_path / "ga"
    config = UnlearnConfig(
        method="ga", lr=3e-5, batch_size=4, max_steps=6, checkpoint_every=2, eval_every=100
    )
    with pytest.raises(DivergenceError, match="the loss is nan at step 3 of 6") as error:
        unlearn_model(trained_small.path, small_benchmark_dir, out, config, run=RunContext(progress=False))
    assert isinstance(error.value, ConfigError)
    assert calls["n"] == 3, "the run stopped at the step whose loss was NaN"
    assert "nothing was saved" in str(error.value) and "\n" not in str(error.value)
    assert not out.exists(), "no model is saved"
    state = work_dir_for(out) / "checkpoint" / "state.json"
    assert json.loads(state.read_text())["step"] == 2, "the last good checkpoint stays"
    assert "checkpoint of step 2" in str(error.value)


def test_cli_non_finite_loss_is_one_error_line(
    trained_small, small_benchmark_dir, tmp_path, monkeypatch, capsys
):
    _nan_from_third_call(monkeypatch)
    out = tmp_path / "ga"
    argv = ["unlearn", "--model", str(trained_small.path), "--data", str(small_benchmark_dir)]
    argv += ["--out", str(out), "--method", "ga", "--steps", "5", "--batch-size", "4", "--quiet"]
    assert main(argv) == 2
    line = read_error_line(capsys)
    assert "unlearn ga diverged: the loss is nan at step 3 of 5" in line
    assert not out.exists()


def test_non_finite_gradient_stops_before_the_weights_change():
    """A finite loss whose gradient is infinite (sqrt at 0) must not reach the optimiser: one such step
    would leave NaN weights, and after the last step nothing else would notice."""
    model = torch.nn.Linear(3, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def loss_fn(model, batch):
        shift = model.weight - model.weight.detach()  # 0, with gradient 1
        return torch.sqrt(shift.sum()) + model(batch).sum() * 0, {}

    config = LoopConfig(lr=0.1, max_steps=3, max_grad_norm=None)
    with pytest.raises(DivergenceError, match="gradient is not finite at step 1 of 3"):
        run_loop(model, config, lambda step, micro: torch.ones(2, 3), loss_fn, run_key="x", progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("state", ['{"run_key": "another run", "step": 1}', "{not json", ""])
def test_overwrite_gets_past_a_stale_or_damaged_checkpoint(
    trained_small, small_benchmark_dir, tmp_path, state
):
    from relapse.methods.unlearn import UnlearnConfig, unlearn_model
    from relapse.training.loop import work_dir_for

    out = tmp_path / "u"
    checkpoint = work_dir_for(out) / "checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(state)
    config = UnlearnConfig(method="ga", max_steps=2, eval_every=100, batch_size=8)
    with pytest.raises(ConfigError, match=r"different run|damaged") as error:
        unlearn_model(trained_small.path, small_benchmark_dir, out, config, run=RunContext(progress=False))
    assert "--overwrite" in str(error.value) and "\n" not in str(error.value)
    assert not out.exists()
    result = unlearn_model(
        trained_small.path, small_benchmark_dir, out, config, run=RunContext(progress=False, overwrite=True)
    )
    assert result.record["steps"] == 2 and (out / "model.safetensors").is_file()
    assert not work_dir_for(out).exists()  # the finished run drops its work folder


# --------------------------------------------------------------------------------------------------
# Outputs: nothing a command did not write is replaced without --overwrite; one audit per folder.


def _audit_argv(trained_small, small_benchmark_dir, out) -> list[str]:
    return [
        "audit",
        "--target",
        str(trained_small.path),
        "--unlearned",
        str(trained_small.path),
        "--data",
        str(small_benchmark_dir),
        "--attacks",
        "rtn-w8-ch",
        "--metrics",
        "recall_forget",
        "--out",
        str(out),
        "--quiet",
    ]


def test_audit_refuses_a_folder_with_the_users_own_files(
    trained_small, small_benchmark_dir, tmp_path, capsys
):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "report.md").write_text("my own notes\n")
    assert main(_audit_argv(trained_small, small_benchmark_dir, out)) == 2
    assert "report.md" in read_error_line(capsys)
    assert (out / "report.md").read_text() == "my own notes\n"
    assert sorted(p.name for p in out.iterdir()) == ["report.md"]  # and nothing else written


def test_a_second_audit_into_a_busy_folder_is_refused_naming_the_first(
    trained_small, small_benchmark_dir, tmp_path, capsys
):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "what": "audit", "started": "then"}))
        assert main(_audit_argv(trained_small, small_benchmark_dir, out)) == 2
        line = read_error_line(capsys)
        assert f"pid {sleeper.pid}" in line and "another audit is running" in line
        assert not (out / "results.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone: its lock is stale, and the next audit takes the folder over.
    assert main(_audit_argv(trained_small, small_benchmark_dir, out)) == 0
    assert (out / "results.json").is_file() and not (out / LOCK_NAME).exists()


def test_diff_json_does_not_overwrite_an_existing_file(trained_small, tmp_path, capsys):
    existing = tmp_path / "diff.json"
    existing.write_text("keep me")
    argv = ["diff", "--a", str(trained_small.path), "--b", str(trained_small.path), "--json", str(existing)]
    assert main(argv) == 2
    assert "--overwrite" in read_error_line(capsys)
    assert existing.read_text() == "keep me"
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads(existing.read_text())["total"]["codes_changed"] == 0.0


# --------------------------------------------------------------------------------------------------
# Places that cannot be written, a full disk, a hub that is not there.


@pytest.fixture
def immutable_folder(tmp_path):
    """A folder nobody may write into, root included (``chattr +i``), where the platform allows it."""
    folder = tmp_path / "immutable"
    folder.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("no chattr here to make an immutable folder")
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make an immutable folder here: {made.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=False)


def test_unlearn_into_a_folder_it_cannot_write_fails_before_any_work(
    trained_small, small_benchmark_dir, immutable_folder, capsys, monkeypatch
):
    started = []
    monkeypatch.setattr(unlearn_module, "load_model", lambda *a, **k: started.append(1))
    out = immutable_folder / "ga"
    argv = ["unlearn", "--model", str(trained_small.path), "--data", str(small_benchmark_dir)]
    assert main([*argv, "--out", str(out), "--method", "ga", "--steps", "2", "--quiet"]) == 2
    line = read_error_line(capsys)
    assert "cannot write the output folder" in line and str(out) in line
    assert started == [] and list(immutable_folder.iterdir()) == []


def test_audit_into_a_folder_it_cannot_write_is_one_line(
    trained_small, small_benchmark_dir, immutable_folder, capsys
):
    out = immutable_folder / "audit"
    assert main(_audit_argv(trained_small, small_benchmark_dir, out)) == 2
    assert "cannot write the audit folder" in read_error_line(capsys)
    assert list(immutable_folder.iterdir()) == []


def test_a_full_disk_while_saving_leaves_no_partial_folder(trained_small, tmp_path, monkeypatch):
    model, tokenizer = load_model(str(trained_small.path))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(model, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_model(model, tokenizer, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the model nor a hidden .saving- folder


@pytest.mark.parametrize(("code", "text"), [(28, "No space left on device"), (30, "Read-only file system")])
def test_the_cli_says_a_full_disk_or_a_read_only_place_in_one_line(monkeypatch, tmp_path, capsys, code, text):
    import relapse.cli.report as report_command

    def fails(args):
        raise OSError(code, text, str(tmp_path / "results.json"))

    monkeypatch.setattr(report_command, "execute", fails)
    assert main(["report", str(tmp_path)]) == 2
    line = read_error_line(capsys)
    assert text in line and str(tmp_path / "results.json") in line and "a rerun resumes" in line


def test_a_model_name_that_is_neither_a_folder_nor_reachable_fails_at_once(monkeypatch):
    import relapse.models.io as io_module

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network call at all
    assert io_module.hub_reachable() is False
    monkeypatch.setattr(
        io_module.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("tried")
    )
    with pytest.raises(ModelError, match=r"not a model folder here, and the hub .* cannot be reached"):
        load_model("someone/no-such-model")


@pytest.mark.parametrize("option", [["--jobs", "0"], ["--seeds", "0"]])
def test_demo_refuses_a_bad_process_or_seed_count_before_writing_anything(tmp_path, capsys, option):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet", *option]) == 2
    assert "must be a whole number >= 1" in read_error_line(capsys)
    assert not out.exists()
