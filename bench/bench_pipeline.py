"""Whole pretraining step throughput: augment K views + backbone + relation head + Adam.

    python bench/bench_pipeline.py [--repeats 5] [--backbones conv4,resnet32] [--views 4,16,32]
                                   [--compare-cpu-defaults | --official | --breakdown]

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

With --breakdown, the step's parts are compiled on their own (launch.py's XLA:CPU flags)
and timed interleaved with the whole step, round by round: augment_views of the K*M
views, the backbone's forward + backward on them, the relation head's loss + gradient
(`relational_loss` on K x M x D embeddings, D the backbone's feature size) and Adam's update of every parameter.

--keep-freed-memory first sets glibc's malloc to keep and reuse freed memory
(bench/malloc.py), before the backend starts; with --official that applies to the
PyTorch step in this process too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from malloc import keep_freed_memory  # noqa: E402
from steps import (  # noqa: E402
    BATCH,
    augment_config,
    backbone_grad,
    feature_size,
    head_grad,
    pretraining_config,
    whole_step,
)
from timing import compile_and_time, compile_fn, compiled, interleaved  # noqa: E402

import rr_jax  # noqa: E402
from rr_jax.backbones import create_backbone  # noqa: E402
from rr_jax.datasets import get_dataset_spec  # noqa: E402
from rr_jax.optimizer import make_optimizer  # noqa: E402
from rr_jax.xla_flags import CPU_DEFAULTS  # noqa: E402


def official_rows(backbones: list[str], views_list: list[int], repeats: int) -> None:
    """Ours against the official PyTorch step, end to end, interleaved (see the docstring)."""
    import torch
    from official_torch import TORCH_MODELS, official_step

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
            executable, _ = compile_fn(step, state, {
                "image": jax.ShapeDtypeStruct((devices, BATCH // devices, *spec.image_shape), np.uint8),
                "label": jax.ShapeDtypeStruct((devices, BATCH // devices), np.int32),
            }, options=CPU_DEFAULTS)

            def ours():
                chosen = rng.choice(len(images), BATCH, replace=False)
                batch = {"image": images[chosen].reshape(devices, BATCH // devices, *spec.image_shape),
                         "label": np.zeros((devices, BATCH // devices), np.int32)}
                jax.block_until_ready(executable(state, jax.device_put(batch)))

            theirs = official_step(TORCH_MODELS[name](), feature_size(name, spec.image_shape), images, views,
                                   spec.mean, spec.std, batch=BATCH)
            medians, ratios = interleaved({"ours": ours, "official": theirs}, repeats)
            print(f"| {name} | {views} | {medians['ours'] / 1e3:.3f} | {medians['official'] / 1e3:.3f} | "
                  f"{ratios['official']:.2f}x |", flush=True)


def breakdown_rows(backbones: list[str], views_list: list[int], repeats: int) -> None:
    """The step and its parts, timed interleaved (see the docstring)."""
    spec = get_dataset_spec("cifar10")
    augment = augment_config()
    print("| backbone | K | whole step ms | augment ms | backbone fwd+bwd ms | head loss+grad ms | Adam ms "
          "| parts / whole | head share of step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in backbones:
        for views in views_list:
            step, (state, batch) = whole_step(name, views)
            params, stats = jax.tree.map(lambda x: x[0], (state.params, state.batch_stats))
            images = jnp.asarray(batch["image"].reshape(-1, *spec.image_shape))
            embeddings = jax.random.normal(jax.random.key(1), (views, BATCH, feature_size(name, spec.image_shape)))
            optimizer = make_optimizer(pretraining_config(name, views), total_steps=1)
            views_array = jax.jit(lambda key: rr_jax.augment_views(key, images, views, augment))(
                jax.random.key(0)).reshape(-1, *spec.image_shape)
            parts = {
                "whole": (step, (state, batch)),
                "augment": (lambda key: rr_jax.augment_views(key, images, views, augment), (jax.random.key(0),)),
                "backbone": (backbone_grad(create_backbone(name)), (params["backbone"], stats["backbone"], views_array)),
                "head": (head_grad(), (embeddings, {"params": params["head"], "batch_stats": stats["head"]},
                                       jax.random.key(2))),
                "adam": (optimizer.update, (params, optimizer.init(params), params)),
            }
            runs = {part: compiled(fn, *args, options=CPU_DEFAULTS)[0] for part, (fn, args) in parts.items()}
            medians, ratios = interleaved(runs, repeats)
            total = sum(medians[p] for p in parts if p != "whole")
            print(f"| {name} | {views} | {medians['whole']:.0f} | {medians['augment']:.0f} | {medians['backbone']:.0f} | "
                  f"{medians['head']:.0f} | {medians['adam']:.1f} | {total / medians['whole']:.2f} | "
                  f"{100 * ratios['head']:.0f}% |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbones", default="conv4,resnet32")
    parser.add_argument("--views", default="4,16,32")
    parser.add_argument("--compare-cpu-defaults", action="store_true",
                        help="also time each step compiled with launch.py's XLA:CPU defaults")
    parser.add_argument("--official", action="store_true",
                        help="time each step end to end against the official PyTorch step instead")
    parser.add_argument("--breakdown", action="store_true",
                        help="time the step's parts (augmentation, backbone, head, Adam) interleaved with it")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="set glibc's malloc to reuse freed memory first (bench/malloc.py)")
    args = parser.parse_args()
    if args.keep_freed_memory:
        keep_freed_memory()
    if args.breakdown:
        return breakdown_rows(args.backbones.split(","), [int(k) for k in args.views.split(",")], args.repeats)
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
                _, tuned_ms, _ = compile_and_time(step, *inputs, repeats=args.repeats, options=CPU_DEFAULTS)
                row += f" {tuned_ms:.0f} | {step_ms / tuned_ms:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
