"""Pretraining: the train state, the pure train step, its pmap, the loop.

`train_step` is a pure function of (state, images) with every option bound by
keyword; `parallel_train_step` is the one place that calls `jax.pmap` (axis 'batch'),
so a move to `shard_map` touches one function. `pretrain` is the loop: data, resume,
checkpoints, metrics, preemption.
"""

from __future__ import annotations

import functools
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from rr_jax import data, inputs, memory, online_probe
from rr_jax.augment import normalize_images
from rr_jax.backbones import create_backbone
from rr_jax.checkpoint import Checkpointer
from rr_jax.config import validate_config
from rr_jax.errors import Preempted, ResumeError
from rr_jax.features import extract_features, feature_dim
from rr_jax.monitors import Monitors, with_labelled_batches
from rr_jax.objectives import Objective, get_objective
from rr_jax.observe import MetricsLog, ProgressBar
from rr_jax.run_dir import HEAD_FIELDS, WEIGHT_FIELDS, RunDirectory, check_resumable

AXIS = "batch"


@flax.struct.dataclass
class TrainState:
    """Everything a pretraining step reads and writes.

    params / batch_stats: {'backbone': ..., 'head': ...}; rng: uint32 key data of the
    run's base key (step keys are derived from it and the step, so a resumed run draws
    exactly the keys an uninterrupted one would); objective_state: what the objective
    carries between steps ({} for most; DeepCluster's clusters); online_probe: the online
    linear probe's params and optimizer state (`rr_jax.online_probe`), None when it is off.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array
    objective_state: Any
    online_probe: online_probe.OnlineProbeState | None = None


def make_objective(config: ml_collections.ConfigDict, spec: data.DatasetSpec) -> Objective:
    """The objective of `config.method` with its options from the config."""
    return get_objective(config.method).from_config(config, spec)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate per step; unset config fields take the method's defaults
    (`Objective.optimizer`: Adam 1e-3 constant for most, the paper; 'supervised':
    0.1, x0.1 at 50% and 75% of training ('multistep'); 'deepinfomax': 1e-4)."""
    opt, defaults = config.optimizer, get_objective(config.method).optimizer
    base = opt.learning_rate or defaults.learning_rate
    schedule = opt.schedule or defaults.schedule
    if schedule == "cosine":
        return optax.cosine_decay_schedule(base, max(total_steps, 1))
    if schedule == "multistep":
        return optax.piecewise_constant_schedule(
            base, {int(0.5 * total_steps): 0.1, int(0.75 * total_steps): 0.1}
        )
    return optax.constant_schedule(base)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """`config.optimizer.name` or the method's default: Adam (AdamW when weight_decay >
    0), or SGD with momentum (and L2 weight decay)."""
    opt = config.optimizer
    learning_rate = learning_rate_schedule(config, total_steps)
    name = opt.name or get_objective(config.method).optimizer.name
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
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats={"backbone": backbone_vars["batch_stats"], "head": head_vars["batch_stats"]},
        opt_state=optimizer.init(params),
        rng=jax.random.key_data(run_key),
        objective_state=objective.init_state(num_examples, num_classes),
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

    The objective makes K views of each image on device; the backbone runs once on all
    K*B views; the objective's loss scores them; an optimizer step follows. Under
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
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
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


def _restore(
    checkpointer: Checkpointer,
    fresh: TrainState,
    config: ml_collections.ConfigDict,
    allow_config_change: Sequence[str],
    primary: bool,
) -> tuple[TrainState, int]:
    """The newest checkpoint of the workdir that restores, as (state, its step).

    A step whose config differs from `config` in fields that change what is trained is
    refused (ResumeError). A step that fails to restore (damaged after it was written) is
    moved aside with a warning and the previous one is tried. Step 0 without a train
    state holds imported weights (rr_jax.convert): pretraining continues from them.
    None restores: (fresh, 0).
    """
    current = config.to_dict()
    for step in reversed(checkpointer.all_steps()):
        try:
            saved = checkpointer.restore_config(step)
            if checkpointer.has_item(step, "state"):
                check_resumable(saved, current, step=step, allow=allow_config_change)
                return jax.tree.map(jnp.asarray, checkpointer.restore_state(step, fresh)), step
            if step == 0:
                return _from_imported_weights(checkpointer, fresh, saved, current, allow_config_change), 0
            raise KeyError(f"step {step} has no train state")
        except ResumeError:
            raise
        except Exception as error:  # any damage: fall back to an older step
            where = checkpointer.set_aside(step) if primary else "place"
            logging.warning(
                "The checkpoint of step %d cannot be restored (%s: %s); it is left in %s for "
                "inspection and the previous checkpoint is tried.",
                step, type(error).__name__, str(error).splitlines()[0][:300], where,
            )
    return fresh, 0


