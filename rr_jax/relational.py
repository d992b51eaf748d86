"""The relational-reasoning objective: pairs of views, the relation head, the pair loss.

K augmented views of M images give embeddings z[K, M, D]. Every pair of views
(i, j), i < j, gives M positive pairs a(z[i, m], z[j, m]) and M negative pairs
a(z[i, m], z[j, sigma(m)]), sigma without fixed points. The relation head scores
each aggregated pair and is trained, with the encoder, to tell positives from
negatives.

Pairs are described by two index vectors into the flattened embeddings
z.reshape(K * M, D): row r of the head's input is a(z_flat[left[r]], z_flat[right[r]]).
For the linear aggregations ('cat', 'sum', 'mean') the head's first Dense layer
distributes over the aggregation, so it is applied once per embedding (K*M rows)
and combined per pair (2*P*M rows) instead of materialising the aggregated pairs
(`factored=True`, the default).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rr_jax.batch_norm import BatchNorm
from rr_jax.initializers import uniform_fan_in
from rr_jax.shuffle import derangements

AGGREGATIONS = ("cat", "sum", "mean", "max")
HEADS = ("mlp", "dot", "encoder_dot")
NEGATIVES = ("derangement", "roll")
LOSSES = ("focal", "bce")

# PyTorch BatchNorm defaults: momentum 0.1 on the new statistic, eps 1e-5.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

Variables = Any  # a flax variables dict {'params': ..., 'batch_stats': ...}


def check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    """Raises ValueError naming `name`, the bad `value` and the `allowed` ones."""
    if value not in allowed:
        raise ValueError(
            f"Unknown {name} {value!r}; valid values: {', '.join(map(repr, allowed))}."
        )


def aggregate(left: jax.Array, right: jax.Array, aggregation: str = "cat") -> jax.Array:
    """Aggregates two batches of embeddings into relation-head inputs.

    Args:
      left, right: float[..., D].
      aggregation: 'cat' (concatenation, float[..., 2D]), 'sum', 'mean' or 'max'
        (element-wise, float[..., D]).
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if aggregation == "cat":
        return jnp.concatenate([left, right], axis=-1)
    if aggregation == "sum":
        return left + right
    if aggregation == "mean":
        return 0.5 * (left + right)
    return jnp.maximum(left, right)


