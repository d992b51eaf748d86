"""Two processes on localhost (gloo CPU collectives) train in lockstep and end where one
process with the same global batch ends."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import jax
import numpy as np
from conftest import sigint_as_in_a_terminal, wait_for

from rr_jax.checkpoint import Checkpointer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(workdir, data_dir, devices, extra=(), **popen):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    command = [
        sys.executable, "launch.py", "--config=configs/fashion_mnist.py", f"--workdir={workdir}",
        f"--config.data_dir={data_dir}", "--config.max_steps=3", "--config.relational.num_views=2",
        "--config.batch_size=8", "--config.log_every_steps=1", "--config.probe.enabled=False",
        "--config.pretrain_split=train[:512]", *extra,
    ]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **popen)


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


def test_ctrl_c_on_one_process_stops_both_at_the_same_step(tmp_path, fashion_mnist_dir):
    """The processes agree on stopping: the one without the signal saves the same step
    and exits too (alone, it would wait in the next step's collective for ever)."""
    port = free_port()
    workdir = tmp_path / "run"
    processes = [launch(workdir, fashion_mnist_dir, 1, [
        "--num_processes=2", f"--process_id={i}", f"--coordinator_address=localhost:{port}",
        "--config.max_steps=100000", "--config.checkpoint.every_steps=2"], preexec_fn=sigint_as_in_a_terminal())
        for i in range(2)]
    wait_for(workdir / "checkpoints" / "2", os.path.isdir, processes[0])
    processes[1].send_signal(signal.SIGINT)
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [130, 130], outputs
    stopped = {int(re.search(r"Interrupted at step (\d+) of \d+;", output).group(1)) for output in outputs}
    assert stopped == {Checkpointer(str(workdir)).latest_step()}
    assert all("Traceback" not in output for output in outputs)


READER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from rr_jax import datasets, inputs, sources
from rr_jax.config import base_config

config = base_config()
config.dataset, config.image_folder, config.data_dir = "tiny_imagenet", sys.argv[3], sys.argv[4]
config.data.streaming, config.batch_size, config.seed = "stream", 8, 5
config.data.read_threads, config.data.prefetch_steps = 1, 1
read, record_source = [], sources.record_source

class Counting:
    def __init__(self, source):
        self.source = source
    def __len__(self):
        return len(self.source)
    def __getitem__(self, index):
        read.append(int(index))
        return self.source[index]

sources.record_source = lambda *args, **kwargs: Counting(record_source(*args, **kwargs))
batches = inputs.pretrain_batches(
    config, inputs.dataset_spec(config), start_step=0, process_index=jax.process_index(),
    process_count=jax.process_count(), local_device_count=jax.local_device_count())
labels = [next(batches)["label"].ravel().tolist() for _ in range(3)]
print("RESULT" + json.dumps({"read": read[:12], "labels": labels}))
"""


def test_each_of_two_processes_reads_only_its_half_of_each_global_batch(tmp_path):
    from image_trees import tiny_imagenet_tree

    from rr_jax import datasets, sources

    root = tiny_imagenet_tree(str(tmp_path / "folders"))  # 12 images, 3 classes
    spec = datasets.get_dataset_spec("tiny_imagenet", image_folder=root)
    _, labels = sources.load_split(spec, "train", str(tmp_path / "tfds"))  # prepared once, before both start
    port = free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    processes = [subprocess.Popen(
        [sys.executable, "-c", READER, f"localhost:{port}", str(i), root, str(tmp_path / "tfds")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    results = []
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
        results.append(json.loads(output.split("RESULT")[-1]))
    for step in range(3):  # 12 images, M=8: one step per epoch, the last 4 images dropped
        perm = np.random.default_rng([5, step]).permutation(12)
        for p, result in enumerate(results):
            half = perm[4 * p : 4 * p + 4]
            assert result["read"][4 * step : 4 * step + 4] == half.tolist()  # its records, nothing else
            assert result["labels"][step] == labels[half].tolist()
