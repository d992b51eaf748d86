"""Whole-step figures on the local accelerators, as one Markdown table (bench/accelerator.sh).

    python bench/accelerator.py [--cases conv4:32:cifar10,resnet32:32:cifar10,resnet34:25:stl10]
                                [--repeats 10] [--batch 64] [--workers 8] [--no-official]

Per case (backbone:K:dataset) and float32: the pmapped step (steps.whole_step)
on 1 device with M = batch images and on all local devices with M = batch per device
(weak scaling; efficiency = views/s on n devices / (n * views/s on 1)); the host input
pipeline's rate (rr_jax.batching.batches + prefetch_to_devices on uint8 images in memory,
images/s) against the images/s the n-device step consumes; and, when torch sees a CUDA
device, the official PyTorch step (bench/official_torch.py, its DataLoader with
`workers` processes) on that device, against our 1-device step. Medians of `repeats`.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from steps import feature_size, whole_step  # noqa: E402
from timing import compile_and_time, median_ms, wall_ms  # noqa: E402

from rr_jax import batching, datasets  # noqa: E402


def step_ms(backbone: str, views: int, dataset: str, batch: int, devices: int, repeats: int) -> float:
    step, inputs = whole_step(backbone, views, dataset=dataset, batch=batch, devices=devices)
    return compile_and_time(step, *inputs, repeats=repeats)[1]


def host_images_per_s(dataset: str, batch: int, devices: int, steps: int = 50) -> float:
    """Images per second the host pipeline delivers onto the devices (nothing consumes them)."""
    shape = datasets.get_dataset_spec(dataset).image_shape
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (max(20 * batch, 1024), *shape), np.uint8)
    labels = np.zeros(len(images), np.int32)
    stream = batching.prefetch_to_devices(
        batching.batches(images, labels, global_batch_size=batch, seed=0, local_device_count=devices),
        devices=jax.local_devices()[:devices],
    )

    def window():
        for _ in range(steps):
            jax.block_until_ready(next(stream))

    jax.block_until_ready(next(stream))
    return steps * batch / wall_ms(window) * 1e3


def official_ms(backbone: str, views: int, dataset: str, batch: int, workers: int, repeats: int) -> float | None:
    """The official PyTorch step on CUDA, or None without torch, CUDA or the backbone."""
    try:
        import torch
    except ImportError:
        return None
    from official_torch import TORCH_MODELS, official_step

    if not torch.cuda.is_available() or backbone not in TORCH_MODELS:
        return None
    spec = datasets.get_dataset_spec(dataset)
    images = np.random.default_rng(0).integers(0, 256, (8 * batch, *spec.image_shape), np.uint8)
    step = official_step(TORCH_MODELS[backbone](), feature_size(backbone, spec.image_shape), images, views,
                         spec.mean, spec.std, batch=batch, workers=workers, device="cuda")
    return median_ms(lambda: (step(), torch.cuda.synchronize()), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="conv4:32:cifar10,resnet32:32:cifar10,resnet34:25:stl10")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64, help="images per step per device")
    parser.add_argument("--workers", type=int, default=8, help="DataLoader workers of the official step")
    parser.add_argument("--no-official", action="store_true")
    args = parser.parse_args()
    count = jax.local_device_count()
    print(f"jax {jax.__version__}, {count} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores, "
          f"M = {args.batch} per device, float32, median of {args.repeats}\n")
    print("| case | devices | M | step ms | views/s | scaling efficiency | host images/s | step consumes images/s "
          "| official PyTorch ms | official / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        backbone, views, dataset = case.split(":")
        views = int(views)
        single = None
        for devices in sorted({1, count}):
            batch = args.batch * devices
            ms = step_ms(backbone, views, dataset, batch, devices, args.repeats)
            rate = views * batch / ms * 1e3
            single = single or rate
            efficiency = rate / (devices * single)
            host = host_images_per_s(dataset, batch, devices)
            official = None
            if devices == 1 and not args.no_official:
                official = official_ms(backbone, views, dataset, batch, args.workers, args.repeats)
            theirs = "- | -" if official is None else f"{official:.1f} | {official / ms:.2f}x"
            print(f"| {backbone} K={views} {dataset} | {devices} | {batch} | {ms:.1f} | {rate:,.0f} | "
                  f"{efficiency:.2f} | {host:,.0f} | {batch / ms * 1e3:,.0f} | {theirs} |", flush=True)


if __name__ == "__main__":
    main()
