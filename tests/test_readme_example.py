"""Runs the README's example of relational_loss verbatim: the loss must go down."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text().split("## Use the loss in your own JAX code", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_trains():
    namespace = {}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    assert float(namespace["metrics"]["accuracy"]) > 0.8
