"""The package's shape, checked from its source: imports go one way (no circle, no lower layer
reaching up), and a path inside a run directory is spelled only in rundir/layout.py (in the
package and in the benchmarks)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "noisystudent"

# who may not import whom (by top-level part of the package)
TOP = {"cli"}
ABOVE_STAGES = {"pipeline", "report", "cli"}
LOWER = {"engine", "labeling", "selection", "data", "models", "rundir", "artifacts", "inputs",
         "fingerprints", "warmstart",
         "checkpoint", "runtime", "store", "augment", "batchaug", "losses", "config", "errors",
         "distributed", "progress", "tarshards", "tb", "robustness"}  # fmt: skip
# what a user runs on a finished run (predict, the Python API, export, evaluate --test-dir):
# built on the lower layers, never reaching into stages or the pipeline
TOOLS = {"classifier", "export", "evaluate_set"}
FORBIDDEN = {
    **{m: {"stages"} | ABOVE_STAGES | TOOLS for m in LOWER},
    "stages": ABOVE_STAGES | TOOLS,
    **{m: {"stages", "pipeline", "report", "cli"} for m in TOOLS},
    "report": {"cli", "pipeline", "stages"},
    "pipeline": {"cli"},
}

# names of files and folders inside a run directory (rundir/layout.py spells them)
RUN_FILES = {"config.yaml", "manifest.json", "metrics.jsonl", "summary.json", "report.html",
             "model.safetensors", "model.json", "eval.json", "checkpoint.pt", "audit.json",
             "selected.safetensors", "counts.json", "results.json", "predictions.safetensors",
             "meta.json"}  # fmt: skip
RUN_FOLDERS = {"pseudo", "select", "robustness", "finetune", "train", "cache", "tensorboard",
               "lock"}  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(["noisystudent", *parts])] = p
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every noisystudent module `name` imports, at module level or inside a function."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = here[: len(here) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return {m for m in found if m in MODULES and m != "noisystudent" and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _part(module: str) -> str:
    return module.split(".")[1]


def test_no_import_circle():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n) :] + [n]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_no_lower_layer_imports_a_higher_one():
    bad = [
        f"{m} imports {n}"
        for m, deps in sorted(GRAPH.items())
        if len(m.split(".")) > 1
        for n in sorted(deps)
        if _part(n) in FORBIDDEN.get(_part(m), set())
    ]
    assert bad == []


def test_the_layers_are_real():
    """The rules above are about modules that exist (a rename would make them vacuous)."""
    parts = {_part(m) for m in MODULES if m != "noisystudent"}
    assert {"stages", "pipeline", "cli", "report"} | LOWER | TOOLS <= parts | {"tb"}
    assert any(_part(n) == "engine" for n in GRAPH["noisystudent.stages.train"])


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _path_literals(source: str, name: str) -> list[str]:
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []

    def fstring_head(node: ast.JoinedStr) -> str:
        head = node.values[0] if node.values else None
        return head.value if isinstance(head, ast.Constant) and isinstance(head.value, str) else ""

    for node in ast.walk(tree):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if node.value in RUN_FILES or node.value.startswith("skipped_"):
                found.append(f"{where} {node.value!r}")
        elif isinstance(node, ast.JoinedStr):
            head = fstring_head(node)
            if head in ("iter", "skipped_") and len(node.values) <= 3:
                tail = node.values[-1]
                rest = tail.value if isinstance(tail, ast.Constant) else ""
                if len(node.values) == 2 or rest.startswith("/") or rest.startswith("."):
                    found.append(f"{where} f-string {head}{{...}}{rest}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and side.value in RUN_FOLDERS:
                    found.append(f"{where} / {side.value!r}")
    return found


def test_run_directory_paths_are_spelled_only_in_the_layout():
    layout = PKG / "rundir" / "layout.py"
    found = [hit for p in sorted(PKG.rglob("*.py")) if p != layout
             for hit in _path_literals(p.read_text(), str(p.relative_to(PKG)))]  # fmt: skip
    assert found == []


def test_benchmarks_ask_the_layout_too():
    """bench/ reads run directories the pipeline wrote: through the same layout."""
    bench = PKG.parents[1] / "bench"
    scripts = sorted(bench.glob("*.py"))
    assert scripts, f"no benchmark scripts under {bench}"
    found = [hit for p in scripts for hit in _path_literals(p.read_text(), f"bench/{p.name}")]
    assert found == []


def test_the_path_check_finds_what_it_looks_for():
    """The check itself: each kind of spelling it forbids is caught, labels are not."""
    probe = ('a = root / "pseudo"\nb = f"iter{i}"\nc = d / "eval.json"\n'
             'e = f"skipped_{w}.txt"\nf = f"iter{i} {model}"\n')  # fmt: skip
    lines = {hit.split()[0] for hit in _path_literals(probe, "probe")}
    assert lines == {"probe:1", "probe:2", "probe:3", "probe:4"}
