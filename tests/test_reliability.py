"""Preemption, damage and misuse: locks, resume checks, damaged checkpoints, imported
weights, metrics trimming, early validation, clean errors and a calm console."""

import glob
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest
from absl import logging as absl_logging
from conftest import mocked_tfds
from image_trees import class_folders_tree, slimagenet_tree
from test_pipeline import load_config, tiny

from rr_jax import config as config_lib
from rr_jax import data, train
from rr_jax.checkpoint import Checkpointer
from rr_jax.errors import (
    ConfigError,
    DatasetContentError,
    DatasetError,
    DatasetNotFoundError,
    ResumeError,
    UserError,
    WorkdirBusyError,
)
from rr_jax.run_dir import RunDirectory, check_resumable, third_party_logs_to_file, unknown_key_message

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the workdir lock


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
    with RunDirectory(str(tmp_path)):
        with pytest.raises(WorkdirBusyError, match=rf"{tmp_path}.*process {os.getpid()}"):
            RunDirectory(str(tmp_path)).__enter__()
    with RunDirectory(str(tmp_path)):  # released on close
        pass


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom rr_jax.run_dir import RunDirectory\n"
         f"with RunDirectory({str(tmp_path)!r}):\n    print('locked', flush=True)\n    time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusyError, match=f"process {holder.pid}"):
        RunDirectory(str(tmp_path)).__enter__()
    holder.kill()  # SIGKILL: no cleanup runs in the holder
    holder.wait()
    with RunDirectory(str(tmp_path)):
        assert f"process {os.getpid()}" in (tmp_path / "lock").read_text()


# ------------------------------------------------------------------ config on resume


def test_resume_refuses_changed_fields_and_names_them():
    saved = config_lib.base_config().to_dict()
    current = config_lib.base_config()
    current.relational.num_views = 4
    current.relational.hidden_dim = 128
    current.max_steps, current.checkpoint.every_steps, current.data_dir = 7, 3, "/data"  # may change
    with pytest.raises(ResumeError) as error:
        check_resumable(saved, current.to_dict(), step=50)
    message = str(error.value)
    assert "relational.num_views: checkpoint 32, now 4" in message
    assert "relational.hidden_dim: checkpoint 256, now 128" in message
    assert "max_steps" not in message.split("Fields that may")[0] and "step 50" in message
    check_resumable(saved, current.to_dict(), step=50, allow=("relational.num_views", "relational.hidden_dim"))
    check_resumable(saved, current.to_dict(), step=50, only=("model.backbone",))
    # The probe may change, not the images its hold-out took away from pretraining.
    current = config_lib.base_config()
    current.probe.epochs, current.probe.enabled = 5, False
    check_resumable(saved, current.to_dict(), step=50)
    current.probe.holdout_fraction, current.probe.holdout_seed = 0.2, 1
    with pytest.raises(ResumeError, match="probe.holdout_fraction: checkpoint 0.1, now 0.2"):
        check_resumable(saved, current.to_dict(), step=50)


def test_unknown_config_keys_get_a_close_match():
    config = config_lib.base_config().to_dict()
    assert unknown_key_message("--config.relatonal.num_views=3", config) == (
        "unknown config key 'relatonal' (did you mean 'relational'?).")
    assert unknown_key_message("--config.relational.num_view=3", config) == (
        "unknown config key 'relational.num_view' (did you mean 'relational.num_views'?).")
    assert unknown_key_message("--config.zzz=1", config) == "unknown config key 'zzz'."
    assert unknown_key_message("--config.seed=1", config) is None


# ------------------------------------------------------------------ metrics.jsonl


def test_trim_metrics_keeps_each_step_once(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)] + [json.dumps({"step": 2, "knn_top1": 0.5})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a line cut by a kill
    with RunDirectory(str(tmp_path)) as run:
        assert run.trim_metrics(2) == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 2, "knn_top1": 0.5}]
    assert not glob.glob(str(tmp_path / "metrics.jsonl.tmp*"))


# ------------------------------------------------------------------ validation first


