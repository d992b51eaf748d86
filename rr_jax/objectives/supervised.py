"""Supervised training (the paper's upper bound): cross-entropy with the labels, SGD."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from rr_jax.augment import AugmentConfig
from rr_jax.objectives import Objective, OptimizerDefaults, Variables
from rr_jax.objectives.common import classification_loss


@dataclasses.dataclass(frozen=True)
class Supervised(Objective):
    """A linear classifier on the features, one view per image: config.augment's crop and
    flip without colour jitter or grayscale. SGD 0.1 (momentum config.optimizer.momentum),
    x0.1 at 50% and 75% of training."""

    name = "supervised"
    optimizer = OptimizerDefaults("sgd", 0.1, "multistep")
    needs_labels = True

    @classmethod
    def augment_config(cls, config, spec) -> AugmentConfig:
        fields = {**config.augment.to_dict(), "jitter_prob": 0.0, "grayscale_prob": 0.0}
        return AugmentConfig(**fields, mean=spec.mean, std=spec.std)

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        return {"batch_stats": {}, **nn.Dense(num_classes).init(key, jnp.zeros((2, features.shape[-1])))}

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        logits = nn.Dense(head_variables["params"]["kernel"].shape[-1]).apply(
            {"params": head_variables["params"]}, features[0])
        loss, accuracy = classification_loss(logits, targets)
        return loss, {"loss": loss, "accuracy": accuracy}, head_variables["batch_stats"]
