"""The experiment configuration: defaults every config file starts from, and validation.

Config files under configs/ call `base_config()` and override a few fields. The whole
config is checked by `validate_config` before anything is compiled, so that a typo
fails in a second with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import os

import jax
import ml_collections
from ml_collections import config_dict

from rr_jax.backbones import BACKBONES
from rr_jax.data import DATASETS
from rr_jax.relational import AGGREGATIONS, HEADS, LOSSES, NEGATIVES

METHODS = ("relational", "simclr", "supervised", "random")
OPTIMIZERS = ("adam", "sgd")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "cosine", "multistep")


def base_config() -> ml_collections.ConfigDict:
    """The paper's CIFAR-10 setup with resnet32; config files override what differs."""
    config = ml_collections.ConfigDict()
    config.dataset = "cifar10"
    config.data_dir = config_dict.placeholder(str)  # None: TFDS's default directory
    config.pretrain_split = config_dict.placeholder(str)  # None: the dataset's, e.g. 'train[:10%]'
    config.method = "relational"  # or the baselines 'simclr', 'supervised', 'random'
    config.seed = 0
    config.batch_size = 64  # global M: images per step over all devices
    config.num_epochs = 200
    config.max_steps = config_dict.placeholder(int)  # optional cap, for smoke runs
    config.log_every_steps = 50

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "resnet32"
    config.model.dtype = "float32"  # 'bfloat16': bf16 activations, f32 params and BN stats

    config.relational = ml_collections.ConfigDict()
    config.relational.num_views = 32  # K
    config.relational.aggregation = "cat"
    config.relational.negatives = "derangement"
    config.relational.loss = "focal"
    config.relational.global_negatives = False  # negatives across devices (all-gather)
    config.relational.hidden_dim = 256
    config.relational.head = "mlp"  # the relation head; ablations 'dot' and 'encoder_dot'

    config.augment = ml_collections.ConfigDict()
    config.augment.crop_scale = (0.08, 1.0)
    config.augment.crop_ratio = (3 / 4, 4 / 3)
    config.augment.flip_prob = 0.5
    config.augment.brightness = 0.8
    config.augment.contrast = 0.8
    config.augment.saturation = 0.8
    config.augment.hue = 0.2
    config.augment.jitter_prob = 0.8
    config.augment.grayscale_prob = 0.2

    config.simclr = ml_collections.ConfigDict()
    config.simclr.temperature = 0.5

    # Unset (None) fields take the method's defaults: Adam 1e-3 constant for the
    # self-supervised methods (the paper), SGD 0.1 momentum 0.9 with x0.1 at 50% and
    # 75% of training for 'supervised'.
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = config_dict.placeholder(str)  # 'adam' or 'sgd'
    config.optimizer.learning_rate = config_dict.placeholder(float)
    config.optimizer.schedule = config_dict.placeholder(str)  # 'constant', 'cosine', 'multistep'
    config.optimizer.momentum = 0.9  # SGD only
    config.optimizer.weight_decay = 0.0  # AdamW (decoupled) or SGD's L2 when > 0

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.max_to_keep = 3

    # Online monitoring: weighted kNN top-1 of the first num_test test images against the
    # first num_train pretraining images (labels used for monitoring only), written to
    # metrics.jsonl as 'knn_top1' every every_steps steps and at the end; 0 turns it off.
    config.knn_monitor = ml_collections.ConfigDict()
    config.knn_monitor.every_steps = 0
    config.knn_monitor.num_train = 5000
    config.knn_monitor.num_test = 1000
    config.knn_monitor.k = 20
    config.knn_monitor.temperature = 0.07

    config.probe = ml_collections.ConfigDict()
    config.probe.enabled = True  # launch.py runs the linear probe after pretraining
    config.probe.epochs = 100
    return config


def _fail(key: str, value, allowed: str) -> None:
    raise ValueError(f"config.{key}={value!r} is not allowed: {allowed}.")


def _choice(config: ml_collections.ConfigDict, key: str, allowed) -> None:
    value = config
    for part in key.split("."):
        value = value[part]
    if value not in allowed:
        _fail(key, value, "use one of " + ", ".join(map(repr, allowed)))


def validate_config(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    device_count: int | None = None,
) -> None:
    """Raises ValueError on the first bad field, naming it, its value and what is allowed.

    Args:
      config: a config built from `base_config()`.
      workdir: checked to be creatable and writable, if given.
      device_count: devices the global batch is split over (default: all devices).
    """
    _choice(config, "dataset", sorted(DATASETS))
    _choice(config, "method", METHODS)
    _choice(config, "model.backbone", sorted(BACKBONES))
    _choice(config, "model.dtype", DTYPES)
    _choice(config, "relational.aggregation", AGGREGATIONS)
    _choice(config, "relational.negatives", NEGATIVES)
    _choice(config, "relational.loss", LOSSES)
    _choice(config, "relational.head", HEADS)
    for key, allowed in (("optimizer.name", OPTIMIZERS), ("optimizer.schedule", SCHEDULES)):
        if config.optimizer[key.split(".")[1]] is not None:
            _choice(config, key, allowed)
    if config.relational.num_views < 2:
        _fail("relational.num_views", config.relational.num_views, "K must be >= 2 views to form pairs")
    for key in ("num_epochs", "batch_size", "checkpoint.every_steps", "checkpoint.max_to_keep",
                "log_every_steps", "relational.hidden_dim", "probe.epochs",
                "knn_monitor.num_train", "knn_monitor.num_test", "knn_monitor.k"):
        value = config
        for part in key.split("."):
            value = value[part]
        if not isinstance(value, int) or value < 1:
            _fail(key, value, "it must be a positive integer")
    if config.max_steps is not None and config.max_steps < 1:
        _fail("max_steps", config.max_steps, "it must be a positive integer or None (no cap)")
    if config.optimizer.learning_rate is not None and config.optimizer.learning_rate <= 0:
        _fail("optimizer.learning_rate", config.optimizer.learning_rate, "it must be > 0 or None (the method's default)")
    every = config.knn_monitor.every_steps
    if not isinstance(every, int) or every < 0:
        _fail("knn_monitor.every_steps", every, "it must be an integer >= 0 (0: off)")
    if config.knn_monitor.k > config.knn_monitor.num_train:
        _fail("knn_monitor.k", config.knn_monitor.k,
              f"it must be <= knn_monitor.num_train={config.knn_monitor.num_train}")
    if config.knn_monitor.temperature <= 0:
        _fail("knn_monitor.temperature", config.knn_monitor.temperature, "it must be > 0")
    if config.simclr.temperature <= 0:
        _fail("simclr.temperature", config.simclr.temperature, "it must be > 0")
    if config.optimizer.weight_decay < 0:
        _fail("optimizer.weight_decay", config.optimizer.weight_decay, "it must be >= 0")
    devices = jax.device_count() if device_count is None else device_count
    if config.batch_size % devices:
        _fail("batch_size", config.batch_size,
              f"the global batch must be divisible by the device count {devices}")
    if config.batch_size // devices < 2:
        _fail("batch_size", config.batch_size,
              f"each of the {devices} devices needs >= 2 images to form negatives")
    if workdir is not None:
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as error:
            raise ValueError(f"--workdir={workdir!r} cannot be created: {error}.") from error
        if not os.access(workdir, os.W_OK):
            raise ValueError(f"--workdir={workdir!r} is not writable.")
