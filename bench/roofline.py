"""Roofline bounds of the whole pretraining step on accelerators, from XLA's cost analysis.

    python bench/roofline.py [--cases conv4:32:cifar10,resnet32:32:cifar10,resnet34:25:stl10]
                             [--dtypes float32,bfloat16]

For each case (backbone:K:dataset, M = 64) and dtype, the pmapped step of
`steps.whole_step` (augmentation + backbone + relation head + Adam, one device)
is compiled by XLA here (CPU, with `launch.py`'s flags) and its cost analysis read:
FLOPs, bytes accessed and the peak temporary memory. A step cannot run faster than
max(FLOPs / peak FLOP/s, bytes / peak bandwidth) on a chip, which gives a lower bound on
its time and an upper bound on views per second for each chip in PEAKS. The bytes are
those of XLA:CPU's fusion of the program; a GPU or TPU compiler fuses differently (and
more), so the memory-bound figure is indicative, the FLOP-bound one is not. XLA:CPU
computes bfloat16 elementwise work in float32, so its fused bytes hardly differ between
the dtypes; the unfused bytes (the HLO before optimisation, every op reading its operands
and writing its result) show the dtype's effect on traffic.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
from steps import BATCH, whole_step  # noqa: E402

from rr_jax.datasets import get_dataset_spec  # noqa: E402
from rr_jax.xla_flags import CPU_DEFAULTS  # noqa: E402

# Dense peak figures from the vendors' datasheets (no sparsity): FLOP/s for float32 and
# bfloat16 matrix work, and memory bandwidth in bytes/s. float32 on the GPUs is TF32 on
# the tensor cores (XLA's default precision for float32 convolutions and dots on
# NVIDIA GPUs); on TPUs XLA's default precision runs float32 matrix work as bfloat16
# passes, so the bfloat16 peak bounds both.
PEAKS = {
    "H100 SXM": {"float32": 494.7e12, "bfloat16": 989.4e12, "bandwidth": 3.35e12},
    "H200 SXM": {"float32": 494.7e12, "bfloat16": 989.4e12, "bandwidth": 4.8e12},
    "TPU v4": {"float32": 275e12, "bfloat16": 275e12, "bandwidth": 1.2e12},
    "TPU v5e": {"float32": 197e12, "bfloat16": 197e12, "bandwidth": 0.819e12},
}


def step_costs(backbone: str, views: int, dataset: str, dtype: str) -> dict[str, float]:
    """FLOPs, bytes accessed and peak temporary bytes of one compiled step, and the bytes
    its HLO accesses before any fusion (every op reading and writing memory)."""
    step, inputs = whole_step(backbone, views, dataset=dataset, dtype=dtype)
    lowered = jax.jit(step).lower(*inputs)
    compiled = lowered.compile(CPU_DEFAULTS)
    cost, unfused = (c[0] if isinstance(c, list) else c for c in (compiled.cost_analysis(), lowered.cost_analysis()))
    return {"flops": cost["flops"], "bytes": cost["bytes accessed"], "unfused bytes": unfused["bytes accessed"],
            "temp": compiled.memory_analysis().temp_size_in_bytes}


def bound_ms(costs: dict[str, float], chip: dict[str, float], dtype: str) -> float:
    """The roofline lower bound on the step time, in milliseconds."""
    return 1e3 * max(costs["flops"] / chip[dtype], costs["bytes"] / chip["bandwidth"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="conv4:32:cifar10,resnet32:32:cifar10,resnet34:25:stl10")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, XLA cost analysis of the step compiled for "
          f"{jax.devices()[0].device_kind}, M={BATCH}\n")
    chips = " | ".join(f"{name} ms / views/s" for name in PEAKS)
    print(f"| backbone | images | K | dtype | GFLOP | GB accessed | FLOP/byte | unfused GB | temp GiB | {chips} |")
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * len(PEAKS))
    for case in args.cases.split(","):
        backbone, views, dataset = case.split(":")
        views = int(views)
        for dtype in args.dtypes.split(","):
            costs = step_costs(backbone, views, dataset, dtype)
            shape = "x".join(map(str, get_dataset_spec(dataset).image_shape))
            cells = []
            for chip in PEAKS.values():
                ms = bound_ms(costs, chip, dtype)
                cells.append(f"{ms:.2f} / {views * BATCH / ms * 1e3:,.0f}")
            print(f"| {backbone} | {dataset} {shape} | {views} | {dtype} | {costs['flops'] / 1e9:,.0f} | "
                  f"{costs['bytes'] / 1e9:,.1f} | {costs['flops'] / costs['bytes']:.1f} | {costs['unfused bytes'] / 1e9:,.1f} | "
                  f"{costs['temp'] / 2**30:.2f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
