"""XLA:CPU flags that `launch.py` sets by default, measured faster for this workload.

jaxlib 0.10's XLA:CPU hands convolutions, reductions and elementwise chains to YNNPACK
fusions. For the backbones' backward pass (the kernel-gradient convolutions in
particular) those are slower than XLA's own emitters: with them off, the whole
pretraining step runs 1.4-2x faster on CPU (BENCHMARKS.md, "Backbones on CPU"). The
flags touch only the CPU backend, so GPU and TPU runs are unaffected. They are
environment flags, read once when the first backend starts, so they must be set before
any computation; a library import never sets them, only the launcher.
"""

from __future__ import annotations

CPU_DEFAULTS: dict[str, str] = {
    # An empty list of fusion types turns YNNPACK fusions off.
    "xla_cpu_experimental_ynn_fusion_type": "",
}


def with_cpu_defaults(xla_flags: str) -> str:
    """`xla_flags` (an XLA_FLAGS string) plus each default it does not already set.

    A flag the user gives, with any value, wins over the default.
    """
    given = {token.lstrip("-").split("=", 1)[0] for token in xla_flags.split()}
    missing = [f"--{name}={value}" for name, value in CPU_DEFAULTS.items() if name not in given]
    return " ".join([*xla_flags.split(), *missing])
