"""Data parallelism: batch sharding, and a real 2-process run under `accelerate launch`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from relapse.methods.unlearn import UnlearnConfig, unlearn_model
from relapse.runtime import RunContext
from relapse.training.parallel import DataParallel
from tests.conftest import weight_distance


def test_shard_takes_every_world_th_row_of_nested_batches():
    batch = {
        "forget": {"input_ids": torch.arange(10).reshape(5, 2), "index": torch.arange(5)},
        "retain": {"index": torch.tensor([7])},
    }
    first, second = DataParallel(0, 2).shard(batch), DataParallel(1, 2).shard(batch)
    assert first["forget"]["index"].tolist() == [0, 2, 4]
    assert second["forget"]["index"].tolist() == [1, 3]
    assert first["forget"]["input_ids"].tolist() == [[0, 1], [4, 5], [8, 9]]
    # Fewer rows than processes: every process keeps all of them (averaging then changes nothing).
    assert first["retain"]["index"].tolist() == second["retain"]["index"].tolist() == [7]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_under_accelerate_launch_match_one(trained_small, small_benchmark_dir, tmp_path):
    pytest.importorskip("accelerate")
    steps, method, lr = 4, "npo+gdr", 1e-4
    single = unlearn_model(
        trained_small.path,
        small_benchmark_dir,
        tmp_path / "single",
        UnlearnConfig(method=method, lr=lr, max_steps=steps, eval_every=100),
        run=RunContext(progress=False),
    )
    env = {**os.environ, "RELAPSE_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "relapse",
        "unlearn",
        "--model",
        str(trained_small.path),
        "--data",
        str(small_benchmark_dir),
        "--out",
        str(tmp_path / "dp"),
        "--method",
        method,
        "--lr",
        str(lr),
        "--steps",
        str(steps),
        "--eval-every",
        "100",
        "--quiet",
    ]
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("npo+gdr, 4 steps") == 1, "only the main process reports"
    record = json.loads((tmp_path / "dp" / "unlearn.json").read_text())
    assert record["world_size"] == 2
    # Each process saw half of every batch and gradients were averaged: the same optimisation up to the
    # per-process token averaging, so the loss curves agree closely and the weights land nearby.
    assert record["loss_curve"] == pytest.approx(single.record["loss_curve"], rel=2e-3)
    start = load_file(str(trained_small.path / "model.safetensors"))
    one = load_file(str(single.path / "model.safetensors"))
    two = load_file(str(tmp_path / "dp" / "model.safetensors"))
    moved, apart = weight_distance(one, start), weight_distance(two, one)
    # apart > 0: the processes really split the batch (identical full batches would give identical weights).
    assert moved > 0 and 0 < apart < 0.1 * moved
