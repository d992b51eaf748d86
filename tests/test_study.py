"""The study runner: skipping finished runs, results files, and the rendered report."""

import json
import os
import shlex

import numpy as np
import pytest
from matplotlib import image as plt_image

from rr_jax.study import figures as study_figures
from rr_jax.study import report, runner
from rr_jax.study import runs as study_runs


def fake_arrays(workdir, seed, num_queries=2, k=3, points=12):
    """What evaluate_run saves next to its pictures: the same queries and points for every
    run (they depend on the evaluation seed only), neighbours and embeddings per run."""
    rng = np.random.default_rng(seed)
    queries = np.arange(num_queries)
    np.savez(os.path.join(workdir, "retrieval.npz"), query_indices=queries,
             query_images=rng.integers(0, 255, (num_queries, 4, 4, 1), dtype=np.uint8), query_labels=queries % 2,
             neighbour_images=rng.integers(0, 255, (num_queries, k, 4, 4, 1), dtype=np.uint8),
             neighbour_labels=rng.integers(0, 2, (num_queries, k)))
    np.savez(os.path.join(workdir, "tsne.npz"), points=np.arange(points), embedding=rng.normal(size=(points, 2)),
             labels=np.arange(points) % 2, class_names=np.asarray(["shirt", "boot"]))


def fake_call(accuracies, precision=None):
    """Stands in for subprocess.run: writes what launch.py / evaluate_run / linear_probe
    would write. accuracies: probe top-1 by workdir name (kNN top-1 is 0.01 less), for
    linear_probe by 'workdir/fraction/seed[/finetune]'; precision: precision@10 by
    workdir name (default 0.6)."""
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
        elif "rr_jax.linear_probe" in command:
            fraction = float(next(a.split("=")[1] for a in command if a.startswith("--label_fraction=")))
            finetune = "--finetune" in command
            seed = next(a.split("=")[1] for a in command if a.startswith("--seed="))
            key = f"{name}/{fraction:g}/{seed}" + ("/finetune" if finetune else "")
            suffix = "_finetune" if finetune else ""
            with open(os.path.join(workdir, f"probe_frac{fraction:g}{suffix}_results.json"), "w") as f:
                json.dump({"top1": accuracies[key], "top5": 0.9, "step": 937, "num_train": int(60000 * fraction)}, f)
        else:
            with open(os.path.join(workdir, "evaluation_results.json"), "w") as f:
                json.dump({"knn_top1": accuracies[name] - 0.01, "step": 937,
                           "precision_at_10": (precision or {}).get(name, 0.6)}, f)
            if "--noplots" not in command:
                for figure in study_runs.FIGURES:
                    open(os.path.join(workdir, figure), "wb").close()
                fake_arrays(workdir, len(calls))

    return call, calls


def test_finished_runs_are_skipped_and_results_written(tmp_path):
    runs = [study_runs.Run("relational_k8_s0", "main", "relational", 0, (("seed", 0),), plots=True),
            study_runs.Run("random_s0", "main", "random", 0, (("method", "random"),))]
    results_dir, runs_dir = tmp_path / "results", tmp_path / "runs"
    results_dir.mkdir()
    (results_dir / "random_s0.json").write_text("{}")  # finished earlier
    call, calls = fake_call({"relational_k8_s0": 0.85})
    runner.run_study(runs, str(runs_dir), str(results_dir), call)
    assert len(calls) == 2 and all("relational_k8_s0" in c[-2] + c[-1] for c in calls)
    assert calls[0][1:] == study_runs.commands(runs[0], str(runs_dir))[0][1:]  # launch.py, as a user types it
    result = json.loads((results_dir / "relational_k8_s0.json").read_text())
    assert result["probe_top1"] == 0.85 and result["knn_top1"] == pytest.approx(0.84)
    assert result["images_per_second"] == 125  # median of the records after the first
    assert result["knn_curve"] == [[150, 0.7]] and result["overrides"] == {"seed": 0}
    assert result["commands"][0].startswith("python launch.py --config=configs/study_fashion_mnist.py")
    assert os.path.exists(results_dir / result["figures"]["tsne"])
    runner.run_study(runs, str(runs_dir), str(results_dir), call)  # everything done: nothing runs
    assert len(calls) == 2


