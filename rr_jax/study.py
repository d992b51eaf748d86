"""The reproduction study on Fashion-MNIST: every run, its results JSON, RESULTS.md.

    python -m rr_jax.study run [--only=NAME,...] [--groups=GROUP,...]   # from the repository root
    python -m rr_jax.study render

`run` executes each run of `study_runs()` exactly as a user would: `python launch.py`
(pretraining, then the linear probe) and `python -m rr_jax.evaluate_run` (kNN,
retrieval, t-SNE), in RUNS_DIR/<name>; the 'labels' and 'embedding' runs evaluate the
workdir of a main run instead (`python -m rr_jax.linear_probe --label_fraction=...`,
`python -m rr_jax.evaluate_run`), pretraining it first when it is missing. A run whose
results/<name>.json exists is skipped, and an interrupted run resumes from its last
checkpoint, so the command can be stopped and re-run at any time. `render` writes
RESULTS.md and its figures (rr_jax/study_figures.py) from results/*.json and the arrays
under results/arrays/ alone.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import itertools
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from rr_jax.evaluate_run import ARRAYS
from rr_jax.linear_probe import probe_name
from rr_jax.objectives import OBJECTIVES, get_objective
from rr_jax.study_figures import (
    plot_accuracy_vs_labels,
    plot_accuracy_vs_views,
    plot_depth,
    plot_retrieval_side_by_side,
    plot_tsne_panels,
)

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
        config = _study_config()
        with config.unlocked():
            for key, value in (self.pretrained or self).overrides:
                target, *_, last = [config, *key.split(".")]
                for part in key.split(".")[:-1]:
                    target = target[part]
                target[last] = value
        return get_objective((self.pretrained or self).method).views(config)


@functools.cache
def _config_module():
    """The module of CONFIG (configs/ is not a package of rr_jax)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("study_config", os.path.join(root, CONFIG))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, root)  # CONFIG imports configs.fashion_mnist
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(root)
    return module


def _study_config():
    return _config_module().get_config()


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
_STEPS = {"launch.py": "launch", "rr_jax.evaluate_run": "evaluate", "rr_jax.linear_probe": "probe"}


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _metrics(workdir: str) -> dict[str, Any]:
    """The last training record, the median throughput and the kNN monitor's curve."""
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if "loss" in r]
    knn = [(r["step"], r["knn_top1"]) for r in records if "knn_top1" in r]
    if not train:  # method 'random' takes no step
        return {"knn_curve": knn}
    return {
        "final_loss": train[-1]["loss"],
        "final_accuracy": train[-1].get("accuracy"),  # None: the method reports no accuracy
        "images_per_second": statistics.median(r["images_per_second"] for r in train[1:] or train),
        "knn_curve": knn,
    }


def _call(command: list[str], call: Callable[..., Any]) -> float:
    """Runs one command line with this interpreter; returns its wall time in seconds."""
    logging.info("%s", shlex.join(command))
    start = time.perf_counter()
    call([sys.executable, *command[1:]], check=True)
    return time.perf_counter() - start


def _copy(source: str, results_dir: str, folder: str, name: str) -> str:
    """Copies `source` to results_dir/folder/name; returns that path relative to results_dir."""
    target = os.path.join(results_dir, folder, name)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(source, target)
    return os.path.relpath(target, results_dir)


def _pretrain_results(run: Run, workdir: str, results_dir: str) -> dict[str, Any]:
    probe = _read_json(os.path.join(workdir, "probe_results.json"))
    evaluation = _read_json(os.path.join(workdir, "evaluation_results.json"))
    figures = {figure.split(".")[0]: _copy(os.path.join(workdir, figure), results_dir, "figures", f"{run.name}_{figure}")
               for figure in (FIGURES if run.plots else ())}
    return {
        "probe_top1": probe["top1"],
        "probe_top5": probe["top5"],
        "pretrain_steps": probe["step"],
        "knn_top1": evaluation["knn_top1"],
        "precision_at_10": evaluation["precision_at_10"],
        "figures": figures,
        **_metrics(workdir),
    }


