"""Backbone forward+backward on CPU: JAX/XLA against PyTorch, side by side in one run.

The paper's step runs the backbone on K*B = 32*64 = 2048 views of 32x32x3. This script
times value_and_grad of the sum of the features (train mode, BatchNorm statistics
updated) for Conv4 and ResNet-32 in JAX (jitted) and in PyTorch's CPU build, then splits
the ResNet-32 step to show where the time goes: forward alone, backward without kernel
gradients, BatchNorm without batch statistics, bfloat16, without the blocks' CPU
fusion barrier (rr_jax.backbones._materialized), with Flax's BatchNorm instead of
rr_jax.batch_norm's; single convolutions (forward, input gradient, kernel gradient)
and BatchNorm; the kernel gradient rewritten as
matmuls; XLA:CPU compiler options, YNNPACK fusions on and off. Every JAX/PyTorch
pair is timed interleaved (A, B, A, B, ...) and the ratio is the median of the per-round
ratios, so that load from other processes hits both sides alike.

PyTorch is a benchmark-only dependency (`pip install torch`); the PyTorch models mirror
rr_jax.backbones (same layers, NCHW; bench/official_torch.py).

  python bench/bench_backbones.py [--repeats 3] [--views 2048] [--breakdown-views 256]
  python bench/bench_backbones.py --profile /tmp/trace   # only the profile table
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import glob
import gzip
import json
import os
import re
import sys
from unittest import mock

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from jax import lax  # noqa: E402
from official_torch import TORCH_MODELS  # noqa: E402
from steps import BATCH, augment_config, backbone_step  # noqa: E402
from timing import compiled, interleaved, median_ms, wall_ms  # noqa: E402

from rr_jax import backbones  # noqa: E402
from rr_jax.augment import augment_views  # noqa: E402
from rr_jax.backbones import create_backbone  # noqa: E402
from rr_jax.batch_norm import BatchNorm  # noqa: E402
from rr_jax.datasets import get_dataset_spec  # noqa: E402

# XLA:CPU (jaxlib 0.10) hands convolutions, reductions and elementwise ops to YNNPACK
# fusions by default; an empty fusion-type list turns them off (see BENCHMARKS.md).
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
DEFAULTS_ROW = "XLA defaults (rr_jax imported as a library)"
LAUNCH_ROW = "YNNPACK fusions off (launch.py)"
CIFAR10 = get_dataset_spec("cifar10")

# ----------------------------------------------------------------- tables


class Table:
    def __init__(self, title: str, columns: tuple[str, ...]):
        print(f"\n### {title}\n\n| " + " | ".join(columns) + " |\n|" + "---|" * len(columns), flush=True)

    @staticmethod
    def row(*cells) -> None:
        text = (f"{c:.1f}" if isinstance(c, float) else str(c) for c in cells)
        print("| " + " | ".join(text) + " |", flush=True)


def pair_row(table: Table, label: str, jax_run, torch_run, repeats: int, compile_s: float) -> float:
    medians, ratios = interleaved({"jax": jax_run, "torch": torch_run}, repeats)
    table.row(label, medians["jax"], medians["torch"], f"{1 / ratios['torch']:.2f}", f"{compile_s:.1f}")
    return medians["jax"]


# ----------------------------------------------------------------- steps


def jax_step(name, x, *, dtype=jnp.float32, options=None, fusion_barrier=True, flax_batch_norm=False, **grad_options):
    """`steps.backbone_step` compiled with XLA `options`: (run, compile seconds);
    fusion_barrier=False traces the ResNet blocks without their CPU fusion barrier,
    flax_batch_norm=True with flax.linen.BatchNorm instead of rr_jax.batch_norm's."""
    fn, args = backbone_step(create_backbone(name, dtype=dtype), x, **grad_options)
    with contextlib.ExitStack() as patches:
        if not fusion_barrier:
            patches.enter_context(mock.patch.object(backbones, "_materialized", lambda x: x))
        if flax_batch_norm:
            patches.enter_context(mock.patch.object(backbones, "BatchNorm", nn.BatchNorm))
        return compiled(fn, *args, options=options)


def torch_step(name, x, *, train=True, kernel_grads=True, forward_only=False, bf16=False, channels_last=False):
    model = TORCH_MODELS[name]().train(train)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(kernel_grads or p.dim() != 4)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if forward_only:
                with torch.no_grad():
                    return model(x).sum()
            model.zero_grad(set_to_none=True)
            model(x).float().sum().backward()

    return run


