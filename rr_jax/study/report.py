"""RESULTS.md from results/*.json alone: the tables, the sentences that compare our
trends with the paper's, and the figures (rr_jax.study.figures)."""

from __future__ import annotations

import glob
import itertools
import json
import os
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

from rr_jax.study.figures import (
    plot_accuracy_vs_labels,
    plot_accuracy_vs_views,
    plot_depth,
    plot_retrieval_side_by_side,
    plot_tsne_panels,
)
from rr_jax.study.runs import (
    ABLATION_VIEWS,
    DEPTH_BACKBONES,
    DEPTH_EPOCHS,
    DEPTH_KNN_EVERY,
    DEPTH_METHODS,
    LABEL_METHODS,
    METHODS,
    RESULTS_DIR,
    RETRIEVAL_METHODS,
    SELF_SUPERVISED,
    study_config,
)


def load_results(results_dir: str = RESULTS_DIR) -> dict[str, dict[str, Any]]:
    """results/<name>.json of every finished run, by name."""
    results = {}
    for name in sorted(f[:-5] for f in os.listdir(results_dir) if f.endswith(".json")):
        with open(os.path.join(results_dir, f"{name}.json")) as f:
            results[name] = json.load(f)
    return results


def main_runs(results: dict[str, dict[str, Any]], method: str) -> list[dict[str, Any]]:
    """The main table's runs of `method` (one per seed)."""
    return [r for r in results.values() if r["group"] == "main" and r["method"] == method]


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
        runs = main_runs(results, method)
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
        runs = [r["probe_top1"] for r in main_runs(results, method)]
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
            full = [r["probe_top1"] for r in main_runs(results, method)]
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


def depth_table(results: dict[str, dict[str, Any]]) -> tuple[list[str], dict[tuple[str, str], dict[str, Any]], str]:
    """The backbone comparison at the 'depth' runs' budget: the table, the seed-0 run of
    each (method, backbone) (for `plot_depth`) and one sentence against the poster."""
    runs = {(r["method"], r["overrides"]["model.backbone"]): r for r in results.values()
            if r["group"] == "depth" and r["seed"] == 0}
    chosen = {(m, b): runs[m, b] for m in DEPTH_METHODS for b in DEPTH_BACKBONES if (m, b) in runs}
    rows = [[m + (f" (K={r['num_views']})" if m == "relational" else ""), b, r["pretrain_steps"],
             *(f"{100 * r[k]:.2f}" for k in ("probe_top1", "knn_top1", "precision_at_10")),
             f"{r['images_per_second']:.0f}", f"{r['wall_time_s']['launch'] / 60:.0f}"]
            for (m, b), r in chosen.items()]
    header = ("method", "backbone", "steps", "probe top-1 %", "kNN top-1 %", "precision@10 %", "images/s",
              "launch wall min")
    shallow, deep = DEPTH_BACKBONES
    gains = {m: 100 * (chosen[m, deep]["probe_top1"] - chosen[m, shallow]["probe_top1"])
             for m in DEPTH_METHODS if (m, shallow) in chosen and (m, deep) in chosen}
    sentence = ""
    if gains:
        verdicts = "; ".join(f"for {m} {deep} {'beats' if gain > 0 else 'does not beat'} {shallow} ({gain:+.2f} points)"
                             for m, gain in gains.items())
        sentence = (f"At the same budget, by linear-probe top-1: {verdicts}. The poster (ResNet-32 vs Conv4, CIFAR-10)"
                    f" shows every method gaining from depth, so our trend"
                    f" {_agreement(sum(g > 0 for g in gains.values()), len(gains))}.")
    return _table(header, rows), chosen, sentence


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
        runs = [r["probe_top1"] for r in main_runs(results, method)]
        if runs:
            parts.append((statistics.mean(runs), f"{method} {mean_std(runs)}%"))
    ordered = ", ".join(text for _, text in sorted(parts, reverse=True))
    config = study_config()
    budget = f"{config.num_epochs} epoch" + ("s" if config.num_epochs != 1 else "")
    return (f"Linear-probe top-1 on the Fashion-MNIST test set ({config.model.backbone}, {budget}, mean ± std over"
            f" seeds): {ordered}.")


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
    table, depth_runs, sentence = depth_table(results)
    if depth_runs:
        plot_depth(os.path.join(figures, "depth.png"), {key: r["knn_curve"] for key, r in depth_runs.items()},
                   {key: r["probe_top1"] for key, r in depth_runs.items()})
        hours = sum(_wall(r) for r in depth_runs.values()) / 3600
        lines += [f"## Shallow vs deeper backbone ({DEPTH_EPOCHS} epochs of M=64, K={ABLATION_VIEWS} for relational)", "",
                  f"Every backbone gets the same budget, {DEPTH_EPOCHS} epochs of the 60 000 training images at 64 a "
                  f"step (seed 0), with the kNN monitor (5 000 training and 1 000 test images) every "
                  f"{DEPTH_KNN_EVERY} steps; {DEPTH_BACKBONES[1]} is the smallest CIFAR ResNet (3 residual blocks; "
                  "the paper's ResNet-32 has 15). The table's kNN column is the evaluation over the whole sets. "
                  f"The {len(depth_runs)} runs took {hours:.1f} hours of wall time in all (pretraining, probe and "
                  "evaluation; the machine is described under Setup).",
                  "", *table, "", f"![depth]({link}/figures/depth.png)", "", sentence, ""]
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
