"""Backbones against a NumPy reference, exact parameter counts, init statistics, pmap BN."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from rr_jax.backbones import BACKBONES, BasicBlock, Bottleneck, ResNet, _materialized, create_backbone

EPS = 1e-5
MOMENTUM = 0.1  # PyTorch convention: new = (1 - MOMENTUM) * old + MOMENTUM * batch


pytestmark = pytest.mark.usefixtures("fast_compile")


def _images(seed, shape):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _init(model, x):
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), x)


def _forward(model, variables, x):
    """Train- and eval-mode forward in one compilation: {train: (features, batch_stats)}."""

    def both(variables, x):
        outputs = {}
        for train in (True, False):
            features, updates = model.apply(variables, x, train=train, mutable=["batch_stats"])
            outputs[train] = features, updates["batch_stats"]
        return outputs

    return jax.jit(both)(variables, x)


def _perturbed(variables, seed):
    """Random BN scale/bias and running statistics, so that none of them is trivial."""
    rng = np.random.default_rng(seed)

    def perturb(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
        if name in ("bias", "mean"):
            return rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
        return np.asarray(leaf)

    return jax.tree_util.tree_map_with_path(perturb, variables)


# ---------------------------------------------------------------- NumPy reference


def np_conv(x, w, stride=1):
    """PyTorch-style convolution: symmetric zero padding k // 2, no bias. x NHWC, w HWIO."""
    k = w.shape[0]
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    ho = (x.shape[1] + 2 * p - k) // stride + 1
    wo = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], ho, wo, w.shape[3]), np.float64)
    for i in range(k):
        for j in range(k):
            patch = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride]
            out += patch @ w[i, j]
    return out


def np_bn(x, params, stats_in, stats_out, train):
    """BatchNorm over N, H, W; writes the updated running statistics into stats_out."""
    if train:
        mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
        stats_out["mean"] = (1 - MOMENTUM) * stats_in["mean"] + MOMENTUM * mean
        stats_out["var"] = (1 - MOMENTUM) * stats_in["var"] + MOMENTUM * var
    else:
        mean, var = stats_in["mean"], stats_in["var"]
        stats_out.update(stats_in)
    return (x - mean) / np.sqrt(var + EPS) * params["scale"] + params["bias"]


def np_conv_bn(x, p, s, out, conv, bn, train, stride=1):
    out[bn] = {}
    return np_bn(np_conv(x, p[conv]["kernel"], stride), p[bn], s[bn], out[bn], train)


def np_conv4(x, variables, train):
    p, s = variables["params"], variables["batch_stats"]
    new = {}
    for i in range(1, 5):
        if i > 1:
            n, h, w, c = x.shape
            x = x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))
        name = f"layer{i}"
        new[name] = {}
        x = np.maximum(np_conv_bn(x, p[name], s[name], new[name], "conv", "bn", train), 0)
    return x.mean((1, 2)), new


def np_max_pool_3x3_s2(x):
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    ho, wo = (x.shape[1] - 1) // 2 + 1, (x.shape[2] - 1) // 2 + 1
    windows = [xp[:, i : i + 2 * ho : 2, j : j + 2 * wo : 2] for i in range(3) for j in range(3)]
    return np.max(windows, axis=0)


def np_resnet(x, variables, train, stage_sizes, stem):
    p, s = variables["params"], variables["batch_stats"]
    new = {}
    x = np_conv_bn(x, p, s, new, "conv1", "bn1", train, stride=1 if stem == "cifar" else 2)
    x = np.maximum(x, 0)
    if stem == "imagenet":
        x = np_max_pool_3x3_s2(x)
    for st, blocks in enumerate(stage_sizes):
        for b in range(blocks):
            name = f"layer{st + 1}_{b}"
            bp, bs, bn = p[name], s[name], new.setdefault(name, {})
            stride = 2 if st > 0 and b == 0 else 1
            if "conv3" in bp:  # bottleneck: the stride in the 3x3 convolution (torchvision)
                y = np.maximum(np_conv_bn(x, bp, bs, bn, "conv1", "bn1", train), 0)
                y = np.maximum(np_conv_bn(y, bp, bs, bn, "conv2", "bn2", train, stride), 0)
                y = np_conv_bn(y, bp, bs, bn, "conv3", "bn3", train)
            else:
                y = np.maximum(np_conv_bn(x, bp, bs, bn, "conv1", "bn1", train, stride), 0)
                y = np_conv_bn(y, bp, bs, bn, "conv2", "bn2", train)
            if "downsample_conv" in bp:
                x = np_conv_bn(x, bp, bs, bn, "downsample_conv", "downsample_bn", train, stride)
            x = np.maximum(x + y, 0)
    return x.mean((1, 2)), new


# ---------------------------------------------------------------- tests

