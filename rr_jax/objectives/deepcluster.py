"""DeepCluster (Caron et al., 2018) as the official code runs it.

At the start of every epoch the backbone's features of the whole pretraining split
(eval mode, no augmentation) are PCA-whitened (all D components, D/2 from D >= 512),
L2-normalised and clustered by k-means into 10 x (number of classes) clusters
(k-means++ initialisation, a fixed number of Lloyd iterations, the best of a few
initialisations by inertia; the official code calls scikit-learn with 30 iterations
and 5 initialisations, the defaults of config.deepcluster). The cluster of each image is
its pseudo-label for the epoch; the head Dense(256) -> BatchNorm -> LeakyReLU(0.01) ->
Dense(clusters) has its last layer re-initialised (weights N(0, 0.01), biases 0) and
is trained with the backbone by a cross-entropy weighted per cluster by
1 - (cluster size / N), the official code's class balancing; Adam 1e-3, views cropped
with padding H/8 and flipped.

Everything numeric (whitening, k-means, the loss) is jitted JAX; the cluster state
(the assignments of the split, their class weights and the epoch they belong to) is
part of the train state, so a resumed run re-clusters exactly when an uninterrupted
one does. Where the official code differs from this description by accident, it is
not reproduced: it extracts the features of augmented images and augments the images
of an epoch twice (its loader's transform and its dataset's), and draws the k-means
seed from the clock.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rr_jax.batch_norm import BatchNorm
from rr_jax.numerics import squared_distances, unit_rows
from rr_jax.objectives import Objective, Variables, config_error
from rr_jax.objectives.common import CropFlip, classification_loss, crop_flip_views

HIDDEN_DIM = 256
LAST_LAYER_STD = 0.01
CLUSTERS_PER_CLASS = 10  # as DeepCluster's k = 10 000 on ImageNet's 1 000 classes


# ----------------------------------------------------------------- clustering


@jax.jit
def pca_whiten(features: jax.Array) -> jax.Array:
    """PCA whitening, as scikit-learn's PCA(n_components, whiten=True).fit_transform:
    the centred features projected on their principal directions and scaled to unit
    variance. n_components = D for D < 512, D / 2 otherwise (the official code).
    float[N, D] -> float32[N, n_components]."""
    x = features.astype(jnp.float32)
    x = x - x.mean(0)
    components = x.shape[1] if x.shape[1] < 512 else x.shape[1] // 2
    u, _, _ = jnp.linalg.svd(x, full_matrices=False)
    return u[:, :components] * jnp.sqrt(x.shape[0] - 1.0)


@functools.partial(jax.jit, static_argnums=(2,))
def kmeans_plus_plus(key: jax.Array, x: jax.Array, num_clusters: int) -> jax.Array:
    """k-means++ initial centres: the first a uniform data point, each next one a data
    point drawn with probability proportional to its squared distance to the nearest
    centre so far. float[N, D] -> float[num_clusters, D]."""
    keys = jax.random.split(key, num_clusters)
    first = x[jax.random.randint(keys[0], (), 0, x.shape[0])]
    centres = jnp.zeros((num_clusters, x.shape[1]), x.dtype).at[0].set(first)
    distances = squared_distances(x, first[None])[:, 0]

    def add_centre(i, carry):
        centres, distances = carry
        total = distances.sum()  # 0 when every point is a centre already: draw uniformly
        probabilities = jnp.where(total > 0, distances / jnp.where(total > 0, total, 1.0), 1.0 / x.shape[0])
        index = jax.random.choice(keys[i], x.shape[0], p=probabilities)
        centre = x[index]
        return centres.at[i].set(centre), jnp.minimum(distances, squared_distances(x, centre[None])[:, 0])

    return jax.lax.fori_loop(1, num_clusters, add_centre, (centres, distances))[0]


@functools.partial(jax.jit, static_argnums=(2,))
def lloyd(x: jax.Array, centres: jax.Array, iterations: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`iterations` of Lloyd's algorithm from `centres`: assign each point to its
    nearest centre, move each centre to the mean of its points (an empty cluster keeps
    its centre). Returns (centres float[K, D], assignments int32[N] to those centres,
    inertia: the sum of squared distances to them)."""

    def update(_, centres):
        assignments = jnp.argmin(squared_distances(x, centres), axis=1)
        one_hot = jax.nn.one_hot(assignments, centres.shape[0], dtype=x.dtype)
        counts = one_hot.sum(0)
        sums = jnp.dot(one_hot.T, x, precision=jax.lax.Precision.HIGHEST)
        return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centres)

    centres = jax.lax.fori_loop(0, iterations, update, centres)
    distances = squared_distances(x, centres)
    return centres, jnp.argmin(distances, axis=1).astype(jnp.int32), distances.min(1).sum()


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def kmeans(key: jax.Array, x: jax.Array, num_clusters: int, iterations: int, num_init: int) -> jax.Array:
    """Cluster assignments int32[N] of x float[N, D]: the lowest-inertia result of
    `num_init` k-means++ initialisations refined by `iterations` Lloyd iterations."""

    def attempt(key):
        _, assignments, inertia = lloyd(x, kmeans_plus_plus(key, x, num_clusters), iterations)
        return assignments, inertia

    assignments, inertia = jax.lax.map(attempt, jax.random.split(key, num_init))
    return assignments[jnp.argmin(inertia)]


