"""The package's dataflow as its imports show it: a Ray-free core, one home per backend, Train and Serve apart, the
world reached only through its judge. Read from the source (every import, at module level or inside a function),
except the first test, which imports for real."""

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def import_graph() -> dict[str, set[str]]:
    """gapray module -> the gapray modules it imports (a module importing a package counts as importing it)."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "gapray").rglob("*.py")}
    graph = {m: set() for m in files}
    for m, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != m and not m.startswith(name + "."):
                    graph[m].add(name)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()] - seen:
            seen.add(t)
            todo.append(t)
    return seen


def test_the_core_and_the_local_backend_never_import_ray():
    code = ("import sys, gapray.curriculum, gapray.data.ledger, gapray.data.preference, gapray.data.integrity, "
            "gapray.selfjudge, gapray.backends, gapray.backends.local, gapray.measure, gapray.report, gapray.judges; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert cycles == []


def test_train_and_serve_never_reach_each_other():
    graph = import_graph()
    train = {m for m in graph if m.startswith("gapray.train")}
    serve = {m for m in graph if m.startswith("gapray.serve")}
    assert {m: sorted(reachable(graph, m) & serve) for m in train if reachable(graph, m) & serve} == {}
    assert {m: sorted(reachable(graph, m) & train) for m in serve if reachable(graph, m) & train} == {}


def test_the_world_is_imported_only_by_its_judge():
    """The core, both backends, Serve, Train and the driver see the shapes world only as the injected oracle judge
    (built by gapray.judges.build_judge from config); jobs and tests of the world import it directly."""
    graph = import_graph()
    outside = {m for m, targets in graph.items() if not m.startswith("gapray.world")
               and any(t.startswith("gapray.world") for t in targets)}
    assert outside == {"gapray.judges.oracle"}


def imports_ray(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        if any(n == "ray" or n.startswith("ray.") for n in names):
            return True
    return False


def test_data_and_the_local_backend_never_reach_ray():
    """Not even inside a function: gapray/data/ is the ledger, preference data and schemas; the Ray Data pipeline
    lives with the Ray backend. backend=local reaches no module that imports Ray (swap_weights is in models/)."""
    graph = import_graph()
    path = {m: REPO / (m.replace(".", "/") + ".py") if (REPO / (m.replace(".", "/") + ".py")).exists()
            else REPO / m.replace(".", "/") / "__init__.py" for m in graph}
    with_ray = {m for m in graph if imports_ray(path[m])}
    assert sorted(m for m in with_ray if m.startswith("gapray.data")) == []
    assert sorted((reachable(graph, "gapray.backends.local") | {"gapray.backends.local"}) & with_ray) == []
    assert "gapray.backends.ray" in with_ray
