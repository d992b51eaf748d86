"""kNN accuracy, image retrieval, t-SNE and training curves of a pretraining run.

    python -m rr_jax.evaluate_run --workdir=DIR [--step=N] [--knn_k=20] [--noplots]

Restores the backbone like the linear probe does (`rr_jax.features`, any device count),
computes eval-mode features of the pretraining dataset's train and test splits once,
and writes WORKDIR/evaluation_results.json (weighted kNN top-1/top-5 of the test images
against the training images; retrieval precision@k of every test image against the
training images; RankMe of the test features), WORKDIR/retrieval.png (test queries with
their top-k training neighbours), WORKDIR/tsne.png (t-SNE of test features coloured by
class) and WORKDIR/curves.png (loss, pair accuracy, kNN top-1, online-probe top-1 and
RankMe against the step, from WORKDIR/metrics.jsonl). The drawn data go to
WORKDIR/retrieval.npz and WORKDIR/tsne.npz (see `ARRAYS`), so that figures comparing
runs can be drawn without the backbones; queries and t-SNE points depend only on the
seed and the test set, so runs evaluated with the same seed share them.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging

from rr_jax.errors import exit_cleanly_on_known_errors, writing
from rr_jax.run_dir import quiet_native_logs, reader_logs

quiet_native_logs()  # before rr_jax.sources imports TensorFlow
from rr_jax import sources  # noqa: E402
from rr_jax.evaluate import knn_accuracy, nearest_neighbours, precision_at_k, rankme  # noqa: E402
from rr_jax.evaluation_inputs import restore_with_data  # noqa: E402
from rr_jax.features import extract_features  # noqa: E402
from rr_jax.plots import plot_curves, plot_retrieval, plot_tsne  # noqa: E402
from rr_jax.tsne import tsne  # noqa: E402

RESULTS_FILE = "evaluation_results.json"
METRICS_FILE = "metrics.jsonl"
# The arrays behind the pictures, WORKDIR/<name>.npz: name -> the arrays it holds.
ARRAYS = {
    "retrieval": ("query_indices", "query_images", "query_labels", "neighbour_images", "neighbour_labels"),
    "tsne": ("points", "embedding", "labels", "class_names"),
}


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The records of WORKDIR/metrics.jsonl ({'step': ..., name: value, ...}) in the
    order they were written; [] when the run logged none."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate_run(
    workdir: str,
    *,
    step: int | None = None,
    data_dir: str | None = None,
    knn_k: int = 20,
    temperature: float = 0.07,
    retrieval_k: int = 10,
    num_queries: int = 8,
    tsne_points: int = 2000,
    plots: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluates the frozen backbone of `workdir`; writes the JSON (and PNGs) there.

    Args:
      workdir: a pretraining run's directory.
      step: the checkpoint step; None: the latest.
      data_dir: TFDS data directory; None: the pretraining config's.
      knn_k, temperature: neighbours that vote and the vote temperature of the kNN
        classifier (`rr_jax.evaluate.knn_scores`).
      retrieval_k: neighbours retrieved per query for precision@k and the grid.
      num_queries: rows of the retrieval grid (random test images, drawn with `seed`).
      tsne_points: test images in the t-SNE plot (random, drawn with `seed`).
      plots: write retrieval.png, tsne.png and (when the run logged metrics) curves.png.

    Returns:
      The results written to WORKDIR/evaluation_results.json.
    """
    start_time = time.perf_counter()
    restored, spec, splits = restore_with_data(workdir, step=step, data_dir=data_dir)
    config, used_step = restored.config, restored.step
    data_dir = config.get("data_dir") if data_dir is None else data_dir
    train_images, train_labels = splits.train_images, splits.train_labels
    test_images, test_labels = splits.test_images, splits.test_labels
    features = [
        extract_features(restored.backbone, restored.variables, images, mean=spec.mean, std=spec.std)
        for images in (train_images, test_images)
    ]
    knn = knn_accuracy(features[0], train_labels, features[1], test_labels, spec.num_classes,
                       k=knn_k, temperature=temperature)
    _, neighbours = nearest_neighbours(features[1], features[0], retrieval_k)
    neighbours = np.asarray(neighbours)
    results = {
        "workdir": workdir,
        "dataset": config["dataset"],
        "step": used_step,
        "knn_k": knn_k,
        "knn_temperature": temperature,
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "retrieval_k": retrieval_k,
        f"precision_at_{retrieval_k}": precision_at_k(train_labels[neighbours], test_labels),
        "rankme": rankme(features[1]),
        "num_train": len(train_labels),
        "num_test": len(test_labels),
    }
    with writing("the evaluation's results and figures", workdir):
        if plots:
            rng = np.random.default_rng(seed)
            queries = rng.choice(len(test_labels), num_queries, replace=False)
            retrieval = dict(query_indices=queries, query_images=test_images[queries], query_labels=test_labels[queries],
                             neighbour_images=train_images[neighbours[queries]],
                             neighbour_labels=train_labels[neighbours[queries]])
            plot_retrieval(os.path.join(workdir, "retrieval.png"), retrieval["query_images"], retrieval["neighbour_images"],
                           retrieval["query_labels"], retrieval["neighbour_labels"])
            points = rng.choice(len(test_labels), min(tsne_points, len(test_labels)), replace=False)
            perplexity = min(30.0, (len(points) - 1) / 3.5)  # t-SNE needs N > 3 * perplexity
            embedding = np.asarray(tsne(features[1][points], perplexity=perplexity))
            class_names = sources.class_names(spec, data_dir)
            plot_tsne(os.path.join(workdir, "tsne.png"), embedding, test_labels[points], class_names)
            if jax.process_index() == 0:
                np.savez_compressed(os.path.join(workdir, "retrieval.npz"), **retrieval)
                np.savez_compressed(os.path.join(workdir, "tsne.npz"), points=points, embedding=embedding,
                                    labels=test_labels[points], class_names=np.asarray(class_names, dtype=str))
            records = read_metrics(workdir)
            if records:
                plot_curves(os.path.join(workdir, "curves.png"), records)
        results["wall_time_s"] = time.perf_counter() - start_time
        if jax.process_index() == 0:
            with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
                json.dump(results, f, indent=2)
    logging.info("%s step %d: kNN top-1 %.2f%%, precision@%d %.2f%%.", workdir, used_step,
                 100 * results["knn_top1"], retrieval_k, 100 * results[f"precision_at_{retrieval_k}"])
    return results


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Pretraining run directory (holds checkpoints/).",
                        required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory; default: the pretraining config's.")
    flags.DEFINE_integer("knn_k", 20, "Neighbours that vote in the kNN classifier.")
    flags.DEFINE_integer("retrieval_k", 10, "Neighbours retrieved per query.")
    flags.DEFINE_integer("tsne_points", 2000, "Test images in the t-SNE plot.")
    flags.DEFINE_bool("plots", True, "Write retrieval.png, tsne.png and curves.png.")


@exit_cleanly_on_known_errors
def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    with reader_logs(f.workdir):
        results = evaluate_run(f.workdir, step=f.step, data_dir=f.data_dir, knn_k=f.knn_k,
                               retrieval_k=f.retrieval_k, tsne_points=f.tsne_points, plots=f.plots)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
