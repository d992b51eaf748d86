"""Does the pretraining step fit? XLA's estimate of the compiled step against the device's memory.

    python bench/memory_fit.py [--cases conv4:32:cifar10,resnet32:32:cifar10,conv4:2000:cifar10] [--batch 64]

Per case (backbone:K:dataset) on one device: the step lowered for shapes only (nothing is
allocated), compiled, and `rr_jax.memory.step_bytes` of the executable against
`rr_jax.memory.device_memory` (bytes_limit on GPU/TPU, available RAM on CPU), as
`launch.py` checks before its first step; for a case that does not fit, the message a
user gets, with the largest K and M that fit (`rr_jax.memory.compile_checked`).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
import numpy as np  # noqa: E402
from steps import pretraining_config  # noqa: E402

from rr_jax import memory  # noqa: E402
from rr_jax.datasets import get_dataset_spec  # noqa: E402
from rr_jax.errors import OutOfMemoryError  # noqa: E402
from rr_jax.optimizer import make_optimizer  # noqa: E402
from rr_jax.step import create_train_state, make_backbone, make_objective, parallel_train_step  # noqa: E402


def lowering(backbone: str, views: int, dataset: str, batch: int):
    """overrides -> the one-device pmapped step of that case lowered for shapes only."""
    spec = get_dataset_spec(dataset)

    def lower(overrides):
        config = pretraining_config(backbone, views, dataset=dataset)
        config.batch_size = batch
        config.update_from_flattened_dict(overrides)
        model, optimizer = make_backbone(config), make_optimizer(config, total_steps=1)
        objective = make_objective(config, spec)
        state = jax.eval_shape(lambda: create_train_state(jax.random.key(0), model, optimizer, spec.image_shape,
                                                          objective=objective, num_classes=spec.num_classes))
        replicated = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, *np.shape(x)), x.dtype), state)
        images = jax.ShapeDtypeStruct((1, config.batch_size, *spec.image_shape), np.uint8)
        labels = jax.ShapeDtypeStruct((1, config.batch_size), np.int32)
        step = parallel_train_step(backbone=model, optimizer=optimizer, objective=objective)
        return step.lower(replicated, {"image": images, "label": labels})

    return lower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="conv4:32:cifar10,resnet32:32:cifar10,conv4:2000:cifar10")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    devices = jax.local_devices()[:1]
    available = memory.device_memory(devices)
    print(f"# Step memory on {devices[0].device_kind}: {available.bytes / 2**30:.1f} GiB ({available.what})\n")
    print("| backbone | K | dataset | M | step needs (GiB) | fits |")
    print("| --- | --- | --- | --- | --- | --- |")
    messages = []
    for case in args.cases.split(","):
        backbone, views, dataset = case.split(":")
        lower = lowering(backbone, int(views), dataset, args.batch)
        compiled, error = memory.compile_or_out_of_memory(lower({}))
        need = memory.step_bytes(compiled) if compiled is not None else None
        fits = need is not None and need <= available.bytes
        shown = f"{need / 2**30:.2f}" if need is not None else f"compile ran out of memory ({error[:60]}...)"
        print(f"| {backbone} | {views} | {dataset} | {args.batch} | {shown} | {'yes' if fits else 'no'} |")
        if not fits:
            sizes = [memory.Size("K", "relational.num_views", int(views), minimum=2, degree=2),
                     memory.Size("M", "batch_size", args.batch, minimum=2)]
            try:
                memory.compile_checked(lower, sizes, devices=devices, memory=available)
            except OutOfMemoryError as error:
                messages.append(f"- {case}: {error}")
    if messages:
        print("\nWhat `launch.py` says for the cases that do not fit (exit 2, before any data is read):\n")
        print("\n".join(messages))


if __name__ == "__main__":
    main()
