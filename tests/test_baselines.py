"""Baselines in the pretraining pipeline: SimCLR's NT-Xent, supervised, random weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mocked_tfds

from rr_jax import train
from rr_jax.augment import AugmentConfig
from rr_jax.checkpoint import Checkpointer
from rr_jax.config import base_config
from rr_jax.datasets import get_dataset_spec
from rr_jax.objectives.common import classification_loss
from rr_jax.objectives.simclr import nt_xent_loss
from rr_jax.optimizer import learning_rate_schedule, make_optimizer
from rr_jax.step import create_train_state, make_backbone, make_objective, train_step


def numpy_nt_xent(z1, z2, temperature):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    losses, hits = [], []
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sims = {j: z[i] @ z[j] / temperature for j in range(2 * n) if j != i}
        log_denominator = np.log(sum(np.exp(v) for v in sims.values()))
        losses.append(log_denominator - sims[partner])
        hits.append(max(sims, key=sims.get) == partner)
    return np.mean(losses), np.mean(hits)


def test_nt_xent_matches_numpy():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(2, 6, 5)).astype(np.float32)
    z2 = z1 + 0.8 * z2  # partners are similar: the accuracy is neither 0 nor 1
    loss, accuracy = nt_xent_loss(jnp.asarray(z1), jnp.asarray(z2), 0.5)
    expected_loss, expected_accuracy = numpy_nt_xent(z1, z2, 0.5)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(accuracy, expected_accuracy)


def test_classification_loss_matches_numpy():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 3.0]], np.float32)
    labels = np.array([0, 1])
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    loss, accuracy = classification_loss(jnp.asarray(logits), jnp.asarray(labels))
    np.testing.assert_allclose(loss, -np.mean(log_softmax[[0, 1], labels]), rtol=1e-6)
    assert accuracy == 0.5


def test_nt_xent_rejects_bad_shapes():
    with pytest.raises(ValueError, match="B >= 2"):
        nt_xent_loss(jnp.zeros((1, 4)), jnp.zeros((1, 4)))


def test_supervised_schedule_drops_at_half_and_three_quarters():
    config = base_config()
    config.method = "supervised"
    schedule = learning_rate_schedule(config, 100)
    np.testing.assert_allclose([schedule(s) for s in (0, 49, 50, 74, 75, 99)],
                               [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    config.method = "relational"
    assert learning_rate_schedule(config, 100)(99) == pytest.approx(1e-3)


@pytest.mark.parametrize("method", ["simclr", "supervised"])
def test_baseline_steps_learn_a_fixed_batch(method):
    config = base_config()
    config.method = method
    config.model.backbone = "conv4"
    augment = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0,
                            jitter_prob=0.0, grayscale_prob=0.0)
    objective = dataclasses.replace(make_objective(config, get_dataset_spec("cifar10")), augment=augment)
    assert objective.num_views == {"simclr": 2, "supervised": 1}[method]
    backbone = make_backbone(config, axis_name=None)
    optimizer = make_optimizer(config, total_steps=1000)
    state = create_train_state(jax.random.key(0), backbone, optimizer, (16, 16, 3),
                                     objective=objective, num_classes=4)
    batch = {"image": jax.random.randint(jax.random.key(1), (8, 16, 16, 3), 0, 256).astype(jnp.uint8),
             "label": jnp.arange(8) % 4}
    step = jax.jit(lambda s, b: train_step(s, b, backbone=backbone, optimizer=optimizer, objective=objective))
    losses = []
    for _ in range(8):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.8 * losses[0], losses


def test_random_method_checkpoints_the_initial_weights(tmp_path):
    config = base_config()
    config.method = "random"
    config.model.backbone = "conv4"
    config.batch_size = 16
    config.data_dir = str(tmp_path / "tfds")
    with mocked_tfds(tmp_path / "tfds", 32):
        state = train.pretrain(config, str(tmp_path / "run"))
    assert int(state.step) == 0
    backbone, _ = Checkpointer(str(tmp_path / "run")).restore_backbone()
    fresh = create_train_state(
        jax.random.key(0), make_backbone(config), make_optimizer(config, 0), (32, 32, 3),
        objective=make_objective(config, get_dataset_spec("cifar10")), num_classes=10)
    for a, b in zip(jax.tree.leaves(backbone["params"]), jax.tree.leaves(fresh.params["backbone"])):
        np.testing.assert_array_equal(a, b)
