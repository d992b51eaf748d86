"""Two processes on localhost (gloo CPU collectives) train in lockstep and end where one
process with the same global batch ends."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np

from rr_jax.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, data_dir, devices, extra=()):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [
        sys.executable, "launch.py", "--config=configs/fashion_mnist.py", f"--workdir={workdir}",
        f"--config.data_dir={data_dir}", "--config.max_steps=3", "--config.relational.num_views=2",
        "--config.batch_size=8", "--config.log_every_steps=1", "--config.probe.enabled=False",
        "--config.pretrain_split=train[:512]", *extra,
    ]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def final_state(workdir):
    checkpointer = Checkpointer(str(workdir))
    step = checkpointer.latest_step()
    assert step == 3
    backbone, _ = checkpointer.restore_backbone(step)
    return backbone


def test_two_processes_match_one_process(tmp_path, fashion_mnist_dir):
    port = free_port()
    two = [launch(tmp_path / "two", fashion_mnist_dir, 1, [
        "--num_processes=2", f"--process_id={i}", f"--coordinator_address=localhost:{port}"])
        for i in range(2)]
    one = launch(tmp_path / "one", fashion_mnist_dir, 2)
    for process in [*two, one]:
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output[-3000:]
    many, single = final_state(tmp_path / "two"), final_state(tmp_path / "one")
    for a, b in zip(jax.tree.leaves(many), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    steps = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("two", "one")]
    assert len(steps[0]) == len(steps[1]) == 3
