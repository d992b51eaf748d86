"""Relational reasoning (the paper's method): K views per image, every pair of views
scored by the relation head, focal or binary cross-entropy (rr_jax.relational)."""

from __future__ import annotations

import dataclasses

import ml_collections

from rr_jax.objectives import Objective, Variables, check_config_choice, config_error
from rr_jax.relational import AGGREGATIONS, HEADS, LOSSES, NEGATIVES, init_relation_head, relational_loss


@dataclasses.dataclass(frozen=True)
class Relational(Objective):
    """See `rr_jax.relational.relational_loss` for the fields; `head` is 'mlp' (the
    relation head) or 'dot' (the dot-product ablation)."""

    name = "relational"
    settings = ("num_views", "aggregation", "negatives", "loss_name", "global_negatives", "hidden_dim", "head")
    setting_keys = {"loss_name": "loss"}  # config.relational.loss
    head_fields = ("relational.aggregation", "relational.hidden_dim", "relational.head")

    num_views: int = 32  # K
    aggregation: str = "cat"
    negatives: str = "derangement"
    loss_name: str = "focal"
    global_negatives: bool = False  # negatives across devices (all-gather)
    head: str = "mlp"  # the relation head; 'dot', 'encoder_dot': the paper's head ablations
    hidden_dim: int = 256

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        rel = config.relational
        for key, allowed in (("aggregation", AGGREGATIONS), ("negatives", NEGATIVES), ("loss", LOSSES),
                             ("head", HEADS)):
            check_config_choice(f"relational.{key}", rel[key], allowed)
        if rel.num_views < 2:
            raise config_error("relational.num_views", rel.num_views, "K must be >= 2 views to form pairs")
        if not isinstance(rel.hidden_dim, int) or rel.hidden_dim < 1:
            raise config_error("relational.hidden_dim", rel.hidden_dim, "it must be a positive integer")

    @property
    def shared_loss_key(self) -> bool:
        return self.global_negatives  # one derangement of the whole batch

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        return init_relation_head(key, features.shape[-1], aggregation=self.aggregation,
                                  hidden_dim=self.hidden_dim, head=self.head)

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        return relational_loss(
            features, head_variables, key, aggregation=self.aggregation, negatives=self.negatives,
            loss=self.loss_name, axis_name=axis_name, global_negatives=self.global_negatives,
        )

    def describe(self) -> str:
        k = self.num_views
        return f"{self.name}, K={k} views ({k * (k - 1)} pairs per image per step)"