@pytest.mark.parametrize("key, value, match", [
    ("augment.flip_prob", 1.5, "flip_prob"),
    ("augment.crop_scale", (0.9, 0.1), "crop_scale"),
    ("seed", -1, "config.seed"),
    ("optimizer.momentum", 1.0, "config.optimizer.momentum"),
    ("probe.holdout_fraction", 1.0, r"config.probe.holdout_fraction=1.0 is not allowed: it must be in \[0, 1\)"),
    ("probe.holdout_seed", -1, "config.probe.holdout_seed=-1"),
])
def test_late_fields_are_validated_before_anything_is_created(tmp_path, key, value, match):
    config = config_lib.base_config()
    target, *parents_and_last = [config] + key.split(".")
    for part in parents_and_last[:-1]:
        target = target[part]
    target[parents_and_last[-1]] = value
    with pytest.raises(ConfigError, match=match):
        train.pretrain(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # no workdir, config.json, metrics or tensorboard


def test_labelled_method_on_an_unlabelled_split_is_refused():
    config = load_config("stl10")
    config.method = "supervised"
    with pytest.raises(ConfigError, match="'unlabelled' has none"):
        config_lib.validate_config(config, device_count=8)
    config.pretrain_split = "train"
    config_lib.validate_config(config, device_count=8)


# ------------------------------------------------------------------ checkpoints


def _damage(step_dir: pathlib.Path, how: str) -> None:
    arrays = sorted(glob.glob(str(step_dir / "state" / "**" / "d" / "*"), recursive=True))
    if how == "truncated arrays":
        for path in arrays:
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    elif how == "deleted arrays":
        for path in arrays:
            os.remove(path)
    elif how == "garbage metadata":
        (step_dir / "state" / "_METADATA").write_text("garbage{")
    elif how == "garbage config":
        (step_dir / "config" / "metadata").write_text("\x00\x01")
    elif how == "no train state":
        shutil.rmtree(step_dir / "state")


@pytest.mark.parametrize("how", ["truncated arrays", "deleted arrays", "garbage metadata", "garbage config",
                                 "no train state"])
def test_damaged_latest_checkpoint_falls_back_and_is_kept_aside(tmp_path, how):
    checkpointer = Checkpointer(str(tmp_path), 3)
    trees = {step: {"w": np.arange(500.0) + step} for step in (1, 2)}
    for step, tree in trees.items():
        checkpointer.save(step, tree, tree, config_lib.base_config().to_dict())
    checkpointer.wait()
    _damage(tmp_path / "checkpoints" / "2", how)

    fresh = {"w": np.zeros(500)}
    state, step = train._restore(Checkpointer(str(tmp_path), 3), fresh, config_lib.base_config(), (), True)
    assert step == 1
    np.testing.assert_array_equal(state["w"], trees[1]["w"])
    assert (tmp_path / "checkpoints_damaged" / "2").is_dir()  # kept for inspection
    assert Checkpointer(str(tmp_path)).all_steps() == [1]


def test_failed_restore_prints_no_tracebacks_of_late_reads(tmp_path, monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    tree = {f"w{i}": np.arange(5000.0) + i for i in range(20)}
    writer = Checkpointer(str(tmp_path))
    writer.save(1, tree, tree, config_lib.base_config().to_dict())
    writer.wait()
    _damage(tmp_path / "checkpoints" / "1", "truncated arrays")
    with pytest.raises(Exception, match="OUT_OF_RANGE"):
        Checkpointer(str(tmp_path)).restore_state(1, {name: np.zeros(5000) for name in tree})
    time.sleep(1)  # the reads still in flight finish, each reporting "Event loop is closed" unless dropped
    elsewhere = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), exc_traceback=None)
    sys.unraisablehook(elsewhere)  # the same words from anywhere else still get through
    assert reported == [elsewhere]


def test_damaged_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, fast_compile):
    def config():
        return tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=4, **{
            "model.backbone": "conv4", "checkpoint.every_steps": 2, "checkpoint.max_to_keep": 5})

    with mocked_tfds(tmp_path / "tfds", 64):
        reference = train.pretrain(config(), str(tmp_path / "run"))
        _damage(tmp_path / "run" / "checkpoints" / "4", "truncated arrays")
        again = train.pretrain(config(), str(tmp_path / "run"))  # from step 2 back to 4
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # 3 and 4 were logged twice, then trimmed once


