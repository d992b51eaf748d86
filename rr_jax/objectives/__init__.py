"""Pretraining objectives as plug-ins: one module per method and a registry by name.

An objective says everything that differs between methods: how many views of each image
a step uses and how they are augmented, the parameters it adds on top of the backbone
(its "head") and how they are created, its loss on one device's batch, its optimizer
defaults, its config fields and their validation, and any state it carries between
steps (a momentum teacher, for one: `teacher` applies it before the loss and
`update_state` moves it after the optimizer update, inside the pure step).
`rr_jax.train` (the step, the state, the loop), `rr_jax.config` and `rr_jax.study` read
the registry and name no method.

Adding a method is one new module with a subclass of `Objective` and one line in
`OBJECTIVES` below (see README, "Adding an objective").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

from rr_jax.augment import AugmentConfig, augment_views
from rr_jax.datasets import DatasetSpec
from rr_jax.errors import ConfigError

Variables = Any
"""Flax variables {'params': ..., 'batch_stats': ...}."""


def config_error(key: str, value: Any, allowed: str) -> ConfigError:
    """The error of a bad config field (a ValueError): names the key, the value and what is allowed."""
    return ConfigError(f"config.{key}={value!r} is not allowed: {allowed}.")


def check_config_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raises `config_error` when `value`, of `config.<key>`, is not one of `allowed`."""
    if value not in allowed:
        raise config_error(key, value, "use one of " + ", ".join(map(repr, allowed)))


@dataclasses.dataclass(frozen=True)
class OptimizerDefaults:
    """What unset `config.optimizer` fields mean for a method."""

    name: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "constant"


