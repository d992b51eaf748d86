"""Evaluations of frozen features: top-k accuracy, kNN, retrieval, RankMe, t-SNE, and plots.

The evaluation functions are pure (arrays in, numbers or arrays out) and jit-compiled;
the plotting functions only draw what they are given and write a PNG. Features are
float[N, D] rows, e.g. from `rr_jax.features.extract_features`.

- kNN classifier (the monitor of InstDisc, Wu et al. 2018, as used by DINO): cosine
  similarity to every training feature, the k most similar vote for their class with
  weight exp(similarity / T) (normalised over the k votes).
- Retrieval: the k nearest gallery items by cosine similarity; precision@k is the
  fraction of them that share the query's label (the paper's retrieval figure shows
  CIFAR queries with their top-10 neighbours).
- RankMe (Garrido et al., 2023): the effective rank of the features, an unsupervised
  monitor of dimensional collapse.
- t-SNE (van der Maaten & Hinton, 2008): exact, O(N^2) memory and time per iteration,
  written in JAX so that it needs no extra dependency and runs in seconds for the
  1-2k points a readable plot holds; for more points use an approximate (Barnes-Hut)
  implementation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure


def _check_features(name: str, x) -> None:
    if np.ndim(x) != 2:
        raise ValueError(f"{name} must be float[N, D] (rank 2), got shape {np.shape(x)}.")


def _check_labels(name: str, labels, n: int) -> None:
    if np.shape(labels) != (n,):
        raise ValueError(
            f"{name} must be int[{n}] (one label per row), got shape {np.shape(labels)}."
        )


def _check_positive(name: str, value) -> None:
    if not (isinstance(value, (int, np.integer)) and value >= 1):
        raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")


# ------------------------------------------------------------------------ accuracy


def topk_accuracy(scores: jax.Array, labels: jax.Array, k: int) -> float:
    """Fraction of rows whose label is among the k highest of its scores.

    Args:
      scores: float[N, C], logits or any per-class scores.
      labels: int[N] in [0, C).
      k: >= 1; k >= C counts every row as correct.
    """
    _check_features("scores", scores)
    _check_labels("labels", labels, np.shape(scores)[0])
    _check_positive("k", k)
    return float(_topk_hits(jnp.asarray(scores), jnp.asarray(labels), min(k, np.shape(scores)[1])))


@functools.partial(jax.jit, static_argnums=2)
def _topk_hits(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    _, top = jax.lax.top_k(scores, k)
    return jnp.mean(jnp.any(top == labels[:, None], axis=1))


# ------------------------------------------------------------- nearest neighbours


def _unit_rows(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _nearest(queries, gallery, exclude, *, k, chunk_size):
    num_queries = queries.shape[0]
    pad = -num_queries % chunk_size
    queries = jnp.pad(_unit_rows(queries), ((0, pad), (0, 0)))
    exclude = jnp.pad(exclude, (0, pad), constant_values=-1)
    gallery = _unit_rows(gallery)
    columns = jnp.arange(gallery.shape[0])

    def chunk(args):
        q, excluded = args
        similarity = jnp.dot(q, gallery.T, precision="highest")
        similarity = jnp.where(columns[None, :] == excluded[:, None], -jnp.inf, similarity)
        return jax.lax.top_k(similarity, k)

    shape = (-1, chunk_size)
    similarity, index = jax.lax.map(
        chunk, (queries.reshape(*shape, queries.shape[1]), exclude.reshape(shape))
    )
    return similarity.reshape(-1, k)[:num_queries], index.reshape(-1, k)[:num_queries]


def nearest_neighbours(
    queries: jax.Array,
    gallery: jax.Array,
    k: int,
    *,
    exclude: jax.Array | None = None,
    chunk_size: int = 256,
) -> tuple[jax.Array, jax.Array]:
    """The k gallery rows most cosine-similar to each query, most similar first.

    Computed `chunk_size` queries at a time, so memory is chunk_size x G similarities.

    Args:
      queries: float[Q, D]; gallery: float[G, D] (normalised here, any scale is fine).
      k: neighbours per query, 1 <= k <= G (G - 1 with `exclude`).
      exclude: int[Q], a gallery index each query must not return (its own index when
        the queries are the gallery; -1 for none), or None.
      chunk_size: queries per chunk.

    Returns:
      (similarity float32[Q, k] in [-1, 1], descending; index int32[Q, k] into gallery).
    """
    _check_features("queries", queries)
    _check_features("gallery", gallery)
    if np.shape(queries)[1] != np.shape(gallery)[1]:
        raise ValueError(
            f"queries and gallery need the same feature size, got shapes {np.shape(queries)} "
            f"and {np.shape(gallery)}."
        )
    _check_positive("chunk_size", chunk_size)
    available = np.shape(gallery)[0] - (exclude is not None)
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= available):
        raise ValueError(f"k must be an int in [1, {available}] for this gallery, got k={k!r}.")
    if exclude is None:
        exclude = np.full(np.shape(queries)[0], -1, np.int32)
    _check_labels("exclude", exclude, np.shape(queries)[0])
    exclude = jnp.asarray(exclude, jnp.int32)
    return _nearest(queries, gallery, exclude, k=int(k), chunk_size=chunk_size)


def knn_scores(
    train_features: jax.Array,
    train_labels: jax.Array,
    test_features: jax.Array,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> jax.Array:
    """Weighted kNN class probabilities: each of the k most similar training rows votes
    for its class with weight exp(cosine similarity / temperature), normalised over the
    k votes (a softmax, so that no temperature overflows; the ranking is unchanged).

    Args:
      train_features: float[N, D]; train_labels: int[N] in [0, num_classes).
      test_features: float[M, D].
      num_classes: C.
      k: neighbours that vote (DINO uses 20, InstDisc 200).
      temperature: T > 0 of the vote weights.
      chunk_size: test rows per chunk of the similarity matrix.

    Returns:
      float32[M, C], rows summing to 1; the prediction is the argmax.
    """
    _check_labels("train_labels", train_labels, np.shape(train_features)[0])
    _check_positive("num_classes", num_classes)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got temperature={temperature!r}.")
    similarity, index = nearest_neighbours(test_features, train_features, k, chunk_size=chunk_size)
    return _votes(similarity, jnp.asarray(train_labels)[index], num_classes, temperature)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _votes(similarity, neighbour_labels, num_classes, temperature):
    weights = jax.nn.softmax(similarity / temperature, axis=1)  # stable for any temperature
    rows = jnp.arange(similarity.shape[0])[:, None]
    return jnp.zeros((similarity.shape[0], num_classes)).at[rows, neighbour_labels].add(weights)


def knn_accuracy(
    train_features: jax.Array,
    train_labels: jax.Array,
    test_features: jax.Array,
    test_labels: jax.Array,
    num_classes: int,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> dict[str, float]:
    """{'top1', 'top5'} test accuracy (fractions) of the weighted kNN classifier
    (see `knn_scores` for the arguments)."""
    _check_labels("test_labels", test_labels, np.shape(test_features)[0])
    scores = knn_scores(
        train_features, train_labels, test_features, num_classes,
        k=k, temperature=temperature, chunk_size=chunk_size,
    )
    return {f"top{k}": topk_accuracy(scores, test_labels, k) for k in (1, 5)}


def precision_at_k(neighbour_labels: jax.Array, query_labels: jax.Array) -> float:
    """Mean over queries of the fraction of their k neighbours that share their label.

    Args:
      neighbour_labels: int[Q, k], labels of each query's retrieved items.
      query_labels: int[Q].
    """
    if np.ndim(neighbour_labels) != 2:
        raise ValueError(
            f"neighbour_labels must be int[Q, k] (rank 2), got shape {np.shape(neighbour_labels)}."
        )
    _check_labels("query_labels", query_labels, np.shape(neighbour_labels)[0])
    return float(np.mean(np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]))


# ------------------------------------------------------------------------- RankMe


def rankme(embeddings: jax.Array, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023), the effective rank of an embedding matrix[N, D]:
    exp(-sum_k p_k log p_k) with p_k = sigma_k / sum(sigma) + eps over its singular
    values. Between 1 (a collapsed representation: every row along one direction) and
    min(N, D) (all singular values equal); r equal non-zero singular values give about r.
    """
    _check_features("embeddings", embeddings)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got eps={eps!r}.")
    return float(_rankme(jnp.asarray(embeddings, jnp.float32), eps))


