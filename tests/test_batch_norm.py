"""BatchNorm: forward and running statistics against NumPy, the hand-written backward
against finite differences and against Flax's BatchNorm under pmap, drop-in variables."""


import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rr_jax.batch_norm import BatchNorm, channel_sum

EPS = 1e-5
MOMENTUM = 0.9  # Flax convention: new = MOMENTUM * old + (1 - MOMENTUM) * batch

pytestmark = pytest.mark.usefixtures("fast_compile")


def _data(seed, shape, offset=2.0):
    """Values with a channel-dependent offset, so that centring matters."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) + offset * np.arange(1, shape[-1] + 1)).astype(np.float32)


def _variables(channels, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "scale": rng.uniform(0.5, 1.5, channels).astype(np.float32),
            "bias": rng.normal(0.0, 0.3, channels).astype(np.float32),
        },
        "batch_stats": {
            "mean": rng.normal(0.0, 0.3, channels).astype(np.float32),
            "var": rng.uniform(0.5, 1.5, channels).astype(np.float32),
        },
    }


def np_batch_norm(x, params, stats, train):
    """float64 BatchNorm over every axis but the last -> (y, updated running stats)."""
    axes = tuple(range(x.ndim - 1))
    x = x.astype(np.float64)
    if train:
        mean, var = x.mean(axes), x.var(axes)
        stats = {
            "mean": MOMENTUM * stats["mean"] + (1 - MOMENTUM) * mean,
            "var": MOMENTUM * stats["var"] + (1 - MOMENTUM) * var,
        }
    else:
        mean, var = stats["mean"], stats["var"]
    return (x - mean) / np.sqrt(var + EPS) * params["scale"] + params["bias"], stats


def _apply(module, variables, x, train):
    return module.apply(variables, x, use_running_average=not train, mutable=["batch_stats"])


@pytest.mark.parametrize("shape", [(7, 5), (6, 4, 3, 5), (2, 3, 4, 5, 6)])
def test_channel_sum_matches_numpy(shape):
    """The matmul form (what CPU runs) agrees with NumPy."""
    x = _data(1, shape)
    total = jax.jit(channel_sum)(x)
    assert total.shape == (shape[-1],)
    np.testing.assert_allclose(total, x.astype(np.float64).reshape(-1, shape[-1]).sum(0), rtol=1e-6)


@pytest.mark.parametrize("platform", ["cpu", "cuda", "tpu"])
def test_gpu_and_tpu_lowerings_hold_only_the_plain_reduction(platform):
    """BatchNorm's forward + backward lowered for each platform from this CPU process:
    the matmul sums appear for CPU only; GPU and TPU programs reduce natively."""
    module = BatchNorm(momentum=0.9)
    x = _data(2, (6, 4, 3, 5))
    variables = module.init(jax.random.key(0), x, use_running_average=False)

    def step(params, x):
        def loss(params, x):
            y, _ = _apply(module, {**variables, "params": params}, x, train=True)
            return jnp.sum(y * y)

        return jax.grad(loss, argnums=(0, 1))(params, x)

    text = jax.export.export(jax.jit(step), platforms=(platform,))(variables["params"], x).mlir_module()
    assert ("stablehlo.dot_general" in text) == (platform == "cpu"), text
    assert "stablehlo.reduce" in text


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", [(16, 6), (4, 5, 5, 3)])
def test_forward_and_running_statistics_match_numpy(train, shape):
    x = _data(2, shape)
    variables = _variables(shape[-1])
    y, updates = jax.jit(_apply, static_argnums=(0, 3))(BatchNorm(momentum=MOMENTUM), variables, x, train)
    ref_y, ref_stats = np_batch_norm(x, variables["params"], variables["batch_stats"], train)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(updates["batch_stats"], ref_stats, rtol=1e-5, atol=1e-6)


def test_gradients_match_finite_differences():
    """The closed-form backward against central differences of the float64 NumPy forward."""
    shape = (4, 3, 3, 2)
    x = _data(3, shape)
    variables = _variables(shape[-1])
    weights = np.random.default_rng(4).normal(size=shape)

    def loss(x, params):
        y, _ = _apply(BatchNorm(), {"params": params, "batch_stats": variables["batch_stats"]}, x, True)
        return jnp.sum(jnp.sin(y) * weights)

    grad_x, grad_params = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, variables["params"])

    def np_loss(x, scale, bias):
        y, _ = np_batch_norm(x, {"scale": scale, "bias": bias}, variables["batch_stats"], True)
        return np.sum(np.sin(y) * weights)

    def finite_difference(args, index, h=1e-6):
        grad = np.zeros(args[index].shape)
        for i in np.ndindex(grad.shape):
            up, down = [a.astype(np.float64) for a in args], [a.astype(np.float64) for a in args]
            up[index][i] += h
            down[index][i] -= h
            grad[i] = (np_loss(*up) - np_loss(*down)) / (2 * h)
        return grad

    args = (x, variables["params"]["scale"], variables["params"]["bias"])
    for got, index in ((grad_x, 0), (grad_params["scale"], 1), (grad_params["bias"], 2)):
        expected = finite_difference(args, index)
        np.testing.assert_allclose(got, expected, atol=2e-5 * np.abs(expected).max())


def test_pmap_gradients_are_those_of_the_summed_loss_on_the_whole_batch():
    """Under axis_name each device gets the gradient of the sum of all devices' losses,
    as automatic differentiation through Flax's BatchNorm on the whole batch gives."""
    devices, shape = 8, (3, 2, 2, 4)
    x = _data(5, (devices * shape[0], *shape[1:]))
    weights = np.random.default_rng(6).normal(size=x.shape).astype(np.float32)
    variables = _variables(shape[-1])

    def loss(module, params, x, weights):
        v = {"params": params, "batch_stats": variables["batch_stats"]}
        y, updates = _apply(module, v, x, True)
        return jnp.sum(jnp.sin(y) * weights), updates["batch_stats"]

    grad = jax.grad(loss, argnums=(1, 2), has_aux=True)
    flax_norm = nn.BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    (ref_params, ref_x), ref_stats = jax.jit(grad, static_argnums=0)(flax_norm, variables["params"], x, weights)

    mapped = jax.pmap(
        lambda p, x, w: grad(BatchNorm(momentum=MOMENTUM, axis_name="batch"), p, x, w),
        axis_name="batch",
        in_axes=(None, 0, 0),
    )
    (params, grad_x), stats = mapped(variables["params"], x.reshape(devices, *shape), weights.reshape(devices, *shape))
    np.testing.assert_allclose(grad_x.reshape(x.shape), ref_x, rtol=1e-4, atol=1e-5)
    summed = jax.tree.map(lambda g: g.sum(0), params)
    chex.assert_trees_all_close(summed, ref_params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(jax.tree.map(lambda s: s[0], stats), ref_stats, rtol=1e-5, atol=1e-6)


def test_drop_in_for_flax_batch_norm():
    """Same variable tree (names, shapes, dtypes) as flax.linen.BatchNorm, and the same
    outputs and statistics in both modes, so checkpoints move between the two."""
    x = _data(7, (4, 3, 3, 5))
    ours, theirs = BatchNorm(momentum=MOMENTUM), nn.BatchNorm(momentum=MOMENTUM, epsilon=EPS)
    key = jax.random.key(0)
    init = [m.init(key, x, use_running_average=False) for m in (ours, theirs)]
    chex.assert_trees_all_equal_shapes_and_dtypes(*init)
    chex.assert_trees_all_equal(*init)
    variables = _variables(5)
    for train in (True, False):
        # Both compute E[x^2] - E[x]^2 in float32; its rounding depends on the order of
        # summation, which differs (offsets up to 10 here, so some cancellation).
        chex.assert_trees_all_close(
            _apply(ours, variables, x, train), _apply(theirs, variables, x, train), rtol=1e-4, atol=1e-4
        )


def test_bfloat16_output_with_float32_statistics():
    x = _data(8, (8, 4, 4, 3))
    variables = _variables(3)
    y, updates = _apply(BatchNorm(momentum=MOMENTUM, dtype=jnp.bfloat16), variables, x, True)
    ref_y, ref_stats = np_batch_norm(x, variables["params"], variables["batch_stats"], True)
    assert y.dtype == jnp.bfloat16
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(updates))
    np.testing.assert_allclose(np.asarray(y, np.float32), ref_y, atol=0.05)
    # The statistics come from x itself, not from a bfloat16 copy of it.
    chex.assert_trees_all_close(updates["batch_stats"], ref_stats, rtol=1e-5, atol=1e-5)
