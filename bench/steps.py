"""What the benchmark scripts time (not part of the package), built from rr_jax's pieces:
the pmapped pretraining step as `launch.py` builds it, a backbone's forward + backward,
the relation head's loss + gradient, the views' augmentation config and a backbone's
feature size."""

from __future__ import annotations

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import rr_jax
from rr_jax.augment import AugmentConfig
from rr_jax.backbones import create_backbone
from rr_jax.config import base_config
from rr_jax.datasets import get_dataset_spec
from rr_jax.features import feature_dim
from rr_jax.optimizer import make_optimizer
from rr_jax.step import AXIS, create_train_state, make_backbone, make_objective, parallel_train_step, replicate

BATCH = base_config().batch_size  # M, images per step as launch.py runs by default (64)


def pretraining_config(backbone: str = "conv4", views: int | None = None, *, dataset: str = "cifar10",
                       dtype: str = "float32", head: str = "mlp") -> ml_collections.ConfigDict:
    """`base_config()` with these fields set (`views`: K; None keeps the default)."""
    config = base_config()
    config.dataset = dataset
    config.model.backbone = backbone
    config.model.dtype = dtype
    config.relational.head = head
    if views is not None:
        config.relational.num_views = views
    return config


def augment_config(dataset: str = "cifar10") -> AugmentConfig:
    """The pretraining objective's view augmentation on `dataset` (its statistics)."""
    return make_objective(pretraining_config(dataset=dataset), get_dataset_spec(dataset)).augment


def whole_step(backbone: str, views: int, *, dataset: str = "cifar10", dtype: str = "float32",
               batch: int = BATCH, head: str = "mlp", devices: int | None = None):
    """The pmapped pretraining step as `launch.py` builds it, and inputs for it.

    Returns (step, (replicated state, batch)): the pmapped step, not jitted (see
    `timing.compile_fn`), and `batch` random uint8 images of the dataset's shape split
    over the first `devices` local devices (default: all of them), where the state is
    replicated.
    """
    spec = get_dataset_spec(dataset)
    devices = devices or jax.local_device_count()
    config = pretraining_config(backbone, views, dataset=dataset, dtype=dtype, head=head)
    model = make_backbone(config)
    optimizer = make_optimizer(config, total_steps=1)
    objective = make_objective(config, spec)
    state = replicate(create_train_state(jax.random.key(0), model, optimizer, spec.image_shape,
                                                     objective=objective))
    if devices < jax.local_device_count():
        # replicate places on every local device; pmap over an axis of size n
        # runs on the first n, so the first n copies are placed there as it expects.
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:devices]), (AXIS,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
        state = jax.tree.map(lambda x: jax.device_put(x[:devices], sharding), state)
    step = parallel_train_step(backbone=model, optimizer=optimizer, objective=objective, donate=False)
    rng = np.random.default_rng(0)
    images = {"image": rng.integers(0, 256, (devices, batch // devices, *spec.image_shape), np.uint8),
              "label": rng.integers(0, spec.num_classes, (devices, batch // devices), np.int32)}
    return step, (state, images)


def backbone_grad(model: nn.Module, *, train: bool = True, kernel_grads: bool = True,
                  forward_only: bool = False) -> Callable:
    """(params, batch_stats, x[N, H, W, C]) -> value_and_grad of sum(features[N, D])
    with respect to params, the loss's aux being the updated batch statistics (in
    train mode). kernel_grads=False: no gradients for the convolution kernels;
    forward_only=True: the loss and aux alone."""

    def loss(params, batch_stats, x):
        if not kernel_grads:
            params = jax.tree_util.tree_map_with_path(
                lambda path, p: jax.lax.stop_gradient(p) if path[-1].key == "kernel" else p, params
            )
        features, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=train, mutable=["batch_stats"]
        )
        return features.sum(), updates

    return loss if forward_only else jax.value_and_grad(loss, has_aux=True)


def backbone_step(model: nn.Module, x: jax.Array, *, seed: int = 0, **options) -> tuple[Callable, tuple]:
    """`backbone_grad(model, **options)` and its arguments: the backbone's variables
    (eval-mode init with key `seed`) and the images x[N, H, W, C]."""
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(seed), x[:2])
    return backbone_grad(model, **options), (variables["params"], variables["batch_stats"], x)


def head_grad(factored: bool = True) -> Callable:
    """(z[K, M, D], head variables, key) -> value_and_grad of `rr_jax.relational_loss`
    with respect to z and the head's params, the aux being the head's batch statistics."""

    def loss(z, params, batch_stats, key):
        value, _, stats = rr_jax.relational_loss(z, {"params": params, "batch_stats": batch_stats}, key,
                                                 factored=factored)
        return value, stats

    def step(z, variables, key):
        grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
        return grad(z, variables["params"], variables["batch_stats"], key)

    return step


def feature_size(backbone: str, image_shape: tuple[int, int, int]) -> int:
    """D, the feature size of the backbone called `backbone` on images [H, W, C]."""
    model = create_backbone(backbone)
    images = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images)
    return feature_dim(model, variables, image_shape)
