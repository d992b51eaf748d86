"""Streamed input with Grain: batches read by random access, decoded ahead of the device.

A record source (`sources.record_source`: TFDS ArrayRecord data sources, prepared image
folders) is read in the order of `batching.batch_indices` / `batching.eval_indices`, the same
contract as the in-memory `batching.batches` / `batching.eval_batches`, so that step s sees the
same batch from either path and a resumed run continues exactly. Each process reads
only the records of its own slice of every global batch.

Grain maps steps to batches on `read_threads` threads (reading, decoding and resizing
one process batch each) and keeps at most `prefetch_steps` batches ready, so host
memory is bounded by the prefetch depth, not by the dataset (the order itself costs one
int64 permutation of the split per epoch, 8 bytes per example).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import grain
import numpy as np

from rr_jax import batching

# Grain's map datasets are finite; training reads from start_step up to this bound.
_LAST_STEP = 2**53


def _stack(records: list[dict[str, np.ndarray]], extra: dict[str, np.ndarray], local_device_count: int) -> dict[str, np.ndarray]:
    batch = {"image": np.stack([r["image"] for r in records]),
             "label": np.asarray([r["label"] for r in records], np.int32), **extra}
    return batching.per_device(batch, local_device_count)


def _check_threads(read_threads: int, prefetch_steps: int) -> None:
    if read_threads < 1 or prefetch_steps < 1:
        raise ValueError(
            f"read_threads and prefetch_steps must be >= 1, got {read_threads} and {prefetch_steps}."
        )


def _iterate(steps: grain.MapDataset, read_threads: int, prefetch_steps: int) -> Iterator[dict[str, np.ndarray]]:
    options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch_steps)
    return iter(steps.to_iter_dataset(options))


def stream_batches(
    source: Sequence[dict[str, np.ndarray]],
    *,
    global_batch_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    local_device_count: int = 1,
    read_threads: int = 4,
    prefetch_steps: int = 8,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches of this process from a record source, from `start_step`.

    Yields what `batching.batches` yields on the same examples held in memory (same seed,
    same steps); this process reads only `batching.batch_indices(..., process_index, ...)`.

    Args:
      source: `len(source)` = N examples; `source[i]` -> {"image": uint8[H, W, C],
        "label": int}, callable from several threads (`sources.record_source`).
      global_batch_size, seed, start_step, process_index, process_count,
        local_device_count: as in `batching.batches`.
      read_threads: threads reading and decoding, one process batch each.
      prefetch_steps: batches kept ready ahead of the consumer (>= read_threads keeps
        every thread busy).

    Yields:
      {"image": uint8[L, B, H, W, C], "label": int32[L, B], "index": int32[L, B]}, B = M / (P * L).
    """
    batching.local_batch_size(global_batch_size, process_index, process_count, local_device_count)
    num_examples = len(source)
    batching.steps_per_epoch(num_examples, global_batch_size)
    batching.check_order(seed, start_step)
    _check_threads(read_threads, prefetch_steps)

    def read(step: int) -> dict[str, np.ndarray]:
        indices = batching.batch_indices(num_examples, global_batch_size, seed, step, process_index, process_count)
        return _stack([source[int(i)] for i in indices], {"index": indices.astype(np.int32)}, local_device_count)

    return _iterate(grain.MapDataset.range(start_step, _LAST_STEP).map(read), read_threads, prefetch_steps)


def stream_eval_batches(
    source: Sequence[dict[str, np.ndarray]],
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    local_device_count: int = 1,
    read_threads: int = 4,
    prefetch_steps: int = 8,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over a record source, each example once (the last batch padded
    and masked): what `batching.eval_batches` yields on the same examples in memory.

    Args:
      source, read_threads, prefetch_steps: as in `stream_batches`.
      batch_size, process_index, process_count, local_device_count: as in
        `batching.eval_batches`.

    Yields:
      {"image": uint8[L, B, H, W, C], "label": int32[L, B], "mask": bool[L, B]},
      B = M / (P * L); ceil(N / M) batches in every process.
    """
    batching.local_batch_size(batch_size, process_index, process_count, local_device_count)
    _check_threads(read_threads, prefetch_steps)
    num_examples = len(source)

    def read(batch: int) -> dict[str, np.ndarray]:
        indices, mask = batching.eval_indices(num_examples, batch_size, batch, process_index, process_count)
        return _stack([source[int(i)] for i in indices], {"mask": mask}, local_device_count)

    steps = grain.MapDataset.range(batching.num_eval_batches(num_examples, batch_size)).map(read)
    return _iterate(steps, read_threads, prefetch_steps)
