"""BYOL, MoCo v3, DINO, Barlow Twins, VICReg and SimSiam: their losses against NumPy,
the momentum teacher (schedule, moving average, DINO's centre), eight devices against
one, config validation, and a bitwise resume of DINO after a crash."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import mocked_tfds
from test_pipeline import load_config, tiny

from rr_jax import train
from rr_jax.augment import AugmentConfig
from rr_jax.batch_norm import BatchNorm
from rr_jax.config import base_config, validate_config
from rr_jax.datasets import get_dataset_spec
from rr_jax.errors import ConfigError
from rr_jax.objectives import BYOL, DINO, OBJECTIVES, BarlowTwins, MoCoV3, SimSiam, VICReg
from rr_jax.objectives.barlow_twins import barlow_twins_loss
from rr_jax.objectives.byol import byol_loss
from rr_jax.objectives.dino import dino_loss
from rr_jax.objectives.mocov3 import info_nce
from rr_jax.objectives.simsiam import simsiam_loss
from rr_jax.objectives.teacher import momentum_schedule
from rr_jax.objectives.vicreg import vicreg_loss
from rr_jax.optimizer import make_optimizer
from rr_jax.step import (
    AXIS,
    create_train_state,
    make_backbone,
    make_objective,
    parallel_train_step,
    replicate,
    train_step,
    unreplicate,
)

NEW_METHODS = ("byol", "mocov3", "dino", "barlow_twins", "vicreg", "simsiam")
# Views equal to the images (normalised): every device's augmentation key gives the same views.
IDENTITY = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0,
                         grayscale_prob=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)


def normal(seed, *shape):
    return np.random.default_rng(seed).normal(size=shape)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


# ------------------------------------------------------------------ the losses against NumPy


def test_byol_and_simsiam_losses_match_numpy():
    p, z = normal(0, 2, 6, 5), normal(1, 2, 6, 5)
    expected_byol = np.mean([(2 - 2 * unit(p[0][b]) @ unit(z[1][b])) + (2 - 2 * unit(p[1][b]) @ unit(z[0][b]))
                             for b in range(6)])
    np.testing.assert_allclose(byol_loss(jnp.asarray(p), jnp.asarray(z)), expected_byol, rtol=1e-5)
    expected_simsiam = np.mean([-(unit(p[0][b]) @ unit(z[1][b]) + unit(p[1][b]) @ unit(z[0][b])) / 2
                                for b in range(6)])
    np.testing.assert_allclose(simsiam_loss(jnp.asarray(p), jnp.asarray(z)), expected_simsiam, rtol=1e-5)
    # No gradient reaches the targets (BYOL's teacher, SimSiam's stop-gradient).
    grad = jax.grad(lambda z: simsiam_loss(jnp.asarray(p), z))(jnp.asarray(z))
    np.testing.assert_array_equal(grad, 0.0)


def test_info_nce_matches_numpy():
    q, k = normal(2, 4, 5), normal(3, 12, 5)
    positives = np.array([4, 5, 6, 7])  # the second of three devices' keys
    logits = unit(q) @ unit(k).T / 0.2
    expected = -np.mean(log_softmax(logits)[np.arange(4), positives]) * 2 * 0.2
    loss, accuracy = info_nce(jnp.asarray(q), jnp.asarray(k), jnp.asarray(positives), 0.2)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(accuracy, np.mean(logits.argmax(1) == positives))


def test_dino_loss_and_teacher_centring_match_numpy(fast_compile):
    student, teacher = normal(4, 2, 3, 7), normal(5, 2, 3, 7)
    centre = normal(6, 7) * 0.1
    objective = DINO(augment=IDENTITY, hidden_dim=8, bottleneck_dim=4, num_prototypes=7, student_temperature=0.1,
                     teacher_temperature=0.04, centre_momentum=0.9)
    t = np.exp(log_softmax((teacher - centre) / 0.04))
    log_s = log_softmax(student / 0.1)
    expected = np.mean([-(t[i] * log_s[j]).sum(-1).mean() for i in range(2) for j in range(2) if i != j])
    np.testing.assert_allclose(dino_loss(jnp.asarray(student), jnp.asarray(t), 0.1), expected, rtol=1e-5)
    # The teacher hook: its head's outputs, centred and sharpened, and the batch's mean for the centre.
    head = objective.init_head(jax.random.key(0), jnp.zeros((2, 4)), {}, 10)
    features = jnp.asarray(normal(7, 2, 3, 4), jnp.float32)
    outputs = np.asarray(objective.head().apply({"params": head["params"]}, features), np.float64)
    probabilities, _, extra = objective.teacher_head(head, features, {"centre": jnp.asarray(centre)}, None)
    np.testing.assert_allclose(probabilities, np.exp(log_softmax((outputs - centre) / 0.04)), rtol=1e-4, atol=1e-6)
    state = {"teacher": {"params": {"backbone": {}, "head": head["params"]}, "batch_stats": {}},
             "centre": jnp.asarray(centre, jnp.float32)}
    new = objective.update_state(state, {"batch_stats": {}, **extra}, {"backbone": {}, "head": head["params"]},
                                 jnp.array(0))
    np.testing.assert_allclose(new["centre"], 0.9 * centre + 0.1 * outputs.mean((0, 1)), rtol=1e-5, atol=1e-7)


def test_dino_head_prototypes_have_unit_norm():
    objective = DINO(augment=IDENTITY, hidden_dim=8, bottleneck_dim=4, num_prototypes=6)
    head = objective.init_head(jax.random.key(1), jnp.zeros((2, 5)), {}, 10)
    head["params"]["prototypes"] = head["params"]["prototypes"] * 7.0  # weight normalisation ignores the scale
    x = normal(8, 3, 5)
    mlp = head["params"]["mlp"]
    h = x
    for i in (1, 2, 3):
        h = h @ np.asarray(mlp[f"linear{i}"]["kernel"]) + np.asarray(mlp[f"linear{i}"]["bias"])
        if i < 3:
            h = np.asarray(jax.nn.gelu(jnp.asarray(h)))
    expected = unit(h) @ unit(np.asarray(head["params"]["prototypes"]).T).T
    np.testing.assert_allclose(objective.head().apply({"params": head["params"]}, jnp.asarray(x)), expected,
                               rtol=1e-4, atol=1e-6)


def test_barlow_twins_loss_matches_numpy():
    z1, z2 = normal(9, 10, 4), normal(10, 10, 4) + normal(9, 10, 4)

    def standardise(z):
        return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5)

    c = standardise(z1).T @ standardise(z2) / 10
    expected = sum((1 - c[i, i]) ** 2 for i in range(4)) + 0.0051 * sum(
        c[i, j] ** 2 for i in range(4) for j in range(4) if i != j)
    loss, diagonal = barlow_twins_loss(jnp.asarray(z1), jnp.asarray(z2), 0.0051)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(diagonal, np.diag(c).mean(), rtol=1e-5)


def test_vicreg_loss_matches_numpy():
    z1, z2 = normal(11, 10, 4), normal(12, 10, 4) * 0.3

    def variance(z):
        return np.mean(np.maximum(0.0, 1 - np.sqrt(z.var(0, ddof=1) + 1e-4)))

    def covariance(z):
        c = np.cov(z, rowvar=False)
        return (np.sum(c ** 2) - np.sum(np.diag(c) ** 2)) / z.shape[1]

    terms = {"invariance": np.mean((z1 - z2) ** 2), "variance": (variance(z1) + variance(z2)) / 2,
             "covariance": covariance(z1) + covariance(z2)}
    loss, got = vicreg_loss(jnp.asarray(z1), jnp.asarray(z2), 25.0, 25.0, 1.0)
    for name, value in terms.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(loss, 25 * terms["invariance"] + 25 * terms["variance"] + terms["covariance"],
                               rtol=1e-5)


# ------------------------------------------------------------------ the momentum teacher


def test_momentum_schedule_is_the_cosine_from_base_to_one():
    for step in (0, 1, 7, 10, 12):
        expected = 1 - (1 - 0.99) * (math.cos(math.pi * min(step, 10) / 10) + 1) / 2
        np.testing.assert_allclose(momentum_schedule(0.99, jnp.array(step), 10), expected, rtol=1e-6)
    assert float(momentum_schedule(0.99, jnp.array(0), 10)) == pytest.approx(0.99)
    assert float(momentum_schedule(0.99, jnp.array(10), 10)) == 1.0


def test_teacher_starts_as_a_copy_and_moves_by_the_moving_average(fast_compile):
    config = base_config()
    config.model.backbone = "conv4"
    objective = BYOL(augment=IDENTITY, projector_hidden_dim=8, projector_dim=4, predictor_hidden_dim=8,
                     base_momentum=0.9).for_run(4)
    optimizer = make_optimizer(config, 4)
    state = create_train_state(jax.random.key(0), make_backbone(config, axis_name=None), optimizer,
                                     (16, 16, 3), objective=objective)
    teacher = state.objective_state["teacher"]
    assert sorted(teacher["params"]["head"]) == ["projector_mlp"]  # the predictor has no teacher
    for a, b in zip(jax.tree.leaves(teacher["params"]), jax.tree.leaves({"backbone": state.params["backbone"], "head": {
            "projector_mlp": state.params["head"]["projector_mlp"]}})):
        np.testing.assert_array_equal(a, b)
    online = jax.tree.map(lambda x: x + 1.0, state.params)
    aux = {"batch_stats": jax.tree.map(lambda x: x + 2.0, teacher["batch_stats"])}
    new = jax.jit(objective.update_state)(state.objective_state, aux, online, jnp.array(1))
    tau = 1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2
    kernel = np.asarray(teacher["params"]["backbone"]["layer1"]["conv"]["kernel"])
    np.testing.assert_allclose(new["teacher"]["params"]["backbone"]["layer1"]["conv"]["kernel"],
                               tau * kernel + (1 - tau) * (kernel + 1.0), rtol=1e-6)
    np.testing.assert_array_equal(new["teacher"]["batch_stats"]["backbone"]["layer1"]["bn"]["mean"],
                                  aux["batch_stats"]["backbone"]["layer1"]["bn"]["mean"])


# ------------------------------------------------------------------ eight devices against one


STEP_CASES = {
    "byol": lambda: BYOL(augment=IDENTITY, projector_hidden_dim=16, projector_dim=8, predictor_hidden_dim=16),
    "mocov3": lambda: MoCoV3(augment=IDENTITY, projector_hidden_dim=16, projector_dim=8, predictor_hidden_dim=16),
    "dino": lambda: DINO(augment=IDENTITY, hidden_dim=16, bottleneck_dim=8, num_prototypes=32),
    "barlow_twins": lambda: BarlowTwins(augment=IDENTITY, projector_hidden_dim=16, projector_dim=16),
    "vicreg": lambda: VICReg(augment=IDENTITY, projector_hidden_dim=16, projector_dim=16),
    "simsiam": lambda: SimSiam(augment=IDENTITY, projector_hidden_dim=16, projector_dim=16, predictor_hidden_dim=8),
}


class TinyBackbone(nn.Module):
    """Dense -> BatchNorm (across devices under axis_name) -> ReLU on the flattened image:
    the backbone's interface (train, batch_stats) at a fraction of conv4's compile time."""

    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x.reshape(x.shape[0], -1))
        return nn.relu(BatchNorm(use_running_average=not train, axis_name=self.axis_name)(x))


def flip_views(objective, key, batch, objective_state):
    """Two device-independent views: the images and their mirror images, normalised (the
    augmentation pipeline, tested elsewhere, would dominate the compile time)."""
    images = (batch["image"].astype(jnp.float32) / 255.0 - 0.5) / 0.25
    return jnp.stack([images, images[:, :, ::-1]]), batch["label"]


@pytest.mark.parametrize("method", NEW_METHODS)
def test_eight_device_step_equals_one_device_step(method, fast_compile):
    case = STEP_CASES[method]()
    flipped = type(f"Flipped{type(case).__name__}", (type(case),), {"inputs": flip_views})
    objective = flipped(**{f.name: getattr(case, f.name) for f in dataclasses.fields(case)}).for_run(10)
    optimizer = make_optimizer(base_config(), total_steps=10)
    state = create_train_state(jax.random.key(0), TinyBackbone(), optimizer, (4, 4, 3), objective=objective,
                                     num_examples=16)
    batch = {"image": jax.random.randint(jax.random.key(1), (16, 4, 4, 3), 0, 256).astype(jnp.uint8),
             "label": jnp.arange(16, dtype=jnp.int32) % 4}
    one_state, one_metrics = jax.jit(lambda s, b: train_step(
        s, b, backbone=TinyBackbone(), optimizer=optimizer, objective=objective))(state, batch)
    parallel = parallel_train_step(backbone=TinyBackbone(AXIS), optimizer=optimizer, objective=objective)
    many_state, many_metrics = parallel(replicate(state),
                                        jax.tree.map(lambda x: x.reshape(8, -1, *x.shape[1:]), batch))
    many_state = unreplicate(many_state)
    for name, value in one_metrics.items():
        np.testing.assert_allclose(many_metrics[name][0], value, rtol=1e-4, atol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(many_state.batch_stats), jax.tree.leaves(one_state.batch_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    mu_one = jax.tree.leaves(one_state.opt_state[0].mu)  # Adam's first moment: 0.1 * gradient
    scale = max(np.abs(x).max() for x in mu_one)
    # As in test_objectives: float32 sums in another order; a missing gather or pmean is
    # off by the order of the gradient itself.
    for a, b in zip(jax.tree.leaves(many_state.opt_state[0].mu), mu_one):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * scale)
    # The teacher's BatchNorm statistics are the global batch's, DINO's centre its mean;
    # its parameters move by (1 - tau) times Adam's first update (about lr where a gradient
    # entry is ~0 and its sign is noise).
    assert jax.tree.structure(many_state.objective_state) == jax.tree.structure(one_state.objective_state)
    if "teacher" in one_state.objective_state:
        many, one = many_state.objective_state, one_state.objective_state
        for a, b in zip(jax.tree.leaves(many["teacher"]["batch_stats"]), jax.tree.leaves(one["teacher"]["batch_stats"])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        for a, b in zip(jax.tree.leaves(many["teacher"]["params"]), jax.tree.leaves(one["teacher"]["params"])):
            np.testing.assert_allclose(a, b, rtol=0, atol=3e-5)
        if "centre" in one:
            np.testing.assert_allclose(many["centre"], one["centre"], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------ config


def test_the_six_methods_are_registered_with_their_settings():
    assert list(OBJECTIVES)[-6:] == list(NEW_METHODS)
    config = base_config()
    spec = get_dataset_spec("cifar10")
    for method in NEW_METHODS:
        config.method = method
        validate_config(config, device_count=8)
        objective = make_objective(config, spec, total_steps=123)
        assert objective.num_views == 2 and objective.name == method
        for key, value in config[method].items():
            assert getattr(objective, key) == value, (method, key)
        if method in ("byol", "mocov3", "dino"):  # the teacher's momentum schedule spans the run
            assert objective.total_steps == 123


@pytest.mark.parametrize("key, value, allowed", [
    ("dino.teacher_temperature", 0.0, "it must be > 0"),
    ("dino.centre_momentum", 1.5, r"it must be in \[0, 1\]"),
    ("byol.base_momentum", -0.1, r"it must be in \[0, 1\]"),
    ("mocov3.temperature", -1.0, "it must be > 0"),
    ("barlow_twins.projector_dim", 0, "it must be a positive integer"),
    ("vicreg.variance_weight", -1.0, "it must be >= 0"),
    ("simsiam.predictor_hidden_dim", -3, "it must be a positive integer"),
])
def test_bad_settings_are_refused_by_name(key, value, allowed):
    config = base_config()
    method, field = key.split(".")
    config.method = method
    config[method][field] = value
    with pytest.raises(ConfigError, match=rf"config\.{key}={value!r} is not allowed: {allowed}"):
        validate_config(config, device_count=8)


# ------------------------------------------------------------------ resume


def test_crashed_dino_run_resumes_bitwise_with_teacher_centre_and_monitors(tmp_path, monkeypatch, fast_compile):
    """DINO holds every kind of objective state (a teacher with BatchNorm statistics, the centre)."""
    def config():
        return tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=6, **{
            "method": "dino", "model.backbone": "conv4", "checkpoint.every_steps": 2, "probe.enabled": False,
            "knn_monitor.every_steps": 3, "knn_monitor.num_train": 32, "knn_monitor.num_test": 16,
            "knn_monitor.k": 4, "online_probe.every_steps": 3, "online_probe.num_test": 16,
            "dino.hidden_dim": 16, "dino.num_prototypes": 32})

    real_batches = train.inputs.pretrain_batches

    def crashing(*args, **kwargs):
        for step, batch in enumerate(real_batches(*args, **kwargs), start=kwargs["start_step"] + 1):
            if step == 5:  # the process dies between the checkpoints of steps 2 and 6
                raise RuntimeError("killed")
            yield batch

    with mocked_tfds(tmp_path / "tfds", 64):
        reference = train.pretrain(config(), str(tmp_path / "straight"))
        monkeypatch.setattr(train.inputs, "pretrain_batches", crashing)
        with pytest.raises(RuntimeError, match="killed"):
            train.pretrain(config(), str(tmp_path / "resumed"))
        assert train.Checkpointer(str(tmp_path / "resumed")).latest_step() in (2, 4)
        monkeypatch.setattr(train.inputs, "pretrain_batches", real_batches)
        resumed = train.pretrain(config(), str(tmp_path / "resumed"))
    assert {"teacher", "centre"} <= set(reference.objective_state) and int(resumed.step) == 6
    assert jax.tree.structure(resumed) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)  # bitwise on CPU: teacher, centre and online probe included
    monitored = [line for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
                 if "knn_top1" in line or "online_probe_top1" in line]
    assert monitored and all("NaN" not in line for line in monitored)


# ------------------------------------------------------------------ LARS


def test_lars_scales_matrix_steps_by_the_trust_ratio_and_leaves_biases_plain():
    config = base_config()
    config.optimizer.update(name="lars", learning_rate=0.5, weight_decay=0.1, momentum=0.9)
    validate_config(config, device_count=8)
    optimizer = make_optimizer(config, total_steps=10)
    params = {"kernel": jnp.asarray(normal(13, 3, 2), jnp.float32), "bias": jnp.asarray(normal(14, 2), jnp.float32)}
    grads = {"kernel": jnp.asarray(normal(15, 3, 2), jnp.float32), "bias": jnp.asarray(normal(16, 2), jnp.float32)}
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    w, g = np.asarray(params["kernel"], np.float64), np.asarray(grads["kernel"], np.float64)
    decayed = g + 0.1 * w  # L2 weight decay on the matrix only
    expected_kernel = -0.5 * 0.001 * np.linalg.norm(w) / np.linalg.norm(decayed) * decayed
    np.testing.assert_allclose(updates["kernel"], expected_kernel, rtol=1e-5)
    np.testing.assert_allclose(updates["bias"], -0.5 * np.asarray(grads["bias"]), rtol=1e-6)