def test_views_come_from_the_objectives():
    runs = {run.name: run for run in study_runs.study_runs()}
    assert {name: runs[name].num_views for name in ("supervised_s0", "random_s0", "deepcluster_s0",
                                                     "rotationnet_s0", "deepinfomax_s0", "simclr_s0",
                                                     "relational_k8_s0", "relational_k16_s0")} == {
        "supervised_s0": 1, "random_s0": 0, "deepcluster_s0": 1, "rotationnet_s0": 4, "deepinfomax_s0": 1,
        "simclr_s0": 2, "relational_k8_s0": 8, "relational_k16_s0": 16}


def test_a_failed_run_leaves_no_results_file(tmp_path):
    run = study_runs.Run("simclr_s0", "main", "simclr", 0)

    def call(command, check):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        runner.run_study([run], str(tmp_path / "runs"), str(tmp_path / "results"), call)
    assert not (tmp_path / "results" / "simclr_s0.json").exists()


def probe_key(run):
    """fake_call's key of a 'labels' run."""
    return f"{run.pretrained.name}/{run.label_fraction:g}/{run.seed}" + ("/finetune" if run.finetune else "")


def test_run_list_names_commands_and_dependencies():
    runs = study_runs.study_runs()
    by_name = {run.name: run for run in runs}
    assert len(by_name) == len(runs)  # names are unique
    for index, run in enumerate(runs):  # every workdir a run needs is pretrained by an earlier run
        if run.pretrained is not None:
            assert runs.index(run.pretrained) < index and run.pretrained.kind == "pretrain"
            assert (run.pretrained.method, run.pretrained.seed, run.pretrained.group) == (run.method, run.seed, "main")
    labels = [r for r in runs if r.group == "labels"]
    linear = {(r.method, r.label_fraction, r.seed) for r in labels if not r.finetune}
    assert linear == {(m, f, s) for m in ("relational", "simclr", "supervised", "random")
                      for f in (0.01, 0.1, 0.25, 0.5) for s in (0, 1, 2)}
    assert {(r.method, r.label_fraction) for r in labels if r.finetune} == {
        (m, f) for m in ("relational", "simclr", "supervised", "random") for f in (0.01, 0.1)}
    assert study_runs.commands(by_name["labels_simclr_f25_s1"], "runs") == [
        ["python", "-m", "rr_jax.linear_probe", "--workdir=runs/simclr_s1", "--label_fraction=0.25", "--seed=1"]]
    assert study_runs.commands(by_name["labels_relational_f1_finetune_s0"], "runs") == [
        ["python", "-m", "rr_jax.linear_probe", "--workdir=runs/relational_k8_s0", "--label_fraction=0.01", "--seed=0",
         "--finetune"]]
    assert [r.name for r in runs if r.group == "embedding"] == [f"embedding_{m}_s0" for m in study_runs.METHODS]
    assert study_runs.commands(by_name["embedding_rotationnet_s0"], "runs") == [
        ["python", "-m", "rr_jax.evaluate_run", "--workdir=runs/rotationnet_s0"]]  # with the pictures and arrays
    depth = [r.name for r in runs if r.group == "depth"]
    assert depth == ["depth_relational_conv4_e5_s0", "depth_relational_resnet8_e5_s0", "depth_simclr_conv4_e5_s0",
                     "depth_simclr_resnet8_e5_s0"]
    launch, evaluate = study_runs.commands(by_name["depth_relational_resnet8_e5_s0"], "runs")
    assert launch[-5:] == ["--config.seed=0", "--config.model.backbone=resnet8", "--config.num_epochs=5",
                           "--config.knn_monitor.every_steps=500", "--config.relational.num_views=4"]
    assert evaluate == ["python", "-m", "rr_jax.evaluate_run", "--workdir=runs/depth_relational_resnet8_e5_s0", "--noplots"]
    assert by_name["labels_simclr_f25_s1"].num_views == 2 and by_name["depth_relational_conv4_e5_s0"].num_views == 4


