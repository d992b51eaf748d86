"""Cost of the pretraining monitors in the whole step, at the study config.

    python bench/bench_monitors.py [--repeats 30] [--every 200]

configs/study_fashion_mnist.py (conv4, Fashion-MNIST 28x28x1, M=64, K=8) on all local
devices, as `launch.py` runs it. In one process, side by side:
  off: the pretraining step of a state without an online probe (what every run without
    `--config.online_probe.every_steps` compiles);
  on: the same step with the online probe (one eval-mode forward pass of the batch's
    unaugmented images and one Adam step of the linear classifier);
and the monitors' evaluation (`rr_jax.monitors.Monitors`: kNN top-1 and RankMe of 1000
test images against 5000 training images, online-probe top-1 on the 10 000 test images),
which runs every `--every` steps and is charged per step as its time / every. The two
steps are timed alternately (off, on, off, on, ...) so that load on a shared machine
hits both alike; medians are printed as a Markdown table. Needs Fashion-MNIST (prepared
from Debian's files like the study runs).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from timing import interleaved, median_ms  # noqa: E402

from configs import study_fashion_mnist  # noqa: E402
from rr_jax import batching, datasets, online_probe  # noqa: E402
from rr_jax.features import feature_dim  # noqa: E402
from rr_jax.monitors import Monitors  # noqa: E402
from rr_jax.optimizer import make_optimizer  # noqa: E402
from rr_jax.step import create_train_state, make_backbone, make_objective, parallel_train_step, replicate  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--every", type=int, default=200, help="steps between monitor evaluations")
    args = parser.parse_args()
    config = study_fashion_mnist.get_config()
    config.online_probe.every_steps = config.knn_monitor.every_steps = args.every
    spec = datasets.get_dataset_spec(config.dataset)
    devices = jax.local_device_count()

    backbone = make_backbone(config)
    optimizer = make_optimizer(config, total_steps=1)
    total_steps = batching.steps_per_epoch(60000, config.batch_size) * config.num_epochs  # the study run's 937
    probe_optimizer = online_probe.make_optimizer(config.online_probe.learning_rate, total_steps)
    objective = make_objective(config, spec)
    state = create_train_state(jax.random.key(0), backbone, optimizer, spec.image_shape, objective=objective)
    variables = {"params": state.params["backbone"], "batch_stats": state.batch_stats["backbone"]}
    probe = online_probe.init(jax.random.key(1), feature_dim(backbone, variables, spec.image_shape),
                              spec.num_classes, probe_optimizer)
    step = jax.jit(parallel_train_step(
        backbone=backbone, optimizer=optimizer, objective=objective, probe_optimizer=probe_optimizer, donate=False,
    ))
    rng = np.random.default_rng(0)
    local = config.batch_size // devices
    batch = {"image": rng.integers(0, 256, (devices, local, *spec.image_shape), np.uint8),
             "label": rng.integers(0, spec.num_classes, (devices, local), np.int32)}
    states = {"off": replicate(state), "on": replicate(state.replace(online_probe=probe))}
    runs = {name: (lambda s=replicated: jax.block_until_ready(step(s, batch))) for name, replicated in states.items()}
    step_ms, _ = interleaved(runs, args.repeats)  # the warm-up round compiles

    monitors = Monitors(config, spec, make_backbone(config, axis_name=None))
    evaluations = max(3, args.repeats // 10)
    evaluation_ms = median_ms(lambda: monitors(args.every, variables, probe), evaluations)  # the warm-up compiles

    off = step_ms["off"]
    on = step_ms["on"] + evaluation_ms / args.every
    print(f"jax {jax.__version__}, {devices} x {jax.devices()[0].device_kind}; study config: conv4, "
          f"M={config.batch_size}, K={config.relational.num_views}; medians of {args.repeats} steps "
          f"(alternating) and {evaluations} monitor evaluations\n")
    print("| | ms per step | vs off |")
    print("|---|---|---|")
    print(f"| monitors off | {off:.1f} | - |")
    print(f"| online probe in the step | {step_ms['on']:.1f} | {100 * (step_ms['on'] / off - 1):+.1f}% |")
    print(f"| monitor evaluation ({evaluation_ms:.0f} ms every {args.every} steps), per step | "
          f"{evaluation_ms / args.every:.1f} | {100 * evaluation_ms / args.every / off:+.1f}% |")
    print(f"| all monitors on | {on:.1f} | {100 * (on / off - 1):+.1f}% |")


if __name__ == "__main__":
    main()
