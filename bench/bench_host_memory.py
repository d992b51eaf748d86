"""The whole pretraining step with glibc's default malloc against malloc keeping freed memory.

    XLA_FLAGS= python bench/bench_host_memory.py [--cases conv4:32,resnet32:16] [--rounds 4] [--steps 7]

XLA:CPU allocates each execution's temporary buffers with malloc (about 0.5 GB for the
conv4 step at K=32) and frees them at its end. glibc serves chunks above its mmap
threshold (32 MiB at most) with a fresh mmap() and unmaps them on free, and XLA's worker
threads get arenas whose heaps (64 MiB) cannot hold such a chunk either, so every step
touches ~125 000 fresh pages. `keep_freed_memory` sets three mallopt() parameters so that
freed memory is reused instead: one arena for every thread, no mmap() for large chunks,
no trimming of the heap's free top.

The settings are process-wide and must be made before the JAX backend starts its
threads, so each measurement is a fresh child process of this script: one with glibc's
defaults, one with `keep_freed_memory()`, alternating round by round. Each child
builds the pmapped step as bench_pipeline.py does (M = 64, launch.py's XLA:CPU flags),
runs two warm-up steps, then times `--steps` steps and reports their median, the median
minor page faults and kernel CPU time per step (getrusage) and its peak RSS. The
speed-up is the median of the per-round ratios (default / keep).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path[:0] = [os.path.dirname(__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

SETTINGS = ("default", "keep")
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8  # mallopt() parameters, glibc's <malloc.h>


def keep_freed_memory() -> None:
    """glibc's malloc keeps and reuses freed memory (see the module docstring)."""
    libc = ctypes.CDLL("libc.so.6")
    for parameter, value in ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)):  # -1: never trim
        if libc.mallopt(parameter, value) != 1:
            raise SystemExit(f"mallopt({parameter}, {value}) failed")


def child(backbone: str, views: int, setting: str, steps: int) -> dict:
    """Times the step in this process under `setting`; returns the figures."""
    if setting == "keep":
        keep_freed_memory()
    import jax
    from bench_pipeline import whole_step

    from rr_jax.xla_flags import CPU_DEFAULTS

    step, args = whole_step(backbone, views)
    compiled = step.lower(*args).compile(CPU_DEFAULTS)
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times, faults, system = [], [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(1e3 * (time.perf_counter() - start))
        after = resource.getrusage(resource.RUSAGE_SELF)
        faults.append(after.ru_minflt - before.ru_minflt)
        system.append(1e3 * (after.ru_stime - before.ru_stime))
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
