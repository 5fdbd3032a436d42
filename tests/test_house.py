"""The house rules of the package fastclip/, checked by reading its source (ast and text only: no
torch, no import of the package), so this module runs in well under a second:

- no import cycle between its modules, deferred (function-level) imports included;
- no module over MAX_LINES lines;
- no untyped `info` dict read (`info[`, `info.get(`) and no probing of a task for what it can do
  (`hasattr(task`, `getattr(task`): tasks follow fastclip/tasks/protocol.py, outputs are typed.

Each failure names the modules (and lines) that break the rule."""
import ast
import re
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "fastclip"
PACKAGE = PACKAGE_DIR.name
MAX_LINES = 400
UNTYPED = "an untyped info dict read: give the value a typed home (a dataclass field)"
PROBING = "a task probed for what it can do: ask only what tasks/protocol.py declares (a Task's methods)"
FORBIDDEN = {"info[": UNTYPED, "info.get(": UNTYPED, "hasattr(task": PROBING, "getattr(task": PROBING}  # text -> why


def package_sources() -> dict[str, Path]:
    """Dotted module name -> file, for every fastclip/**/*.py (a package is its __init__.py)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom in the tree, at any depth (functions, methods, try blocks), except
    those under `if TYPE_CHECKING:`, which never run."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = [c for c in children if c not in node.body]
        stack.extend(children)


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module of the package it imports: the line of (one) such import}.

    `import fastclip.a.b` and `from fastclip.a.b import f` are edges to fastclip.a.b; `from
    fastclip.a import b` is an edge to fastclip.a and, when b is a submodule, to fastclip.a.b too.
    Relative imports are resolved against the importing module's package.

    Edges to the top package `fastclip` itself (fastclip/__init__.py) are left out, and for it only:
    it defines PROJECT_ROOT / CONF_DIR and a config resolver at import, and imports nothing of the
    package then; its one project import, fastclip.inference, is deferred inside the module
    __getattr__ that serves `fastclip.load`, run only when something asks for fastclip.load. Every
    `from fastclip import runtime` names the package; kept, those edges would put every module that
    fastclip.inference reaches (most of the package) in a "cycle" closed by an import that no
    import of theirs ever runs.
    Edges to a subpackage (fastclip.loop, fastclip.data, ...) count: their __init__ runs its imports."""
    sources = package_sources()
    graph: dict[str, dict[str, int]] = {}
    for module, path in sources.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in _imports(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [source] + [f"{source}.{alias.name}" for alias in node.names]
            for target in targets:
                if target in sources and target not in (PACKAGE, module):
                    edges.setdefault(target, node.lineno)
        graph[module] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module (the import cycles)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def a_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, inside the component: [m0, m1, ..., m0]."""
    start, members = component[0], set(component)
    previous, frontier = {start: None}, [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in previous:
                    previous[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{component}: not strongly connected")


def describe(graph, cycle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(steps + [cycle[-1]])


def test_no_import_cycle_between_modules_of_the_package():
    graph = import_graph()
    # the graph sees every module, a subpackage's imports and deferred (function-level) imports
    assert len(graph) > 50 and "fastclip.loop.fit" in graph["fastclip.loop"] and "fastclip.inference" in graph[PACKAGE]
    components = strongly_connected(graph)
    report = [f"  {len(c)} modules in a cycle: {', '.join(c)}\n    e.g. {describe(graph, a_cycle(graph, c))}\n"
              + ("".join(f"    {a} -> {b} (line {graph[a][b]})\n" for a in c for b in sorted(graph[a]) if b in c)
                 if len(c) <= 8 else "")  # a small cycle's every edge; a large one's example is enough to start
              for c in components]
    assert not components, ("import cycles in fastclip/ (deferred imports count; line = the importing line; "
                            "break each by moving what both sides need to a lower module):\n" + "".join(report))


def test_no_module_over_the_line_limit():
    lengths = {module: len(path.read_text().splitlines()) for module, path in package_sources().items()}
    over = sorted(((n, m) for m, n in lengths.items() if n > MAX_LINES), reverse=True)
    assert not over, (f"modules over {MAX_LINES} lines (split each by concern): "
                      + ", ".join(f"{package_sources()[m].relative_to(PACKAGE_DIR.parent)} ({n} lines)"
                                  for n, m in over))


def test_no_untyped_info_reads_and_no_task_probing():
    found = []
    for path in package_sources().values():
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            for text, why in FORBIDDEN.items():
                if text in line:
                    found.append(f"  {path.relative_to(PACKAGE_DIR.parent)}:{lineno}: {line.strip()}\n"
                                 f"    ({text!r}: {why})")
    assert not found, "house rule broken in fastclip/:\n" + "\n".join(found)


# a raise whose message starts with a config key (`dataset.path=...`), a CLI flag or the {what}/{key}
# a caller names: the user's input, so an InputError (fastclip.errors), which the entrypoints print
# as one line; a ValueError or FileNotFoundError there printed Hydra's "Error executing job" and a
# stack trace. An invariant of fastclip's own is a RuntimeError or an assertion (it keeps its trace).
NAMES_AN_INPUT = re.compile(r"raise (ValueError|FileNotFoundError|KeyError)\(f?[\"'](\{?(what|key)\}?|"
                            r"(task|dataset|encoder|boundary|compression|trainer|eval|tracking)\.[a-z_]+|--)")


def test_an_error_that_names_the_users_input_is_an_input_error():
    found = [f"  {path.relative_to(PACKAGE_DIR.parent)}:{lineno}: {line.strip()}"
             for path in package_sources().values()
             for lineno, line in enumerate(path.read_text().splitlines(), 1) if NAMES_AN_INPUT.search(line)]
    assert not found, "raise InputError (or InputNotFound) for the user's input:\n" + "\n".join(found)
