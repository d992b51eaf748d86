"""Pretraining: the loop around the step (rr_jax.step) that reads data, resumes
(rr_jax.resume), checkpoints, logs metrics, runs the monitors and stops cleanly on
preemption.
"""

from __future__ import annotations

import dataclasses
import functools
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rr_jax import batching, datasets, inputs, memory, online_probe, sources
from rr_jax.checkpoint import Checkpointer
from rr_jax.config import validate_config
from rr_jax.errors import Preempted
from rr_jax.features import extract_features, feature_dim
from rr_jax.monitors import Monitors, with_labelled_batches
from rr_jax.objectives import Objective
from rr_jax.observe import MetricsLog, ProgressBar
from rr_jax.optimizer import make_optimizer
from rr_jax.resume import restore_latest
from rr_jax.run_dir import RunDirectory
from rr_jax.step import TrainState, create_train_state, make_backbone, make_objective, parallel_train_step, replicate, unreplicate


def _all_finite(tree: Any) -> bool:
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree.leaves(tree))


class _Preemption:
    """Remembers a SIGTERM (a TPU preemption notice) or a SIGINT (Ctrl-C) until the loop
    can save and stop (`signum`: the first that arrived, None before). After the first,
    SIGINT has its default action again: a second Ctrl-C ends the process at once. A SIGINT
    ignored when the loop starts (a background job, nohup) stays ignored.

    The processes of a multi-host run must stop at the same step (saving is collective,
    and so is the next step), so they stop on `agreed()`, not on their own signal."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None

    def __enter__(self):
        self._previous = {signum: signal.getsignal(signum) for signum in self.SIGNALS}
        for signum in self.SIGNALS:
            if self._previous[signum] != signal.SIG_IGN:
                signal.signal(signum, self._handle)
        return self

    def agreed(self) -> int | None:
        """The signal to stop on: this process's, or with several processes any
        process's (a collective: every process calls it at the same steps)."""
        if jax.process_count() == 1:
            return self.signum
        return int(np.max(multihost_utils.process_allgather(np.int32(self.signum or 0)))) or None

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            logging.warning("Interrupted (Ctrl-C): saving the checkpoint of the step reached and stopping; "
                            "press Ctrl-C again to stop at once without saving.")
        else:
            logging.warning("SIGTERM received: saving a checkpoint and stopping.")

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def pretrain(
    config: ml_collections.ConfigDict, workdir: str, *, allow_config_change: Sequence[str] = ()
) -> TrainState:
    """Pretrains (or resumes) the run in `workdir`; returns the final unreplicated state.

    Raises:
      ConfigError: a config field is not allowed (before anything is created).
      WorkdirBusyError: another live run holds `workdir`.
      ResumeError: the checkpoint's config differs in fields not in RESUMABLE_FIELDS or
        `allow_config_change`.
      Preempted: SIGTERM or SIGINT arrived; the checkpoint of the step reached is saved.
    """
    validate_config(config, workdir)
    with RunDirectory(workdir, primary=jax.process_index() == 0, process_index=jax.process_index()) as run:
        return _pretrain(config, run, allow_config_change)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """What a run trains: the dataset, the split and its size, the step counts and the
    pieces of the step."""

    spec: datasets.DatasetSpec
    split: str
    num_examples: int
    steps_per_epoch: int
    total_steps: int
    objective: Objective
    backbone: Any
    optimizer: Any


def _pretrain(config: ml_collections.ConfigDict, run: RunDirectory, allow_config_change: Sequence[str]) -> TrainState:
    plan = _plan(config)
    checkpointer = Checkpointer(run.workdir, config.checkpoint.max_to_keep)
    state, start = _restore(config, run, plan, checkpointer, allow_config_change)
    labelled_alongside = state.online_probe is not None and not datasets.has_labels(plan.split)
    step_fn = _compiled_step(config, plan, state, labelled_alongside) if start < plan.total_steps else None
    batches = _device_batches(config, plan, start, labelled_alongside)
    return _train_loop(config, run, plan, checkpointer, state, start, step_fn, batches)


