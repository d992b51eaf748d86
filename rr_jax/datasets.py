"""Datasets by name: their splits, label spaces and statistics (`DatasetSpec`, `DATASETS`).

Pure descriptions: nothing here reads data, so the objectives and the step can name a
dataset's shape and statistics without TensorFlow. `rr_jax.prepare` makes a dataset
ready to read, `rr_jax.sources` reads it, `rr_jax.batching` orders and batches it.

Hold-out test splits: an image folder without a test split gets one from its train
split (`Holdout`): a class-balanced, seeded fraction of it is read as `HELD_OUT_SPLIT`,
and every other read of the train split (pretraining, the probe's training, monitors)
leaves those images out.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Mapping
from typing import Any

import numpy as np

from rr_jax import image_folder
from rr_jax.errors import ConfigError

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# Datasets that `rr_jax.prepare` can prepare from their original files without network access.
OFFLINE_DATASETS = frozenset({"fashion_mnist"})


HELD_OUT_SPLIT = "heldout"


def label_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset: each class keeps `fraction` of its examples
    (rounded, at least one), drawn without replacement with NumPy's generator `seed`.

    A pure function of (labels, fraction, seed). Returns sorted int64 indices into
    `labels` (int[N]); a balanced set gives equal counts.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], e.g. 0.01, 0.1, 0.25, 0.5 or 1.0; got {fraction!r}.")
    rng = np.random.default_rng(seed)
    picks = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = max(1, round(fraction * len(members)))
        picks.append(rng.choice(members, count, replace=False))
    return np.sort(np.concatenate(picks))


@dataclasses.dataclass(frozen=True)
class Holdout:
    """The test split of a dataset that has none: `fraction` of its train split,
    class-balanced and drawn with `seed` (`label_subset` of the train split's labels,
    so every process and every later probe computes the same images)."""

    fraction: float
    seed: int

    def __post_init__(self):
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"Holdout.fraction must be in (0, 1), got {self.fraction!r}.")

    def held_out(self, labels: np.ndarray) -> np.ndarray:
        """Sorted indices of the held-out examples of a train split with `labels` int[N]."""
        return label_subset(labels, self.fraction, self.seed)

    def describe(self) -> str:
        return f"held out {100 * self.fraction:g}% of train (class-balanced, seed {self.seed})"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What the pipeline needs to know about one TFDS image-classification dataset.

    Attributes:
      tfds_name: TFDS builder name, e.g. "cifar10".
      image_shape: (H, W, C) of the stored uint8 images (TFDS feature "image").
      num_classes: number of classes of the label space in `label_key`.
      mean: per-channel mean, in [0, 1] units (pixel / 255), length C.
      std: per-channel standard deviation, in [0, 1] units, length C.
      pretrain_split: TFDS split for self-supervised pretraining (labels unused).
      train_split: TFDS split the linear probe trains on.
      test_split: TFDS split the linear probe is evaluated on.
      label_key: TFDS feature holding the labels, e.g. "label" or "coarse_label".
      offline_dir: directory with the dataset's original distribution files, used to
        prepare the TFDS dataset without network access (Fashion-MNIST only: the four
        idx .gz files). None: download only.
      folder_layout: for image-folder datasets, one of `image_folder.LAYOUTS`; the
        dataset is then read from `image_folder`, not from TFDS (`tfds_name` only names it).
      image_folder: the root of the image-folder tree (set by the config).
      holdout: for an image folder without a test split, the part of `train_split`
        read as the test split, `test_split` = HELD_OUT_SPLIT (see `Holdout`); reads
        of `train_split` leave it out. None: the dataset's own test split.

    Images whose stored size differs from `image_shape` (variable-size TFDS images such as
    imagenet2012's, image folders) are resized on the host (`image_folder.fit_image`).
    """

    tfds_name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pretrain_split: str
    train_split: str
    test_split: str
    label_key: str = "label"
    offline_dir: str | None = None
    folder_layout: str | None = None
    image_folder: str | None = None
    holdout: Holdout | None = None

    def __post_init__(self):
        # Configs hand over lists; store tuples so that the spec stays immutable.
        for name in ("image_shape", "mean", "std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        shape = self.image_shape
        if len(shape) != 3 or not all(isinstance(d, int) and d > 0 for d in shape):
            raise ValueError(f"image_shape must be (H, W, C) positive ints, got {shape!r}.")
        if not (isinstance(self.num_classes, int) and self.num_classes >= 1):
            raise ValueError(f"num_classes must be an int >= 1, got {self.num_classes!r}.")
        channels = shape[2]
        if len(self.mean) != channels or not all(0.0 <= m <= 1.0 for m in self.mean):
            raise ValueError(
                f"mean must hold {channels} values in [0, 1], one per channel of "
                f"image_shape={shape}; got {self.mean!r}."
            )
        if len(self.std) != channels or not all(s > 0.0 for s in self.std):
            raise ValueError(
                f"std must hold {channels} positive values, one per channel of "
                f"image_shape={shape}; got {self.std!r}."
            )
        for name in ("tfds_name", "pretrain_split", "train_split", "test_split", "label_key"):
            value = getattr(self, name)
            if not (isinstance(value, str) and value):
                raise ValueError(f"{name} must be a non-empty string, got {value!r}.")
        if self.offline_dir is not None and self.tfds_name not in OFFLINE_DATASETS:
            raise ValueError(
                f"offline_dir is supported for {sorted(OFFLINE_DATASETS)} only, not for "
                f"tfds_name={self.tfds_name!r}; leave it None."
            )
        if self.folder_layout is not None and self.folder_layout not in image_folder.LAYOUTS:
            raise ValueError(
                f"folder_layout must be one of {list(image_folder.LAYOUTS)} or None, got {self.folder_layout!r}."
            )
        if self.holdout is not None and (self.folder_layout is None or self.test_split != HELD_OUT_SPLIT):
            raise ValueError(
                f"A holdout needs an image folder (folder_layout) and test_split={HELD_OUT_SPLIT!r}; got "
                f"folder_layout={self.folder_layout!r}, test_split={self.test_split!r}."
            )

    def describe_split(self, split: str) -> str:
        """How `split` is made, for logs and results: its name, or where it is held out."""
        if self.holdout is not None and split == self.test_split:
            return self.holdout.describe()
        if self.holdout is not None and split == self.train_split:
            return f"{split} without the {100 * self.holdout.fraction:g}% held out as the test split"
        return split


def get_dataset_spec(name: str, label_space: str | None = None, **overrides: Any) -> DatasetSpec:
    """The spec of a known dataset (see `DATASETS`), optionally with fields replaced.

    For an image-folder dataset with `image_folder=PATH` among the overrides, the number
    of classes is that of the tree (a warning is logged where it differs from the
    published one).

    Args:
      name: a key of `DATASETS`, e.g. "cifar10", "tiny_imagenet", "imagenet2012".
        For another TFDS dataset construct a `DatasetSpec` with its statistics.
      label_space: a key of `DATASETS[name]`, e.g. "coarse" for the 20 CIFAR-100
        superclasses; None: the dataset's first (default) label space.
      **overrides: `DatasetSpec` fields to replace, e.g. `offline_dir=None`.
    """
    if name not in DATASETS:
        raise ConfigError(
            f"Unknown dataset {name!r}; known: {sorted(DATASETS)}. For another TFDS "
            "image-classification dataset construct a DatasetSpec with its statistics."
        )
    spaces = DATASETS[name]
    if label_space is None:
        label_space = next(iter(spaces))
    if label_space not in spaces:
        raise ConfigError(
            f"Unknown label space {label_space!r} for dataset {name!r}; valid: {list(spaces)}."
        )
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"Unknown DatasetSpec fields {unknown}; valid: {sorted(fields)}.")
    spec = dataclasses.replace(spaces[label_space], **overrides)
    if spec.folder_layout is not None and spec.image_folder is not None:
        names = image_folder.class_names(spec.image_folder, spec.folder_layout)
        spec = dataclasses.replace(spec, num_classes=len(names))
    return spec


