"""The projector and predictor MLPs of the Siamese methods (BYOL, MoCo v3, SimSiam,
Barlow Twins, VICReg).

Hidden layers are Dense -> BatchNorm -> ReLU, as in each method's official code; the
output layer is a Dense, optionally followed by a BatchNorm with ('affine') or without
('plain', PyTorch's affine=False) a learnt scale and bias. BatchNorm statistics are
those of the device's whole batch (both views) and, under `axis_name`, of every device.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rr_jax.batch_norm import BatchNorm
from rr_jax.objectives import Objective
from rr_jax.objectives.common import gather_batch

LAST_NORMS = (None, "affine", "plain")
BN_MOMENTUM = 0.9  # PyTorch's BatchNorm1d momentum 0.1, as the official codes


class MLP(nn.Module):
    """Dense layers of `widths`: float[N, D] -> float[N, widths[-1]].

    Attributes:
      widths: the output width of each Dense layer.
      last_norm: BatchNorm after the last layer: None, 'affine' or 'plain' (no scale, no bias).
      hidden_norm: BatchNorm after each hidden Dense (False: DINO's head).
      activation: of the hidden layers.
      axis_name: devices to average the BatchNorm statistics over.
    """

    widths: tuple[int, ...]
    last_norm: str | None = None
    hidden_norm: bool = True
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.last_norm not in LAST_NORMS:
            raise ValueError(f"last_norm={self.last_norm!r} is not allowed: use one of {LAST_NORMS}.")
        for i, width in enumerate(self.widths, start=1):
            x = nn.Dense(width, name=f"linear{i}")(x)
            last = i == len(self.widths)
            if (self.hidden_norm and not last) or (last and self.last_norm):
                affine = not last or self.last_norm == "affine"
                x = BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, axis_name=self.axis_name,
                              use_scale=affine, use_bias=affine, name=f"bn{i}")(x)
            if not last:
                x = self.activation(x)
        return x


class SiameseHead(nn.Module):
    """A projector and, when `predictor` is set, a predictor on its output.

    ``__call__(features float[N, D], train) -> (projections float[N, P], predictions
    float[N, P] or None)``; ``project`` applies the projector alone (a teacher's head,
    which needs only the projector's variables).
    """

    projector: tuple[int, ...]
    projector_norm: str | None = None
    predictor: tuple[int, ...] | None = None
    axis_name: str | None = None

    def setup(self):
        self.projector_mlp = MLP(self.projector, self.projector_norm, axis_name=self.axis_name)
        if self.predictor is not None:
            self.predictor_mlp = MLP(self.predictor, axis_name=self.axis_name)

    def project(self, features: jax.Array, train: bool) -> jax.Array:
        return self.projector_mlp(features, train)

    def __call__(self, features: jax.Array, train: bool) -> tuple[jax.Array, jax.Array | None]:
        projections = self.projector_mlp(features, train)
        predictions = self.predictor_mlp(projections, train) if self.predictor is not None else None
        return projections, predictions


def init_siamese_head(head: SiameseHead, key: jax.Array, feature_dim: int) -> dict:
    """The head's variables {'params', 'batch_stats'} ({'projector_mlp', 'predictor_mlp'} each)."""
    variables = head.init(key, jnp.zeros((2, feature_dim)), train=False)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def apply_siamese_head(head: SiameseHead, variables: dict, features: jax.Array, *, project_only: bool = False
                       ) -> tuple[tuple[jax.Array, jax.Array | None] | jax.Array, dict]:
    """The head in training mode on features float[K, B, D] (all K*B rows in one batch):
    ((projections, predictions) float[K, B, P], or the projections alone with
    `project_only`) and the new batch_stats."""
    num_views, batch = features.shape[:2]
    flat = features.reshape(num_views * batch, -1)
    outputs, updates = head.apply(variables, flat, True, mutable=["batch_stats"],
                                  method=SiameseHead.project if project_only else SiameseHead.__call__)
    unflat = (lambda x: x.reshape(num_views, batch, -1))
    outputs = unflat(outputs) if project_only else tuple(None if x is None else unflat(x) for x in outputs)
    return outputs, updates.get("batch_stats", {})


@dataclasses.dataclass(frozen=True)
class ProjectionStatisticsObjective(Objective):
    """Barlow Twins and VICReg: two views through a projector Dense(h)-BN-ReLU-Dense(h)-
    BN-ReLU-Dense(p), and a loss of statistics of the two views' projections over the
    global batch (gathered across devices). Subclasses implement `projection_loss`."""

    num_views: int = 2
    projector_hidden_dim: int = 256
    projector_dim: int = 256

    def head(self, axis_name: str | None = None) -> SiameseHead:
        hidden = self.projector_hidden_dim
        return SiameseHead((hidden, hidden, self.projector_dim), axis_name=axis_name)

    def init_head(self, key, features, intermediates, num_classes) -> dict:
        return init_siamese_head(self.head(), key, features.shape[-1])

    def projection_loss(self, z1: jax.Array, z2: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(loss, metrics) of the projections float[N, P] of views 1 and 2 of the global batch."""
        raise NotImplementedError

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        (z, _), stats = apply_siamese_head(self.head(axis_name), head_variables, features)
        loss, metrics = self.projection_loss(gather_batch(z[0], axis_name), gather_batch(z[1], axis_name))
        return loss, {"loss": loss, **metrics}, stats
