"""Executes the study's runs as a user would, and writes results/<name>.json of each.

A run whose results file exists is skipped; an interrupted run resumes from its last
checkpoint, so `python -m rr_jax.study run` can be stopped and re-run at any time.
"""

from __future__ import annotations

import dataclasses
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

from absl import logging

from rr_jax.evaluate_run import ARRAYS
from rr_jax.linear_probe import probe_name
from rr_jax.study.runs import FIGURES, RESULTS_DIR, RUNS_DIR, Run, commands

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