def images(n: int, seed: int = 0) -> tuple[jax.Array, torch.Tensor]:
    """n random CIFAR-sized images, NHWC for JAX and NCHW for PyTorch."""
    x = np.random.default_rng(seed).normal(size=(n, *CIFAR10.image_shape)).astype(np.float32)
    return jnp.asarray(x), torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ----------------------------------------------------------------- sections

COLUMNS = ("case", "JAX ms", "PyTorch ms", "JAX / PyTorch", "JAX compile s")


def models(views: int, repeats: int) -> dict[str, float]:
    """The model table; returns Conv4's JAX ms with XLA's defaults and with YNNPACK off."""
    table = Table(f"Forward+backward, {views} views of 32x32x3", COLUMNS)
    xj, xt = images(views)
    conv4_ms = {}
    variants = [
        ("before: XLA defaults, Flax BatchNorm, no block fusion barrier", dict(flax_batch_norm=True, fusion_barrier=False)),
        (DEFAULTS_ROW, {}),
        (LAUNCH_ROW, dict(options=NO_YNN)),
        ("YNNPACK off, Flax BatchNorm", dict(options=NO_YNN, flax_batch_norm=True)),
        ("YNNPACK off, no block fusion barrier", dict(options=NO_YNN, fusion_barrier=False)),
    ]
    for name in TORCH_MODELS:
        for variant, options in variants:
            if name == "conv4" and variant.endswith("no block fusion barrier") and "Flax" not in variant:
                continue  # Conv4 has no residual blocks: the barrier changes nothing
            run, compile_s = jax_step(name, xj, **options)
            ms = pair_row(table, f"{name}, {variant}", run, torch_step(name, xt), repeats, compile_s)
            if name == "conv4" and variant in (DEFAULTS_ROW, LAUNCH_ROW):
                conv4_ms[variant == LAUNCH_ROW] = ms
    return conv4_ms


def breakdown(views: int, repeats: int) -> None:
    table = Table(f"Where the ResNet-32 step goes, {views} views", COLUMNS)
    xj, xt = images(views)
    cases = [
        ("forward only (train mode)", dict(forward_only=True), dict(forward_only=True)),
        ("fwd+bwd, no kernel gradients", dict(kernel_grads=False), dict(kernel_grads=False)),
        ("fwd+bwd, BN with running stats", dict(train=False), dict(train=False)),
        ("fwd+bwd (full step)", {}, {}),
        ("fwd+bwd, YNNPACK fusions off", dict(options=NO_YNN), {}),
        ("fwd+bwd, YNNPACK off, no block fusion barrier", dict(options=NO_YNN, fusion_barrier=False), {}),
        ("fwd+bwd, YNNPACK off, Flax BatchNorm", dict(options=NO_YNN, flax_batch_norm=True), {}),
        ("fwd+bwd, no block fusion barrier (XLA defaults)", dict(fusion_barrier=False), {}),
        ("fwd+bwd, PyTorch channels_last", {}, dict(channels_last=True)),
        ("fwd+bwd, bfloat16 compute", dict(dtype=jnp.bfloat16), dict(bf16=True)),
    ]
    for label, jax_options, torch_options in cases:
        run, compile_s = jax_step("resnet32", xj, **jax_options)
        pair_row(table, label, run, torch_step("resnet32", xt, **torch_options), repeats, compile_s)


# (image size, input channels, output channels, kernel size, stride) of the single convolutions
CONV_CASES = ((32, 16, 16, 3, 1), (8, 64, 64, 3, 1), (32, 16, 32, 3, 2), (32, 16, 32, 1, 2))


