"""Orbax checkpoints of a pretraining run; the only module that imports orbax.

Layout: WORKDIR/checkpoints/<step>/{state, backbone, config}. `state` is the full
train state (for resuming), `backbone` the backbone variables {'params',
'batch_stats'} on their own (for the linear probe and exports), `config` the
resolved config as JSON. Arrays are saved as host NumPy copies of one replica: never
replicated, and restorable in a process with any number of devices (they come back
as NumPy and the caller places them). Orbax writes each step into a temporary
directory and renames it when complete, so a step cut short by a kill is never listed.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("state", "backbone", "config")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _to_host(tree: Any) -> Any:
    return jax.tree.map(np.asarray, jax.device_get(tree))


class Checkpointer:
    """Saves and restores the checkpoints of one workdir.

    Args:
      workdir: the run's directory; checkpoints go to WORKDIR/checkpoints.
      max_to_keep: how many of the newest steps to keep (None: all).
    """

    def __init__(self, workdir: str, max_to_keep: int | None = None):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(
            checkpoint_dir(workdir), options=options, item_names=ITEMS
        )

    def latest_step(self) -> int | None:
        """The newest complete step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, backbone: Any, config: dict) -> None:
        """Writes step `step` (one replica's host copy of `state` and `backbone`)."""
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_host(state)),
                backbone=ocp.args.StandardSave(_to_host(backbone)),
                config=ocp.args.JsonSave(config),
            ),
            force=True,
        )

    def restore_state(self, step: int, target: Any) -> Any:
        """The train state of `step`, as NumPy arrays shaped like `target`."""
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_to_host(target)))
        )
        return restored["state"]

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

    def _require_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(
                f"No complete checkpoint under {self._manager.directory}; pretrain first "
                "(python launch.py --config=... --workdir=...)."
            )
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"No checkpoint of step {step} under {self._manager.directory}; "
                f"available steps: {steps}."
            )
        return step

    def wait(self) -> None:
        """Blocks until asynchronous writes are finished."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
