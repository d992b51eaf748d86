"""Relational pretraining: the train state, the pure train step, its pmap, the loop.

`train_step` is a pure function of (state, images) with every option bound by
keyword; `parallel_train_step` is the one place that calls `jax.pmap` (axis 'batch'),
so a move to `shard_map` touches one function. `pretrain` is the loop: data, resume,
checkpoints, metrics, preemption.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from rr_jax import data, online_probe
from rr_jax.augment import AugmentConfig, augment_views, normalize_images
from rr_jax.backbones import create_backbone
from rr_jax.baselines import ProjectionHead, classification_loss, nt_xent_loss
from rr_jax.checkpoint import Checkpointer
from rr_jax.config import validate_config
from rr_jax.features import feature_dim
from rr_jax.monitors import Monitors, with_labelled_batches
from rr_jax.observe import MetricsLog, ProgressBar
from rr_jax.relational import init_relation_head, relational_loss

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    """Everything a pretraining step reads and writes.

    params / batch_stats: {'backbone': ..., 'head': ...}; rng: uint32 key data of the
    run's base key (step keys are derived from it and the step, so a resumed run draws
    exactly the keys an uninterrupted one would). online_probe: the online linear
    probe's params and optimizer state (`rr_jax.online_probe`), None when it is off.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    online_probe: online_probe.OnlineProbeState | None = None


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
    """Static options of the pretraining objective.

    method: 'relational' (see `relational_loss` for the other fields; `head` is 'mlp',
    the relation head, or 'dot', the dot-product ablation), 'simclr' (NT-Xent on two
    views, `temperature`) or 'supervised' (cross-entropy with labels).
    """

    method: str = "relational"
    num_views: int = 32
    aggregation: str = "cat"
    negatives: str = "derangement"
    loss: str = "focal"
    global_negatives: bool = False
    temperature: float = 0.5
    head: str = "mlp"


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate per step; unset config fields take the method's defaults.

    Self-supervised methods: 1e-3, constant (the paper). 'supervised': 0.1, x0.1 at 50%
    and 75% of training ('multistep').
    """
    opt, supervised = config.optimizer, config.method == "supervised"
    base = opt.learning_rate or (0.1 if supervised else 1e-3)
    schedule = opt.schedule or ("multistep" if supervised else "constant")
    if schedule == "cosine":
        return optax.cosine_decay_schedule(base, max(total_steps, 1))
    if schedule == "multistep":
        return optax.piecewise_constant_schedule(
            base, {int(0.5 * total_steps): 0.1, int(0.75 * total_steps): 0.1}
        )
    return optax.constant_schedule(base)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Adam (AdamW when weight_decay > 0) for the self-supervised methods; SGD with
    momentum (and L2 weight decay) for 'supervised'; or `config.optimizer.name`."""
    opt = config.optimizer
    learning_rate = learning_rate_schedule(config, total_steps)
    name = opt.name or ("sgd" if config.method == "supervised" else "adam")
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(opt.weight_decay),
            optax.sgd(learning_rate, momentum=opt.momentum),
        )
    if opt.weight_decay > 0:
        return optax.adamw(learning_rate, weight_decay=opt.weight_decay)
    return optax.adam(learning_rate)


def make_backbone(config: ml_collections.ConfigDict, axis_name: str | None = AXIS) -> nn.Module:
    dtype = jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32
    return create_backbone(config.model.backbone, axis_name=axis_name, dtype=dtype)


def make_augment_config(config: ml_collections.ConfigDict, spec: data.DatasetSpec) -> AugmentConfig:
    """The augmentation of `config.augment`, normalised with the dataset's statistics.

    'supervised' keeps crop and flip only (no colour jitter, no grayscale).
    """
    fields = config.augment.to_dict()
    if config.method == "supervised":
        fields.update(jitter_prob=0.0, grayscale_prob=0.0)
    return AugmentConfig(**fields, mean=spec.mean, std=spec.std)


def objective_options(config: ml_collections.ConfigDict) -> ObjectiveOptions:
    """The static objective options of a config ('simclr': 2 views, 'supervised': 1)."""
    rel = config.relational
    views = {"simclr": 2, "supervised": 1}.get(config.method, rel.num_views)
    return ObjectiveOptions(
        config.method, views, rel.aggregation, rel.negatives, rel.loss, rel.global_negatives,
        config.simclr.temperature, rel.head,
    )


def _head(options: ObjectiveOptions, num_classes: int) -> nn.Module | None:
    """The method's head module on backbone features (None: the relation head)."""
    if options.method == "simclr":
        return ProjectionHead()
    if options.method == "supervised":
        return nn.Dense(num_classes)
    return None