@pytest.mark.parametrize("state", ["nothing", "results_only", "workdir"])
def test_a_probe_run_pretrains_its_missing_workdir_first(tmp_path, state):
    labels = next(r for r in study_runs.study_runs() if r.name == "labels_simclr_f10_s1")
    runs_dir, results_dir = tmp_path / "runs", tmp_path / "results"
    call, calls = fake_call({"simclr_s1": 0.8, "simclr_s1/0.1/1": 0.7})
    if state != "nothing":  # the pretraining run finished earlier ...
        runner.run_study([labels.pretrained], str(runs_dir), str(results_dir), call)
        calls.clear()
    if state == "results_only":  # ... and its workdir is gone, its results kept
        for path in (runs_dir / "simclr_s1").iterdir():
            path.unlink()
        (runs_dir / "simclr_s1").rmdir()
    before = (results_dir / "simclr_s1.json").read_text() if state != "nothing" else None
    runner.run_study([labels], str(runs_dir), str(results_dir), call)
    tools = [next(a for a in c if a in ("launch.py", "rr_jax.evaluate_run", "rr_jax.linear_probe")) for c in calls]
    assert tools == {"nothing": ["launch.py", "rr_jax.evaluate_run", "rr_jax.linear_probe"],
                     "results_only": ["launch.py", "rr_jax.linear_probe"], "workdir": ["rr_jax.linear_probe"]}[state]
    if before is not None:
        assert (results_dir / "simclr_s1.json").read_text() == before
    pretraining = json.loads((results_dir / "simclr_s1.json").read_text())
    assert pretraining["probe_top1"] == 0.8
    result = json.loads((results_dir / "labels_simclr_f10_s1.json").read_text())
    assert (result["probe_top1"], result["label_fraction"], result["num_train"]) == (0.7, 0.1, 6000)
    assert result["pretrained"] == "simclr_s1" and result["kind"] == "probe" and set(result["wall_time_s"]) == {"probe"}
    assert result["commands"] == [shlex.join(study_runs.commands(labels, str(runs_dir))[0])]
    calls.clear()
    runner.run_study([labels.pretrained, labels], str(runs_dir), str(results_dir), call)  # both done: skipped
    assert not calls


def test_multi_method_figures_have_one_panel_per_run(tmp_path):
    arrays = {}
    for seed, method in enumerate(("relational", "rotationnet", "simclr")):
        (tmp_path / method).mkdir()
        fake_arrays(str(tmp_path / method), seed)
        arrays[method] = {name: dict(np.load(tmp_path / method / f"{name}.npz")) for name in ("retrieval", "tsne")}
    titles = study_figures.plot_tsne_panels(str(tmp_path / "tsne.png"), {m: a["tsne"] for m, a in arrays.items()})
    assert titles == ["relational", "rotationnet", "simclr"]
    grids = {m: arrays[m]["retrieval"] for m in ("relational", "rotationnet")}
    assert study_figures.plot_retrieval_side_by_side(str(tmp_path / "retrieval.png"), grids) == ["relational", "rotationnet"]
    height, width = plt_image.imread(tmp_path / "retrieval.png").shape[:2]
    assert width > 2 * height  # two grids of 4 columns side by side, 2 rows each
    grids["rotationnet"]["query_indices"] = grids["rotationnet"]["query_indices"] + 1
    with pytest.raises(ValueError, match="rotationnet"):
        study_figures.plot_retrieval_side_by_side(str(tmp_path / "other.png"), grids)


