"""The launcher's XLA:CPU defaults: how they merge with the user's flags, and that XLA
accepts them and they do what they claim (no YNNPACK fusion in the compiled backward)."""

import os
import subprocess
import sys

import pytest

from rr_jax.xla_flags import CPU_DEFAULTS, with_cpu_defaults

YNN = "xla_cpu_experimental_ynn_fusion_type"


def test_defaults_are_appended_to_other_flags():
    assert with_cpu_defaults("") == f"--{YNN}="
    assert with_cpu_defaults(" --xla_force_host_platform_device_count=8 ") == (
        f"--xla_force_host_platform_device_count=8 --{YNN}="
    )


@pytest.mark.parametrize("given", [f"--{YNN}=dot", f"-{YNN}=dot,eltwise", f"--{YNN}"])
def test_a_flag_the_user_sets_wins(given):
    flags = with_cpu_defaults(f"--xla_dump_to=/tmp/x {given}")
    assert flags == f"--xla_dump_to=/tmp/x {given}"
    assert with_cpu_defaults(flags) == flags


# Compiles the kernel gradient of a convolution and reports whether XLA:CPU put any
# instruction into a YNNPACK fusion (its HLO names them ynn_fusion / __ynn_fusion).
PROBE = """
import jax, jax.numpy as jnp
from jax import lax
x, w = jnp.ones((64, 8, 8, 32)), jnp.ones((3, 3, 32, 32))
conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
grad = jax.jit(jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2)))
print("ynn" in grad.lower(w, x).compile().as_text())
"""


def compiled_with_ynn(xla_flags: str) -> bool:
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()[-1] == "True"


def test_xla_accepts_the_defaults_and_they_turn_ynnpack_fusions_off():
    assert set(CPU_DEFAULTS) == {YNN}
    if not compiled_with_ynn(""):
        pytest.skip("this jaxlib's XLA:CPU uses no YNNPACK fusion here; nothing to turn off")
    assert not compiled_with_ynn(with_cpu_defaults(""))