# --------------------------------------------------------------------- registry

# Known datasets: name -> label space -> spec; the first label space is the default.
# CIFAR and STL-10 statistics are those of the official code (datamanager.py).
# Fashion-MNIST: mean and standard deviation of all 60000x28x28 training pixels / 255
# (0.28604, 0.35302).
_CIFAR100 = DatasetSpec(
    tfds_name="cifar100", image_shape=(32, 32, 3), num_classes=100,
    mean=(0.507, 0.487, 0.441), std=(0.267, 0.256, 0.276),
    pretrain_split="train", train_split="train", test_split="test",
)
DATASETS: Mapping[str, Mapping[str, DatasetSpec]] = types.MappingProxyType({
    "cifar10": {"label": DatasetSpec(
        tfds_name="cifar10", image_shape=(32, 32, 3), num_classes=10,
        mean=(0.491, 0.482, 0.447), std=(0.247, 0.243, 0.262),
        pretrain_split="train", train_split="train", test_split="test",
    )},
    "cifar100": {
        "fine": _CIFAR100,
        "coarse": dataclasses.replace(_CIFAR100, num_classes=20, label_key="coarse_label"),
    },
    "stl10": {"label": DatasetSpec(
        tfds_name="stl10", image_shape=(96, 96, 3), num_classes=10,
        mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        pretrain_split="unlabelled", train_split="train", test_split="test",
    )},
    "fashion_mnist": {"label": DatasetSpec(
        tfds_name="fashion_mnist", image_shape=(28, 28, 1), num_classes=10,
        mean=(0.2860,), std=(0.3530,),
        pretrain_split="train", train_split="train", test_split="test",
        offline_dir=DEBIAN_FASHION_MNIST_DIR,
    )},
    # Image folders (class count and names come from the tree, see `get_dataset_spec`);
    # the official code normalises tiny-ImageNet and SlimageNet64 with 0.5 / 0.25.
    "tiny_imagenet": {"label": DatasetSpec(
        tfds_name="tiny_imagenet", image_shape=(64, 64, 3), num_classes=200,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        pretrain_split="train", train_split="train", test_split="test", folder_layout="tiny_imagenet",
    )},
    "slimagenet64": {"label": DatasetSpec(
        tfds_name="slimagenet64", image_shape=(64, 64, 3), num_classes=1000,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        pretrain_split="train", train_split="train", test_split="test", folder_layout="slimagenet64",
    )},
    "image_folder": {"label": DatasetSpec(
        tfds_name="image_folder", image_shape=(64, 64, 3), num_classes=1,
        mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
        pretrain_split="train", train_split="train", test_split="test", folder_layout="class_folders",
    )},
    # Manual download (see `rr_jax.prepare.how_to_get`); variable-size images resized on the host.
    "imagenet2012": {"label": DatasetSpec(
        tfds_name="imagenet2012", image_shape=(224, 224, 3), num_classes=1000,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        pretrain_split="train", train_split="train", test_split="validation",
    )},
})


def has_labels(split: str) -> bool:
    """Whether a split carries labels: every split but TFDS STL-10's "unlabelled" (-1)."""
    return split.split("[")[0] != "unlabelled"
