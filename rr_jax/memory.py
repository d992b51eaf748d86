"""Does the train step fit in memory? XLA's estimate of the compiled step against the device's.

Before the first step the step is compiled ahead of time (`Lowered.compile()`), and XLA's
memory analysis of that executable (`step_bytes`) is compared with what a device has
(`device_memory`): `bytes_limit` of the device's memory statistics on GPU and TPU, the
available host RAM on CPU. A single-process run then calls that same executable
(`CheckedStep`), so the check costs no second compile. When the step does not fit,
`OutOfMemoryError` says how many bytes it needs and how many there are, and the largest
value of each searched size (K views, M images per step) that fits at the other
settings; finding those costs a few more compiles, only then. An out-of-memory error while the step runs ends the same
way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from rr_jax.errors import OutOfMemoryError

Lower = Callable[[Mapping[str, int]], jax.stages.Lowered]
"""config overrides {key: value} -> the step lowered at that config ({}: the run's own)."""


@dataclasses.dataclass(frozen=True)
class Memory:
    """Memory the step may use: `bytes` and what the figure is. `shared_by` devices
    share it (host RAM shared by the CPU devices of a process); otherwise it is each
    device's own."""

    bytes: int
    what: str
    shared_by: int = 1


@dataclasses.dataclass(frozen=True)
class Size:
    """A config field the advice searches: `key` (e.g. 'relational.num_views') with the
    run's `value`, its smallest allowed value and its granularity (`step`: the global
    device count for the batch size), and what users call it (`name`: 'K', 'M')."""

    name: str
    key: str
    value: int
    minimum: int
    step: int = 1
    degree: int = 1  # memory grows about as a polynomial of this degree in the value


def step_bytes(compiled: jax.stages.Compiled) -> int | None:
    """Bytes one device holds while the compiled step runs, from XLA's memory analysis
    of the executable: arguments (train state, batch) + outputs (new state, metrics) -
    aliased outputs (those written into donated argument buffers) + temporaries
    (activations, gradients, scratch) + generated code. Under pmap every device runs
    this program on its shard, so the figure is per device. Not counted: buffers outside
    the step (batches prefetched ahead of it, the monitors' and the probe's features).
    None where the backend reports no analysis."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
               + stats.temp_size_in_bytes + stats.generated_code_size_in_bytes)


def _mem_available(meminfo: str = "/proc/meminfo") -> int | None:
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_memory(devices: Sequence[jax.Device]) -> Memory | None:
    """What the step may use on `devices` (a process's local devices): on GPU and TPU
    the smallest `memory_stats()['bytes_limit']` of them (the pool XLA's allocator may
    use on each device); on CPU the host's available RAM (MemAvailable of
    /proc/meminfo), shared by all of them. None where neither is known."""
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    if limits and all(limits):
        return Memory(min(limits), f"{devices[0].platform.upper()} memory per device (bytes_limit)")
    if devices and devices[0].platform == "cpu" and (available := _mem_available()) is not None:
        shared = f", shared by {len(devices)} CPU devices" if len(devices) > 1 else ""
        return Memory(available, f"available host RAM (MemAvailable{shared})", shared_by=len(devices))
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# XLA:CPU's buffer assignment, hence the memory analysis, comes before LLVM's
# optimisations: without them the search's compiles give the same figures 3x faster.
_SEARCH_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


class _Estimates:
    """The step's need in the units of `Memory` (x shared_by) at config overrides,
    each compiled once, for the search only (the executables are dropped)."""

    def __init__(self, lower: Lower, memory: Memory, platform: str):
        self._lower, self._memory, self._known = lower, memory, {}
        self._options = _SEARCH_COMPILER_OPTIONS.get(platform)

    def put(self, overrides: Mapping[str, int], need: int) -> None:
        self._known[tuple(sorted(overrides.items()))] = need

    def __call__(self, overrides: Mapping[str, int]) -> int:
        key = tuple(sorted(overrides.items()))
        if key not in self._known:
            compiled, _ = compile_or_out_of_memory(self._lower(overrides), self._options)
            self._known[key] = math.inf if compiled is None else step_bytes(compiled) * self._memory.shared_by
        return self._known[key]


def compile_or_out_of_memory(lowered: jax.stages.Lowered, options: dict | None = None
                             ) -> tuple[jax.stages.Compiled | None, str]:
    """(the compiled step, '') or, where compiling it runs out of device memory (XLA:GPU
    allocates while it autotunes, so a step far too large fails here already), (None,
    the error's first line)."""
    try:
        return lowered.compile(options), ""
    except jax.errors.JaxRuntimeError as error:
        if not is_out_of_memory(error):
            raise
        return None, str(error).splitlines()[0]


def largest_fitting(size: Size, need_at: Callable[[int], int], limit: int) -> int | None:
    """The largest value v of `size` below its own (minimum + n * step) whose step needs
    at most `limit` bytes (`need_at(v)`, taken to grow with v; inf where the step did not
    compile for lack of memory), or None if not even the minimum fits.

    A polynomial of `size.degree` through the run's value and the smallest values gives
    a first guess; compiling at the guess and the value above it usually settles it,
    and a bisection between known fits and misses does otherwise."""
    units = list(range(size.minimum, size.value, size.step))
    if not units:
        return None
    points = [(v, need_at(v)) for v in units[: size.degree] + [size.value]]
    points = [(v, need) for v, need in points if math.isfinite(need)]  # inf: did not even compile
    guess = 0
    if len(points) > 1:
        fit = np.polynomial.Polynomial.fit(*zip(*points), len(points) - 1)
        guess = max((i for i, v in enumerate(units) if fit(v) <= limit), default=0)

    def fits(i: int) -> bool:
        return need_at(units[i]) <= limit

    lo, hi = -1, len(units)  # units[: lo + 1] fit (lo = -1: none known to), units[hi:] do not
    if fits(guess):
        lo = guess
        if guess + 1 < hi:
            lo, hi = (guess + 1, hi) if fits(guess + 1) else (lo, guess + 1)
    else:
        hi = guess
        if guess > 0:
            lo, hi = (guess - 1, hi) if fits(guess - 1) else (lo, guess - 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return units[lo] if lo >= 0 else None


def _advice(sizes: Sequence[Size], limit: int, estimates: _Estimates) -> str:
    """'The largest that fit, each at the other settings: K ...; M ...'."""
    parts = []
    for size in sizes:
        best = largest_fitting(size, lambda v, key=size.key: estimates({key: v}), limit)
        parts.append(f"{size.name}: none, not even {size.key}={size.minimum}" if best is None else
                     f"{size.name}: {size.key}={best} (needs {_size(estimates({size.key: best}))})")
    return "The largest that fit, each at the other settings: " + "; ".join(parts)


class CheckedStep:
    """The compiled step; an out-of-memory error while it runs becomes OutOfMemoryError
    (one message with the advice) instead of XLA's traceback."""

    def __init__(self, compiled: Callable, on_out_of_memory: Callable[[str], str]):
        self._compiled, self._on_out_of_memory = compiled, on_out_of_memory

    def __call__(self, *args):
        try:
            return self._compiled(*args)
        except jax.errors.JaxRuntimeError as error:
            if not is_out_of_memory(error):
                raise
            raise OutOfMemoryError(self._on_out_of_memory(str(error).splitlines()[0])) from error


def is_out_of_memory(error: BaseException) -> bool:
    """Whether an XLA runtime error is an allocation failure."""
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "Out of memory" in text


def compile_checked(
    lower: Lower,
    sizes: Sequence[Size],
    *,
    devices: Sequence[jax.Device],
    memory: Memory | None = None,
    run: Callable | None = None,
) -> CheckedStep:
    """Compiles the run's step (`lower({})`), logs its memory estimate against the
    devices' memory and returns it ready to call in place of the jitted step.

    Args:
      lower: config overrides -> the step lowered at them; the advice compiles it at
        other values of `sizes`.
      sizes: the config fields the advice searches (K, M), each at the others' values.
      devices: the devices the step runs on (this process's local devices).
      memory: what the step may use; default `device_memory(devices)`.
      run: what the returned step calls; default the executable compiled here.

    Raises:
      OutOfMemoryError: the estimate exceeds the memory; the message gives both in
        bytes and the largest value of each of `sizes` that fits.
    """
    compiled, compile_error = compile_or_out_of_memory(lower({}))
    memory = memory or device_memory(devices)
    settings = ", ".join(f"{s.name}={s.value}" for s in sizes)
    if compiled is None:  # far too large: the compiler itself ran out of device memory
        advice = ""
        if memory is not None:
            estimates = _Estimates(lower, memory, devices[0].platform)
            for overrides in ({}, *({s.key: s.value} for s in sizes)):
                estimates.put(overrides, math.inf)
            advice = _advice(sizes, memory.bytes, estimates) + ". "
        raise OutOfMemoryError(
            f"The train step ({settings}) does not fit: compiling it ran out of device memory ({compile_error}). "
            f"{advice}Lower {' or '.join(s.name for s in sizes)} (or spread M over more devices).")
    need = step_bytes(compiled)
    compiled = compiled if run is None else run
    if need is None or memory is None:
        logging.info("The train step's memory is not checked: %s.",
                     "XLA gives no memory analysis here" if need is None else "the device's memory is unknown")
        return CheckedStep(compiled, lambda error: f"Out of memory while the train step ran ({error}).")
    total = need * memory.shared_by
    per_device = f"{memory.shared_by} x {_size(need)} = " if memory.shared_by > 1 else ""
    logging.info("The train step needs %s%s of %s (%s; XLA's memory analysis of the compiled step).",
                 per_device, _size(total), _size(memory.bytes), memory.what)
    estimates = _Estimates(lower, memory, devices[0].platform)
    estimates.put({}, total)
    for size in sizes:
        estimates.put({size.key: size.value}, total)
    if total > memory.bytes:
        logging.info("The step does not fit; compiling it at smaller sizes to find what fits.")
        raise OutOfMemoryError(
            f"The train step ({settings}) needs {total:,} bytes ({_size(total)}), more than the {memory.bytes:,} "
            f"bytes ({_size(memory.bytes)}) of {memory.what}. {_advice(sizes, memory.bytes, estimates)}. "
            f"Lower {' or '.join(s.name for s in sizes)} (or spread M over more devices)."
        )

    def on_out_of_memory(error: str) -> str:
        # The estimate fitted, so something outside it took the rest: advise sizes whose
        # step is smaller than this one's.
        return (f"Out of memory while the train step ({settings}) ran: {error} Its estimate was {_size(total)} "
                f"of {_size(memory.bytes)} ({memory.what}): memory outside the step took the rest. Steps smaller "
                f"than this one: {_advice(sizes, total - 1, estimates)}.")

    return CheckedStep(compiled, on_out_of_memory)
