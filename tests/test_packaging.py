"""`pip install .` (not only `-e`): the wheel ships every subpackage and its entry points
import from outside the repository."""

import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY_MODULES = ("rr_jax.train", "rr_jax.linear_probe", "rr_jax.evaluate_run", "rr_jax.convert")


def _build_isolation() -> list[str]:
    """`--no-build-isolation` (offline, fast) when the installed packages satisfy the
    build requirements of pyproject.toml; else none (pip fetches them)."""
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]:
        requirement = Requirement(text)
        try:
            if not requirement.specifier.contains(importlib.metadata.version(requirement.name)):
                return []
        except importlib.metadata.PackageNotFoundError:
            return []
    return ["--no-build-isolation"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """The wheel of a copy of the sources (a stale build/ in the checkout cannot leak in)."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "source"
    shutil.copytree(ROOT / "rr_jax", source / "rr_jax", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(tmp_path / "dist"),
                    *_build_isolation()], check=True, capture_output=True, text=True)
    (wheel,) = (tmp_path / "dist").glob("rr_jax-*.whl")
    return wheel


def test_wheel_ships_every_module(wheel):
    shipped = set(zipfile.ZipFile(wheel).namelist())
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "rr_jax").rglob("*.py")}
    assert {"rr_jax/objectives/__init__.py", "rr_jax/train.py"} <= sources
    assert sources - shipped == set()


def test_installed_wheel_imports_outside_the_repository(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The dependencies come from this interpreter's site-packages; rr_jax only from the wheel.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True, text=True)
    check = (
        "import importlib, json, sys\n"
        f"for name in {ENTRY_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps({n: getattr(m, '__file__', None) for n, m in sys.modules.items()"
        " if n == 'rr_jax' or n.startswith('rr_jax.')}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    result = subprocess.run([str(python), "-c", check], cwd=outside, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    files = json.loads(result.stdout.splitlines()[-1])
    assert set(ENTRY_MODULES) <= set(files) and "rr_jax.objectives" in files
    # Every module of rr_jax was imported from the installed wheel, none from a checkout
    # (an editable install elsewhere would otherwise fill in missing subpackages).
    elsewhere = {name: path for name, path in files.items() if not path.startswith(str(venv))}
    assert elsewhere == {}
