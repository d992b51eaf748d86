"""Pretraining monitors: what the loop measures of the backbone while it learns.

- kNN monitor (`config.knn_monitor`, every `every_steps`): weighted kNN top-1 of the
  first `num_test` test images against the first `num_train` training images
  ('knn_top1'), and RankMe of the test features ('rankme'), the effective rank of the
  representation: a collapsed one shows as a rank near 1.
- Online probe (`config.online_probe`, every `every_steps`): top-1 of the online linear
  classifier (`rr_jax.online_probe`, trained inside the step) on the first `num_test`
  test images ('online_probe_top1').

Features are eval-mode features of unaugmented images (`rr_jax.features`), as the
linear probe and `rr_jax.evaluate_run` compute them; the test features are computed
once per step for all monitors due. Labels are used for monitoring only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import ml_collections
import numpy as np
from absl import logging

from rr_jax import datasets, online_probe
from rr_jax.evaluate import knn_accuracy, rankme
from rr_jax.evaluation_inputs import load_labelled_splits
from rr_jax.features import extract_features


class Monitors:
    """The monitors of a config; `due(step, last)` says whether any runs at `step`, and
    calling the object runs those due and returns their scalars.

    Args:
      config: the run's config (fields `knn_monitor`, `online_probe`, `data_dir`).
      spec: the pretraining dataset (its train and test splits are read once here).
      backbone: the backbone module without an axis name (eval mode).
    """

    def __init__(self, config: ml_collections.ConfigDict, spec: datasets.DatasetSpec, backbone: nn.Module):
        self._knn, self._probe = config.knn_monitor, config.online_probe
        self._spec, self._backbone = spec, backbone
        num_test = max(self._knn.num_test if self._knn.every_steps else 0,
                       self._probe.num_test if self._probe.every_steps else 0)
        self._splits = None
        if num_test:
            num_train = self._knn.num_train if self._knn.every_steps else 0
            self._splits = load_labelled_splits(spec, config.data_dir, num_train=num_train, num_test=num_test)
            logging.info(
                "Monitors on %s: kNN and RankMe every %s steps (%d test images against %d training "
                "images), online probe top-1 every %s steps (%d test images).",
                spec.tfds_name, self._knn.every_steps or "no", min(num_test, self._knn.num_test),
                num_train, self._probe.every_steps or "no", min(num_test, self._probe.num_test),
            )

    @staticmethod
    def _is_due(every: int, step: int, last: bool) -> bool:
        return bool(every) and (step % every == 0 or last)

    def due(self, step: int, last: bool = False) -> bool:
        """Whether any monitor runs at `step` (every monitor runs at the last step)."""
        return self._is_due(self._knn.every_steps, step, last) or self._is_due(self._probe.every_steps, step, last)

    def __call__(
        self, step: int, backbone_variables: Any, probe_state: online_probe.OnlineProbeState | None, last: bool = False
    ) -> dict[str, float]:
        """The scalars of the monitors due at `step` ({} when none is): 'knn_top1' and
        'rankme', 'online_probe_top1' (when the state holds a probe).

        Args:
          step: the pretraining step.
          backbone_variables: {'params', 'batch_stats'} of one replica.
          probe_state: the train state's online probe, or None.
          last: the run's last step.
        """
        knn = self._is_due(self._knn.every_steps, step, last)
        probe = self._is_due(self._probe.every_steps, step, last) and probe_state is not None
        if not (knn or probe):
            return {}
        splits, stats = self._splits, dict(mean=self._spec.mean, std=self._spec.std)
        num_test = max(self._knn.num_test if knn else 0, self._probe.num_test if probe else 0)
        test_features = extract_features(self._backbone, backbone_variables, splits.test_images[:num_test], **stats)
        scalars = {}
        if knn:
            test = test_features[: self._knn.num_test]
            bank = extract_features(self._backbone, backbone_variables, splits.train_images, **stats)
            scalars["knn_top1"] = knn_accuracy(
                bank, splits.train_labels, test, splits.test_labels[: len(test)], self._spec.num_classes,
                k=self._knn.k, temperature=self._knn.temperature,
            )["top1"]
            scalars["rankme"] = rankme(test)
        if probe:
            test = test_features[: self._probe.num_test]
            scalars["online_probe_top1"] = online_probe.evaluate(
                probe_state.params, test, splits.test_labels[: len(test)]
            )
        return scalars


def with_labelled_batches(
    batches: Iterator[dict[str, np.ndarray]], labelled: Iterator[dict[str, np.ndarray]]
) -> Iterator[dict[str, np.ndarray]]:
    """Pretraining batches with a batch of labelled images alongside, as 'probe_image' and
    'probe_label', for the online probe of a pretraining split without labels (STL-10's
    'unlabelled'): the probe trains on those instead of the batch's own images."""
    for batch, extra in zip(batches, labelled):
        yield {**batch, "probe_image": extra["image"], "probe_label": extra["label"]}
