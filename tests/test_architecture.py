"""The library's shape, read from its own source with `ast`: the wings of ARCHITECTURE.md, in their order.

A module may import its own wing and the wings below it, never one above, and no chain of imports may come
back to where it started. Every import counts, at module level or inside a function: an import moved into a
function still ties the two modules together, it only hides the tie until the function runs. The callers
(service/, pipelines/, ui/) may import the library and themselves; the library never imports them. No
module of the library or its callers grows past MAX_LINES.
"""

from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CALLERS = ("service", "pipelines", "ui")
MAX_LINES = 400

# Bottom first. Each entry: a wing and the module prefixes it holds (a prefix holds its submodules).
WINGS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("cxrlt", "cxrlt.labels", "cxrlt.label_sets", "cxrlt.views", "cxrlt.config", "cxrlt.losses",
              "cxrlt.provenance")),
    ("data", ("cxrlt.data",)),
    ("models", ("cxrlt.models",)),
    ("artefact", ("cxrlt.artefact",)),
    ("evaluation", ("cxrlt.evaluation",)),
    ("gate", ("cxrlt.gate",)),
    ("registry", ("cxrlt.registry",)),
    ("monitoring", ("cxrlt.monitoring",)),
    ("engine", ("cxrlt.engine",)),
    ("inference", ("cxrlt.inference", "cxrlt.explain", "cxrlt.client")),
    ("cli", ("cxrlt.cli", "cxrlt.__main__")),
)


@dataclass(frozen=True)
class Edge:
    src: str       # importing module
    dst: str       # imported module
    line: int


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if parts[0] == "ui":       # Streamlit runs the app with ui/ and ui/views/ on the path: `import client`
        return "ui." + parts[-1]
    return ".".join(parts)


def find_modules(root: Path) -> dict[str, Path]:
    mods = {}
    for top in ("cxrlt", *CALLERS):
        for p in sorted((root / top).rglob("*.py")):
            mods[module_name(p, root)] = p
    return mods


def _target(name: str, mods: dict[str, Path]) -> str | None:
    """`name` itself when it is a module of ours, else the longest module it lies in (a.b.attr -> a.b)."""
    while name:
        if name in mods:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, mods: dict[str, Path]) -> list[Edge]:
    """Every import of our modules anywhere in the file (module level, functions, TYPE_CHECKING blocks)."""
    is_pkg = path.name == "__init__.py"
    package = mod.split(".") if is_pkg else mod.split(".")[:-1]
    edges = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the module pkg.sub; `from mod import name` imports mod
            names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
        else:
            continue
        for name in names:
            if mod.startswith("ui.") and not name.startswith(("cxrlt", "ui.")):
                name = f"ui.{name}"
            dst = _target(name, mods)
            if dst is not None and dst != mod:
                edges.append(Edge(mod, dst, node.lineno))
    return list(dict.fromkeys(edges))  # `from m import a, b` is one tie


def wing_of(mod: str) -> tuple[int, str]:
    """(rank, wing) of a library module; callers rank above every wing."""
    best = None
    for rank, (wing, prefixes) in enumerate(WINGS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and (best is None or len(p) > best[2]):
                best = (rank, wing, len(p))
    if best is not None and not (best[1] == "core" and mod != "cxrlt" and best[2] == len("cxrlt")):
        return best[0], best[1]
    top = mod.split(".")[0]
    if top in CALLERS:
        return len(WINGS), top
    raise LookupError(f"{mod} belongs to no wing: add it to WINGS here and to ARCHITECTURE.md")


def layer_violations(edges: list[Edge], mods: dict[str, Path], root: Path) -> list[str]:
    out = []
    for e in edges:
        (rs, ws), (rd, wd) = wing_of(e.src), wing_of(e.dst)
        upward = rd > rs or (rd == rs == len(WINGS) and ws != wd)  # a caller importing another caller
        if upward:
            out.append(f"{mods[e.src].relative_to(root)}:{e.line} ({ws}) imports "
                       f"{mods[e.dst].relative_to(root)} ({wd}), a wing above it")
    return out


def cycles(edges: list[Edge], mods: dict[str, Path], root: Path) -> list[str]:
    """One description per strongly connected component of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for e in edges:
        graph[e.src].add(e.dst)
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    described = []
    for comp in comps:
        inside = [e for e in edges if e.src in comp and e.dst in comp]
        described.append("import cycle: " + "; ".join(
            f"{mods[e.src].relative_to(root)}:{e.line} -> {mods[e.dst].relative_to(root)}" for e in inside))
    return described


def check_tree(root: Path) -> list[str]:
    mods = find_modules(root)
    edges = [e for m, p in mods.items() for e in imports_of(m, p, mods)]
    return layer_violations(edges, mods, root) + cycles(edges, mods, root)


def test_no_upward_import_and_no_cycle():
    problems = check_tree(ROOT)
    assert not problems, "\n".join(problems)


def test_every_library_module_has_a_wing():
    for mod in find_modules(ROOT):
        wing_of(mod)  # raises, naming the module


def test_wings_are_written_down_in_order():
    """ARCHITECTURE.md names the wings bottom first in a line `wings: core < data < ...`, as this test holds them."""
    text = (ROOT / "ARCHITECTURE.md").read_text()
    line = next((x for x in text.splitlines() if x.strip().startswith("wings:")), "")
    assert [w.strip(" `") for w in line.split(":", 1)[-1].split("<")] == [w for w, _ in WINGS], line


def test_no_module_over_the_size_limit():
    big = {str(p.relative_to(ROOT)): n for p in find_modules(ROOT).values()
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"split these by responsibility (over {MAX_LINES} lines): {big}"


@pytest.mark.parametrize("planted, target, expect", [
    # the registry sits above evaluation: metrics may never reach up to it
    ("from cxrlt.registry import store\n", "cxrlt/evaluation/metrics.py", "cxrlt/registry/store.py (registry)"),
    # a circle inside one wing: manifest_io is what manifest builds on
    ("from cxrlt.data.manifest import load_manifest\n", "cxrlt/data/manifest_io.py", "import cycle"),
    # hidden in a function, still a tie
    ("def _f():\n    from cxrlt.engine import train\n", "cxrlt/gate/rules.py", "cxrlt/engine/__init__.py (engine)"),
    # the library never imports its callers
    ("import service.api\n", "cxrlt/inference.py", "service/api.py (service)"),
])
def test_the_check_fails_on_a_planted_import(tmp_path, planted, target, expect):
    for top in ("cxrlt", *CALLERS):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    assert check_tree(tmp_path) == []
    f = tmp_path / target
    f.write_text(f.read_text() + "\n" + planted)
    problems = check_tree(tmp_path)
    assert problems and any(expect in p and target in p for p in problems), problems
