"""MoCo v3 (Chen, Xie & He, 2021): queries of the online network with a predictor find
the momentum key encoder's key of the other view among the keys of the whole global batch.

Online: backbone -> projector -> predictor (queries q); key encoder: an exponential
moving average of the backbone and projector (`rr_jax.objectives.teacher`) (keys k).
The loss is symmetric, ctr(q_1, k_2) + ctr(q_2, k_1), where ctr(q, k) is the
cross-entropy of cos(q_i, k_j) / T over the keys of every device's images (gathered),
the positive being k_i, times 2T (the official code's scaling). Defaults (config.mocov3):

- projector Dense(512)-BN-ReLU-Dense(32)-BN(no affine), predictor Dense(512)-BN-ReLU-
  Dense(32): the official ResNet heads (2 layers each, 4096 hidden, 256 out, the last
  BN of the projector without scale and bias) at solo-learn's CIFAR widths (4096, 256)
  divided by 8, the ratio of conv4's 64 features to ResNet-18's 512.
- temperature 0.2: solo-learn's CIFAR recipe (the paper's ResNet-50 runs use 1.0; 0.2
  with its ViTs).
- base momentum 0.99 (the paper's ResNet-50 value, and solo-learn's CIFAR recipe),
  cosine to 1 over the run.
- optimizer: Adam 1e-3 constant, as every other row of this project. The paper trains
  ResNet-50 with LARS (lr 0.3 x B/256, weight decay 1.5e-6) at 4096 images a step;
  with 64 a step the 127 negatives per query, not the optimizer, are the limiting
  change.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import optax

from rr_jax.numerics import unit_rows
from rr_jax.objectives import Variables
from rr_jax.objectives.common import check_settings, gather_batch
from rr_jax.objectives.heads import SiameseHead, apply_siamese_head, init_siamese_head
from rr_jax.objectives.teacher import MomentumTeacher


def info_nce(queries: jax.Array, keys: jax.Array, positives: jax.Array, temperature: float
             ) -> tuple[jax.Array, jax.Array]:
    """MoCo v3's contrastive loss ctr(q, k): 2T times the cross-entropy of cos(q_i, k_j) / T
    with the target `positives[i]`.

    queries: float[B, P]; keys: float[N, P] (no gradient flows to them); positives: int[B],
    the row of each query's key. Returns (loss, top-1 accuracy of finding the key).
    """
    logits = unit_rows(queries) @ unit_rows(jax.lax.stop_gradient(keys)).T / temperature
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, positives).mean() * 2.0 * temperature
    return loss, (jnp.argmax(logits, axis=-1) == positives).mean()


@dataclasses.dataclass(frozen=True)
class MoCoV3(MomentumTeacher):
    """Fields: projector_hidden_dim, projector_dim, predictor_hidden_dim, temperature, base_momentum."""

    name = "mocov3"
    teacher_parts = ("projector_mlp",)
    settings = ("projector_hidden_dim", "projector_dim", "predictor_hidden_dim", "temperature", "base_momentum")

    projector_hidden_dim: int = 512
    projector_dim: int = 32
    predictor_hidden_dim: int = 512
    temperature: float = 0.2

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check_settings("mocov3", config.mocov3, positive_ints=("projector_hidden_dim", "projector_dim",
                                                               "predictor_hidden_dim"),
                       positive=("temperature",), unit_interval=("base_momentum",))

    def head(self, axis_name: str | None = None) -> SiameseHead:
        return SiameseHead((self.projector_hidden_dim, self.projector_dim), projector_norm="plain",
                           predictor=(self.predictor_hidden_dim, self.projector_dim), axis_name=axis_name)

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        return init_siamese_head(self.head(), key, features.shape[-1])

    def teacher_head(self, head_variables, features, objective_state, axis_name):
        keys, stats = apply_siamese_head(self.head(axis_name), head_variables, features, project_only=True)
        return keys, stats, {}

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        (_, queries), stats = apply_siamese_head(self.head(axis_name), head_variables, features)
        batch = queries.shape[1]
        offset = 0 if axis_name is None else jax.lax.axis_index(axis_name) * batch
        positives = offset + jnp.arange(batch)
        keys = [gather_batch(targets[v], axis_name) for v in (0, 1)]
        loss_1, accuracy_1 = info_nce(queries[0], keys[1], positives, self.temperature)
        loss_2, accuracy_2 = info_nce(queries[1], keys[0], positives, self.temperature)
        loss = loss_1 + loss_2
        return loss, {"loss": loss, "accuracy": (accuracy_1 + accuracy_2) / 2}, stats
