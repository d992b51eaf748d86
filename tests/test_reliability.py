"""Preemption, damage and misuse: locks, resume checks, damaged checkpoints, imported
weights, metrics trimming, early validation, clean errors and a calm console."""

import asyncio
import errno
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
from conftest import mocked_tfds, sigint_as_in_a_terminal, wait_for
from image_trees import class_folders_tree, slimagenet_tree
from test_pipeline import load_config, tiny

from rr_jax import config as config_lib
from rr_jax import datasets, observe, resume, sources, train
from rr_jax.checkpoint import Checkpointer
from rr_jax.errors import (
    CheckpointWriteError,
    ConfigError,
    DatasetContentError,
    DatasetError,
    DatasetNotFoundError,
    MetricsWriteError,
    ResumeError,
    UserError,
    WorkdirBusyError,
    exit_cleanly_on_known_errors,
    os_error,
    writing,
)
from rr_jax.objectives.relational import Relational
from rr_jax.run_dir import RunDirectory, check_resumable, is_run_directory, third_party_logs_to_file, unknown_key_message
from rr_jax.step import make_backbone

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
    with RunDirectory(str(tmp_path)):  # a run that logged, then was killed
        lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4)] + [json.dumps({"step": 2, "knn_top1": 0.5})]
        (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 5, "lo')  # a line cut by a kill
    with RunDirectory(str(tmp_path)) as run:
        assert run.trim_metrics(2) == 3
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 1.0}, {"step": 2, "knn_top1": 0.5}]
    assert not glob.glob(str(tmp_path / "metrics.jsonl.tmp*"))


# ------------------------------------------------------------------ whose workdir


def _snapshot(root):
    """Every path under `root` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


FOREIGN_WORKDIRS = {
    "their metrics": {"metrics.jsonl": '{"epoch": 1, "acc": 0.5}\n{"epoch": 2, "acc": 0.6}\n'},
    "their lock and checkpoints": {"lock": "pid 4242\n", "checkpoints/3/model.pt": "weights", "notes.txt": "mine"},
}


@pytest.mark.parametrize("name", FOREIGN_WORKDIRS)
def test_a_directory_rr_jax_did_not_make_is_refused_untouched(tmp_path, name):
    for relative, text in FOREIGN_WORKDIRS[name].items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    before = _snapshot(tmp_path)
    shown = ", ".join(sorted(p if "/" not in p else p.split("/")[0] + "/" for p in FOREIGN_WORKDIRS[name]))
    with pytest.raises(UserError, match=rf"--workdir={tmp_path} is not empty and is not an rr_jax workdir: it holds "
                                        rf"{re.escape(shown)}\."):
        RunDirectory(str(tmp_path)).__enter__()
    assert _snapshot(tmp_path) == before  # no lock, no log file, nothing trimmed


def test_rr_jax_workdirs_are_recognised(tmp_path):
    with RunDirectory(str(tmp_path / "new")):  # absent: created
        (tmp_path / "new" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "empty").mkdir()
    (tmp_path / "killed_at_start").mkdir()
    (tmp_path / "killed_at_start" / "lock").write_text("")  # created, not yet written
    (tmp_path / "other_host_first").mkdir()  # process 1 of a multi-host run opened it before process 0
    (tmp_path / "other_host_first" / "log.process1.txt").write_text("")
    writer = Checkpointer(str(tmp_path / "imported"))  # what rr_jax.convert makes
    writer.save_weights(0, {"w": np.zeros(2)}, {"dataset": "cifar10"})
    writer.wait()
    for name in ("new", "empty", "killed_at_start", "other_host_first", "imported"):
        assert is_run_directory(str(tmp_path / name)) == (name != "empty")
        with RunDirectory(str(tmp_path / name)):
            pass
    assert (tmp_path / "new" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'


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
    state, step = resume.restore_latest(Checkpointer(str(tmp_path), 3), fresh, config_lib.base_config(), (), True,
                                        objective=Relational(), num_examples=0)
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
    spec = datasets.get_dataset_spec("cifar10")
    backbone = make_backbone(config, axis_name=None)
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


# ------------------------------------------------------------------ a checkpoint that cannot be written

ENOSPC_FROM_TENSORSTORE = ValueError(  # how Orbax reports a full disk, from its writer thread
    'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database: Failed to write 32712 bytes to file 20: '
    "No space left on device [os_error_code='28']")


def test_failed_write_is_one_error_naming_the_step_and_cleans_up(tmp_path, monkeypatch):
    checkpointer = Checkpointer(str(tmp_path), 3)
    tree = {"w": np.arange(500.0)}
    checkpointer.save(1, tree, tree, config_lib.base_config().to_dict())
    checkpointer.wait()
    manager = checkpointer._manager

    def partial_save(step, args, force):  # step 2 starts writing, then its writer thread fails
        (tmp_path / "checkpoints" / f"{step}.orbax-checkpoint-tmp" / "state").mkdir(parents=True)

    def failed_wait():
        monkeypatch.setattr(manager, "wait_until_finished", lambda: None)  # Orbax reports an error once
        raise ENOSPC_FROM_TENSORSTORE

    monkeypatch.setattr(manager, "save", partial_save)
    checkpointer.save(2, tree, tree, config_lib.base_config().to_dict())
    monkeypatch.setattr(manager, "wait_until_finished", failed_wait)
    with pytest.raises(CheckpointWriteError) as error:
        checkpointer.save(3, tree, tree, config_lib.base_config().to_dict())  # where the failure of 2 surfaces
    assert (error.value.step, error.value.latest, error.value.reason) == (2, 1, "No space left on device (errno 28)")
    assert str(error.value).startswith(f"Cannot write the checkpoint of step 2 in {tmp_path}/checkpoints: "
                                       "No space left on device (errno 28).")
    checkpointer.close()  # reported once
    assert os.listdir(tmp_path / "checkpoints") == ["1"]  # the temporary directory is removed
    np.testing.assert_array_equal(Checkpointer(str(tmp_path)).restore_backbone(1)[0]["w"], tree["w"])


def test_other_save_errors_are_not_disguised(tmp_path, monkeypatch):
    checkpointer = Checkpointer(str(tmp_path))
    monkeypatch.setattr(checkpointer._manager, "save", lambda *a, **k: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        checkpointer.save(1, {"w": np.zeros(2)}, {"w": np.zeros(2)}, {})


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs at tmp_path/'small', unmounted afterwards; the test is skipped where
    mounting is not allowed (not root)."""
    path = tmp_path / "small"
    path.mkdir()
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)],
                                 capture_output=True, text=True)
    except FileNotFoundError as error:
        pytest.skip(f"no mount command: {error}")
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=True)


