"""Datasets: names, splits, label spaces, statistics, sources, per-host sharded batches.

Host-side work is decode (+ resize for variable-size images) and batch only;
augmentation and normalisation run on device.

Sources: TFDS datasets and image folders (`image_folder`). `load_split` loads a split
into memory as uint8 NumPy, every process the whole split (CIFAR-10/100 train
50000x32x32x3 = 147 MiB, STL-10 unlabelled 100000x96x96x3 = 2.6 GiB, Fashion-MNIST
train 60000x28x28x1 = 45 MiB); `record_source` opens it for random access instead
(TFDS ArrayRecord data sources, prepared image folders), which `streaming` reads batch by
batch, each process only its slice (`rr_jax.inputs` chooses per config).

Data order, one contract for both (`batch_indices`): epoch e is the permutation
`default_rng([seed, e])` of the examples; global batch b of epoch e is
`perm[b*M:(b+1)*M]` (the remainder of an epoch is dropped), and process p of P takes the
p-th contiguous slice of it. The order is thus a function of (seed, step) alone: P
processes together see exactly the global batches that one process sees, and a run
resumed at step s sees what an uninterrupted run saw from s, from either source.

Hold-out test splits: an image folder without a test split gets one from its train
split (`Holdout`): a class-balanced, seeded fraction of it is read as `HELD_OUT_SPLIT`,
and every other read of the train split (pretraining, the probe's training, monitors)
leaves those images out.

Offline Fashion-MNIST: when the TFDS dataset is not prepared and the original files are
in `DatasetSpec.offline_dir` (by default where Debian's package `dataset-fashion-mnist`
installs them), it is prepared from those files without network access.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import itertools
import os
import shutil
import tempfile
import types
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.jax_utils
import grain
import jax
import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from rr_jax import image_folder
from rr_jax.errors import DatasetError, DatasetNotFoundError

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_PROBE_TIMEOUT_S = 5.0
_READ_CHUNK = 2048


# --------------------------------------------------------------------------- specs

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
        if self.offline_dir is not None and self.tfds_name not in _OFFLINE_BUILDERS:
            raise ValueError(
                f"offline_dir is supported for {sorted(_OFFLINE_BUILDERS)} only, not for "
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
        raise ValueError(
            f"Unknown dataset {name!r}; known: {sorted(DATASETS)}. For another TFDS "
            "image-classification dataset construct a DatasetSpec with its statistics."
        )
    spaces = DATASETS[name]
    if label_space is None:
        label_space = next(iter(spaces))
    if label_space not in spaces:
        raise ValueError(
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


# ----------------------------------------------------------- offline Fashion-MNIST


def _gunzip(path: str, out_dir: str) -> str:
    out = os.path.join(out_dir, os.path.basename(path).removesuffix(".gz"))
    with gzip.open(path, "rb") as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _check_idx_header(path: str, magic: int, shape: tuple[int, ...]) -> None:
    """Raises ValueError unless `path` is an idx file of the given shape and size."""
    header = np.fromfile(path, dtype=">u4", count=1 + len(shape)).tolist()
    size = 4 * (1 + len(shape)) + int(np.prod(shape))
    if header != [magic, *shape] or os.path.getsize(path) != size:
        raise ValueError(
            f"{path} is not the expected idx file: header {header} and "
            f"{os.path.getsize(path)} bytes; expected magic {magic:#x}, shape {shape}, "
            f"{size} bytes."
        )


class _LocalFashionMNIST(tfds.image_classification.FashionMNIST, skip_registration=True):
    """TFDS's Fashion-MNIST builder reading the original files from a local directory.

    TFDS would download the files and verify its registered checksums; Debian's package
    recompressed the .gz archives, so those checksums do not match although the content
    is the same. Features, splits and parsing (`_generate_examples`) are TFDS's own, and
    the result is the regular `fashion_mnist` dataset that `tfds.load` reads.
    """

    name = "fashion_mnist"
    # split -> (images file, labels file, number of examples)
    FILES = {
        "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
        "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
    }

    @classmethod
    def has_files(cls, source_dir: str) -> bool:
        return all(
            os.path.isfile(os.path.join(source_dir, f))
            for images, labels, _ in cls.FILES.values()
            for f in (images, labels)
        )

    def __init__(self, *, source_dir: str, **kwargs: Any):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        generators = []
        for split, (images, labels, n) in self.FILES.items():
            # Plain gzip: TFDS's extractor is several times slower on these files.
            images, labels = (
                _gunzip(os.path.join(self._source_dir, f), dl_manager.download_dir)
                for f in (images, labels)
            )
            _check_idx_header(images, 0x803, (n, 28, 28))
            _check_idx_header(labels, 0x801, (n,))
            generators.append(tfds.core.SplitGenerator(
                name=split,
                gen_kwargs=dict(num_examples=n, data_path=images, label_path=labels),
            ))
        return generators

    def _generate_examples(self, **kwargs):
        # TFDS would PNG-encode each image in its own TF call; one TF graph over the
        # whole split halves the preparation time and writes byte-identical files.
        keys, examples = zip(*super()._generate_examples(**kwargs))
        pngs = _encode_pngs(np.stack([example["image"] for example in examples])).numpy()
        for key, example, png in zip(keys, examples, pngs):
            yield key, {**example, "image": png}


@tf.function(autograph=False)
def _encode_pngs(images: tf.Tensor) -> tf.Tensor:
    """uint8[N, H, W, C] -> PNG bytes[N], as tfds.features.Image encodes them."""
    return tf.map_fn(tf.image.encode_png, images, fn_output_signature=tf.string)


# tfds_name -> builder that prepares the dataset from `DatasetSpec.offline_dir`.
_OFFLINE_BUILDERS = {"fashion_mnist": _LocalFashionMNIST}


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
    # Manual download (see `_how_to_get`); variable-size images resized on the host.
    "imagenet2012": {"label": DatasetSpec(
        tfds_name="imagenet2012", image_shape=(224, 224, 3), num_classes=1000,
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
        pretrain_split="train", train_split="train", test_split="validation",
    )},
})


# ---------------------------------------------------------------------- loading


def _how_to_get(spec: DatasetSpec, data_dir: str) -> str:
    if spec.tfds_name == "imagenet2012":
        return (
            "imagenet2012 needs a manual download: get ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar from https://image-net.org/download-images.php and put them "
            f"in {os.path.join(data_dir, 'downloads', 'manual')}; the next run prepares them."
        )
    how = (
        f"Run once with network access (the dataset is then downloaded and prepared in "
        f"{data_dir}), or copy a prepared TFDS directory {spec.tfds_name}/<version> there."
    )
    if spec.tfds_name == "fashion_mnist":
        how += (
            " Or install the original files with `apt-get install dataset-fashion-mnist` "
            f"(they go to {DEBIAN_FASHION_MNIST_DIR}) or put them in offline_dir="
            f"{spec.offline_dir!r}."
        )
    return how


def _unreachable_hosts(builder: tfds.core.DatasetBuilder) -> list[str]:
    """Hosts of the builder's registered download URLs that do not answer quickly.

    TFDS retries a failing download for minutes; this probe fails in seconds.
    """
    origins = {
        "{0.scheme}://{0.netloc}".format(urllib.parse.urlsplit(url))
        for url in type(builder).url_infos or {}
    }
    unreachable = []
    for origin in sorted(origins):
        try:
            requests.head(origin, timeout=_PROBE_TIMEOUT_S)
        except requests.RequestException:
            unreachable.append(origin)
    return unreachable


def _prepare(
    spec: DatasetSpec,
    data_dir: str,
    make_builder: Callable[..., tfds.core.DatasetBuilder],
    download_config: tfds.download.DownloadConfig,
    file_format: str | None,
) -> None:
    """Prepares with `make_builder(data_dir=tmp)` in a temporary directory, then moves
    the finished dataset into `data_dir` with one rename; nothing is left on failure."""
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".incomplete-{spec.tfds_name}-", dir=data_dir)
    try:
        builder = make_builder(data_dir=tmp)
        builder.download_and_prepare(
            download_dir=os.path.join(tmp, "downloads"), download_config=download_config,
            file_format=file_format,
        )
        final = os.path.join(data_dir, os.path.relpath(builder.data_dir, tmp))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(builder.data_dir, final)
        except OSError:
            # Another process finished first; keep its copy.
            if not tfds.builder(spec.tfds_name, data_dir=data_dir).is_prepared():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _prepared_builder(
    spec: DatasetSpec, data_dir: str | None, download: bool, file_format: str | None = None
) -> tfds.core.DatasetBuilder:
    """A TFDS builder of `spec.tfds_name` whose data is prepared, preparing it if needed
    (in `file_format`, e.g. "array_record" for random access; None: TFDS's default)."""
    if spec.folder_layout is not None:
        raise ValueError(f"Dataset {spec.tfds_name!r} is an image folder, not a TFDS dataset.")
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    features = builder.info.features
    if file_format is None and "image" in features and None in features["image"].shape:
        file_format = "array_record"  # variable-size images are read by random access and resized
    root = os.fspath(builder.data_dir_root)
    offline, offline_builder = spec.offline_dir, _OFFLINE_BUILDERS.get(spec.tfds_name)
    manual_dir = os.path.join(root, "downloads", "manual")
    if offline and offline_builder.has_files(offline):
        _prepare(
            spec, root,
            lambda data_dir: offline_builder(source_dir=offline, data_dir=data_dir),
            tfds.download.DownloadConfig(try_download_gcs=False), file_format,
        )
        logging.info(
            "Prepared TFDS dataset %s in %s from the local files in %s (no download).",
            spec.tfds_name, root, offline,
        )
    elif builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not (os.path.isdir(manual_dir) and os.listdir(manual_dir)):
        raise DatasetNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {root}. " + _how_to_get(spec, root)
        )
    elif not download:
        raise DatasetNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {root} and download=False. "
            + _how_to_get(spec, root)
        )
    elif not builder.MANUAL_DOWNLOAD_INSTRUCTIONS and (unreachable := _unreachable_hosts(builder)):
        raise DatasetNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {root} and cannot be "
            f"downloaded: no answer from {unreachable}. " + _how_to_get(spec, root)
        )
    else:
        _prepare(
            spec, root,
            lambda data_dir: tfds.builder(spec.tfds_name, data_dir=data_dir),
            tfds.download.DownloadConfig(manual_dir=manual_dir), file_format,
        )
        logging.info("Prepared TFDS dataset %s in %s (%s).", spec.tfds_name, root, file_format or "tfrecord")
    return tfds.builder(spec.tfds_name, data_dir=root)


