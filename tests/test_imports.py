"""The numeric core imports without the data, checkpoint and plotting stacks, so a JAX
project that reuses a loss or the step pays for JAX and Flax only."""

import subprocess
import sys

NUMERIC = ("rr_jax", "rr_jax.objectives", "rr_jax.step", "rr_jax.optimizer", "rr_jax.backbones", "rr_jax.augment",
           "rr_jax.relational", "rr_jax.shuffle", "rr_jax.features", "rr_jax.evaluate", "rr_jax.datasets",
           "rr_jax.numerics", "rr_jax.initializers")
HEAVY = ("tensorflow", "tensorflow_datasets", "grain", "orbax", "matplotlib", "array_record")


def loaded_after_import(modules):
    """Top-level packages in sys.modules of a fresh interpreter after importing `modules`."""
    code = f"import importlib, sys\nfor m in {list(modules)!r}: importlib.import_module(m)\nprint(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return {name.split(".")[0] for name in eval(out)}


def test_the_numeric_core_imports_without_tensorflow_grain_orbax_or_matplotlib():
    loaded = loaded_after_import(NUMERIC)
    assert "jax" in loaded and "flax" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_the_check_sees_a_heavy_import():
    assert "tensorflow" in loaded_after_import(["rr_jax.sources"])
