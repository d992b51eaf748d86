"""The experiment configuration: defaults every config file starts from, and validation.

Config files under configs/ call `base_config()` and override a few fields. The whole
config is checked by `validate_config` before anything is compiled, so that a typo
fails in a second with a message naming the key, the value and what is allowed.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import jax
import ml_collections
from ml_collections import config_dict

from rr_jax import datasets, image_folder
from rr_jax.augment import AugmentConfig
from rr_jax.backbones import BACKBONES
from rr_jax.datasets import DATASETS
from rr_jax.errors import ConfigError
from rr_jax.objectives import OBJECTIVES, check_config_choice, config_error, get_objective

# How a split is read (config.data.streaming; rr_jax.inputs): by size, streamed, or held in memory.
STREAMING = ("auto", "stream", "memory")

OPTIMIZERS = ("adam", "sgd", "lars")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("constant", "cosine", "multistep")


def base_config() -> ml_collections.ConfigDict:
    """The paper's CIFAR-10 setup with resnet32; config files override what differs."""
    config = ml_collections.ConfigDict()
    config.dataset = "cifar10"
    config.data_dir = config_dict.placeholder(str)  # None: TFDS's default directory
    config.pretrain_split = config_dict.placeholder(str)  # None: the dataset's, e.g. 'train[:10%]'
    # Image-folder datasets (tiny_imagenet, slimagenet64, image_folder): the tree's root.
    config.image_folder = config_dict.placeholder(str)

    # Input pipeline (rr_jax.inputs): 'memory' loads the split into every process, 'stream'
    # reads each process's slice of every batch with Grain, 'auto' streams splits larger
    # than in_memory_limit_mib that can be read by random access.
    config.data = ml_collections.ConfigDict()
    config.data.streaming = "auto"
    config.data.in_memory_limit_mib = 1024
    config.data.image_size = config_dict.placeholder(int)  # square side; None: the dataset's
    config.data.mean = config_dict.placeholder(tuple)  # per channel in [0, 1]; None: the dataset's
    config.data.std = config_dict.placeholder(tuple)
    config.data.read_threads = 4  # host threads reading and decoding (streaming, image folders)
    config.data.prefetch_steps = 8  # streamed batches kept ready ahead of the step
    config.method = "relational"  # a name of rr_jax.objectives.OBJECTIVES
    config.seed = 0
    config.batch_size = 64  # global M: images per step over all devices
    config.num_epochs = 200
    config.max_steps = config_dict.placeholder(int)  # optional cap, for smoke runs
    config.log_every_steps = 50

    config.model = ml_collections.ConfigDict()
    config.model.backbone = "resnet32"
    config.model.dtype = "float32"  # 'bfloat16': bf16 activations, f32 params and BN stats

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

    # Each method's own fields: config.relational, config.simclr, config.deepinfomax, ...
    for name, objective in OBJECTIVES.items():
        if (fields := objective.config_defaults()) is not None:
            config[name] = fields

    # Unset (None) fields take the method's defaults (Objective.optimizer): Adam 1e-3
    # constant for most self-supervised methods (the paper), 1e-4 for 'deepinfomax',
    # SGD 0.1 momentum 0.9 with x0.1 at 50% and 75% of training for 'supervised'.
    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = config_dict.placeholder(str)  # 'adam', 'sgd' or 'lars'
    config.optimizer.learning_rate = config_dict.placeholder(float)
    config.optimizer.schedule = config_dict.placeholder(str)  # 'constant', 'cosine', 'multistep'
    config.optimizer.momentum = 0.9  # SGD and LARS
    config.optimizer.weight_decay = 0.0  # AdamW (decoupled), SGD's or LARS's L2 when > 0

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.every_steps = 1000
    config.checkpoint.max_to_keep = 3

    # Online monitoring: weighted kNN top-1 of the first num_test test images against the
    # first num_train images of the labelled train split (labels used for monitoring only), written to
    # metrics.jsonl as 'knn_top1' every every_steps steps and at the end; 0 turns it off.
    config.knn_monitor = ml_collections.ConfigDict()
    config.knn_monitor.every_steps = 0
    config.knn_monitor.num_train = 5000
    config.knn_monitor.num_test = 1000
    config.knn_monitor.k = 20
    config.knn_monitor.temperature = 0.07

    # Online linear probe: a linear classifier trained inside every pretraining step on
    # stop-gradient eval-mode features of the batch's images and labels (of the labelled
    # train split, batched alongside, when the pretraining split has no labels); its top-1
    # on the first num_test test images goes to metrics.jsonl as 'online_probe_top1' every
    # every_steps steps and at the end; 0 turns it off.
    config.online_probe = ml_collections.ConfigDict()
    config.online_probe.every_steps = 0
    config.online_probe.num_test = 10000
    config.online_probe.learning_rate = 0.1  # Adam, cosine-decayed to 0 over the run; see RESULTS.md

    config.probe = ml_collections.ConfigDict()
    config.probe.enabled = True  # launch.py runs the linear probe after pretraining
    config.probe.epochs = 100
    # An image folder without a test split: this fraction of its train split (class-balanced,
    # drawn with holdout_seed) is the probe's test split, and pretraining never sees it.
    # 0: no hold-out (the probe and the monitors then need a test split).
    config.probe.holdout_fraction = 0.1
    config.probe.holdout_seed = 0
    return config


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, as `--config=PATH` gives it. The folder holding
    the file's folder is importable meanwhile: configs/x.py may import configs.y."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    spec = importlib.util.spec_from_file_location("config_file", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, root)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    return module.get_config()


