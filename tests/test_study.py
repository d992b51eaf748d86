"""The study runner: skipping finished runs, results files, and the rendered report."""

import json
import os

import numpy as np
import pytest

from rr_jax import study


def fake_call(accuracies):
    """Stands in for subprocess.run: writes what launch.py / evaluate_run would write."""
    calls = []

    def call(command, check):
        assert check
        calls.append(command)
        workdir = next(a.split("=", 1)[1] for a in command if a.startswith("--workdir="))
        os.makedirs(workdir, exist_ok=True)
        name = os.path.basename(workdir)
        if "launch.py" in command:
            with open(os.path.join(workdir, "probe_results.json"), "w") as f:
                json.dump({"top1": accuracies[name], "top5": 0.99, "step": 937}, f)
            with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
                for step, loss in ((50, 1.0), (100, 0.5), (150, 0.25)):
                    f.write(json.dumps({"step": step, "loss": loss, "accuracy": 0.8, "images_per_second": step}) + "\n")
                f.write(json.dumps({"step": 150, "knn_top1": 0.7}) + "\n")
        else:
            with open(os.path.join(workdir, "evaluation_results.json"), "w") as f:
                json.dump({"knn_top1": accuracies[name] - 0.01, "precision_at_10": 0.6}, f)
            if "--noplots" not in command:
                for figure in study.FIGURES:
                    open(os.path.join(workdir, figure), "wb").close()

    return call, calls


def test_finished_runs_are_skipped_and_results_written(tmp_path):
    runs = [study.Run("relational_k8_s0", "main", "relational", 0, (("seed", 0),), plots=True),
            study.Run("random_s0", "main", "random", 0, (("method", "random"),))]
    results_dir, runs_dir = tmp_path / "results", tmp_path / "runs"
    results_dir.mkdir()
    (results_dir / "random_s0.json").write_text("{}")  # finished earlier
    call, calls = fake_call({"relational_k8_s0": 0.85})
    study.run_study(runs, str(runs_dir), str(results_dir), call)
    assert len(calls) == 2 and all("relational_k8_s0" in c[-2] + c[-1] for c in calls)
    assert calls[0][1:] == study.commands(runs[0], str(runs_dir))[0][1:]  # launch.py, as a user types it
    result = json.loads((results_dir / "relational_k8_s0.json").read_text())
    assert result["probe_top1"] == 0.85 and result["knn_top1"] == pytest.approx(0.84)
    assert result["images_per_second"] == 125  # median of the records after the first
    assert result["knn_curve"] == [[150, 0.7]] and result["overrides"] == {"seed": 0}
    assert result["commands"][0].startswith("python launch.py --config=configs/study_fashion_mnist.py")
    assert os.path.exists(results_dir / result["figures"]["tsne"])
    study.run_study(runs, str(runs_dir), str(results_dir), call)  # everything done: nothing runs
    assert len(calls) == 2


def test_views_come_from_the_objectives():
    runs = {run.name: run for run in study.study_runs()}
    assert {name: runs[name].num_views for name in ("supervised_s0", "random_s0", "deepcluster_s0",
                                                     "rotationnet_s0", "deepinfomax_s0", "simclr_s0",
                                                     "relational_k8_s0", "relational_k16_s0")} == {
        "supervised_s0": 1, "random_s0": 0, "deepcluster_s0": 1, "rotationnet_s0": 4, "deepinfomax_s0": 1,
        "simclr_s0": 2, "relational_k8_s0": 8, "relational_k16_s0": 16}


def test_a_failed_run_leaves_no_results_file(tmp_path):
    run = study.Run("simclr_s0", "main", "simclr", 0)

    def call(command, check):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        study.run_study([run], str(tmp_path / "runs"), str(tmp_path / "results"), call)
    assert not (tmp_path / "results" / "simclr_s0.json").exists()


def test_render_tables_from_results(tmp_path):
    accuracies = {"supervised": [0.90, 0.91, 0.92], "relational": [0.85, 0.86, 0.88],
                  "simclr": [0.84, 0.845, 0.85], "deepinfomax": [0.83, 0.835, 0.84],
                  "rotationnet": [0.82, 0.825, 0.83], "deepcluster": [0.815, 0.82, 0.81],
                  "random": [0.80, 0.79, 0.81]}
    assert set(study.METHODS) == set(accuracies)
    runs = [r for r in study.study_runs() if r.group != "main" or r.seed < 3]
    values = {}
    for run in runs:
        values[run.name] = accuracies[run.method][run.seed] if run.group == "main" else 0.80 + 0.01 * run.num_views / 4
    call, _ = fake_call(values)
    study.run_study(runs, str(tmp_path / "runs"), str(tmp_path / "results"), call)
    output = tmp_path / "RESULTS.md"
    study.render(str(tmp_path / "results"), str(output))
    text = output.read_text()
    for method, accs in accuracies.items():
        expected = f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}"
        assert expected in text, method
    head = text.split("**Headline.**")[1].split("\n")[0]
    order = ["supervised", "relational", "simclr", "deepinfomax", "rotationnet", "deepcluster", "random"]
    assert [head.index(method) for method in order] == sorted(head.index(method) for method in order)
    table = text.split("## Main table")[1].split("##")[0]  # rows in the paper's order
    assert [table.index(f"| {method}") for method in study.METHODS] == sorted(
        table.index(f"| {method}") for method in study.METHODS)
    # K=4 default 0.81; the dot head (K=4) also 0.81 -> delta +0.00
    assert "| head = dot | 81.00 | 80.00 | 60.00 | +0.00 |" in text
    assert (tmp_path / "results" / "figures" / "accuracy_vs_k.png").stat().st_size > 1000
    assert "figures/relational_k8_s2_tsne.png" in text  # the best relational run's pictures
