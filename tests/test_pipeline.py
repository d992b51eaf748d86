"""End to end: configs/cifar10.py on mocked TFDS data, checkpoints, resume, preemption."""

import contextlib
import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import mocked_tfds, numpy_knn_top1
from image_trees import WNIDS, class_folders_tree, slimagenet_tree, tiny_imagenet_tree

from rr_jax import batching, datasets, linear_probe, sources, train
from rr_jax.augment import normalize_images
from rr_jax.checkpoint import Checkpointer, restore_probe
from rr_jax.config import base_config
from rr_jax.errors import Preempted
from rr_jax.evaluation_inputs import restore_backbone

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny(config, data_dir, **overrides):
    config.data_dir = str(data_dir)
    config.relational.num_views = 2
    config.batch_size = 16  # 2 images on each of the 8 fake devices
    config.log_every_steps = 1
    for key, value in overrides.items():
        target = config
        *parents, last = key.split(".")
        for part in parents:
            target = target[part]
        target[last] = value
    return config


def test_cifar10_config_end_to_end(tmp_path, fast_compile):
    config = tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=3, **{
        "checkpoint.every_steps": 2, "knn_monitor.every_steps": 2, "knn_monitor.num_train": 40,
        "knn_monitor.num_test": 24, "knn_monitor.k": 5, "online_probe.every_steps": 3,
        "online_probe.num_test": 16})
    assert config.model.backbone == "resnet32" and config.dataset == "cifar10"
    workdir = tmp_path / "run"
    with mocked_tfds(tmp_path / "tfds", 64):
        state = train.pretrain(config, str(workdir))
        spec = datasets.get_dataset_spec("cifar10")
        bank, bank_labels = (a[:40] for a in sources.load_split(spec, "train", config.data_dir))
        queries, query_labels = (a[:24] for a in sources.load_split(spec, "test", config.data_dir))
    assert int(state.step) == 3
    assert Checkpointer(str(workdir)).all_steps() == [2, 3]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    monitored = {r["step"]: r for r in records if "knn_top1" in r}
    knn = {step: r["knn_top1"] for step, r in monitored.items()}
    records = [r for r in records if "knn_top1" not in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert sorted(knn) == [2, 3]  # every 2 steps and at the end
    for step in knn:  # the online monitor agrees with a NumPy kNN on the checkpointed backbone
        restored = restore_backbone(str(workdir), step)
        features = [np.asarray(restored.backbone.apply(restored.variables, normalize_images(x, mean=spec.mean, std=spec.std),
                                                       train=False))
                    for x in (bank, queries)]
        expected, slack = numpy_knn_top1(features[0], bank_labels, features[1], query_labels, 5, 0.07, 10)
        assert abs(knn[step] - expected) <= slack + 1e-9, (knn[step], expected, slack)
        singular = np.linalg.svd(features[1].astype(np.float64), compute_uv=False)
        p = singular / singular.sum() + 1e-7
        np.testing.assert_allclose(monitored[step]["rankme"], np.exp(-np.sum(p * np.log(p))), rtol=1e-4)
    # The online probe of the final state, on the first 16 test images, at the last step only.
    assert [step for step, r in monitored.items() if "online_probe_top1" in r] == [3]
    logits = features[1][:16] @ state.online_probe.params["dense"]["kernel"] + state.online_probe.params["dense"]["bias"]
    np.testing.assert_allclose(monitored[3]["online_probe_top1"], np.mean(logits.argmax(1) == query_labels[:16]))
    assert {"loss", "accuracy", "accuracy_positive", "accuracy_negative", "images_per_second",
            "online_probe_loss", "online_probe_train_top1"} <= set(records[0])
    assert records[0]["num_pairs"] == 2 * 1 * 16  # global, as the startup log: K(K-1) * M
    assert json.loads((workdir / "config.json").read_text())["model"]["backbone"] == "resnet32"
    assert any(name.startswith("events") for name in os.listdir(workdir / "tensorboard"))
    backbone, saved_config = Checkpointer(str(workdir)).restore_backbone()
    assert saved_config["relational"]["num_views"] == 2
    np.testing.assert_array_equal(
        backbone["params"]["conv1"]["kernel"] if "conv1" in backbone["params"]
        else jax.tree.leaves(backbone["params"])[0],
        (state.params["backbone"]["conv1"]["kernel"] if "conv1" in state.params["backbone"]
         else jax.tree.leaves(state.params["backbone"])[0]),
    )


@pytest.mark.parametrize("source, signum", [("memory", signal.SIGTERM), ("stream", signal.SIGTERM),
                                            ("memory", signal.SIGINT)])
def test_preempted_run_resumes_to_identical_parameters(tmp_path, monkeypatch, fast_compile, source, signum):
    if source == "memory":  # CIFAR-10 (mocked TFDS) held in memory
        dataset, context = "cifar10", mocked_tfds(tmp_path / "tfds", 64)
        extra = {"online_probe.every_steps": 2, "online_probe.num_test": 8}  # its state resumes too
    else:  # a tiny-ImageNet tree (24 images: one step per epoch) streamed with Grain
        dataset, context = "tiny_imagenet", contextlib.nullcontext()
        extra = {"image_folder": tiny_imagenet_tree(str(tmp_path / "folders"), per_class=8),
                 "data.streaming": "stream"}

    def config():
        return tiny(load_config(dataset), tmp_path / "tfds", max_steps=4, **{
            "model.backbone": "conv4", "checkpoint.every_steps": 100, **extra})

    with context:
        reference = train.pretrain(config(), str(tmp_path / "straight"))

        real_batches = train.inputs.pretrain_batches

        def preempted_batches(*args, **kwargs):
            for step, batch in enumerate(real_batches(*args, **kwargs), start=kwargs["start_step"] + 1):
                if step == 3:  # a preemption notice (or Ctrl-C) arrives while batch 3 is prefetched
                    os.kill(os.getpid(), signum)
                yield batch

        monkeypatch.setattr(train.inputs, "pretrain_batches", preempted_batches)
        with pytest.raises(Preempted) as stopped:
            train.pretrain(config(), str(tmp_path / "resumed"))
        assert 1 <= stopped.value.step < 4  # saved and stopped early
        assert stopped.value.exit_code == 128 + signum
        assert Checkpointer(str(tmp_path / "resumed")).all_steps() == [stopped.value.step]
        monkeypatch.setattr(train.inputs, "pretrain_batches", real_batches)
        resumed = train.pretrain(config(), str(tmp_path / "resumed"))
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)  # bitwise on CPU


