"""Linear evaluation of a pretrained backbone: restore -> features -> linear classifier.

    python -m rr_jax.linear_probe --workdir=/tmp/rr_cifar10
    python -m rr_jax.linear_probe --workdir=/tmp/rr_cifar10 --dataset=cifar100      # transfer
    python -m rr_jax.linear_probe --workdir=/tmp/rr_cifar100 --label_space=coarse   # 20 classes
    python -m rr_jax.linear_probe --workdir=/tmp/rr_cifar10 --label_fraction=0.01   # few labels
    python -m rr_jax.linear_probe --workdir=/tmp/rr_cifar10 --finetune

The paper's protocol (its official code, train_linear_evaluation.py): the backbone is
frozen in eval mode (BatchNorm running statistics), one linear layer on its features is
trained with Adam (lr 1e-3), batches of 128 (the last batch of an epoch is smaller,
nothing is dropped), shuffled every epoch, for 100 epochs, without augmentation; the
test accuracy is measured at the end. Images are normalised with the dataset's
statistics as in pretraining, (x / 255 - mean) / std.

Made fast: a frozen backbone in eval mode maps an unaugmented image to the same
features every epoch, so they are computed once for the train and the test split (in
batches, jit-compiled, spread over the local devices), and the classifier trains on
the cached features, each epoch one jit-compiled `lax.scan` on device. The result is
the same as running the backbone every epoch, 100 times cheaper in backbone passes.

Protocols: domain transfer (probe on another dataset whose images the backbone
takes), coarse labels (CIFAR-100's 20 superclasses), few labels (a class-balanced
fraction of the training labels, drawn with the seed), and fine-tuning
(`finetune_backbone`: backbone and classifier trained together, BatchNorm in train
mode; Adam with L2 weight decay 1e-5, lr 1e-3 for the backbone and 1e-4 for the
classifier, as the official code's `finetune`; plus random crops with zero padding H/8,
4 pixels on 32x32 images, and horizontal flips, which the official script leaves out).

Outputs: the classifier (and, after fine-tuning, the backbone) as an Orbax checkpoint
in WORKDIR/<name>, and the results in WORKDIR/<name>_results.json, where <name> is
"probe" for the default protocol and e.g. "probe_cifar100_coarse_frac0.1" otherwise.
Runs on any number of local devices; checkpoints of a run on many devices restore on
one. (Every process of a multi-process run would repeat the whole probe; only process 0
writes the results file. Multi-process runs are untested.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from rr_jax.run_dir import quiet_native_logs, reader_logs

quiet_native_logs()  # before rr_jax.sources imports TensorFlow
from rr_jax import datasets  # noqa: E402
from rr_jax.augment import normalize_images, random_crop_flip  # noqa: E402
from rr_jax.checkpoint import save_probe  # noqa: E402
from rr_jax.errors import ConfigError, exit_cleanly_on_known_errors, writing  # noqa: E402
from rr_jax.evaluate import topk_accuracy  # noqa: E402
from rr_jax.evaluation_inputs import load_labelled_splits, prepare_evaluation, split_features  # noqa: E402
from rr_jax.features import extract_features, feature_dim  # noqa: E402
from rr_jax.numerics import cross_entropy  # noqa: E402
from rr_jax.online_probe import LinearHead, classify, init_head  # noqa: E402

BATCH_SIZE = 128
LEARNING_RATE = 1e-3
FINETUNE_BACKBONE_LR = 1e-3
FINETUNE_HEAD_LR = 1e-4
FINETUNE_WEIGHT_DECAY = 1e-5


# ---------------------------------------------------------------------- few labels


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(
            f"label_fraction must be in (0, 1], e.g. 0.01, 0.1, 0.25, 0.5 or 1.0; got {fraction!r}."
        )


# ------------------------------------------------------------------------ training


@flax.struct.dataclass
class _Carry:
    params: Any
    batch_stats: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class _LinearLoss:
    """Cross-entropy of a `LinearHead` on features. Losses are frozen dataclasses, so
    that equal ones hash equal and `_train_epoch` compiles once per shape."""

    head: LinearHead

    def __call__(self, params, batch_stats, inputs, labels, key):
        logits = self.head.apply({"params": params}, inputs)
        return cross_entropy(logits, labels), (logits, batch_stats)


@dataclasses.dataclass(frozen=True)
class _FinetuneLoss:
    """Cross-entropy of backbone (train mode) + head on augmented, normalised images."""

    backbone: nn.Module
    head: LinearHead
    mean: tuple[float, ...]
    std: tuple[float, ...]
    padding: int

    def __call__(self, params, batch_stats, inputs, labels, key):
        keys = jax.random.split(key, inputs.shape[0])
        views = jax.vmap(random_crop_flip, in_axes=(0, 0, None))(keys, inputs, self.padding)
        features, updates = self.backbone.apply(
            {"params": params["backbone"], "batch_stats": batch_stats},
            normalize_images(views, mean=self.mean, std=self.std), train=True, mutable=["batch_stats"],
        )
        logits = self.head.apply({"params": params["head"]}, features)
        return cross_entropy(logits, labels), (logits, updates["batch_stats"])


@functools.partial(jax.jit, static_argnames=("loss_fn", "optimizer", "batch_size"))
def _train_epoch(carry, key, inputs, labels, *, loss_fn, optimizer, batch_size):
    """One shuffled epoch: the full batches as one `lax.scan`, then the remainder (if
    any) as a smaller last batch. Returns (carry, [mean loss, accuracy])."""
    num_examples = labels.shape[0]
    full, rest = divmod(num_examples, batch_size)

    def step(carry, indices, step_key):
        x, y = inputs[indices], labels[indices]
        objective = lambda params: loss_fn(params, carry.batch_stats, x, y, step_key)  # noqa: E731
        (loss, (logits, batch_stats)), grads = jax.value_and_grad(objective, has_aux=True)(
            carry.params
        )
        updates, opt_state = optimizer.update(grads, carry.opt_state, carry.params)
        carry = _Carry(optax.apply_updates(carry.params, updates), batch_stats, opt_state)
        return carry, jnp.stack([loss * y.shape[0], jnp.sum(jnp.argmax(logits, -1) == y)])

    perm_key, steps_key = jax.random.split(key)
    perm = jax.random.permutation(perm_key, num_examples)
    keys = jax.random.split(steps_key, full + 1)
    batches = perm[: full * batch_size].reshape(full, batch_size)
    carry, sums = jax.lax.scan(lambda c, xs: step(c, *xs), carry, (batches, keys[:full]))
    totals = jnp.sum(sums, axis=0)
    if rest:
        carry, last = step(carry, perm[full * batch_size :], keys[full])
        totals = totals + last
    return carry, totals / num_examples


def _fit(
    key: jax.Array,
    params: Any,
    batch_stats: Any,
    inputs: jax.Array,
    labels: jax.Array,
    *,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    epochs: int,
    batch_size: int,
) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """Trains `params` on (inputs, labels) for `epochs` shuffled epochs on device;
    epoch e uses the key fold_in(key, e).

    `loss_fn(params, batch_stats, inputs, labels, key) -> (mean loss, (logits,
    batch_stats))` and `optimizer` must be hashable (static jit arguments).
    Returns (params, batch_stats, {'loss', 'accuracy'}: float[epochs] training means).
    """
    options = dict(loss_fn=loss_fn, optimizer=optimizer, batch_size=batch_size)
    carry = _Carry(params, batch_stats, jax.jit(optimizer.init)(params))
    history = []
    for e in range(epochs):
        carry, means = _train_epoch(carry, jax.random.fold_in(key, e), inputs, labels, **options)
        history.append(means)
        if (e + 1) % 10 == 0 or e + 1 == epochs:
            loss, accuracy = np.asarray(means)
            logging.info(
                "Probe epoch %d/%d: train loss %.4f, accuracy %.4f", e + 1, epochs, loss, accuracy
            )
    history = np.asarray(jax.device_get(history)).reshape(epochs, 2)
    return carry.params, carry.batch_stats, {"loss": history[:, 0], "accuracy": history[:, 1]}


def _check_training_set(
    x: np.ndarray, labels: np.ndarray, num_classes: int, epochs: int, batch_size: int
) -> None:
    if np.ndim(labels) != 1 or np.shape(labels) != np.shape(x)[:1] or len(labels) == 0:
        raise ValueError(
            f"Need one label per example (at least one), got inputs {np.shape(x)} and labels "
            f"{np.shape(labels)}."
        )
    if not 0 <= np.min(labels) <= np.max(labels) < num_classes:
        raise ValueError(
            f"labels must be in [0, num_classes={num_classes}), got the range "
            f"[{np.min(labels)}, {np.max(labels)}]."
        )
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not (isinstance(value, (int, np.integer)) and value >= 1):
            raise ValueError(f"{name} must be a positive int, got {name}={value!r}.")


_adam = functools.cache(optax.adam)  # one object per learning rate: a stable jit key


def train_linear_classifier(
    key: jax.Array,
    features: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    epochs: int = 100,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Trains a `LinearHead` on fixed features with Adam and cross-entropy.

    Args:
      key: PRNG key (initialisation and the shuffling of every epoch).
      features: float[N, D]; labels: int[N] in [0, num_classes).
      epochs, batch_size, learning_rate: the protocol's 100, 128 and 1e-3 by default.

    Returns:
      (head params, {'loss', 'accuracy'}: float[epochs] means over each epoch's batches,
      measured before each batch's update).
    """
    if np.ndim(features) != 2:
        raise ValueError(
            f"features must be float[N, D] (rank 2), got shape {np.shape(features)}."
        )
    _check_training_set(features, labels, num_classes, epochs, batch_size)
    head = LinearHead(num_classes)
    init_key, fit_key = jax.random.split(key)
    features = jnp.asarray(features, jnp.float32)
    params = init_head(num_classes, init_key, features.shape[1])
    params, _, history = _fit(
        fit_key, params, {}, features, jnp.asarray(labels, jnp.int32), loss_fn=_LinearLoss(head),
        optimizer=_adam(learning_rate), epochs=epochs, batch_size=batch_size,
    )
    return params, history


