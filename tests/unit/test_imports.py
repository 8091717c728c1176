"""Import layering: no module of alignkit imports a higher layer, and no import cycle exists.

The graph is read from the source with `ast`, not by importing anything, and it counts imports
inside functions as well as at module level: a lazy import still ties the importer to what it
imports, and "half the imports sit inside functions" is how the old cycles hid. The failure
message names each offending import as file:line.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import assert_only_allowed

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "alignkit"

# The layers, bottom up. A module may import its own layer and any layer below it; the most
# specific prefix decides a module's layer. See docs/architecture.md.
LAYERS: dict[str, int] = {
    # 0 foundations: user errors, typed configs, atomic folder writes, the toy task world (stdlib
    #   only) and its tokenizer, which rewards and tests use as plain data
    "alignkit.errors": 0,
    "alignkit.config": 0,
    "alignkit.io": 0,
    "alignkit.toy.world": 0,
    "alignkit.toy.tokenizer": 0,
    # 1 maths: pure functions on tensors
    "alignkit.ops": 1,
    "alignkit.losses": 1,
    "alignkit.advantages": 1,
    # 2 components: rows and batches, models and adapters (with how each rank loads them),
    #   sampling
    "alignkit.data": 2,
    "alignkit.models": 2,
    "alignkit.rollout": 2,
    # 3 the training machinery: the trainer, checkpoints, process groups, FSDP, logging
    "alignkit.training": 3,
    # 4 judging: reward sources, evaluation
    "alignkit.rewards": 4,
    "alignkit.eval": 4,
    # 5 recipes: one file per method
    "alignkit.recipes": 5,
    # 6 applications: the CLI, the demo, and the toy base model, which is built by running the
    #   SFT recipe (so it sits above recipes), with the toy package's entry points
    "alignkit.cli": 6,
    "alignkit.__main__": 6,
    "alignkit.demo": 6,
    "alignkit.toy": 6,
    # the package root only maps names lazily (PEP 562) for `from alignkit import train_sft`
    "alignkit": 6,
}

# Known violations that another branch removes (the one training loop of issue 13: the critic
# trains through a second Trainer, so models/value.py stops importing training.trainer).
# Key: (importer, imported). Empty the list once that branch is merged; an entry that no longer
# matches anything fails the test, so the list cannot go stale.
ALLOWED: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(mod: str) -> int:
    best = max((k for k in LAYERS if mod == k or mod.startswith(k + ".")), key=len, default=None)
    assert best is not None, f"{mod}: not in LAYERS; give it a layer in tests/unit/test_imports.py"
    return LAYERS[best]


def resolve(mod: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The alignkit modules an import statement of module `mod` loads (empty for other packages)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return [n for n in names if n == "alignkit" or n.startswith("alignkit.")]
    if node.level:
        is_pkg = MODULES[mod].name == "__init__.py"
        base = mod.split(".")
        base = base[: len(base) - node.level + (1 if is_pkg else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if not (target == "alignkit" or target.startswith("alignkit.")):
        return []
    # `from pkg import name`: the module pkg.name when it is one, else a name defined in pkg.
    out = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES else target for a in node.names]
    return list(dict.fromkeys(out))


def module_edges(mod: str, source: str) -> list[tuple[str, int]]:
    """[(imported alignkit module, line)] for every import statement of `source`, at any depth."""
    edges = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            edges += [(target, node.lineno) for target in resolve(mod, node) if target != mod]
    return sorted(edges, key=lambda e: e[1])


def import_graph() -> dict[str, list[tuple[str, int]]]:
    """importer -> [(imported module, line)] over every module of src/alignkit."""
    return {mod: module_edges(mod, path.read_text(encoding="utf-8")) for mod, path in MODULES.items()}


def upward_imports(graph: dict[str, list[tuple[str, int]]]) -> list[tuple[str, str, int]]:
    """(importer, imported, line) for each import of a higher layer."""
    return [(mod, target, line) for mod, edges in graph.items() for target, line in edges
            if target in MODULES and layer_of(target) > layer_of(mod)]


def where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(SRC.parent)}:{line}"


def find_cycles(graph: dict[str, list[tuple[str, int]]]) -> list[list[tuple[str, int]]]:
    """One cycle per strongly connected component (Tarjan), as [(module, line of its import of
    the next module)]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w, _ in graph.get(v, []):
            if w not in graph:
                continue
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
                comps.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:
        inside = set(comp)
        start = min(comp)
        # walk inside the component back to the start: breadth-first for the shortest cycle
        prev: dict[str, tuple[str, int]] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w, line in graph[v]:
                    if w == start:
                        found = (v, line)
                        break
                    if w in inside and w not in prev:
                        prev[w] = (v, line)
                        nxt.append(w)
                if found:
                    break
            frontier = nxt
        path = [found]
        v = found[0]
        while v != start:
            path.append(prev[v])
            v = prev[v][0]
        cycles.append(path[::-1])
    return cycles


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if not any(m == k or m.startswith(k + ".") for k in LAYERS)]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_no_upward_imports():
    found = [((mod, target), f"{where(mod, line)}: {mod} (layer {layer_of(mod)}) imports {target} "
                             f"(layer {layer_of(target)})")
             for mod, target, line in upward_imports(import_graph())]
    assert_only_allowed(found, ALLOWED, "imports from a lower layer to a higher one")


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    msgs = []
    for cyc in cycles:
        hops = [f"{where(m, line)} imports {cyc[(i + 1) % len(cyc)][0]}" for i, (m, line) in enumerate(cyc)]
        msgs.append("cycle:\n  " + "\n  ".join(hops))
    assert not cycles, "\n".join(msgs)


def test_the_checker_sees_function_level_imports_and_cycles():
    """The checker itself: an import inside a function is an edge at its own line, `from pkg
    import module` resolves to the module, an upward import is reported, and a two-module cycle
    is reported with both lines."""
    src = ("import torch\n\nfrom alignkit.toy import world\n\n\ndef f():\n"
           "    from alignkit.recipes.sft import train_sft\n    return train_sft\n")
    edges = module_edges("alignkit.models.peft", src)
    assert edges == [("alignkit.toy.world", 3), ("alignkit.recipes.sft", 7)]
    assert upward_imports({"alignkit.models.peft": edges}) == [("alignkit.models.peft", "alignkit.recipes.sft", 7)]
    graph = {
        "alignkit.models.load": [("alignkit.models.peft", 52)],
        "alignkit.models.peft": [("alignkit.training.fsdp", 82)],
        "alignkit.training.fsdp": [("alignkit.models.load", 80)],
        "alignkit.losses": [],
    }
    assert find_cycles(graph) == [[("alignkit.models.load", 52), ("alignkit.models.peft", 82),
                                   ("alignkit.training.fsdp", 80)]]
    assert find_cycles({"alignkit.losses": [], "alignkit.ops": [("alignkit.losses", 3)]}) == []
    assert layer_of("alignkit.toy.world") == 0 and layer_of("alignkit.toy.model") == 6
    assert layer_of("alignkit.recipes.sft") > layer_of("alignkit.eval.run") > layer_of("alignkit.models.peft")