def create_train_state(
    key: jax.Array,
    backbone: nn.Module,
    optimizer: optax.GradientTransformation,
    image_shape: tuple[int, int, int],
    *,
    options: ObjectiveOptions = ObjectiveOptions(),
    hidden_dim: int = 256,
    num_classes: int = 10,
) -> TrainState:
    """Fresh parameters for a backbone taking images [H, W, C] and the method's head."""
    init_key, head_key, run_key = jax.random.split(key, 3)
    dummy = jnp.zeros((2, *image_shape), jnp.float32)
    backbone_vars = backbone.init(init_key, dummy, train=False)
    dim = jax.eval_shape(lambda v: backbone.apply(v, dummy, train=False), backbone_vars).shape[-1]
    head = _head(options, num_classes)
    if head is None:
        head_vars = init_relation_head(
            head_key, dim, aggregation=options.aggregation, hidden_dim=hidden_dim,
            head=options.head,
        )
    else:
        head_vars = {"batch_stats": {}, **head.init(head_key, jnp.zeros((2, dim)))}
    params = {"backbone": backbone_vars["params"], "head": head_vars["params"]}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={"backbone": backbone_vars["batch_stats"], "head": head_vars["batch_stats"]},
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(run_key),
    )


def objective_loss(
    features: jax.Array,
    head_variables: Any,
    key: jax.Array,
    labels: jax.Array,
    *,
    options: ObjectiveOptions,
    num_classes: int,
    axis_name: str | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """The method's loss on backbone features[K, B, D] -> (loss, metrics, head batch_stats)."""
    if options.method == "relational":
        return relational_loss(
            features, head_variables, key,
            aggregation=options.aggregation, negatives=options.negatives, loss=options.loss,
            axis_name=axis_name, global_negatives=options.global_negatives,
        )
    head = _head(options, num_classes)
    outputs = head.apply({"params": head_variables["params"]}, features)
    if options.method == "simclr":
        loss, accuracy = nt_xent_loss(outputs[0], outputs[1], options.temperature)
    else:
        loss, accuracy = classification_loss(outputs[0], labels)
    return loss, {"loss": loss, "accuracy": accuracy}, head_variables["batch_stats"]


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    backbone: nn.Module,
    optimizer: optax.GradientTransformation,
    augment: AugmentConfig,
    options: ObjectiveOptions,
    num_classes: int = 10,
    axis_name: str | None = None,
    probe_optimizer: optax.GradientTransformation | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One pretraining step on {'image': uint8[B, H, W, C], 'label': int[B]}; pure.

    Augments K views on device, runs the backbone once on all K*B views, applies the
    method's objective (relational: every pair scored by the relation head) and takes
    an optimizer step. Under `axis_name`, gradients, metrics and BatchNorm statistics
    are averaged over devices and each device augments with its own key; the negatives'
    key is shared so that `global_negatives` draws one derangement of the whole batch.
    Labels are used by 'supervised' and the online probe only: with `state.online_probe`
    set, `probe_optimizer` takes one step of it on the stop-gradient eval-mode features of
    the batch's unaugmented images (of 'probe_image' / 'probe_label' when the batch
    carries those, labelled images alongside an unlabelled split).
    """
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    augment_key, pair_key = jax.random.split(step_key)
    if axis_name is not None:
        augment_key = jax.random.fold_in(augment_key, jax.lax.axis_index(axis_name))
        if not options.global_negatives:
            pair_key = jax.random.fold_in(pair_key, jax.lax.axis_index(axis_name))
    views = augment_views(augment_key, batch["image"], options.num_views, augment)
    num_views, batch_size = views.shape[:2]

    def loss_fn(params):
        features, updates = backbone.apply(
            {"params": params["backbone"], "batch_stats": state.batch_stats["backbone"]},
            views.reshape(num_views * batch_size, *views.shape[2:]),
            train=True,
            mutable=["batch_stats"],
        )
        loss, metrics, head_stats = objective_loss(
            features.reshape(num_views, batch_size, -1),
            {"params": params["head"], "batch_stats": state.batch_stats["head"]},
            pair_key, batch["label"],
            options=options, num_classes=num_classes, axis_name=axis_name,
        )
        return loss, (metrics, {"backbone": updates["batch_stats"], "head": head_stats})

    grads, (metrics, batch_stats) = jax.grad(loss_fn, has_aux=True)(state.params)
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    if state.online_probe is not None:
        if probe_optimizer is None:
            raise ValueError("The state holds an online probe: pass probe_optimizer (rr_jax.online_probe.make_optimizer).")
        images = normalize_images(batch.get("probe_image", batch["image"]), mean=augment.mean, std=augment.std)
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


def _all_finite(tree: Any) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


class _Preemption:
    """Remembers a SIGTERM (a TPU preemption notice) until the loop can save and stop."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Pretrains (or resumes) the run in `workdir`; returns the final unreplicated state."""
    validate_config(config, workdir)
    spec = data.get_dataset_spec(config.dataset)
    images, labels = data.load_split(spec, config.pretrain_split or spec.pretrain_split, config.data_dir)
    steps_per_epoch = data.steps_per_epoch(len(images), config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    if config.method == "random":  # the lower bound: the probe sees untrained weights
        total_steps = 0
    backbone = make_backbone(config)
    optimizer = make_optimizer(config, total_steps)
    options = objective_options(config)
    state = create_train_state(
        jax.random.key(config.seed), backbone, optimizer, spec.image_shape,
        options=options, hidden_dim=config.relational.hidden_dim, num_classes=spec.num_classes,
    )
    if config.online_probe.every_steps:
        dim = feature_dim(backbone, {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]},
                          spec.image_shape)
        probe_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        state = state.replace(online_probe=online_probe.init(
            probe_key, dim, spec.num_classes, online_probe.make_optimizer(config.online_probe.learning_rate, total_steps)))
    checkpointer = Checkpointer(workdir, config.checkpoint.max_to_keep)
    start = checkpointer.latest_step() or 0
    if start:
        state = jax.tree.map(jnp.asarray, checkpointer.restore_state(start, state))
        logging.info("Resuming from the checkpoint of step %d in %s.", start, workdir)
    _log_run(config, workdir, state, spec, steps_per_epoch, total_steps)

    step_fn = parallel_train_step(
        backbone=backbone, optimizer=optimizer, options=options, num_classes=spec.num_classes,
        augment=make_augment_config(config, spec),
        probe_optimizer=online_probe.make_optimizer(config.online_probe.learning_rate, total_steps),
    )
    layout = dict(global_batch_size=config.batch_size, seed=config.seed, start_step=start,
                  process_index=jax.process_index(), process_count=jax.process_count(),
                  local_device_count=jax.local_device_count())
    batches = data.batches(images, labels, **layout)
    if state.online_probe is not None and np.any(labels < 0):  # e.g. STL-10 'unlabelled'
        train_images, train_labels = data.load_split(spec, spec.train_split, config.data_dir)
        batches = with_labelled_batches(batches, data.batches(train_images, train_labels, **layout))
    batches = data.prefetch_to_devices(batches)
    metrics_log = MetricsLog(workdir, enabled=jax.process_index() == 0)
    monitors = Monitors(config, spec, make_backbone(config, axis_name=None)) if jax.process_index() == 0 else None
    replicated = replicate(state)
    pending, window_start = [], time.perf_counter()

    def save(step):
        host_state = unreplicate(replicated)
        if not _all_finite(host_state.params):
            raise FloatingPointError(f"Parameters are not finite at step {step}; not checkpointed.")
        backbone_vars = {"params": host_state.params["backbone"],
                         "batch_stats": host_state.batch_stats["backbone"]}
        checkpointer.save(step, host_state, backbone_vars, config.to_dict())

    if total_steps == 0 and checkpointer.latest_step() is None:
        save(0)  # method 'random': the untrained weights are the result
    with _Preemption() as preemption, ProgressBar(total_steps, start) as progress:
        for step in range(start + 1, total_steps + 1):
            replicated, metrics = step_fn(replicated, next(batches))
            pending.append(metrics)
            last = step == total_steps
            if step % config.log_every_steps == 0 or last or preemption.requested:
                window = [unreplicate(m) for m in jax.device_get(pending)]
                first_step = step - len(window) + 1
                for offset, m in enumerate(window):
                    if not np.isfinite(m["loss"]):
                        raise FloatingPointError(
                            f"Loss is {m['loss']} at step {first_step + offset}; stopping."
                        )
                elapsed = time.perf_counter() - window_start
                record = {k: float(np.mean([m[k] for m in window])) for k in window[-1]}
                record["images_per_second"] = len(window) * config.batch_size / elapsed
                metrics_log.write(step, record)
                progress.update(step, record)
                pending, window_start = [], time.perf_counter()
            if monitors is not None and monitors.due(step, last):
                host_state = unreplicate(replicated)
                scalars = monitors(step, {"params": host_state.params["backbone"],
                                          "batch_stats": host_state.batch_stats["backbone"]},
                                   host_state.online_probe, last)
                metrics_log.write(step, scalars)
                progress.update(step, scalars)
                logging.info("Step %d: %s.", step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
            if step % config.checkpoint.every_steps == 0 or last or preemption.requested:
                save(step)
            if preemption.requested:
                break
    checkpointer.wait()
    checkpointer.close()
    metrics_log.close()
    return unreplicate(replicated)


def _log_run(config, workdir, state, spec, steps_per_epoch, total_steps) -> None:
    """Writes WORKDIR/config.json and logs what the run is made of."""
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, sort_keys=True)
    num_params = sum(x.size for x in jax.tree.leaves(state.params["backbone"]))
    k = objective_options(config).num_views
    objective = config.method + (
        f" ({k * (k - 1) * config.batch_size} pairs per step)" if config.method == "relational" else ""
    )
    logging.info(
        "%d process(es), %d device(s) (%d local, %s); backbone %s with %d parameters; "
        "%s %s, %d steps/epoch, %d steps; K=%d views of M=%d images; %s.",
        jax.process_count(), jax.device_count(), jax.local_device_count(),
        jax.devices()[0].platform, config.model.backbone, num_params, config.dataset,
        spec.image_shape, steps_per_epoch, total_steps, k, config.batch_size, objective,
    )
