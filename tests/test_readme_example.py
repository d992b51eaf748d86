"""Runs the README's Python examples verbatim: relational_loss in your own code (the loss
must go down) and adding an objective (registered, then pretrained for a few steps)."""

import json
import pathlib
import re

import jax
import numpy as np
from conftest import mocked_tfds
from test_pipeline import load_config, tiny

from rr_jax import train
from rr_jax.objectives import OBJECTIVES

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example(heading: str = "## Use the loss in your own JAX code") -> str:
    section = README.read_text().split(heading + "\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains():
    namespace = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert float(namespace["metrics"]["accuracy"]) > 0.8


def test_readme_objective_registers_and_pretrains(tmp_path, fast_compile):
    namespace = {}
    try:
        exec(compile(readme_example("### Adding an objective"), str(README), "exec"), namespace)
        assert OBJECTIVES["my_method"] is namespace["MyMethod"]
        config = tiny(load_config("cifar10"), tmp_path / "tfds", max_steps=3, method="my_method", **{
            "model.backbone": "conv4"})
        with mocked_tfds(tmp_path / "tfds", 64):
            state = train.pretrain(config, str(tmp_path / "run"))
    finally:
        OBJECTIVES.pop("my_method", None)  # registered for this test only
    assert int(state.step) == 3
    head = state.params["head"]["kernel"]
    assert head.shape[-1] == 8 and np.all(np.isfinite(jax.tree.leaves(state.params)[0]))
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and losses[-1] < losses[0]