def _fill(filesystem, leave=64 * 1024):
    """Fills `filesystem` with a file but `leave` bytes: a metrics line still fits, a checkpoint does not.

    A run may be writing meanwhile, so the file grows until the disk is full and is then cut back:
    a size computed beforehand can already be too large when it is written."""
    filler = filesystem / "filler"
    with open(filler, "wb", buffering=0) as file:
        try:
            while file.write(bytes(1 << 20)):
                pass
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_full_disk_keeps_earlier_checkpoints_and_the_rerun_resumes(tmp_path, monkeypatch, fast_compile,
                                                                   small_filesystem):
    config = tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=5, **{
        "model.backbone": "conv4", "checkpoint.every_steps": 1})
    workdir = small_filesystem / "run"
    real_batches = train.inputs.pretrain_batches

    def filling_batches(*args, **kwargs):
        for step, batch in enumerate(real_batches(*args, **kwargs), start=1):
            if step == 4:  # fetched ahead, while step 2 or so is checkpointed
                _fill(small_filesystem)
            yield batch

    with mocked_tfds(tmp_path / "tfds", 64):
        monkeypatch.setattr(train.inputs, "pretrain_batches", filling_batches)
        with pytest.raises(CheckpointWriteError, match=rf"step \d in {workdir}/checkpoints: No space left on device") as error:
            train.pretrain(config, str(workdir))
        failed, latest = error.value.step, error.value.latest
        assert failed >= 2 and latest == failed - 1
        kept = list(range(max(1, latest - 2), latest + 1))  # max_to_keep 3
        assert Checkpointer(str(workdir)).all_steps() == kept
        assert sorted(os.listdir(workdir / "checkpoints")) == sorted(map(str, kept))  # no temporary directory

        (small_filesystem / "filler").unlink()  # the cause is fixed
        monkeypatch.setattr(train.inputs, "pretrain_batches", real_batches)
        restored = []
        real_restore = resume.restore_latest
        monkeypatch.setattr(train, "restore_latest",
                            lambda *args, **kwargs: restored.append(real_restore(*args, **kwargs)) or restored[-1])
        state = train.pretrain(config, str(workdir))
    assert restored[0][1] == latest and int(state.step) == 5
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the records logged after `latest` were trimmed once


