"""The whole pretraining step with glibc's default malloc against malloc keeping freed memory.

    XLA_FLAGS= python bench/bench_host_memory.py [--cases conv4:32,resnet32:16] [--rounds 4] [--steps 7]

XLA:CPU mallocs and frees each step's temporary buffers; with glibc's defaults every step
touches fresh pages (bench/malloc.py says why), `malloc.keep_freed_memory` makes it
reuse freed memory. The settings are process-wide and must be made before the JAX
backend starts its threads, so each measurement is a fresh child process of this
script: one with glibc's defaults, one with `keep_freed_memory()`, alternating round by
round. Each child builds the pmapped step (`steps.whole_step`: M = 64, launch.py's
XLA:CPU flags), runs two warm-up steps, then times `--steps` steps and reports their
median, the median minor page faults and kernel CPU time per step (getrusage) and its
peak RSS. The speed-up is the median of the per-round ratios (default / keep).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

from malloc import keep_freed_memory  # noqa: E402

SETTINGS = ("default", "keep")


def child(backbone: str, views: int, setting: str, steps: int) -> dict:
    """Times the step in this process under `setting`; returns the figures."""
    if setting == "keep":
        keep_freed_memory()
    import jax
    from steps import whole_step
    from timing import compile_fn, times_ms

    from rr_jax.xla_flags import CPU_DEFAULTS

    step, args = whole_step(backbone, views)
    executable, _ = compile_fn(step, *args, options=CPU_DEFAULTS)
    usage = []  # (minor page faults, kernel CPU ms) of each call

    def run():
        before = resource.getrusage(resource.RUSAGE_SELF)
        jax.block_until_ready(executable(*args))
        after = resource.getrusage(resource.RUSAGE_SELF)
        usage.append((after.ru_minflt - before.ru_minflt, 1e3 * (after.ru_stime - before.ru_stime)))

    times = times_ms(run, steps, warmup=2)
    faults, system = zip(*usage[2:])
    return {"ms": statistics.median(times), "faults": statistics.median(faults), "sys_ms": statistics.median(system),
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(backbone: str, views: int, setting: str, steps: int) -> dict:
    """One child process (see the module docstring)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, __file__, "--child", f"{backbone}:{views}:{setting}", "--steps", str(steps)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="conv4:32,resnet32:16", help="backbone:K, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        backbone, views, setting = args.child.split(":")
        print(json.dumps(child(backbone, int(views), setting, args.steps)))
        return
    print("| backbone | K | default ms | keep ms | speed-up | faults/step default / keep "
          "| kernel CPU ms/step default / keep | peak RSS MiB default / keep |")
    print("|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        backbone, views = case.split(":")
        runs = {setting: [] for setting in SETTINGS}
        for _ in range(args.rounds):
            for setting in SETTINGS:
                runs[setting].append(run_child(backbone, int(views), setting, args.steps))
                print(backbone, views, setting, runs[setting][-1], file=sys.stderr, flush=True)
        median = {s: {key: statistics.median(r[key] for r in runs[s]) for key in runs[s][0]} for s in SETTINGS}
        speed_up = statistics.median(a["ms"] / b["ms"] for a, b in zip(runs["default"], runs["keep"]))
        default, keep = median["default"], median["keep"]
        print(f"| {backbone} | {views} | {default['ms']:.0f} | {keep['ms']:.0f} | {speed_up:.2f}x | "
              f"{default['faults']:,.0f} / {keep['faults']:,.0f} | {default['sys_ms']:.0f} / {keep['sys_ms']:.0f} | "
              f"{default['rss_mib']:,.0f} / {keep['rss_mib']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