def _plan(config: ml_collections.ConfigDict) -> _Plan:
    """The run's data (split sizes checked against the devices) and step, before any state."""
    spec = inputs.dataset_spec(config)
    if spec.holdout is not None:
        logging.info("%s has no test split: the probe's test split is %s; pretraining never sees those images.",
                     spec.image_folder, spec.holdout.describe())
    split = config.pretrain_split or spec.pretrain_split
    num_examples = inputs.check_splits(config, spec, device_count=jax.device_count())[split]
    steps_per_epoch = batching.steps_per_epoch(num_examples, config.batch_size)
    total_steps = config.num_epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    objective = make_objective(config, spec, total_steps)
    if not objective.trains:  # random weights, the lower bound: the probe sees the initial weights
        total_steps = 0
    return _Plan(spec, split, num_examples, steps_per_epoch, total_steps, objective,
                 make_backbone(config), make_optimizer(config, total_steps))


def _restore(config: ml_collections.ConfigDict, run: RunDirectory, plan: _Plan, checkpointer: Checkpointer,
             allow_config_change: Sequence[str]) -> tuple[TrainState, int]:
    """The state to start from (fresh, or the latest checkpoint's) and its step; the
    workdir's metrics and config made to agree with it."""
    state = _initial_state(config, plan.spec, plan.objective, plan.backbone, plan.optimizer, plan.total_steps,
                           plan.num_examples)
    state, start = restore_latest(checkpointer, state, config, allow_config_change, run.primary,
                                  objective=plan.objective, num_examples=plan.num_examples)
    if start:
        logging.info("Resuming from the checkpoint of step %d in %s.", start, run.workdir)
    if dropped := run.trim_metrics(start):
        logging.info("Dropped %d metrics.jsonl records logged after step %d.", dropped, start)
    run.write_config(config.to_dict())
    _log_run(config, state, plan.spec, plan.steps_per_epoch, plan.total_steps, plan.objective)
    return state, start


def _compiled_step(config: ml_collections.ConfigDict, plan: _Plan, state: TrainState,
                   labelled_alongside: bool) -> Callable:
    """The pmapped step, compiled ahead of time and checked against the devices' memory."""
    pmapped = parallel_train_step(
        backbone=plan.backbone, optimizer=plan.optimizer, objective=plan.objective,
        probe_optimizer=online_probe.make_optimizer(config.online_probe.learning_rate, plan.total_steps),
    )
    return memory.compile_checked(
        functools.partial(_lower_step, config, plan.spec, state=state, total_steps=plan.total_steps, step=pmapped,
                          num_examples=plan.num_examples, labelled_alongside=labelled_alongside),
        _searched_sizes(config), devices=jax.local_devices(),
        # A single process runs the executable the check compiled (calling the pmapped step
        # would compile it a second time: AOT compiles do not fill pmap's call cache). pmap's
        # executables take no host-local arrays in multi-process runs: there the run calls
        # the pmapped step, which compiles it again.
        run=pmapped if jax.process_count() > 1 else None,
    )


def _device_batches(config: ml_collections.ConfigDict, plan: _Plan, start: int,
                    labelled_alongside: bool) -> Iterator:
    """This process's batches from step `start` + 1 on, prefetched to its devices."""
    layout = dict(start_step=start, process_index=jax.process_index(), process_count=jax.process_count(),
                  local_device_count=jax.local_device_count())
    batches = inputs.pretrain_batches(config, plan.spec, **layout)
    if labelled_alongside:  # e.g. STL-10 'unlabelled'
        batches = with_labelled_batches(batches,
                                        inputs.pretrain_batches(config, plan.spec, split=plan.spec.train_split, **layout))
    return batching.prefetch_to_devices(batches)


