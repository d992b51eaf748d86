"""TFDS datasets: names, splits, label spaces, statistics, per-host sharded batches.

Host-side work is decode and batch only; augmentation and normalisation run on device.

A split is loaded once into memory as uint8 NumPy (`load_split`). Every process holds
the whole split, so that it can take its own slice of any global batch:
CIFAR-10/100 train 50000x32x32x3 = 147 MiB, STL-10 train 5000x96x96x3 = 132 MiB,
STL-10 unlabelled 100000x96x96x3 = 2.6 GiB, Fashion-MNIST train 60000x28x28x1 = 45 MiB.

Data order (`batches`): epoch e is the permutation `default_rng([seed, e])` of the
examples; global batch b of epoch e is `perm[b*M:(b+1)*M]` (the remainder of an epoch is
dropped), and process p of P takes the p-th contiguous slice of it. The order is thus a
function of (seed, step) alone: P processes together see exactly the global batches that
one process sees, and a run resumed at step s sees what an uninterrupted run saw from s.

Offline Fashion-MNIST: when the TFDS dataset is not prepared and the original files are
in `DatasetSpec.offline_dir` (by default where Debian's package `dataset-fashion-mnist`
installs them), it is prepared from those files without network access.
"""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import os
import shutil
import tempfile
import types
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import flax.jax_utils
import jax
import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from rr_jax.errors import DatasetError, DatasetNotFoundError

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_PROBE_TIMEOUT_S = 5.0
_READ_CHUNK = 2048


# --------------------------------------------------------------------------- specs


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


