"""Host input pipeline: streamed (Grain) against loaded into memory, on generated image folders.

    python bench/bench_input.py [--sizes 50000,200000] [--threads 2] [--steps 300] [--repeats 3]
                                [--root /tmp/rr_bench_input] [--skip-train-step]

For each size N, a class_folders tree of N 64x64 JPEG files (200 classes; smooth random
images: 8x8 noise upsampled, so that files are ~2 KB like tiny-ImageNet's) is generated
once and prepared into ArrayRecord (`image_folder.prepare_split`, timed). Then, each in
a fresh process so that its peak resident memory is its own:
  stream: `streaming.stream_batches` over `sources.record_source`, M = 64, `--threads` read
    threads, 8 steps prefetched; images/s over `--steps` steps, median of `--repeats`
    windows (after one warm-up window);
  memory: `sources.load_split` of the same split (the same decode on `--threads` threads),
    its images/s, then `batching.batches` over the array, timed like stream.
Peak RSS is the process's ru_maxrss; "baseline" is the RSS after imports, before reading.
Last, what training consumes: the pmapped pretraining step (conv4, K=32, M=64 on 64x64
images, compiled with launch.py's XLA:CPU flags) timed as in bench_pipeline, and M / step
time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import numpy as np  # noqa: E402
from timing import times_ms  # noqa: E402

BATCH = 64  # M, as steps.BATCH; not imported from there: a measuring process imports only what it measures
SIDE = 64
CLASSES = 200


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate_tree(root: str, size: int) -> str:
    """ROOT/train/<class>/<i>.jpg, `size` files; written once, reused."""
    from PIL import Image

    tree = os.path.join(root, f"tree_{size}")
    done = os.path.join(tree, ".complete")
    if os.path.exists(done):
        return tree
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(1000):  # distinct images, written round-robin
        small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((SIDE, SIDE), Image.BICUBIC)
        buffer = io.BytesIO()
        small.save(buffer, "JPEG", quality=90)
        pool.append(buffer.getvalue())
    for c in range(CLASSES):
        os.makedirs(os.path.join(tree, "train", f"c{c:03d}"), exist_ok=True)
    for i in range(size):
        with open(os.path.join(tree, "train", f"c{i % CLASSES:03d}", f"{i:07d}.jpg"), "wb") as f:
            f.write(pool[i % len(pool)])
    open(done, "w").close()
    return tree


def _spec(tree: str):
    from rr_jax import datasets

    return datasets.get_dataset_spec("image_folder", image_folder=tree)


def _timed_windows(batches, steps: int, repeats: int) -> float:
    """Median images/s over `repeats` windows of `steps` batches, after one warm-up window."""

    def window():
        for _ in range(steps):
            next(batches)

    return statistics.median(steps * BATCH / ms * 1e3 for ms in times_ms(window, repeats))


def measure(mode: str, tree: str, cache: str, threads: int, steps: int, repeats: int) -> dict:
    """One measurement in this process: 'stream' or 'memory'."""
    from rr_jax import batching, sources, streaming

    spec = _spec(tree)
    baseline = _rss_mib()
    result = {"baseline_mib": baseline}
    if mode == "stream":
        source = sources.record_source(spec, "train", cache)
        batches = streaming.stream_batches(source, global_batch_size=BATCH, seed=0, read_threads=threads,
                                           prefetch_steps=8)
    else:
        start = time.perf_counter()
        images, labels = sources.load_split(spec, "train", cache, read_threads=threads)
        result["load_images_per_s"] = len(labels) / (time.perf_counter() - start)
        batches = batching.batches(images, labels, global_batch_size=BATCH, seed=0)
    result["images_per_s"] = _timed_windows(batches, steps, repeats)
    result["peak_mib"] = _peak_mib()
    return result


def train_step_images_per_s(repeats: int) -> tuple[float, float]:
    """(median step ms, images/s) of the pretraining step, conv4, K=32, M=64, 64x64."""
    from steps import whole_step
    from timing import compile_and_time

    from rr_jax.xla_flags import CPU_DEFAULTS

    step, inputs = whole_step("conv4", 32, dataset="image_folder", batch=BATCH)
    _, step_ms, _ = compile_and_time(step, *inputs, repeats=repeats, options=CPU_DEFAULTS)
    return step_ms, BATCH / step_ms * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50000,200000")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--root", default="/tmp/rr_bench_input")
    parser.add_argument("--skip-train-step", action="store_true")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: mode,tree
    args = parser.parse_args()
    cache = os.path.join(args.root, "tfds")
    if args.measure:
        mode, tree = args.measure.split(",", 1)
        print(json.dumps(measure(mode, tree, cache, args.threads, args.steps, args.repeats)))
        return

    from rr_jax import image_folder

    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; M={BATCH}, {SIDE}x{SIDE} JPEG, "
          f"{args.threads} read threads, images/s median of {args.repeats} windows of {args.steps} steps\n")
    print("| N | source | prepare s | load images/s | batches images/s | baseline RSS MiB | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for size in map(int, args.sizes.split(",")):
        tree = generate_tree(args.root, size)
        start = time.perf_counter()
        image_folder.prepare_split(tree, "class_folders", "train", cache)
        prepare_s = time.perf_counter() - start
        for mode in ("stream", "memory"):
            output = subprocess.run(
                [sys.executable, __file__, f"--measure={mode},{tree}", f"--root={args.root}",
                 f"--threads={args.threads}", f"--steps={args.steps}", f"--repeats={args.repeats}"],
                check=True, capture_output=True, text=True).stdout
            r = json.loads(output.strip().splitlines()[-1])
            load = f"{r['load_images_per_s']:.0f}" if "load_images_per_s" in r else "-"
            print(f"| {size} | {mode} | {prepare_s:.0f} | {load} | {r['images_per_s']:.0f} | "
                  f"{r['baseline_mib']:.0f} | {r['peak_mib']:.0f} |", flush=True)
    if not args.skip_train_step:
        step_ms, rate = train_step_images_per_s(args.repeats)
        print(f"\nTraining step (conv4, K=32, M={BATCH}, {SIDE}x{SIDE}): {step_ms:.0f} ms median, "
              f"consumes {rate:.1f} images/s.")


if __name__ == "__main__":
    main()
