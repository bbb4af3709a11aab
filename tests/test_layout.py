"""The house: every import among kvcodec's own modules (at module level or inside functions)
runs down the layers below, never up, and there are no import cycles.

    tools -> api -> encoding -> container + registry -> codecs -> entropy -> core
    storage, eval, testing: above api; integrations: above storage;  kernels: beside codecs (codecs, entropy, core only)
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
PACKAGES = {"kvcodec": ROOT / "kvcodec", "kvcodec.kernels": ROOT / "kernels", "kvcodec.tools": ROOT / "tools"}
CORE = {"kvcodec.errors", "kvcodec.dtypes", "kvcodec.options", "kvcodec.cache", "kvcodec.files", "kvcodec.uploads",
        "kvcodec.constants", "kvcodec.artifacts"}

# room -> the rooms its modules may import (core is open to everyone)
BELOW = {
    "core": set(),
    "entropy": set(),
    "transform": set(),
    "codecs": {"entropy", "transform"},
    "kernels": {"codecs", "entropy", "transform"},
    "registry": {"codecs"},
    "selection": {"registry"},
    "container": {"codecs", "registry"},
    "encoding": {"container", "registry", "codecs", "selection"},
    "api": {"encoding", "container", "codecs"},
    "cachefiles": {"container"},
    "storage": {"api", "encoding", "container", "registry", "codecs"},
    "integrations": {"api", "encoding", "container", "registry", "codecs", "storage"},
    "eval": {"api", "encoding", "container", "registry", "codecs", "selection", "cachefiles"},
    "testing": {"api", "container", "codecs"},
    "calibration": {"api", "codecs", "transform", "eval"},
    "tools": {"api", "encoding", "container", "registry", "codecs", "selection", "cachefiles", "storage", "eval",
              "kernels", "calibration", "transform"},
}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def room(module: str) -> str:
    """`kvcodec.container.reader` -> container; the core modules -> core."""
    return "core" if module in CORE else module.split(".")[1]


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {n for n in names if n in known}
    return out - {module}


def graph():
    mods = modules()
    inits = {m for m, p in mods.items() if p.name == "__init__.py"}  # they register and re-export
    return {m: imports(m, p, set(mods)) - inits for m, p in mods.items() if m not in inits}


def test_imports_run_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        mine = room(module)
        for target in targets:
            theirs = room(target)
            if theirs != mine and theirs != "core" and theirs not in BELOW[mine]:
                wrong.append(f"{module} ({mine}) imports {target} ({theirs})")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_module_has_a_room():
    assert {room(m) for m in graph()} <= set(BELOW)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in edges:
        if node not in state:
            visit(node, [node])
