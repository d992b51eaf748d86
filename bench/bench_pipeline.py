"""Whole pretraining step throughput: augment K views + backbone + relation head + Adam.

    python bench/bench_pipeline.py [--repeats 5] [--backbones conv4,resnet32] [--views 4,16,32]
                                   [--compare-cpu-defaults | --official]

One pmapped step on all local devices (one on this CPU), M = 64 CIFAR-sized images,
as `launch.py` runs it. Prints a Markdown table: views per second (K * M per step time),
median step time and compile time. With --compare-cpu-defaults each step is also
compiled with `rr_jax.xla_flags.CPU_DEFAULTS` as compiler options (what `launch.py`
adds to XLA_FLAGS) and timed right after, in the same process, with the speed-up.

With --official (needs torch), each step is instead timed end to end against the
official PyTorch code's step (bench/official_torch.py: its PIL DataLoader with 2
workers, Model, aggregate, focal loss and Adam), interleaved round by round in one
process. Ours end to end: a random batch taken from uint8 images in memory, put on the
device, and the step compiled with launch.py's XLA:CPU flags. The speed-up is the median
of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from timing import compile_and_time  # noqa: E402

from rr_jax import train  # noqa: E402
from rr_jax.config import base_config  # noqa: E402
from rr_jax.data import get_dataset_spec  # noqa: E402
from rr_jax.xla_flags import CPU_DEFAULTS  # noqa: E402

BATCH = 64
FEATURES = 64  # conv4 and resnet32 both end in 64 channels


def whole_step(backbone: str, views: int, *, dataset: str = "cifar10", dtype: str = "float32",
               batch: int = BATCH, head: str = "mlp", devices: int | None = None):
    """The pmapped pretraining step as `launch.py` builds it, and inputs for it.

    Returns (jitted step, (replicated state, batch)); the batch holds `batch` random
    uint8 images of the dataset's shape split over the first `devices` local devices
    (default: all of them), where the state is replicated.
    """
    spec = get_dataset_spec(dataset)
    devices = devices or jax.local_device_count()
    config = base_config()
    config.dataset = dataset
    config.model.backbone = backbone
    config.model.dtype = dtype
    config.relational.num_views = views
    config.relational.head = head
    model = train.make_backbone(config)
    optimizer = train.make_optimizer(config, total_steps=1)
    state = train.replicate(train.create_train_state(jax.random.key(0), model, optimizer, spec.image_shape))
    if devices < jax.local_device_count():  # pmap over an axis of size n runs on the first n devices
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:devices]), (train.AXIS,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.AXIS))
        state = jax.tree.map(lambda x: jax.device_put(x[:devices], sharding), state)
    step = train.parallel_train_step(
        backbone=model, optimizer=optimizer, options=train.objective_options(config),
        augment=train.make_augment_config(config, spec), donate=False,
    )
    rng = np.random.default_rng(0)
    images = {"image": rng.integers(0, 256, (devices, batch // devices, *spec.image_shape), np.uint8),
              "label": rng.integers(0, spec.num_classes, (devices, batch // devices), np.int32)}
    return jax.jit(step), (state, images)


def official_rows(backbones: list[str], views_list: list[int], repeats: int) -> None:
    """Ours against the official PyTorch step, end to end, interleaved (see the docstring)."""
    import torch
    from bench_backbones import TORCH_MODELS, interleaved
    from official_torch import official_step

    spec = get_dataset_spec("cifar10")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8 * BATCH, *spec.image_shape), np.uint8)
    devices = jax.local_device_count()
    print(f"torch {torch.__version__} with {torch.get_num_threads()} threads\n")
    print("| backbone | K | ours s/step | official s/step | official / ours |")
    print("|---|---|---|---|---|")
    for name in backbones:
        for views in views_list:
            step, (state, _) = whole_step(name, views)
            compiled = step.lower(state, {
                "image": jax.ShapeDtypeStruct((devices, BATCH // devices, *spec.image_shape), np.uint8),
                "label": jax.ShapeDtypeStruct((devices, BATCH // devices), np.int32),
            }).compile(CPU_DEFAULTS)

            def ours():
                chosen = rng.choice(len(images), BATCH, replace=False)
                batch = {"image": images[chosen].reshape(devices, BATCH // devices, *spec.image_shape),
                         "label": np.zeros((devices, BATCH // devices), np.int32)}
                jax.block_until_ready(compiled(state, jax.device_put(batch)))

            theirs = official_step(TORCH_MODELS[name](), FEATURES, images, views, spec.mean, spec.std, batch=BATCH)
            medians, ratios = interleaved({"ours": ours, "official": theirs}, repeats)
            print(f"| {name} | {views} | {medians['ours'] / 1e3:.3f} | {medians['official'] / 1e3:.3f} | "
                  f"{ratios['official']:.2f}x |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbones", default="conv4,resnet32")
    parser.add_argument("--views", default="4,16,32")
    parser.add_argument("--compare-cpu-defaults", action="store_true",
                        help="also time each step compiled with launch.py's XLA:CPU defaults")
    parser.add_argument("--official", action="store_true",
                        help="time each step end to end against the official PyTorch step instead")
    args = parser.parse_args()
    if args.official:
        return official_rows(args.backbones.split(","), [int(k) for k in args.views.split(",")], args.repeats)
    devices = jax.local_device_count()
    print(f"jax {jax.__version__}, {devices} x {jax.devices()[0].device_kind}, M={BATCH}, "
          f"median of {args.repeats}\n")
    extra = " with CPU_DEFAULTS ms | speed-up |" if args.compare_cpu_defaults else ""
    print("| backbone | K | views/step | step ms | views/s | compile s |" + extra)
    print("|---|---|---|---|---|---|" + "---|" * (2 if extra else 0))
    for name in args.backbones.split(","):
        for views in map(int, args.views.split(",")):
            step, inputs = whole_step(name, views)
            compile_s, step_ms, _ = compile_and_time(step, *inputs, repeats=args.repeats)
            row = (f"| {name} | {views} | {views * BATCH} | {step_ms:.0f} | "
                   f"{views * BATCH / step_ms * 1e3:.0f} | {compile_s:.1f} |")
            if args.compare_cpu_defaults:
                _, tuned_ms, _ = compile_and_time(
                    step, *inputs, repeats=args.repeats, compiler_options=CPU_DEFAULTS
                )
                row += f" {tuned_ms:.0f} | {step_ms / tuned_ms:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