def test_metrics_that_cannot_be_written_end_the_run_with_one_error_and_the_rerun_resumes(tmp_path, monkeypatch,
                                                                                         fast_compile):
    config = tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=5, **{
        "model.backbone": "conv4", "checkpoint.every_steps": 2, "log_every_steps": 1})
    workdir = tmp_path / "run"

    class FillingFile:
        """metrics.jsonl on a disk that fills during the fourth record: half of it lands."""

        def __init__(self, path, mode):
            self._file, self._records = open(path, mode), 0

        def write(self, text):
            self._records += 1
            if self._records == 4:
                self._file.write(text[:10])
                self._file.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._file.write(text)

        def __getattr__(self, name):
            return getattr(self._file, name)

    with mocked_tfds(tmp_path / "tfds", 64):
        monkeypatch.setattr(observe, "open", FillingFile, raising=False)
        with pytest.raises(MetricsWriteError) as error:
            train.pretrain(config, str(workdir))
        assert str(error.value).startswith(f"Cannot write the metrics of step 4 to {workdir}/metrics.jsonl: "
                                           "No space left on device (errno 28). The checkpoints written so far")
        assert Checkpointer(str(workdir)).all_steps() == [2]
        monkeypatch.delattr(observe, "open")  # the cause is fixed
        assert int(train.pretrain(config, str(workdir)).step) == 5
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # the half record and step 3's, logged after the checkpoint, were dropped


def test_os_errors_are_found_in_the_text_tensorflow_and_tensorstore_report():
    tensorflow = RuntimeError("{{function_node FlushSummaryWriter}} /w/tensorboard/events; No space left on device\n"
                              "\tFailed to flush 2 events")
    assert os_error(tensorflow) == os_error(ENOSPC_FROM_TENSORSTORE) == "No space left on device (errno 28)"
    assert os_error(RuntimeError("wrapped")) is None
    wrapped = RuntimeError("wrapped")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied")
    assert os_error(wrapped) == "Permission denied (errno 13)"


def test_commands_end_known_errors_with_one_line_and_their_exit_code(capsys):
    def failing(error):
        @exit_cleanly_on_known_errors
        def main():
            with writing("the figures", "/w"):
                raise error
        return main

    for error, code, line in [
        (ConfigError("bad value"), 2, "Error: bad value"),
        (PermissionError(errno.EACCES, "Permission denied"), 74,
         "Error: Cannot write the figures to /w: Permission denied (errno 13). Fix the cause"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            failing(error)()
        assert stopped.value.code == code
        assert capsys.readouterr().err.startswith(line)
    with pytest.raises(KeyError):  # anything else is a bug: its traceback is shown
        failing(KeyError("a bug"))()


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
    spec = datasets.get_dataset_spec("fashion_mnist")
    (record,) = glob.glob(str(tmp_path / "tfds" / "fashion_mnist" / "*" / "*test.tfrecord*"))
    with open(record, "r+b") as f:
        f.seek(os.path.getsize(record) // 2)
        f.write(b"\xff" * 4096)
    with pytest.raises(DatasetError, match=r"fashion_mnist.*is damaged.*Delete .*fashion_mnist/\S+ and run again"):
        sources.load_split(spec, "test", str(tmp_path / "tfds"))


# ------------------------------------------------------------------ console


def test_console_shows_our_lines_and_warnings_and_the_file_keeps_everything(tmp_path):
    handler = absl_logging.get_absl_handler()
    orbax_like = logging.LogRecord("absl", logging.INFO, "/site-packages/orbax/checkpoint/x.py", 1, "orbax chatter",
                                   None, None)
    ours = logging.LogRecord("absl", logging.INFO, train.__file__, 1, "our line", None, None)
    warning = logging.LogRecord("absl", logging.WARNING, "/site-packages/orbax/x.py", 1, "a warning", None, None)
    try:
        raise ValueError("RESOURCE_EXHAUSTED: Error writing ... No space left on device")
    except ValueError:
        failed_write = sys.exc_info()
    unretrieved = logging.LogRecord("absl", logging.ERROR, asyncio.base_events.__file__, 1,
                                    "Task exception was never retrieved", None, failed_write)
    asyncio_error = logging.LogRecord("absl", logging.ERROR, asyncio.base_events.__file__, 1, "an error", None, None)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # as under app.run
    try:
        with third_party_logs_to_file(str(tmp_path / "log.txt")):
            # asyncio's report of Orbax's other failed write tasks stays off the console.
            shown = [handler.filter(r) for r in (orbax_like, ours, warning, unretrieved, asyncio_error)]
            assert shown == [False, True, True, False, True]
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
                            text=True, preexec_fn=sigint_as_in_a_terminal(), **popen)


def test_launch_preemption_lock_and_resume_checks(tmp_path, fashion_mnist_dir):
    workdir = tmp_path / "run"
    first = _launch(workdir, fashion_mnist_dir, "--config.max_steps=100000")
    metrics = workdir / "metrics.jsonl"
    wait_for(metrics, lambda path: len(path.read_text().splitlines()) >= 3, first)

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


def test_launch_ctrl_c_saves_the_step_reached_and_during_the_probe_a_rerun_finishes(tmp_path, fashion_mnist_dir):
    workdir = tmp_path / "run"
    first = _launch(workdir, fashion_mnist_dir, "--config.max_steps=100000", "--config.checkpoint.every_steps=1000")
    wait_for(workdir / "metrics.jsonl", lambda path: len(path.read_text().splitlines()) >= 3, first)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 130, err
    assert "Traceback" not in err
    (hint,) = [line for line in err.splitlines() if "Re-run the same command to resume" in line]
    stopped = Checkpointer(str(workdir)).latest_step()
    assert stopped >= 3 and f"Interrupted at step {stopped} of 937;" in hint  # one epoch; saved although not due
    assert not (workdir / "probe_results.json").exists()

    end = f"--config.max_steps={stopped + 2}"
    probing = _launch(workdir, fashion_mnist_dir, end, "--config.probe.epochs=100000")
    wait_for(workdir / "log.txt", lambda path: "Probe epoch" in path.read_text(), probing)
    probing.send_signal(signal.SIGINT)
    _, err = probing.communicate(timeout=600)
    assert probing.returncode == 130, err
    assert "Traceback" not in err and "Interrupted during the linear probe" in err
    assert not (workdir / "probe_results.json").exists()

    again = _launch(workdir, fashion_mnist_dir, end)
    _, err = again.communicate(timeout=900)
    assert again.returncode == 0, err
    assert json.loads((workdir / "probe_results.json").read_text())["step"] == stopped + 2
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, stopped + 3))  # each step once; the probe's rerun trained nothing


