"""The input of a run, from its config: the dataset spec, and batches in memory or streamed.

`config.data.streaming` chooses the source: 'memory' loads the split into every process
(`sources.load_split`), 'stream' reads it by random access with Grain
(`streaming.stream_batches`), 'auto' streams a split whose decoded images exceed
`config.data.in_memory_limit_mib` where it can be read by random access (image folders,
TFDS datasets prepared as ArrayRecord) and holds it in memory otherwise. Both give the
same batch at every step (`batching.batch_indices`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rr_jax import batching, datasets, image_folder, sources, streaming
from rr_jax.config import STREAMING
from rr_jax.errors import ConfigError, DatasetNotFoundError
from rr_jax.objectives import check_config_choice, config_error


def dataset_spec(
    config: Mapping[str, Any], dataset: str | None = None, label_space: str | None = None
) -> datasets.DatasetSpec:
    """The spec of `dataset` (default `config.dataset`) in `label_space` (default: the
    first) with the config's image folder, image size (`data.image_size`: square side)
    and normalisation (`data.mean`, `data.std`) where set; an image folder's class count
    is that of its tree, and an image folder without a test split holds one out of its
    train split (`datasets.Holdout` of `probe.holdout_fraction` and `probe.holdout_seed`;
    none where the fraction is 0 or, in configs saved before these fields, absent).
    `config` is a ConfigDict or a saved config dict (config.json, the checkpoint's); its
    settings apply to its own dataset only. Pretraining and every later evaluation call
    this on the same config, so they agree on the held-out images."""
    name = dataset or config["dataset"]
    if name not in datasets.DATASETS:
        raise ConfigError(f"Unknown dataset {name!r}; known: {sorted(datasets.DATASETS)}.")
    default = next(iter(datasets.DATASETS[name].values()))
    overrides = {}
    if name == config["dataset"]:
        settings = config.get("data") or {}
        if default.folder_layout is not None:
            overrides["image_folder"] = root = config.get("image_folder")
            probe = config.get("probe") or {}
            fraction = probe.get("holdout_fraction")
            if root and fraction and not image_folder.has_split(root, default.folder_layout, default.test_split):
                overrides["holdout"] = datasets.Holdout(fraction, probe.get("holdout_seed", 0))
                overrides["test_split"] = datasets.HELD_OUT_SPLIT
        if settings.get("image_size") is not None:
            side = settings["image_size"]
            overrides["image_shape"] = (side, side, default.image_shape[2])
        for key in ("mean", "std"):
            if settings.get(key) is not None:
                overrides[key] = tuple(settings[key])
    return datasets.get_dataset_spec(name, label_space, **overrides)


def streams(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec, split: str) -> bool:
    """Whether `split` is streamed rather than loaded into memory (`config.data.streaming`)."""
    mode = config.data.streaming
    check_config_choice("data.streaming", mode, STREAMING)
    if mode != "auto":
        return mode == "stream"
    mib = sources.split_size(spec, split, config.data_dir) * math.prod(spec.image_shape) / 2**20
    if mib <= config.data.in_memory_limit_mib:
        return False
    if sources.supports_random_access(spec, config.data_dir):
        return True
    logging.warning(
        "%s split %r holds %.0f MiB of images, more than data.in_memory_limit_mib=%d, but is not "
        "prepared as ArrayRecord: every process loads it into memory. Prepare it with `tfds build %s "
        "--file_format=array_record` to stream it.", spec.tfds_name, split, mib,
        config.data.in_memory_limit_mib, spec.tfds_name)
    return False


def pretrain_batches(
    config: ml_collections.ConfigDict,
    spec: datasets.DatasetSpec,
    *,
    start_step: int,
    process_index: int,
    process_count: int,
    local_device_count: int,
    split: str | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's pretraining batches from `start_step` on, in memory or streamed,
    of `split` (default: the config's pretraining split).

    Yields {"image": uint8[L, B, H, W, C], "label": int32[L, B]}, B = M / (P * L),
    M = config.batch_size; step s is the same batch either way (`batching.batch_indices`).
    """
    split = split or config.pretrain_split or spec.pretrain_split
    order = dict(global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
                 process_index=process_index, process_count=process_count, local_device_count=local_device_count)
    if streams(config, spec, split):
        logging.info("Streaming %s split %r (%d read threads, %d steps prefetched).", spec.tfds_name, split,
                     config.data.read_threads, config.data.prefetch_steps)
        source = sources.record_source(spec, split, config.data_dir)
        return streaming.stream_batches(source, read_threads=config.data.read_threads,
                                        prefetch_steps=config.data.prefetch_steps, **order)
    images, labels = sources.load_split(spec, split, config.data_dir, read_threads=config.data.read_threads)
    return batching.batches(images, labels, **order)


def eval_batches(
    config: ml_collections.ConfigDict,
    spec: datasets.DatasetSpec,
    split: str,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    local_device_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over `split` (each example once, the last batch padded and
    masked), in memory or streamed as `streams` decides; `sources.split_size` gives N.

    Yields {"image": uint8[L, B, H, W, C], "label": int32[L, B], "mask": bool[L, B]}.
    """
    layout = dict(process_index=process_index, process_count=process_count, local_device_count=local_device_count)
    if streams(config, spec, split):
        source = sources.record_source(spec, split, config.data_dir)
        return streaming.stream_eval_batches(source, batch_size, read_threads=config.data.read_threads,
                                             prefetch_steps=config.data.prefetch_steps, **layout)
    images, labels = sources.load_split(spec, split, config.data_dir, read_threads=config.data.read_threads)
    return batching.eval_batches(images, labels, batch_size, **layout)


def pretrain_batch_shapes(
    config: ml_collections.ConfigDict,
    spec: datasets.DatasetSpec,
    *,
    process_count: int,
    local_device_count: int,
    labelled_alongside: bool = False,
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes and dtypes of one batch of `pretrain_batches` (in memory or streamed
    alike), with 'probe_image' and 'probe_label' where `labelled_alongside`
    (`monitors.with_labelled_batches`): what the step is compiled for before any data
    is read. {'image': uint8[L, B, H, W, C], 'label', 'index': int32[L, B]}, B = M / (P * L)."""
    shape = (local_device_count, config.batch_size // (process_count * local_device_count))
    images = jax.ShapeDtypeStruct((*shape, *spec.image_shape), np.uint8)
    ints = jax.ShapeDtypeStruct(shape, np.int32)
    batch = {"image": images, "label": ints, "index": ints}
    if labelled_alongside:
        batch.update(probe_image=images, probe_label=ints)
    return batch


def check_splits(config: ml_collections.ConfigDict, spec: datasets.DatasetSpec, *, device_count: int) -> dict[str, int]:
    """Checks every split the run will read before any is read into training: that it
    exists, that its images decode (image folders: prepared here, once), that a global
    batch fits in the pretraining split (and in the labelled split batched alongside it
    for the online probe), and that the kNN monitor's bank holds k images.

    The splits: the pretraining split; the train and test splits where the linear probe
    (`probe.enabled`), the kNN monitor or the online probe run. Returns {split: size}.

    Raises:
      DatasetNotFoundError: a split is missing (the message says what to provide).
      DatasetContentError: a file does not decode (named) or does not fit the layout.
      ConfigError: `batch_size` or `knn_monitor.k` larger than the split allows.
    """
    pretrain = config.pretrain_split or spec.pretrain_split
    batched = [pretrain]
    if config.online_probe.every_steps and not datasets.has_labels(pretrain):
        batched.append(spec.train_split)
    evaluated = []
    if config.probe.enabled or config.knn_monitor.every_steps or config.online_probe.every_steps:
        evaluated = [spec.train_split, spec.test_split]
    sizes = {split: sources.split_size(spec, split, config.data_dir) for split in dict.fromkeys(batched)}
    for split in evaluated:
        try:
            sizes[split] = sources.split_size(spec, split, config.data_dir)
        except DatasetNotFoundError as error:
            if spec.folder_layout is None:
                raise
            raise DatasetNotFoundError(
                f"{error} The linear probe (probe.enabled) and the monitors (knn_monitor, online_probe) read the "
                f"{split!r} split; provide it, or set config.probe.holdout_fraction > 0 to hold out part of the train "
                "split for them, or turn them off.") from error
    for split in batched:
        if config.batch_size > sizes[split]:
            fitting = sizes[split] // device_count * device_count
            allowed = ("it is smaller than 2 images for each device" if fitting < 2 * device_count else
                       f"use at most {fitting}" + (f" (a multiple of the {device_count} devices)" if device_count > 1 else ""))
            raise config_error("batch_size", config.batch_size,
                               f"the split {_named(spec, split)} of {config.dataset} holds {sizes[split]} images; {allowed}")
    if config.knn_monitor.every_steps:
        bank = min(config.knn_monitor.num_train, sizes[spec.train_split])
        if config.knn_monitor.k > bank:
            raise config_error("knn_monitor.k", config.knn_monitor.k,
                               f"the kNN bank holds {bank} images of the split {_named(spec, spec.train_split)}; "
                               f"use at most {bank}")
    return sizes


def _named(spec: datasets.DatasetSpec, split: str) -> str:
    """'train', or 'train' (train without the 10% held out as the test split)."""
    made = spec.describe_split(split)
    return repr(split) if made == split else f"{split!r} ({made})"
