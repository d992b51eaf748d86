"""The objectives' losses against NumPy, their pmapped steps against one device, the
registry's errors, and the new methods through launch.py and (DeepCluster) a resume."""

import dataclasses
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mocked_tfds

from rr_jax import backbones, train
from rr_jax.config import base_config, validate_config
from rr_jax.datasets import get_dataset_spec
from rr_jax.errors import Preempted
from rr_jax.numerics import unit_rows
from rr_jax.objectives import OBJECTIVES, DeepCluster, DeepInfoMax, RotationNet, get_objective
from rr_jax.objectives.common import CropFlip
from rr_jax.objectives.deepcluster import (
    cluster_weights,
    kmeans,
    kmeans_plus_plus,
    lloyd,
    pca_whiten,
)
from rr_jax.objectives.rotationnet import rotations
from rr_jax.optimizer import learning_rate_schedule, make_optimizer
from rr_jax.step import create_train_state, make_backbone, make_objective, parallel_train_step, replicate, train_step, unreplicate

ROOT = pathlib.Path(__file__).resolve().parents[1]
IDENTITY = CropFlip(padding=0, flip_prob=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)


def numpy_cross_entropy(logits, labels, weights=None):
    logits = np.asarray(logits, np.float64)
    log_softmax = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - logits.max(1, keepdims=True)
    nll = -log_softmax[np.arange(len(labels)), labels]
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)[labels]
    return (w * nll).sum() / w.sum()


# ------------------------------------------------------------------- RotationNet


def test_rotations_of_a_known_image():
    image = np.array([[1, 2], [3, 4]], np.uint8)[None, :, :, None]  # [1, 2, 2, 1]
    rotated, targets = rotations(jnp.asarray(image))
    expected = [[[1, 2], [3, 4]], [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]]  # 0, 90, 180, 270 ccw
    np.testing.assert_array_equal(rotated[:, 0, :, :, 0], expected)
    np.testing.assert_array_equal(targets, [[0], [1], [2], [3]])
    with pytest.raises(ValueError, match="square"):
        rotations(jnp.zeros((1, 2, 3, 1)))


def test_rotationnet_loss_matches_numpy():
    objective = RotationNet(augment=IDENTITY)
    features = jax.random.normal(jax.random.key(0), (4, 3, 5))
    head = objective.init_head(jax.random.key(1), features[0], {}, 10)
    _, targets = rotations(jnp.zeros((3, 2, 2, 1)))
    loss, metrics, _ = objective.loss(features, head, None, targets, intermediates={}, objective_state={},
                                      axis_name=None)
    p = head["params"]
    logits = np.asarray(features).reshape(12, 5) @ np.asarray(p["kernel"]) + np.asarray(p["bias"])
    labels = np.repeat(np.arange(4), 3)
    np.testing.assert_allclose(loss, numpy_cross_entropy(logits, labels), rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(logits.argmax(1) == labels))


# ------------------------------------------------------------------- Deep InfoMax


def numpy_conv(x, kernel, bias):
    """Valid cross-correlation, NHWC, kernel [kh, kw, in, out], by loops over the offsets."""
    kh, kw = kernel.shape[:2]
    out_h, out_w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3])) + bias
    for a in range(kh):
        for b in range(kw):
            out += x[:, a:a + out_h, b:b + out_w, :] @ kernel[a, b]
    return out


def numpy_adaptive_pool(x, size):
    n, h, w, c = x.shape
    out = np.zeros((n, size, size, c))
    for i in range(size):
        for j in range(size):
            rows = slice(math.floor(i * h / size), math.ceil((i + 1) * h / size))
            cols = slice(math.floor(j * w / size), math.ceil((j + 1) * w / size))
            out[:, i, j] = x[:, rows, cols].mean(axis=(1, 2))
    return out


def relu(x):
    return np.maximum(x, 0.0)


def softplus(x):
    return np.logaddexp(0.0, x)


def dense(p, x):
    return x @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)


def numpy_global(p, y, m):
    h = numpy_conv(relu(numpy_conv(m, p["c0"]["kernel"], p["c0"]["bias"])), p["c1"]["kernel"], p["c1"]["bias"])
    h = numpy_adaptive_pool(h, 16).transpose(0, 3, 1, 2).reshape(len(y), -1)  # PyTorch's view(N, -1) of NCHW
    h = np.concatenate([y, h], axis=1)
    return dense(p["l2"], relu(dense(p["l1"], relu(dense(p["l0"], h)))))