def test_slimagenet64_config_trains_on_its_tree(tmp_path, fast_compile):
    root = slimagenet_tree(str(tmp_path / "folders"), per_class=(8, 2))
    config = tiny(load_config("slimagenet64"), tmp_path / "tfds", max_steps=2, image_folder=root, **{
        "model.backbone": "conv4"})
    assert (config.model.backbone, config.relational.num_views) == ("conv4", 2)
    state = train.pretrain(config, str(tmp_path / "run"))
    assert int(state.step) == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    # The probe after pretraining (as launch.py runs it) finds the tree through the saved config.
    results = linear_probe.run_probe(str(tmp_path / "run"), epochs=1)
    assert (results["dataset"], results["num_classes"]) == ("slimagenet64", len(WNIDS))
    assert (results["num_train"], results["num_test"]) == (8 * len(WNIDS), 2 * len(WNIDS))


def test_incomplete_checkpoint_is_ignored(tmp_path):
    checkpointer = Checkpointer(str(tmp_path))
    tree = {"w": np.arange(3.0)}
    checkpointer.save(1, tree, tree, {"a": 1})
    checkpointer.wait()
    # What a kill during the write of step 2 leaves: Orbax's temporary directory.
    (tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1234").mkdir()
    assert Checkpointer(str(tmp_path)).latest_step() == 1


def test_nan_loss_stops_with_the_step_and_is_not_checkpointed(tmp_path, fast_compile):
    config = tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=4, **{
        "model.backbone": "conv4", "optimizer.learning_rate": 1e38, "checkpoint.every_steps": 1})
    with mocked_tfds(tmp_path / "tfds", 64), pytest.raises(FloatingPointError, match="at step [2-4]"):
        train.pretrain(config, str(tmp_path / "run"))
    for step in Checkpointer(str(tmp_path / "run")).all_steps():
        state, _ = Checkpointer(str(tmp_path / "run")).restore_backbone(step)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