def _checked_builder(
    spec: DatasetSpec, data_dir: str | None, download: bool, file_format: str | None = None
) -> tfds.core.DatasetBuilder:
    """`_prepared_builder`, after checking that its features match `spec`."""
    builder = _prepared_builder(spec, data_dir, download, file_format)
    features = builder.info.features
    if "image" not in features or spec.label_key not in features:
        raise ValueError(
            f"TFDS dataset {spec.tfds_name!r} needs features 'image' and "
            f"{spec.label_key!r} (label_key); it has {sorted(features.keys())}."
        )
    image, label = features["image"], features[spec.label_key]
    stored = tuple(image.shape)
    resizable = stored[2] == spec.image_shape[2] and None in stored[:2]
    if (stored != spec.image_shape and not resizable) or image.np_dtype != np.uint8:
        raise ValueError(
            f"TFDS dataset {spec.tfds_name!r} stores {image.np_dtype} images of shape "
            f"{image.shape}; spec.image_shape={spec.image_shape} (or variable height and width "
            "with its channels) and uint8 are required."
        )
    if getattr(label, "num_classes", None) != spec.num_classes:
        raise ValueError(
            f"TFDS feature {spec.tfds_name}/{spec.label_key} has "
            f"{getattr(label, 'num_classes', None)} classes; spec.num_classes="
            f"{spec.num_classes}."
        )
    return builder


