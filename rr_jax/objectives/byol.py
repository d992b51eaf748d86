"""BYOL (Grill et al., 2020): an online network with a predictor regresses a momentum
teacher's projections of the other view.

Online: backbone -> projector -> predictor; teacher: an exponential moving average of
the backbone and projector (`rr_jax.objectives.teacher`). The loss is symmetric:
2 - 2 cos(p_1, z'_2) + 2 - 2 cos(p_2, z'_1), averaged over the images. Defaults (config.byol):

- projector Dense(512)-BN-ReLU-Dense(32), predictor Dense(512)-BN-ReLU-Dense(32): the
  paper's MLPs (Sec. 3.3: 4096 hidden, 256 out, on ResNet-50's 2048 features) at
  solo-learn's CIFAR widths (4096, 256 on ResNet-18's 512 features) divided by 8, the
  ratio of conv4's 64 features to ResNet-18's 512.
- base momentum 0.99, cosine to 1 over the run: solo-learn's CIFAR recipe (the paper's
  ImageNet value is 0.996, for 300+ epochs).
- optimizer: Adam 1e-3 constant, as every other row of this project. The paper uses
  LARS (lr 0.2 x B/256, weight decay 1.5e-6, 4096 images a step) and solo-learn's CIFAR
  recipe LARS lr 1.0 at batch 256 for 1000 epochs; at 64 images a step and one epoch
  LARS's layer-wise rates have no budget to warm up (`--config.optimizer.name=lars`
  gives it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from rr_jax.numerics import unit_rows
from rr_jax.objectives import Variables
from rr_jax.objectives.common import check_settings
from rr_jax.objectives.heads import SiameseHead, apply_siamese_head, init_siamese_head
from rr_jax.objectives.teacher import MomentumTeacher


def byol_loss(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Symmetric BYOL loss: the mean over images of sum_v (2 - 2 cos(p_v, z'_{1-v})).

    predictions: float[2, B, P], the online predictions of views 0 and 1; targets:
    float[2, B, P], the teacher's projections of views 0 and 1 (no gradient flows to them).
    """
    p, z = unit_rows(predictions), unit_rows(jax.lax.stop_gradient(targets))
    cosines = jnp.sum(p * z[::-1], axis=-1)  # [2, B]: view 0 against the teacher's view 1, and back
    return jnp.mean(jnp.sum(2.0 - 2.0 * cosines, axis=0))


@dataclasses.dataclass(frozen=True)
class BYOL(MomentumTeacher):
    """Fields: projector_hidden_dim, projector_dim, predictor_hidden_dim, base_momentum."""

    name = "byol"
    teacher_parts = ("projector_mlp",)
    settings = ("projector_hidden_dim", "projector_dim", "predictor_hidden_dim", "base_momentum")

    projector_hidden_dim: int = 512
    projector_dim: int = 32
    predictor_hidden_dim: int = 512

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check_settings("byol", config.byol, positive_ints=("projector_hidden_dim", "projector_dim",
                                                           "predictor_hidden_dim"),
                       unit_interval=("base_momentum",))

    def head(self, axis_name: str | None = None) -> SiameseHead:
        return SiameseHead((self.projector_hidden_dim, self.projector_dim),
                           predictor=(self.predictor_hidden_dim, self.projector_dim), axis_name=axis_name)

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        return init_siamese_head(self.head(), key, features.shape[-1])

    def teacher_head(self, head_variables, features, objective_state, axis_name):
        projections, stats = apply_siamese_head(self.head(axis_name), head_variables, features, project_only=True)
        return projections, stats, {}

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        (_, predictions), stats = apply_siamese_head(self.head(axis_name), head_variables, features)
        loss = byol_loss(predictions, targets)
        return loss, {"loss": loss}, stats