@jax.jit
def _rankme(embeddings: jax.Array, eps: float) -> jax.Array:
    singular_values = jnp.linalg.svd(embeddings, compute_uv=False)
    p = singular_values / jnp.maximum(jnp.sum(singular_values), 1e-30) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


# ------------------------------------------------------------------------- t-SNE


def _squared_distances(x: jax.Array) -> jax.Array:
    sq = jnp.sum(x * x, axis=1)
    return jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * jnp.dot(x, x.T, precision="highest"), 0.0)


def _conditional_p(distances: jax.Array, perplexity: float, steps: int = 100) -> jax.Array:
    """Rows p_{j|i} ∝ exp(-beta_i d_ij) (p_{i|i} = 0), beta_i set by bisection so that
    each row's entropy is log(perplexity)."""
    n = distances.shape[0]
    off_diagonal = ~jnp.eye(n, dtype=bool)
    # Shift each row by its smallest distance: p is unchanged, exp cannot underflow.
    d = distances - jnp.min(jnp.where(off_diagonal, distances, jnp.inf), axis=1, keepdims=True)
    d = jnp.where(off_diagonal, d, jnp.inf)
    target = jnp.log(perplexity)

    def rows(beta):
        p = jnp.exp(-d * beta[:, None])
        p = p / jnp.sum(p, axis=1, keepdims=True)
        entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=1)
        return p, entropy

    def bisect(_, bounds):
        beta, low, high = bounds
        _, entropy = rows(beta)
        too_flat = entropy > target  # beta must grow
        low = jnp.where(too_flat, beta, low)
        high = jnp.where(too_flat, high, beta)
        beta = jnp.where(jnp.isinf(high), beta * 2.0, (low + high) / 2.0)
        return beta, low, high

    ones = jnp.ones((n,), jnp.float32)
    beta, _, _ = jax.lax.fori_loop(0, steps, bisect, (ones, 0.0 * ones, jnp.inf * ones))
    return rows(beta)[0]


