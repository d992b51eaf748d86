"""Shared timing helpers for the benchmark scripts (not part of the package)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import jax


def compile_and_time(
    fn: Callable, *args, repeats: int = 10, compiler_options: dict | None = None
) -> tuple[float, float, object]:
    """Compiles `fn` (a jitted function) for `args`, with XLA `compiler_options` if
    given, then times it.

    Returns (compile seconds, median milliseconds per call, compiled object).
    """
    start = time.perf_counter()
    compiled = fn.lower(*args).compile(compiler_options)
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(1e3 * (time.perf_counter() - start))
    return compile_s, statistics.median(times), compiled


def temp_mib(compiled) -> float:
    """Peak temporary buffer size of a compiled XLA executable, in MiB."""
    analysis = compiled.memory_analysis()
    return analysis.temp_size_in_bytes / 2**20 if analysis is not None else float("nan")
