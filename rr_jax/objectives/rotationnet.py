"""RotationNet (Gidaris et al., 2018) as the official code runs it: each image, cropped
and flipped, is seen rotated by 0, 90, 180 and 270 degrees, and a linear classifier on
the backbone's features predicts which; cross-entropy, Adam 1e-3 for both parts."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from rr_jax.initializers import TORCH_KERNEL_INIT
from rr_jax.objectives import Objective, Variables, config_error
from rr_jax.objectives.common import CropFlip, classification_loss, crop_flip_views

NUM_ROTATIONS = 4


def rotations(images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each image rotated counter-clockwise by 0, 90, 180 and 270 degrees.

    images [B, H, H, C] -> (rotated [4, B, H, H, C], targets int32[4, B]: the number of
    quarter turns), as torch.rot90(x, k, dims=(2, 3)) on NCHW images.
    """
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be square [B, H, H, C], got shape {tuple(images.shape)}.")
    rotated = jnp.stack([jnp.rot90(images, k, axes=(1, 2)) for k in range(NUM_ROTATIONS)])
    targets = jnp.broadcast_to(jnp.arange(NUM_ROTATIONS, dtype=jnp.int32)[:, None], rotated.shape[:2])
    return rotated, targets


@dataclasses.dataclass(frozen=True)
class RotationNet(Objective):
    """Fields: augment, a CropFlip (RandomCrop with padding H/8 + flip, the official
    pipeline of this method). num_views is the 4 rotations of one augmented view."""

    name = "rotationnet"
    num_views: int = NUM_ROTATIONS
    augment: CropFlip = CropFlip(padding=0)

    @classmethod
    def views(cls, config) -> int:
        return NUM_ROTATIONS

    @classmethod
    def augment_config(cls, config, spec) -> CropFlip:
        height, width, _ = spec.image_shape
        if height != width:
            raise config_error("method", cls.name, f"rotations need square images, {config.dataset} has {height}x{width}")
        return CropFlip(padding=height // 8, mean=spec.mean, std=spec.std)

    def inputs(self, key, batch, objective_state):
        return rotations(crop_flip_views(key, batch["image"], 1, self.augment)[0])

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        head = nn.Dense(NUM_ROTATIONS, kernel_init=TORCH_KERNEL_INIT)
        return {"batch_stats": {}, **head.init(key, jnp.zeros((2, features.shape[-1])))}

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        logits = nn.Dense(NUM_ROTATIONS).apply({"params": head_variables["params"]}, features)
        loss, accuracy = classification_loss(logits.reshape(-1, NUM_ROTATIONS), targets.reshape(-1))
        return loss, {"loss": loss, "accuracy": accuracy}, head_variables["batch_stats"]
