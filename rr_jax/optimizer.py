"""The pretraining optimizer and its learning-rate schedule, from the config and the
method's defaults (`Objective.optimizer`)."""

from __future__ import annotations

import jax
import ml_collections
import optax

from rr_jax.objectives import get_objective


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate per step; unset config fields take the method's defaults
    (`Objective.optimizer`: Adam 1e-3 constant for most, the paper; 'supervised':
    0.1, x0.1 at 50% and 75% of training ('multistep'); 'deepinfomax': 1e-4)."""
    opt, defaults = config.optimizer, get_objective(config.method).optimizer
    base = opt.learning_rate or defaults.learning_rate
    schedule = opt.schedule or defaults.schedule
    if schedule == "cosine":
        return optax.cosine_decay_schedule(base, max(total_steps, 1))
    if schedule == "multistep":
        return optax.piecewise_constant_schedule(
            base, {int(0.5 * total_steps): 0.1, int(0.75 * total_steps): 0.1}
        )
    return optax.constant_schedule(base)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """`config.optimizer.name` or the method's default: Adam (AdamW when weight_decay >
    0), SGD with momentum (and L2 weight decay), or LARS (You et al., 2017: SGD with
    momentum whose step of each weight matrix or kernel is scaled by 0.001 |w| / |g|;
    biases and BatchNorm parameters, the 1-D leaves, take plain steps without weight
    decay, as the BYOL and Barlow Twins recipes)."""
    opt = config.optimizer
    learning_rate = learning_rate_schedule(config, total_steps)
    name = opt.name or get_objective(config.method).optimizer.name
    if name == "lars":
        def matrices(params):
            return jax.tree.map(lambda x: x.ndim > 1, params)

        return optax.lars(learning_rate, weight_decay=opt.weight_decay, weight_decay_mask=matrices,
                          trust_ratio_mask=matrices, momentum=opt.momentum)
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(opt.weight_decay),
            optax.sgd(learning_rate, momentum=opt.momentum),
        )
    if opt.weight_decay > 0:
        return optax.adamw(learning_rate, weight_decay=opt.weight_decay)
    return optax.adam(learning_rate)
