"""Whole pretraining step throughput: augment K views + backbone + relation head + Adam.

    python bench/bench_pipeline.py [--repeats 5] [--backbones conv4,resnet32] [--views 4,16,32]
                                   [--compare-cpu-defaults]

One pmapped step on all local devices (one on this CPU), M = 64 CIFAR-sized images,
as `launch.py` runs it. Prints a Markdown table: views per second (K * M per step time),
median step time and compile time. With --compare-cpu-defaults each step is also
compiled with `rr_jax.xla_flags.CPU_DEFAULTS` as compiler options (what `launch.py`
adds to XLA_FLAGS) and timed right after, in the same process, with the speed-up.
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backbones", default="conv4,resnet32")
    parser.add_argument("--views", default="4,16,32")
    parser.add_argument("--compare-cpu-defaults", action="store_true",
                        help="also time each step compiled with launch.py's XLA:CPU defaults")
    args = parser.parse_args()
    spec = get_dataset_spec("cifar10")
    devices = jax.local_device_count()
    print(f"jax {jax.__version__}, {devices} x {jax.devices()[0].device_kind}, M={BATCH}, "
          f"median of {args.repeats}\n")
    extra = " with CPU_DEFAULTS ms | speed-up |" if args.compare_cpu_defaults else ""
    print("| backbone | K | views/step | step ms | views/s | compile s |" + extra)
    print("|---|---|---|---|---|---|" + "---|" * (2 if extra else 0))
    rng = np.random.default_rng(0)
    batch = {"image": rng.integers(0, 256, (devices, BATCH // devices, 32, 32, 3), np.uint8),
             "label": rng.integers(0, 10, (devices, BATCH // devices), np.int32)}
    for name in args.backbones.split(","):
        for views in map(int, args.views.split(",")):
            config = base_config()
            config.model.backbone = name
            config.relational.num_views = views
            backbone = train.make_backbone(config)
            optimizer = train.make_optimizer(config, total_steps=1)
            objective = train.make_objective(config, spec)
            state = train.create_train_state(jax.random.key(0), backbone, optimizer, spec.image_shape,
                                             objective=objective)
            step = train.parallel_train_step(backbone=backbone, optimizer=optimizer, objective=objective,
                                             donate=False)
            inputs = (train.replicate(state), batch)
            compile_s, step_ms, _ = compile_and_time(jax.jit(step), *inputs, repeats=args.repeats)
            row = (f"| {name} | {views} | {views * BATCH} | {step_ms:.0f} | "
                   f"{views * BATCH / step_ms * 1e3:.0f} | {compile_s:.1f} |")
            if args.compare_cpu_defaults:
                _, tuned_ms, _ = compile_and_time(
                    jax.jit(step), *inputs, repeats=args.repeats, compiler_options=CPU_DEFAULTS
                )
                row += f" {tuned_ms:.0f} | {step_ms / tuned_ms:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
