"""The benchmarks use the package's public API only: the names fastclip/bench/__init__.py declares.
Read from the source (ast), nothing imported: a benchmark that imports another fastclip name, a
leading-underscore name, or assigns to an attribute of a task (task.evaluate = ...) fails here."""
import ast
import re
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "fastclip" / "bench"


def declared_api(init: Path = BENCH / "__init__.py") -> dict[str, set[str]]:
    """module -> public names, from the `    fastclip...: a, b` lines of the package docstring."""
    doc = ast.get_docstring(ast.parse(init.read_text()))
    api = {m: {n.strip() for n in names.split(",")}
           for m, names in re.findall(r"^ {4}(fastclip[\w.]*): (.+)$", doc, re.M)}
    assert api, f"{init}: no public API declared"
    return api


def chain(node: ast.AST) -> list[str] | None:
    """a.b.c -> ["a", "b", "c"]; None when the chain does not start at a name."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def root_name(node: ast.AST) -> tuple[str | None, list[str]]:
    """The name an attribute / subscript / call chain starts at, and the attribute names on the way."""
    attrs = []
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        if isinstance(node, ast.Attribute):
            attrs.append(node.attr)
        node = node.func if isinstance(node, ast.Call) else node.value
    return (node.id if isinstance(node, ast.Name) else None), attrs


def import_violations(tree: ast.Module, api: dict[str, set[str]]) -> list[str]:
    def allowed(module: str, name: str) -> bool:
        if name.startswith("_"):
            return False
        if module == "fastclip.bench" or module.startswith("fastclip.bench."):
            return True  # the benchmarks' own shared code
        return name in api.get(module, set()) or f"{module}.{name}" in api

    bad, modules = [], {}  # local name -> the fastclip module it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = "fastclip.bench" + (f".{node.module}" if node.module else "") if node.level else node.module
            if not module or not module.split(".")[0] == "fastclip":
                continue
            for alias in node.names:
                if not allowed(module, alias.name):
                    bad.append(f"line {node.lineno}: from {module} import {alias.name}")
                if f"{module}.{alias.name}" in api:
                    modules[alias.asname or alias.name] = f"{module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] != "fastclip":
                    continue
                if alias.name not in api and alias.name != "fastclip" and not alias.name.startswith("fastclip.bench"):
                    bad.append(f"line {node.lineno}: import {alias.name}")
                if alias.asname:
                    modules[alias.asname] = alias.name
                else:
                    modules["fastclip"] = "fastclip"
    for node in ast.walk(tree):  # module.name where module is a fastclip module bound above
        parts = chain(node) if isinstance(node, ast.Attribute) else None
        if not parts or parts[0] not in modules:
            continue
        module, rest = modules[parts[0]], parts[1:]
        while rest and f"{module}.{rest[0]}" in api:  # fastclip.data.make_shards.convert
            module, rest = f"{module}.{rest[0]}", rest[1:]
        if rest and not allowed(module, rest[0]):
            bad.append(f"line {node.lineno}: {module}.{rest[0]}")
    return sorted(set(bad))


def task_assignments(tree: ast.Module) -> list[str]:
    """Assignments to an attribute of a task: of a name that says task, or of anything made from one
    (loader = task.train_batches(0); loader.x = ...), and setattr on them."""
    tasks = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and "task" in n.id.lower()}
    assigns = [n for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign))]
    grew = True
    while grew:  # names bound to an expression that reads a task
        grew = False
        for node in assigns:
            if node.value is None or not {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)} & tasks:
                continue
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:  # the names bound (x, (a, b)), not the object of an attribute target
                for n in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]):
                    if isinstance(n, ast.Name) and n.id not in tasks:
                        tasks.add(n.id)
                        grew = True

    def of_task(node: ast.AST) -> bool:
        root, attrs = root_name(node)
        return root in tasks or any("task" in a.lower() for a in attrs)

    bad = []
    for node in assigns:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for t in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and of_task(n.value):
                    bad.append(f"line {node.lineno}: {ast.unparse(n)} = ...")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
                and node.args and of_task(node.args[0])):
            bad.append(f"line {node.lineno}: {ast.unparse(node)}")
    return bad


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_each_benchmark_uses_only_the_declared_public_api(path):
    tree = ast.parse(path.read_text())
    bad = import_violations(tree, declared_api()) + task_assignments(tree)
    assert not bad, f"{path.name} reaches past the public API declared in fastclip/bench/__init__.py:\n" + "\n".join(bad)


def test_the_checks_catch_each_kind_of_reach_in():
    """Each rule on a snippet that breaks it (and one that does not)."""
    api = declared_api()
    bad = import_violations(ast.parse(
        "from fastclip.loop.fit import train_epoch\n"          # a module not declared
        "from fastclip.tasks.clip import ClipTask\n"            # ditto (build_task is the entry point)
        "from fastclip.loop import _evaluate, fit\n"            # underscore; fit is fine
        "from fastclip import runtime\n"
        "runtime.seed_everything(0); runtime.rng_state()\n"     # rng_state: not declared
        "import fastclip.train as t\nt._run(1)\n"               # underscore through a module alias
        "from fastclip.bench.common import emit, _child\n"), api)  # the benches' own, but underscore
    assert {b.split(": ", 1)[1] for b in bad} == {
        "from fastclip.loop.fit import train_epoch", "from fastclip.tasks.clip import ClipTask",
        "from fastclip.loop import _evaluate", "fastclip.runtime.rng_state", "fastclip.train._run",
        "from fastclip.bench.common import _child"}
    assert task_assignments(ast.parse(
        "task = build_task(cfg, device)\ntask.evaluate = lambda: {}\n"
        "loader = task.train_batches(0)\nloader.num_batches = 3\n"
        "setattr(task.model, 'x', 1)\nself.task.loss = None\n"
        "model = build_clip(a, b)\nmodel.foo = 1\nself.task = task\n")) == [
        "line 2: task.evaluate = ...", "line 4: loader.num_batches = ...", "line 6: self.task.loss = ...",
        "line 5: setattr(task.model, 'x', 1)"]
