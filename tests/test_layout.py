"""The code's layout, read from the source (AST, no imports): model code is single-device code
(DESIGN principle 1), no import cycle among runner/, models/, parallel/, no test module imports
another (shared test code lives in conftest.py and the tests' helper modules)."""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("runner", "models", "parallel")


def package_modules(root: str = ROOT) -> dict[str, str]:
    """Dotted module name -> file, for every module of PACKAGES (a package is its __init__)."""
    out = {}
    for pkg in PACKAGES:
        for d, _, files in os.walk(os.path.join(root, pkg)):
            for f in files:
                if f.endswith(".py"):
                    name = os.path.relpath(os.path.join(d, f), root)[:-3].replace(os.sep, ".")
                    out[name.removesuffix(".__init__")] = os.path.join(d, f)
    return out


def imported_names(path: str, name: str = "") -> set[str]:
    """Every module name `path` imports, at any depth (lazy imports inside functions count: they
    are imports all the same). `from a import b` gives both a and a.b; relative imports resolved
    against `name`."""
    is_pkg = path.endswith("__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                mod = ".".join(parts[:len(parts) - node.level + 1] + ([mod] if mod else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
    """module -> the modules of `modules` it imports (a name that is no module: its nearest package)."""
    graph = {}
    for name, path in modules.items():
        deps = set()
        for m in imported_names(path, name):
            while m and m not in modules:
                m = m.rpartition(".")[0]
            if m and m != name:
                deps.add(m)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_two_module_and_a_longer_cycle():
    # the circle runner/families replaced: pipeline -> opensora_pipeline -> pipeline
    assert cycles({"p": {"o", "c"}, "o": {"p", "c"}, "c": set()}) == [["o", "p"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_among_runner_models_parallel():
    modules = package_modules()
    assert {"runner.families", "runner.families.demo", "runner.demo.train", "models.stdit3", "parallel.comm"} <= set(modules)
    graph = import_graph(modules)
    # the graph sees the imports that matter: package __init__, relative and lazy ones alike
    assert "runner.families.demo" in graph["runner.families"]
    assert "runner.families.base" in graph["runner.families.opensora"]
    assert cycles(graph) == []


def test_model_code_is_single_device_code():
    """DESIGN principle 1: nothing in models/ imports torch.distributed, runner or parallel."""
    found = {}
    for name, path in package_modules().items():
        if name.split(".")[0] != "models":
            continue
        bad = sorted(m for m in imported_names(path, name)
                     if m.split(".")[0] in ("runner", "parallel") or m == "torch.distributed"
                     or m.startswith("torch.distributed."))
        if bad:
            found[name] = bad
    assert found == {}


def test_imported_names_sees_lazy_and_relative_imports(tmp_path):
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("from . import layers\n\ndef f():\n    import torch.distributed as dist\n"
                                "    from runner.config import X\n")
    names = imported_names(str(pkg / "bad.py"), "models.bad")
    assert {"models", "models.layers", "torch.distributed", "runner.config", "runner.config.X"} <= names


def _test_module_imports(path: str) -> list[str]:
    """The test modules (tests/test_*.py, imported as tests.test_x or test_x) that `path` imports."""
    return sorted(m for m in imported_names(path, "tests." + os.path.basename(path)[:-3])
                  if re.fullmatch(r"(tests\.)?test_\w+", m))


def test_no_test_module_imports_another():
    tests = os.path.join(ROOT, "tests")
    found = {}
    for f in sorted(os.listdir(tests)):
        if f.startswith("test_") and f.endswith(".py"):
            bad = _test_module_imports(os.path.join(tests, f))
            if bad:
                found[f] = bad
    assert found == {}, f"shared test code belongs in tests/conftest.py or a helper module: {found}"


@pytest.mark.parametrize("line,bad", [
    ("from tests.test_vae import tiny_vae", ["tests.test_vae"]),
    ("import test_t5", ["test_t5"]),
    ("from tests import test_t5", ["tests.test_t5"]),
    ("from tests.helpers import make_cfg\nimport pytest_timeout\nfrom tests.helpers import test_data", []),
])
def test_the_test_import_rule_flags_what_it_should(tmp_path, line, bad):
    path = tmp_path / "test_x.py"
    path.write_text(f"def f():\n    {line.replace(chr(10), chr(10) + '    ')}\n")
    assert _test_module_imports(str(path)) == bad
