"""The reproduction study on Fashion-MNIST: every run, its results JSON, RESULTS.md.

    python -m rr_jax.study run [--only=NAME,...]     # from the repository root
    python -m rr_jax.study render

`run` executes each run of `study_runs()` exactly as a user would: `python launch.py`
(pretraining, then the linear probe) and `python -m rr_jax.evaluate_run` (kNN,
retrieval, t-SNE), in RUNS_DIR/<name>. A run whose results/<name>.json exists is
skipped, and an interrupted run resumes from its last checkpoint, so the command can be
stopped and re-run at any time. `render` writes RESULTS.md and its figures from
results/*.json alone.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
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

from absl import app, flags, logging

from rr_jax.objectives import OBJECTIVES, get_objective

CONFIG = "configs/study_fashion_mnist.py"
RUNS_DIR = "runs/study"
RESULTS_DIR = "results"
FIGURES = ("tsne.png", "retrieval.png")
SEEDS = (0, 1, 2)
MAIN_VIEWS = 8  # K of the main table (configs/study_fashion_mnist.py)
ABLATION_VIEWS = 4  # K of the one-seed ablations, against relational_k4_s0
METHODS = tuple(OBJECTIVES)  # every registered method, in the paper's main-table order


@dataclasses.dataclass(frozen=True)
class Run:
    """One pretraining run and its evaluations.

    group: 'main' (the method comparison), 'views' (K) or the ablated field
    ('head', 'aggregation', 'loss', 'negatives'); overrides: config fields given to
    launch.py on top of CONFIG; plots: also write the t-SNE and retrieval pictures.
    """

    name: str
    group: str
    method: str
    seed: int
    overrides: tuple[tuple[str, Any], ...] = ()
    plots: bool = False

    @property
    def num_views(self) -> int:
        """Augmented views per image in a step (0: a method that takes no step), as the
        method's objective reads them from CONFIG with the run's overrides."""
        config = _study_config()
        with config.unlocked():
            for key, value in self.overrides:
                target, *_, last = [config, *key.split(".")]
                for part in key.split(".")[:-1]:
                    target = target[part]
                target[last] = value
        return get_objective(self.method).views(config)


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
    """The study, most important runs first: the main table seed by seed, then K, then
    the one-seed ablations of the relation head's design at K=4."""
    runs = []
    for seed in SEEDS:
        for method in METHODS:
            relational = method == "relational"  # the method of the study, named with its K
            name = f"{method}_k{MAIN_VIEWS}_s{seed}" if relational else f"{method}_s{seed}"
            overrides = (("method", method), ("seed", seed))
            runs.append(Run(name, "main", method, seed, overrides, plots=relational))
    for k in (2, 4, 16):
        runs.append(Run(f"relational_k{k}_s0", "views", "relational", 0, (("relational.num_views", k),)))
    ablations = (("head", "dot"), ("head", "encoder_dot"), ("aggregation", "sum"), ("aggregation", "mean"),
                 ("aggregation", "max"), ("loss", "bce"), ("negatives", "roll"))
    for field, value in ablations:
        overrides = (("relational.num_views", ABLATION_VIEWS), (f"relational.{field}", value))
        runs.append(Run(f"relational_k{ABLATION_VIEWS}_{field}_{value}_s0", field, "relational", 0, overrides))
    return runs


def commands(run: Run, runs_dir: str = RUNS_DIR) -> list[list[str]]:
    """The run's command lines (with 'python' for the interpreter)."""
    workdir = os.path.join(runs_dir, run.name)
    launch = ["python", "launch.py", f"--config={CONFIG}", f"--workdir={workdir}"]
    launch += [f"--config.{key}={value}" for key, value in run.overrides]
    evaluate = ["python", "-m", "rr_jax.evaluate_run", f"--workdir={workdir}"]
    return [launch, evaluate + ([] if run.plots else ["--noplots"])]


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


def execute(run: Run, runs_dir: str, results_dir: str,
            call: Callable[[list[str]], None] = subprocess.run) -> dict[str, Any]:
    """Runs the commands of `run` (resuming its workdir) and writes results/<name>.json."""
    workdir = os.path.join(runs_dir, run.name)
    resumed = os.path.isdir(os.path.join(workdir, "checkpoints"))
    wall = []
    for command in commands(run, runs_dir):
        logging.info("%s: %s", run.name, shlex.join(command))
        start = time.perf_counter()
        call([sys.executable, *command[1:]], check=True)
        wall.append(time.perf_counter() - start)
    probe = _read_json(os.path.join(workdir, "probe_results.json"))
    evaluation = _read_json(os.path.join(workdir, "evaluation_results.json"))
    figures = {}
    for figure in FIGURES if run.plots else ():
        target = os.path.join(results_dir, "figures", f"{run.name}_{figure}")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(os.path.join(workdir, figure), target)
        figures[figure.split(".")[0]] = os.path.relpath(target, results_dir)
    results = {
        **dataclasses.asdict(run),
        "overrides": dict(run.overrides),
        "num_views": run.num_views,
        "commands": [shlex.join(c) for c in commands(run, runs_dir)],
        "wall_time_s": {"launch": wall[0], "evaluate": wall[1]},
        "resumed": resumed,
        "probe_top1": probe["top1"],
        "probe_top5": probe["top5"],
        "pretrain_steps": probe["step"],
        "knn_top1": evaluation["knn_top1"],
        "precision_at_10": evaluation["precision_at_10"],
        "figures": figures,
        **_metrics(workdir),
    }
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{run.name}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(path + ".tmp", path)  # a results file is complete or absent
    return results