def tsne_gradient(embedding: jax.Array, p: jax.Array) -> jax.Array:
    """Gradient of KL(P || Q) with respect to the embedding Y[N, 2]:
    4 sum_j (p_ij - q_ij)(y_i - y_j) / (1 + |y_i - y_j|^2), Q the Student-t affinities."""
    n = embedding.shape[0]
    kernel = jnp.where(jnp.eye(n, dtype=bool), 0.0, 1.0 / (1.0 + _squared_distances(embedding)))
    pq = (p - kernel / jnp.sum(kernel)) * kernel
    return 4.0 * (jnp.sum(pq, axis=1, keepdims=True) * embedding - pq @ embedding)


@functools.partial(jax.jit, static_argnames=("num_iters", "exaggeration_iters"))
def _tsne(features, perplexity, learning_rate, exaggeration, *, num_iters, exaggeration_iters):
    n = features.shape[0]
    x = features - jnp.mean(features, axis=0)
    p = _conditional_p(_squared_distances(x), perplexity)
    p = jnp.maximum((p + p.T) / (2.0 * n), 1e-12)
    # PCA initialisation, scaled to a standard deviation of 1e-4 (as scikit-learn).
    _, _, vt = jnp.linalg.svd(x, full_matrices=False)
    y = x @ vt[:2].T
    y = y / jnp.std(y[:, 0]) * 1e-4

    def step(i, carry):
        y, velocity, gains = carry
        early = i < exaggeration_iters
        grad = tsne_gradient(y, jnp.where(early, exaggeration, 1.0) * p)
        # Delta-bar-delta gains and momentum, as in the reference implementation.
        gains = jnp.where(jnp.sign(grad) != jnp.sign(velocity), gains + 0.2, gains * 0.8)
        gains = jnp.maximum(gains, 0.01)
        velocity = jnp.where(early, 0.5, 0.8) * velocity - learning_rate * gains * grad
        return y + velocity, velocity, gains

    zeros = jnp.zeros_like(y)
    y, _, _ = jax.lax.fori_loop(0, num_iters, step, (y, zeros, jnp.ones_like(y)))
    return y


