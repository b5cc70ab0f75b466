"""The package's layout: imports only go down (bench -> eval / curate -> embed -> io -> base), and no circle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
# the lower a rank, the deeper the layer; a module may import its own layer's package or any deeper one
RANKS = {"base": 0, "io": 1, "embed": 2, "curate": 3, "eval": 3, "bench": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in RANKS else "base"


def imports_of(path: Path) -> set[str]:
    """Every pipeline module this file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
            for alias in node.names:  # `from pipeline.io import storage` imports the module pipeline.io.storage
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).with_suffix(".py").exists() else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return found


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_folder_is_a_known_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders == set(RANKS) - {"base"}


def test_imports_only_go_down():
    wrong = []
    for module, imported in import_graph().items():
        for target in imported:
            ours, theirs = layer(module), layer(target)
            # same rank, other package (curate <-> eval) is sideways: not allowed either
            if RANKS[theirs] > RANKS[ours] or (RANKS[theirs] == RANKS[ours] and theirs != ours):
                wrong.append(f"{module} ({ours}) imports {target} ({theirs})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = import_graph()
    visiting, done, circles = set(), set(), []

    def visit(module: str, path: list[str]) -> None:
        if module in visiting:
            circles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done or module not in graph:
            return
        visiting.add(module)
        for target in sorted(graph[module]):
            visit(target, path + [module])
        visiting.discard(module)
        done.add(module)

    for module in graph:
        visit(module, [])
    assert not circles, "\n".join(circles)


def test_every_package_says_what_its_modules_hold():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        modules = sorted(p.name for p in init.parent.glob("*.py") if p.name != "__init__.py")
        missing = [m for m in modules if m not in doc]
        assert not missing, f"{init.parent.name}/__init__.py does not list {missing}"