def _probe_results(run: Run, workdir: str, results_dir: str) -> dict[str, Any]:
    name = probe_name(label_fraction=run.label_fraction, finetune=run.finetune)
    probe = _read_json(os.path.join(workdir, f"{name}_results.json"))
    return {"probe_top1": probe["top1"], "probe_top5": probe["top5"], "pretrain_steps": probe["step"],
            "num_train": probe["num_train"]}


def _evaluate_results(run: Run, workdir: str, results_dir: str) -> dict[str, Any]:
    evaluation = _read_json(os.path.join(workdir, "evaluation_results.json"))
    arrays = {name: _copy(os.path.join(workdir, f"{name}.npz"), results_dir, "arrays", f"{run.name}_{name}.npz")
              for name in ARRAYS}
    return {"knn_top1": evaluation["knn_top1"], "precision_at_10": evaluation["precision_at_10"],
            "pretrain_steps": evaluation["step"], "arrays": arrays}


_RESULTS = {"pretrain": _pretrain_results, "probe": _probe_results, "evaluate": _evaluate_results}


def execute(run: Run, runs_dir: str, results_dir: str,
            call: Callable[..., Any] = subprocess.run) -> dict[str, Any]:
    """Runs the commands of `run` (resuming its workdir) and writes results/<name>.json."""
    workdir = os.path.join(runs_dir, run.workdir_name)
    resumed = run.kind == "pretrain" and os.path.isdir(os.path.join(workdir, "checkpoints"))
    wall = {}
    for command in commands(run, runs_dir):
        wall[next(step for key, step in _STEPS.items() if key in command)] = _call(command, call)
    results = {
        **{field.name: getattr(run, field.name) for field in dataclasses.fields(run)},
        "kind": run.kind,
        "pretrained": run.pretrained and run.pretrained.name,
        "overrides": dict(run.overrides),
        "num_views": run.num_views,
        "commands": [shlex.join(c) for c in commands(run, runs_dir)],
        "wall_time_s": wall,
        "resumed": resumed,
        **_RESULTS[run.kind](run, workdir, results_dir),
    }
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{run.name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)  # a results file is complete or absent
    return results


def ensure_pretrained(run: Run, runs_dir: str, results_dir: str,
                      call: Callable[..., Any] = subprocess.run) -> None:
    """Makes sure the workdir that `run` evaluates holds a finished pretraining run
    (launch.py wrote its probe_results.json): a pretraining run whose results are missing
    is executed in full first; one whose results exist but whose workdir is gone (results
    are kept, workdirs are not) is re-launched into its workdir, its results file kept."""
    dependency = run.pretrained
    if dependency is None or os.path.exists(os.path.join(runs_dir, dependency.name, "probe_results.json")):
        return
    if not os.path.exists(os.path.join(results_dir, f"{dependency.name}.json")):
        logging.info("%s needs the pretraining run %s: running it first.", run.name, dependency.name)
        execute(dependency, runs_dir, results_dir, call)
    else:
        logging.info("%s needs the workdir of %s, which is missing: re-running its pretraining "
                     "(results/%s.json is kept).", run.name, dependency.name, dependency.name)
        _call(commands(dependency, runs_dir)[0], call)


def run_study(runs: Sequence[Run], runs_dir: str = RUNS_DIR, results_dir: str = RESULTS_DIR,
              call: Callable[..., Any] = subprocess.run) -> None:
    """Executes the runs that have no results file yet, in order (pretraining first
    the runs whose workdirs the others need)."""
    for index, run in enumerate(runs, 1):
        if os.path.exists(os.path.join(results_dir, f"{run.name}.json")):
            logging.info("[%d/%d] %s: done, skipped.", index, len(runs), run.name)
            continue
        logging.info("[%d/%d] %s: running.", index, len(runs), run.name)
        ensure_pretrained(run, runs_dir, results_dir, call)
        results = execute(run, runs_dir, results_dir, call)
        score = ", ".join(f"{key} {100 * results[key]:.2f}%" for key in ("probe_top1", "knn_top1") if key in results)
        logging.info("[%d/%d] %s: %s in %.0f s.", index, len(runs), run.name, score, sum(results["wall_time_s"].values()))


