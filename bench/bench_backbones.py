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

PyTorch is a benchmark-only dependency (`pip install torch`); the PyTorch models are
written here to mirror rr_jax.backbones (same layers, NCHW).

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
import statistics
import time
from collections.abc import Callable
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from jax import lax

from rr_jax import backbones
from rr_jax.augment import AugmentConfig, augment_views
from rr_jax.backbones import create_backbone
from rr_jax.batch_norm import BatchNorm

torch.set_num_threads(os.cpu_count())  # XLA:CPU also uses every core

# XLA:CPU (jaxlib 0.10) hands convolutions, reductions and elementwise ops to YNNPACK
# fusions by default; an empty fusion-type list turns them off (see BENCHMARKS.md).
NO_YNN = {"xla_cpu_experimental_ynn_fusion_type": ""}
DEFAULTS_ROW = "XLA defaults (rr_jax imported as a library)"
LAUNCH_ROW = "YNNPACK fusions off (launch.py)"

# ----------------------------------------------------------------- PyTorch models


class TorchConv4(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layers, cin = [], 3
        for i, c in enumerate((8, 16, 32, 64)):
            if i:
                layers.append(torch.nn.AvgPool2d(2))
            layers += [torch.nn.Conv2d(cin, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c), torch.nn.ReLU()]
            cin = c
        self.net = torch.nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x).mean((2, 3))


class TorchBasicBlock(torch.nn.Module):
    def __init__(self, cin, c, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, c, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.downsample = None
        if stride != 1 or cin != c:
            self.downsample = torch.nn.Sequential(
                torch.nn.Conv2d(cin, c, 1, stride, bias=False), torch.nn.BatchNorm2d(c)
            )

    def forward(self, x):
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchCifarResNet(torch.nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        blocks, cin = [], 16
        for stage, c in enumerate((16, 32, 64)):
            for b in range((depth - 2) // 6):
                blocks.append(TorchBasicBlock(cin, c, 2 if stage and not b else 1))
                cin = c
        self.blocks = torch.nn.Sequential(*blocks)

    def forward(self, x):
        return self.blocks(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3))


TORCH_MODELS = {"conv4": TorchConv4, "resnet32": functools.partial(TorchCifarResNet, 32)}

# ----------------------------------------------------------------- timing


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict, dict]:
    """Median ms of each fn, and the median per-round ratio of each fn to the first one."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(1e3 * (time.perf_counter() - start))
    first = times[next(iter(fns))]
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(t, first)) for name, t in times.items()}
    return medians, ratios


def compiled(fn: Callable, *args, options: dict | None = None) -> tuple[Callable[[], object], float]:
    """jit(fn) compiled for args (with XLA compiler options); returns (run, compile seconds)."""
    start = time.perf_counter()
    executable = jax.jit(fn).lower(*args).compile(compiler_options=options or {})
    seconds = time.perf_counter() - start
    return (lambda: jax.block_until_ready(executable(*args))), seconds


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


def jax_step(name, x, *, train=True, kernel_grads=True, forward_only=False, dtype=jnp.float32, options=None,
             fusion_barrier=True, flax_batch_norm=False):
    """Jitted value_and_grad of sum(features) w.r.t. the parameters (kernels optional);
    fusion_barrier=False traces the ResNet blocks without their CPU fusion barrier,
    flax_batch_norm=True with flax.linen.BatchNorm instead of rr_jax.batch_norm's."""
    model = create_backbone(name, dtype=dtype)
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x[:2])

    def loss(params, batch_stats, x):
        if not kernel_grads:
            params = jax.tree_util.tree_map_with_path(
                lambda path, p: lax.stop_gradient(p) if path[-1].key == "kernel" else p, params
            )
        features, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=train, mutable=["batch_stats"]
        )
        return features.sum(), updates

    fn = loss if forward_only else jax.value_and_grad(loss, has_aux=True)
    with contextlib.ExitStack() as patches:
        if not fusion_barrier:
            patches.enter_context(mock.patch.object(backbones, "_materialized", lambda x: x))
        if flax_batch_norm:
            patches.enter_context(mock.patch.object(backbones, "BatchNorm", nn.BatchNorm))
        return compiled(fn, variables["params"], variables["batch_stats"], x, options=options)


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
    x = np.random.default_rng(seed).normal(size=(n, 32, 32, 3)).astype(np.float32)
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


def conv_ops(views: int, repeats: int) -> None:
    table = Table(f"Single ops, batch {views} (NHWC in JAX, NCHW in PyTorch)", COLUMNS)
    rng = np.random.default_rng(1)
    for size, cin, cout, k, s in ((32, 16, 16, 3, 1), (8, 64, 64, 3, 1), (32, 16, 32, 3, 2), (32, 16, 32, 1, 2)):
        p = k // 2
        x = rng.normal(size=(views, size, size, cin)).astype(np.float32)
        w = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
        g = rng.normal(size=(views, size // s, size // s, cout)).astype(np.float32)
        layouts = ((x, (0, 3, 1, 2)), (w, (3, 2, 0, 1)), (g, (0, 3, 1, 2)))
        xt, wt, gt = (torch.from_numpy(np.ascontiguousarray(a.transpose(*t))) for a, t in layouts)

        def conv(x, w):
            return lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

        def torch_grad(mask):
            return lambda: torch.ops.aten.convolution_backward(gt, xt, wt, None, [s, s], [p, p], [1, 1], False, [0, 0], 1, mask)

        label = f"conv {k}x{k}/{s} {cin}->{cout} on {size}x{size}"
        jax_cases = [
            ("forward", conv, lambda: F.conv2d(xt, wt, stride=s, padding=p)),
            ("input gradient", lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0], torch_grad([True, False, False])),
            ("kernel gradient", lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](g)[0], torch_grad([False, True, False])),
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
    for size, cin, cout, k, s in ((32, 16, 16, 3, 1), (8, 64, 64, 3, 1), (32, 16, 32, 3, 2), (32, 16, 32, 1, 2)):
        p = k // 2
        x, w, g = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in
                   ((views, size, size, cin), (k, k, cin, cout), (views, size // s, size // s, cout)))

        def taps(x, g):
            padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
            limit = lambda i, n: i + (n - 1) * s + 1  # noqa: E731
            return [lax.slice(padded, (0, i, j, 0), (views, limit(i, g.shape[1]), limit(j, g.shape[2]), cin), (1, s, s, 1))
                    for i in range(k) for j in range(k)]

        def xla(x, w, g):
            conv = lambda w: lax.conv_general_dilated(x, w, (s, s), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
            return jax.vjp(conv, w)[1](g)[0]

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
    start = time.perf_counter()
    run()
    step_ms = 1e3 * (time.perf_counter() - start)
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
    batch = 64
    num_views = views // batch
    images_u8 = jnp.asarray(np.random.default_rng(2).integers(0, 256, (batch, 32, 32, 3), dtype=np.uint8))
    config = AugmentConfig(mean=(0.491, 0.482, 0.447), std=(0.247, 0.243, 0.262))
    columns = ("XLA flags", "JAX ms", "share of Conv4 fwd+bwd", "JAX compile s")
    table = Table(f"augment_views, {num_views} views of {batch} images", columns)
    for ynn_off, flags in ((False, "defaults"), (True, "YNNPACK fusions off (launch.py)")):
        run, compile_s = compiled(
            lambda key: augment_views(key, images_u8, num_views, config), jax.random.key(0),
            options=NO_YNN if ynn_off else None,
        )
        ms = interleaved({"augment": run}, repeats)[0]["augment"]
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