@dataclasses.dataclass(frozen=True)
class Objective:
    """A pretraining method. Instances are frozen and hashable: a static argument of the
    jitted step, holding the method's static options.

    Class attributes:
      name: the registry name (`--config.method=NAME`).
      optimizer: defaults for unset `config.optimizer` fields.
      trains: False for a method that takes no step (random weights).
      has_epoch_hook: `start_epoch` must run at every epoch boundary.
      needs_labels: the loss reads the dataset's class labels (refused on a split without).
      min_images_per_device: the fewest images of a device's batch the loss is defined
        on (2: another image gives the negatives or the batch statistics).
      settings: the fields a config sets, as `config.<name>.<key>`; their defaults are
        the fields' own, written once. `setting_keys`: field -> config key where they differ.
      head_fields: the config fields that shape the head's weights: a converted
        checkpoint's head (rr_jax.convert) is imported by a method that names them, when
        they agree.

    Fields:
      num_views: K, augmented views of each image per step.
      augment: the view pipeline (AugmentConfig for `augment_views`).
    """

    name: ClassVar[str] = ""
    optimizer: ClassVar[OptimizerDefaults] = OptimizerDefaults()
    trains: ClassVar[bool] = True
    has_epoch_hook: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    min_images_per_device: ClassVar[int] = 2
    settings: ClassVar[tuple[str, ...]] = ()
    setting_keys: ClassVar[dict[str, str]] = {}
    head_fields: ClassVar[tuple[str, ...]] = ()

    num_views: int = 1
    augment: Any = AugmentConfig()

    # ------------------------------------------------------------------ config

    @classmethod
    def config_defaults(cls) -> ml_collections.ConfigDict | None:
        """The method's own config fields, `config.<name>` (None: it has none): the
        defaults of its `settings`."""
        if not cls.settings:
            return None
        defaults = _field_defaults(cls)
        return ml_collections.ConfigDict({cls.setting_keys.get(field, field): defaults[field]
                                          for field in cls.settings})

    @classmethod
    def setting_values(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """{field: value} of the method's `settings` in a config."""
        return {field: config[cls.name][cls.setting_keys.get(field, field)] for field in cls.settings}

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """Raises `config_error` on a bad value of the method's own fields."""

    @classmethod
    def views(cls, config: ml_collections.ConfigDict) -> int:
        """K of a config: augmented views of each image per step (0: no step)."""
        if "num_views" in cls.settings:
            return cls.setting_values(config)["num_views"]
        return _field_defaults(cls)["num_views"]

    @classmethod
    def augment_config(cls, config: ml_collections.ConfigDict, spec: DatasetSpec) -> Any:
        """The view pipeline: `config.augment` normalised with the dataset's statistics."""
        return AugmentConfig(**config.augment.to_dict(), mean=spec.mean, std=spec.std)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, spec: DatasetSpec) -> Objective:
        """The objective of a validated config on the dataset of `spec`."""
        return cls(**{**cls.setting_values(config), "num_views": cls.views(config)},
                   augment=cls.augment_config(config, spec))

    def for_run(self, total_steps: int) -> Objective:
        """The objective of a run of `total_steps` optimizer steps, for schedules over the
        run (a teacher's momentum); most objectives have none and return themselves."""
        return self

    # ------------------------------------------------------------------ the step

    @property
    def shared_loss_key(self) -> bool:
        """The loss's PRNG key is the same on every device (else folded with the index)."""
        return False

    def capture(self) -> Callable[[Any, str], bool] | None:
        """A `capture_intermediates` filter for the backbone's apply (None: no capture)."""
        return None

    def inputs(self, key: jax.Array, batch: dict[str, jax.Array], objective_state: Any) -> tuple[jax.Array, jax.Array]:
        """(views float[K, B, H, W, C], targets) of batch {'image': uint8[B, H, W, C], 'label': int[B]}."""
        return augment_views(key, batch["image"], self.num_views, self.augment), batch["label"]

    def init_head(self, key: jax.Array, features: jax.ShapeDtypeStruct, intermediates: Any,
                  num_classes: int) -> Variables:
        """The head's variables {'params', 'batch_stats'} for backbone features [N, D]
        (and the captured intermediates' shapes)."""
        raise NotImplementedError

    def init_state(self, num_examples: int, variables: Variables) -> Any:
        """State carried between steps (a pytree; saved with the train state).

        variables: the initial {'params': {'backbone', 'head'}, 'batch_stats': {'backbone',
        'head'}} of the train state (a momentum teacher starts as their copy).
        """
        return {}

    def teacher(self, views: jax.Array, targets: Any, objective_state: Any, *,
                apply_backbone: Callable[[Variables, jax.Array], tuple[jax.Array, Any]],
                axis_name: str | None) -> tuple[Any, Any]:
        """The step's work before the loss that no gradient flows through, e.g. a momentum
        teacher's outputs on the views: (the loss's targets, aux for `update_state`).

        views: float[K, B, H, W, C] and targets as `inputs` returns them;
        apply_backbone(variables, views) -> (features float[K, B, D], new batch_stats):
        the backbone in training mode (batch statistics, across devices under
        `axis_name`) with any variables {'params', 'batch_stats'}.
        """
        return targets, None

    def update_state(self, objective_state: Any, aux: Any, params: Any, step: jax.Array) -> Any:
        """The objective state after the optimizer update of step `step` (0 for the first
        step of a run): `params` are the updated parameters {'backbone', 'head'}, `aux`
        what `teacher` returned. Pure (it runs inside the pmapped step)."""
        return objective_state

    def loss(self, features: jax.Array, head_variables: Variables, key: jax.Array, targets: jax.Array, *,
             intermediates: Any, objective_state: Any, axis_name: str | None
             ) -> tuple[jax.Array, dict[str, jax.Array], Any]:
        """(loss, metrics, the head's new batch_stats) of one device's batch.

        features: float[K, B, D], the backbone on the K views of B images; targets: as
        `teacher` returns them (by default as `inputs` does); intermediates: what
        `capture` captured. Under `axis_name` the loss's gradient, averaged over devices,
        must be the whole batch's gradient.
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ the loop

    def start_epoch(self, epoch: int, state: Any, features: Callable[[Any], np.ndarray]) -> Any:
        """Host-side work at the start of `epoch` (with `has_epoch_hook`): a new train
        state. `features(state)` gives the backbone's eval-mode features float[N, D] of
        the whole pretraining split."""
        return state

    def describe(self) -> str:
        """One line for the run log."""
        return f"{self.name}, K={self.num_views} views"


def _field_defaults(cls: type[Objective]) -> dict[str, Any]:
    return {field.name: field.default for field in dataclasses.fields(cls)}


from rr_jax.objectives.barlow_twins import BarlowTwins  # noqa: E402
from rr_jax.objectives.byol import BYOL  # noqa: E402
from rr_jax.objectives.deepcluster import DeepCluster  # noqa: E402
from rr_jax.objectives.deepinfomax import DeepInfoMax  # noqa: E402
from rr_jax.objectives.dino import DINO  # noqa: E402
from rr_jax.objectives.mocov3 import MoCoV3  # noqa: E402
from rr_jax.objectives.random_weights import RandomWeights  # noqa: E402
from rr_jax.objectives.relational import Relational  # noqa: E402
from rr_jax.objectives.rotationnet import RotationNet  # noqa: E402
from rr_jax.objectives.simclr import SimCLR  # noqa: E402
from rr_jax.objectives.simsiam import SimSiam  # noqa: E402
from rr_jax.objectives.supervised import Supervised  # noqa: E402
from rr_jax.objectives.vicreg import VICReg  # noqa: E402

OBJECTIVES: dict[str, type[Objective]] = {
    objective.name: objective
    # The paper's main table, in its order, then the methods compared against today.
    for objective in (Supervised, RandomWeights, DeepCluster, RotationNet, DeepInfoMax, SimCLR, Relational,
                      BYOL, MoCoV3, DINO, BarlowTwins, VICReg, SimSiam)
}
"""Method name -> objective class."""


def get_objective(name: str) -> type[Objective]:
    """The objective class registered as `name`; ValueError naming the registered ones."""
    check_config_choice("method", name, OBJECTIVES)
    return OBJECTIVES[name]
