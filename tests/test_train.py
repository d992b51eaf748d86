"""The pmapped train step against a single-device step, and config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rr_jax.augment import AugmentConfig
from rr_jax.config import base_config, validate_config
from rr_jax.objectives import OBJECTIVES, Relational
from rr_jax.optimizer import make_optimizer
from rr_jax.step import create_train_state, make_backbone, parallel_train_step, replicate, train_step, unreplicate

IDENTITY_AUGMENT = AugmentConfig(
    crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
    grayscale_prob=0.0, mean=(0.5,), std=(0.25,),
)


def step_inputs(num_devices, batch=16):
    config = base_config()
    config.model.backbone = "conv4"
    backbone_1 = make_backbone(config, axis_name=None)
    backbone_n = make_backbone(config)
    optimizer = make_optimizer(config, total_steps=10)
    objective = Relational(num_views=3, augment=IDENTITY_AUGMENT, negatives="roll", global_negatives=True)
    state = create_train_state(jax.random.key(0), backbone_1, optimizer, (16, 16, 3), objective=objective)
    images = {"image": jax.random.randint(jax.random.key(1), (batch, 16, 16, 3), 0, 256).astype(jnp.uint8),
              "label": jnp.arange(batch) % 10}
    return state, images, optimizer, objective, backbone_1, backbone_n


def per_device(batch):
    return jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch)


def test_eight_device_step_equals_one_device_step():
    """Same global batch and pairs: loss, parameters after the update and BN statistics agree."""
    assert jax.local_device_count() == 8
    state, images, optimizer, objective, backbone_1, backbone_n = step_inputs(8)
    single = jax.jit(lambda s, x: train_step(s, x, backbone=backbone_1, optimizer=optimizer, objective=objective))
    one_state, one_metrics = single(state, images)

    parallel = parallel_train_step(backbone=backbone_n, optimizer=optimizer, objective=objective)
    many_state, many_metrics = parallel(replicate(state), per_device(images))
    many_state = unreplicate(many_state)

    np.testing.assert_allclose(many_metrics["loss"][0], one_metrics["loss"], rtol=1e-5)
    np.testing.assert_allclose(many_metrics["accuracy"][0], one_metrics["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(many_metrics["num_pairs"][0], one_metrics["num_pairs"])  # global counts
    for a, b in zip(jax.tree.leaves(many_state.batch_stats), jax.tree.leaves(one_state.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The gradients, through Adam's first moment after one step: mu = 0.1 * grad.
    # Some leaves have an analytically zero gradient (a bias followed by BatchNorm): use
    # the largest gradient of all as the scale.
    mu_one = jax.tree.leaves(one_state.opt_state[0].mu)
    scale = max(np.abs(x).max() for x in mu_one)
    for a, b in zip(jax.tree.leaves(many_state.opt_state[0].mu), mu_one):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale)
    # Replicas stay identical.
    leaves = jax.tree.leaves(parallel(replicate(state), per_device(images))[0].params)
    for leaf in leaves:
        np.testing.assert_array_equal(leaf[0], leaf[7])


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("dataset", "imagenet21k", "config.dataset='imagenet21k'.*'cifar10'"),
        ("model.backbone", "vit", "config.model.backbone='vit'.*'conv4'"),
        ("relational.aggregation", "prod", "config.relational.aggregation='prod'.*'cat'"),
        ("relational.loss", "hinge", "config.relational.loss='hinge'.*'focal'"),
        ("method", "swav", "config.method='swav'.*'supervised', 'random', 'deepcluster', 'rotationnet', "
                           "'deepinfomax', 'simclr', 'relational', 'byol', 'mocov3', 'dino', 'barlow_twins', "
                           "'vicreg', 'simsiam'"),
        ("relational.num_views", 1, "config.relational.num_views=1.*K must be >= 2"),
        ("batch_size", 12, "config.batch_size=12.*divisible by the device count 8"),
        ("batch_size", 8, "config.batch_size=8.*>= 2 images"),
        ("num_epochs", 0, "config.num_epochs=0.*positive integer"),
        ("max_steps", -3, "config.max_steps=-3.*positive integer"),
        ("checkpoint.every_steps", 0, "config.checkpoint.every_steps=0"),
        ("optimizer.learning_rate", 0.0, "config.optimizer.learning_rate=0.0"),
        ("optimizer.name", "lamb", "config.optimizer.name='lamb'.*'adam', 'sgd'"),
        ("simclr.temperature", 0.0, "config.simclr.temperature=0.0"),
        ("deepinfomax.gamma", -1.0, "config.deepinfomax.gamma=-1.0.*>= 0"),
        ("deepcluster.kmeans_iterations", 0, "config.deepcluster.kmeans_iterations=0.*positive integer"),
    ],
)
def test_config_errors(key, value, match):
    config = base_config()
    if key.split(".")[0] in OBJECTIVES:  # a method's own fields are checked when it is the method
        config.method = key.split(".")[0]
    target, *_, last = [config] + key.split(".")
    for part in key.split(".")[:-1]:
        target = target[part]
    target[last] = value
    with pytest.raises(ValueError, match=match):
        validate_config(config, device_count=8)


def test_default_config_is_valid_and_unwritable_workdir_fails(tmp_path):
    validate_config(base_config(), str(tmp_path / "run"), device_count=8)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ValueError, match="workdir"):
        validate_config(base_config(), str(blocker / "run"), device_count=8)


def test_parallel_step_compiles_once():
    """Feeding the step's outputs back (and the replicated initial state) never retraces."""
    import chex

    state, images, optimizer, objective, _, backbone_n = step_inputs(8)
    step = chex.assert_max_traces(train_step, n=1)
    parallel = jax.pmap(
        lambda s, x: step(s, x, backbone=backbone_n, optimizer=optimizer, objective=objective, axis_name="batch"),
        axis_name="batch", donate_argnums=(0,))
    replicated = replicate(state)
    for _ in range(3):
        replicated, _ = parallel(replicated, per_device(images))
    assert int(replicated.step[0]) == 3
