"""The benchmark scripts keep up with the package's API and import each other one way.

They are run by hand, not by the suite (they take minutes), so a renamed function or
keyword would go unnoticed until someone measures. This reads each script's syntax tree
and checks every name it takes from rr_jax, every attribute it reads off an rr_jax module
and every keyword it passes to an rr_jax function; that no bench module imports itself
back through others (anywhere in its code); and that only the PyTorch comparisons import
torch when they load (directly or through another bench module), so that the others run
without it.
"""

import ast
import importlib
import importlib.util
import inspect
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
# The bench modules that compare against PyTorch and so import it when they load.
TORCH_MODULES = {"official_torch", "bench_backbones"}


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
    tree = ast.parse("from rr_jax import step, train\ntrain.objective_options(c)\n"
                     "step.create_train_state(k, b, o, s, options=1)\n")
    found = {(name, keywords) for _, _, name, keywords in rr_jax_references(tree)}
    assert ("objective_options", ()) in found and ("create_train_state", ("options",)) in found
    from rr_jax import train
    from rr_jax.step import create_train_state

    assert not hasattr(train, "objective_options")
    assert "options" not in inspect.signature(create_train_state).parameters


def _imports(node: ast.AST, top_level: bool):
    """First components of the modules imported in `node`'s code; top_level: only what
    runs when the module loads (not inside functions)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            yield from (alias.name.split(".")[0] for alias in child.names)
        elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
            yield child.module.split(".")[0]
        elif not (top_level and isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)):
            yield from _imports(child, top_level)


def import_graph(sources: dict[str, str], top_level: bool) -> dict[str, set[str]]:
    """Module name -> the bench modules (keys of `sources`) and 'torch' that it imports."""
    graph = {}
    for name, source in sources.items():
        imported = set(_imports(ast.parse(source), top_level))
        graph[name] = {m for m in imported if m in sources or m == "torch"}
    return graph


def import_path(graph: dict[str, set[str]], start: str, target: str) -> list[str] | None:
    """A chain of imports start -> ... -> target (at least one step), or None."""
    stack, seen = [[start]], set()
    while stack:
        path = stack.pop()
        for module in sorted(graph.get(path[-1], ())):
            if module == target:
                return [*path, module]
            if module not in seen:
                seen.add(module)
                stack.append([*path, module])
    return None


def bench_sources() -> dict[str, str]:
    return {path.stem: path.read_text() for path in sorted(BENCH.glob("*.py"))}


def test_no_import_cycle_among_bench_modules():
    graph = import_graph(bench_sources(), top_level=False)
    cycles = [" -> ".join(path) for name in graph if (path := import_path(graph, name, name))]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_the_pytorch_comparisons_import_torch():
    sources = bench_sources()
    assert TORCH_MODULES <= set(sources)
    graph = import_graph(sources, top_level=True)
    chains = [" -> ".join(path) for name in sorted(set(graph) - TORCH_MODULES)
              if (path := import_path(graph, name, "torch"))]
    assert not chains, "bench modules that need torch to load:\n" + "\n".join(chains)


def test_the_import_checks_catch_a_cycle_and_torch_through_a_helper():
    sources = {"a": "import b\n", "b": "def f():\n    from a import x\n",
               "c": "import sys\ntry:\n    from b import y\nexcept ImportError:\n    pass\nimport d\n",
               "d": "import numpy\nimport torch.nn as nn\n", "e": "def f():\n    import torch\n"}
    everything, on_load = import_graph(sources, top_level=False), import_graph(sources, top_level=True)
    assert import_path(everything, "a", "a") == ["a", "b", "a"]
    assert import_path(on_load, "a", "a") is None  # b imports a only when f runs
    assert import_path(on_load, "c", "torch") == ["c", "d", "torch"]
    assert import_path(on_load, "e", "torch") is None and import_path(everything, "e", "torch") == ["e", "torch"]