def get_dataset_spec(name: str, label_space: str | None = None, **overrides: Any) -> DatasetSpec:
    """The spec of a known dataset (see `DATASETS`), optionally with fields replaced.

    Args:
      name: a key of `DATASETS`: "cifar10", "cifar100", "stl10", "fashion_mnist".
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
    return dataclasses.replace(spaces[label_space], **overrides)


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
})


# ---------------------------------------------------------------------- loading


def _how_to_get(spec: DatasetSpec, data_dir: str) -> str:
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
) -> None:
    """Prepares with `make_builder(data_dir=tmp)` in a temporary directory, then moves
    the finished dataset into `data_dir` with one rename; nothing is left on failure."""
    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".incomplete-{spec.tfds_name}-", dir=data_dir)
    try:
        builder = make_builder(data_dir=tmp)
        builder.download_and_prepare(
            download_dir=os.path.join(tmp, "downloads"), download_config=download_config
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
    spec: DatasetSpec, data_dir: str | None, download: bool
) -> tfds.core.DatasetBuilder:
    """A TFDS builder of `spec.tfds_name` whose data is prepared, preparing it if needed."""
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    root = os.fspath(builder.data_dir_root)
    offline, offline_builder = spec.offline_dir, _OFFLINE_BUILDERS.get(spec.tfds_name)
    if offline and offline_builder.has_files(offline):
        _prepare(
            spec, root,
            lambda data_dir: offline_builder(source_dir=offline, data_dir=data_dir),
            tfds.download.DownloadConfig(try_download_gcs=False),
        )
        logging.info(
            "Prepared TFDS dataset %s in %s from the local files in %s (no download).",
            spec.tfds_name, root, offline,
        )
    elif not download:
        raise DatasetNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {root} and download=False. "
            + _how_to_get(spec, root)
        )
    elif unreachable := _unreachable_hosts(builder):
        raise DatasetNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {root} and cannot be "
            f"downloaded: no answer from {unreachable}. " + _how_to_get(spec, root)
        )
    else:
        _prepare(
            spec, root,
            lambda data_dir: tfds.builder(spec.tfds_name, data_dir=data_dir),
            tfds.download.DownloadConfig(),
        )
    return tfds.builder(spec.tfds_name, data_dir=root)


def class_names(spec: DatasetSpec, data_dir: str | None = None) -> list[str]:
    """The names of the classes of `spec.label_key`, in label order (prepares the
    dataset if needed, like `load_split`)."""
    return list(_prepared_builder(spec, data_dir, True).info.features[spec.label_key].names)


def load_split(
    spec: DatasetSpec, split: str, data_dir: str | None = None, *, download: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Loads one TFDS split into memory, preparing the dataset first if needed.

    Args:
      spec: the dataset (see `get_dataset_spec`).
      split: a TFDS split, e.g. `spec.pretrain_split`, "train" or "train[:10%]".
      data_dir: TFDS data directory; None: TFDS's default ($TFDS_DATA_DIR or
        ~/tensorflow_datasets).
      download: whether an unprepared dataset may be downloaded. Local files in
        `spec.offline_dir` are used first either way.

    Returns:
      images uint8[N, H, W, C] and labels int32[N] (the `spec.label_key` feature; -1
      for STL-10's "unlabelled" split), in TFDS's order.

    Raises:
      DatasetError: the prepared files are damaged; the message names the directory.
      DatasetNotFoundError (a FileNotFoundError): the dataset is not prepared and cannot be obtained; the
        message says how to get it.
      ValueError: the TFDS dataset does not match `spec`.
    """
    builder = _prepared_builder(spec, data_dir, download)
    features = builder.info.features
    if "image" not in features or spec.label_key not in features:
        raise ValueError(
            f"TFDS dataset {spec.tfds_name!r} needs features 'image' and "
            f"{spec.label_key!r} (label_key); it has {sorted(features.keys())}."
        )
    image, label = features["image"], features[spec.label_key]
    if tuple(image.shape) != spec.image_shape or image.np_dtype != np.uint8:
        raise ValueError(
            f"TFDS dataset {spec.tfds_name!r} stores {image.np_dtype} images of shape "
            f"{image.shape}; spec.image_shape={spec.image_shape} and uint8 are required."
        )
    if getattr(label, "num_classes", None) != spec.num_classes:
        raise ValueError(
            f"TFDS feature {spec.tfds_name}/{spec.label_key} has "
            f"{getattr(label, 'num_classes', None)} classes; spec.num_classes="
            f"{spec.num_classes}."
        )

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
    logging.info(
        "Loaded TFDS %s split %r: %d examples of shape %s (%.1f MiB) from %s.",
        spec.tfds_name, split, n, spec.image_shape, images.nbytes / 2**20, builder.data_dir,
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


def _local_size(
    batch_size: int, process_index: int, process_count: int, local_device_count: int
) -> int:
    """Examples per process of a global batch, checking the layout arguments."""
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
    """Infinite shuffled training batches of this process, from step `start_step` on.

    Epoch e uses the permutation `np.random.default_rng([seed, e])`; step s is batch
    `s % steps_per_epoch` of epoch `s // steps_per_epoch`; this process takes the
    `process_index`-th contiguous slice of each global batch. Starting at any step
    costs one permutation, and yields exactly what a run from step 0 yields there.

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
      {"image": uint8[L, B, H, W, C], "label": int32[L, B]}, B = M / (P * L).
    """
    _check_split(images, labels)
    local = _local_size(global_batch_size, process_index, process_count, local_device_count)
    num_steps = steps_per_epoch(len(images), global_batch_size)
    if not (isinstance(seed, (int, np.integer)) and seed >= 0) or start_step < 0:
        raise ValueError(
            f"seed and start_step must be non-negative ints, got {seed!r} and {start_step!r}."
        )
    epoch, perm = None, None
    for step in itertools.count(start_step):
        step_epoch, b = divmod(step, num_steps)
        if step_epoch != epoch:
            epoch = step_epoch
            perm = np.random.default_rng([seed, epoch]).permutation(len(images))
        start = b * global_batch_size + process_index * local
        idx = perm[start : start + local]
        yield {
            "image": images[idx].reshape(local_device_count, -1, *images.shape[1:]),
            "label": labels[idx].reshape(local_device_count, -1),
        }


def eval_batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    local_device_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over a split in order, the last batch padded, for feature extraction.

    Global batch b holds examples [b*M, (b+1)*M); this process takes its contiguous
    slice. The last batch is padded to full size and "mask" marks the real examples,
    so every process runs the same number of steps, ceil(N / M).

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
    local = _local_size(batch_size, process_index, process_count, local_device_count)
    n = len(images)
    for start in range(0, n, batch_size):
        idx = np.arange(start + process_index * local, start + (process_index + 1) * local)
        mask = idx < n
        idx = np.minimum(idx, n - 1)  # padding repeats the last example, masked out
        batch = {"image": images[idx], "label": labels[idx], "mask": mask}
        yield {k: v.reshape(local_device_count, -1, *v.shape[1:]) for k, v in batch.items()}


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
