"""Deep InfoMax (Hjelm et al., 2019) as the official code runs it.

The encoder gives the representation y (the backbone's features) and the feature map M
of its first block (conv4: layer1 after ReLU, before the pool; the ResNets: the stem's
conv1 -> bn1 -> ReLU, before any pool). Three discriminators score (y, M) pairs of the
same image against pairs with M' (the batch rolled by one image, across devices under
pmap as on one device):

  local  (weight beta):  1x1 convolutions 256 -> 256 -> 1 on M with y tiled over it;
  global (weight alpha): 3x3 convolutions M -> 64 -> 32 (no padding), adaptive average
         pool to 16x16, concatenated with y, Dense 256 -> 256 -> 1;
  prior  (weight gamma): Dense 512 -> 128 -> 1 with a sigmoid, telling y from uniform
         [0, 1) noise.

loss = beta * (E softplus(T(y, M')) + E softplus(-T(y, M)))   (Jensen-Shannon MI bound)
     + alpha * (the same with the global discriminator)
     - gamma * (E log D(noise) + E log(1 - D(y))).

The official training script sets alpha = 0, beta = 1, gamma = 0.1 (config.deepinfomax);
as there, a discriminator whose weight is 0 is not created. As in the official code
every part, the prior discriminator included, minimises this one loss; Adam 1e-4
(higher rates diverge, says the official code); the only augmentation is a horizontal
flip. Layers are named as the official ones (c0, l0, ...), use PyTorch's default kernel
initialisation, and biases start at zero.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rr_jax.initializers import TORCH_KERNEL_INIT
from rr_jax.objectives import Objective, OptimizerDefaults, Variables, config_error
from rr_jax.objectives.common import CropFlip, crop_flip_views

# Backbone name -> (module path of its first block's output, whether a ReLU follows it).
FEATURE_MAPS: dict[str, tuple[tuple[str, ...], bool]] = {
    "conv4": (("layer1",), False),
    **{name: (("bn1",), True) for name in ("resnet8", "resnet20", "resnet32", "resnet56", "resnet18", "resnet34")},
}
"""The backbones Deep InfoMax supports: where their feature map M is read."""

POOLED_SIZE = 16


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=TORCH_KERNEL_INIT, name=name)


def _conv(features: int, kernel: int, name: str) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), padding="VALID", kernel_init=TORCH_KERNEL_INIT, name=name)


def adaptive_average_pool(x: jax.Array, size: int) -> jax.Array:
    """PyTorch's AdaptiveAvgPool2d(size) on NHWC: output cell i averages the input rows
    floor(i * H / size) to ceil((i + 1) * H / size) - 1 (columns alike). [N, H, W, C] -> [N, size, size, C]."""

    def weights(length: int) -> np.ndarray:
        matrix = np.zeros((size, length), np.float32)
        for i in range(size):
            start, stop = (i * length) // size, -(-((i + 1) * length) // size)
            matrix[i, start:stop] = 1.0 / (stop - start)
        return matrix

    return jnp.einsum("ih,jw,nhwc->nijc", weights(x.shape[1]), weights(x.shape[2]), x)


class GlobalDiscriminator(nn.Module):
    """T(y, M) -> float[N, 1]; y float[N, D], M float[N, H, W, C]."""

    @nn.compact
    def __call__(self, y: jax.Array, feature_map: jax.Array) -> jax.Array:
        h = nn.relu(_conv(64, 3, "c0")(feature_map))
        h = adaptive_average_pool(_conv(32, 3, "c1")(h), POOLED_SIZE)
        h = jnp.transpose(h, (0, 3, 1, 2)).reshape(h.shape[0], -1)  # PyTorch's NCHW flattening
        h = nn.relu(_dense(256, "l0")(jnp.concatenate([y, h], axis=1)))
        return _dense(1, "l2")(nn.relu(_dense(256, "l1")(h)))


class LocalDiscriminator(nn.Module):
    """T(y, M) at every position of M -> float[N, H, W, 1]."""

    @nn.compact
    def __call__(self, y: jax.Array, feature_map: jax.Array) -> jax.Array:
        tiled = jnp.broadcast_to(y[:, None, None, :], (*feature_map.shape[:3], y.shape[-1]))
        h = nn.relu(_conv(256, 1, "c0")(jnp.concatenate([feature_map, tiled], axis=-1)))
        return _conv(1, 1, "c2")(nn.relu(_conv(256, 1, "c1")(h)))


class PriorDiscriminator(nn.Module):
    """The logit of D(y), the probability that y is a sample of the prior: float[N, 1]."""

    @nn.compact
    def __call__(self, y: jax.Array) -> jax.Array:
        h = nn.relu(_dense(512, "l0")(y))
        return _dense(1, "l2")(nn.relu(_dense(128, "l1")(h)))


DISCRIMINATORS = {"global": GlobalDiscriminator, "local": LocalDiscriminator, "prior": PriorDiscriminator}


def jsd_mi_term(positive_logits: jax.Array, negative_logits: jax.Array) -> jax.Array:
    """E softplus(T(negatives)) + E softplus(-T(positives)): the negated Jensen-Shannon
    mutual-information bound that the local and global terms minimise."""
    return jax.nn.softplus(negative_logits).mean() + jax.nn.softplus(-positive_logits).mean()


def prior_term(noise_logits: jax.Array, y_logits: jax.Array) -> jax.Array:
    """-(E log D(noise) + E log(1 - D(y))) with D = sigmoid(logit)."""
    return -(jax.nn.log_sigmoid(noise_logits).mean() + jax.nn.log_sigmoid(-y_logits).mean())


def _rolled(feature_map: jax.Array, axis_name: str | None) -> jax.Array:
    """M' [i] = M[i + 1] over the whole batch (the last image takes the first): under
    `axis_name` each device gets the first image of the next one."""
    if axis_name is None:
        following = feature_map[:1]
    else:
        size = jax.lax.axis_size(axis_name)
        following = jax.lax.ppermute(feature_map[:1], axis_name, [(j, (j - 1) % size) for j in range(size)])
    return jnp.concatenate([feature_map[1:], following])


def _noise(key: jax.Array, shape: tuple[int, int], axis_name: str | None) -> jax.Array:
    """This device's rows of uniform [0, 1) noise drawn for the whole batch (the same
    numbers on 1 device and on many)."""
    if axis_name is None:
        return jax.random.uniform(key, shape)
    size = jax.lax.axis_size(axis_name)
    everything = jax.random.uniform(key, (size * shape[0], shape[1]))
    return jax.lax.dynamic_slice_in_dim(everything, jax.lax.axis_index(axis_name) * shape[0], shape[0])


@dataclasses.dataclass(frozen=True)
class DeepInfoMax(Objective):
    """Fields: alpha, beta, gamma (the global, local and prior weights), backbone (its
    name: where M is read), augment (a CropFlip without padding: flips only)."""

    name = "deepinfomax"
    optimizer = OptimizerDefaults("adam", 1e-4, "constant")
    settings = ("alpha", "beta", "gamma")
    augment: CropFlip = CropFlip(padding=0)
    alpha: float = 0.0
    beta: float = 1.0
    gamma: float = 0.1
    backbone: str = "conv4"

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        if config.model.backbone not in FEATURE_MAPS:
            raise config_error("model.backbone", config.model.backbone,
                               "deepinfomax supports " + ", ".join(map(repr, FEATURE_MAPS)))
        weights = config.deepinfomax
        for key in ("alpha", "beta", "gamma"):
            if not weights[key] >= 0:
                raise config_error(f"deepinfomax.{key}", weights[key], "it must be >= 0")
        if not any(weights[key] > 0 for key in ("alpha", "beta", "gamma")):
            raise config_error("deepinfomax", weights.to_dict(), "at least one of alpha, beta, gamma must be > 0")

    @classmethod
    def augment_config(cls, config, spec) -> CropFlip:
        return CropFlip(padding=0, mean=spec.mean, std=spec.std)

    @classmethod
    def from_config(cls, config, spec) -> DeepInfoMax:
        return dataclasses.replace(super().from_config(config, spec), backbone=config.model.backbone)

    @property
    def shared_loss_key(self) -> bool:
        return True  # the prior's noise is drawn for the whole batch

    @property
    def _weights(self) -> dict[str, float]:
        """The discriminators in use and their weights."""
        weights = {"global": self.alpha, "local": self.beta, "prior": self.gamma}
        return {part: weight for part, weight in weights.items() if weight != 0}

    def capture(self):
        if self.backbone not in FEATURE_MAPS:
            raise ValueError(f"deepinfomax supports the backbones {sorted(FEATURE_MAPS)}, got {self.backbone!r}.")
        path = FEATURE_MAPS[self.backbone][0]
        return lambda module, method: method == "__call__" and module.path == path

    def feature_map(self, intermediates) -> jax.Array:
        """M float32[N, H, W, C] from the captured intermediates."""
        path, relu = FEATURE_MAPS[self.backbone]
        node = intermediates
        for part in path:
            node = node[part]
        feature_map = jnp.asarray(node["__call__"][0], jnp.float32)
        return nn.relu(feature_map) if relu else feature_map

    def inputs(self, key, batch, objective_state):
        return crop_flip_views(key, batch["image"], 1, self.augment), batch["label"]

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        y = jnp.zeros((2, features.shape[-1]), jnp.float32)
        shape = jax.eval_shape(self.feature_map, intermediates).shape
        feature_map = jnp.zeros((2, *shape[1:]), jnp.float32)
        params = {}
        for part, key in zip(self._weights, jax.random.split(key, len(self._weights))):
            inputs = (y,) if part == "prior" else (y, feature_map)
            params[part] = DISCRIMINATORS[part]().init(key, *inputs)["params"]
        return {"params": params, "batch_stats": {}}

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        y = features[0].astype(jnp.float32)
        feature_map = self.feature_map(intermediates)
        params = head_variables["params"]
        terms = {}
        for part in ("global", "local"):
            if part in self._weights:
                discriminator = DISCRIMINATORS[part]()
                positive = discriminator.apply({"params": params[part]}, y, feature_map)
                negative = discriminator.apply({"params": params[part]}, y, _rolled(feature_map, axis_name))
                terms[part] = jsd_mi_term(positive, negative)
        if "prior" in self._weights:
            prior = PriorDiscriminator()
            noise = prior.apply({"params": params["prior"]}, _noise(key, y.shape, axis_name))
            terms["prior"] = prior_term(noise, prior.apply({"params": params["prior"]}, y))
        loss = sum(self._weights[part] * value for part, value in terms.items())
        return loss, {"loss": loss, **{f"{part}_term": value for part, value in terms.items()}}, {}
