"""The linear probe: restore on one device, protocols, statistics of the classifier, errors."""

import functools
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from conftest import mocked_tfds, numpy_knn_top1

from rr_jax import datasets, evaluate_run, linear_probe, train
from rr_jax.backbones import create_backbone
from rr_jax.checkpoint import restore_probe
from rr_jax.config import base_config
from rr_jax.datasets import get_dataset_spec
from rr_jax.errors import EXIT_USER_ERROR, ResultWriteError, UserError
from rr_jax.evaluate import topk_accuracy
from rr_jax.features import extract_features
from rr_jax.online_probe import LinearHead, classify

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_EXAMPLES = 64  # per mocked split
CIFAR10 = get_dataset_spec("cifar10")


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Two pmapped pretraining steps of conv4 on 8 fake devices (mocked CIFAR-10)."""
    root = tmp_path_factory.mktemp("probe")
    config = base_config()
    config.data_dir = str(root / "tfds")
    config.model.backbone = "conv4"
    config.relational.num_views = 2
    config.batch_size = 16  # 2 images on each of the 8 fake devices
    config.max_steps = 2
    with mocked_tfds(root / "tfds", NUM_EXAMPLES):
        state = train.pretrain(config, str(root / "run"))
    assert jax.device_count() == 8
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
    return root / "run", root / "tfds", jax.device_get(variables)


def _split(data_dir, name, split, key):
    """(images, labels of feature `key`) read with TFDS directly, in order."""
    examples = list(tfds.as_numpy(tfds.load(name, split=split, data_dir=str(data_dir))))
    return np.stack([e["image"] for e in examples]), np.array([e[key] for e in examples])


def test_probe_cli_restores_a_pmapped_checkpoint_on_one_device(pretrained):
    workdir, data_dir, variables = pretrained
    script = (
        "import runpy, sys, jax, tensorflow_datasets as tfds\n"
        "assert jax.device_count() == 1, jax.devices()\n"
        f"sys.argv = ['linear_probe', '--workdir={workdir}', '--epochs=2']\n"
        f"with tfds.testing.mock_data(num_examples={NUM_EXAMPLES}, data_dir={str(data_dir)!r}):\n"
        "    runpy.run_module('rr_jax.linear_probe', run_name='__main__', alter_sys=True)\n"
    )
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info_sources = set(re.findall(r"^I\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\]", result.stderr, flags=re.M))
    ours = {os.path.basename(p) for p in glob.glob(str(ROOT / "rr_jax" / "*.py"))}
    assert info_sources and info_sources <= ours, info_sources  # Orbax's INFO lines ...
    assert "checkpoint" in (workdir / "log.txt").read_text()  # ... are in the run's log file
    results = json.loads((workdir / "probe_results.json").read_text())
    assert results["name"] == "probe" and results["step"] == 2 and results["epochs"] == 2
    assert (results["dataset"], results["label_space"], results["num_classes"]) == ("cifar10", "label", 10)
    assert results["num_train"] == results["num_test"] == NUM_EXAMPLES

    # The same probe here, from the backbone the pmapped run returned, on 8 devices:
    # the same classifier, hence the restored backbone was the trained one.
    with mocked_tfds(data_dir, NUM_EXAMPLES):
        train_x, train_y = _split(data_dir, "cifar10", "train", "label")
        test_x, test_y = _split(data_dir, "cifar10", "test", "label")
    backbone = create_backbone("conv4")
    stats = dict(mean=CIFAR10.mean, std=CIFAR10.std)
    head, _ = linear_probe.train_linear_classifier(
        jax.random.key(0), extract_features(backbone, variables, train_x, **stats),
        train_y, 10, epochs=2,
    )
    saved = restore_probe(str(workdir / "probe"))["head"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), saved, jax.device_get(head))
    logits = classify(saved, extract_features(backbone, variables, test_x, **stats))
    assert results["top1"] == pytest.approx(topk_accuracy(logits, test_y, 1))
    assert results["top5"] == pytest.approx(topk_accuracy(logits, test_y, 5))
    assert results["top5"] >= results["top1"]


def test_evaluate_run_writes_knn_retrieval_and_pictures(pretrained):
    workdir, data_dir, variables = pretrained
    with mocked_tfds(data_dir, NUM_EXAMPLES):
        results = evaluate_run.evaluate_run(str(workdir), knn_k=5, num_queries=3, tsne_points=40)
        train_x, train_y = _split(data_dir, "cifar10", "train", "label")
        test_x, test_y = _split(data_dir, "cifar10", "test", "label")
    assert results == json.loads((workdir / evaluate_run.RESULTS_FILE).read_text())
    stats = dict(mean=CIFAR10.mean, std=CIFAR10.std)
    bank, queries = (extract_features(create_backbone("conv4"), variables, x, **stats)
                     for x in (train_x, test_x))
    expected, slack = numpy_knn_top1(bank, train_y, queries, test_y, 5, 0.07, 10)
    assert abs(results["knn_top1"] - expected) <= slack + 1e-9, (results["knn_top1"], expected, slack)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    nearest = np.argsort(-unit(queries) @ unit(bank).T, axis=1)[:, :10]
    assert results["precision_at_10"] == pytest.approx(np.mean(train_y[nearest] == test_y[:, None]))
    singular = np.linalg.svd(queries.astype(np.float64), compute_uv=False)
    p = singular / singular.sum() + 1e-7
    assert results["rankme"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-4)
    for picture in ("retrieval.png", "tsne.png", "curves.png"):  # curves: the run's metrics.jsonl
        assert (workdir / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    retrieval = np.load(workdir / "retrieval.npz")  # what the pictures show, for figures across runs
    assert set(retrieval) == set(evaluate_run.ARRAYS["retrieval"])
    shown = retrieval["query_indices"]
    np.testing.assert_array_equal(retrieval["query_images"], test_x[shown])
    np.testing.assert_array_equal(retrieval["neighbour_labels"], train_y[nearest[shown]])
    np.testing.assert_array_equal(retrieval["neighbour_images"], train_x[nearest[shown]])
    embedding = np.load(workdir / "tsne.npz")
    assert set(embedding) == set(evaluate_run.ARRAYS["tsne"]) and embedding["embedding"].shape == (40, 2)
    np.testing.assert_array_equal(embedding["labels"], test_y[embedding["points"]])


def test_coarse_labels_of_a_few_label_subset(pretrained, monkeypatch):
    workdir, data_dir, _ = pretrained
    seen = {}
    real = linear_probe.train_linear_classifier

    def recording(key, features, labels, num_classes, **kwargs):
        seen.update(labels=labels, num_classes=num_classes)
        return real(key, features, labels, num_classes, **kwargs)

    monkeypatch.setattr(linear_probe, "train_linear_classifier", recording)
    with mocked_tfds(data_dir, NUM_EXAMPLES):
        results = linear_probe.run_probe(
            str(workdir), dataset="cifar100", label_space="coarse", label_fraction=0.5,
            epochs=1, seed=3,
        )
        _, coarse = _split(data_dir, "cifar100", "train", "coarse_label")
        _, fine = _split(data_dir, "cifar100", "train", "label")
    assert not np.array_equal(coarse, fine)  # the check below can tell them apart
    expected = coarse[datasets.label_subset(coarse, 0.5, seed=3)]
    np.testing.assert_array_equal(seen["labels"], expected)
    assert seen["num_classes"] == 20 and results["num_classes"] == 20
    assert results["name"] == "probe_cifar100_coarse_frac0.5"
    assert results["num_train"] == len(expected) and results["label_fraction"] == 0.5
    saved = json.loads((workdir / "probe_cifar100_coarse_frac0.5_results.json").read_text())
    assert saved == results
    assert restore_probe(str(workdir / results["name"]))["head"]["dense"]["kernel"].shape == (64, 20)


# --------------------------------------------------------------------------- errors


def test_missing_checkpoints(tmp_path, pretrained):
    with pytest.raises(UserError, match="No checkpoints"):
        linear_probe.run_probe(str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()  # nothing created on the way
    with pytest.raises(UserError, match="step 7.*available steps: \\[2\\]"):
        linear_probe.run_probe(str(pretrained[0]), step=7)


def test_corrupt_checkpoint(tmp_path, pretrained):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained[0] / "checkpoints", workdir / "checkpoints")
    for path in glob.glob(str(workdir / "checkpoints/2/backbone/**/d/*"), recursive=True):
        pathlib.Path(path).write_bytes(b"garbage")
    with pytest.raises(UserError, match="step 2 .* corrupt or incomplete"):
        linear_probe.run_probe(str(workdir))


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_fraction_outside_the_unit_interval(pretrained, fraction):
    with pytest.raises(UserError, match=f"label_fraction must be in \\(0, 1\\].*{fraction}"):
        linear_probe.run_probe(str(pretrained[0]), label_fraction=fraction)


def test_unknown_label_space_and_dataset(pretrained):
    with pytest.raises(UserError, match="label space 'coarse' for dataset 'cifar10'"):
        linear_probe.run_probe(str(pretrained[0]), label_space="coarse")
    with pytest.raises(UserError, match="Unknown dataset 'imagenet'"):
        linear_probe.run_probe(str(pretrained[0]), dataset="imagenet")


def test_channel_mismatch_is_a_clear_error(pretrained):
    match = "cannot take images of shape \\(28, 28, 1\\) of dataset 'fashion_mnist'"
    with pytest.raises(UserError, match=match):
        linear_probe.run_probe(str(pretrained[0]), dataset="fashion_mnist")


def test_results_that_cannot_be_written_are_one_error(tmp_path, pretrained, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(pretrained[0] / "checkpoints", workdir / "checkpoints")

    def full_disk(directory, tree):  # as Orbax reports it, from TensorStore
        raise ValueError("RESOURCE_EXHAUSTED: Failed to write 4096 bytes: [os_error_code='28']")

    monkeypatch.setattr(linear_probe, "save_probe", full_disk)
    with mocked_tfds(pretrained[1], NUM_EXAMPLES), pytest.raises(ResultWriteError) as error:
        linear_probe.run_probe(str(workdir), epochs=1)
    assert str(error.value) == (
        f"Cannot write the results of probe 'probe' to {workdir}: No space left on device (errno 28). Fix the "
        "cause (free space, permissions or quota) and re-run the same command to resume.")
    assert not (workdir / "probe_results.json").exists()


@pytest.mark.parametrize("module", ["rr_jax.linear_probe", "rr_jax.evaluate_run"])
def test_commands_that_read_a_run_end_a_user_error_with_one_line_and_write_nothing_foreign(tmp_path, module):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "log.txt").write_text("the user's own log\n")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-m", module, f"--workdir={foreign}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == EXIT_USER_ERROR, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"Error: No checkpoints in --workdir='{foreign}'")
    assert (foreign / "log.txt").read_text() == "the user's own log\n"
    assert sorted(os.listdir(foreign)) == ["log.txt"]


# ----------------------------------------------------------------- the classifier


def _clusters(rng, centres, n):
    labels = rng.integers(0, len(centres), n)
    return (centres[labels] + rng.normal(size=(n, centres.shape[1]))).astype(np.float32), labels


def test_separable_features_are_classified_perfectly():
    rng = np.random.default_rng(0)
    centres = 4.0 * rng.normal(size=(10, 16))
    train_x, train_y = _clusters(rng, centres, 600)  # 4 full batches and one of 88
    test_x, test_y = _clusters(rng, centres, 1000)
    head, history = linear_probe.train_linear_classifier(jax.random.key(1), train_x, train_y, 10, epochs=40)
    logits = classify(head, test_x)
    assert topk_accuracy(logits, test_y, 1) >= 0.995
    assert topk_accuracy(logits, test_y, 5) == 1.0
    assert history["loss"].shape == (40,) and history["loss"][-1] < 0.2 * history["loss"][0]
    assert history["accuracy"][-1] >= 0.995


def test_shuffled_labels_give_chance_accuracy():
    """No relation between features and labels: the test accuracy is Binomial(n, k/C)/n."""
    rng = np.random.default_rng(0)
    num_classes, n_test = 10, 4000
    train_x = rng.normal(size=(600, 16)).astype(np.float32)  # the shapes above: no recompilation
    head, _ = linear_probe.train_linear_classifier(
        jax.random.key(2), train_x, rng.integers(0, num_classes, 600), num_classes, epochs=5
    )
    logits = classify(head, rng.normal(size=(n_test, 16)).astype(np.float32))
    test_y = rng.integers(0, num_classes, n_test)
    top1, top5 = topk_accuracy(logits, test_y, 1), topk_accuracy(logits, test_y, 5)
    for accuracy, p in ((top1, 0.1), (top5, 0.5)):
        assert abs(accuracy - p) < 4 * np.sqrt(p * (1 - p) / n_test)
    assert top5 >= top1


def test_training_compiles_once_per_shape():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 16)), rng.integers(0, 10, 600)  # the shapes above
    linear_probe.train_linear_classifier(jax.random.key(0), x, y, 10, epochs=2)
    compiled = linear_probe._train_epoch._cache_size()
    linear_probe.train_linear_classifier(jax.random.key(1), x + 1, y, 10, epochs=3)
    assert linear_probe._train_epoch._cache_size() == compiled


def test_classifier_rejects_labels_outside_the_classes():
    with pytest.raises(ValueError, match="labels must be in \\[0, num_classes=3\\).*\\[0, 3\\]"):
        linear_probe.train_linear_classifier(jax.random.key(0), np.zeros((4, 2)), np.array([0, 1, 2, 3]), 3)


# --------------------------------------------------------------------- few labels


def test_label_subsets_are_class_balanced_and_seeded():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(10), 100))
    for fraction, per_class in ((0.01, 1), (0.1, 10), (0.25, 25), (0.5, 50), (1.0, 100)):
        subset = datasets.label_subset(labels, fraction, seed=0)
        assert np.all(np.diff(subset) > 0)  # sorted, no repeats
        np.testing.assert_array_equal(np.bincount(labels[subset], minlength=10), [per_class] * 10)
        np.testing.assert_array_equal(subset, datasets.label_subset(labels, fraction, seed=0))
        if fraction < 1:
            assert not np.array_equal(subset, datasets.label_subset(labels, fraction, seed=1))
    # Unbalanced classes keep the fraction of each class, at least one example.
    skewed = np.array([0] * 3 + [1] * 50)
    np.testing.assert_array_equal(np.bincount(skewed[datasets.label_subset(skewed, 0.1, seed=0)]), [1, 5])
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\]"):
        datasets.label_subset(labels, 0.0, seed=0)


# ---------------------------------------------------------------------- fine-tuning


def test_finetune_optimizer_is_adam_with_l2_decay_and_a_rate_per_part():
    rng = np.random.default_rng(0)
    params = {"backbone": {"w": rng.normal(size=3)}, "head": {"w": rng.normal(size=2)}}
    lrs, decay, b1, b2, eps = {"backbone": 1e-3, "head": 1e-4}, 0.1, 0.9, 0.999, 1e-8
    optimizer = linear_probe.finetune_optimizer(lrs["backbone"], lrs["head"], decay)
    state = optimizer.init(params)
    theta = {k: v["w"].copy() for k, v in params.items()}
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in theta.items()}
    for t in (1, 2, 3):
        grads = {k: {"w": rng.normal(size=v["w"].shape)} for k, v in params.items()}
        updates, state = optimizer.update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for k in theta:  # PyTorch's Adam(weight_decay=...): decay joins the gradient
            g = grads[k]["w"] + decay * theta[k]
            m, v = b1 * moments[k][0] + (1 - b1) * g, b2 * moments[k][1] + (1 - b2) * g * g
            moments[k] = m, v
            theta[k] = theta[k] - lrs[k] * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
            np.testing.assert_allclose(params[k]["w"], theta[k], rtol=1e-5, atol=1e-7)


class _TinyNet(nn.Module):
    """A small backbone with BatchNorm, quick to compile: conv -> BN -> ReLU -> mean, [N, 4]."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(nn.Conv(4, (3, 3))(x))
        return jnp.mean(nn.relu(x), axis=(1, 2))