def _train_loop(config: ml_collections.ConfigDict, run: RunDirectory, plan: _Plan, checkpointer: Checkpointer,
                state: TrainState, start: int, step_fn: Callable | None, batches: Iterator) -> TrainState:
    """Steps `start` + 1 to the last: metrics, monitors and checkpoints on their schedules,
    the epoch hook, and a checkpointed stop on preemption (raising Preempted)."""
    epoch_hook = _epoch_hook(config, plan.spec, plan.objective) if plan.objective.has_epoch_hook else None
    monitors = Monitors(config, plan.spec, make_backbone(config, axis_name=None)) if run.primary else None
    replicated = replicate(state)
    pending, window_start = [], time.perf_counter()

    def save(step):
        host_state = unreplicate(replicated)
        if not _all_finite(host_state.params):
            raise FloatingPointError(f"Parameters are not finite at step {step}; not checkpointed.")
        backbone_vars = {"params": host_state.params["backbone"],
                         "batch_stats": host_state.batch_stats["backbone"]}
        checkpointer.save(step, host_state, backbone_vars, config.to_dict())

    total_steps, steps_per_epoch = plan.total_steps, plan.steps_per_epoch
    if total_steps == 0 and checkpointer.latest_step() is None:
        save(0)  # method 'random': the untrained weights are the result
    metrics_log = MetricsLog(run.workdir, enabled=run.primary)
    # Where the processes of a multi-host run agree on stopping: at the logged steps, where
    # the host waits for the devices anyway; a single process checks every step.
    agree_every = 1 if jax.process_count() == 1 else config.log_every_steps
    step, stop = start, None
    try:
        with _Preemption() as preemption, ProgressBar(total_steps, start) as progress:
            for step in range(start + 1, total_steps + 1):
                if epoch_hook is not None and (step == start + 1 or (step - 1) % steps_per_epoch == 0):
                    replicated = replicate(epoch_hook((step - 1) // steps_per_epoch, unreplicate(replicated)))
                replicated, metrics = step_fn(replicated, next(batches))
                pending.append(metrics)
                last = step == total_steps
                if step % agree_every == 0:
                    stop = preemption.agreed()
                if step % config.log_every_steps == 0 or last or stop:
                    record = _window_record(pending, step, config.batch_size, window_start)
                    metrics_log.write(step, record)
                    progress.update(step, record)
                    pending, window_start = [], time.perf_counter()
                if monitors is not None and monitors.due(step, last):
                    scalars = _monitor(monitors, step, unreplicate(replicated), last)
                    metrics_log.write(step, scalars)
                    progress.update(step, scalars)
                if step % config.checkpoint.every_steps == 0 or last or stop:
                    save(step)
                if stop:
                    break
        checkpointer.wait()
    finally:
        checkpointer.close()
        metrics_log.close()
    if stop:
        raise Preempted(step, total_steps, run.workdir, stop)
    return unreplicate(replicated)


def _window_record(pending: list[dict[str, jax.Array]], step: int, batch_size: int,
                   window_start: float) -> dict[str, float]:
    """The mean of the replicated metrics of the steps up to `step`, and images per second
    since `window_start` (a perf_counter time) once they are done; FloatingPointError
    naming the first step whose loss is not finite."""
    window = [unreplicate(m) for m in jax.device_get(pending)]
    first_step = step - len(window) + 1
    for offset, m in enumerate(window):
        if not np.isfinite(m["loss"]):
            raise FloatingPointError(f"Loss is {m['loss']} at step {first_step + offset}; stopping.")
    record = {k: float(np.mean([m[k] for m in window])) for k in window[-1]}
    record["images_per_second"] = len(window) * batch_size / (time.perf_counter() - window_start)
    return record


def _monitor(monitors: Monitors, step: int, state: TrainState, last: bool) -> dict[str, float]:
    """The monitors' scalars (kNN, RankMe, online probe) of the unreplicated `state`, logged."""
    scalars = monitors(step, {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]},
                       state.online_probe, last)
    logging.info("Step %d: %s.", step, ", ".join(f"{k} {v:.4f}" for k, v in scalars.items()))
    return scalars


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
    spec: datasets.DatasetSpec,
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
        config.update_from_flattened_dict(overrides)
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
    config: ml_collections.ConfigDict, spec: datasets.DatasetSpec, objective: Objective
) -> Callable[[int, TrainState], TrainState]:
    """`objective.start_epoch` with the eval-mode features of the pretraining split (held
    in memory: such objectives cluster the whole split every epoch)."""
    backbone = make_backbone(config, axis_name=None)
    images, _ = sources.load_split(spec, config.pretrain_split or spec.pretrain_split, config.data_dir)

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
