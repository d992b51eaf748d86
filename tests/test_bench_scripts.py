"""The benchmark scripts keep up with the package's API.

They are run by hand, not by the suite (they take minutes), so a renamed function or
keyword would go unnoticed until someone measures. This reads each script's syntax tree
and checks every name it takes from rr_jax, every attribute it reads off an rr_jax module
and every keyword it passes to an rr_jax function.
"""

import ast
import importlib
import importlib.util
import inspect
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"


def rr_jax_references(tree: ast.Module):
    """Yields (line, rr_jax module, name, keywords passed) for each use of rr_jax in `tree`."""
    modules = {}  # local name -> rr_jax module
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rr_jax":
            source = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(source, "__path__") and importlib.util.find_spec(f"{node.module}.{alias.name}"):
                    modules[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                else:
                    yield node.lineno, source, alias.name, ()
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "rr_jax":
                    modules[alias.asname or alias.name.split(".")[0]] = importlib.import_module(alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
            yield node.lineno, modules[node.value.id], node.attr, ()
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id in modules):
            keywords = tuple(k.arg for k in node.keywords if k.arg is not None)
            yield node.lineno, modules[node.func.value.id], node.func.attr, keywords


@pytest.mark.parametrize("script", sorted(p.name for p in BENCH.glob("*.py")))
def test_bench_script_uses_only_existing_api(script):
    tree = ast.parse((BENCH / script).read_text())
    problems = []
    for line, source, name, keywords in rr_jax_references(tree):
        if not hasattr(source, name):
            problems.append(f"line {line}: {source.__name__} has no {name!r}")
            continue
        function = getattr(source, name)
        if keywords and callable(function):
            parameters = inspect.signature(function).parameters
            if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
                problems += [f"line {line}: {source.__name__}.{name} takes no keyword {k!r}"
                             for k in keywords if k not in parameters]
    assert not problems, "\n".join(dict.fromkeys(problems))


def test_the_check_catches_a_stale_name_and_keyword():
    tree = ast.parse("from rr_jax import train\ntrain.objective_options(c)\n"
                     "train.create_train_state(k, b, o, s, options=1)\n")
    found = {(name, keywords) for _, _, name, keywords in rr_jax_references(tree)}
    assert ("objective_options", ()) in found and ("create_train_state", ("options",)) in found
    from rr_jax import train

    assert not hasattr(train, "objective_options")
    assert "options" not in inspect.signature(train.create_train_state).parameters
