"""Data parallelism: the course's loop in two processes (accelerate launch, gloo on CPU) trains the
same weights as one process on the same global batches."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from course_lib.tooling import ddp_demo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# the largest weight difference allowed between two-process and one-process training (see below)
TOLERANCE = {"sgd": 1e-6, "adamw": 1e-4}


def test_two_processes_train_like_one(tmp_path):
    """Two processes, each on its half of every global micro-batch (8 rows, 2 micro-batches per
    step, 4 steps with warm-up and cosine decay), end with *identical* weights (DDP all-reduces the
    gradients, so both replicas take the very same step), and those weights equal single-process
    training on the whole batches within a tolerance, for plain SGD and for AdamW with clipping.

    Why not exactly: the two runs add the same numbers in a different order (each process's mean
    over 4 rows, then the average of the two, against one mean over 8 rows), so gradients differ in
    the last bits (~1e-7 relative). With SGD the weights inherit that: measured ~1e-8, tolerance
    1e-6. AdamW divides by sqrt(v), which enlarges the relative error of gradient entries near zero
    (at its first step, an entry moves by lr · sign(g) whatever its size): measured ~6e-6, tolerance
    1e-4. The errors the test is for are far larger: gradients summed instead of averaged over the
    processes moves the weights by 4e-2 (SGD) and 6e-3 (AdamW) away from single-process training.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TMPDIR": str(tmp_path)}   # the launcher (torch.distributed.run) keeps its log folders there
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "course_lib.tooling.ddp_demo", "--out", str(tmp_path),
               "--optimizers", *TOLERANCE]
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]

    for optimizer, tolerance in TOLERANCE.items():
        ranks = [load_file(str(tmp_path / f"{optimizer}-rank{i}.safetensors")) for i in range(2)]
        logs = [json.loads((tmp_path / f"{optimizer}-rank{i}.json").read_text()) for i in range(2)]
        assert [log["processes"] for log in logs] == [2, 2] and logs[0]["backend"] == "gloo"
        assert ranks[0].keys() == ranks[1].keys()
        assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])    # the replicas never diverge
        assert logs[0]["loss"] == logs[1]["loss"]                               # the mean over both processes

        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # the same matmul kernels as the launched processes
        try:
            model, history = ddp_demo.run(optimizer)
        finally:
            torch.set_num_threads(threads)
        single = ddp_demo.state_dict_for_saving(model)
        initial = ddp_demo.state_dict_for_saving(ddp_demo.models.tiny_llama(0))
        worst = max((ranks[0][k] - single[k]).abs().max().item() for k in single)
        moved = max((single[k] - initial[k]).abs().max().item() for k in single)
        print(f"{optimizer}: largest weight difference two processes vs one {worst:.1e}, largest move {moved:.1e}")
        assert worst < tolerance
        assert moved > 1e-2        # it did train: the comparison is not between two untouched models
        assert logs[0]["loss"] == pytest.approx(history.loss, rel=1e-5)
        assert logs[0]["lr"] == pytest.approx(history.lr)