def tsne(
    features: jax.Array,
    *,
    perplexity: float = 30.0,
    num_iters: int = 1000,
    exaggeration: float = 12.0,
    exaggeration_iters: int = 250,
    learning_rate: float | None = None,
) -> jax.Array:
    """Exact t-SNE of features float[N, D] into 2-D; deterministic (PCA initialisation).

    The schedule is the reference one: early exaggeration for the first
    `exaggeration_iters` iterations with momentum 0.5, then 0.8; adaptive gains.
    Memory and time per iteration are O(N^2): meant for N up to a few thousand.

    Args:
      features: float[N, D], N > 3 * perplexity.
      perplexity: effective number of neighbours of each point.
      num_iters: gradient iterations.
      exaggeration: factor on P during the first iterations.
      exaggeration_iters: how many iterations are exaggerated.
      learning_rate: None for scikit-learn's 'auto', max(N / exaggeration / 4, 50).

    Returns:
      float32[N, 2].
    """
    _check_features("features", features)
    n = np.shape(features)[0]
    if not 0 < perplexity < (n - 1) / 3:
        raise ValueError(
            f"perplexity must be in (0, (N - 1) / 3) = (0, {(n - 1) / 3:.4g}) for N={n} points, "
            f"got perplexity={perplexity!r}."
        )
    _check_positive("num_iters", num_iters)
    if learning_rate is None:
        learning_rate = max(n / exaggeration / 4.0, 50.0)
    return _tsne(
        jnp.asarray(features, jnp.float32), perplexity, learning_rate, exaggeration,
        num_iters=num_iters, exaggeration_iters=exaggeration_iters,
    )


# ------------------------------------------------------------------------- plots


def _show(axis, image: np.ndarray, edge: str | None = None) -> None:
    image = np.asarray(image)
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        axis.imshow(image)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(edge is not None)
        if edge is not None:
            spine.set_edgecolor(edge)
            spine.set_linewidth(3)


def plot_retrieval(
    path: str,
    query_images: np.ndarray,
    neighbour_images: np.ndarray,
    query_labels: np.ndarray | None = None,
    neighbour_labels: np.ndarray | None = None,
) -> None:
    """Saves a PNG grid: one row per query, the query then its neighbours in order.

    With labels, a neighbour is framed green when it shares the query's label, red
    otherwise (as in the paper's retrieval figure).

    Args:
      path: the PNG to write.
      query_images: uint8[Q, H, W, C] (C = 1 or 3).
      neighbour_images: uint8[Q, k, H, W, C].
      query_labels: int[Q] or None; neighbour_labels: int[Q, k] or None.
    """
    queries, neighbours = np.asarray(query_images), np.asarray(neighbour_images)
    if queries.ndim != 4 or neighbours.ndim != 5 or neighbours.shape[0] != queries.shape[0]:
        raise ValueError(
            "query_images must be [Q, H, W, C] and neighbour_images [Q, k, H, W, C], got "
            f"shapes {queries.shape} and {neighbours.shape}."
        )
    if (query_labels is None) != (neighbour_labels is None):
        raise ValueError("Give both query_labels and neighbour_labels, or neither.")
    num_queries, k = neighbours.shape[:2]
    figure = Figure(figsize=(1.0 * (k + 1), 1.0 * num_queries))
    draw_retrieval(figure.subplots(num_queries, k + 1, squeeze=False), queries, neighbours,
                   query_labels, neighbour_labels)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def draw_retrieval(axes: np.ndarray, queries: np.ndarray, neighbours: np.ndarray,
                   query_labels: np.ndarray | None, neighbour_labels: np.ndarray | None) -> None:
    """Draws the grid of `plot_retrieval` into axes[Q, k + 1] (the arguments as there,
    already checked), so that several grids can share one figure."""
    num_queries, k = neighbours.shape[:2]
    for row in range(num_queries):
        _show(axes[row, 0], queries[row], edge="black")
        for column in range(k):
            edge = None
            if query_labels is not None:
                same = neighbour_labels[row][column] == query_labels[row]
                edge = "tab:green" if same else "tab:red"
            _show(axes[row, column + 1], neighbours[row, column], edge)
    axes[0, 0].set_title("query", fontsize=8)
    for column in range(k):
        axes[0, column + 1].set_title(str(column + 1), fontsize=8)


