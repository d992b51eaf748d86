"""Random weights (the paper's lower bound): no pretraining step; the probe reads the
initial backbone. Its state is relational reasoning's, as before objectives were
plug-ins, so that its checkpoints keep their layout."""

from __future__ import annotations

import dataclasses

import ml_collections

from rr_jax.objectives.relational import Relational


@dataclasses.dataclass(frozen=True)
class RandomWeights(Relational):
    name = "random"
    trains = False

    @classmethod
    def config_defaults(cls) -> None:
        return None  # reads config.relational (the head of its state)

    @classmethod
    def setting_values(cls, config: ml_collections.ConfigDict) -> dict:
        return Relational.setting_values(config)

    @classmethod
    def views(cls, config: ml_collections.ConfigDict) -> int:
        return 0

    def describe(self) -> str:
        return f"{self.name}: no pretraining step"
