"""Evaluation metrics of frozen features: top-k accuracy, kNN, retrieval, RankMe.

The functions are pure (arrays in, numbers or arrays out) and jit-compiled; t-SNE lives
in `rr_jax.tsne` and the pictures in `rr_jax.plots`. Features are float[N, D] rows,
e.g. from `rr_jax.features.extract_features`.

- kNN classifier (the monitor of InstDisc, Wu et al. 2018, as used by DINO): cosine
  similarity to every training feature, the k most similar vote for their class with
  weight exp(similarity / T) (normalised over the k votes).
- Retrieval: the k nearest gallery items by cosine similarity; precision@k is the
  fraction of them that share the query's label (the paper's retrieval figure shows
  CIFAR queries with their top-10 neighbours).
- RankMe (Garrido et al., 2023): the effective rank of the features, an unsupervised
  monitor of dimensional collapse.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rr_jax.numerics import unit_rows


def check_features(name: str, x) -> None:
    """Raises ValueError unless x is float[N, D] (rank 2)."""
    if np.ndim(x) != 2:
        raise ValueError(f"{name} must be float[N, D] (rank 2), got shape {np.shape(x)}.")


def check_labels(name: str, labels, n: int) -> None:
    """Raises ValueError unless labels is int[n]."""
    if np.shape(labels) != (n,):
        raise ValueError(
            f"{name} must be int[{n}] (one label per row), got shape {np.shape(labels)}."
        )


def check_positive(name: str, value) -> None:
    """Raises ValueError unless value is an int >= 1."""
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
    check_features("scores", scores)
    check_labels("labels", labels, np.shape(scores)[0])
    check_positive("k", k)
    return float(_topk_hits(jnp.asarray(scores), jnp.asarray(labels), min(k, np.shape(scores)[1])))


@functools.partial(jax.jit, static_argnums=2)
def _topk_hits(scores: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    _, top = jax.lax.top_k(scores, k)
    return jnp.mean(jnp.any(top == labels[:, None], axis=1))


# ------------------------------------------------------------- nearest neighbours


@functools.partial(jax.jit, static_argnames=("k", "chunk_size"))
def _nearest(queries, gallery, exclude, *, k, chunk_size):
    num_queries = queries.shape[0]
    pad = -num_queries % chunk_size
    queries = jnp.pad(unit_rows(queries), ((0, pad), (0, 0)))
    exclude = jnp.pad(exclude, (0, pad), constant_values=-1)
    gallery = unit_rows(gallery)
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
    check_features("queries", queries)
    check_features("gallery", gallery)
    if np.shape(queries)[1] != np.shape(gallery)[1]:
        raise ValueError(
            f"queries and gallery need the same feature size, got shapes {np.shape(queries)} "
            f"and {np.shape(gallery)}."
        )
    check_positive("chunk_size", chunk_size)
    available = np.shape(gallery)[0] - (exclude is not None)
    if not (isinstance(k, (int, np.integer)) and 1 <= k <= available):
        raise ValueError(f"k must be an int in [1, {available}] for this gallery, got k={k!r}.")
    if exclude is None:
        exclude = np.full(np.shape(queries)[0], -1, np.int32)
    check_labels("exclude", exclude, np.shape(queries)[0])
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
    check_labels("train_labels", train_labels, np.shape(train_features)[0])
    check_positive("num_classes", num_classes)
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
    check_labels("test_labels", test_labels, np.shape(test_features)[0])
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
    check_labels("query_labels", query_labels, np.shape(neighbour_labels)[0])
    return float(np.mean(np.asarray(neighbour_labels) == np.asarray(query_labels)[:, None]))


# ------------------------------------------------------------------------- RankMe


def rankme(embeddings: jax.Array, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al., 2023), the effective rank of an embedding matrix[N, D]:
    exp(-sum_k p_k log p_k) with p_k = sigma_k / sum(sigma) + eps over its singular
    values. Between 1 (a collapsed representation: every row along one direction) and
    min(N, D) (all singular values equal); r equal non-zero singular values give about r.
    """
    check_features("embeddings", embeddings)
    if not 0 <= eps < 1:
        raise ValueError(f"eps must be in [0, 1), got eps={eps!r}.")
    return float(_rankme(jnp.asarray(embeddings, jnp.float32), eps))


@jax.jit
def _rankme(embeddings: jax.Array, eps: float) -> jax.Array:
    singular_values = jnp.linalg.svd(embeddings, compute_uv=False)
    p = singular_values / jnp.maximum(jnp.sum(singular_values), 1e-30) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p)))
