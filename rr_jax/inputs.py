"""The input of a run, from its config: the dataset spec, and batches in memory or streamed.

`config.data.streaming` chooses the source: 'memory' loads the split into every process
(`data.load_split`), 'stream' reads it by random access with Grain
(`streaming.stream_batches`), 'auto' streams a split whose decoded images exceed
`config.data.in_memory_limit_mib` where it can be read by random access (image folders,
TFDS datasets prepared as ArrayRecord) and holds it in memory otherwise. Both give the
same batch at every step (`data.batch_indices`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from rr_jax import data, streaming

STREAMING = ("auto", "stream", "memory")


def dataset_spec(
    config: Mapping[str, Any], dataset: str | None = None, label_space: str | None = None
) -> data.DatasetSpec:
    """The spec of `dataset` (default `config.dataset`) in `label_space` (default: the
    first) with the config's image folder, image size (`data.image_size`: square side)
    and normalisation (`data.mean`, `data.std`) where set; an image folder's class count
    is that of its tree. `config` is a ConfigDict or a saved config dict (config.json,
    the checkpoint's); its settings apply to its own dataset only."""
    name = dataset or config["dataset"]
    if name not in data.DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; known: {sorted(data.DATASETS)}.")
    default = next(iter(data.DATASETS[name].values()))
    overrides = {}
    if name == config["dataset"]:
        settings = config.get("data") or {}
        if default.folder_layout is not None:
            overrides["image_folder"] = config.get("image_folder")
        if settings.get("image_size") is not None:
            side = settings["image_size"]
            overrides["image_shape"] = (side, side, default.image_shape[2])
        for key in ("mean", "std"):
            if settings.get(key) is not None:
                overrides[key] = tuple(settings[key])
    return data.get_dataset_spec(name, label_space, **overrides)


def streams(config: ml_collections.ConfigDict, spec: data.DatasetSpec, split: str) -> bool:
    """Whether `split` is streamed rather than loaded into memory (`config.data.streaming`)."""
    mode = config.data.streaming
    if mode not in STREAMING:
        raise ValueError(f"config.data.streaming={mode!r} is not allowed: use one of {list(STREAMING)}.")
    if mode != "auto":
        return mode == "stream"
    mib = data.split_size(spec, split, config.data_dir) * math.prod(spec.image_shape) / 2**20
    if mib <= config.data.in_memory_limit_mib:
        return False
    if data.supports_random_access(spec, config.data_dir):
        return True
    logging.warning(
        "%s split %r holds %.0f MiB of images, more than data.in_memory_limit_mib=%d, but is not "
        "prepared as ArrayRecord: every process loads it into memory. Prepare it with `tfds build %s "
        "--file_format=array_record` to stream it.", spec.tfds_name, split, mib,
        config.data.in_memory_limit_mib, spec.tfds_name)
    return False


def pretrain_batches(
    config: ml_collections.ConfigDict,
    spec: data.DatasetSpec,
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
    M = config.batch_size; step s is the same batch either way (`data.batch_indices`).
    """
    split = split or config.pretrain_split or spec.pretrain_split
    order = dict(global_batch_size=config.batch_size, seed=config.seed, start_step=start_step,
                 process_index=process_index, process_count=process_count, local_device_count=local_device_count)
    if streams(config, spec, split):
        logging.info("Streaming %s split %r (%d read threads, %d steps prefetched).", spec.tfds_name, split,
                     config.data.read_threads, config.data.prefetch_steps)
        source = data.record_source(spec, split, config.data_dir)
        return streaming.stream_batches(source, read_threads=config.data.read_threads,
                                        prefetch_steps=config.data.prefetch_steps, **order)
    images, labels = data.load_split(spec, split, config.data_dir, read_threads=config.data.read_threads)
    return data.batches(images, labels, **order)


def eval_batches(
    config: ml_collections.ConfigDict,
    spec: data.DatasetSpec,
    split: str,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    local_device_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over `split` (each example once, the last batch padded and
    masked), in memory or streamed as `streams` decides; `data.split_size` gives N.

    Yields {"image": uint8[L, B, H, W, C], "label": int32[L, B], "mask": bool[L, B]}.
    """
    layout = dict(process_index=process_index, process_count=process_count, local_device_count=local_device_count)
    if streams(config, spec, split):
        source = data.record_source(spec, split, config.data_dir)
        return streaming.stream_eval_batches(source, batch_size, read_threads=config.data.read_threads,
                                             prefetch_steps=config.data.prefetch_steps, **layout)
    images, labels = data.load_split(spec, split, config.data_dir, read_threads=config.data.read_threads)
    return data.eval_batches(images, labels, batch_size, **layout)
