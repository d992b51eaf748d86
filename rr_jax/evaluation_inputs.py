"""What an evaluation of a workdir's backbone reads: the restored backbone
(`restore_backbone`), the labelled train and test splits (`load_labelled_splits`) and
their features, in memory or streamed (`prepare_evaluation`, `split_features`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from rr_jax import datasets, inputs, sources
from rr_jax.backbones import BACKBONES, create_backbone
from rr_jax.checkpoint import Checkpointer, checkpoint_dir
from rr_jax.config import base_config
from rr_jax.errors import CheckpointContentError, CheckpointNotFoundError
from rr_jax.features import FEATURE_BATCH_SIZE, eval_features, feature_dim


@dataclasses.dataclass(frozen=True)
class RestoredBackbone:
    """A pretrained backbone read from a workdir.

    Attributes:
      backbone: the module (float32, no axis name).
      variables: {'params', 'batch_stats'} as NumPy arrays of one replica.
      config: the pretraining config as a dict.
      step: the checkpoint step it was read from.
    """

    backbone: nn.Module
    variables: Any
    config: dict
    step: int


def restore_backbone(workdir: str, step: int | None = None) -> RestoredBackbone:
    """The pretrained backbone of a workdir, from WORKDIR/checkpoints/<step>.

    Reads only the backbone item and the config (default step: the latest), whatever
    the device count of the run that wrote them.

    Raises:
      CheckpointNotFoundError: no checkpoint (or no checkpoint of `step`) in the workdir.
      CheckpointContentError: the checkpoint is corrupt or incomplete, or not a backbone's.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise CheckpointNotFoundError(
            f"No checkpoints in --workdir={workdir!r} (no directory {directory}); pretrain "
            "first (python launch.py --config=... --workdir=...)."
        )
    checkpointer = Checkpointer(workdir)
    steps = checkpointer.all_steps()
    try:
        variables, config = checkpointer.restore_backbone(step)
    except (ValueError, KeyError) as error:
        raise CheckpointContentError(
            f"The checkpoint of step {steps[-1] if step is None else step} in {directory} is "
            f"corrupt or incomplete ({error}); use another step (available: {steps})."
        ) from error
    finally:
        checkpointer.close()
    name = config.get("model", {}).get("backbone")
    if name not in BACKBONES or set(variables) != {"params", "batch_stats"}:
        raise CheckpointContentError(
            f"The checkpoint in {directory} is not a backbone checkpoint: config names "
            f"backbone {name!r} (known: {sorted(BACKBONES)}), variables hold {sorted(variables)} "
            "(expected ['batch_stats', 'params'])."
        )
    return RestoredBackbone(create_backbone(name), variables, config, steps[-1] if step is None else step)


@dataclasses.dataclass(frozen=True)
class LabelledSplits:
    """The labelled train and test splits of a dataset: uint8[N, H, W, C] images and
    int32[N] labels each, in TFDS order."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_labelled_splits(
    spec: datasets.DatasetSpec,
    data_dir: str | None = None,
    *,
    num_train: int | None = None,
    num_test: int | None = None,
) -> LabelledSplits:
    """`spec.train_split` and `spec.test_split`, cut to their first `num_train` and
    `num_test` examples (None: all)."""
    train_images, train_labels = sources.load_split(spec, spec.train_split, data_dir)
    test_images, test_labels = sources.load_split(spec, spec.test_split, data_dir)
    return LabelledSplits(
        train_images[:num_train], train_labels[:num_train], test_images[:num_test], test_labels[:num_test]
    )


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A workdir's backbone and the dataset it is evaluated on.

    Attributes:
      restored: the backbone, its variables and its pretraining config.
      spec: the dataset to evaluate on (its image folder and statistics from the
        pretraining config when it is the pretraining dataset).
      inputs: the config `rr_jax.inputs` reads the dataset with: the pretraining
        config's input settings (`data.*`, `image_folder`) and `data_dir`.
    """

    restored: RestoredBackbone
    spec: datasets.DatasetSpec
    inputs: ml_collections.ConfigDict


def prepare_evaluation(
    workdir: str,
    *,
    step: int | None = None,
    dataset: str | None = None,
    label_space: str | None = None,
    data_dir: str | None = None,
) -> Evaluation:
    """The restored backbone of `workdir` and the dataset to evaluate it on, checked to
    fit each other; reads no images (arguments as in `restore_with_data`)."""
    restored = restore_backbone(workdir, step)
    name = dataset or restored.config["dataset"]
    spec = inputs.dataset_spec(restored.config, name, label_space)
    feature_dim(restored.backbone, restored.variables, spec.image_shape, name)
    settings = base_config()
    settings.dataset, settings.image_folder = restored.config["dataset"], restored.config.get("image_folder")
    settings.data_dir = restored.config.get("data_dir") if data_dir is None else data_dir
    for key, value in (restored.config.get("data") or {}).items():
        settings.data[key] = tuple(value) if isinstance(value, list) else value
    return Evaluation(restored, spec, settings)


def split_features(
    evaluation: Evaluation, split: str, *, batch_size: int = FEATURE_BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """(float32[N, D] eval-mode features, int32[N] labels) of a whole split in order, in
    one pass that holds no more than a batch of images: streamed where the split is
    large (`rr_jax.inputs.streams`), else from the split loaded into memory."""
    restored, spec = evaluation.restored, evaluation.spec
    options = dict(backbone=restored.backbone, mean=tuple(spec.mean), std=tuple(spec.std))
    variables = jax.device_put(restored.variables)
    features, labels = [], []
    for batch in inputs.eval_batches(evaluation.inputs, spec, split, batch_size):
        mask = batch["mask"][0]
        features.append(np.asarray(eval_features(variables, batch["image"][0], **options))[mask])
        labels.append(batch["label"][0][mask])
    return np.concatenate(features), np.concatenate(labels)


def restore_with_data(
    workdir: str,
    *,
    step: int | None = None,
    dataset: str | None = None,
    label_space: str | None = None,
    data_dir: str | None = None,
) -> tuple[RestoredBackbone, datasets.DatasetSpec, LabelledSplits]:
    """What an evaluation of a workdir's backbone that needs the images starts from: the
    restored backbone, the spec of the dataset to evaluate on and its labelled splits
    in memory.

    Args:
      workdir, step: the run and its checkpoint step (None: the latest).
      dataset, label_space: the dataset to evaluate on (None: the pretraining one) and
        its label space (None: the default).
      data_dir: TFDS data directory; None: the pretraining config's.

    Raises:
      FileNotFoundError: no checkpoint (of `step`), or the dataset cannot be loaded.
      ValueError: a corrupt checkpoint, an unknown dataset or label space, or a dataset
        whose images the backbone cannot take.
    """
    evaluation = prepare_evaluation(workdir, step=step, dataset=dataset, label_space=label_space, data_dir=data_dir)
    splits = load_labelled_splits(evaluation.spec, evaluation.inputs.data_dir)
    return evaluation.restored, evaluation.spec, splits