def test_render_tables_from_results(tmp_path):
    accuracies = {"supervised": [0.90, 0.91, 0.92], "relational": [0.85, 0.86, 0.88],
                  "simclr": [0.84, 0.845, 0.85], "deepinfomax": [0.83, 0.835, 0.84],
                  "rotationnet": [0.82, 0.825, 0.83], "deepcluster": [0.815, 0.82, 0.81],
                  "random": [0.80, 0.79, 0.81], "byol": [0.86, 0.87, 0.875], "mocov3": [0.845, 0.85, 0.855],
                  "dino": [0.78, 0.785, 0.79], "barlow_twins": [0.855, 0.86, 0.865], "vicreg": [0.83, 0.83, 0.84],
                  "simsiam": [0.775, 0.78, 0.77]}
    assert set(study_runs.METHODS) == set(accuracies)
    depth = {("relational", "conv4"): 0.76, ("relational", "resnet8"): 0.79, ("simclr", "conv4"): 0.75,
             ("simclr", "resnet8"): 0.74}
    runs = study_runs.study_runs()
    values = {}
    for run in runs:
        if run.group == "main":
            values[run.name] = accuracies[run.method][run.seed]
        elif run.group == "depth":
            values[run.name] = depth[run.method, dict(run.overrides)["model.backbone"]]
        elif run.group == "labels":  # grows with the fraction; fine-tuning 2 points above
            values[probe_key(run)] = accuracies[run.method][run.seed] * (0.5 + run.label_fraction) + 0.02 * run.finetune
        elif run.group != "embedding":
            values[run.name] = 0.80 + 0.01 * run.num_views / 4
    call, _ = fake_call(values, precision={"relational_k8_s0": 0.7, "rotationnet_s0": 0.65})
    runner.run_study(runs, str(tmp_path / "runs"), str(tmp_path / "results"), call)
    output = tmp_path / "RESULTS.md"
    report.render(str(tmp_path / "results"), str(output))
    text = output.read_text()
    for method, accs in accuracies.items():
        expected = f"{100 * np.mean(accs):.2f} ± {100 * np.std(accs, ddof=1):.2f}"
        assert expected in text, method
    head = text.split("**Headline.**")[1].split("\n")[0]
    order = ["supervised", "byol", "relational", "barlow_twins", "mocov3", "simclr", "deepinfomax", "vicreg",
             "rotationnet", "deepcluster", "random", "dino", "simsiam"]
    assert [head.index(method) for method in order] == sorted(head.index(method) for method in order)
    table = text.split("## Main table")[1].split("##")[0]  # rows in the paper's order
    assert [table.index(f"| {method}") for method in study_runs.METHODS] == sorted(
        table.index(f"| {method}") for method in study_runs.METHODS)
    assert ("Among all 13 methods at this budget, relational reasoning ranks 3rd by mean linear-probe top-1 (2nd of the"
            " 11 self-supervised methods); ahead of it: supervised (+4.67 points), byol (+0.50 points).") in text
    # K=4 default 0.81; both head ablations (K=4) also 0.81 -> delta +0.00; rows labelled and ordered as in the paper
    ablation = text.split("## Ablations")[1].split("##")[0]
    rows = ["| (a) relation head (default: cat, focal, derangement) | 81.00 | 80.00 | 60.00 | - |",
            "| (b) encoder + dot product | 81.00 | 80.00 | 60.00 | +0.00 |",
            "| (c) dot product | 81.00 | 80.00 | 60.00 | +0.00 |",
            "| aggregation = max |"]
    assert [ablation.index(row) for row in rows] == sorted(ablation.index(row) for row in rows)
    assert "ahead of 0 of the 2 dot-product heads ((b) by +0.00 points, (c) by +0.00 points)" in ablation
    assert "so our trend disagrees." in ablation
    # Accuracy vs labels: mean ± std over the three seeds, 100% from the main runs
    labels = text.split("## Accuracy vs available labels")[1].split("##")[0]
    row = next(line for line in labels.splitlines() if line.startswith("| relational |"))
    for column, fraction in enumerate((0.01, 0.1, 0.25, 0.5, 1.0), 1):
        accs = np.asarray(accuracies["relational"]) * (0.5 + fraction if fraction < 1 else 1.0)
        assert row.split(" | ")[column].strip(" |") == f"{100 * accs.mean():.2f} ± {100 * accs.std(ddof=1):.2f} (n=3)"
    finetuned = next(line for line in labels.splitlines() if line.startswith("| simclr fine-tuned |"))
    assert finetuned.startswith(f"| simclr fine-tuned | {100 * (0.84 * 0.51 + 0.02):.2f} (n=1) | "
                                f"{100 * (0.84 * 0.6 + 0.02):.2f} (n=1) | - | - |")
    assert "above SimCLR's at 5 of 5 label fractions (1%, 10%, 25%, 50%, 100%)" in labels and "trend agrees." in labels
    tuned = {m: 100 * (accuracies[m][0] * 0.6 + 0.02) for m in ("supervised", "relational", "simclr", "random")}
    assert (f"Fine-tuned on 10% of the labels, the methods span {max(tuned.values()) - min(tuned.values()):.2f} points "
            f"(supervised {tuned['supervised']:.2f}, relational {tuned['relational']:.2f}, simclr {tuned['simclr']:.2f}, "
            f"random {tuned['random']:.2f}).") in labels
    # Shallow vs deeper backbone
    backbones = text.split("## Shallow vs deeper backbone")[1].split("##")[0]
    assert "| relational (K=4) | resnet8 | 937 | 79.00 | 78.00 | 60.00 | 125 |" in backbones  # images/s: median
    assert ("for relational resnet8 beats conv4 (+3.00 points); for simclr resnet8 does not beat conv4 (-1.00 points)"
            in backbones and "agrees in part" in backbones)
    # Retrieval and t-SNE of every method
    retrieval = text.split("## Retrieval")[1].split("##")[0]
    assert "precision@10 (70.00%) is above RotationNet's (65.00%)" in retrieval and "result agrees." in retrieval
    tsne = text.split("## t-SNE of every method")[1].split("##")[0]
    assert "byol separates the classes best of the 11 self-supervised methods" in tsne and "trend disagrees" in tsne
    for figure in ("accuracy_vs_k", "accuracy_vs_labels", "depth", "retrieval_side_by_side", "tsne_methods"):
        assert (tmp_path / "results" / "figures" / f"{figure}.png").stat().st_size > 1000, figure
        assert f"figures/{figure}.png" in text
    assert "figures/relational_k8_s2_tsne.png" in text  # the best relational run's pictures


