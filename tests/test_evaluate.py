"""kNN, retrieval, top-k accuracy and t-SNE against hand-made answers and NumPy references."""

import jax
import jax.numpy as jnp
import matplotlib.image
import numpy as np
import pytest

from rr_jax import evaluate, plots, tsne
from rr_jax.numerics import squared_distances

pytestmark = pytest.mark.usefixtures("fast_compile")


def _at(degrees):
    """Unit vectors in the plane at the given angles, [N, 2]."""
    radians = np.deg2rad(np.asarray(degrees, np.float64))
    return np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float32)


# ----------------------------------------------------------------------- accuracy


def test_topk_accuracy_against_numpy():
    rng = np.random.default_rng(0)
    scores, labels = rng.normal(size=(300, 7)), rng.integers(0, 7, 300)
    ranks = np.argsort(-scores, axis=1)
    for k in (1, 3, 5):
        expected = np.mean([labels[i] in ranks[i, :k] for i in range(300)])
        assert evaluate.topk_accuracy(scores, labels, k) == pytest.approx(expected)
    assert evaluate.topk_accuracy(scores, labels, 7) == evaluate.topk_accuracy(scores, labels, 50) == 1.0
    with pytest.raises(ValueError, match="k must be a positive int, got k=0"):
        evaluate.topk_accuracy(scores, labels, 0)
    with pytest.raises(ValueError, match="labels must be int\\[300\\]"):
        evaluate.topk_accuracy(scores, labels[:5], 1)


# ----------------------------------------------------------- neighbours and kNN


def test_nearest_neighbours_by_cosine_similarity():
    gallery = _at([0, 90, 180, 50]) * np.array([[1.0], [3.0], [0.5], [2.0]], np.float32)  # scale is ignored
    queries = _at([10, 80, 170, 50, 260])
    similarity, index = evaluate.nearest_neighbours(queries, gallery, 2, chunk_size=2)  # chunks of 2, 1 padded
    np.testing.assert_array_equal(index, [[0, 3], [1, 3], [2, 1], [3, 1], [2, 0]])
    expected = np.cos(np.deg2rad([[10, 40], [10, 30], [10, 80], [0, 40], [80, 100]]))
    np.testing.assert_allclose(similarity, expected, atol=1e-6)
    # Queries that are the gallery: excluding each one's own index.
    _, index = evaluate.nearest_neighbours(gallery, gallery, 1, exclude=np.arange(4))
    np.testing.assert_array_equal(index[:, 0], [3, 3, 1, 1])
    with pytest.raises(ValueError, match="k must be an int in \\[1, 3\\]"):
        evaluate.nearest_neighbours(gallery, gallery, 4, exclude=np.arange(4))
    with pytest.raises(ValueError, match="same feature size"):
        evaluate.nearest_neighbours(queries, np.ones((4, 3)), 1)


def test_knn_votes_by_hand():
    """Train points at 5, 22 (class 0) and 45, 60, 75 degrees (class 1); a query at 30."""
    train = _at([5, 22, 45, 60, 75])
    labels = np.array([0, 0, 1, 1, 1])
    c = lambda degrees: np.exp(np.cos(np.deg2rad(degrees)) / 0.5)  # noqa: E731  vote weight
    # The 3 nearest are 22 (8 degrees away), 45 (15) and 5 (25).
    scores = evaluate.knn_scores(train, labels, _at([30]), 2, k=3, temperature=0.5)
    expected = np.array([c(8) + c(25), c(15)]) / (c(8) + c(15) + c(25))
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
    scores = evaluate.knn_scores(train, labels, _at([30]), 2, k=2, temperature=0.5)
    np.testing.assert_allclose(scores[0], np.array([c(8), c(15)]) / (c(8) + c(15)), rtol=1e-5)
    # All 5 vote: at 30 degrees class 0 still wins at T = 0.01 (the nearest dominates;
    # exp(1 / 0.01) would overflow float32 without the normalisation),
    # at 40 degrees class 1 does; top-5 of 2 classes is always right.
    for test_labels, top1 in (([0, 1], 1.0), ([1, 0], 0.0)):
        accuracy = evaluate.knn_accuracy(
            train, labels, _at([30, 40]), np.array(test_labels), 2, k=5, temperature=0.01
        )
        assert accuracy == {"top1": top1, "top5": 1.0}