@pytest.mark.parametrize("config, override, message", [
    ("cifar10", "--config.relational.num_vews=4", "num_vews"),  # misspelt key: locked config
    ("fashion_mnist", "--config.relational.aggregation=prod", "config.relational.aggregation='prod'"),
])
def test_launch_rejects_bad_configs_before_compiling(tmp_path, config, override, message):
    result = subprocess.run(
        [sys.executable, "launch.py", f"--config=configs/{config}.py", override, f"--workdir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert message in result.stderr


def test_probe_streams_a_large_split_and_agrees_with_memory(tmp_path, monkeypatch, fast_compile):
    root = slimagenet_tree(str(tmp_path / "folders"), per_class=(8, 2))
    config = tiny(load_config("slimagenet64"), tmp_path / "tfds", max_steps=1, image_folder=root, **{
        "model.backbone": "conv4", "data.streaming": "stream"})
    workdir = str(tmp_path / "run")
    train.pretrain(config, workdir)

    def no_loading(*args, **kwargs):
        raise AssertionError("the streamed probe loaded a split into memory")

    with monkeypatch.context() as patch:
        patch.setattr(linear_probe.load_labelled_splits.__globals__["sources"], "load_split", no_loading)
        streamed = linear_probe.run_probe(workdir, epochs=2)
        streamed_head = restore_probe(os.path.join(workdir, streamed["name"]))
    monkeypatch.setattr(train.inputs, "streams", lambda *args: False)  # the same probe, splits in memory
    loaded = linear_probe.run_probe(workdir, epochs=2)
    assert (streamed["num_train"], streamed["num_test"]) == (loaded["num_train"], loaded["num_test"]) == (24, 6)
    assert streamed["top1"] == loaded["top1"]
    for a, b in zip(jax.tree.leaves(streamed_head), jax.tree.leaves(restore_probe(os.path.join(workdir, loaded["name"])))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_tree_without_a_test_split_is_probed_on_images_pretraining_never_saw(tmp_path, monkeypatch, fast_compile):
    root, _ = class_folders_tree(str(tmp_path / "folders"))  # ROOT/<class>/<image>, 20 images, no test split
    config = tiny(base_config(), tmp_path / "tfds", max_steps=2, dataset="image_folder", image_folder=root, **{
        "data.image_size": 16, "model.backbone": "conv4"})
    pretrained_on = []
    real_batches = batching.batches

    def recorded(images, labels, **order):
        pretrained_on.append(images)
        return real_batches(images, labels, **order)

    monkeypatch.setattr(batching, "batches", recorded)
    workdir = str(tmp_path / "run")
    train.pretrain(config, workdir)
    results = linear_probe.run_probe(workdir, epochs=1)  # as launch.py runs it, from the saved config
    assert results["test_split"] == "held out 10% of train (class-balanced, seed 0)"
    assert (results["num_train"], results["num_test"]) == (17, 3)  # 1 of each class's 7, 3 and 10
    assert json.loads(pathlib.Path(workdir, "probe_results.json").read_text())["test_split"] == results["test_split"]
    spec = train.inputs.dataset_spec(config)
    held_out = {image.tobytes() for image in sources.load_split(spec, spec.test_split, config.data_dir)[0]}
    (images,) = pretrained_on
    assert len(images) == 17 and not held_out & {image.tobytes() for image in images}
