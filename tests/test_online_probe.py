"""The online linear probe: its update against NumPy, its place in the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rr_jax import online_probe
from rr_jax.augment import AugmentConfig
from rr_jax.config import base_config, validate_config
from rr_jax.monitors import with_labelled_batches
from rr_jax.objectives.relational import Relational
from rr_jax.optimizer import make_optimizer
from rr_jax.step import create_train_state, make_backbone, replicate, train_step, unreplicate

pytestmark = pytest.mark.usefixtures("fast_compile")

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
AUGMENT = AugmentConfig(mean=MEAN, std=STD)


def numpy_adam_probe(features, labels, kernel, bias, learning_rates):
    """Softmax regression trained by full-batch Adam (optax's defaults) with learning
    rate learning_rates[t] at step t, in NumPy.
    Returns (kernel, bias, [(loss, accuracy) before each step])."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    params = [kernel.astype(np.float64), bias.astype(np.float64)]
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    onehot = np.eye(kernel.shape[1])[labels]
    history = []
    for t, learning_rate in enumerate(learning_rates, start=1):
        logits = features @ params[0] + params[1]
        logits = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        history.append((-np.mean(np.log(p[np.arange(len(labels)), labels])), np.mean(p.argmax(1) == labels)))
        delta = (p - onehot) / len(labels)
        grads = [features.T @ delta, delta.sum(axis=0)]
        for i, g in enumerate(grads):
            m, v = b1 * moments[i][0] + (1 - b1) * g, b2 * moments[i][1] + (1 - b2) * g * g
            moments[i] = m, v
            params[i] = params[i] - learning_rate * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return params[0], params[1], history


@pytest.mark.parametrize("total_steps", [None, 4])
def test_update_is_adam_on_the_softmax_cross_entropy(total_steps):
    """Constant rate, and a cosine decay to 0 over 4 steps: 0.05 * (1 + cos(pi t / 4)) / 2."""
    rng = np.random.default_rng(0)
    features = rng.normal(size=(48, 6)).astype(np.float32)
    labels = rng.integers(0, 5, 48)
    optimizer = online_probe.make_optimizer(0.05, total_steps)
    state = online_probe.init(jax.random.key(0), 6, 5, optimizer)
    kernel, bias = (np.asarray(state.params["dense"][k]) for k in ("kernel", "bias"))
    assert np.abs(kernel).max() <= 1 / np.sqrt(6) and np.abs(bias).max() <= 1 / np.sqrt(6)  # nn.Linear init
    update = jax.jit(lambda s, x, y: online_probe.update(s, x, y, optimizer=optimizer))
    metrics = []
    for _ in range(3):
        state, m = update(state, features, labels)
        metrics.append((float(m["online_probe_loss"]), float(m["online_probe_train_top1"])))
    rates = [0.05] * 3 if total_steps is None else [0.025 * (1 + np.cos(np.pi * t / 4)) for t in range(3)]
    expected_kernel, expected_bias, history = numpy_adam_probe(features, labels, kernel, bias, rates)
    np.testing.assert_allclose(state.params["dense"]["kernel"], expected_kernel, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(state.params["dense"]["bias"], expected_bias, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(metrics, history, rtol=1e-5)
    logits = features @ expected_kernel + expected_bias
    assert online_probe.evaluate(state.params, features, labels) == pytest.approx(np.mean(logits.argmax(1) == labels))


def test_eight_device_update_equals_the_global_batch_update():
    assert jax.local_device_count() == 8
    rng = np.random.default_rng(1)
    features = rng.normal(size=(32, 5)).astype(np.float32)
    labels = rng.integers(0, 3, 32)
    optimizer = online_probe.make_optimizer(1e-2)
    state = online_probe.init(jax.random.key(2), 5, 3, optimizer)
    one, one_metrics = online_probe.update(state, features, labels, optimizer=optimizer)
    many, many_metrics = jax.pmap(
        lambda s, x, y: online_probe.update(s, x, y, optimizer=optimizer, axis_name="batch"), axis_name="batch"
    )(replicate(state), features.reshape(8, 4, 5), labels.reshape(8, 4))
    for a, b in zip(jax.tree.leaves(unreplicate(many)), jax.tree.leaves(one)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    for name in one_metrics:
        np.testing.assert_allclose(many_metrics[name], one_metrics[name], rtol=1e-5)


@pytest.fixture(scope="module")
def step_setup():
    config = base_config()
    config.model.backbone = "conv4"
    backbone = make_backbone(config, axis_name=None)
    optimizer = make_optimizer(config, total_steps=10)
    objective = Relational(num_views=2, augment=AUGMENT)
    state = create_train_state(jax.random.key(0), backbone, optimizer, (16, 16, 3), objective=objective)
    probe_optimizer = online_probe.make_optimizer(1e-3)
    probe = online_probe.init(jax.random.key(3), 64, 10, probe_optimizer)
    rng = np.random.default_rng(4)
    batch = {"image": rng.integers(0, 256, (8, 16, 16, 3), np.uint8), "label": rng.integers(0, 10, 8)}
    step = jax.jit(lambda s, b: train_step(
        s, b, backbone=backbone, optimizer=optimizer, objective=objective, probe_optimizer=probe_optimizer))
    return backbone, state, probe, probe_optimizer, batch, step


def eval_features(backbone, state, images):
    """Eval-mode features of images normalised in NumPy."""
    x = (images / 255.0 - np.array(MEAN)) / np.array(STD)
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
    return np.asarray(backbone.apply(variables, jnp.asarray(x, jnp.float32), train=False))


def test_probe_trains_on_stop_gradient_eval_features_and_leaves_the_backbone_alone(step_setup):
    backbone, state, probe, probe_optimizer, batch, step = step_setup
    without, without_metrics = step(state, batch)
    with_probe, with_metrics = step(state.replace(online_probe=probe), batch)
    assert without.online_probe is None
    # The backbone's (and head's) gradients are the same: Adam's first moment after one
    # step is 0.1 * gradient; parameters and BatchNorm statistics follow.
    for field in ("opt_state", "params", "batch_stats"):
        for a, b in zip(jax.tree.leaves(getattr(with_probe, field)), jax.tree.leaves(getattr(without, field))):
            np.testing.assert_array_equal(a, b)
    for name, value in without_metrics.items():
        np.testing.assert_array_equal(with_metrics[name], value)
    # The probe took one step on the eval-mode features of the unaugmented images.
    expected, expected_metrics = online_probe.update(
        probe, eval_features(backbone, state, batch["image"]), batch["label"], optimizer=probe_optimizer
    )
    for a, b in zip(jax.tree.leaves(with_probe.online_probe), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for name, value in expected_metrics.items():
        np.testing.assert_allclose(with_metrics[name], value, rtol=1e-4)


def test_labelled_images_alongside_an_unlabelled_batch(step_setup):
    backbone, state, probe, probe_optimizer, batch, step = step_setup
    rng = np.random.default_rng(5)
    labelled = {"image": rng.integers(0, 256, (8, 16, 16, 3), np.uint8), "label": rng.integers(0, 10, 8)}
    unlabelled = {"image": batch["image"], "label": np.full(8, -1)}
    merged = next(with_labelled_batches(iter([unlabelled]), iter([labelled])))
    assert set(merged) == {"image", "label", "probe_image", "probe_label"}
    np.testing.assert_array_equal(merged["probe_image"], labelled["image"])
    new_state, _ = step(state.replace(online_probe=probe), merged)
    expected, _ = online_probe.update(
        probe, eval_features(backbone, state, labelled["image"]), labelled["label"], optimizer=probe_optimizer
    )
    for a, b in zip(jax.tree.leaves(new_state.online_probe), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_state_with_a_probe_needs_its_optimizer(step_setup):
    backbone, state, probe, _, batch, _ = step_setup
    with pytest.raises(ValueError, match="probe_optimizer"):
        train_step(state.replace(online_probe=probe), batch, backbone=backbone,
                         optimizer=make_optimizer(base_config(), 10),
                         objective=Relational(num_views=2, augment=AUGMENT))


@pytest.mark.parametrize("dim, classes", [(0, 3), (4, 0), (4.0, 3)])
def test_init_rejects_bad_sizes(dim, classes):
    with pytest.raises(ValueError, match="feature_dim and num_classes must be positive ints"):
        online_probe.init(jax.random.key(0), dim, classes, online_probe.make_optimizer(1e-3))


@pytest.mark.parametrize("key, value, match", [
    ("every_steps", -1, "config.online_probe.every_steps=-1 is not allowed: it must be an integer >= 0"),
    ("num_test", 0, "config.online_probe.num_test=0 is not allowed: it must be a positive integer"),
    ("learning_rate", 0.0, "config.online_probe.learning_rate=0.0 is not allowed: it must be > 0"),
])
def test_config_errors(key, value, match):
    config = base_config()
    config.online_probe[key] = value
    with pytest.raises(ValueError, match=match):
        validate_config(config)
