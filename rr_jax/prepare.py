"""Makes a TFDS dataset ready to read: download and preparation, or offline preparation.

Offline Fashion-MNIST: when the TFDS dataset is not prepared and the original files are
in `DatasetSpec.offline_dir` (by default where Debian's package `dataset-fashion-mnist`
installs them), it is prepared from those files without network access.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
import urllib.parse
from collections.abc import Callable
from typing import Any

import numpy as np
import requests
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from rr_jax.datasets import DEBIAN_FASHION_MNIST_DIR, OFFLINE_DATASETS, DatasetSpec
from rr_jax.errors import DatasetNotFoundError

_PROBE_TIMEOUT_S = 5.0


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
assert set(_OFFLINE_BUILDERS) == OFFLINE_DATASETS


# ---------------------------------------------------------------------- loading


def how_to_get(spec: DatasetSpec, data_dir: str) -> str:
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


def prepared_builder(
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
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {root}. " + how_to_get(spec, root)
        )
    elif not download:
        raise DatasetNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {root} and download=False. "
            + how_to_get(spec, root)
        )
    elif not builder.MANUAL_DOWNLOAD_INSTRUCTIONS and (unreachable := _unreachable_hosts(builder)):
        raise DatasetNotFoundError(
            f"TFDS dataset {spec.tfds_name!r} is not prepared in {root} and cannot be "
            f"downloaded: no answer from {unreachable}. " + how_to_get(spec, root)
        )
    else:
        _prepare(
            spec, root,
            lambda data_dir: tfds.builder(spec.tfds_name, data_dir=data_dir),
            tfds.download.DownloadConfig(manual_dir=manual_dir), file_format,
        )
        logging.info("Prepared TFDS dataset %s in %s (%s).", spec.tfds_name, root, file_format or "tfrecord")
    return tfds.builder(spec.tfds_name, data_dir=root)


def checked_builder(
    spec: DatasetSpec, data_dir: str | None, download: bool, file_format: str | None = None
) -> tfds.core.DatasetBuilder:
    """`prepared_builder`, after checking that its features match `spec`."""
    builder = prepared_builder(spec, data_dir, download, file_format)
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