def run_study(runs: Sequence[Run], runs_dir: str = RUNS_DIR, results_dir: str = RESULTS_DIR,
              call: Callable[[list[str]], None] = subprocess.run) -> None:
    """Executes the runs that have no results file yet, in order."""
    for index, run in enumerate(runs, 1):
        if os.path.exists(os.path.join(results_dir, f"{run.name}.json")):
            logging.info("[%d/%d] %s: done, skipped.", index, len(runs), run.name)
            continue
        logging.info("[%d/%d] %s: running.", index, len(runs), run.name)
        results = execute(run, runs_dir, results_dir, call)
        logging.info("[%d/%d] %s: probe top-1 %.2f%% in %.0f s.", index, len(runs), run.name,
                     100 * results["probe_top1"], sum(results["wall_time_s"].values()))


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


def ablation_table(results: dict[str, dict[str, Any]]) -> list[str]:
    """Each design choice changed alone at K=ABLATION_VIEWS, seed 0, against the default."""
    base = [r for r in _default_relational(results, ABLATION_VIEWS) if r["seed"] == 0]
    rows = []
    if base:
        base = base[0]
        scores = (f"{100 * base[k]:.2f}" for k in ("probe_top1", "knn_top1", "precision_at_10"))
        rows.append(["(default) relation head, cat, focal, derangement", *scores, "-", f"{_wall(base):.0f}"])
    for r in results.values():
        if r["group"] in ("head", "aggregation", "loss", "negatives"):
            value = r["overrides"][f"relational.{r['group']}"]
            delta = f"{100 * (r['probe_top1'] - base['probe_top1']):+.2f}" if base else "-"
            scores = (f"{100 * r[k]:.2f}" for k in ("probe_top1", "knn_top1", "precision_at_10"))
            rows.append([f"{r['group']} = {value}", *scores, delta, f"{_wall(r):.0f}"])
    header = ("variant", "probe top-1 %", "kNN top-1 %", "precision@10 %", "probe Δ vs default (points)", "wall s")
    return _table(header, rows)


def plot_accuracy_vs_views(path: str, by_k: dict[int, list[dict[str, Any]]]) -> None:
    """Linear-probe and kNN top-1 against K (mean, with the seeds' std as error bars)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5))
    axis = figure.subplots()
    ks = sorted(by_k)
    for key, label in (("probe_top1", "linear probe"), ("knn_top1", "kNN (k=20)")):
        values = [[100 * r[key] for r in by_k[k]] for k in ks]
        errors = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        axis.errorbar(ks, [statistics.mean(v) for v in values], yerr=errors, marker="o", capsize=3, label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(ks, [str(k) for k in ks])
    axis.set_xlabel("views per image K (equal epochs)")
    axis.set_ylabel("test top-1 accuracy (%)")
    axis.set_title("Fashion-MNIST, conv4, relational")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def runs_table(results: dict[str, dict[str, Any]]) -> list[str]:
    rows = [[f"`{name}`", f"{100 * r['probe_top1']:.2f}", f"{100 * r['knn_top1']:.2f}", f"{100 * r['precision_at_10']:.2f}",
             r["pretrain_steps"], f"{r['wall_time_s']['launch']:.0f}", f"{r['wall_time_s']['evaluate']:.0f}",
             f"{r['images_per_second']:.0f}" if "images_per_second" in r else "-",
             "<br>".join(f"`{c}`" for c in r["commands"])]
            for name, r in results.items()]
    header = ("run", "probe top-1 %", "kNN top-1 %", "P@10 %", "steps", "launch s", "evaluate s", "images/s", "commands")
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
    """Writes `output` (and results_dir/figures/accuracy_vs_k.png) from the results;
    results_dir/notes.md goes first, any other results_dir/*.md before the list of runs."""
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
    lines += ["## Main table", "", *main_table(results), ""]
    if by_k:
        plot_accuracy_vs_views(os.path.join(figures, "accuracy_vs_k.png"), by_k)
        lines += ["## Number of views K (equal epochs)", "", *views, "",
                  f"![accuracy vs K]({link}/figures/accuracy_vs_k.png)", ""]
    lines += [f"## Ablations of the relation head (K={ABLATION_VIEWS}, seed 0)", "", *ablation_table(results), ""]
    plotted = [r for r in results.values() if r["figures"]]
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
        run_study([r for r in runs if not f.only or r.name in f.only], f.runs_dir, f.results_dir)
    render(f.results_dir, f.output)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
