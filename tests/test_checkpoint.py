"""Checkpoints written before objectives were plug-ins still restore and resume."""

import pathlib
import shutil

import jax
import numpy as np

from rr_jax.augment import AugmentConfig
from rr_jax.checkpoint import Checkpointer
from rr_jax.config import base_config
from rr_jax.objectives import DeepCluster, Relational
from rr_jax.objectives.common import CropFlip
from rr_jax.optimizer import make_optimizer
from rr_jax.step import create_train_state, make_backbone, train_step

# A relational conv4 run on 8x8x1 images (K=2, hidden_dim=8, Adam), one step taken:
# written with the train state of the time, {step, params, batch_stats, opt_state, rng}.
LEGACY = pathlib.Path(__file__).parent / "data" / "legacy_relational_conv4"


def conv4_config():
    config = base_config()
    config.model.backbone = "conv4"
    return config


def legacy_target(objective):
    config = conv4_config()
    return create_train_state(
        jax.random.key(5), make_backbone(config, axis_name=None), make_optimizer(config, 10), (8, 8, 1),
        objective=objective, num_examples=6)


def test_a_checkpoint_without_the_objective_state_restores(tmp_path):
    shutil.copytree(LEGACY, tmp_path / "run")
    checkpointer = Checkpointer(str(tmp_path / "run"))
    objective = Relational(num_views=2, hidden_dim=8, augment=AugmentConfig(mean=(0.5,), std=(0.25,)))
    target = legacy_target(objective)
    state = checkpointer.restore_state(1, target)
    backbone, config = checkpointer.restore_backbone(1)
    assert int(state.step) == 1 and config["relational"]["hidden_dim"] == 8
    # The saved state is the one of the time, not the fresh target: its backbone is the
    # separately saved backbone item, Adam has seen one gradient.
    for restored, saved, fresh in zip(jax.tree.leaves(state.params["backbone"]), jax.tree.leaves(backbone["params"]),
                                      jax.tree.leaves(target.params["backbone"])):
        np.testing.assert_array_equal(restored, saved)
        assert not np.array_equal(restored, fresh)
    assert int(state.opt_state[0].count) == 1
    assert state.objective_state == {}  # absent on disk: the target's
    assert jax.tree.structure(state) == jax.tree.structure(target)
    # It resumes: one more step runs on it.
    step = jax.jit(lambda s, b: train_step(
        s, b, backbone=make_backbone(conv4_config(), axis_name=None),
        optimizer=make_optimizer(conv4_config(), 10), objective=objective))
    batch = {"image": np.zeros((4, 8, 8, 1), np.uint8), "label": np.arange(4)}
    assert int(step(jax.tree.map(np.asarray, state), batch)[0].step) == 2


def test_new_fields_absent_on_disk_come_from_the_target(tmp_path):
    """The general rule, on a state with objective_state: saved fields restore, a field
    the checkpoint lacks keeps the target's value."""
    objective = DeepCluster(augment=CropFlip(padding=0), num_clusters=3)
    target = legacy_target(objective)
    checkpointer = Checkpointer(str(tmp_path))
    saved = target.replace(step=np.int32(7), objective_state={**target.objective_state, "epoch": np.int32(4)})
    old_layout = {name: getattr(saved, name) for name in ("step", "params", "batch_stats", "opt_state", "rng")}
    checkpointer.save(7, old_layout, {"w": np.zeros(1)}, {})
    checkpointer.wait()
    restored = checkpointer.restore_state(7, target)
    assert int(restored.step) == 7 and int(restored.objective_state["epoch"]) == -1  # the target's
    checkpointer.save(8, saved, {"w": np.zeros(1)}, {})
    checkpointer.wait()
    restored = checkpointer.restore_state(8, target)
    assert int(restored.step) == 7 and int(restored.objective_state["epoch"]) == 4