def conv_operands(rng: np.random.Generator, views: int, size: int, cin: int, cout: int, k: int,
                  s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random float32 input x[views, size, size, cin], kernel w[k, k, cin, cout] and output
    gradient g[views, size / s, size / s, cout] of a convolution."""
    shapes = ((views, size, size, cin), (k, k, cin, cout), (views, size // s, size // s, cout))
    return tuple(rng.normal(size=shape).astype(np.float32) for shape in shapes)


def conv(x: jax.Array, w: jax.Array, s: int) -> jax.Array:
    """NHWC convolution of x with the kernel w[k, k, Cin, Cout], stride s, padding k // 2."""
    p = w.shape[0] // 2
    return lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_kernel_grad(x: jax.Array, w: jax.Array, g: jax.Array, s: int) -> jax.Array:
    """XLA's gradient of `conv` with respect to the kernel, for the output gradient g."""
    return jax.vjp(lambda w: conv(x, w, s), w)[1](g)[0]


def conv_ops(views: int, repeats: int) -> None:
    table = Table(f"Single ops, batch {views} (NHWC in JAX, NCHW in PyTorch)", COLUMNS)
    rng = np.random.default_rng(1)
    for size, cin, cout, k, s in CONV_CASES:
        p = k // 2
        x, w, g = conv_operands(rng, views, size, cin, cout, k, s)
        layouts = ((x, (0, 3, 1, 2)), (w, (3, 2, 0, 1)), (g, (0, 3, 1, 2)))
        xt, wt, gt = (torch.from_numpy(np.ascontiguousarray(a.transpose(*t))) for a, t in layouts)

        def torch_grad(mask):
            return lambda: torch.ops.aten.convolution_backward(gt, xt, wt, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)

        label = f"conv {k}x{k}/{s} {cin}->{cout} on {size}x{size}"
        jax_cases = [
            ("forward", functools.partial(conv, s=s), lambda: F.conv2d(xt, wt, stride=s, padding=p)),
            ("input gradient", lambda x, w, g: jax.vjp(lambda x: conv(x, w, s), x)[1](g)[0], torch_grad([True, False, False])),
            ("kernel gradient", functools.partial(conv_kernel_grad, s=s), torch_grad([False, True, False])),
        ]
        for what, fn, torch_run in jax_cases:
            args = (x, w) if what == "forward" else (x, w, g)
            run, compile_s = compiled(fn, *map(jnp.asarray, args))
            pair_row(table, f"{label}: {what}", run, torch_run, repeats, compile_s)

    x = rng.normal(size=(views, 32, 32, 16)).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).requires_grad_(True)
    gt = torch.from_numpy(np.ascontiguousarray(g.transpose(0, 3, 1, 2)))
    bn = torch.nn.BatchNorm2d(16).train()

    def torch_bn():
        return torch.autograd.grad(bn(xt), [xt, *bn.parameters()], gt)

    modules = {
        "rr_jax BatchNorm": BatchNorm(use_running_average=False, momentum=0.9),
        "Flax, E[x^2]-E[x]^2 (one pass)": nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5),
        "Flax, E[(x-mean)^2] (two passes)": nn.BatchNorm(
            use_running_average=False, momentum=0.9, epsilon=1e-5, use_fast_variance=False
        ),
    }
    for variant, module in modules.items():
        variables = module.init(jax.random.key(0), x[:2])

        def bn_grad(params, x, g):
            def f(params, x):
                return module.apply({**variables, "params": params}, x, mutable=["batch_stats"])[0]

            return jax.vjp(f, params, x)[1](g)

        for flags, options in (("", None), (", YNNPACK off", NO_YNN)):
            run, compile_s = compiled(bn_grad, variables["params"], jnp.asarray(x), jnp.asarray(g), options=options)
            pair_row(table, f"BatchNorm fwd+bwd 32x32x16, {variant}{flags}", run, torch_bn, repeats, compile_s)


def kernel_gradient_rewrites(views: int, repeats: int) -> None:
    """XLA's kernel-gradient convolution against the same gradient written as matmuls:
    one dot per kernel tap (slice of the padded input, transposed, times the output
    gradient) and one im2col dot; and XLA's convolution with YNNPACK fusions off. Checks
    they agree, then times them interleaved."""
    columns = ("conv", "XLA conv ms", "XLA conv, YNNPACK off ms", "per-tap dots ms", "im2col dot ms")
    table = Table(f"Kernel gradient rewrites, batch {views}", columns)
    rng = np.random.default_rng(3)
    for size, cin, cout, k, s in CONV_CASES:
        p = k // 2
        x, w, g = map(jnp.asarray, conv_operands(rng, views, size, cin, cout, k, s))

        def taps(x, g):
            padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
            limit = lambda i, n: i + (n - 1) * s + 1  # noqa: E731
            return [lax.slice(padded, (0, i, j, 0), (views, limit(i, g.shape[1]), limit(j, g.shape[2]), cin), (1, s, s, 1))
                    for i in range(k) for j in range(k)]

        xla = functools.partial(conv_kernel_grad, s=s)

        def per_tap(x, w, g):
            flat = g.reshape(-1, cout)
            return jnp.stack([t.reshape(-1, cin).T @ flat for t in taps(x, g)]).reshape(w.shape)

        def im2col(x, w, g):
            patches = jnp.concatenate(taps(x, g), axis=-1).reshape(-1, k * k * cin)
            return (patches.T @ g.reshape(-1, cout)).reshape(w.shape)

        variants = {"xla": (xla, {}), "xla_no_ynn": (xla, NO_YNN), "taps": (per_tap, {}), "im2col": (im2col, {})}
        reference = jax.jit(xla)(x, w, g)
        runs = {}
        for name, (fn, options) in variants.items():
            runs[name], _ = compiled(fn, x, w, g, options=options)
            np.testing.assert_allclose(runs[name](), reference, rtol=1e-3, atol=1e-2)
        medians, _ = interleaved(runs, repeats)
        table.row(f"{k}x{k}/{s} {cin}->{cout} on {size}x{size}", *(medians[name] for name in variants))


