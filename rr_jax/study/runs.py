"""The study's runs: what each one trains or evaluates, and its command lines.

Every run is a `Run` of `study_runs()`; `commands(run)` gives the command lines a user
would type (`python launch.py ...`, `python -m rr_jax.evaluate_run ...`,
`python -m rr_jax.linear_probe ...`), run from the repository root.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from rr_jax.config import load_config_file
from rr_jax.objectives import OBJECTIVES, get_objective

CONFIG = "configs/study_fashion_mnist.py"
RUNS_DIR = "runs/study"
RESULTS_DIR = "results"
FIGURES = ("tsne.png", "retrieval.png")
SEEDS = (0, 1, 2)
MAIN_VIEWS = 8  # K of the main table (configs/study_fashion_mnist.py)
ABLATION_VIEWS = 4  # K of the one-seed ablations, against relational_k4_s0
METHODS = tuple(OBJECTIVES)  # every registered method, in the paper's main-table order
# Accuracy vs available labels: probes on the main runs' backbones (100%: the main runs' own probe).
LABEL_METHODS = ("relational", "simclr", "supervised", "random")
LABEL_FRACTIONS = (0.01, 0.1, 0.25, 0.5)
FINETUNE_FRACTIONS = (0.01, 0.1)  # fine-tuning, seed 0: 100 epochs of the backbone cost minutes per 6 000 images
# Shallow vs deeper backbone, one seed, K=ABLATION_VIEWS: DEPTH_EPOCHS epochs with the kNN monitor every
# DEPTH_KNN_EVERY steps, a learning curve per run. resnet8 (not resnet20): its relational run alone takes
# about 40 minutes of a 2-core CPU at this budget, resnet20 about 2.5 times that.
DEPTH_METHODS = ("relational", "simclr")
DEPTH_BACKBONES = ("conv4", "resnet8")
DEPTH_EPOCHS = 5
DEPTH_KNN_EVERY = 500
RETRIEVAL_METHODS = ("relational", "rotationnet")  # the poster's side-by-side retrieval
SELF_SUPERVISED = tuple(m for m in METHODS if m not in ("supervised", "random"))


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of the study: a pretraining run and its evaluations, or an evaluation of
    another run's pretrained backbone.

    group: 'main' (the method comparison), 'views' (K), the ablated field ('head',
    'aggregation', 'loss', 'negatives'), 'depth' (backbones at a smaller budget),
    'labels' (a probe on a fraction of the labels) or 'embedding' (retrieval and t-SNE
    arrays); overrides: config fields given to launch.py on top of CONFIG; plots: also
    write the t-SNE and retrieval pictures; pretrained: the run whose workdir this one
    evaluates (None: it pretrains in its own); label_fraction, finetune: the probe of a
    'labels' run.
    """

    name: str
    group: str
    method: str
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()
    plots: bool = False
    pretrained: Run | None = None
    label_fraction: float | None = None
    finetune: bool = False

    @property
    def kind(self) -> str:
        """'pretrain' (launch.py, then evaluate_run), 'probe' (linear_probe on the
        pretrained run's workdir) or 'evaluate' (evaluate_run on it)."""
        if self.pretrained is None:
            return "pretrain"
        return "probe" if self.label_fraction is not None else "evaluate"

    @property
    def workdir_name(self) -> str:
        """The directory under the runs directory that this run reads or writes."""
        return self.name if self.pretrained is None else self.pretrained.name

    @property
    def num_views(self) -> int:
        """Augmented views per image in a step (0: a method that takes no step), as the
        method's objective reads them from CONFIG with the run's overrides."""
        config = study_config()
        config.update_from_flattened_dict(dict((self.pretrained or self).overrides))
        return get_objective((self.pretrained or self).method).views(config)


def study_config() -> ml_collections.ConfigDict:
    """A fresh copy of CONFIG's config (configs/ is not a package of rr_jax)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return load_config_file(os.path.join(root, CONFIG))


def study_runs() -> list[Run]:
    """The study, most important runs first: the main table seed by seed, then K, the
    one-seed ablations of the relation head's design at K=4, the retrieval and t-SNE
    arrays of every method (seed 0), the probes on fewer labels, and the backbones."""
    runs, main = [], {}
    for seed in SEEDS:
        for method in METHODS:
            relational = method == "relational"  # the method of the study, named with its K
            name = f"{method}_k{MAIN_VIEWS}_s{seed}" if relational else f"{method}_s{seed}"
            overrides = (("method", method), ("seed", seed))
            main[method, seed] = Run(name, "main", method, seed, overrides, plots=relational)
            runs.append(main[method, seed])
    for k in (2, 4, 16):
        runs.append(Run(f"relational_k{k}_s0", "views", "relational", 0, (("relational.num_views", k),)))
    ablations = (("head", "dot"), ("head", "encoder_dot"), ("aggregation", "sum"), ("aggregation", "mean"),
                 ("aggregation", "max"), ("loss", "bce"), ("negatives", "roll"))
    for field, value in ablations:
        overrides = (("relational.num_views", ABLATION_VIEWS), (f"relational.{field}", value))
        runs.append(Run(f"relational_k{ABLATION_VIEWS}_{field}_{value}_s0", field, "relational", 0, overrides))
    for method in METHODS:
        runs.append(Run(f"embedding_{method}_s0", "embedding", method, 0, plots=True, pretrained=main[method, 0]))
    for seed in SEEDS:
        for method in LABEL_METHODS:
            for fraction in LABEL_FRACTIONS:
                runs.append(Run(f"labels_{method}_f{100 * fraction:g}_s{seed}", "labels", method, seed,
                                pretrained=main[method, seed], label_fraction=fraction))
    for method in LABEL_METHODS:
        for fraction in FINETUNE_FRACTIONS:
            runs.append(Run(f"labels_{method}_f{100 * fraction:g}_finetune_s0", "labels", method, 0,
                            pretrained=main[method, 0], label_fraction=fraction, finetune=True))
    for method in DEPTH_METHODS:
        for backbone in DEPTH_BACKBONES:
            overrides = (("method", method), ("seed", 0), ("model.backbone", backbone), ("num_epochs", DEPTH_EPOCHS),
                         ("knn_monitor.every_steps", DEPTH_KNN_EVERY))
            if method == "relational":
                overrides += (("relational.num_views", ABLATION_VIEWS),)
            runs.append(Run(f"depth_{method}_{backbone}_e{DEPTH_EPOCHS}_s0", "depth", method, 0, overrides))
    return runs


def commands(run: Run, runs_dir: str = RUNS_DIR) -> list[list[str]]:
    """The run's command lines (with 'python' for the interpreter)."""
    workdir = os.path.join(runs_dir, run.workdir_name)
    evaluate = ["python", "-m", "rr_jax.evaluate_run", f"--workdir={workdir}"] + ([] if run.plots else ["--noplots"])
    if run.kind == "probe":
        probe = ["python", "-m", "rr_jax.linear_probe", f"--workdir={workdir}",
                 f"--label_fraction={run.label_fraction:g}", f"--seed={run.seed}"]
        return [probe + (["--finetune"] if run.finetune else [])]
    if run.kind == "evaluate":
        return [evaluate]
    launch = ["python", "launch.py", f"--config={CONFIG}", f"--workdir={workdir}"]
    launch += [f"--config.{key}={value}" for key, value in run.overrides]
    return [launch, evaluate]


# The name of a command's wall time in results/<name>.json.
