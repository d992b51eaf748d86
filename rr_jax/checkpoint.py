"""Orbax checkpoints of a pretraining run; the only module that imports orbax.

Layout: WORKDIR/checkpoints/<step>/{state, backbone, config} for pretraining runs.
`state` is the full train state (for resuming), `backbone` the backbone variables
{'params', 'batch_stats'} on their own (for the linear probe and exports), `config` the
resolved config as JSON. Imported weights (rr_jax.convert) have no train state: their
steps hold `backbone`, `config` and, when known, `head` (the relation head's variables).
Arrays are saved as host NumPy copies of one replica: never replicated, and restorable
in a process with any number of devices (they come back as NumPy and the caller places
them). Orbax writes each step into a temporary directory and renames it when complete,
so a step cut short by a kill is never listed. Step 0 is never rotated away: it holds
imported weights (or method 'random''s untrained ones), which no later step replaces.
A step damaged after it was written can be moved aside (`set_aside`) for inspection.
A write that fails for a reason of the operating system (disk full, permissions, quota)
raises `CheckpointWriteError` naming the step and the error, once, after the failed
step's temporary directory is removed; writes are asynchronous, so the failure of a step
surfaces at the next `save`, `wait` or `close`.
When a restore fails part-way, Orbax's outstanding reads finish after its event loop has
closed; each then reports a harmless "Event loop is closed" to `sys.unraisablehook`,
which would print a traceback per read. A Checkpointer (and `restore_probe`) installs a
hook that drops exactly those (`_drop_reads_of_failed_restores`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from rr_jax.errors import CheckpointNotFoundError, CheckpointWriteError, os_error

ITEMS = ("state", "backbone", "head", "config")
DAMAGED_DIR = "checkpoints_damaged"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _to_host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _is_read_of_failed_restore(unraisable: Any) -> bool:
    """Whether `unraisable` is a read finishing after a failed restore closed its event loop."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    frames, traceback = [], unraisable.exc_traceback
    while traceback is not None:
        frames.append(traceback.tb_frame.f_code.co_name)
        traceback = traceback.tb_next
    return "call_soon_threadsafe" in frames