EXPECTED = {  # name: (trainable parameters, feature size D)
    "conv4": (24_648, 64),
    "resnet8": (77_392, 64),
    "resnet20": (271_824, 64),
    "resnet32": (466_256, 64),
    "resnet56": (855_120, 64),
    "resnet18": (11_176_512, 512),
    "resnet34": (21_284_672, 512),
    "resnet50": (23_508_032, 2048),  # torchvision's 25 557 032 less the 2048x1000 classifier
}


def test_every_backbone_is_checked():
    assert set(EXPECTED) == set(BACKBONES)


@pytest.mark.parametrize(
    "name, options, params",
    [(name, {}, count) for name, (count, _) in EXPECTED.items()]
    # A 3x3 instead of a 7x7 stem convolution (3 -> 64 channels) for small images.
    + [(name, {"stem": "cifar"}, EXPECTED[name][0] - (49 - 9) * 3 * 64) for name in ("resnet18", "resnet34")],
)
def test_parameter_count_and_feature_shape(name, options, params):
    model = create_backbone(name, **options)
    x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    assert sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"])) == params
    dim = EXPECTED[name][1]
    out = jax.eval_shape(functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables, x)
    assert out[0].shape == (3, dim) and out[0].dtype == jnp.float32


def _check_against_numpy(model, variables, x, reference):
    """Features and running statistics in both modes against the NumPy reference.

    Train mode normalises with batch statistics and moves the running statistics by the
    momentum; eval mode normalises with the running statistics and leaves them as they were.
    """
    for train, (features, batch_stats) in _forward(model, variables, x).items():
        ref_features, ref_stats = reference(x.astype(np.float64), variables, train)
        np.testing.assert_allclose(features, ref_features, rtol=1e-4, atol=1e-5)
        chex.assert_trees_all_close(batch_stats, ref_stats, rtol=1e-4, atol=1e-6)
        moved = jax.tree.map(lambda new, old: bool(np.all(new != old)), batch_stats, variables["batch_stats"])
        assert set(jax.tree.leaves(moved)) == {train}


def test_conv4_matches_numpy():
    model = create_backbone("conv4")
    x = _images(1, (4, 16, 16, 3))
    _check_against_numpy(model, _perturbed(_init(model, x), seed=2), x, np_conv4)


@pytest.mark.parametrize(
    "stage_sizes, widths, stem, size, block",
    [((1, 1, 1), (16, 32, 64), "cifar", 8, BasicBlock), ((1, 2), (4, 8), "imagenet", 16, BasicBlock),
     ((2, 1), (4, 8), "imagenet", 16, Bottleneck)],
    ids=["resnet8", "imagenet-stem", "bottleneck"],
)
def test_resnet_matches_numpy(stage_sizes, widths, stem, size, block):
    model = ResNet(stage_sizes=stage_sizes, widths=widths, stem=stem, block=block)
    x = _images(3, (3, size, size, 3))
    reference = functools.partial(np_resnet, stage_sizes=stage_sizes, stem=stem)
    _check_against_numpy(model, _perturbed(_init(model, x), seed=4), x, reference)