# --------------------------------------------------------------------- fine-tuning


@functools.cache
def finetune_optimizer(
    backbone_lr: float = FINETUNE_BACKBONE_LR,
    head_lr: float = FINETUNE_HEAD_LR,
    weight_decay: float = FINETUNE_WEIGHT_DECAY,
) -> optax.GradientTransformation:
    """Adam on params {'backbone': ..., 'head': ...} with a learning rate per part and
    L2 weight decay added to the gradient (PyTorch's Adam(weight_decay=...))."""

    def adam(learning_rate):
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

    def parts(params):
        return {name: jax.tree.map(lambda _: name, tree) for name, tree in params.items()}

    return optax.multi_transform({"backbone": adam(backbone_lr), "head": adam(head_lr)}, parts)


def finetune_backbone(
    key: jax.Array,
    backbone: nn.Module,
    variables: Any,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    epochs: int = 100,
    batch_size: int = BATCH_SIZE,
    padding: int = 4,
    optimizer: optax.GradientTransformation | None = None,
) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """Trains backbone and a new `LinearHead` together on augmented images.

    Every batch is augmented on device (`random_crop_flip` with `padding`), normalised,
    and passed through the backbone in train mode (BatchNorm batch statistics, running
    statistics updated). Runs on the default device.

    Args:
      key: PRNG key (head initialisation, shuffling, augmentation).
      backbone, variables: the pretrained module and its {'params', 'batch_stats'}.
      images: uint8[N, H, W, C]; labels: int[N] in [0, num_classes).
      mean, std: normalisation statistics of pixels in [0, 1].
      epochs, batch_size: 100 and 128 by default.
      padding: zero padding of the random crops (4 for 32x32 images).
      optimizer: default `finetune_optimizer()`.

    Returns:
      (backbone variables, head params, {'loss', 'accuracy'}: float[epochs]).
    """
    _check_training_set(images, labels, num_classes, epochs, batch_size)
    head = LinearHead(num_classes)
    init_key, fit_key = jax.random.split(key)
    dim = feature_dim(backbone, variables, np.shape(images)[1:])
    params = {"backbone": variables["params"], "head": init_head(num_classes, init_key, dim)}

    params, batch_stats, history = _fit(
        fit_key,
        jax.tree.map(jnp.asarray, params),
        jax.tree.map(jnp.asarray, variables["batch_stats"]),
        jnp.asarray(images),
        jnp.asarray(labels, jnp.int32),
        loss_fn=_FinetuneLoss(backbone, head, tuple(mean), tuple(std), padding),
        optimizer=optimizer or finetune_optimizer(), epochs=epochs, batch_size=batch_size,
    )
    return {"params": params["backbone"], "batch_stats": batch_stats}, params["head"], history


