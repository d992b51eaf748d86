"""The online linear probe: a linear classifier trained on frozen features during pretraining.

Inside every pretraining step, `update` takes one optimizer step of a linear classifier
on `jax.lax.stop_gradient` backbone features of labelled images, so its accuracy on a
held-out set (`evaluate`, logged by `rr_jax.monitors`) follows the representation as it
is learnt, at the cost of one eval-mode forward pass of a batch, without a separate
probe run. The classifier never influences the backbone: no gradient flows back through
the features, and its parameters and optimizer state live in their own field of the
train state (`OnlineProbeState`), so a resumed run continues it exactly.

`LinearHead` and `classify` are also the offline probe's
(`rr_jax.linear_probe`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from rr_jax.evaluate import topk_accuracy
from rr_jax.initializers import uniform_fan_in
from rr_jax.numerics import cross_entropy


class LinearHead(nn.Module):
    """One Dense layer, initialised as PyTorch's nn.Linear: weights and bias uniform in
    +-1/sqrt(D). ``__call__(features: [N, D]) -> logits [N, num_classes]``."""

    num_classes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        init = uniform_fan_in(features.shape[-1])
        return nn.Dense(self.num_classes, kernel_init=init, bias_init=init, name="dense")(features)


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_head(num_classes: int, key: jax.Array, dim: int) -> Any:
    """Fresh `LinearHead` params {'dense': {'kernel': [dim, C], 'bias': [C]}}."""
    return LinearHead(num_classes).init(key, jnp.zeros((1, dim)))["params"]


@jax.jit
def classify(head_params: Any, features: jax.Array) -> jax.Array:
    """Logits float32[N, C] of a `LinearHead` with `head_params` on features [N, D]."""
    num_classes = head_params["dense"]["bias"].shape[0]
    return LinearHead(num_classes).apply({"params": head_params}, jnp.asarray(features, jnp.float32))


@functools.cache
def make_optimizer(learning_rate: float, total_steps: int | None = None) -> optax.GradientTransformation:
    """Adam at `learning_rate`, cosine-decayed to 0 over `total_steps` updates (None:
    constant). One object per arguments: a stable static jit argument."""
    if total_steps is None:
        return optax.adam(learning_rate)
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(int(total_steps), 1)))


@flax.struct.dataclass
class OnlineProbeState:
    """The online probe's part of the train state: `LinearHead` params and their
    optimizer state."""

    params: Any
    opt_state: Any


def init(
    key: jax.Array, feature_dim: int, num_classes: int, optimizer: optax.GradientTransformation
) -> OnlineProbeState:
    """A fresh probe for features [N, feature_dim] and `num_classes` classes."""
    if not (isinstance(feature_dim, int) and feature_dim >= 1 and isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(
            f"feature_dim and num_classes must be positive ints, got {feature_dim!r} and {num_classes!r}."
        )
    params = init_head(num_classes, key, feature_dim)
    return OnlineProbeState(params=params, opt_state=optimizer.init(params))


def update(
    state: OnlineProbeState,
    features: jax.Array,
    labels: jax.Array,
    *,
    optimizer: optax.GradientTransformation,
    axis_name: str | None = None,
) -> tuple[OnlineProbeState, dict[str, jax.Array]]:
    """One optimizer step of the probe on features[N, D] (gradients stopped) and labels
    int[N]; pure and jit-able.

    Under `axis_name` (inside pmap) the gradients are averaged over devices, so that
    equal shards of a global batch give the update of the whole batch.

    Returns:
      (new state, {'online_probe_loss', 'online_probe_train_top1'}: the batch's mean
      cross-entropy and accuracy before the update, averaged over devices).
    """
    features = jax.lax.stop_gradient(jnp.asarray(features, jnp.float32))

    def loss_fn(params):
        logits = classify(params, features)
        return cross_entropy(logits, labels), logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics = {"online_probe_loss": loss, "online_probe_train_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}
    if axis_name is not None:
        grads, metrics = jax.lax.pmean((grads, metrics), axis_name)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return OnlineProbeState(optax.apply_updates(state.params, updates), opt_state), metrics


def evaluate(params: Any, features: jax.Array, labels: jax.Array) -> float:
    """Top-1 accuracy (a fraction) of the probe with `params` on features[N, D], labels int[N]."""
    return topk_accuracy(classify(params, features), labels, 1)