def test_launch_refuses_a_directory_it_did_not_make(tmp_path, fashion_mnist_dir):
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "acc": 0.5}\n')
    before = _snapshot(tmp_path)
    refused = _launch(tmp_path, fashion_mnist_dir, "--config.max_steps=2")
    _, err = refused.communicate(timeout=600)
    assert refused.returncode == 2, err
    assert "is not an rr_jax workdir: it holds metrics.jsonl." in err and "Traceback" not in err
    assert _snapshot(tmp_path) == before


def test_launch_on_a_full_disk_says_so_once(tmp_path, fashion_mnist_dir, small_filesystem):
    workdir = small_filesystem / "run"
    run = _launch(workdir, fashion_mnist_dir, "--config.max_steps=100000", "--config.checkpoint.every_steps=1")
    wait_for(workdir / "checkpoints" / "2", os.path.isdir, run)
    _fill(small_filesystem)
    _, err = run.communicate(timeout=600)
    assert run.returncode == 74, err
    errors = [line for line in err.splitlines() if "Error" in line or "Traceback" in line]
    assert len(errors) == 1, err
    message = errors[0]
    step = int(re.search(r"checkpoint of step (\d+)", message).group(1))
    assert message.startswith(f"Error: Cannot write the checkpoint of step {step} in {workdir}/checkpoints: "
                              "No space left on device (errno 28).")
    assert f"(the latest is step {step - 1})" in message
    kept = Checkpointer(str(workdir)).all_steps()
    assert kept[-1] == step - 1 and sorted(os.listdir(workdir / "checkpoints")) == sorted(map(str, kept))


def test_second_ctrl_c_stops_at_once():
    script = (
        "import os, signal, time\n"
        "from rr_jax import train\n"
        "with train._Preemption() as preemption:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.5)  # the first is remembered: the loop would save and stop\n"
        "    print(preemption.signum == signal.SIGINT, flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(60)\n"
        "print('not stopped', flush=True)\n"
    )
    started = time.time()
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            preexec_fn=sigint_as_in_a_terminal())
    assert result.returncode == -signal.SIGINT, result.stderr
    assert result.stdout == "True\n" and "Traceback" not in result.stderr
    assert time.time() - started < 60


def test_ignored_sigint_stays_ignored():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # as in a background job
    try:
        with train._Preemption():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
