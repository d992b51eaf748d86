"""The pretraining step: the train state, the pure `train_step`, its pmap, replication.

`train_step` is a pure function of (state, images) with every option bound by
keyword; `parallel_train_step` is the one place that calls `jax.pmap` (axis 'batch'),
so a move to `shard_map` touches one function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from rr_jax import datasets, online_probe
from rr_jax.augment import normalize_images
from rr_jax.backbones import create_backbone
from rr_jax.objectives import Objective, get_objective

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    """Everything a pretraining step reads and writes.

    params / batch_stats: {'backbone': ..., 'head': ...}; rng: uint32 key data of the
    run's base key (step keys are derived from it and the step, so a resumed run draws
    exactly the keys an uninterrupted one would); objective_state: what the objective
    carries between steps ({} for most; DeepCluster's clusters; a momentum teacher's
    parameters and BatchNorm statistics); online_probe: the online
    linear probe's params and optimizer state (`rr_jax.online_probe`), None when it is off.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    objective_state: Any
    online_probe: online_probe.OnlineProbeState | None = None


def make_objective(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec, total_steps: int = 0) -> Objective:
    """The objective of `config.method` with its options from the config, for a run of
    `total_steps` steps (schedules over the run, e.g. a teacher's momentum)."""
    return get_objective(config.method).from_config(config, spec).for_run(total_steps)


def make_backbone(config: ml_collections.ConfigDict, axis_name: str | None = AXIS) -> nn.Module:
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    return create_backbone(config.model.backbone, axis_name=axis_name, dtype=dtype)


def create_train_state(
    key: jax.Array,
    backbone: nn.Module,
    optimizer: optax.GradientTransformation,
    image_shape: tuple[int, int, int],
    *,
    objective: Objective,
    num_classes: int = 10,
    num_examples: int = 0,
) -> TrainState:
    """Fresh parameters for a backbone taking images [H, W, C] and the objective's head,
    and the objective's state for a pretraining split of `num_examples` images."""
    init_key, head_key, run_key = jax.random.split(key, 3)
    dummy = jnp.zeros((2, *image_shape), jnp.float32)
    backbone_vars = backbone.init(init_key, dummy, train=False)
    capture = objective.capture() or False
    features, intermediates = jax.eval_shape(
        lambda v: backbone.apply(v, dummy, train=False, capture_intermediates=capture, mutable=["intermediates"]),
        backbone_vars,
    )
    head_vars = objective.init_head(head_key, features, intermediates.get("intermediates", {}), num_classes)
    params = {"backbone": backbone_vars["params"], "head": head_vars["params"]}
    batch_stats = {"backbone": backbone_vars["batch_stats"], "head": head_vars["batch_stats"]}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(run_key),
        objective_state=objective.init_state(num_examples, {"params": params, "batch_stats": batch_stats}),
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    backbone: nn.Module,
    optimizer: optax.GradientTransformation,
    objective: Objective,
    axis_name: str | None = None,
    probe_optimizer: optax.GradientTransformation | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One pretraining step on {'image': uint8[B, H, W, C], 'label': int[B]}; pure.

    The objective makes K views of each image on device; its `teacher` may run networks
    no gradient reaches (a momentum teacher); the backbone runs once on all K*B views;
    the objective's loss scores them; an optimizer step follows, then the objective's
    `update_state` (the teacher's moving average). Under
    `axis_name`, gradients and BatchNorm statistics are averaged over devices and each
    device augments with its own key; the loss's key is shared when the objective asks
    for it (e.g. one derangement of the whole batch). Metrics are device means, except
    counts (names starting with 'num_', e.g. 'num_pairs'), which are totals over devices.
    With `state.online_probe` set, `probe_optimizer` takes one step of the online probe on
    the stop-gradient eval-mode features of the batch's unaugmented images (of
    'probe_image' / 'probe_label' when the batch carries those: labelled images
    alongside an unlabelled split).
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    augment_key, loss_key = jax.random.split(step_key)
    if axis_name is not None:
        augment_key = jax.random.fold_in(augment_key, jax.lax.axis_index(axis_name))
        if not objective.shared_loss_key:
            loss_key = jax.random.fold_in(loss_key, jax.lax.axis_index(axis_name))
    views, targets = objective.inputs(augment_key, batch, state.objective_state)
    num_views, batch_size = views.shape[:2]

    def apply_backbone(variables, images):  # the backbone in training mode with other variables
        features, updates = backbone.apply(variables, images.reshape(-1, *images.shape[2:]), train=True,
                                           mutable=["batch_stats"])
        return features.reshape(*images.shape[:2], -1), updates["batch_stats"]

    targets, aux = objective.teacher(views, targets, state.objective_state, apply_backbone=apply_backbone,
                                     axis_name=axis_name)

    def loss_fn(params):
        features, updates = backbone.apply(
            {"params": params["backbone"], "batch_stats": state.batch_stats["backbone"]},
            views.reshape(num_views * batch_size, *views.shape[2:]),
            train=True,
            mutable=["batch_stats"],
            capture_intermediates=objective.capture() or False,
        )
        loss, metrics, head_stats = objective.loss(
            features.reshape(num_views, batch_size, -1),
            {"params": params["head"], "batch_stats": state.batch_stats["head"]},
            loss_key, targets,
            intermediates=updates.get("intermediates", {}), objective_state=state.objective_state,
            axis_name=axis_name,
        )
        return loss, (metrics, {"backbone": updates["batch_stats"], "head": head_stats})

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads = jax.lax.pmean(grads, axis_name)
        # Counts ('num_pairs') add up over devices; rates and losses are averaged.
        metrics = {k: (jax.lax.psum if k.startswith("num_") else jax.lax.pmean)(v, axis_name)
                   for k, v in metrics.items()}
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        objective_state=objective.update_state(state.objective_state, aux, params, state.step),
    )
    if state.online_probe is not None:
        if probe_optimizer is None:
            raise ValueError("The state holds an online probe: pass probe_optimizer (rr_jax.online_probe.make_optimizer).")
        images = normalize_images(batch.get("probe_image", batch["image"]),
                                  mean=objective.augment.mean, std=objective.augment.std)
        probe_features = backbone.apply(
            {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}, images, train=False
        )
        probe_state, probe_metrics = online_probe.update(
            state.online_probe, jax.lax.stop_gradient(probe_features), batch.get("probe_label", batch["label"]),
            optimizer=probe_optimizer, axis_name=axis_name,
        )
        new_state, metrics = new_state.replace(online_probe=probe_state), {**metrics, **probe_metrics}
    return new_state, metrics


def parallel_train_step(*, donate: bool = True, **options) -> Callable:
    """`train_step` with `options` bound, pmapped over all devices (axis 'batch').

    Takes and returns a replicated state; batch leaves are [local devices, B, ...].
    `donate`: reuse the input state's buffers for the output (off to call twice on the
    same state, as benchmarks do).
    """
    step = functools.partial(train_step, axis_name=AXIS, **options)
    return jax.pmap(step, axis_name=AXIS, donate_argnums=(0,) if donate else ())


def replicate(tree: Any) -> Any:
    """One copy of every leaf on each local device (new leading axis), placed as the
    pmapped step places its outputs, so that feeding them back does not recompile."""
    devices = jax.local_devices()
    sharding = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(devices), (AXIS,)), jax.sharding.PartitionSpec(AXIS)
    )
    return jax.tree.map(
        lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (len(devices), *np.shape(x))), sharding),
        tree,
    )


def unreplicate(tree: Any) -> Any:
    """Device 0's copy of a replicated tree."""
    return jax.tree.map(lambda x: x[0], tree)
