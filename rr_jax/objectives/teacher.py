"""A momentum teacher (BYOL, MoCo v3, DINO): an exponential moving average of the
backbone and of part of the head, with BatchNorm statistics of its own.

The teacher lives in the objective state ({'teacher': {'params', 'batch_stats'}}, each
{'backbone', 'head'}), so it is checkpointed with the train state and a resumed run
continues it exactly. It starts as a copy of the initial online network. In every step
`teacher` applies it in training mode to the views (no gradient reaches it; its
BatchNorm statistics are the batch's, across devices, and its running averages are
kept), and after the optimizer update `update_state` moves its parameters towards the
online ones, theta_t <- tau_k theta_t + (1 - tau_k) theta, with BYOL's schedule
tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2 from tau_base at the first step k = 0
to 1 at the run's end k = K.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from rr_jax.objectives import Objective, Variables


def momentum_schedule(base: float, step: jax.Array, total_steps: int) -> jax.Array:
    """tau_k = 1 - (1 - base) (cos(pi k / K) + 1) / 2 for step k of K (k clipped to K)."""
    progress = jnp.minimum(jnp.asarray(step, jnp.float32), total_steps) / max(total_steps, 1)
    return 1.0 - (1.0 - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def moving_average(teacher: Any, online: Any, momentum: jax.Array) -> Any:
    """momentum * teacher + (1 - momentum) * online, leaf by leaf (the trees' structure must agree)."""
    return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, teacher, online)


@dataclasses.dataclass(frozen=True)
class MomentumTeacher(Objective):
    """An objective with a momentum teacher of the backbone and the head's `teacher_parts`.

    Subclasses implement `teacher_head` (the teacher's head on the teacher's features);
    what it returns besides the targets and the head's statistics joins `aux` for their
    own `update_state` (DINO's centre).

    Fields:
      base_momentum: tau_base in [0, 1].
      total_steps: K, the run's length (set by `for_run`).
    """

    teacher_parts: ClassVar[tuple[str, ...] | None] = None
    """The head's top-level parameter groups the teacher copies (None: the whole head)."""

    num_views: int = 2
    base_momentum: float = 0.99
    total_steps: int = 0

    def for_run(self, total_steps: int) -> MomentumTeacher:
        return dataclasses.replace(self, total_steps=total_steps)

    def _teacher_view(self, tree: dict) -> dict:
        """{'backbone', 'head'} of params or batch_stats restricted to what the teacher holds."""
        head = tree["head"]
        if self.teacher_parts is not None:
            head = {part: head[part] for part in self.teacher_parts if part in head}
        return {"backbone": tree["backbone"], "head": head}

    def init_state(self, num_examples: int, variables: Variables) -> dict:
        copy = {kind: self._teacher_view(variables[kind]) for kind in ("params", "batch_stats")}
        return {"teacher": jax.tree.map(jnp.array, copy)}  # its own buffers: the step donates the state's

    def teacher_head(self, head_variables: Variables, features: jax.Array, objective_state: Any,
                     axis_name: str | None) -> tuple[Any, Any, dict]:
        """The teacher's head in training mode on its features float[K, B, D]: (the loss's
        targets, the head's new batch_stats, more aux for `update_state`)."""
        raise NotImplementedError

    def teacher(self, views, targets, objective_state, *, apply_backbone, axis_name):
        teacher = objective_state["teacher"]
        features, backbone_stats = apply_backbone(
            {"params": teacher["params"]["backbone"], "batch_stats": teacher["batch_stats"]["backbone"]}, views)
        head_variables = {"params": teacher["params"]["head"], "batch_stats": teacher["batch_stats"]["head"]}
        outputs, head_stats, extra = self.teacher_head(head_variables, features, objective_state, axis_name)
        return outputs, {"batch_stats": {"backbone": backbone_stats, "head": head_stats}, **extra}

    def update_state(self, objective_state, aux, params, step):
        momentum = momentum_schedule(self.base_momentum, step, self.total_steps)
        teacher = objective_state["teacher"]
        return {**objective_state, "teacher": {
            "params": moving_average(teacher["params"], self._teacher_view(params), momentum),
            "batch_stats": aux["batch_stats"],
        }}

    def describe(self) -> str:
        return (f"{self.name}, K={self.num_views} views, momentum teacher ({self.base_momentum} -> 1 over "
                f"{self.total_steps} steps)")