@pytest.mark.parametrize("name", ["conv4", "resnet8"])
def test_bfloat16_forward_close_to_float32(name):
    # bfloat16 keeps 8 significant bits: each rounding of activations and weights has
    # relative error <= 2**-9 ~ 0.2%; averaged over the terms of a convolution, errors
    # add up as a random walk through ~10 rounded layers (~sqrt(10) * 0.2% ~ 0.6%). BN
    # renormalises each layer, so errors do not compound multiplicatively; 3% bounds the
    # observed ~0.5-1% with room, while a wrong cast (e.g. float16 overflow or lost BN
    # statistics) gives errors of order 100%.
    x = _images(6, (8, 16, 16, 3))
    model32 = create_backbone(name)
    model16 = create_backbone(name, dtype=jnp.bfloat16)
    variables = _perturbed(_init(model32, x), seed=7)
    init16 = jax.eval_shape(functools.partial(model16.init, train=False), jax.random.key(0), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(variables, init16)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {np.dtype(np.float32)}
    out32, out16 = _forward(model32, variables, x), _forward(model16, variables, x)
    for train in (True, False):
        (f32, s32), (f16, s16) = out32[train], out16[train]
        assert f16.dtype == jnp.float32
        chex.assert_trees_all_equal_dtypes(s16, s32)
        rel = np.linalg.norm(f16 - f32) / np.linalg.norm(f32)
        assert 0 < rel < 0.03, rel
        chex.assert_trees_all_close(s16, s32, rtol=0.03, atol=0.01)


def test_init_is_he_normal_fan_out_and_bn_identity():
    model = create_backbone("resnet8")
    params = _init(model, np.zeros((1, 8, 8, 3), np.float32))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(params)
    standardised = []
    for path, leaf in leaves:
        kind = path[-1].key
        if kind == "kernel":
            kh, kw, _, out = leaf.shape
            std = math.sqrt(2.0 / (kh * kw * out))
            n = leaf.size
            # Sample variance / true variance ~ chi2_n / n: standard error sqrt(2 / n).
            assert abs(np.var(leaf) / std**2 - 1) < 6 * math.sqrt(2 / n), jax.tree_util.keystr(path)
            standardised.append(np.ravel(leaf) / std)
        else:
            np.testing.assert_array_equal(leaf, 1.0 if kind == "scale" else 0.0)
    z = np.concatenate(standardised)
    assert len(standardised) == 7 + 2  # 7 3x3 convolutions, 2 projection shortcuts
    # Normal, not truncated or uniform (kurtosis 3 vs ~2.4 or 1.8).
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(stats.kurtosis(z, fisher=False) - 3) < 6 * math.sqrt(24 / z.size)


def test_pmap_batch_norm_equals_single_device_on_whole_batch():
    devices = 8
    assert jax.local_device_count() == devices
    x = _images(8, (devices * 2, 8, 8, 3))
    single = create_backbone("resnet8")
    mapped = create_backbone("resnet8", axis_name="batch")
    variables = _perturbed(_init(single, x), seed=9)
    ref_features, ref_stats = _forward(single, variables, x)[True]

    def step(v, x):
        return mapped.apply(v, x, train=True, mutable=["batch_stats"])

    replicated = jax.tree.map(lambda a: np.broadcast_to(a, (devices, *a.shape)), variables)
    features, updates = jax.pmap(step, axis_name="batch")(replicated, x.reshape(devices, 2, 8, 8, 3))
    np.testing.assert_allclose(features.reshape(-1, 64), ref_features, rtol=1e-4, atol=1e-5)
    for d in range(devices):
        chex.assert_trees_all_close(
            jax.tree.map(lambda a: a[d], updates["batch_stats"]), ref_stats, rtol=1e-5, atol=1e-6
        )


def test_materialized_is_the_identity_and_its_gradient_too():
    x = _images(10, (4, 5, 5, 3)) - 0.5
    cotangent = _images(11, x.shape)
    value, vjp = jax.vjp(_materialized, x)
    np.testing.assert_array_equal(value, x)
    np.testing.assert_array_equal(vjp(cotangent)[0], cotangent)


def test_materialized_stays_a_reduction_that_xla_cpu_does_not_fuse_away():
    """The ResNet speed-up on CPU rests on XLA keeping the barrier as a reduction whose
    output is a buffer: if a future XLA simplifies it away, this fails (and
    BENCHMARKS.md's ResNet figures need re-measuring)."""
    x = _images(12, (4, 6, 6, 8))
    jax.config.update("jax_disable_most_optimizations", False)  # the fixture restores it
    compiled = jax.jit(lambda x: _materialized(2.0 * x) + 1.0).lower(x).compile()
    hlo = compiled.as_text()
    assert " reduce(" in hlo, hlo
    np.testing.assert_allclose(compiled(x), 2.0 * x + 1.0, rtol=1e-6)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_materialized_is_lowered_for_cpu_only(platform):
    """GPU and TPU programs (lowered here with jax.export) get x as is, no barrier."""
    x = _images(13, (2, 3, 3, 4))
    text = jax.export.export(jax.jit(lambda x: _materialized(2.0 * x)), platforms=(platform,))(x).mlir_module()
    barrier = "stablehlo.reduce" in text or "stablehlo.concatenate" in text
    assert barrier == (platform == "cpu"), text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_resnet_step_lowered_for_gpu_and_tpu_has_no_cpu_workarounds(platform):
    """A whole ResNet train-mode forward + backward lowered for GPU/TPU: no matmul channel
    sums (rr_jax.batch_norm) and fewer reductions and concatenations than the CPU lowering
    (the block barriers), while the CPU lowering has both."""
    model = ResNet((1, 1), (4, 8))
    x = _images(14, (2, 8, 8, 3))
    variables = model.init(jax.random.key(0), x, train=False)

    def step(params, x):
        def loss(params):
            features, updates = model.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True, mutable=["batch_stats"]
            )
            return features.sum(), updates

        return jax.grad(loss, has_aux=True)(params)

    def counts(target):
        text = jax.export.export(jax.jit(step), platforms=(target,))(variables["params"], x).mlir_module()
        return [text.count(op) for op in ("stablehlo.dot_general", "stablehlo.reduce", "stablehlo.concatenate")]

    cpu, other = counts("cpu"), counts(platform)
    assert cpu[0] > 0 and other[0] == 0, (cpu, other)
    assert other[1] < cpu[1] and other[2] < cpu[2], (cpu, other)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match=r"resnet99.*conv4.*resnet18"):
        create_backbone("resnet99")
    with pytest.raises(ValueError, match="stem.*'tiny'"):
        create_backbone("resnet18", stem="tiny")
    with pytest.raises(ValueError, match="stage_sizes"):
        ResNet(stage_sizes=(1, 1), widths=(16,))
    model = create_backbone("conv4")
    with pytest.raises(ValueError, match=r"rank 4.*\(8, 8, 3\)"):
        model.init(jax.random.key(0), jnp.zeros((8, 8, 3)), train=False)