def numpy_local(p, y, m):
    h = np.concatenate([m, np.broadcast_to(y[:, None, None, :], (*m.shape[:3], y.shape[1]))], axis=-1)
    for name in ("c0", "c1"):
        h = relu(h @ p[name]["kernel"][0, 0] + p[name]["bias"])
    return h @ p["c2"]["kernel"][0, 0] + p["c2"]["bias"]


def numpy_prior_probability(p, x):
    logits = dense(p["l2"], relu(dense(p["l1"], relu(dense(p["l0"], x)))))
    return 1.0 / (1.0 + np.exp(-logits))


def test_deepinfomax_terms_match_numpy():
    """Every discriminator on, against the official formulas written out in NumPy."""
    objective = DeepInfoMax(augment=IDENTITY, alpha=0.5, beta=1.0, gamma=0.1, backbone="conv4")
    y = jax.random.normal(jax.random.key(0), (4, 5))
    m = jax.nn.relu(jax.random.normal(jax.random.key(1), (4, 6, 6, 3)))
    intermediates = {"layer1": {"__call__": (m,)}}
    head = objective.init_head(jax.random.key(2), y, intermediates, 10)
    key = jax.random.key(3)
    loss, metrics, _ = objective.loss(y[None], head, key, None, intermediates=intermediates, objective_state={},
                                      axis_name=None)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), head["params"])
    y64, m64 = np.asarray(y, np.float64), np.asarray(m, np.float64)
    m_prime = np.roll(m64, -1, axis=0)  # M'[i] = M[i + 1], the official torch.cat([M[1:], M[:1]])
    expected = {}
    for part, forward in (("global", numpy_global), ("local", numpy_local)):
        ej = -softplus(-forward(p[part], y64, m64)).mean()
        em = softplus(forward(p[part], y64, m_prime)).mean()
        expected[part] = em - ej
    noise = np.asarray(jax.random.uniform(key, (4, 5)), np.float64)  # torch.rand_like(y)
    expected["prior"] = -(np.log(numpy_prior_probability(p["prior"], noise)).mean()
                          + np.log(1.0 - numpy_prior_probability(p["prior"], y64)).mean())
    for part, value in expected.items():
        np.testing.assert_allclose(metrics[f"{part}_term"], value, rtol=2e-5, err_msg=part)
    total = 0.5 * expected["global"] + 1.0 * expected["local"] + 0.1 * expected["prior"]
    np.testing.assert_allclose(loss, total, rtol=2e-5)


def test_deepinfomax_official_weights_create_only_the_used_discriminators():
    config = base_config()
    config.method = "deepinfomax"
    config.model.backbone = "conv4"
    objective = make_objective(config, get_dataset_spec("cifar10"))
    assert (objective.alpha, objective.beta, objective.gamma) == (0.0, 1.0, 0.1)  # train_unsupervised.py
    assert learning_rate_schedule(config, 10)(0) == pytest.approx(1e-4)
    head = objective.init_head(jax.random.key(0), jnp.zeros((2, 64)), {"layer1": {"__call__": (jnp.zeros((2, 8, 8, 8)),)}},
                               10)
    assert sorted(head["params"]) == ["local", "prior"]


def test_deepinfomax_reads_the_stem_after_its_relu_on_resnets():
    objective = DeepInfoMax(backbone="resnet32")
    m = jnp.array([[-1.0, 2.0]]).reshape(1, 1, 2, 1)
    np.testing.assert_array_equal(objective.feature_map({"bn1": {"__call__": (m,)}}), [[[[0.0], [2.0]]]])


def test_deepinfomax_rejects_a_backbone_without_its_feature_map(monkeypatch):
    monkeypatch.setitem(backbones.BACKBONES, "mlp_net", backbones.BACKBONES["conv4"])
    config = base_config()
    config.method = "deepinfomax"
    config.model.backbone = "mlp_net"
    with pytest.raises(ValueError, match="config.model.backbone='mlp_net'.*deepinfomax supports 'conv4', 'resnet8'"):
        validate_config(config, device_count=8)


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="config.method='swav'.*" + ".*".join(f"'{name}'" for name in OBJECTIVES)):
        get_objective("swav")
    assert list(OBJECTIVES) == ["supervised", "random", "deepcluster", "rotationnet", "deepinfomax", "simclr",
                                "relational", "byol", "mocov3", "dino", "barlow_twins", "vicreg", "simsiam"]


# ------------------------------------------------------------------- DeepCluster