def test_head_sentence_compares_the_relation_head_with_both_dot_product_heads():
    def result(name, top1, head=None):
        overrides = {"relational.num_views": 4} | ({"relational.head": head} if head else {})
        return {"name": name, "group": "head" if head else "views", "method": "relational", "seed": 0,
                "num_views": 4, "overrides": overrides, "probe_top1": top1}

    results = {"a": result("a", 0.8164), "b": result("b", 0.8201, "encoder_dot")}
    assert "ahead of 0 of the 1 dot-product heads ((b) by -0.37 points)" in report.head_sentence(results)
    results["c"] = result("c", 0.6935, "dot")
    sentence = report.head_sentence(results)
    assert "ahead of 1 of the 2 dot-product heads ((b) by -0.37 points, (c) by +12.29 points)" in sentence
    assert sentence.endswith("so our trend agrees in part.")
    results["b"]["probe_top1"] = 0.80
    assert report.head_sentence(results).endswith("so our trend agrees.")
    assert report.head_sentence({"c": results["c"]}) == ""


def test_ranking_sentence_names_where_the_order_departs_from_the_paper():
    def result(method, seed, top1):
        return {"group": "main", "method": method, "seed": seed, "probe_top1": top1}

    results = {f"{m}_{s}": result(m, s, v) for m, s, v in [
        ("relational", 0, 0.82), ("relational", 1, 0.80), ("simclr", 0, 0.805), ("rotationnet", 0, 0.79),
        ("supervised", 0, 0.84)]}
    sentence = report.ranking_sentence(results)
    assert sentence.startswith("Our order by mean linear-probe top-1: supervised 84.00 > relational 81.00 > "
                               "simclr 80.50 > rotationnet 79.00.")
    assert sentence.endswith("agrees with the paper's (relational > SimCLR > DeepCluster / RotationNet / Deep InfoMax).")
    results["rotationnet_0"]["probe_top1"] = 0.815
    assert "disagrees with the paper's where rotationnet (81.50) beats relational (81.00), rotationnet (81.50) beats simclr" \
        in report.ranking_sentence(results)
    assert report.standing_sentence(results) == (
        "Among all 4 methods at this budget, relational reasoning ranks 3rd by mean linear-probe top-1 (2nd of the 3"
        " self-supervised methods); ahead of it: supervised (+3.00 points), rotationnet (+0.50 points).")
    del results["supervised_0"], results["rotationnet_0"]
    assert report.standing_sentence(results).endswith("ranks 1st by mean linear-probe top-1 (1st of the 2 self-supervised"
                                                     " methods); no method is ahead of it.")
    assert report.standing_sentence({"r": result("relational", 0, 0.8)}) == ""