def _folder_split(spec: DatasetSpec, split: str, data_dir: str | None) -> image_folder.PreparedSplit:
    if not spec.image_folder:
        raise ValueError(
            f"Dataset {spec.tfds_name!r} is read from an image folder; set image_folder "
            f"(--config.image_folder=PATH). " + image_folder.how_to_get(spec.folder_layout)
        )
    return image_folder.prepare_split(spec.image_folder, spec.folder_layout, split, data_dir or tfds.core.constants.DATA_DIR)


def _folder_records(
    spec: DatasetSpec, split: str, data_dir: str | None
) -> tuple[image_folder.PreparedSplit, np.ndarray | None]:
    """The prepared split that `split` is read from, and which of its records (None:
    all): with a holdout, HELD_OUT_SPLIT is the held-out records of the train split and
    the train split the others."""
    if spec.holdout is None or split not in (HELD_OUT_SPLIT, spec.train_split):
        return _folder_split(spec, split, data_dir), None
    prepared = _folder_split(spec, spec.train_split, data_dir)
    held_out = spec.holdout.held_out(prepared.labels)
    if split == HELD_OUT_SPLIT:
        return prepared, held_out
    return prepared, np.setdiff1d(np.arange(prepared.num_examples), held_out)


class _Subset(Sequence):
    """Records `indices` of a random-access source, as a source of len(indices)."""

    def __init__(self, source: Sequence[dict[str, np.ndarray]], indices: np.ndarray):
        self._source, self._indices = source, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._source[int(self._indices[index])]