def plot_tsne(
    path: str,
    embedding: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> None:
    """Saves a PNG scatter plot of a 2-D embedding[N, 2], coloured by labels int[N]."""
    embedding, labels = np.asarray(embedding), np.asarray(labels)
    if embedding.ndim != 2 or embedding.shape[1] != 2:
        raise ValueError(f"embedding must be [N, 2], got shape {embedding.shape}.")
    _check_labels("labels", labels, embedding.shape[0])
    classes = np.unique(labels)
    if class_names is not None and len(class_names) <= classes.max():
        raise ValueError(
            f"class_names has {len(class_names)} names, labels go up to {classes.max()}."
        )
    figure = Figure(figsize=(7, 6))
    axis = figure.subplots()
    draw_tsne(axis, embedding, labels, class_names)
    axis.set_title(f"t-SNE of {embedding.shape[0]} test features")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def draw_tsne(axis, embedding: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
              legend: bool = True) -> None:
    """Draws the scatter plot of `plot_tsne` (embedding[N, 2] coloured by labels int[N],
    already checked) into one matplotlib axis, so that several can share one figure."""
    classes = np.unique(labels)
    num_colours = int(classes.max()) + 1
    # Qualitative colours where they suffice; a continuous map (no legend) beyond 20.
    cmap = "tab10" if num_colours <= 10 else "tab20" if num_colours <= 20 else "nipy_spectral"
    top = {"tab10": 10, "tab20": 20}.get(cmap, num_colours)
    scatter = axis.scatter(
        embedding[:, 0], embedding[:, 1], c=labels, cmap=cmap, s=6, vmin=-0.5, vmax=top - 0.5
    )
    if legend and num_colours <= 20:
        handles = [
            axis.scatter(
                [], [], color=scatter.cmap(scatter.norm(c)), s=20,
                label=class_names[c] if class_names is not None else str(c),
            )
            for c in classes
        ]
        axis.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])


# The curves of `plot_curves`: metric name in metrics.jsonl, axis title.
CURVES = (
    ("loss", "loss"),
    ("accuracy", "pair accuracy"),
    ("knn_top1", "kNN top-1"),
    ("online_probe_top1", "online-probe top-1"),
    ("rankme", "RankMe"),
)


def plot_curves(path: str, records: Sequence[dict[str, float]]) -> list[str]:
    """Saves a PNG with one panel per metric of `CURVES` that the records hold, the
    metric against the step.

    Args:
      path: the PNG to write.
      records: metrics.jsonl records, each {'step': int, name: value, ...}, holding any
        subset of the metrics.

    Returns:
      The names of the metrics drawn, in panel order.
    """
    names = [(name, title) for name, title in CURVES if any(name in r for r in records)]
    if not names:
        raise ValueError(f"The records hold none of the metrics {[n for n, _ in CURVES]}; nothing to plot.")
    figure = Figure(figsize=(3.2 * len(names), 3.0))
    for axis, (name, title) in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        points = sorted((r["step"], r[name]) for r in records if name in r)
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return [name for name, _ in names]