# ------------------------------------------------------------------------ report


def load_results(results_dir: str = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """results/<name>.json of every finished run, by name."""
    names = sorted(f[:-5] for f in os.listdir(results_dir) if f.endswith(".json"))
    return {name: _read_json(os.path.join(results_dir, f"{name}.json")) for name in names}


def mean_std(values: Sequence[float], scale: float = 100.0) -> str:
    """'mean ± sample std' of values * scale ('mean' alone for one value)."""
    values = [scale * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _wall(result: dict[str, Any]) -> float:
    return sum(result["wall_time_s"].values())


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *map(_row, rows)]


def main_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """The method comparison: mean ± std over the seeds of each method."""
    rows = []
    for method in METHODS:
        runs = [r for r in results.values() if r["group"] == "main" and r["method"] == method]
        if runs:
            rows.append([
                method + (f" (K={runs[0]['num_views']})" if method == "relational" else ""), len(runs),
                *(mean_std([r[key] for r in runs]) for key in ("probe_top1", "probe_top5", "knn_top1", "precision_at_10")),
                f"{statistics.mean(_wall(r) for r in runs):.0f}",
            ])
    header = ("method", "seeds", "linear probe top-1 %", "top-5 %", "kNN top-1 %", "precision@10 %", "wall s / run")
    return _table(header, rows)


# The paper's conv4 CIFAR-10 ranking of the self-supervised methods: relational reasoning,
# then SimCLR, then DeepCluster, RotationNet and Deep InfoMax (in some order).
PAPER_RANKING = (("relational",), ("simclr",), ("deepcluster", "rotationnet", "deepinfomax"))


def _main_means(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The mean probe top-1 over the seeds of each method of the main table, in METHODS order."""
    means = {}
    for method in METHODS:
        runs = [r["probe_top1"] for r in results.values() if r["group"] == "main" and r["method"] == method]
        if runs:
            means[method] = statistics.mean(runs)
    return means


def ranking_sentence(results: dict[str, dict[str, Any]]) -> str:
    """Our order of the methods by mean probe top-1, and where it agrees with the paper's."""
    means = _main_means(results)
    order = sorted(means, key=means.get, reverse=True)
    ours = " > ".join(f"{m} {100 * means[m]:.2f}" for m in order)
    tiers = [[m for m in tier if m in means] for tier in PAPER_RANKING]
    tiers = [tier for tier in tiers if tier]
    swaps = [(hi, lo) for upper, lower in itertools.combinations(tiers, 2) for hi in upper for lo in lower
             if means[hi] < means[lo]]
    verdict = ("agrees with the paper's (relational > SimCLR > DeepCluster / RotationNet / Deep InfoMax)"
               if not swaps else "disagrees with the paper's where "
               + ", ".join(f"{lo} ({100 * means[lo]:.2f}) beats {hi} ({100 * means[hi]:.2f})" for hi, lo in swaps))
    return f"Our order by mean linear-probe top-1: {ours}. The order of the self-supervised methods {verdict}."


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def standing_sentence(results: dict[str, dict[str, Any]]) -> str:
    """Where relational reasoning stands among every method of the main table by mean probe
    top-1, and the methods ahead of it with their gaps; '' until it and another are done."""
    means = _main_means(results)
    if "relational" not in means or len(means) < 2:
        return ""
    order = sorted(means, key=means.get, reverse=True)
    rank = order.index("relational") + 1
    rivals = [m for m in order if m in SELF_SUPERVISED]
    ahead = ", ".join(f"{m} ({100 * (means[m] - means['relational']):+.2f} points)" for m in order[:rank - 1])
    return (f"Among all {len(order)} methods at this budget, relational reasoning ranks {_ordinal(rank)} by mean"
            f" linear-probe top-1 ({_ordinal(rivals.index('relational') + 1)} of the {len(rivals)} self-supervised"
            f" methods); " + (f"ahead of it: {ahead}." if ahead else "no method is ahead of it."))


def _default_relational(results: dict[str, dict[str, Any]], num_views: int) -> list[dict[str, Any]]:
    """Relational runs with every design choice at its default, with K views."""
    return [r for r in results.values() if r["method"] == "relational" and r["group"] in ("main", "views")
            and r["num_views"] == num_views]


def views_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[int, list[dict[str, Any]]]]:
    """Accuracy against K at equal epochs (seed 0; K=8 also over its seeds)."""
    by_k = {k: _default_relational(results, k) for k in sorted({r["num_views"] for r in results.values()
                                                                if r["method"] == "relational"})}
    by_k = {k: runs for k, runs in by_k.items() if runs}
    rows = []
    for k, runs in by_k.items():
        seed0 = [r for r in runs if r["seed"] == 0] or runs
        scores = (mean_std([r[key] for r in seed0]) for key in ("probe_top1", "knn_top1", "precision_at_10"))
        rows.append([k, k * (k - 1) * 64, *scores,
                     mean_std([r["probe_top1"] for r in runs]) + f" (n={len(runs)})",
                     f"{statistics.mean(_wall(r) for r in seed0):.0f}"])
    header = ("K", "pairs / step", "probe top-1 % (seed 0)", "kNN top-1 %", "precision@10 %",
              "probe top-1 % (all seeds)", "wall s")
    return _table(header, rows), by_k


# The paper's labels of the head ablation: (a) relation head, (b) encoder + dot product, (c) dot product.
HEAD_ROWS = {"encoder_dot": "(b) encoder + dot product", "dot": "(c) dot product"}


def ablation_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Each design choice changed alone at K=ABLATION_VIEWS, seed 0, against the default;
    the head rows first, labelled as in the paper (listed as not run until they are)."""
    base = next((r for r in _default_relational(results, ABLATION_VIEWS) if r["seed"] == 0), None)
    rows = {label: [label, "not run yet", "-", "-", "-", "-"] for label in HEAD_ROWS.values()}
    for r in results.values():
        if r["group"] in ("head", "aggregation", "loss", "negatives"):
            value = r["overrides"][f"relational.{r['group']}"]
            label = HEAD_ROWS.get(value, f"head = {value}") if r["group"] == "head" else f"{r['group']} = {value}"
            delta = f"{100 * (r['probe_top1'] - base['probe_top1']):+.2f}" if base else "-"
            scores = (f"{100 * r[k]:.2f}" for k in ("probe_top1", "knn_top1", "precision_at_10"))
            rows[label] = [label, *scores, delta, f"{_wall(r):.0f}"]
    ordered = [rows[label] for label in sorted(rows, key=lambda label: (label not in HEAD_ROWS.values(), label))]
    if base:
        scores = (f"{100 * base[k]:.2f}" for k in ("probe_top1", "knn_top1", "precision_at_10"))
        ordered.insert(0, ["(a) relation head (default: cat, focal, derangement)", *scores, "-", f"{_wall(base):.0f}"])
    header = ("variant", "probe top-1 %", "kNN top-1 %", "precision@10 %", "probe Δ vs default (points)", "wall s")
    return _table(header, ordered)


def head_sentence(results: dict[str, dict[str, Any]]) -> str:
    """One sentence: the relation head (a) against the dot-product heads (b) and (c) by
    probe top-1, against the paper's ablation, which puts (a) first; '' until (a) and
    one of the others are done."""
    base = next((r for r in _default_relational(results, ABLATION_VIEWS) if r["seed"] == 0), None)
    others = {HEAD_ROWS[r["overrides"]["relational.head"]]: r["probe_top1"] for r in results.values()
              if r["group"] == "head" and r["overrides"]["relational.head"] in HEAD_ROWS}
    if base is None or not others:
        return ""
    beaten = [label for label, top1 in sorted(others.items()) if base["probe_top1"] > top1]
    gaps = ", ".join(f"{label[:3]} by {100 * (base['probe_top1'] - top1):+.2f} points" for label, top1 in sorted(others.items()))
    return (f"The relation head (a) is ahead of {len(beaten)} of the {len(others)} dot-product heads ({gaps}); the"
            f" paper's ablation puts the relation head first, so our trend {_agreement(len(beaten), len(others))}.")


def _agreement(holds: int, total: int) -> str:
    """'agrees' when the poster's claim holds in all `total` comparisons, 'disagrees'
    when in none, 'agrees in part' otherwise."""
    return "agrees" if holds == total else "disagrees" if holds == 0 else "agrees in part"


def labels_curves(results: dict[str, dict[str, Any]]) -> dict[str, dict[float, list[float]]]:
    """Probe top-1 (fractions) of each method's seeds by label fraction: '<method>' for
    the linear probe (1.0: the main runs' own probe), '<method> fine-tuned'."""
    curves = {}
    for method in LABEL_METHODS:
        for finetune in (False, True):
            points: dict[float, list[float]] = {}
            for r in results.values():
                if r["group"] == "labels" and r["method"] == method and r["finetune"] == finetune:
                    points.setdefault(r["label_fraction"], []).append(r["probe_top1"])
            full = [r["probe_top1"] for r in results.values() if r["group"] == "main" and r["method"] == method]
            if points and full and not finetune:
                points[1.0] = full
            if points:
                curves[method + (" fine-tuned" if finetune else "")] = dict(sorted(points.items()))
    return curves


def labels_table(curves: dict[str, dict[float, list[float]]]) -> tuple[list[str], str]:
    """The accuracy-vs-labels table (mean ± std over seeds, their number n) and one
    sentence comparing its trend with the poster's."""
    fractions = sorted({f for points in curves.values() for f in points})
    rows = [[label, *(f"{mean_std(points[f])} (n={len(points[f])})" if f in points else "-" for f in fractions)]
            for label, points in curves.items()]
    table = _table(["method", *(f"{100 * f:g}% labels" for f in fractions)], rows)
    ours, theirs = curves.get("relational", {}), curves.get("simclr", {})
    shared = [f for f in fractions if f in ours and f in theirs]
    above = [f for f in shared if statistics.mean(ours[f]) > statistics.mean(theirs[f])]
    sentence = (f"Relational's linear probe is above SimCLR's at {len(above)} of {len(shared)} label fractions"
                f" ({', '.join(f'{100 * f:g}%' for f in above) or 'none'}); the poster shows relational above"
                f" SimCLR at every fraction, so our trend {_agreement(len(above), len(shared))}.")
    tuned = {label: points for label, points in curves.items() if label.endswith(" fine-tuned")}
    for fraction in sorted({f for points in tuned.values() for f in points}):
        scores = {label.split()[0]: statistics.mean(p[fraction]) for label, p in tuned.items() if fraction in p}
        spread = ", ".join(f"{m} {100 * v:.2f}" for m, v in sorted(scores.items(), key=lambda item: -item[1]))
        sentence += (f" Fine-tuned on {100 * fraction:g}% of the labels, the methods span"
                     f" {100 * (max(scores.values()) - min(scores.values())):.2f} points ({spread}).")
    return table, sentence


def depth_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[str, dict[str, list[float]]], str]:
    """The backbone comparison at the 'depth' runs' budget: the table, the probe top-1 of
    each method and backbone (for `plot_depth`) and one sentence against the poster."""
    runs = [r for r in results.values() if r["group"] == "depth"]
    bars: dict[str, dict[str, list[float]]] = {}
    rows = []
    for method in DEPTH_METHODS:
        for backbone in DEPTH_BACKBONES:
            chosen = [r for r in runs if r["method"] == method and r["overrides"]["model.backbone"] == backbone]
            if chosen:
                bars.setdefault(method, {})[backbone] = [r["probe_top1"] for r in chosen]
                rows.append([method + (f" (K={chosen[0]['num_views']})" if method == "relational" else ""), backbone,
                             chosen[0]["pretrain_steps"], len(chosen),
                             *(mean_std([r[k] for r in chosen]) for k in ("probe_top1", "knn_top1", "precision_at_10")),
                             f"{statistics.mean(_wall(r) for r in chosen):.0f}"])
    header = ("method", "backbone", "steps", "seeds", "probe top-1 %", "kNN top-1 %", "precision@10 %", "wall s / run")
    shallow, deep = DEPTH_BACKBONES
    gains = {m: 100 * (statistics.mean(b[deep]) - statistics.mean(b[shallow]))
             for m, b in bars.items() if shallow in b and deep in b}
    sentence = ""
    if gains:
        text = " and ".join(f"{m} by {gain:+.2f} points" for m, gain in gains.items())
        sentence = (f"With {deep} instead of {shallow} at the same budget the linear probe changes {text}; the poster"
                    f" (ResNet-32 vs Conv4, CIFAR-10) shows every method gaining from depth, so our trend"
                    f" {_agreement(sum(g > 0 for g in gains.values()), len(gains))}.")
    return _table(header, rows), bars, sentence


def _load_arrays(results_dir: str, run: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(results_dir, run["arrays"][name])) as arrays:
        return dict(arrays)


def _embedding_runs(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The 'embedding' run of each method (seed 0), in METHODS order."""
    runs = {r["method"]: r for r in results.values() if r["group"] == "embedding"}
    return {m: runs[m] for m in METHODS if m in runs}


def retrieval_section(results: dict[str, dict[str, Any]], results_dir: str, link: str) -> list[str]:
    """RETRIEVAL_METHODS' retrieval grids side by side with their precision@10, and a
    sentence against the poster; [] until both runs are done."""
    runs = _embedding_runs(results)
    if not all(m in runs for m in RETRIEVAL_METHODS):
        return []
    plot_retrieval_side_by_side(
        os.path.join(results_dir, "figures", "retrieval_side_by_side.png"),
        {f"{m}: precision@10 {100 * runs[m]['precision_at_10']:.2f}%": _load_arrays(results_dir, runs[m], "retrieval")
         for m in RETRIEVAL_METHODS})
    ours, theirs = (runs[m]["precision_at_10"] for m in RETRIEVAL_METHODS)
    return [f"## Retrieval: {' vs '.join(RETRIEVAL_METHODS)} (seed 0)", "",
            "The same test queries and their top-10 training neighbours (green: same class) for each method; "
            "precision@10 over every test image.", "",
            f"![retrieval side by side]({link}/figures/retrieval_side_by_side.png)", "",
            f"Relational's precision@10 ({100 * ours:.2f}%) is {'above' if ours > theirs else 'not above'} RotationNet's"
            f" ({100 * theirs:.2f}%); the poster shows relational retrieving more same-class neighbours, so our result"
            f" {_agreement(int(ours > theirs), 1)}.", ""]


def tsne_section(results: dict[str, dict[str, Any]], results_dir: str, link: str) -> list[str]:
    """One t-SNE panel per method on the same test points, and a sentence against the
    poster; [] until an 'embedding' run is done."""
    runs = _embedding_runs(results)
    if not runs:
        return []
    embeddings = {f"{m} (kNN {100 * r['knn_top1']:.1f}%)": _load_arrays(results_dir, r, "tsne") for m, r in runs.items()}
    plot_tsne_panels(os.path.join(results_dir, "figures", "tsne_methods.png"), embeddings)
    points = len(next(iter(embeddings.values()))["points"])
    lines = [f"## t-SNE of every method (seed 0, the same {points} test points)", "",
             f"![t-SNE of every method]({link}/figures/tsne_methods.png)", ""]
    rivals = [m for m in SELF_SUPERVISED if m in runs]
    if "relational" in rivals and len(rivals) > 1:
        best = max(rivals, key=lambda m: runs[m]["knn_top1"])
        lines += [f"Judged by the kNN top-1 of the same features (panel titles), {best} separates the classes best of"
                  f" the {len(rivals)} self-supervised methods; the poster shows relational with the clearest clusters,"
                  f" so our trend {_agreement(int(best == 'relational'), 1)}.", ""]
    return lines


def runs_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Every run: its scores (those it has), steps, wall times and command lines."""
    def percent(r: dict[str, Any], key: str) -> str:
        return f"{100 * r[key]:.2f}" if key in r else "-"

    rows = [[f"`{name}`", percent(r, "probe_top1"), percent(r, "knn_top1"), percent(r, "precision_at_10"),
             r["pretrain_steps"], *(f"{r['wall_time_s'][step]:.0f}" if step in r["wall_time_s"] else "-"
                                    for step in ("launch", "probe", "evaluate")),
             f"{r['images_per_second']:.0f}" if "images_per_second" in r else "-",
             "<br>".join(f"`{c}`" for c in r["commands"])]
            for name, r in results.items()]
    header = ("run", "probe top-1 %", "kNN top-1 %", "P@10 %", "steps", "launch s", "probe s", "evaluate s", "images/s",
              "commands")
    return _table(header, rows)


def headline(results: dict[str, dict[str, Any]]) -> str:
    """One sentence: the main table's linear-probe accuracies, best first."""
    parts = []
    for method in METHODS:
        runs = [r["probe_top1"] for r in results.values() if r["group"] == "main" and r["method"] == method]
        if runs:
            parts.append((statistics.mean(runs), f"{method} {mean_std(runs)}%"))
    ordered = ", ".join(text for _, text in sorted(parts, reverse=True))
    return f"Linear-probe top-1 on the Fashion-MNIST test set (conv4, 1 epoch, mean ± std over seeds): {ordered}."


def render(results_dir: str = RESULTS_DIR, output: str = "RESULTS.md") -> None:
    """Writes `output` and its figures (results_dir/figures/*.png) from the results and
    the arrays they name; results_dir/notes.md goes first, any other results_dir/*.md
    before the list of runs. A section appears once its runs are done."""
    results = load_results(results_dir)
    if not results:
        raise FileNotFoundError(f"No results in {results_dir}/; run `python -m rr_jax.study run` first.")
    figures = os.path.join(results_dir, "figures")
    os.makedirs(figures, exist_ok=True)
    views, by_k = views_table(results)
    link = os.path.relpath(results_dir, os.path.dirname(os.path.abspath(output)) or ".")
    lines = [
        "# Results: relational reasoning on Fashion-MNIST",
        "",
        "Rendered by `python -m rr_jax.study render` from `results/*.json`, which "
        "`python -m rr_jax.study run` writes (interruptible; finished runs are skipped). "
        "Every run is the `launch.py` and `rr_jax.evaluate_run` commands listed at the end.",
        "",
        f"**Headline.** {headline(results)}",
        "",
    ]
    notes = os.path.join(results_dir, "notes.md")
    if os.path.exists(notes):
        lines += [open(notes).read().strip(), ""]
    lines += ["## Main table", "", *main_table(results), "", ranking_sentence(results), "",
              standing_sentence(results), ""]
    if by_k:
        plot_accuracy_vs_views(os.path.join(figures, "accuracy_vs_k.png"),
                               {k: {key: [r[key] for r in runs] for key in ("probe_top1", "knn_top1")}
                                for k, runs in by_k.items()})
        lines += ["## Number of views K (equal epochs)", "", *views, "",
                  f"![accuracy vs K]({link}/figures/accuracy_vs_k.png)", ""]
    lines += [f"## Ablations of the relation head (K={ABLATION_VIEWS}, seed 0)", "", *ablation_table(results), "",
              head_sentence(results), ""]
    curves = labels_curves(results)
    if curves:
        table, sentence = labels_table(curves)
        plot_accuracy_vs_labels(os.path.join(figures, "accuracy_vs_labels.png"), curves)
        lines += ["## Accuracy vs available labels", "",
                  "Linear probe (and fine-tuning, seed 0) on a class-balanced fraction of the training labels, drawn "
                  "with the seed, on the main runs' backbones (pretraining seed = label seed); 100%: the main runs' "
                  "own probe. Mean ± std over seeds (n).", "", *table, "",
                  f"![accuracy vs labels]({link}/figures/accuracy_vs_labels.png)", "", sentence, ""]
    table, bars, sentence = depth_table(results)
    if bars:
        plot_depth(os.path.join(figures, "depth.png"), bars)
        lines += [f"## Shallow vs deeper backbone ({DEPTH_EPOCHS} epochs of M=64, K={ABLATION_VIEWS} for relational)", "",
                  f"Every backbone gets the same budget, {DEPTH_EPOCHS} epochs of 64 images a step (seed 0); "
                  f"{DEPTH_BACKBONES[1]} is the smallest CIFAR ResNet "
                  "(3 residual blocks; the paper's ResNet-32 has 15 and costs about five times as much per image).",
                  "", *table, "",
                  f"![depth]({link}/figures/depth.png)", "", sentence, ""]
    lines += retrieval_section(results, results_dir, link)
    lines += tsne_section(results, results_dir, link)
    plotted = [r for r in results.values() if r.get("figures")]
    if plotted:
        best = max(plotted, key=lambda r: r["probe_top1"])
        lines += [f"## Best relational run: `{best['name']}`", "",
                  f"t-SNE of 2 000 test features: ![t-SNE]({link}/{best['figures']['tsne']})", "",
                  "Retrieval (test queries, top-10 training neighbours; green = same class): "
                  f"![retrieval]({link}/{best['figures']['retrieval']})", ""]
    for section in sorted(glob.glob(os.path.join(results_dir, "*.md"))):  # measured outside the runner
        if os.path.basename(section) != "notes.md":
            lines += [open(section).read().strip(), ""]
    lines += ["## Every run", "", *runs_table(results), ""]
    with open(output, "w") as f:
        f.write("\n".join(lines))
    logging.info("Wrote %s from %d runs.", output, len(results))


def _define_flags() -> None:
    flags.DEFINE_string("runs_dir", RUNS_DIR, "Where the runs' workdirs live.")
    flags.DEFINE_string("results_dir", RESULTS_DIR, "Where results/<run>.json and figures go.")
    flags.DEFINE_list("only", None, "Run only these run names (default: the whole study).")
    flags.DEFINE_list("groups", None, "Run only the runs of these groups, e.g. labels,depth,embedding,head.")
    flags.DEFINE_string("output", "RESULTS.md", "The rendered report (render).")


def main(argv: list[str]) -> None:
    if len(argv) != 2 or argv[1] not in ("run", "render"):
        raise app.UsageError("Usage: python -m rr_jax.study run|render [--flags]")
    f = flags.FLAGS
    if argv[1] == "run":
        runs = study_runs()
        unknown = set(f.only or ()) - {run.name for run in runs}
        if unknown:
            raise app.UsageError(f"Unknown run names {sorted(unknown)}; known: {[r.name for r in runs]}")
        groups = {run.group for run in runs}
        if set(f.groups or ()) - groups:
            raise app.UsageError(f"Unknown groups {sorted(set(f.groups) - groups)}; known: {sorted(groups)}")
        chosen = [r for r in runs if (not f.only or r.name in f.only) and (not f.groups or r.group in f.groups)]
        run_study(chosen, f.runs_dir, f.results_dir)
    render(f.results_dir, f.output)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