def xla_options(views: int, repeats: int) -> None:
    table = Table(f"XLA:CPU compiler options, JAX ResNet-32 fwd+bwd, {views} views", ("options", "ms", "vs default"))
    xj, _ = images(views)
    variants = {
        "default": {},
        "xla_cpu_experimental_ynn_fusion_type='' (YNNPACK fusions off)": NO_YNN,
        "xla_cpu_use_onednn + onednn_custom_call": {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_custom_call": True},
        "xla_cpu_use_xnnpack": {"xla_cpu_use_xnnpack": True},
        "xla_cpu_multi_thread_eigen=false": {"xla_cpu_multi_thread_eigen": False},
    }
    runs = {name: jax_step("resnet32", xj, options=options)[0] for name, options in variants.items()}
    medians, ratios = interleaved(runs, repeats)
    for name in variants:
        table.row(name, medians[name], f"{ratios[name]:.2f}")


def profile(views: int, trace_dir: str) -> None:
    """Profiles one ResNet-32 step with YNNPACK fusions off and sums the time of XLA's
    kernels by kind (the HLO name without its numeric suffix)."""
    xj, _ = images(views)
    run, _ = jax_step("resnet32", xj, options=NO_YNN)
    run()
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    step_ms = wall_ms(run)
    jax.profiler.stop_trace()
    trace = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
    with gzip.open(trace) as f:
        events = json.load(f)["traceEvents"]
    totals, counts = collections.Counter(), collections.Counter()
    for event in events:  # XLA kernels are named after HLO instructions: lower_case-name.N
        match = re.fullmatch(r"([a-z][a-z0-9_-]*)(\.\d+)*", event.get("name", ""))
        if event.get("ph") == "X" and match:
            totals[match[1]] += event["dur"] / 1e3
            counts[match[1]] += 1
    table = Table(f"Profile of one ResNet-32 step, {views} views, YNNPACK fusions off ({step_ms:.0f} ms)",
                  ("XLA kernel kind", "count", "ms", "share of step"))
    for kind, ms in totals.most_common(8):
        table.row(kind, counts[kind], ms, f"{100 * ms / step_ms:.0f} %")


def augmentation(views: int, repeats: int, conv4_ms: dict[bool, float]) -> None:
    """augment_views on the model table's views, with XLA's defaults and with YNNPACK
    fusions off, each against Conv4's forward + backward under the same flags
    (``conv4_ms[ynn_off]``)."""
    num_views = views // BATCH
    images_u8 = jnp.asarray(np.random.default_rng(2).integers(0, 256, (BATCH, *CIFAR10.image_shape), dtype=np.uint8))
    config = augment_config("cifar10")
    columns = ("XLA flags", "JAX ms", "share of Conv4 fwd+bwd", "JAX compile s")
    table = Table(f"augment_views, {num_views} views of {BATCH} images", columns)
    for ynn_off, flags in ((False, "defaults"), (True, "YNNPACK fusions off (launch.py)")):
        run, compile_s = compiled(
            lambda key: augment_views(key, images_u8, num_views, config), jax.random.key(0),
            options=NO_YNN if ynn_off else None,
        )
        ms = median_ms(run, repeats)
        table.row(flags, ms, f"{100 * ms / conv4_ms[ynn_off]:.0f} % (goal <= 25 %)", f"{compile_s:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row (after one warm-up)")
    parser.add_argument("--views", type=int, default=2048, help="views per step for the model table (K*B)")
    parser.add_argument("--breakdown-views", type=int, default=256, help="batch for the breakdown tables")
    parser.add_argument("--profile", metavar="DIR", help="only profile a ResNet-32 step, trace into DIR")
    args = parser.parse_args()
    if args.profile:
        return profile(args.breakdown_views, args.profile)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({os.cpu_count()} cores), "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    conv4_ms = models(args.views, args.repeats)
    augmentation(args.views, args.repeats, conv4_ms)
    breakdown(args.breakdown_views, args.repeats)
    conv_ops(args.breakdown_views, 5 * args.repeats)  # single ops are fast and noisier
    kernel_gradient_rewrites(args.breakdown_views, 5 * args.repeats)
    xla_options(args.breakdown_views, args.repeats)


if __name__ == "__main__":
    main()