def test_imported_weights_are_trained_from_and_never_rotated_away(tmp_path, fast_compile):
    config = tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=3, **{
        "model.backbone": "conv4", "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 1,
        "optimizer.learning_rate": 1e-30})
    spec = data.get_dataset_spec("cifar10")
    backbone = train.make_backbone(config, axis_name=None)
    imported = jax.tree.map(lambda x: np.asarray(x) + 0.5,
                            backbone.init(jax.random.key(7), np.zeros((2, *spec.image_shape)), train=False))
    writer = Checkpointer(str(tmp_path / "run"))
    writer.save_weights(0, imported, config.to_dict())
    writer.wait()
    with mocked_tfds(tmp_path / "tfds", 64):
        state = train.pretrain(config, str(tmp_path / "run"))
    # A learning rate of 1e-30 leaves the weights where training started: the import.
    for a, b in zip(jax.tree.leaves(state.params["backbone"]), jax.tree.leaves(imported["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert Checkpointer(str(tmp_path / "run")).all_steps() == [0, 3]


def test_imported_weights_of_another_backbone_are_refused(tmp_path, fast_compile):
    config = tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=1, **{"model.backbone": "conv4"})
    other = config_lib.base_config().to_dict()  # resnet32
    writer = Checkpointer(str(tmp_path / "run"))
    writer.save_weights(0, {"params": {"w": np.zeros(2)}, "batch_stats": {}}, other)
    writer.wait()
    with mocked_tfds(tmp_path / "tfds", 64), pytest.raises(ResumeError, match="model.backbone: checkpoint 'resnet32'"):
        train.pretrain(config, str(tmp_path / "run"))
    assert Checkpointer(str(tmp_path / "run")).all_steps() == [0]  # nothing lost


# ------------------------------------------------------------------ data


def _folder_run(tmp_path, root, **overrides):
    """A conv4 run on an image folder of 16x16 images: the config and its workdir."""
    return tiny(config_lib.base_config(), tmp_path / "tfds", max_steps=1, **{
        "dataset": "image_folder", "image_folder": root, "data.image_size": 16, "model.backbone": "conv4",
        **overrides}), tmp_path / "run"


@pytest.mark.parametrize("case, error, match", [
    ("batch larger than the split", ConfigError,
     r"config.batch_size=24 is not allowed: the split 'train' \(train without the 10% held out as the test split\) of "
     r"image_folder holds 17 images; use at most 16 \(a multiple of the 8 devices\)"),
    ("no test split and no hold-out", DatasetNotFoundError,
     r"The 'test' split folder .*tree/test' was not found.* set config.probe.holdout_fraction > 0"),
    ("a test image that does not decode", DatasetContentError, r"Cannot decode image file .*/test/n02/n02_1.png"),
    ("kNN bank smaller than k", ConfigError, r"config.knn_monitor.k=20 is not allowed: the kNN bank holds 17 images"),
])
def test_data_errors_end_the_run_before_anything_is_trained(tmp_path, case, error, match):
    root, _ = class_folders_tree(str(tmp_path))  # 20 images; 17 after the hold-out of 10% (3 classes)
    overrides = {"batch larger than the split": {"batch_size": 24},
                 "no test split and no hold-out": {"probe.holdout_fraction": 0.0},
                 "kNN bank smaller than k": {"knn_monitor.every_steps": 1}}.get(case, {})
    if case == "a test image that does not decode":
        root = slimagenet_tree(str(tmp_path / "folders"), per_class=(2, 2))
        with open(os.path.join(root, "test", "n02", "n02_1.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n not an image")
    config, workdir = _folder_run(tmp_path, root, **overrides)
    with pytest.raises(error, match=match) as raised:
        train.pretrain(config, str(workdir))
    assert isinstance(raised.value, UserError)  # launch.py: this message alone, exit code 2
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


def test_launch_ends_a_batch_larger_than_the_split_with_one_line(tmp_path):
    root, _ = class_folders_tree(str(tmp_path))
    result = subprocess.run(
        [sys.executable, "launch.py", "--config=configs/fashion_mnist.py", "--config.dataset=image_folder",
         f"--config.image_folder={root}", f"--config.data_dir={tmp_path / 'tfds'}", "--config.data.image_size=16",
         "--config.data.mean=(0.5,0.5,0.5)", "--config.data.std=(0.25,0.25,0.25)", "--config.batch_size=18",
         f"--workdir={tmp_path / 'run'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""},
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        "Error: config.batch_size=18 is not allowed: the split 'train' (train without the 10% held out as the test "
        "split) of image_folder holds 17 images; use at most 17.")
    assert "Traceback" not in result.stderr


def test_damaged_dataset_names_the_directory_and_the_fix(tmp_path, fashion_mnist_dir):
    shutil.copytree(fashion_mnist_dir, tmp_path / "tfds")
    spec = data.get_dataset_spec("fashion_mnist")
    (record,) = glob.glob(str(tmp_path / "tfds" / "fashion_mnist" / "*" / "*test.tfrecord*"))
    with open(record, "r+b") as f:
        f.seek(os.path.getsize(record) // 2)
        f.write(b"\xff" * 4096)
    with pytest.raises(DatasetError, match=r"fashion_mnist.*is damaged.*Delete .*fashion_mnist/\S+ and run again"):
        data.load_split(spec, "test", str(tmp_path / "tfds"))


# ------------------------------------------------------------------ console


def test_console_shows_our_lines_and_warnings_and_the_file_keeps_everything(tmp_path):
    handler = absl_logging.get_absl_handler()
    orbax_like = logging.LogRecord("absl", logging.INFO, "/site-packages/orbax/checkpoint/x.py", 1, "orbax chatter",
                                   None, None)
    ours = logging.LogRecord("absl", logging.INFO, train.__file__, 1, "our line", None, None)
    warning = logging.LogRecord("absl", logging.WARNING, "/site-packages/orbax/x.py", 1, "a warning", None, None)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # as under app.run
    try:
        with third_party_logs_to_file(str(tmp_path / "log.txt")):
            assert [handler.filter(r) for r in (orbax_like, ours, warning)] == [False, True, True]
            absl_logging.info("written to the file")
    finally:
        absl_logging.set_verbosity(verbosity)
    assert handler.filter(orbax_like)  # the console is left as it was
    assert "written to the file" in (tmp_path / "log.txt").read_text()


# ------------------------------------------------------------------ launch.py end to end


def _launch(workdir, data_dir, *overrides, **popen):
    command = [sys.executable, "launch.py", "--config=configs/fashion_mnist.py", f"--workdir={workdir}",
               f"--config.data_dir={data_dir}", "--config.probe.enabled=True", "--config.probe.epochs=1",
               "--config.checkpoint.every_steps=2", "--config.log_every_steps=1", *overrides]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def test_launch_preemption_lock_and_resume_checks(tmp_path, fashion_mnist_dir):
    workdir = tmp_path / "run"
    first = _launch(workdir, fashion_mnist_dir, "--config.max_steps=100000")
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3) and time.time() < deadline:
        assert first.poll() is None, first.communicate()
        time.sleep(0.5)

    second = _launch(workdir, fashion_mnist_dir, "--config.max_steps=4")
    _, err = second.communicate(timeout=600)
    assert second.returncode == 2
    assert f"--workdir={workdir} is in use by process {first.pid}" in err and "Traceback" not in err

    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 143, err
    assert "Re-run the same command to resume" in err
    assert not (workdir / "probe_results.json").exists()  # no probe on an unfinished model
    stopped = Checkpointer(str(workdir)).latest_step()

    changed = _launch(workdir, fashion_mnist_dir, "--config.relational.num_views=3")
    _, err = changed.communicate(timeout=600)
    assert changed.returncode == 2
    assert "relational.num_views: checkpoint 4, now 3" in err and "Traceback" not in err

    finish = _launch(workdir, fashion_mnist_dir, f"--config.max_steps={stopped + 2}")
    out, err = finish.communicate(timeout=900)
    assert finish.returncode == 0, err
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, stopped + 3))  # each step once, no repeats after the resume
    assert (workdir / "probe_results.json").exists()
    ours = {os.path.basename(p) for p in glob.glob(str(ROOT / "rr_jax" / "*.py"))} | {"launch.py"}
    info_sources = set(re.findall(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\]", err, flags=re.M))
    assert info_sources and info_sources <= ours, info_sources  # no third-party INFO chatter on the console
    assert "oneDNN" not in err and "absl::InitializeLog" not in err, err  # nor TensorFlow's C++ start-up lines
    assert "checkpoint_manager.py" in (workdir / "log.txt").read_text()  # ... it is in the log file
