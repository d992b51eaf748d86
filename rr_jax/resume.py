"""Resuming a run: the newest checkpoint of a workdir that restores and may be resumed
with this config, or the imported weights of step 0 (rr_jax.convert)."""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from rr_jax.checkpoint import Checkpointer
from rr_jax.errors import ResumeError
from rr_jax.objectives import Objective
from rr_jax.run_dir import WEIGHT_FIELDS, check_resumable
from rr_jax.step import TrainState


def restore_latest(
    checkpointer: Checkpointer,
    fresh: TrainState,
    config: ml_collections.ConfigDict,
    allow_config_change: Sequence[str],
    primary: bool,
    *,
    objective: Objective,
    num_examples: int,
) -> tuple[TrainState, int]:
    """The newest checkpoint of the workdir that restores, as (state, its step).

    A step whose config differs from `config` in fields that change what is trained is
    refused (ResumeError). A step that fails to restore (damaged after it was written) is
    moved aside with a warning and the previous one is tried. Step 0 without a train
    state holds imported weights (rr_jax.convert): pretraining continues from them, with
    the objective's state of a run starting there (of `num_examples` images). None
    restores: (fresh, 0).
    """
    current = config.to_dict()
    for step in reversed(checkpointer.all_steps()):
        try:
            saved = checkpointer.restore_config(step)
            if checkpointer.has_item(step, "state"):
                check_resumable(saved, current, step=step, allow=allow_config_change)
                return jax.tree.map(jnp.asarray, checkpointer.restore_state(step, fresh)), step
            if step == 0:
                return _from_imported_weights(checkpointer, fresh, saved, current, allow_config_change,
                                              objective, num_examples), 0
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


def _from_imported_weights(checkpointer, fresh, saved, current, allow_config_change, objective,
                           num_examples) -> TrainState:
    """`fresh` with the backbone (and the head, for a method with `head_fields` whose
    head has the same structure) of the imported weights of step 0; the optimizer state
    starts afresh and the objective's state from the imported weights (a teacher as their copy)."""
    head = checkpointer.restore_head(0) if objective.head_fields else None
    if head is not None and jax.tree.structure(head["params"]) != jax.tree.structure(fresh.params["head"]):
        head = None  # the imported head is another kind than this run's
    fields = WEIGHT_FIELDS + (objective.head_fields if head is not None else ())
    check_resumable(saved, current, step=0, only=fields, allow=allow_config_change)
    backbone, _ = checkpointer.restore_backbone(0)
    params, batch_stats = dict(fresh.params), dict(fresh.batch_stats)
    params["backbone"], batch_stats["backbone"] = backbone["params"], backbone["batch_stats"]
    if head is not None:
        params["head"], batch_stats["head"] = head["params"], head["batch_stats"]
    logging.info("Continuing pretraining from the imported weights of step 0 (backbone%s).",
                 " and head" if head is not None else "")
    imported = fresh.replace(params=params, batch_stats=batch_stats, objective_state=objective.init_state(
        num_examples, {"params": params, "batch_stats": batch_stats}))
    chex.assert_trees_all_equal_shapes_and_dtypes(imported.params, fresh.params)
    return jax.tree.map(jnp.asarray, imported)