# -------------------------------------------------------------------------- runs


def probe_name(
    *,
    dataset: str | None = None,
    label_space: str | None = None,
    label_fraction: float = 1.0,
    step: int | None = None,
    finetune: bool = False,
) -> str:
    """'probe', or 'probe_' + the options that differ from the default protocol
    (None: the default; e.g. 'probe_cifar100_coarse_frac0.1_step500_finetune')."""
    parts = [dataset, label_space]
    parts += [f"frac{label_fraction:g}" if label_fraction != 1.0 else None]
    parts += [f"step{step}" if step is not None else None, "finetune" if finetune else None]
    return "_".join(["probe", *(p for p in parts if p)])


def run_probe(
    workdir: str,
    *,
    dataset: str | None = None,
    label_space: str | None = None,
    label_fraction: float = 1.0,
    step: int | None = None,
    epochs: int = 100,
    finetune: bool = False,
    data_dir: str | None = None,
    seed: int = 0,
    batch_size: int = BATCH_SIZE,
) -> dict[str, Any]:
    """Evaluates the pretrained backbone of `workdir` with a linear probe (or fine-tuning).

    Args:
      workdir: a pretraining run's directory (WORKDIR/checkpoints).
      dataset: a key of `rr_jax.datasets.DATASETS` to probe on (domain transfer); None:
        the pretraining dataset.
      label_space: e.g. 'coarse' for CIFAR-100's 20 superclasses; None: the default.
      label_fraction: fraction of the training labels, in (0, 1]; the subset is
        class-balanced and drawn with `seed`.
      step: the checkpoint step; None: the latest.
      epochs: training epochs (the protocol: 100).
      finetune: train the backbone too (see `finetune_backbone`) instead of a linear probe.
      data_dir: TFDS data directory; None: the pretraining config's.
      seed: seed of the label subset, the initialisation and the shuffling.
      batch_size: training batch size (the protocol: 128).

    Returns:
      The results written to WORKDIR/<name>_results.json (see `probe_name`): top1 and
      top5 test accuracy (fractions), the protocol, the checkpoint step, example
      counts, how the test split is made ('test_split': its name, or for an image
      folder without one, e.g. "held out 10% of train (class-balanced, seed 0)") and
      the wall time in seconds.

    Raises:
      FileNotFoundError: no checkpoint (of `step`), or the dataset cannot be loaded.
      ValueError: a corrupt checkpoint, an unknown dataset or label space, a
        label_fraction outside (0, 1], or a dataset whose images the backbone cannot take.
    """
    start_time = time.perf_counter()
    _check_fraction(label_fraction)
    evaluation = prepare_evaluation(workdir, step=step, dataset=dataset, label_space=label_space, data_dir=data_dir)
    restored, spec = evaluation.restored, evaluation.spec
    backbone, variables, config, used_step = restored.backbone, restored.variables, restored.config, restored.step
    pretrain_dataset = config["dataset"]
    space = label_space or next(iter(datasets.DATASETS[dataset or pretrain_dataset]))
    if finetune:  # trains on augmented images: the splits in memory
        splits = load_labelled_splits(spec, evaluation.inputs.data_dir)
        train_inputs, train_labels = splits.train_images, splits.train_labels
        test_images, test_labels = splits.test_images, splits.test_labels
    else:  # features cached in one pass over each split, streamed where it is large
        train_inputs, train_labels = split_features(evaluation, spec.train_split)
        test_features, test_labels = split_features(evaluation, spec.test_split)
    if label_fraction < 1.0:
        subset = datasets.label_subset(train_labels, label_fraction, seed)
        train_inputs, train_labels = train_inputs[subset], train_labels[subset]
    logging.info(
        "Probing %s (step %d of %s) on %s/%s: %d train, %d test examples (test split: %s), %d classes%s.",
        config["model"]["backbone"], used_step, workdir, spec.tfds_name, space,
        len(train_labels), len(test_labels), spec.describe_split(spec.test_split), spec.num_classes,
        ", fine-tuning" if finetune else "",
    )

    key = jax.random.key(seed)
    stats = dict(mean=spec.mean, std=spec.std)
    if finetune:
        variables, head, history = finetune_backbone(
            key, backbone, variables, train_inputs, train_labels, spec.num_classes, **stats,
            epochs=epochs, batch_size=batch_size, padding=spec.image_shape[0] // 8,
        )
        test_features = extract_features(backbone, variables, test_images, **stats)
    else:
        head, history = train_linear_classifier(
            key, train_inputs, train_labels, spec.num_classes,
            epochs=epochs, batch_size=batch_size,
        )
    logits = classify(head, test_features)

    name = probe_name(
        dataset=dataset if dataset not in (None, pretrain_dataset) else None,
        label_space=label_space, label_fraction=label_fraction, step=step, finetune=finetune,
    )
    results = {
        "name": name,
        "dataset": dataset or pretrain_dataset,
        "label_space": space,
        "num_classes": spec.num_classes,
        "label_fraction": label_fraction,
        "finetune": finetune,
        "pretrain_dataset": pretrain_dataset,
        "backbone": config["model"]["backbone"],
        "step": used_step,
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "num_train": len(train_labels),
        "num_test": len(test_labels),
        "test_split": spec.describe_split(spec.test_split),
        "train_loss": float(history["loss"][-1]),
        "train_accuracy": float(history["accuracy"][-1]),
        "top1": topk_accuracy(logits, test_labels, 1),
        "top5": topk_accuracy(logits, test_labels, 5),
        "wall_time_s": time.perf_counter() - start_time,
    }
    probe = {"head": head, **({"backbone": variables} if finetune else {})}
    with writing(f"the results of probe {name!r}", workdir):
        save_probe(os.path.join(workdir, name), probe)  # Orbax writes from the primary process
        if jax.process_index() == 0:
            with open(os.path.join(workdir, f"{name}_results.json"), "w") as f:
                json.dump(results, f, indent=2)
    logging.info("%s: top-1 %.2f%%, top-5 %.2f%% on %d test examples.",
                 name, 100 * results["top1"], 100 * results["top5"], len(test_labels))
    return results


# ---------------------------------------------------------------------------- CLI


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Pretraining run directory (holds checkpoints/).",
                        required=True)
    flags.DEFINE_string("dataset", None, f"Dataset to probe on, one of {sorted(datasets.DATASETS)}; "
                        "default: the pretraining one.")
    flags.DEFINE_string("label_space", None, "Label space, e.g. 'coarse' for cifar100; default: "
                        "the dataset's first.")
    flags.DEFINE_float("label_fraction", 1.0, "Fraction of training labels, in (0, 1].")
    flags.DEFINE_integer("step", None, "Checkpoint step to probe; default: the latest.")
    flags.DEFINE_integer("epochs", 100, "Training epochs.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory; default: the pretraining config's.")
    flags.DEFINE_bool("finetune", False, "Fine-tune the backbone with the classifier.")
    flags.DEFINE_integer("seed", 0, "Seed of the label subset, initialisation and shuffling.")


@exit_cleanly_on_known_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    with reader_logs(f.workdir):
        results = run_probe(
            f.workdir, dataset=f.dataset, label_space=f.label_space, label_fraction=f.label_fraction,
            step=f.step, epochs=f.epochs, finetune=f.finetune, data_dir=f.data_dir, seed=f.seed,
        )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
