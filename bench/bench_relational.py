"""Relation-head loss + gradient: naive vs factored 'cat', and against a Conv4 step.

    python bench/bench_relational.py [--repeats 10] [--views 2,4,8,16,32] [--dims 64,512]

Prints a Markdown table: per (K, D), the median time of value_and_grad of
`relational_loss` (M = 64) with respect to the embeddings and the head parameters,
naive (aggregated pairs materialised) and factored, with the compiled temporary
memory of each; then, at K=32, M=64, D=64, the head's cost as a fraction of a Conv4
forward + backward on the same K*M 32x32x3 views, measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import jax  # noqa: E402
from steps import BATCH, backbone_step, head_grad  # noqa: E402
from timing import compile_and_time, temp_mib  # noqa: E402

import rr_jax  # noqa: E402
from rr_jax.datasets import get_dataset_spec  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--views", default="2,4,8,16,32")
    parser.add_argument("--dims", default="64,512")
    args = parser.parse_args()
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, M={BATCH}, median of {args.repeats}\n")
    print("| K | D | pairs | naive ms | factored ms | speed-up | naive temp MiB | factored temp MiB |")
    print("|---|---|---|---|---|---|---|---|")
    head_ms = None
    for dim in map(int, args.dims.split(",")):
        variables = rr_jax.init_relation_head(jax.random.key(0), dim)
        for views in map(int, args.views.split(",")):
            z = jax.random.normal(jax.random.key(1), (views, BATCH, dim))
            inputs = (z, variables, jax.random.key(2))
            _, naive_ms, naive = compile_and_time(head_grad(factored=False), *inputs, repeats=args.repeats)
            _, fact_ms, fact = compile_and_time(head_grad(factored=True), *inputs, repeats=args.repeats)
            pairs = views * (views - 1) * BATCH
            print(
                f"| {views} | {dim} | {pairs} | {naive_ms:.1f} | {fact_ms:.1f} | {naive_ms / fact_ms:.2f}x"
                f" | {temp_mib(naive):.1f} | {temp_mib(fact):.1f} |",
                flush=True,
            )
            if (views, dim) == (32, 64):
                head_ms = fact_ms
    if head_ms is not None:
        images = jax.random.uniform(jax.random.key(3), (32 * BATCH, *get_dataset_spec("cifar10").image_shape))
        step, inputs = backbone_step(rr_jax.create_backbone("conv4"), images)
        compile_s, conv_ms, _ = compile_and_time(step, *inputs, repeats=args.repeats)
        print(
            f"\nK=32, M=64, D=64: factored head loss+grad {head_ms:.1f} ms, Conv4 forward+backward on "
            f"{32 * BATCH} 32x32x3 views {conv_ms:.1f} ms (compile {compile_s:.1f} s): "
            f"head = {100 * head_ms / conv_ms:.1f}% of the backbone step."
        )


if __name__ == "__main__":
    main()
