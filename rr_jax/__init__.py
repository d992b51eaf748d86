"""rr_jax: self-supervised relational reasoning in JAX/Flax."""

from rr_jax.augment import AugmentConfig, augment_views, normalize
from rr_jax.backbones import BACKBONES, create_backbone
from rr_jax.relational import (
    AGGREGATIONS,
    HEADS,
    LOSSES,
    NEGATIVES,
    DotProductHead,
    EncoderDotHead,
    RelationHead,
    aggregate,
    init_relation_head,
    make_pairs,
    pair_indices,
    pair_loss,
    pair_metrics,
    relational_loss,
)
from rr_jax.shuffle import derangement, derangements

__all__ = [
    "AugmentConfig",
    "augment_views",
    "normalize",
    "BACKBONES",
    "create_backbone",
    "AGGREGATIONS",
    "HEADS",
    "LOSSES",
    "NEGATIVES",
    "DotProductHead",
    "EncoderDotHead",
    "RelationHead",
    "aggregate",
    "init_relation_head",
    "make_pairs",
    "pair_indices",
    "pair_loss",
    "pair_metrics",
    "relational_loss",
    "derangement",
    "derangements",
]

__version__ = "0.1.0"