def test_knn_scores_against_numpy():
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(120, 6)), rng.integers(0, 4, 120)
    test = rng.normal(size=(37, 6))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    similarity = unit(test) @ unit(train).T
    expected = np.zeros((37, 4))
    for i, row in enumerate(similarity):
        for j in np.argsort(-row)[:10]:
            expected[i, labels[j]] += np.exp(row[j] / 0.07)
    expected /= expected.sum(axis=1, keepdims=True)
    scores = evaluate.knn_scores(train, labels, test, 4, k=10, temperature=0.07, chunk_size=8)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        evaluate.knn_scores(train, labels, test, 4, temperature=0.0)


# ---------------------------------------------------------------------- retrieval


def test_retrieval_precision_by_hand():
    assert evaluate.precision_at_k(np.array([[1, 1, 2], [0, 3, 3]]), np.array([1, 3])) == pytest.approx(4 / 6)
    # Two tight clusters on the circle: every neighbour of a query is in its cluster.
    features = _at([0, 5, 10, 15, 180, 185, 190])
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    _, index = evaluate.nearest_neighbours(features, features, 2, exclude=np.arange(7))
    assert evaluate.precision_at_k(labels[index], labels) == 1.0
    _, index = evaluate.nearest_neighbours(features, features, 4, exclude=np.arange(7))
    # Among 4 neighbours, the 4-point cluster's queries find 3 of their own, the others 2.
    assert evaluate.precision_at_k(labels[index], labels) == pytest.approx((4 * 3 / 4 + 3 * 2 / 4) / 7)


def test_retrieval_grid_frames_matches_green_and_mismatches_red(tmp_path):
    rng = np.random.default_rng(0)
    queries = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    neighbours = rng.integers(0, 256, (2, 3, 8, 8, 3), dtype=np.uint8)
    green, red = np.array([44, 160, 44]) / 255, np.array([214, 39, 40]) / 255

    def colour_pixels(labels):
        path = str(tmp_path / "grid.png")
        plots.plot_retrieval(path, queries, neighbours, np.array([0, 1]), labels)
        image = matplotlib.image.imread(path)[..., :3]
        assert image.shape[:2] == (2 * 100, 4 * 100)  # 1 inch per cell at 100 dpi
        return [int(np.sum(np.all(np.abs(image - c) < 0.02, axis=-1))) for c in (green, red)]

    all_green = colour_pixels(np.array([[0, 0, 0], [1, 1, 1]]))
    assert all_green[0] > 0 and all_green[1] == 0
    mixed = colour_pixels(np.array([[0, 1, 0], [1, 1, 0]]))
    assert mixed[0] > 0 and mixed[1] > 0
    with pytest.raises(ValueError, match="both query_labels and neighbour_labels"):
        plots.plot_retrieval(str(tmp_path / "x.png"), queries, neighbours, np.array([0, 1]))


# -------------------------------------------------------------------------- t-SNE


def test_perplexity_calibration():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(60, 5)), jnp.float32)
    affinities = jax.jit(lambda x: tsne._conditional_p(squared_distances(x, x), 12.0))
    p = np.asarray(affinities(x))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)
    assert np.all(np.diag(p) == 0)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=1)
    np.testing.assert_allclose(np.exp(entropy), 12.0, rtol=1e-3)


def test_tsne_gradient_is_the_gradient_of_the_kl_divergence():
    rng = np.random.default_rng(0)
    n = 20
    p = rng.uniform(size=(n, n))
    p = p + p.T
    np.fill_diagonal(p, 0)
    p = jnp.asarray(p / p.sum(), jnp.float32)
    y = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)

    def kl(y):
        d = jnp.sum((y[:, None] - y[None]) ** 2, axis=-1)
        kernel = jnp.where(jnp.eye(n, dtype=bool), 0.0, 1.0 / (1.0 + d))
        off = ~jnp.eye(n, dtype=bool)
        q = jnp.where(off, kernel / jnp.sum(kernel), 1.0)  # the diagonal is left out
        return jnp.sum(jnp.where(off, p * jnp.log(jnp.where(off, p, 1.0) / q), 0.0))

    expected = jax.jit(jax.grad(kl))(y)
    np.testing.assert_allclose(jax.jit(tsne.tsne_gradient)(y, p), expected, rtol=1e-4, atol=1e-6)