def class_names(spec: DatasetSpec, data_dir: str | None = None) -> list[str]:
    """The names of the classes of `spec.label_key`, in label order (prepares the
    dataset if needed, like `load_split`)."""
    if spec.folder_layout is not None:
        return list(_folder_split(spec, spec.train_split, data_dir).class_names)
    return list(_prepared_builder(spec, data_dir, True).info.features[spec.label_key].names)


def supports_random_access(spec: DatasetSpec, data_dir: str | None = None) -> bool:
    """Whether `record_source` can read the dataset as prepared now: image folders
    always, TFDS datasets when prepared as ArrayRecord (or not prepared yet)."""
    if spec.folder_layout is not None:
        return True
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    return not builder.is_prepared() or builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def has_labels(split: str) -> bool:
    """Whether a split carries labels: every split but TFDS STL-10's "unlabelled" (-1)."""
    return split.split("[")[0] != "unlabelled"


def split_size(spec: DatasetSpec, split: str, data_dir: str | None = None, *, download: bool = True) -> int:
    """Number of examples of a split (e.g. "train[:10%]"), from metadata; prepares the
    dataset if needed but reads no images."""
    if spec.folder_layout is not None:
        prepared, indices = _folder_records(spec, split, data_dir)
        return prepared.num_examples if indices is None else len(indices)
    builder = _prepared_builder(spec, data_dir, download)
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        return len(builder.as_data_source(split))
    return int(builder.as_dataset(split=split, shuffle_files=False).cardinality())


class _TfdsRecords:
    """A TFDS random-access data source as {"image": uint8[H, W, C] of the spec's shape,
    "label": int32} records (variable-size images resized on the calling thread)."""

    def __init__(self, source: Any, spec: DatasetSpec):
        self._source, self._spec = source, spec

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        example = self._source[index]
        return {"image": image_folder.fit_image(example["image"], self._spec.image_shape),
                "label": np.int32(example[self._spec.label_key])}


def record_source(
    spec: DatasetSpec, split: str, data_dir: str | None = None, *, download: bool = True
) -> Sequence[dict[str, np.ndarray]]:
    """Random access to one split without loading it: `len(source)` examples,
    `source[i]` -> {"image": uint8[H, W, C] (spec.image_shape), "label": int32}, decoded
    (and resized where needed) on the calling thread; safe to call from several threads.

    TFDS datasets are read with `tfds.data_source` from ArrayRecord files (a dataset not
    yet prepared is prepared in that format); image folders from the ArrayRecord file
    `image_folder.prepare_split` writes once.

    Raises:
      FileNotFoundError: the data is missing; the message says what to download and where.
      ValueError: the dataset does not match `spec`, or it is prepared in another format.
    """
    if spec.folder_layout is not None:
        prepared, indices = _folder_records(spec, split, data_dir)
        source = image_folder.FolderSource(prepared, spec.image_shape)
        if indices is not None:
            source = _Subset(source, indices)
        where = f"{spec.image_folder} ({spec.describe_split(split)})" if indices is not None else spec.image_folder
    else:
        builder = _checked_builder(spec, data_dir, download, "array_record")
        if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
            raise ValueError(
                f"TFDS dataset {spec.tfds_name!r} in {builder.data_dir} is prepared as "
                f"{builder.info.file_format.value}; streaming reads ArrayRecord files. Prepare it with "
                f"`tfds build {spec.tfds_name} --file_format=array_record --data_dir=DIR` into another "
                "data_dir, or load it into memory (config.data.streaming='memory')."
            )
        source = _TfdsRecords(builder.as_data_source(split), spec)
        where = builder.data_dir
    logging.info("Opened %s split %r for random access: %d examples of shape %s from %s.",
                 spec.tfds_name, split, len(source), spec.image_shape, where)
    return source


def _read_all(source: Sequence[dict[str, np.ndarray]], shape: tuple[int, ...], threads: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(source), *shape), np.uint8)
    labels = np.empty((len(source),), np.int32)
    records = grain.MapDataset.source(source).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=4 * threads))
    for i, record in enumerate(records):
        images[i], labels[i] = record["image"], record["label"]
    return images, labels


