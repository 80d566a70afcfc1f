"""The package's shape: imports point down the layers, no module imports one that imports it back.

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import is still a
dependency, and the usual way a circle hides.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "appliance"

# Lowest first: a package may import its own modules and those of the packages before it.
LAYERS = ("common", "storage", "providers", "observe", "accounts", "guardrails", "core", "api", "batches", "server",
          "cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The appliance modules a module imports (a name imported from a package counts as its submodule)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return {dep for dep in found if dep in known and dep != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(path, known) for name, path in known.items()}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_no_module_imports_one_that_imports_it_back() -> None:
    deps = graph()
    circles = []
    for start in deps:  # depth-first from each module: any path back to it is a circle
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, trail = stack.pop()
            for dep in deps[node]:
                if dep == start:
                    circles.append(" -> ".join([*trail, start]))
                elif dep not in seen:
                    seen.add(dep)
                    stack.append((dep, [*trail, dep]))
    assert not circles, "\n".join(sorted(set(circles)))


def test_imports_point_down_the_layers() -> None:
    upward = []
    for name, deps in graph().items():
        own = layer(name)
        for dep in deps:
            theirs = layer(dep)
            if own is None or theirs is None or own == theirs:
                continue
            if LAYERS.index(theirs) > LAYERS.index(own):
                upward.append(f"{name} imports {dep}")
    assert not upward, "\n".join(sorted(upward))


def test_every_module_belongs_to_a_layer() -> None:
    loose = sorted(name for name in modules() if layer(name) is None
                   and name not in ("appliance", "appliance.__main__"))
    assert not loose, loose
    assert {path.name for path in PACKAGE.iterdir() if path.is_dir() and path.name != "__pycache__"} == set(LAYERS)


def test_only_the_server_imports_sanic() -> None:
    offenders = []
    for name, path in modules().items():
        if layer(name) == "server":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {n}" for n in names if n.split(".")[0] in ("sanic", "sanic_routing")]
    assert not offenders, offenders


def test_each_package_says_what_lives_there_and_what_it_may_import() -> None:
    for package in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
        assert doc and "import" in doc.lower(), f"appliance/{package}/__init__.py: say what it may import"


def test_the_readme_map_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Development", 1)[1]
    mapped = set(re.findall(r"^\s*- `appliance/([a-z_]+)/`", section, re.M))
    assert mapped == set(LAYERS), f"README map: {sorted(mapped)}; tree: {sorted(LAYERS)}"
