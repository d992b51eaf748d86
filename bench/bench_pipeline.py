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
(`relational_loss` on K x M x 64 embeddings) and Adam's update of every parameter.

--keep-freed-memory first sets glibc's malloc to keep and reuse freed memory
(bench_host_memory.py), before the backend starts; with --official that applies to the
PyTorch step in this process too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_host_memory import keep_freed_memory  # noqa: E402
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
    objective = train.make_objective(config, spec)
    state = train.replicate(train.create_train_state(jax.random.key(0), model, optimizer, spec.image_shape,
                                                     objective=objective))
    if devices < jax.local_device_count():  # pmap over an axis of size n runs on the first n devices
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:devices]), (train.AXIS,))
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(train.AXIS))
        state = jax.tree.map(lambda x: jax.device_put(x[:devices], sharding), state)
    step = train.parallel_train_step(backbone=model, optimizer=optimizer, objective=objective, donate=False)
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


def breakdown_rows(backbones: list[str], views_list: list[int], repeats: int) -> None:
    """The step and its parts, timed interleaved (see the docstring)."""
    import jax.numpy as jnp
    import optax
    from bench_backbones import interleaved

    import rr_jax

    print("| backbone | K | whole step ms | augment ms | backbone fwd+bwd ms | head loss+grad ms | Adam ms "
          "| parts / whole | head share of step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in backbones:
        for views in views_list:
            step, (state, batch) = whole_step(name, views)
            spec = get_dataset_spec("cifar10")
            config = base_config()
            config.model.backbone = name
            augment_config = train.make_objective(config, spec).augment
            model = train.make_backbone(config, axis_name=None)
            params, stats = jax.tree.map(lambda x: x[0], (state.params, state.batch_stats))
            images = jnp.asarray(batch["image"].reshape(-1, *spec.image_shape))
            head_variables = {"params": params["head"], "batch_stats": stats["head"]}
            embeddings = jax.random.normal(jax.random.key(1), (views, BATCH, FEATURES))

            def backbone_grad(backbone_params, x):
                def loss(p):
                    features, updates = model.apply({"params": p, "batch_stats": stats["backbone"]}, x,
                                                    train=True, mutable=["batch_stats"])
                    return jnp.sum(features), updates
                return jax.grad(loss, has_aux=True)(backbone_params)

            def head_grad(z, head_params, key):
                def loss(z, p):
                    return rr_jax.relational_loss(z, {"params": p, "batch_stats": head_variables["batch_stats"]},
                                                  key)[0]
                return jax.grad(loss, argnums=(0, 1))(z, head_params)

            optimizer = optax.adam(1e-3)
            views_array = jax.jit(lambda key: rr_jax.augment_views(key, images, views, augment_config))(
                jax.random.key(0)).reshape(-1, *spec.image_shape)
            parts = {
                "whole": (step, (state, batch)),
                "augment": (lambda key: rr_jax.augment_views(key, images, views, augment_config), (jax.random.key(0),)),
                "backbone": (backbone_grad, (params["backbone"], views_array)),
                "head": (head_grad, (embeddings, params["head"], jax.random.key(2))),
                "adam": (lambda g, s, p: optimizer.update(g, s, p), (params, optimizer.init(params), params)),
            }
            runs = {}
            for part, (fn, args) in parts.items():
                executable = jax.jit(fn).lower(*args).compile(CPU_DEFAULTS)
                runs[part] = (lambda executable=executable, args=args: jax.block_until_ready(executable(*args)))
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
                        help="set glibc's malloc to reuse freed memory first (bench_host_memory.py)")
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
                _, tuned_ms, _ = compile_and_time(
                    step, *inputs, repeats=args.repeats, compiler_options=CPU_DEFAULTS
                )
                row += f" {tuned_ms:.0f} | {step_ms / tuned_ms:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