def _view_pairs(num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """(i_p, j_p) for the P = K(K-1)/2 view pairs i < j, row-major order."""
    return np.triu_indices(num_views, k=1)


def pair_indices(
    key: jax.Array | None,
    num_views: int,
    batch_size: int,
    negatives: str = "derangement",
    *,
    num_shards: int = 1,
    shard: jax.Array | int = 0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Indices of every positive and negative pair.

    Left indices point into the (local) flattened embeddings z.reshape(K * M, D);
    right indices into the flattened embeddings of the whole batch, which is the local
    batch itself unless the batch is sharded (see below).

    Args:
      key: PRNG key for 'derangement' negatives (unused, may be None, for 'roll').
      num_views: K >= 2.
      batch_size: M >= 2 local images.
      negatives: 'derangement' (independent uniform derangement sigma_p for every view
        pair p) or 'roll' (the reference code's sigma_p(m) = (m - s_p) mod M with
        s_p = 1 + (p mod (M - 1)), deterministic).
      num_shards, shard: the local images are shard `shard` (may be traced) of a batch
        of num_shards * M images, whose embeddings are z_all[K, num_shards * M, D];
        sigma_p is then a derangement of the whole batch (the same `key` must be passed
        on every shard) and this shard gets its M rows of it.

    Returns:
      (left, right, targets): int32[2PM], int32[2PM], float32[2PM]. Row p*M + m is the
      positive (z[i_p, m], z[j_p, m]); row PM + p*M + m the negative
      (z[i_p, m], z_all[j_p, sigma_p(g)]) with g the image's index in the whole batch;
      targets are 1 then 0.
    """
    total = num_shards * batch_size
    _check_sizes(num_views, total)
    check_choice("negatives", negatives, NEGATIVES)
    i, j = _view_pairs(num_views)
    num_pairs = len(i)
    image = shard * batch_size + jnp.arange(batch_size)  # index in the whole batch
    if negatives == "roll":
        shift = jnp.asarray(1 + np.arange(num_pairs) % (total - 1))
        sigma = (image[None, :] - shift[:, None]) % total
    else:
        if key is None:
            raise ValueError("negatives='derangement' needs a PRNG key, got key=None.")
        sigma = jnp.take(derangements(key, num_pairs, total), image, axis=1)
    local = np.arange(batch_size)
    first = jnp.asarray(i[:, None] * batch_size + local[None, :]).ravel()
    second = jnp.asarray(j[:, None] * total)
    left = jnp.concatenate([first, first])
    right = jnp.concatenate([(second + image[None, :]).ravel(), (second + sigma).ravel()])
    size = num_pairs * batch_size
    targets = jnp.concatenate([jnp.ones(size, jnp.float32), jnp.zeros(size, jnp.float32)])
    return left.astype(jnp.int32), right.astype(jnp.int32), targets


def _check_sizes(num_views: int, batch_size: int) -> None:
    if num_views < 2:
        raise ValueError(
            f"Relational reasoning needs K >= 2 views of each image to form pairs, got K={num_views}."
        )
    if batch_size < 2:
        raise ValueError(
            f"Negatives need M >= 2 images in the batch, got M={batch_size}: a batch of one "
            "image has no negatives."
        )


def _check_embeddings(z: jax.Array) -> tuple[int, int, int]:
    if z.ndim != 3:
        raise ValueError(
            f"Embeddings must be float[K, M, D] (views, images, features), got shape {z.shape}."
        )
    num_views, batch_size, dim = z.shape
    _check_sizes(num_views, batch_size)
    return num_views, batch_size, dim


def make_pairs(
    z: jax.Array,
    key: jax.Array | None,
    *,
    aggregation: str = "cat",
    negatives: str = "derangement",
) -> tuple[jax.Array, jax.Array]:
    """All aggregated positive and negative pairs of K views of M images.

    The materialised reference: the loss never builds these pairs (its head applies the
    first layer per embedding); tests and bench/bench_relational.py check it against this.

    Args:
      z: float[K, M, D] embeddings, K >= 2 views of M >= 2 images.
      key: PRNG key for the derangements (unused for negatives='roll').
      aggregation: 'cat', 'sum', 'mean' or 'max'.
      negatives: 'derangement' or 'roll' (see `pair_indices`).

    Returns:
      pairs: float[2PM, D'] with P = K(K-1)/2, D' = 2D for 'cat' else D; first all
        positives (pair p major, image m minor), then all negatives in the same order.
      targets: float32[2PM], 1 for positives, 0 for negatives.
    """
    num_views, batch_size, dim = _check_embeddings(z)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    left, right, targets = pair_indices(key, num_views, batch_size, negatives)
    flat = z.reshape(num_views * batch_size, dim)
    return aggregate(flat[left], flat[right], aggregation), targets


class PairDense(nn.Module):
    """The head's first Dense layer, applied to aggregated pairs or factored.

    Parameters: kernel float[D', features] (D' = 2D for 'cat', else D), bias.
    """

    features: int
    embedding_dim: int
    aggregation: str = "cat"

    def setup(self):
        fan_in = self.embedding_dim * (2 if self.aggregation == "cat" else 1)
        self.kernel = self.param("kernel", uniform_fan_in(fan_in), (fan_in, self.features))
        self.bias = self.param("bias", uniform_fan_in(fan_in), (self.features,))

    def __call__(self, pairs: jax.Array) -> jax.Array:
        """float[R, D'] aggregated pairs -> float[R, features]."""
        return pairs @ self.kernel + self.bias

    def factored(
        self, left_source: jax.Array, right_source: jax.Array, left: jax.Array, right: jax.Array
    ) -> jax.Array:
        """Same as ``self(aggregate(left_source[left], right_source[right]))``, cheaper.

        Args:
          left_source: float[N, D]; right_source: float[N', D]; left, right: int[R] row
            indices into them. Returns float[R, features].
        """
        if self.aggregation == "max":  # not linear: aggregate first
            return self(aggregate(left_source[left], right_source[right], "max"))
        if self.aggregation == "cat":
            dim = self.embedding_dim
            first = left_source @ self.kernel[:dim] + self.bias
            return first[left] + (right_source @ self.kernel[dim:])[right]
        scale = 0.5 if self.aggregation == "mean" else 1.0
        first = left_source @ (scale * self.kernel) + self.bias
        return first[left] + (right_source @ (scale * self.kernel))[right]


class RelationHead(nn.Module):
    """Relation head: Dense(hidden) -> BatchNorm -> LeakyReLU(0.01) -> Dense(1) logits.

    Attributes:
      embedding_dim: D of the embeddings it relates.
      aggregation: how pairs are aggregated ('cat', 'sum', 'mean', 'max').
      hidden_dim: width of the hidden layer (256 in the paper).
      axis_name: pmap axis name for cross-replica BatchNorm statistics, or None.
    """

    embedding_dim: int
    aggregation: str = "cat"
    hidden_dim: int = 256
    negative_slope: float = 0.01
    axis_name: str | None = None

    def setup(self):
        check_choice("aggregation", self.aggregation, AGGREGATIONS)
        self.hidden = PairDense(self.hidden_dim, self.embedding_dim, self.aggregation)
        self.norm = BatchNorm(
            momentum=BN_MOMENTUM, epsilon=BN_EPSILON, axis_name=self.axis_name
        )
        self.output = nn.Dense(
            1,
            kernel_init=uniform_fan_in(self.hidden_dim),
            bias_init=uniform_fan_in(self.hidden_dim),
        )

    def _tail(self, hidden: jax.Array, train: bool) -> jax.Array:
        hidden = self.norm(hidden, use_running_average=not train)
        return self.output(nn.leaky_relu(hidden, self.negative_slope))[:, 0]

    def __call__(self, pairs: jax.Array, train: bool) -> jax.Array:
        """float[R, D'] aggregated pairs -> float[R] logits."""
        return self._tail(self.hidden(pairs), train)

    def score(
        self,
        left_source: jax.Array,
        right_source: jax.Array,
        left: jax.Array,
        right: jax.Array,
        train: bool,
        factored: bool = True,
    ) -> jax.Array:
        """Logits of the pairs (left_source[left[r]], right_source[right[r]]).

        Args:
          left_source: float[N, D]; right_source: float[N', D] (often the same array);
          left, right: int[R]; factored: apply the first layer per embedding (equal
            result, fewer FLOPs) instead of per aggregated pair.
        Returns:
          float[R] logits.
        """
        if factored:
            hidden = self.hidden.factored(left_source, right_source, left, right)
        else:
            pairs = aggregate(left_source[left], right_source[right], self.aggregation)
            hidden = self.hidden(pairs)
        return self._tail(hidden, train)


class DotProductHead(nn.Module):
    """The paper's ablation of the relation head: logit = scale * <z_i, z_j> + bias.

    The two scalars (initialised 1 and 0) only calibrate the logits for the pair loss;
    the relation itself is the plain dot product of the two embeddings, so nothing is
    learned about pairs beyond what the encoder puts into its features.
    """

    def setup(self):
        self.scale = self.param("scale", nn.initializers.constant(self.initial_scale()), ())
        self.bias = self.param("bias", nn.initializers.zeros, ())

    def initial_scale(self) -> float:
        """Initial value of the logit scale."""
        return 1.0

    def encode(self, embeddings: jax.Array) -> jax.Array:
        """What the dot product is taken of: float[N, D] -> float[N, D'] (here z itself)."""
        return embeddings

    def score(
        self,
        left_source: jax.Array,
        right_source: jax.Array,
        left: jax.Array,
        right: jax.Array,
        train: bool = False,
        factored: bool = True,
    ) -> jax.Array:
        """float[R] logits of the pairs (left_source[left[r]], right_source[right[r]]);
        `train` and `factored` are accepted for the RelationHead interface and unused."""
        del train, factored
        encoded_left = self.encode(left_source)
        encoded_right = encoded_left if right_source is left_source else self.encode(right_source)
        dots = jnp.sum(encoded_left[left] * encoded_right[right], axis=-1)
        return self.scale * dots + self.bias


class EncoderDotHead(DotProductHead):
    """Head ablation "encoder + dot product": logit = scale * <e(z_i), e(z_j)> + bias.

    e is an MLP applied to each embedding on its own, Dense(hidden) -> LeakyReLU(0.01)
    -> Dense(hidden) (PyTorch's Linear initialisation), so the head learns a space to
    compare views in, but the pair itself only meets in the dot product: it sits between
    the plain dot product (nothing learned) and the relation head (an MLP on each
    pair). The encoding runs once per embedding (K*M rows), not per pair. The scale
    starts at 1/sqrt(hidden) so that initial logits are O(1), as in scaled dot-product
    attention.

    Attributes:
      embedding_dim: D of the embeddings.
      hidden_dim: width of both encoder layers (the encoding's dimension).
    """

    embedding_dim: int
    hidden_dim: int = 256
    negative_slope: float = 0.01

    def setup(self):
        super().setup()
        self.encoder_hidden = nn.Dense(
            self.hidden_dim,
            kernel_init=uniform_fan_in(self.embedding_dim),
            bias_init=uniform_fan_in(self.embedding_dim),
        )
        self.encoder_output = nn.Dense(
            self.hidden_dim,
            kernel_init=uniform_fan_in(self.hidden_dim),
            bias_init=uniform_fan_in(self.hidden_dim),
        )

    def initial_scale(self) -> float:
        return float(1.0 / np.sqrt(self.hidden_dim))

    def encode(self, embeddings: jax.Array) -> jax.Array:
        """float[N, D] embeddings -> float[N, hidden] encodings."""
        return self.encoder_output(nn.leaky_relu(self.encoder_hidden(embeddings), self.negative_slope))


def init_relation_head(
    key: jax.Array,
    embedding_dim: int,
    *,
    aggregation: str = "cat",
    hidden_dim: int = 256,
    head: str = "mlp",
) -> Variables:
    """Initial variables {'params', 'batch_stats'} of a `RelationHead` (head='mlp'), a
    `DotProductHead` (head='dot', which ignores aggregation and hidden_dim) or an
    `EncoderDotHead` (head='encoder_dot', which ignores aggregation)."""
    check_choice("head", head, HEADS)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    if head in ("dot", "encoder_dot"):
        module = DotProductHead() if head == "dot" else EncoderDotHead(embedding_dim, hidden_dim)
        dummy = jnp.zeros((2, embedding_dim), jnp.float32)
        index = jnp.zeros((2,), jnp.int32)
        variables = module.init(key, dummy, dummy, index, index, method="score")
        return {"batch_stats": {}, **variables}
    module = RelationHead(embedding_dim, aggregation, hidden_dim)
    width = 2 * embedding_dim if aggregation == "cat" else embedding_dim
    return module.init(key, jnp.zeros((2, width), jnp.float32), train=False)


def pair_loss(logits: jax.Array, targets: jax.Array, loss: str = "focal") -> jax.Array:
    """Mean pair loss: 'focal' (sigmoid focal, gamma=2, alpha=0.5) or 'bce'.

    Args:
      logits, targets: float[R]. Returns a float32 scalar.
    """
    check_choice("loss", loss, LOSSES)
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32
    if loss == "focal":
        return optax.sigmoid_focal_loss(logits, targets, alpha=0.5, gamma=2.0).mean()
    return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def pair_metrics(logits: jax.Array, targets: jax.Array) -> dict[str, jax.Array]:
    """Pair accuracy overall, on positives and on negatives, and the pair count.

    A pair is predicted positive when its logit is > 0. Args: logits, targets float[R].
    """
    correct = ((logits > 0) == (targets > 0.5)).astype(jnp.float32)
    positives = targets.astype(jnp.float32)
    negatives = 1.0 - positives
    return {
        "accuracy": correct.mean(),
        "accuracy_positive": (correct * positives).sum() / jnp.maximum(positives.sum(), 1.0),
        "accuracy_negative": (correct * negatives).sum() / jnp.maximum(negatives.sum(), 1.0),
        "num_pairs": jnp.asarray(logits.shape[0], jnp.float32),
    }


def _head_for(
    head_variables: Variables, dim: int, aggregation: str, axis_name
) -> RelationHead | DotProductHead | EncoderDotHead:
    """The head matching `head_variables` (an EncoderDotHead's hold 'encoder_hidden',
    a DotProductHead's 'scale'; RelationHead and EncoderDotHead variables are checked
    against D, a RelationHead's against the aggregation too)."""
    params = head_variables.get("params", {})
    if "encoder_hidden" in params:
        kernel = params["encoder_hidden"]["kernel"]
        if kernel.shape[0] != dim:
            raise ValueError(
                f"The encoder_dot head encodes embeddings of width {kernel.shape[0]}, got D={dim}."
            )
        return EncoderDotHead(dim, kernel.shape[1])
    if "scale" in params:
        return DotProductHead()
    try:
        kernel = head_variables["params"]["hidden"]["kernel"]
    except (KeyError, TypeError) as error:
        raise ValueError(
            "head_variables must be RelationHead variables {'params': {'hidden': "
            "{'kernel', 'bias'}, ...}, 'batch_stats': ...}, e.g. from init_relation_head()."
        ) from error
    expected = 2 * dim if aggregation == "cat" else dim
    if kernel.shape[0] != expected:
        raise ValueError(
            f"The relation head takes inputs of width {kernel.shape[0]}, but aggregation="
            f"{aggregation!r} of D={dim} embeddings gives width {expected}."
        )
    return RelationHead(dim, aggregation, kernel.shape[1], axis_name=axis_name)


@functools.partial(
    jax.jit,
    static_argnames=(
        "aggregation", "negatives", "loss", "train", "axis_name", "global_negatives", "factored"
    ),
)
def relational_loss(
    embeddings: jax.Array,
    head_variables: Variables,
    key: jax.Array | None,
    *,
    aggregation: str = "cat",
    negatives: str = "derangement",
    loss: str = "focal",
    train: bool = True,
    axis_name: str | None = None,
    global_negatives: bool = False,
    factored: bool = True,
) -> tuple[jax.Array, dict[str, jax.Array], Variables]:
    """The relational-reasoning loss of K views of M images; pure and jit/pmap-able.

    Args:
      embeddings: float[K, M, D] encoder outputs, view k of image m at [k, m].
      head_variables: variables {'params', 'batch_stats'} of the relation head or of
        one of its ablations ('dot', 'encoder_dot'); they choose the head (see
        `init_relation_head`).
      key: PRNG key for the negatives (may be None with negatives='roll').
      aggregation: 'cat', 'sum', 'mean' or 'max'.
      negatives: 'derangement' (uniform, a fresh one per view pair) or 'roll'.
      loss: 'focal' (the reference code) or 'bce' (the paper's text).
      train: BatchNorm uses batch statistics and updates the running ones.
      axis_name: pmap/shard_map axis for cross-replica BatchNorm statistics.
      global_negatives: pair each local image with images of the whole batch across
        `axis_name` (all-gathered embeddings) instead of the local batch only; the same
        `key` must then be given on every device. Without axis_name the local batch
        is the whole batch.
      factored: apply the head's first layer per embedding, not per pair (same value);
        False, the naive head over materialised pairs, is the reference tests and bench use.

    Returns:
      (loss, metrics, batch_stats): the scalar loss; a dict with 'loss', 'accuracy',
      'accuracy_positive', 'accuracy_negative', 'num_pairs'; and the head's new
      BatchNorm statistics (unchanged when train=False).
    """
    num_views, batch_size, dim = _check_embeddings(embeddings)
    check_choice("aggregation", aggregation, AGGREGATIONS)
    check_choice("loss", loss, LOSSES)
    head = _head_for(head_variables, dim, aggregation, axis_name)
    flat = embeddings.reshape(num_views * batch_size, dim)
    if global_negatives and axis_name is not None:
        everything = jax.lax.all_gather(embeddings, axis_name, axis=1, tiled=True)
        shards = everything.shape[1] // batch_size
        left, right, targets = pair_indices(
            key, num_views, batch_size, negatives,
            num_shards=shards, shard=jax.lax.axis_index(axis_name),
        )
        right_source = everything.reshape(-1, dim)
    else:
        left, right, targets = pair_indices(key, num_views, batch_size, negatives)
        right_source = flat
    score = functools.partial(
        head.apply, head_variables, flat, right_source, left, right, train, factored,
        method="score",
    )
    if train:
        logits, updates = score(mutable=["batch_stats"])
        batch_stats = updates.get("batch_stats", {})
    else:
        logits, batch_stats = score(), head_variables["batch_stats"]
    value = pair_loss(logits, targets, loss)
    return value, {"loss": value, **pair_metrics(logits, targets)}, batch_stats
