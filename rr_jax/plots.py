"""Pictures of an evaluation: retrieval grids, t-SNE scatter plots and a run's curves.

The functions only draw what they are given and write a PNG (matplotlib, without a
display); the numbers come from `rr_jax.evaluate` and `rr_jax.tsne`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from rr_jax.evaluate import check_labels


def _show(axis, image: np.ndarray, edge: str | None = None) -> None:
    image = np.asarray(image)
    if image.shape[-1] == 1:
        axis.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        axis.imshow(image)
    axis.set_xticks([])
    axis.set_yticks([])
    for spine in axis.spines.values():
        spine.set_visible(edge is not None)
        if edge is not None:
            spine.set_edgecolor(edge)
            spine.set_linewidth(3)


def plot_retrieval(
    path: str,
    query_images: np.ndarray,
    neighbour_images: np.ndarray,
    query_labels: np.ndarray | None = None,
    neighbour_labels: np.ndarray | None = None,
) -> None:
    """Saves a PNG grid: one row per query, the query then its neighbours in order.

    With labels, a neighbour is framed green when it shares the query's label, red
    otherwise (as in the paper's retrieval figure).

    Args:
      path: the PNG to write.
      query_images: uint8[Q, H, W, C] (C = 1 or 3).
      neighbour_images: uint8[Q, k, H, W, C].
      query_labels: int[Q] or None; neighbour_labels: int[Q, k] or None.
    """
    queries, neighbours = np.asarray(query_images), np.asarray(neighbour_images)
    if queries.ndim != 4 or neighbours.ndim != 5 or neighbours.shape[0] != queries.shape[0]:
        raise ValueError(
            "query_images must be [Q, H, W, C] and neighbour_images [Q, k, H, W, C], got "
            f"shapes {queries.shape} and {neighbours.shape}."
        )
    if (query_labels is None) != (neighbour_labels is None):
        raise ValueError("Give both query_labels and neighbour_labels, or neither.")
    num_queries, k = neighbours.shape[:2]
    figure = Figure(figsize=(1.0 * (k + 1), 1.0 * num_queries))
    draw_retrieval(figure.subplots(num_queries, k + 1, squeeze=False), queries, neighbours,
                   query_labels, neighbour_labels)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def draw_retrieval(axes: np.ndarray, queries: np.ndarray, neighbours: np.ndarray,
                   query_labels: np.ndarray | None, neighbour_labels: np.ndarray | None) -> None:
    """Draws the grid of `plot_retrieval` into axes[Q, k + 1] (the arguments as there,
    already checked), so that several grids can share one figure."""
    num_queries, k = neighbours.shape[:2]
    for row in range(num_queries):
        _show(axes[row, 0], queries[row], edge="black")
        for column in range(k):
            edge = None
            if query_labels is not None:
                same = neighbour_labels[row][column] == query_labels[row]
                edge = "tab:green" if same else "tab:red"
            _show(axes[row, column + 1], neighbours[row, column], edge)
    axes[0, 0].set_title("query", fontsize=8)
    for column in range(k):
        axes[0, column + 1].set_title(str(column + 1), fontsize=8)


def plot_tsne(
    path: str,
    embedding: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> None:
    """Saves a PNG scatter plot of a 2-D embedding[N, 2], coloured by labels int[N]."""
    embedding, labels = np.asarray(embedding), np.asarray(labels)
    if embedding.ndim != 2 or embedding.shape[1] != 2:
        raise ValueError(f"embedding must be [N, 2], got shape {embedding.shape}.")
    check_labels("labels", labels, embedding.shape[0])
    classes = np.unique(labels)
    if class_names is not None and len(class_names) <= classes.max():
        raise ValueError(
            f"class_names has {len(class_names)} names, labels go up to {classes.max()}."
        )
    figure = Figure(figsize=(7, 6))
    axis = figure.subplots()
    draw_tsne(axis, embedding, labels, class_names)
    axis.set_title(f"t-SNE of {embedding.shape[0]} test features")
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def draw_tsne(axis, embedding: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None,
              legend: bool = True) -> None:
    """Draws the scatter plot of `plot_tsne` (embedding[N, 2] coloured by labels int[N],
    already checked) into one matplotlib axis, so that several can share one figure."""
    classes = np.unique(labels)
    num_colours = int(classes.max()) + 1
    # Qualitative colours where they suffice; a continuous map (no legend) beyond 20.
    cmap = "tab10" if num_colours <= 10 else "tab20" if num_colours <= 20 else "nipy_spectral"
    top = {"tab10": 10, "tab20": 20}.get(cmap, num_colours)
    scatter = axis.scatter(
        embedding[:, 0], embedding[:, 1], c=labels, cmap=cmap, s=6, vmin=-0.5, vmax=top - 0.5
    )
    if legend and num_colours <= 20:
        handles = [
            axis.scatter(
                [], [], color=scatter.cmap(scatter.norm(c)), s=20,
                label=class_names[c] if class_names is not None else str(c),
            )
            for c in classes
        ]
        axis.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    axis.set_xticks([])
    axis.set_yticks([])


# The curves of `plot_curves`: metric name in metrics.jsonl, axis title.
CURVES = (
    ("loss", "loss"),
    ("accuracy", "pair accuracy"),
    ("knn_top1", "kNN top-1"),
    ("online_probe_top1", "online-probe top-1"),
    ("rankme", "RankMe"),
)


def plot_curves(path: str, records: Sequence[dict[str, float]]) -> list[str]:
    """Saves a PNG with one panel per metric of `CURVES` that the records hold, the
    metric against the step.

    Args:
      path: the PNG to write.
      records: metrics.jsonl records, each {'step': int, name: value, ...}, holding any
        subset of the metrics.

    Returns:
      The names of the metrics drawn, in panel order.
    """
    names = [(name, title) for name, title in CURVES if any(name in r for r in records)]
    if not names:
        raise ValueError(f"The records hold none of the metrics {[n for n, _ in CURVES]}; nothing to plot.")
    figure = Figure(figsize=(3.2 * len(names), 3.0))
    for axis, (name, title) in zip(figure.subplots(1, len(names), squeeze=False)[0], names):
        points = sorted((r["step"], r[name]) for r in records if name in r)
        steps, values = zip(*points)
        axis.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return [name for name, _ in names]