def _fail(key: str, value, allowed: str) -> None:
    raise config_error(key, value, allowed)


def validate_config(
    config: ml_collections.ConfigDict,
    workdir: str | None = None,
    *,
    device_count: int | None = None,
) -> None:
    """Raises ConfigError (a ValueError) on the first bad field, naming it, its value
    and what is allowed. Only checks: it reads no data and creates nothing.

    Args:
      config: a config built from `base_config()`.
      workdir: checked to be creatable and writable, if given.
      device_count: devices the global batch is split over (default: all devices).
    """
    check_config_choice("dataset", config.dataset, sorted(DATASETS))
    objective = get_objective(config.method)
    check_config_choice("model.backbone", config.model.backbone, sorted(BACKBONES))
    check_config_choice("model.dtype", config.model.dtype, DTYPES)
    for key, allowed in (("optimizer.name", OPTIMIZERS), ("optimizer.schedule", SCHEDULES)):
        if config[key] is not None:
            check_config_choice(key, config[key], allowed)
    for key in ("num_epochs", "batch_size", "checkpoint.every_steps", "checkpoint.max_to_keep",
                "log_every_steps", "probe.epochs",
                "knn_monitor.num_train", "knn_monitor.num_test", "knn_monitor.k", "online_probe.num_test",
                "data.in_memory_limit_mib", "data.read_threads", "data.prefetch_steps"):
        value = config[key]
        if not isinstance(value, int) or value < 1:
            _fail(key, value, "it must be a positive integer")
    check_config_choice("data.streaming", config.data.streaming, STREAMING)
    if config.data.image_size is not None and config.data.image_size < 1:
        _fail("data.image_size", config.data.image_size, "it must be a positive integer or None (the dataset's)")
    layout = next(iter(DATASETS[config.dataset].values())).folder_layout
    if layout is not None and not config.image_folder:
        _fail("image_folder", config.image_folder,
              f"dataset {config.dataset!r} is read from an image folder. " + image_folder.how_to_get(layout))
    if layout is None and config.image_folder:
        _fail("image_folder", config.image_folder, f"dataset {config.dataset!r} is not an image folder; leave it None")
    if config.max_steps is not None and config.max_steps < 1:
        _fail("max_steps", config.max_steps, "it must be a positive integer or None (no cap)")
    if config.optimizer.learning_rate is not None and config.optimizer.learning_rate <= 0:
        _fail("optimizer.learning_rate", config.optimizer.learning_rate, "it must be > 0 or None (the method's default)")
    for key in ("knn_monitor.every_steps", "online_probe.every_steps"):
        every = config[key]
        if not isinstance(every, int) or every < 0:
            _fail(key, every, "it must be an integer >= 0 (0: off)")
    if not config.online_probe.learning_rate > 0:
        _fail("online_probe.learning_rate", config.online_probe.learning_rate, "it must be > 0")
    if config.knn_monitor.k > config.knn_monitor.num_train:
        _fail("knn_monitor.k", config.knn_monitor.k,
              f"it must be <= knn_monitor.num_train={config.knn_monitor.num_train}")
    if config.knn_monitor.temperature <= 0:
        _fail("knn_monitor.temperature", config.knn_monitor.temperature, "it must be > 0")
    objective.validate(config)
    if config.optimizer.weight_decay < 0:
        _fail("optimizer.weight_decay", config.optimizer.weight_decay, "it must be >= 0")
    devices = jax.device_count() if device_count is None else device_count
    if config.batch_size % devices:
        _fail("batch_size", config.batch_size,
              f"the global batch must be divisible by the device count {devices}")
    if config.batch_size // devices < objective.min_images_per_device:
        _fail("batch_size", config.batch_size,
              f"each of the {devices} devices needs >= {objective.min_images_per_device} images for "
              f"{config.method}'s loss (negatives or batch statistics)")
    for key in ("seed", "probe.holdout_seed"):
        value = config[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            _fail(key, value, "it must be an integer >= 0")
    if not 0 <= config.probe.holdout_fraction < 1:
        _fail("probe.holdout_fraction", config.probe.holdout_fraction,
              "it must be in [0, 1): the fraction of the train split held out as the test split (0: none)")
    if not 0 <= config.optimizer.momentum < 1:
        _fail("optimizer.momentum", config.optimizer.momentum, "it must be in [0, 1)")
    try:
        AugmentConfig(**config.augment.to_dict())
    except (ValueError, TypeError) as error:
        raise ConfigError(f"config.augment is not allowed: {error}") from None
    split = config.pretrain_split or next(iter(DATASETS[config.dataset].values())).pretrain_split
    if objective.needs_labels and not datasets.has_labels(split):
        _fail("method", config.method,
              f"it trains on labels, and the pretraining split {split!r} has none; "
              "set config.pretrain_split to a labelled split (e.g. 'train')")
    if workdir is not None:
        _check_workdir(workdir)


def _check_workdir(workdir: str) -> None:
    """The workdir is a writable directory, or can be created as one."""
    path = os.path.abspath(workdir)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ConfigError(f"--workdir={workdir!r} exists and is not a directory.")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"--workdir={workdir!r} is not writable.")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir!r} cannot be created: {parent!r} is not a writable directory.")
