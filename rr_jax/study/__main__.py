"""The reproduction study on Fashion-MNIST: every run, its results JSON, RESULTS.md.

    python -m rr_jax.study run [--only=NAME,...] [--groups=GROUP,...]   # from the repository root
    python -m rr_jax.study render

`run` executes the runs of `rr_jax.study.runs.study_runs()` that have no results yet
(rr_jax.study.runner); `render` writes RESULTS.md and its figures from results/ alone
(rr_jax.study.report).
"""

from __future__ import annotations

from absl import app, flags

from rr_jax.study.report import render
from rr_jax.study.runner import run_study
from rr_jax.study.runs import RESULTS_DIR, RUNS_DIR, study_runs


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