def _drop_reads_of_failed_restores() -> None:
    """Wraps `sys.unraisablehook` (once) to drop what `_is_read_of_failed_restore`
    matches; everything else goes to the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_reads_of_failed_restores", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_read_of_failed_restore(unraisable):
            previous(unraisable)

    hook.drops_reads_of_failed_restores = True
    sys.unraisablehook = hook


class Checkpointer:
    """Saves and restores the checkpoints of one workdir.

    Args:
      workdir: the run's directory; checkpoints go to WORKDIR/checkpoints.
      max_to_keep: how many of the newest steps to keep (None: all).
    """

    def __init__(self, workdir: str, max_to_keep: int | None = None):
        _drop_reads_of_failed_restores()
        self._workdir = os.path.abspath(workdir)
        policy = None  # keep every step
        if max_to_keep is not None:
            policy = checkpoint_managers.AnyPreservationPolicy(
                [checkpoint_managers.LatestN(max_to_keep), checkpoint_managers.CustomSteps([0])]
            )
        self._writing = None  # the step whose asynchronous write may still be running
        self._failed = False
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, create=True)
        handlers = {item: ocp.StandardCheckpointHandler() for item in ITEMS if item != "config"}
        self._manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options,
            item_handlers={**handlers, "config": ocp.JsonCheckpointHandler()},
        )

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def has_item(self, step: int, item: str) -> bool:
        """Whether step `step` was written with item `item` (e.g. 'state')."""
        return os.path.isdir(os.path.join(self._manager.directory, str(step), item))

    def restore_config(self, step: int) -> dict:
        """The config dict saved with `step`."""
        restored = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"])

    def set_aside(self, step: int) -> str:
        """Moves the (damaged) directory of `step` to WORKDIR/checkpoints_damaged/<step>,
        kept for inspection, so that it is neither resumed nor overwritten; returns the
        new path."""
        target = os.path.join(self._workdir, DAMAGED_DIR, str(step))
        if os.path.exists(target):
            target += f".{len(os.listdir(os.path.dirname(target)))}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(self._manager.directory, str(step)), target)
        self._manager.reload()
        return target

    def save(self, step: int, state: Any, backbone: Any, config: dict) -> None:
        """Writes step `step` (one replica's host copy of `state` and `backbone`)."""
        self._write(step, ocp.args.Composite(
            state=ocp.args.StandardSave(_to_host(state)),
            backbone=ocp.args.StandardSave(_to_host(backbone)),
            config=ocp.args.JsonSave(config),
        ))

    def save_weights(
        self, step: int, backbone: Any, config: dict, head: Any | None = None
    ) -> None:
        """Writes step `step` without a train state: backbone variables, config and the
        relation head's variables {'params', 'batch_stats'} when given (imported weights)."""
        items = {
            "backbone": ocp.args.StandardSave(_to_host(backbone)),
            "config": ocp.args.JsonSave(config),
        }
        if head is not None:
            items["head"] = ocp.args.StandardSave(_to_host(head))
        self._write(step, ocp.args.Composite(**items))

    def _write(self, step: int, args: ocp.args.Composite) -> None:
        self.wait()  # the previous step's write, finished or failed
        with self._write_errors(step):
            self._manager.save(step, args=args, force=True)
        self._writing = step

    @contextlib.contextmanager
    def _write_errors(self, step: int | None) -> Iterator[None]:
        """Turns a failed write of `step` with an operating system's error into one
        CheckpointWriteError, after removing the temporary directories of unfinished steps
        (this process holds the workdir: no other writes there)."""
        try:
            yield
        except Exception as error:
            reason = os_error(error)
            if reason is None or step is None:
                raise
            self._failed = True
            for name in os.listdir(self._manager.directory):
                path = os.path.join(self._manager.directory, name)
                if ocp.utils.is_tmp_checkpoint(path):
                    shutil.rmtree(path, ignore_errors=True)
            self._manager.reload()
            raise CheckpointWriteError(str(self._manager.directory), step, reason, self.latest_step()) from error

    def restore_state(self, step: int, target: Any) -> Any:
        """The train state of `step`, as NumPy arrays shaped like `target`.

        `target` is a dataclass (a flax.struct TrainState) or a dict. Its top-level fields
        that the checkpoint lacks (fields added after the checkpoint was written) keep
        their values from `target`, so older checkpoints restore into newer states.
        """
        target = _to_host(target)
        fields = _fields(target)
        saved = self._manager.item_metadata(step)["state"]
        present = {name: value for name, value in fields.items() if name in saved}
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(present))
        )["state"]
        if isinstance(target, Mapping):
            return {**target, **restored}
        return target.replace(**restored)

    def restore_backbone(self, step: int | None = None) -> tuple[Any, dict]:
        """(backbone variables as NumPy, config dict) of `step` (default: the latest)."""
        step = self._require_step(step)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                backbone=ocp.args.StandardRestore(), config=ocp.args.JsonRestore()
            ),
        )
        return _to_host(restored["backbone"]), dict(restored["config"])

    def restore_head(self, step: int | None = None) -> Any | None:
        """The relation head's variables {'params', 'batch_stats'} as NumPy (default step:
        the latest): the `head` item of imported weights, else the head in the train state
        of a pretraining run; None when the step has neither."""
        step = self._require_step(step)
        try:
            return self._restore_item(step, "head")
        except KeyError:  # not imported weights
            pass
        try:
            state = self._restore_item(step, "state")
        except KeyError:
            return None
        return {collection: state[collection]["head"] for collection in ("params", "batch_stats")}

    def _restore_item(self, step: int, item: str) -> Any:
        """Item `item` of `step` as saved, NumPy leaves; KeyError if the step lacks it."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore()})
        )
        return _to_host(restored[item])

    def _require_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointNotFoundError(
                f"No complete checkpoint under {self._manager.directory}; pretrain first "
                "(python launch.py --config=... --workdir=...)."
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise CheckpointNotFoundError(
                f"No checkpoint of step {step} under {self._manager.directory}; "
                f"available steps: {steps}."
            )
        return step

    def wait(self) -> None:
        """Blocks until asynchronous writes are finished; CheckpointWriteError if one failed."""
        with self._write_errors(self._writing):
            self._manager.wait_until_finished()
        self._writing = None

    def close(self) -> None:
        """Waits for the last write and releases Orbax's threads; after a reported
        CheckpointWriteError, the same failure is not raised again."""
        reported = self._failed
        try:
            with self._write_errors(self._writing):
                self._manager.close()
        except CheckpointWriteError:
            if not reported:
                raise


def _fields(tree: Any) -> dict[str, Any]:
    """The top-level fields of a dataclass or dict, by name."""
    if isinstance(tree, Mapping):
        return dict(tree)
    if dataclasses.is_dataclass(tree):
        return {field.name: getattr(tree, field.name) for field in dataclasses.fields(tree)}
    raise ValueError(f"A train state must be a dataclass or a dict, got {type(tree).__name__}.")


def save_probe(directory: str, tree: Any) -> None:
    """Writes a probe's variables (a host copy of `tree`) to `directory`, replacing it.

    Used by the linear probe for its classifier (and, after fine-tuning, the backbone).
    """
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(os.path.abspath(directory), _to_host(tree), force=True)
        checkpointer.wait_until_finished()


def restore_probe(directory: str) -> Any:
    """The tree written by `save_probe` to `directory`, as NumPy arrays."""
    directory = os.path.abspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(f"No probe checkpoint in {directory}; run the linear probe first.")
    _drop_reads_of_failed_restores()
    with ocp.StandardCheckpointer() as checkpointer:
        return _to_host(checkpointer.restore(directory))
