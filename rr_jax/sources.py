"""Reading a dataset's splits: TFDS datasets and image folders (`image_folder`).

Host-side work is decode (+ resize for variable-size images) only; augmentation and
normalisation run on device. `load_split` loads a split into memory as uint8 NumPy,
every process the whole split (CIFAR-10/100 train 50000x32x32x3 = 147 MiB, STL-10
unlabelled 100000x96x96x3 = 2.6 GiB, Fashion-MNIST train 60000x28x28x1 = 45 MiB);
`record_source` opens it for random access instead (TFDS ArrayRecord data sources,
prepared image folders), which `streaming` reads batch by batch, each process only its
slice (`rr_jax.inputs` chooses per config).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from rr_jax import image_folder
from rr_jax.datasets import HELD_OUT_SPLIT, DatasetSpec
from rr_jax.errors import DatasetError
from rr_jax.prepare import checked_builder, how_to_get, prepared_builder

_READ_CHUNK = 2048


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
    return list(prepared_builder(spec, data_dir, True).info.features[spec.label_key].names)


def supports_random_access(spec: DatasetSpec, data_dir: str | None = None) -> bool:
    """Whether `record_source` can read the dataset as prepared now: image folders
    always, TFDS datasets when prepared as ArrayRecord (or not prepared yet)."""
    if spec.folder_layout is not None:
        return True
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    return not builder.is_prepared() or builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD


def split_size(spec: DatasetSpec, split: str, data_dir: str | None = None, *, download: bool = True) -> int:
    """Number of examples of a split (e.g. "train[:10%]"), from metadata; prepares the
    dataset if needed but reads no images."""
    if spec.folder_layout is not None:
        prepared, indices = _folder_records(spec, split, data_dir)
        return prepared.num_examples if indices is None else len(indices)
    builder = prepared_builder(spec, data_dir, download)
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
        builder = checked_builder(spec, data_dir, download, "array_record")
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
    builder = None if spec.folder_layout is not None else checked_builder(spec, data_dir, download)
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
                + how_to_get(spec, os.fspath(builder.data_dir_root))
            ) from None
        where = builder.data_dir
    logging.info(
        "Loaded %s split %r: %d examples of shape %s (%.1f MiB) from %s.",
        spec.tfds_name, split, len(images), spec.image_shape, images.nbytes / 2**20, where,
    )
    return images, labels
