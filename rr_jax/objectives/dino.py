"""DINO (Caron et al., 2021): self-distillation with no labels. A student network
matches the sharpened, centred output distribution of a momentum teacher over
prototypes on the other view.

Student and teacher: backbone -> head (an MLP with GELU, L2 normalisation, and a
weight-normalised linear layer without bias onto the prototypes, its norm fixed to 1:
the paper's norm_last_layer). The teacher is an exponential moving average of the
student's backbone and head (`rr_jax.objectives.teacher`). With teacher outputs t and
student outputs s of views i != j, the loss is the mean over those pairs and the images
of -sum softmax((t_i - c) / T_t) log softmax(s_j / T_s); the centre c is a moving
average, c <- m c + (1 - m) mean(t), of the teacher's outputs over the views and the
images of every device, updated after each step. Defaults (config.dino):

- head MLP 256-256-32, 512 prototypes: the paper's head (2048, 2048, 256, 65536
  prototypes) at solo-learn's CIFAR widths (2048 hidden, 256 bottleneck, 4096
  prototypes) divided by 8, the ratio of conv4's 64 features to ResNet-18's 512.
- student temperature 0.1, teacher temperature 0.04: the paper's (its teacher warms up
  from 0.04 to 0.07 over 30 epochs; a one-epoch run stays at the start of the warm-up).
- centre momentum 0.9: the paper's.
- base momentum 0.996, cosine to 1: the paper's. solo-learn's CIFAR recipe uses 0.9995
  for 1000 epochs; over a run of about 1000 steps it would leave the teacher near its
  random initialisation.
- two views of the same size: the paper's multi-crop (2 global and several small local
  crops) is not implemented; every view here comes from `config.augment`.
- optimizer: Adam 1e-3 constant, as every other row of this project (the paper: AdamW
  with lr 5e-4 x B/256, weight decay 0.04 -> 0.4, and the last layer frozen in the first
  epoch, which here would be the whole run; solo-learn's CIFAR recipe: LARS lr 0.3).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from rr_jax.numerics import unit_rows
from rr_jax.objectives import Variables
from rr_jax.objectives.common import check_settings
from rr_jax.objectives.heads import MLP
from rr_jax.objectives.teacher import MomentumTeacher


class DINOHead(nn.Module):
    """MLP (GELU, no BatchNorm) -> L2 normalisation -> weight-normalised Dense without bias
    (each prototype's weight vector of norm 1). float[N, D] -> float[N, num_prototypes]."""

    hidden_dim: int
    bottleneck_dim: int
    num_prototypes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = MLP((self.hidden_dim, self.hidden_dim, self.bottleneck_dim), hidden_norm=False, activation=nn.gelu,
                name="mlp")(x, False)
        weights = self.param("prototypes", nn.initializers.lecun_normal(), (self.bottleneck_dim, self.num_prototypes))
        return unit_rows(x) @ unit_rows(weights.T).T


def dino_loss(student: jax.Array, teacher_probabilities: jax.Array, student_temperature: float) -> jax.Array:
    """The mean over view pairs i != j and images of the cross-entropy
    -sum_p t_i[p] log softmax(s_j / T_s)[p].

    student: float[K, B, P], the student's outputs; teacher_probabilities: float[K, B, P],
    the teacher's centred, sharpened distributions (no gradient flows to them).
    """
    log_p = jax.nn.log_softmax(student.astype(jnp.float32) / student_temperature, axis=-1)
    t = jax.lax.stop_gradient(teacher_probabilities)
    cross = -jnp.einsum("ibp,jbp->ijb", t, log_p).mean(-1)  # [K teacher views, K student views]
    num_views = student.shape[0]
    off_diagonal = 1.0 - jnp.eye(num_views)
    return jnp.sum(cross * off_diagonal) / jnp.sum(off_diagonal)


@dataclasses.dataclass(frozen=True)
class DINO(MomentumTeacher):
    """Fields: hidden_dim, bottleneck_dim, num_prototypes, student_temperature,
    teacher_temperature, centre_momentum, base_momentum."""

    name = "dino"
    settings = ("hidden_dim", "bottleneck_dim", "num_prototypes", "student_temperature", "teacher_temperature",
                "centre_momentum", "base_momentum")

    hidden_dim: int = 256
    bottleneck_dim: int = 32
    num_prototypes: int = 512
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    centre_momentum: float = 0.9
    base_momentum: float = 0.996

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        check_settings("dino", config.dino, positive_ints=("hidden_dim", "bottleneck_dim", "num_prototypes"),
                       positive=("student_temperature", "teacher_temperature"),
                       unit_interval=("centre_momentum", "base_momentum"))

    def head(self) -> DINOHead:
        return DINOHead(self.hidden_dim, self.bottleneck_dim, self.num_prototypes)

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        return {"batch_stats": {}, **self.head().init(key, jnp.zeros((2, features.shape[-1])))}

    def init_state(self, num_examples, variables) -> dict:
        return {**super().init_state(num_examples, variables),
                "centre": jnp.zeros(self.num_prototypes, jnp.float32)}

    def teacher_head(self, head_variables, features, objective_state, axis_name):
        outputs = self.head().apply({"params": head_variables["params"]}, features)  # [K, B, P]
        probabilities = jax.nn.softmax((outputs - objective_state["centre"]) / self.teacher_temperature, axis=-1)
        batch_centre = outputs.mean(axis=(0, 1))
        if axis_name is not None:
            batch_centre = jax.lax.pmean(batch_centre, axis_name)
        return probabilities, {}, {"centre": batch_centre}

    def update_state(self, objective_state, aux, params, step):
        state = super().update_state(objective_state, aux, params, step)
        m = self.centre_momentum
        return {**state, "centre": m * objective_state["centre"] + (1.0 - m) * aux["centre"]}

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        outputs = self.head().apply({"params": head_variables["params"]}, features)
        loss = dino_loss(outputs, targets, self.student_temperature)
        return loss, {"loss": loss}, head_variables["batch_stats"]
