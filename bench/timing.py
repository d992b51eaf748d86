"""The benchmark scripts' one timing helper (not part of the package): compile a function
with XLA compiler options, time callables after a warm-up (alone or interleaved round by
round), and read a compiled program's temporary memory."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax

Run = Callable[[], object]


def compile_fn(fn: Callable, *args, options: dict | None = None) -> tuple[jax.stages.Compiled, float]:
    """`jax.jit(fn)` compiled for `args` (arrays or ShapeDtypeStructs) with XLA `options`;
    returns (executable, compile seconds). Pass fn unjitted: a jit around a jitted
    function compiles to a program with other temporary buffers."""
    start = time.perf_counter()
    executable = jax.jit(fn).lower(*args).compile(options)
    return executable, time.perf_counter() - start


def compiled(fn: Callable, *args, options: dict | None = None) -> tuple[Run, float]:
    """`compile_fn`, returned as (run: one call on `args` until its results are ready,
    compile seconds)."""
    executable, seconds = compile_fn(fn, *args, options=options)
    return (lambda: jax.block_until_ready(executable(*args))), seconds


def wall_ms(run: Run) -> float:
    """The wall time of one call of run(), in milliseconds."""
    start = time.perf_counter()
    run()
    return 1e3 * (time.perf_counter() - start)


def round_times_ms(runs: dict[str, Run], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Milliseconds of each run over `repeats` rounds (every run once per round, in
    order, so that load from other processes hits them alike), after `warmup` untimed
    rounds."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(wall_ms(run))
    return times


def times_ms(run: Run, repeats: int, warmup: int = 1) -> list[float]:
    """Milliseconds of `repeats` calls of run(), after `warmup` untimed calls."""
    return round_times_ms({"run": run}, repeats, warmup)["run"]


def median_ms(run: Run, repeats: int, warmup: int = 1) -> float:
    """Median milliseconds of run() over `repeats` calls, after `warmup` untimed calls."""
    return statistics.median(times_ms(run, repeats, warmup))


def interleaved(runs: dict[str, Run], repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median ms of each run, timed round by round after one warm-up round, and the
    median per-round ratio of each run's time to the first run's."""
    times = round_times_ms(runs, repeats)
    first = times[next(iter(runs))]
    medians = {name: statistics.median(t) for name, t in times.items()}
    ratios = {name: statistics.median(a / b for a, b in zip(t, first)) for name, t in times.items()}
    return medians, ratios


def compile_and_time(
    fn: Callable, *args, repeats: int = 10, options: dict | None = None
) -> tuple[float, float, jax.stages.Compiled]:
    """Compiles `fn` for `args` (with XLA `options`), then times it: returns (compile
    seconds, median milliseconds per call after one warm-up call, executable)."""
    executable, compile_s = compile_fn(fn, *args, options=options)
    step_ms = median_ms(lambda: jax.block_until_ready(executable(*args)), repeats)
    return compile_s, step_ms, executable


def temp_mib(executable: jax.stages.Compiled) -> float:
    """Peak temporary buffer size of a compiled XLA executable, in MiB."""
    analysis = executable.memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")