def _from_imported_weights(checkpointer, fresh, saved, current, allow_config_change) -> TrainState:
    """`fresh` with the backbone (and, when shapes agree, the relation head) of the
    imported weights of step 0; the optimizer state starts afresh."""
    head = checkpointer.restore_head(0)
    if head is not None and jax.tree.structure(head["params"]) != jax.tree.structure(fresh.params["head"]):
        head = None  # an imported relation head, and this method trains another head
    fields = WEIGHT_FIELDS + (HEAD_FIELDS if head is not None else ())
    check_resumable(saved, current, step=0, only=fields, allow=allow_config_change)
    backbone, _ = checkpointer.restore_backbone(0)
    params, batch_stats = dict(fresh.params), dict(fresh.batch_stats)
    params["backbone"], batch_stats["backbone"] = backbone["params"], backbone["batch_stats"]
    if head is not None:
        params["head"], batch_stats["head"] = head["params"], head["batch_stats"]
    logging.info("Continuing pretraining from the imported weights of step 0 (backbone%s).",
                 " and relation head" if head is not None else "")
    imported = fresh.replace(params=params, batch_stats=batch_stats)
    chex.assert_trees_all_equal_shapes_and_dtypes(imported.params, fresh.params)
    return jax.tree.map(jnp.asarray, imported)


def pretrain(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: Sequence[str] = ()
) -> TrainState:
    """Pretrains (or resumes) the run in `workdir`; returns the final unreplicated state.

    Raises:
      ConfigError: a config field is not allowed (before anything is created).
      WorkdirBusyError: another live run holds `workdir`.
      ResumeError: the checkpoint's config differs in fields not in RESUMABLE_FIELDS or
        `allow_config_change`.
      Preempted: SIGTERM arrived; the checkpoint of the step reached is saved.
    """
    validate_config(config, workdir)
    with RunDirectory(workdir, primary=jax.process_index() == 0, process_index=jax.process_index()) as run:
        return _pretrain(config, run, allow_config_change)


def _pretrain(config: ml_collections.ConfigDict, run: RunDirectory, allow_config_change: Sequence[str]) -> TrainState:
    workdir = run.workdir
    spec = inputs.dataset_spec(config)
    if spec.holdout is not None:
        logging.info("%s has no test split: the probe's test split is %s; pretraining never sees those images.",
                     spec.image_folder, spec.holdout.describe())
    split = config.pretrain_split or spec.pretrain_split
    num_examples = inputs.check_splits(config, spec, device_count=jax.device_count())[split]
    steps_per_epoch = data.steps_per_epoch(num_examples, config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)

    objective = make_objective(config, spec)
    if not objective.trains:  # random weights, the lower bound: the probe sees the initial weights
        total_steps = 0
    backbone = make_backbone(config)
    optimizer = make_optimizer(config, total_steps)
    state = _initial_state(config, spec, objective, backbone, optimizer, total_steps, num_examples)
    checkpointer = Checkpointer(workdir, config.checkpoint.max_to_keep)
    state, start = _restore(checkpointer, state, config, allow_config_change, run.primary)
    if start:
        logging.info("Resuming from the checkpoint of step %d in %s.", start, workdir)
    if dropped := run.trim_metrics(start):
        logging.info("Dropped %d metrics.jsonl records logged after step %d.", dropped, start)
    run.write_config(config.to_dict())
    _log_run(config, state, spec, steps_per_epoch, total_steps, objective)

    labelled_alongside = state.online_probe is not None and not data.has_labels(split)
    step_fn = None
    if start < total_steps:  # compiled ahead of time, checked against the devices' memory, then run
        pmapped = parallel_train_step(
            backbone=backbone, optimizer=optimizer, objective=objective,
            probe_optimizer=online_probe.make_optimizer(config.online_probe.learning_rate, total_steps),
        )
        step_fn = memory.compile_checked(
            functools.partial(_lower_step, config, spec, state=state, total_steps=total_steps, step=pmapped,
                              num_examples=num_examples, labelled_alongside=labelled_alongside),
            _searched_sizes(config), devices=jax.local_devices(),
            # pmap's executables take no host-local arrays in multi-process runs: there
            # the run calls the pmapped step (JAX's compilation cache holds the compile).
            run=pmapped if jax.process_count() > 1 else None,
        )
    epoch_hook = _epoch_hook(config, spec, objective) if objective.has_epoch_hook else None
    layout = dict(start_step=start, process_index=jax.process_index(), process_count=jax.process_count(),
                  local_device_count=jax.local_device_count())
    batches = inputs.pretrain_batches(config, spec, **layout)
    if labelled_alongside:  # e.g. STL-10 'unlabelled'
        batches = with_labelled_batches(batches, inputs.pretrain_batches(config, spec, split=spec.train_split, **layout))
    batches = data.prefetch_to_devices(batches)
    monitors = Monitors(config, spec, make_backbone(config, axis_name=None)) if run.primary else None
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
    metrics_log = MetricsLog(workdir, enabled=run.primary)
    step = start
    try:
        with _Preemption() as preemption, ProgressBar(total_steps, start) as progress:
            for step in range(start + 1, total_steps + 1):
                if epoch_hook is not None and (step == start + 1 or (step - 1) % steps_per_epoch == 0):
                    replicated = replicate(epoch_hook((step - 1) // steps_per_epoch, unreplicate(replicated)))
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
    finally:
        checkpointer.close()
        metrics_log.close()
    if preemption.requested:
        raise Preempted(step, total_steps, workdir)
    return unreplicate(replicated)


def _initial_state(config, spec, objective, backbone, optimizer, total_steps, num_examples) -> TrainState:
    """The fresh train state of a run, with its online probe where configured."""
    state = create_train_state(
        jax.random.key(config.seed), backbone, optimizer, spec.image_shape,
        objective=objective, num_classes=spec.num_classes, num_examples=num_examples,
    )
    if config.online_probe.every_steps:
        dim = feature_dim(backbone, {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]},
                          spec.image_shape)
        probe_key = jax.random.fold_in(jax.random.key(config.seed), 1)
        state = state.replace(online_probe=online_probe.init(
            probe_key, dim, spec.num_classes, online_probe.make_optimizer(config.online_probe.learning_rate, total_steps)))
    return state


def _lower_step(
    config: ml_collections.ConfigDict,
    spec: data.DatasetSpec,
    overrides: dict[str, int],
    *,
    state: TrainState,
    total_steps: int,
    num_examples: int,
    labelled_alongside: bool,
    step: Callable | None = None,
) -> jax.stages.Lowered:
    """`parallel_train_step` of `config` with `overrides` ({key: value}, e.g.
    {'relational.num_views': 8}) lowered for its replicated state and a batch of
    `inputs.pretrain_batch_shapes`. `state`: the run's own state, whose shapes the step
    without overrides takes (with overrides, those of a fresh one); `step`: the run's
    pmapped step, lowered without overrides (default: a new one).

    Single-process runs lower abstract shapes and allocate nothing. pmap lowers only
    host-local arrays in multi-process runs (it makes them global): there the step is
    lowered for zeros of those shapes."""
    if overrides:
        config = config.copy_and_resolve_references()
        for key, value in overrides.items():
            *parents, last = key.split(".")
            target = config
            for part in parents:
                target = target[part]
            target[last] = value
    objective, backbone, optimizer = make_objective(config, spec), make_backbone(config), make_optimizer(config, total_steps)
    if overrides:
        state = jax.eval_shape(lambda: _initial_state(config, spec, objective, backbone, optimizer, total_steps,
                                                      num_examples))
    devices = jax.local_device_count()
    replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct((devices, *np.shape(x)), x.dtype), state)
    batch = inputs.pretrain_batch_shapes(config, spec, process_count=jax.process_count(), local_device_count=devices,
                                         labelled_alongside=labelled_alongside)
    if jax.process_count() > 1:
        replicated, batch = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), (replicated, batch))
    if step is None or overrides:
        step = parallel_train_step(
            backbone=backbone, optimizer=optimizer, objective=objective,
            probe_optimizer=online_probe.make_optimizer(config.online_probe.learning_rate, total_steps),
        )
    return step.lower(replicated, batch)