def test_tsne_separates_clusters_and_plots(tmp_path):
    rng = np.random.default_rng(0)
    centres = 10.0 * rng.normal(size=(3, 10))
    labels = np.repeat(np.arange(3), 30)
    features = centres[labels] + rng.normal(size=(90, 10))
    embedding = np.asarray(tsne.tsne(features, perplexity=10.0))
    assert embedding.shape == (90, 2) and np.isfinite(embedding).all()
    distances = np.sum((embedding[:, None] - embedding[None]) ** 2, axis=-1)
    np.fill_diagonal(distances, np.inf)
    assert np.all(labels[np.argmin(distances, axis=1)] == labels)  # 1-NN in 2-D is in the cluster
    np.testing.assert_array_equal(embedding, tsne.tsne(features, perplexity=10.0))
    with pytest.raises(ValueError, match="perplexity must be in \\(0, \\(N - 1\\) / 3\\)"):
        tsne.tsne(features, perplexity=40.0)

    path = str(tmp_path / "tsne.png")
    plots.plot_tsne(path, embedding, labels, class_names=["a", "b", "c"])
    image = matplotlib.image.imread(path)[..., :3]
    assert image.shape[:2] == (600, 700)
    tab10 = [np.array(c) / 255 for c in ((31, 119, 180), (255, 127, 14), (44, 160, 44))]
    for colour in tab10:  # every class's colour is drawn
        assert np.sum(np.all(np.abs(image - colour) < 0.02, axis=-1)) > 20


# ------------------------------------------------------------------------ RankMe


def numpy_rankme(z, eps=1e-7):
    singular = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
    p = singular / singular.sum() + eps
    return np.exp(-np.sum(p * np.log(p)))


def _with_singular_values(rng, n, d, values):
    """A matrix [n, d] whose singular values are `values` (the rest zero)."""
    u, _ = np.linalg.qr(rng.normal(size=(n, len(values))))
    v, _ = np.linalg.qr(rng.normal(size=(d, len(values))))
    return ((u * np.asarray(values)) @ v.T).astype(np.float32)


def test_rankme_against_numpy_svd_on_random_low_rank_and_collapsed_matrices():
    rng = np.random.default_rng(0)
    random = rng.normal(size=(200, 16)).astype(np.float32)
    low_rank = (rng.normal(size=(200, 3)) @ rng.normal(size=(3, 16))).astype(np.float32)
    collapsed = np.outer(rng.normal(size=200), rng.normal(size=16)).astype(np.float32)
    collapsed += 1e-4 * rng.normal(size=collapsed.shape).astype(np.float32)
    for z in (random, low_rank, collapsed):
        assert evaluate.rankme(z) == pytest.approx(numpy_rankme(z), rel=2e-4)
    assert 14 < evaluate.rankme(random) <= 16  # near full rank
    assert 2 < evaluate.rankme(low_rank) < 3 + 1e-3
    assert 1 <= evaluate.rankme(collapsed) < 1.02
    # Closed form: r equal singular values, the others zero, give r (up to eps).
    for r in (1, 4, 10):
        z = _with_singular_values(rng, 50, 12, [2.5] * r)
        assert evaluate.rankme(z) == pytest.approx(r, rel=1e-4)
    with pytest.raises(ValueError, match="embeddings must be float\\[N, D\\]"):
        evaluate.rankme(np.zeros(5))


def test_curves_plot_draws_the_logged_metrics(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "accuracy": 0.5 + s / 100} for s in range(1, 11)]
    records += [{"step": 5, "knn_top1": 0.7, "rankme": 30.0}, {"step": 10, "knn_top1": 0.8, "rankme": 28.0}]
    path = tmp_path / "curves.png"
    assert plots.plot_curves(str(path), records) == ["loss", "accuracy", "knn_top1", "rankme"]
    assert matplotlib.image.imread(str(path)).shape[:2] == (300, 4 * 320)  # one panel per metric
    with pytest.raises(ValueError, match="hold none of the metrics"):
        plots.plot_curves(str(path), [{"step": 1, "images_per_second": 3.0}])

