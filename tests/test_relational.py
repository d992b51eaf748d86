"""Pairs, relation head and losses against NumPy references and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rr_jax import (
    AGGREGATIONS,
    RelationHead,
    init_relation_head,
    make_pairs,
    pair_indices,
    pair_loss,
    pair_metrics,
    relational_loss,
)

NUMPY_AGGREGATIONS = {
    "cat": lambda a, b: np.concatenate([a, b]),
    "sum": lambda a, b: a + b,
    "mean": lambda a, b: (a + b) / 2,
    "max": np.maximum,
}


def reference_pairs(z, sigmas, aggregation):
    """Loops over view pairs (i < j, row-major) and images, as the paper describes."""
    agg = NUMPY_AGGREGATIONS[aggregation]
    num_views, batch, _ = z.shape
    positives, negatives, p = [], [], 0
    for i in range(num_views):
        for j in range(i + 1, num_views):
            for m in range(batch):
                positives.append(agg(z[i, m], z[j, m]))
                negatives.append(agg(z[i, m], z[j, sigmas[p][m]]))
            p += 1
    targets = np.r_[np.ones(len(positives)), np.zeros(len(negatives))]
    return np.stack(positives + negatives), targets


def roll_sigmas(num_views, batch):
    """torch.roll(z_j, shift, dims=0) puts z_j[(m - shift) % M] at row m."""
    num_pairs = num_views * (num_views - 1) // 2
    shifts = [1 + p % (batch - 1) for p in range(num_pairs)]
    return [np.roll(np.arange(batch), s) for s in shifts]


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_make_pairs_roll_matches_reference(aggregation):
    z = np.random.default_rng(0).normal(size=(4, 5, 3)).astype(np.float32)
    pairs, targets = make_pairs(jnp.asarray(z), None, aggregation=aggregation, negatives="roll")
    expected, expected_targets = reference_pairs(z, roll_sigmas(4, 5), aggregation)
    assert pairs.shape == (2 * 6 * 5, 6 if aggregation == "cat" else 3)
    np.testing.assert_allclose(pairs, expected, rtol=1e-6)
    np.testing.assert_array_equal(targets, expected_targets)
    assert targets.dtype == jnp.float32


def test_roll_shift_wraps_after_m_minus_one_pairs():
    """K=5 gives 10 pairs > M-1=3 shifts: shifts cycle 1,2,3,1,2,3,..."""
    z = np.random.default_rng(1).normal(size=(5, 4, 2)).astype(np.float32)
    pairs, _ = make_pairs(jnp.asarray(z), None, aggregation="cat", negatives="roll")
    expected, _ = reference_pairs(z, roll_sigmas(5, 4), "cat")
    np.testing.assert_allclose(pairs, expected, rtol=1e-6)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_make_pairs_derangement_matches_reference(aggregation):
    """Recover each sigma_p from the output, check it is a derangement, then compare all rows."""
    num_views, batch, dim = 3, 6, 4
    z = np.random.default_rng(2).normal(size=(num_views, batch, dim)).astype(np.float32)
    cat_pairs, _ = make_pairs(jnp.asarray(z), jax.random.key(5), aggregation="cat")
    negatives = np.asarray(cat_pairs)[3 * batch :].reshape(3, batch, 2 * dim)
    sigmas = []
    for p, (i, j) in enumerate([(0, 1), (0, 2), (1, 2)]):
        np.testing.assert_allclose(negatives[p, :, :dim], z[i], rtol=1e-6)
        # Which image of view j sits on the right of each negative?
        distance = np.abs(negatives[p, :, None, dim:] - z[j][None]).sum(-1)
        sigma = distance.argmin(1)
        np.testing.assert_allclose(distance.min(1), 0, atol=1e-6)
        np.testing.assert_array_equal(np.sort(sigma), np.arange(batch))
        assert not np.any(sigma == np.arange(batch))
        sigmas.append(sigma)
    assert len({tuple(s) for s in sigmas}) > 1  # independent per pair, not one shared sigma
    pairs, targets = make_pairs(jnp.asarray(z), jax.random.key(5), aggregation=aggregation)
    expected, expected_targets = reference_pairs(z, sigmas, aggregation)
    np.testing.assert_allclose(pairs, expected, rtol=1e-6)
    np.testing.assert_array_equal(targets, expected_targets)


def test_make_pairs_is_jittable_and_key_dependent():
    z = jax.random.normal(jax.random.key(0), (3, 8, 4))
    fn = jax.jit(make_pairs, static_argnames=("aggregation", "negatives"))
    a, _ = fn(z, jax.random.key(1))
    b, _ = fn(z, jax.random.key(2))
    np.testing.assert_array_equal(a[: 3 * 8], b[: 3 * 8])  # positives do not depend on the key
    assert not np.array_equal(a[3 * 8 :], b[3 * 8 :])


def numpy_focal(logits, targets, alpha=0.5, gamma=2.0):
    p = 1 / (1 + np.exp(-logits))
    pt = np.where(targets == 1, p, 1 - p)
    at = alpha * targets + (1 - alpha) * (1 - targets)
    return np.mean(-at * (1 - pt) ** gamma * np.log(pt))


def numpy_bce(logits, targets):
    p = 1 / (1 + np.exp(-logits))
    return np.mean(-(targets * np.log(p) + (1 - targets) * np.log(1 - p)))


def test_losses_match_numpy():
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=3, size=40).astype(np.float32)
    targets = (rng.random(40) < 0.5).astype(np.float32)
    np.testing.assert_allclose(pair_loss(logits, targets, "focal"), numpy_focal(logits, targets), rtol=1e-5)
    np.testing.assert_allclose(pair_loss(logits, targets, "bce"), numpy_bce(logits, targets), rtol=1e-5)


def test_metrics_hand_made():
    logits = jnp.array([2.0, 1.0, 0.5, -3.0, -1.0, 4.0, -0.2])
    targets = jnp.array([1, 1, 1, 0, 0, 0, 1], jnp.float32)
    metrics = pair_metrics(logits, targets)
    # correct: 1 1 1 | 1 1 0 | 0 -> positives 3/4, negatives 2/3, all 5/7
    np.testing.assert_allclose(metrics["accuracy"], 5 / 7, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy_positive"], 3 / 4, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy_negative"], 2 / 3, rtol=1e-6)
    assert metrics["num_pairs"] == 7


def numpy_head_logits(params, stats_in, pairs, train):
    """The relation head in NumPy: Dense -> BatchNorm -> LeakyReLU(0.01) -> Dense."""
    hidden = pairs @ params["hidden"]["kernel"] + params["hidden"]["bias"]
    if train:
        mean, var = hidden.mean(0), hidden.var(0)
    else:
        mean, var = stats_in["mean"], stats_in["var"]
    normed = (hidden - mean) / np.sqrt(var + 1e-5) * params["norm"]["scale"] + params["norm"]["bias"]
    act = np.where(normed > 0, normed, 0.01 * normed)
    logits = act @ params["output"]["kernel"][:, 0] + params["output"]["bias"][0]
    return logits, mean, var


@pytest.mark.parametrize("loss", ["focal", "bce"])
def test_relational_loss_matches_numpy_head(loss):
    z = np.random.default_rng(4).normal(size=(3, 4, 5)).astype(np.float32)
    variables = init_relation_head(jax.random.key(0), 5, hidden_dim=16)
    value, metrics, stats = relational_loss(jnp.asarray(z), variables, None, negatives="roll", loss=loss)
    params = jax.tree.map(np.asarray, variables["params"])
    pairs, targets = reference_pairs(z, roll_sigmas(3, 4), "cat")
    logits, mean, var = numpy_head_logits(params, None, pairs, train=True)
    reference = numpy_focal if loss == "focal" else numpy_bce
    np.testing.assert_allclose(value, reference(logits, targets), rtol=1e-4)
    np.testing.assert_allclose(metrics["loss"], value)
    np.testing.assert_allclose(metrics["accuracy"], np.mean((logits > 0) == (targets == 1)), rtol=1e-6)
    # PyTorch-style running statistics: new = 0.9 old + 0.1 batch (flax uses the biased variance).
    np.testing.assert_allclose(stats["norm"]["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(stats["norm"]["var"], 0.9 + 0.1 * var, rtol=1e-4)


def test_dot_product_head_matches_numpy():
    """The ablation head: logit = scale * <z_i, z_j> + bias, with gradients into scale."""
    z = np.random.default_rng(5).normal(size=(3, 4, 5)).astype(np.float32)
    variables = init_relation_head(jax.random.key(0), 5, head="dot")
    assert jax.tree.map(np.shape, variables) == {"batch_stats": {}, "params": {"bias": (), "scale": ()}}
    variables = {"batch_stats": {}, "params": {"scale": jnp.float32(0.7), "bias": jnp.float32(-0.3)}}
    pairs, targets = reference_pairs(z, roll_sigmas(3, 4), "cat")
    dots = np.sum(pairs[:, :5] * pairs[:, 5:], axis=1)

    def loss(params):
        return relational_loss(jnp.asarray(z), {"batch_stats": {}, "params": params}, None,
                               negatives="roll", loss="bce")[0]

    np.testing.assert_allclose(loss(variables["params"]), numpy_bce(0.7 * dots - 0.3, targets), rtol=1e-5)
    # d/dscale of mean BCE = mean((sigmoid(logit) - target) * dot)
    expected = np.mean((1 / (1 + np.exp(-(0.7 * dots - 0.3))) - targets) * dots)
    np.testing.assert_allclose(jax.grad(loss)(variables["params"])["scale"], expected, rtol=1e-4)
    with pytest.raises(ValueError, match="'cosine'"):
        init_relation_head(jax.random.key(0), 5, head="cosine")


def test_eval_mode_uses_running_statistics():
    z = np.random.default_rng(5).normal(size=(2, 3, 4)).astype(np.float32)
    variables = init_relation_head(jax.random.key(1), 4, hidden_dim=8)
    running = {"norm": {"mean": np.full(8, 0.3, np.float32), "var": np.full(8, 2.0, np.float32)}}
    variables = {"params": variables["params"], "batch_stats": running}
    value, _, stats = relational_loss(jnp.asarray(z), variables, None, negatives="roll", train=False)
    logits, _, _ = numpy_head_logits(
        jax.tree.map(np.asarray, variables["params"]), running["norm"],
        reference_pairs(z, roll_sigmas(2, 3), "cat")[0], train=False,
    )
    targets = np.r_[np.ones(3), np.zeros(3)]
    np.testing.assert_allclose(value, numpy_focal(logits, targets), rtol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, stats, running)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
def test_factored_equals_naive_values_and_gradients(aggregation):
    z = jax.random.normal(jax.random.key(0), (4, 6, 8))
    variables = init_relation_head(jax.random.key(1), 8, aggregation=aggregation, hidden_dim=32)
    key = jax.random.key(2)

    def run(factored):
        def loss_fn(z, params):
            value, _, stats = relational_loss(
                z, {"params": params, "batch_stats": variables["batch_stats"]}, key,
                aggregation=aggregation, factored=factored,
            )
            return value, stats

        (value, stats), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            z, variables["params"]
        )
        return value, stats, grads

    naive, factored = run(False), run(True)
    np.testing.assert_allclose(factored[0], naive[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(factored[1:]), jax.tree.leaves(naive[1:])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.key(0), (3, 4, 3), jnp.float64)
        variables = init_relation_head(jax.random.key(1), 3, hidden_dim=6)
        variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)

        def loss(z):
            return relational_loss(z, variables, None, negatives="roll", loss="focal")[0]

        grad = np.asarray(jax.grad(loss)(z))
        eps = 1e-6
        direction = np.random.default_rng(0).normal(size=z.shape)
        numeric = (loss(z + eps * direction) - loss(z - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6)
        for index in [(0, 0, 0), (1, 2, 1), (2, 3, 2)]:
            unit = np.zeros(z.shape)
            unit[index] = 1.0
            numeric = (loss(z + eps * unit) - loss(z - eps * unit)) / (2 * eps)
            np.testing.assert_allclose(grad[index], numeric, rtol=1e-5, atol=1e-9)


def test_relation_head_layout_and_pytorch_init():
    variables = init_relation_head(jax.random.key(0), 64)
    params = variables["params"]
    assert params["hidden"]["kernel"].shape == (128, 256)
    assert params["output"]["kernel"].shape == (256, 1)
    assert set(variables["batch_stats"]["norm"]) == {"mean", "var"}
    bound = 1 / np.sqrt(128)
    kernel = np.asarray(params["hidden"]["kernel"])
    assert np.abs(kernel).max() <= bound
    np.testing.assert_allclose(kernel.std(), bound / np.sqrt(3), rtol=0.02)  # U(-b, b)


def test_relation_head_naive_call_equals_score():
    head = RelationHead(4, "sum", 8)
    z = jax.random.normal(jax.random.key(0), (6, 4))
    variables = head.init(jax.random.key(1), jnp.zeros((1, 4)), train=False)
    left, right = jnp.array([0, 1, 2]), jnp.array([3, 4, 5])
    direct = head.apply(variables, z[left] + z[right], train=False)
    scored = head.apply(variables, z, z, left, right, False, method=RelationHead.score)
    np.testing.assert_allclose(direct, scored, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, kwargs, match",
    [
        ((1, 4, 3), {}, "K >= 2"),
        ((3, 1, 3), {}, "M >= 2"),
        ((4, 3), {}, "float\\[K, M, D\\]"),
        ((2, 4, 3), {"aggregation": "prod"}, "aggregation 'prod'.*'cat', 'sum', 'mean', 'max'"),
        ((2, 4, 3), {"loss": "hinge"}, "loss 'hinge'.*'focal', 'bce'"),
        ((2, 4, 3), {"negatives": "random"}, "negatives 'random'.*'derangement', 'roll'"),
        ((2, 4, 5), {}, "width 6.*width 10"),
    ],
)
def test_bad_inputs_raise(shape, kwargs, match):
    variables = init_relation_head(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=match):
        relational_loss(jnp.zeros(shape), variables, jax.random.key(0), **kwargs)


def test_make_pairs_bad_inputs_raise():
    with pytest.raises(ValueError, match="aggregation 'dot'"):
        make_pairs(jnp.zeros((2, 3, 4)), jax.random.key(0), aggregation="dot")
    with pytest.raises(ValueError, match="needs a PRNG key"):
        make_pairs(jnp.zeros((2, 3, 4)), None)
    with pytest.raises(ValueError, match="no negatives"):
        make_pairs(jnp.zeros((2, 1, 4)), jax.random.key(0))


@pytest.mark.parametrize("negatives", ["roll", "derangement"])
def test_sharded_pairs_are_rows_of_the_global_pairs(negatives):
    """Shard s of a batch split in 4 gets exactly its images' rows of the global pair list."""
    num_views, local, shards = 3, 2, 4
    key = jax.random.key(9)
    left_g, right_g, targets_g = (np.asarray(a) for a in pair_indices(key, num_views, local * shards, negatives))
    half = len(targets_g) // 2
    for shard in range(shards):
        left, right, targets = (np.asarray(a) for a in pair_indices(
            key, num_views, local, negatives, num_shards=shards, shard=shard))
        images = np.arange(local)
        rows = [p * local * shards + shard * local + images for p in range(3)]
        rows = np.concatenate(rows + [half + r for r in rows])
        # Left indices are local: view * local + image; global: view * total + image.
        to_global = (left // local) * local * shards + shard * local + left % local
        np.testing.assert_array_equal(to_global, left_g[rows])
        np.testing.assert_array_equal(right, right_g[rows])
        np.testing.assert_array_equal(targets, targets_g[rows])


def test_encoder_dot_head_matches_numpy():
    """The encoder + dot product ablation: logit = scale * <e(z_i), e(z_j)> + bias with
    e = Dense -> LeakyReLU(0.01) -> Dense on each embedding, against NumPy loops."""
    z = np.random.default_rng(6).normal(size=(3, 4, 5)).astype(np.float32)
    variables = init_relation_head(jax.random.key(0), 5, hidden_dim=7, head="encoder_dot")
    assert jax.tree.map(np.shape, variables["params"]) == {
        "encoder_hidden": {"kernel": (5, 7), "bias": (7,)},
        "encoder_output": {"kernel": (7, 7), "bias": (7,)},
        "scale": (), "bias": (),
    }
    np.testing.assert_allclose(variables["params"]["scale"], 1 / np.sqrt(7), rtol=1e-6)
    params = jax.tree.map(np.asarray, variables["params"])
    params["bias"] = np.float32(0.2)

    def encode(x):
        hidden = x @ params["encoder_hidden"]["kernel"] + params["encoder_hidden"]["bias"]
        hidden = np.where(hidden > 0, hidden, 0.01 * hidden)
        return hidden @ params["encoder_output"]["kernel"] + params["encoder_output"]["bias"]

    pairs, targets = reference_pairs(z, roll_sigmas(3, 4), "cat")
    dots = np.array([encode(pair[:5]) @ encode(pair[5:]) for pair in pairs])
    logits = params["scale"] * dots + params["bias"]

    def loss(params):
        return relational_loss(jnp.asarray(z), {"batch_stats": {}, "params": params}, None,
                               negatives="roll", loss="bce")[0]

    jax_params = jax.tree.map(jnp.asarray, params)
    np.testing.assert_allclose(loss(jax_params), numpy_bce(logits, targets), rtol=1e-5)
    # d/dscale of mean BCE = mean((sigmoid(logit) - target) * dot)
    expected = np.mean((1 / (1 + np.exp(-logits)) - targets) * dots)
    np.testing.assert_allclose(jax.grad(loss)(jax_params)["scale"], expected, rtol=1e-4)
    with pytest.raises(ValueError, match="width 5, got D=6"):
        relational_loss(jnp.zeros((2, 3, 6)), variables, None, negatives="roll")


def test_encoder_dot_head_gradient_matches_finite_differences():
    with jax.enable_x64(True):
        z = jax.random.normal(jax.random.key(0), (3, 4, 3), jnp.float64)
        variables = init_relation_head(jax.random.key(1), 3, hidden_dim=5, head="encoder_dot")
        variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)

        def loss(z, params):
            return relational_loss(z, {"batch_stats": {}, "params": params}, None, negatives="roll")[0]

        grad_z, grad_params = jax.grad(loss, argnums=(0, 1))(z, variables["params"])
        eps = 1e-6
        rng = np.random.default_rng(1)
        direction = rng.normal(size=z.shape)
        numeric = (loss(z + eps * direction, variables["params"]) - loss(z - eps * direction, variables["params"])) / (2 * eps)
        np.testing.assert_allclose(np.sum(np.asarray(grad_z) * direction), numeric, rtol=1e-6)
        kernel = variables["params"]["encoder_hidden"]["kernel"]
        step = rng.normal(size=kernel.shape)

        def at(sign):
            params = {**variables["params"], "encoder_hidden": {"kernel": kernel + sign * eps * step,
                                                                "bias": variables["params"]["encoder_hidden"]["bias"]}}
            return loss(z, params)

        numeric = (at(1) - at(-1)) / (2 * eps)
        np.testing.assert_allclose(np.sum(np.asarray(grad_params["encoder_hidden"]["kernel"]) * step), numeric, rtol=1e-6)
