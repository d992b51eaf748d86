"""The figures of the study's report (rr_jax/study.py render), drawn from results alone.

Each function takes plain numbers (or the arrays `rr_jax.evaluate_run` saved), writes
one PNG and returns the titles of the panels it drew, read back from the figure.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from rr_jax.plots import draw_retrieval, draw_tsne


def _titles(figure: Figure) -> list[str]:
    return [axis.get_title() for axis in figure.axes if axis.get_visible() and axis.get_title()]


def _finish_line_plot(figure: Figure, axis, path: str, title: str, small: bool = False) -> list[str]:
    """Titles the plot, adds its grid and legend (smaller type with `small`), writes it to
    `path` and returns the figure's titles."""
    axis.set_title(title, **({"fontsize": 10} if small else {}))
    axis.grid(alpha=0.3)
    axis.legend(**({"fontsize": 8} if small else {}))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return _titles(figure)


def _mean_err(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value) of values, in percent."""
    values = [100 * v for v in values]
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _errorbars(axis, xs: Sequence[float], series: Mapping[str, Sequence[Sequence[float]]], **style) -> None:
    """One error-bar line per label: label -> one list of fractions per x."""
    for label, values in series.items():
        means, errors = zip(*map(_mean_err, values))
        axis.errorbar(xs, means, yerr=errors, marker="o", capsize=3, label=label, **style)


def plot_accuracy_vs_views(path: str, by_k: Mapping[int, Mapping[str, Sequence[float]]]) -> list[str]:
    """Linear-probe and kNN top-1 against K: by_k[K]['probe_top1' | 'knn_top1'] holds
    the fractions of the seeds (mean, with their std as error bars)."""
    figure = Figure(figsize=(5, 3.5))
    axis = figure.subplots()
    ks = sorted(by_k)
    _errorbars(axis, ks, {label: [by_k[k][key] for k in ks]
                          for key, label in (("probe_top1", "linear probe"), ("knn_top1", "kNN (k=20)"))})
    axis.set_xscale("log", base=2)
    axis.set_xticks(ks, [str(k) for k in ks])
    axis.set_xlabel("views per image K (equal epochs)")
    axis.set_ylabel("test top-1 accuracy (%)")
    return _finish_line_plot(figure, axis, path, "Fashion-MNIST, conv4, relational")


def plot_accuracy_vs_labels(path: str, curves: Mapping[str, Mapping[float, Sequence[float]]]) -> list[str]:
    """Test top-1 against the fraction of training labels: curves[label][fraction] holds
    the seeds' accuracies (fractions); a label ending in 'fine-tuned' is drawn dashed."""
    figure = Figure(figsize=(5.5, 4))
    axis = figure.subplots()
    fractions = sorted({f for points in curves.values() for f in points})
    methods = list(dict.fromkeys(label.removesuffix(" fine-tuned") for label in curves))
    for label, points in curves.items():  # a method's fine-tuning in its colour, dashed
        xs = sorted(points)
        _errorbars(axis, [100 * x for x in xs], {label: [points[x] for x in xs]},
                   color=f"C{methods.index(label.removesuffix(' fine-tuned'))}",
                   linestyle="--" if label.endswith("fine-tuned") else "-")
    axis.set_xscale("log")
    axis.set_xticks([100 * f for f in fractions], [f"{100 * f:g}" for f in fractions])
    axis.set_xlabel("training labels (%)")
    axis.set_ylabel("test top-1 accuracy (%)")
    return _finish_line_plot(figure, axis, path, "Fashion-MNIST, conv4: accuracy vs available labels", small=True)


def plot_depth(path: str, curves: Mapping[tuple[str, str], Sequence[Sequence[float]]],
               probes: Mapping[tuple[str, str], float]) -> list[str]:
    """Learning curves of the backbone comparison: curves[method, backbone] holds the kNN
    monitor's (step, top-1 fraction) points, drawn in the method's colour, one line style
    per backbone; probes[method, backbone] (fraction) goes into the legend."""
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    methods = list(dict.fromkeys(method for method, _ in curves))
    backbones = sorted({b for _, b in curves}, key=lambda b: (b != "conv4", b))
    for (method, backbone), points in curves.items():
        steps, top1 = zip(*points)
        label = f"{method}, {backbone} (probe {100 * probes[method, backbone]:.2f}%)"
        axis.plot(steps, [100 * t for t in top1], marker="o", markersize=3, color=f"C{methods.index(method)}",
                  linestyle=("-", "--", ":")[backbones.index(backbone) % 3], label=label)
    axis.set_xlabel("pretraining step (M=64)")
    axis.set_ylabel("kNN top-1 (%, monitor)")
    return _finish_line_plot(figure, axis, path, "Fashion-MNIST: shallow vs deeper backbone, learning curves", small=True)


def plot_retrieval_side_by_side(path: str, grids: Mapping[str, Mapping[str, np.ndarray]]) -> list[str]:
    """The retrieval grids of several runs next to each other, one panel per title:
    grids[title] holds the arrays of WORKDIR/retrieval.npz (rr_jax.evaluate_run.ARRAYS).

    Raises:
      ValueError: the runs' queries differ (the grids would not be comparable).
    """
    first = next(iter(grids.values()))["query_indices"]
    for title, grid in grids.items():
        if not np.array_equal(grid["query_indices"], first):
            raise ValueError(f"The retrieval queries of {title!r} ({grid['query_indices']}) differ from "
                             f"the first run's ({first}); evaluate every run with the same seed.")
    num_queries, k = next(iter(grids.values()))["neighbour_images"].shape[:2]
    figure = Figure(figsize=(1.0 * (k + 1) * len(grids), 1.0 * num_queries + 0.4))
    for panel, (title, grid) in zip(figure.subfigures(1, len(grids), squeeze=False)[0], grids.items()):
        draw_retrieval(panel.subplots(num_queries, k + 1, squeeze=False), grid["query_images"],
                       grid["neighbour_images"], grid["query_labels"], grid["neighbour_labels"])
        panel.suptitle(title)
    figure.savefig(path, dpi=80)
    return [panel.get_suptitle() for panel in figure.subfigs]


def plot_tsne_panels(path: str, embeddings: Mapping[str, Mapping[str, np.ndarray]]) -> list[str]:
    """One t-SNE panel per title: embeddings[title] holds the arrays of WORKDIR/tsne.npz
    (rr_jax.evaluate_run.ARRAYS); the legend (class names) goes beside the last panel.

    Raises:
      ValueError: the runs embed different test points.
    """
    first = next(iter(embeddings.values()))["points"]
    for title, arrays in embeddings.items():
        if not np.array_equal(arrays["points"], first):
            raise ValueError(f"The t-SNE points of {title!r} differ from the first run's; "
                             "evaluate every run with the same seed and tsne_points.")
    columns = min(4, len(embeddings))
    rows = -(-len(embeddings) // columns)
    figure = Figure(figsize=(3.5 * columns + 1.5, 3.5 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for index, (axis, (title, arrays)) in enumerate(zip(axes, embeddings.items())):
        names = [str(n) for n in arrays["class_names"]] or None
        draw_tsne(axis, arrays["embedding"], arrays["labels"], names, legend=index == len(embeddings) - 1)
        axis.set_title(title)
    for axis in axes[len(embeddings):]:
        axis.set_visible(False)
    figure.suptitle(f"t-SNE of the same {len(first)} test features")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return _titles(figure)
