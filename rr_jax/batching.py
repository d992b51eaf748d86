"""Data order, per-host batches and device prefetch, for in-memory splits and streams.

Data order, one contract for every source (`batch_indices`): epoch e is the permutation
`default_rng([seed, e])` of the examples; global batch b of epoch e is
`perm[b*M:(b+1)*M]` (the remainder of an epoch is dropped), and process p of P takes the
p-th contiguous slice of it. The order is thus a function of (seed, step) alone: P
processes together see exactly the global batches that one process sees, and a run
resumed at step s sees what an uninterrupted run saw from s, from either source.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import flax.jax_utils
import jax
import numpy as np


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