def cluster_weights(assignments: jax.Array, num_clusters: int) -> jax.Array:
    """The official class weights 1 - (cluster size / N). int[N] -> float32[num_clusters]."""
    counts = jnp.zeros(num_clusters, jnp.float32).at[assignments].add(1.0)
    return 1.0 - counts / assignments.shape[0]


# ----------------------------------------------------------------- the objective


class ClusterHead(nn.Module):
    """Dense(256) -> BatchNorm -> LeakyReLU(0.01) -> Dense(num_clusters): float[N, D] -> float[N, clusters]."""

    num_clusters: int
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = nn.Dense(HIDDEN_DIM, name="linear1")(x)
        x = BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, axis_name=self.axis_name,
                      name="bn1")(x)
        return nn.Dense(self.num_clusters, name="linear2")(nn.leaky_relu(x, 0.01))


@dataclasses.dataclass(frozen=True)
class DeepCluster(Objective):
    """Fields: num_clusters, kmeans_iterations, kmeans_init (k-means++ attempts),
    augment (CropFlip with padding H/8)."""

    name = "deepcluster"
    has_epoch_hook = True
    settings = ("kmeans_iterations", "kmeans_init")
    augment: CropFlip = CropFlip(padding=0)
    num_clusters: int = 100  # config.deepcluster.clusters_per_class x the dataset's classes
    kmeans_iterations: int = 30
    kmeans_init: int = 5

    @classmethod
    def config_defaults(cls) -> ml_collections.ConfigDict:
        return ml_collections.ConfigDict({"clusters_per_class": CLUSTERS_PER_CLASS, **super().config_defaults()})

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        for key in ("clusters_per_class", "kmeans_iterations", "kmeans_init"):
            value = config.deepcluster[key]
            if not isinstance(value, int) or value < 1:
                raise config_error(f"deepcluster.{key}", value, "it must be a positive integer")

    @classmethod
    def augment_config(cls, config, spec) -> CropFlip:
        return CropFlip(padding=spec.image_shape[0] // 8, mean=spec.mean, std=spec.std)

    @classmethod
    def from_config(cls, config, spec) -> DeepCluster:
        return dataclasses.replace(super().from_config(config, spec),
                                   num_clusters=config.deepcluster.clusters_per_class * spec.num_classes)

    def inputs(self, key, batch, objective_state):
        views = crop_flip_views(key, batch["image"], 1, self.augment)
        return views, objective_state["assignments"][batch["index"]]

    def init_head(self, key, features, intermediates, num_classes) -> Variables:
        return ClusterHead(self.num_clusters).init(key, jnp.zeros((2, features.shape[-1])), train=False)

    def init_state(self, num_examples: int, variables: Variables) -> dict[str, jax.Array]:
        return {"assignments": jnp.zeros(num_examples, jnp.int32),
                "weights": jnp.ones(self.num_clusters, jnp.float32),
                "epoch": jnp.array(-1, jnp.int32)}

    def loss(self, features, head_variables, key, targets, *, intermediates, objective_state, axis_name):
        logits, updates = ClusterHead(self.num_clusters, axis_name).apply(
            head_variables, features[0], train=True, mutable=["batch_stats"])
        weights = objective_state["weights"][targets]
        nll, accuracy = classification_loss(logits, targets, objective_state["weights"])
        # The weighted mean of the whole batch: this device's weighted sum over the
        # batch's total weight, times the device count (the step averages over devices).
        local_weight = weights.sum()
        total_weight, devices = local_weight, 1
        if axis_name is not None:
            total_weight, devices = jax.lax.psum(local_weight, axis_name), jax.lax.axis_size(axis_name)
        loss = nll * local_weight / total_weight * devices
        return loss, {"loss": loss, "accuracy": accuracy}, updates["batch_stats"]

    def start_epoch(self, epoch, state, features):
        """Re-clusters the split (unless the state's clusters belong to `epoch` already,
        as after a resume) and re-initialises the head's last layer."""
        if int(state.objective_state["epoch"]) == epoch:
            return state
        num_examples = np.shape(state.objective_state["assignments"])[0]
        if num_examples < self.num_clusters:
            raise ValueError(f"DeepCluster needs at least num_clusters={self.num_clusters} pretraining images, "
                             f"got {num_examples}; lower config.deepcluster.clusters_per_class.")
        key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(state.rng)), epoch)
        cluster_key, head_key = jax.random.split(key)
        points = jax.jit(unit_rows)(pca_whiten(jnp.asarray(features(state))))
        assignments = kmeans(cluster_key, points, self.num_clusters, self.kmeans_iterations, self.kmeans_init)
        last = state.params["head"]["linear2"]
        params = {**state.params, "head": {**state.params["head"], "linear2": {
            "kernel": LAST_LAYER_STD * jax.random.normal(head_key, np.shape(last["kernel"]), jnp.float32),
            "bias": jnp.zeros(np.shape(last["bias"]), jnp.float32),
        }}}
        objective_state = {"assignments": assignments, "weights": cluster_weights(assignments, self.num_clusters),
                           "epoch": jnp.array(epoch, jnp.int32)}
        return state.replace(params=params, objective_state=objective_state)

    def describe(self) -> str:
        return f"{self.name}, {self.num_clusters} clusters re-computed every epoch"