def test_pca_whitening_matches_numpy_svd():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.2]) + 3.0
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt.T / (s / np.sqrt(len(x) - 1))  # scikit-learn's PCA(whiten=True)
    whitened = np.asarray(pca_whiten(jnp.asarray(x, jnp.float32)), np.float64)
    signs = np.sign((whitened * expected).sum(0))  # principal directions are defined up to sign
    np.testing.assert_allclose(whitened * signs, expected, atol=2e-4)
    np.testing.assert_allclose(np.linalg.norm(unit_rows(jnp.asarray(whitened)), axis=1), 1.0, rtol=1e-6)


def numpy_lloyd(x, centres, iterations):
    centres = centres.copy()
    for _ in range(iterations):
        assignments = ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        for k in range(len(centres)):
            if (assignments == k).any():  # an empty cluster keeps its centre
                centres[k] = x[assignments == k].mean(0)
    return centres, ((x[:, None] - centres[None]) ** 2).sum(-1).argmin(1)


def blobs(seed, per_blob=20):
    rng = np.random.default_rng(seed)
    means = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]])
    points = np.concatenate([m + rng.normal(size=(per_blob, 2)) * 0.8 for m in means])
    return points.astype(np.float32), np.repeat(np.arange(4), per_blob)


def test_lloyd_iterations_match_numpy_from_the_same_centres():
    x, _ = blobs(0)
    start = np.array([x[0], x[1], x[2], [40.0, 40.0]], np.float32)  # the last centre stays empty
    for iterations in (1, 3):
        centres, assignments, inertia = lloyd(jnp.asarray(x), jnp.asarray(start), iterations)
        expected_centres, expected_assignments = numpy_lloyd(x.astype(np.float64), start.astype(np.float64),
                                                             iterations)
        np.testing.assert_allclose(centres, expected_centres, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(assignments, expected_assignments)
        expected_inertia = ((x - expected_centres[expected_assignments]) ** 2).sum()
        np.testing.assert_allclose(inertia, expected_inertia, rtol=1e-4)


def test_kmeans_plus_plus_and_kmeans_find_separated_blobs():
    x, labels = blobs(1)
    centres = np.asarray(kmeans_plus_plus(jax.random.key(0), jnp.asarray(x), 4))
    assert all(any(np.array_equal(c, p) for p in x) for c in centres)  # centres are data points
    nearest_blob = [labels[np.argmin(((x - c) ** 2).sum(1))] for c in centres]
    assert sorted(nearest_blob) == [0, 1, 2, 3]  # one in each blob (D^2 sampling)
    assignments = np.asarray(kmeans(jax.random.key(1), jnp.asarray(x), 4, 10, 3))
    for blob in range(4):  # the clusters are the blobs, up to the clusters' order
        assert len(set(assignments[labels == blob])) == 1
    assert len(set(assignments)) == 4


def test_cluster_weights_and_weighted_loss_match_numpy():
    assignments = np.array([0, 0, 0, 1, 2, 2])
    np.testing.assert_allclose(cluster_weights(jnp.asarray(assignments), 4),
                               1.0 - np.bincount(assignments, minlength=4) / 6)
    objective = DeepCluster(augment=IDENTITY, num_clusters=4)
    features = jax.random.normal(jax.random.key(0), (1, 6, 5))
    head = objective.init_head(jax.random.key(1), features[0], {}, 4)
    state = {"assignments": jnp.asarray(assignments), "weights": cluster_weights(jnp.asarray(assignments), 4),
             "epoch": jnp.array(0)}
    targets = jnp.array([0, 1, 2, 2, 0, 3])
    loss, _, stats = objective.loss(features, head, None, targets, intermediates={}, objective_state=state,
                                    axis_name=None)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), head["params"])
    h = dense(p["linear1"], np.asarray(features[0], np.float64))
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"]
    logits = dense(p["linear2"], np.where(h > 0, h, 0.01 * h))
    expected = numpy_cross_entropy(logits, np.asarray(targets), np.asarray(state["weights"]))
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(stats["bn1"]["mean"], 0.1 * dense(p["linear1"], np.asarray(features[0])).mean(0),
                               rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------- one device vs eight


def deepcluster_state(num_examples):
    assignments = jnp.arange(num_examples) * 7 % 5
    return {"assignments": assignments, "weights": cluster_weights(assignments, 5), "epoch": jnp.array(0)}


STEP_CASES = {
    "rotationnet": lambda: (RotationNet(augment=IDENTITY), None),
    "deepinfomax": lambda: (DeepInfoMax(augment=IDENTITY, alpha=0.5, beta=1.0, gamma=0.1), None),
    "deepcluster": lambda: (DeepCluster(augment=IDENTITY, num_clusters=5), deepcluster_state(16)),
}


@pytest.mark.parametrize("method", sorted(STEP_CASES))
def test_eight_device_step_equals_one_device_step(method, fast_compile):
    objective, objective_state = STEP_CASES[method]()
    config = base_config()
    config.model.backbone = "conv4"
    optimizer = make_optimizer(config, total_steps=10)
    state = create_train_state(jax.random.key(0), make_backbone(config, axis_name=None), optimizer,
                                     (16, 16, 3), objective=objective, num_examples=16)
    if objective_state is not None:
        state = state.replace(objective_state=objective_state)
    batch = {"image": jax.random.randint(jax.random.key(1), (16, 16, 16, 3), 0, 256).astype(jnp.uint8),
             "label": jnp.arange(16, dtype=jnp.int32) % 4, "index": jnp.arange(16, dtype=jnp.int32)}
    one_state, one_metrics = jax.jit(lambda s, b: train_step(
        s, b, backbone=make_backbone(config, axis_name=None), optimizer=optimizer, objective=objective))(
        state, batch)
    parallel = parallel_train_step(backbone=make_backbone(config), optimizer=optimizer,
                                         objective=objective)
    many_state, many_metrics = parallel(replicate(state),
                                        jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch))
    many_state = unreplicate(many_state)
    for name, value in one_metrics.items():
        np.testing.assert_allclose(many_metrics[name][0], value, rtol=1e-5, err_msg=name)
    for a, b in zip(jax.tree.leaves(many_state.batch_stats), jax.tree.leaves(one_state.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    mu_one = jax.tree.leaves(one_state.opt_state[0].mu)  # Adam's first moment: 0.1 * gradient
    scale = max(np.abs(x).max() for x in mu_one)
    # float32 sums in another order (the 8 fake devices' all-reduce adds in arrival order,
    # so the last bits vary from run to run) move single small, cancelling entries of Deep
    # InfoMax's encoder by up to ~1.5e-3 of the largest gradient seen, so each leaf is
    # compared as a whole: its error norm within 1% of its own norm plus 1e-3 of the
    # largest entry (a small leaf's norm is ~1e-4 of it). A missing pmean or a per-device
    # loss is off by the order of the gradient itself.
    for a, b in zip(jax.tree.leaves(many_state.opt_state[0].mu), mu_one):
        error, size = np.linalg.norm(np.asarray(a) - b), np.linalg.norm(b)
        assert error <= 1e-2 * size + 1e-3 * scale, (error, size, scale)


# ------------------------------------------------------------------- launch.py and resume


@pytest.mark.parametrize("method", ["rotationnet", "deepinfomax", "deepcluster"])
def test_method_trains_through_launch(method, tmp_path, fashion_mnist_dir):
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "launch.py", "--config=configs/fashion_mnist.py", f"--workdir={workdir}",
         f"--config.method={method}", "--config.model.backbone=conv4", f"--config.data_dir={fashion_mnist_dir}",
         "--config.pretrain_split=train[:128]", "--config.batch_size=16", "--config.max_steps=3",
         "--config.log_every_steps=1", "--config.probe.enabled=False", "--config.deepcluster.kmeans_init=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in records)
    assert json.loads((workdir / "config.json").read_text())["method"] == method
    assert "8 device(s)" in result.stderr


def tiny_deepcluster(data_dir):
    config = base_config()
    config.method = "deepcluster"
    config.model.backbone = "conv4"
    config.data_dir = str(data_dir)
    config.batch_size = 16  # 64 images: 4 steps per epoch
    config.max_steps = 8
    config.log_every_steps = 1
    config.checkpoint.every_steps = 100
    config.deepcluster.clusters_per_class = 1
    config.deepcluster.kmeans_iterations = 3
    config.deepcluster.kmeans_init = 2
    return config


def test_deepcluster_resumes_bitwise_after_mid_epoch_and_after_reclustering(tmp_path, monkeypatch, fast_compile):
    with mocked_tfds(tmp_path / "tfds", 64):
        reference = train.pretrain(tiny_deepcluster(tmp_path / "tfds"), str(tmp_path / "straight"))
        assert int(reference.objective_state["epoch"]) == 1  # clustered at steps 1 and 5
        real_batches = train.inputs.pretrain_batches

        def preempted_at(batch_step):
            def batches(*args, **kwargs):
                for step, batch in enumerate(real_batches(*args, **kwargs), start=kwargs["start_step"] + 1):
                    if step == batch_step:  # noticed within the prefetch window (2 batches)
                        os.kill(os.getpid(), signal.SIGTERM)
                    yield batch
            return batches

        stops = []
        for batch_step in (3, 7, None):  # mid-epoch 0; in epoch 1, after its re-clustering; to the end
            monkeypatch.setattr(train.inputs, "pretrain_batches", preempted_at(batch_step) if batch_step else real_batches)
            try:
                resumed = train.pretrain(tiny_deepcluster(tmp_path / "tfds"), str(tmp_path / "resumed"))
                stops.append(int(resumed.step))
            except Preempted as stop:
                stops.append(stop.step)
    assert 1 <= stops[0] <= 3 and 5 <= stops[1] <= 7 and stops[2] == 8, stops
    assert jax.tree.structure(resumed) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)  # bitwise on CPU, the clusters included


def test_deepcluster_start_epoch_is_skipped_for_the_epoch_it_belongs_to():
    objective = DeepCluster(augment=IDENTITY, num_clusters=2, kmeans_iterations=2, kmeans_init=1)
    config = base_config()
    config.model.backbone = "conv4"
    optimizer = make_optimizer(config, 10)
    state = create_train_state(jax.random.key(0), make_backbone(config, axis_name=None), optimizer,
                                     (8, 8, 1), objective=objective, num_examples=6)
    # One feature: whitened and L2-normalised, the two groups become -1 and +1.
    points = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    calls = []

    def features(s):
        calls.append(1)
        return points

    clustered = objective.start_epoch(0, state, features)
    assignments = np.asarray(clustered.objective_state["assignments"])
    assert len(set(assignments[:3])) == 1 and len(set(assignments[3:])) == 1 and assignments[0] != assignments[3]
    np.testing.assert_allclose(clustered.objective_state["weights"], [0.5, 0.5])
    assert int(clustered.objective_state["epoch"]) == 0
    last = clustered.params["head"]["linear2"]
    np.testing.assert_array_equal(last["bias"], 0.0)
    assert 0.005 < np.std(last["kernel"]) < 0.02  # N(0, 0.01)
    np.testing.assert_array_equal(clustered.params["head"]["linear1"]["kernel"], state.params["head"]["linear1"]["kernel"])
    assert objective.start_epoch(0, clustered, features) is clustered and len(calls) == 1
    with pytest.raises(ValueError, match="at least num_clusters=8"):
        dataclasses.replace(objective, num_clusters=8).start_epoch(1, clustered, features)


# ------------------------------------------------------------------- a new objective


def readme_objective() -> str:
    readme = (ROOT / "README.md").read_text().split("### Adding an objective", 1)[1]
    return re.search(r"```python\n(.*?)```", readme, re.S).group(1)


def test_the_readme_objective_plugs_in_with_one_registry_line(monkeypatch):
    namespace = {}
    header = ("import dataclasses\nimport flax.linen as nn\nimport jax.numpy as jnp\n"
              "from rr_jax.objectives import Objective\n")
    exec(compile(header + readme_objective(), "README.md", "exec"), namespace)
    monkeypatch.setitem(OBJECTIVES, "my_method", namespace["MyMethod"])  # the one registry line
    config = base_config()
    config.method = "my_method"
    config.model.backbone = "conv4"
    config.augment.update(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                          grayscale_prob=0.0)
    validate_config(config, device_count=8)
    spec = dataclasses.replace(get_dataset_spec("cifar10"), mean=(0.5,) * 3, std=(0.25,) * 3)
    objective = make_objective(config, spec)
    backbone, optimizer = make_backbone(config, axis_name=None), make_optimizer(config, 10)
    state = create_train_state(jax.random.key(0), backbone, optimizer, (8, 8, 3), objective=objective)
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
    _, metrics = train_step(state, {"image": jnp.asarray(images), "label": jnp.zeros(4, jnp.int32)},
                                  backbone=backbone, optimizer=optimizer, objective=objective)
    features, _ = backbone.apply({"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]},
                                 (images / 255.0 - 0.5) / 0.25, train=True, mutable=["batch_stats"])
    head = state.params["head"]
    expected = np.mean((np.asarray(features, np.float64) @ head["kernel"] + head["bias"]) ** 2)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-4)