def test_finetune_trains_backbone_and_head_with_their_rates():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 16)
    backbone = _TinyNet()
    init = jax.jit(functools.partial(backbone.init, train=False))
    variables = jax.device_get(init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    tuned, head, history = linear_probe.finetune_backbone(
        jax.random.key(1), backbone, variables, images, labels, 4,
        mean=CIFAR10.mean, std=CIFAR10.std, epochs=1, batch_size=16, padding=1,
    )
    # One Adam step: every parameter moves by at most its learning rate, most by about it.
    change = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b), tuned["params"], variables["params"])
    largest = max(float(c.max()) for c in jax.tree.leaves(change))
    assert 0.5e-3 < largest <= 1e-3 * (1 + 1e-4)
    init_key = jax.random.split(jax.random.key(1))[0]  # the head's initialisation key
    fresh = LinearHead(4).init(init_key, jnp.zeros((1, 4)))["params"]
    head_change = max(
        float(np.abs(np.asarray(a) - b).max()) for a, b in zip(jax.tree.leaves(head), jax.tree.leaves(fresh))
    )
    assert 0.5e-4 < head_change <= 1e-4 * (1 + 1e-4)
    # BatchNorm ran in train mode: running statistics moved towards the batch's.
    before, after = variables["batch_stats"]["BatchNorm_0"]["var"], tuned["batch_stats"]["BatchNorm_0"]["var"]
    assert np.all(np.abs(np.asarray(after) - before) > 1e-4)
    assert history["loss"].shape == (1,) and np.isfinite(history["loss"]).all()