def _searched_sizes(config: ml_collections.ConfigDict) -> list[memory.Size]:
    """What the memory advice searches: K (for methods with `<method>.num_views`) and M."""
    devices = jax.device_count()
    sizes = []
    method_fields = config.get(config.method)
    if method_fields is not None and "num_views" in method_fields:
        sizes.append(memory.Size("K", f"{config.method}.num_views", method_fields.num_views, minimum=2, degree=2))
    sizes.append(memory.Size("M", "batch_size", config.batch_size, minimum=2 * devices, step=devices))
    return sizes


def _epoch_hook(
    config: ml_collections.ConfigDict, spec: data.DatasetSpec, objective: Objective
) -> Callable[[int, TrainState], TrainState]:
    """`objective.start_epoch` with the eval-mode features of the pretraining split (held
    in memory: such objectives cluster the whole split every epoch)."""
    backbone = make_backbone(config, axis_name=None)
    images, _ = data.load_split(spec, config.pretrain_split or spec.pretrain_split, config.data_dir)

    def features(state: TrainState) -> np.ndarray:
        variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
        return extract_features(backbone, variables, images, mean=spec.mean, std=spec.std)

    return lambda epoch, state: objective.start_epoch(epoch, state, features)


def _log_run(config, state, spec, steps_per_epoch, total_steps, objective) -> None:
    """Logs what the run is made of."""
    num_params = sum(x.size for x in jax.tree.leaves(state.params["backbone"]))
    logging.info(
        "%d process(es), %d device(s) (%d local, %s); backbone %s with %d parameters; "
        "%s %s, %d steps/epoch, %d steps; M=%d images per step; %s.",
        jax.process_count(), jax.device_count(), jax.local_device_count(),
        jax.devices()[0].platform, config.model.backbone, num_params, config.dataset,
        spec.image_shape, steps_per_epoch, total_steps, config.batch_size, objective.describe(),
    )