def load_split(
    spec: DatasetSpec, split: str, data_dir: str | None = None, *, download: bool = True,
    read_threads: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one split into memory, preparing the dataset first if needed.

    Args:
      spec: the dataset (see `get_dataset_spec`).
      split: a split, e.g. `spec.pretrain_split`, "train" or (TFDS) "train[:10%]".
      data_dir: TFDS data directory (also where image folders are prepared); None:
        TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
      download: whether an unprepared dataset may be downloaded. Local files in
        `spec.offline_dir` are used first either way.
      read_threads: threads decoding records read by random access (image folders,
        datasets prepared as ArrayRecord, variable-size images).

    Returns:
      images uint8[N, H, W, C] and labels int32[N] (the `spec.label_key` feature; -1
      for STL-10's "unlabelled" split), in the split's order (`record_source`'s).

    Raises:
      DatasetError: the prepared TFDS files are damaged; the message names the directory.
      DatasetNotFoundError (a FileNotFoundError): the dataset is not prepared and cannot
        be obtained; the message says how to get it.
      ValueError: the dataset does not match `spec`.
    """
    builder = None if spec.folder_layout is not None else _checked_builder(spec, data_dir, download)
    if builder is None or (builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
                           or tuple(builder.info.features["image"].shape) != spec.image_shape):
        images, labels = _read_all(record_source(spec, split, data_dir, download=download), spec.image_shape, read_threads)
        where = spec.image_folder if builder is None else builder.data_dir
    else:
        ds = builder.as_dataset(split=split, shuffle_files=False)
        n = int(ds.cardinality())
        ds = ds.map(lambda ex: (ex["image"], ex[spec.label_key])).batch(_READ_CHUNK)
        images = np.empty((n, *spec.image_shape), np.uint8)
        labels = np.empty((n,), np.int32)
        start = 0
        try:
            for x, y in tfds.as_numpy(ds):
                images[start : start + len(x)], labels[start : start + len(x)] = x, y
                start += len(x)
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as error:
            raise DatasetError(
                f"TFDS dataset {spec.tfds_name!r} in {builder.data_dir} is damaged: reading split "
                f"{split!r} failed with {type(error).__name__}: {error.message.splitlines()[0]} "
                f"Delete {builder.data_dir} and run again to prepare it anew. "
                + _how_to_get(spec, os.fspath(builder.data_dir_root))
            ) from None
        where = builder.data_dir
    logging.info(
        "Loaded %s split %r: %d examples of shape %s (%.1f MiB) from %s.",
        spec.tfds_name, split, len(images), spec.image_shape, images.nbytes / 2**20, where,
    )
    return images, labels


# -------------------------------------------------------------------- batching


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Number of full global batches in one epoch (the remainder is dropped)."""
    if global_batch_size < 1 or global_batch_size > num_examples:
        raise ValueError(
            f"global_batch_size must be in [1, num_examples={num_examples}], "
            f"got {global_batch_size}."
        )
    return num_examples // global_batch_size


def _check_split(images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"Expected images [N, H, W, C] and labels [N], got shapes {images.shape} "
            f"and {labels.shape}."
        )


def local_batch_size(
    batch_size: int, process_index: int, process_count: int, local_device_count: int
) -> int:
    """Examples per process of a global batch (M / P), checking the layout arguments."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, process_count={process_count}), got {process_index}."
        )
    if local_device_count < 1 or batch_size % (process_count * local_device_count):
        raise ValueError(
            f"Batch size {batch_size} must be divisible by process_count * "
            f"local_device_count = {process_count} * {local_device_count}."
        )
    return batch_size // process_count


def check_order(seed: int, start_step: int) -> None:
    """Raises ValueError unless seed and start_step are non-negative ints."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0) or start_step < 0:
        raise ValueError(
            f"seed and start_step must be non-negative ints, got {seed!r} and {start_step!r}."
        )


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def batch_indices(
    num_examples: int,
    global_batch_size: int,
    seed: int,
    step: int,
    process_index: int = 0,
    process_count: int = 1,
) -> np.ndarray:
    """The examples process `process_index` reads at `step`: int64[M / P].

    The batching contract of every source: epoch e is the permutation
    `np.random.default_rng([seed, e])` of the N examples; step s is global batch
    `b = s % steps_per_epoch` of epoch `s // steps_per_epoch`, `perm[b*M:(b+1)*M]`
    (the remainder of an epoch is dropped), and process p of P takes its p-th contiguous
    slice. A pure function of its arguments (the last epochs' permutations are cached).
    """
    local = global_batch_size // process_count
    epoch, b = divmod(step, steps_per_epoch(num_examples, global_batch_size))
    start = b * global_batch_size + process_index * local
    return _epoch_permutation(int(seed), epoch, num_examples)[start : start + local]


def eval_indices(
    num_examples: int, batch_size: int, batch: int, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """The examples process `process_index` reads for evaluation batch `batch`.

    Global batch b holds examples [b*M, (b+1)*M), in order; the process takes its
    contiguous slice. Past the end the last example is repeated and masked out.

    Returns:
      indices int64[M / P] and mask bool[M / P] (True for real examples).
    """
    local = batch_size // process_count
    start = batch * batch_size + process_index * local
    indices = np.arange(start, start + local)
    mask = indices < num_examples
    return np.minimum(indices, num_examples - 1), mask


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """ceil(N / M): evaluation batches of one pass, the same in every process."""
    return -(-num_examples // batch_size)


def per_device(batch: dict[str, np.ndarray], local_device_count: int) -> dict[str, np.ndarray]:
    """Splits every leaf [B_local, ...] of a process batch into [L, B_local / L, ...]."""
    return {k: v.reshape(local_device_count, -1, *v.shape[1:]) for k, v in batch.items()}


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    local_device_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite shuffled training batches of this process, from step `start_step` on,
    in the order of `batch_indices` (the contract `streaming.stream_batches` shares).

    Starting at any step costs one permutation, and yields exactly what a run from step
    0 yields there.

    Args:
      images: uint8[N, H, W, C], the same array in every process.
      labels: int32[N].
      global_batch_size: M, examples per step over all processes; divisible by
        process_count * local_device_count.
      seed: non-negative int.
      start_step: first step to yield.
      process_index, process_count: this process and the number of processes.
      local_device_count: L, devices of this process.

    Yields:
      {"image": uint8[L, B, H, W, C], "label": int32[L, B], "index": int32[L, B]} (the
      examples' positions in the split), B = M / (P * L).
    """
    _check_split(images, labels)
    local_batch_size(global_batch_size, process_index, process_count, local_device_count)
    steps_per_epoch(len(images), global_batch_size)
    check_order(seed, start_step)
    for step in itertools.count(start_step):
        idx = batch_indices(len(images), global_batch_size, seed, step, process_index, process_count)
        yield per_device({"image": images[idx], "label": labels[idx], "index": idx.astype(np.int32)}, local_device_count)


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    local_device_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a split in order, the last batch padded, for feature extraction
    (`eval_indices`; `streaming.stream_eval_batches` yields the same from a record source).

    Every process runs the same number of steps, ceil(N / M); "mask" marks the real
    examples.

    Args:
      images: uint8[N, H, W, C]; labels: int32[N].
      batch_size: M, examples per global batch; divisible by
        process_count * local_device_count.
      process_index, process_count, local_device_count: as in `batches`.

    Yields:
      {"image": uint8[L, B, H, W, C], "label": int32[L, B], "mask": bool[L, B]},
      B = M / (P * L).
    """
    _check_split(images, labels)
    local_batch_size(batch_size, process_index, process_count, local_device_count)
    for b in range(num_eval_batches(len(images), batch_size)):
        idx, mask = eval_indices(len(images), batch_size, b, process_index, process_count)
        yield per_device({"image": images[idx], "label": labels[idx], "mask": mask}, local_device_count)


def prefetch_to_devices(
    iterator: Iterable[Any], size: int = 2, devices: list[jax.Device] | None = None
) -> Iterator[Any]:
    """Puts each batch's leaves [L, ...] onto the L local devices, `size` batches ahead.

    Uses `flax.jax_utils.prefetch_to_device`: leaf i along the first axis goes to
    device i (pmap's order, `jax.local_devices()`, by default); device_put is
    asynchronous, so the transfer of the next batches overlaps the current step.
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}.")
    devices = jax.local_devices() if devices is None else list(devices)

    def checked():
        for batch in iterator:
            for leaf in jax.tree.leaves(batch):
                if np.shape(leaf)[:1] != (len(devices),):
                    raise ValueError(
                        f"Batch leaves need a leading axis of {len(devices)} (one slice per "
                        f"device), got shape {np.shape(leaf)}."
                    )
            yield batch

    return flax.jax_utils.prefetch_to_device(checked(), size, devices)
