"""The package's import layers: every import goes down (or sideways within a layer), never up, never in a cycle.

    L0  lrgrad._checks, subspace, dtensor, quant,       validation, shapes/sides, DTensor helpers, reference quantizers,
        step_counts, experts                            fused kernels' step-count tensors, MoE expert-stack views
    L1  lrgrad.kernels                                  one entry point per hot op (torch reference + Triton)
    L2  lrgrad.rules, projectors, groups, qweights,     update rules, subspaces, model helpers
        memory
    L3  lrgrad.optim                                    the generic optimizer + presets + the name registry
    L4  lrgrad.layerwise, accumulation, distributed,    built on optimizers
        estimate, integrations
    L5  lrgrad (the package __init__)                   the public names

Rules and projectors are independent of each other (a rule never knows which projector it runs in).
Lazy (function-level) imports count: they are still dependencies.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"lrgrad": ROOT / "lrgrad", "lrgrad.kernels": ROOT / "kernels"}

LAYERS = [
    ("lrgrad._checks", 0), ("lrgrad.subspace", 0), ("lrgrad.dtensor", 0), ("lrgrad.quant", 0),
    ("lrgrad.step_counts", 0), ("lrgrad.experts", 0),
    ("lrgrad.kernels", 1),
    ("lrgrad.rules", 2), ("lrgrad.projectors", 2), ("lrgrad.groups", 2), ("lrgrad.qweights", 2),
    ("lrgrad.memory", 2),
    ("lrgrad.optim", 3),
    ("lrgrad.layerwise", 4), ("lrgrad.accumulation", 4), ("lrgrad.distributed", 4), ("lrgrad.estimate", 4),
    ("lrgrad.integrations", 4),
]
INDEPENDENT = [("lrgrad.rules", "lrgrad.projectors")]
#: the one direction between the two source folders: kernels/ (installed as lrgrad.kernels, L1) reads these
#: L0 modules of lrgrad/ and nothing else of it - lrgrad.quant is the torch reference its quantization
#: kernels reproduce bit for bit (codes, scales, code maps), _checks the argument checks
KERNELS_READ = frozenset({"lrgrad._checks", "lrgrad.quant", "lrgrad.dtensor", "lrgrad.step_counts"})


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found: dict[str, Path] = {}
    for prefix, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            if ".venv" in path.parts or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "lrgrad" and parts[:1] == ["kernels"]:
                continue
            found[name] = path
    return found


def layer_of(module: str) -> int:
    if module == "lrgrad":
        return 5
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    raise AssertionError(f"{module} has no layer: add it to LAYERS in tests/test_architecture.py")


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (the longest known prefix), or None outside lrgrad."""
    if name != "lrgrad" and not name.startswith("lrgrad."):
        return None
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in known else None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # ``from lrgrad import kernels`` imports the submodule lrgrad.kernels
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, known)
            if target is not None and target != module:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


def test_imports_never_go_up_a_layer():
    upward = []
    for module, targets in graph().items():
        for target in targets:
            # a package __init__ gathering its own submodules is not an upward dependency
            if target.startswith(module + "."):
                continue
            if layer_of(target) > layer_of(module):
                upward.append(f"{module} (L{layer_of(module)}) imports {target} (L{layer_of(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_kernels_read_only_the_declared_l0_modules_of_lrgrad():
    """The folder picture matches the import picture: kernels/ depends on lrgrad/ only through KERNELS_READ
    (CONTRIBUTING's layer table says the same); lrgrad/ reaches kernels/ only as ``lrgrad.kernels``."""
    crossing = {f"{module} -> {target}" for module, targets in graph().items() if module.startswith("lrgrad.kernels")
                for target in targets if not target.startswith("lrgrad.kernels") and target not in KERNELS_READ}
    assert not crossing, "\n".join(sorted(crossing))


def test_rules_and_projectors_are_independent():
    crossing = []
    for module, targets in graph().items():
        for a, b in INDEPENDENT:
            for src, dst in ((a, b), (b, a)):
                if module.startswith(src) and any(t.startswith(dst) for t in targets):
                    crossing.append(f"{module} -> {[t for t in targets if t.startswith(dst)]}")
    assert not crossing, "\n".join(crossing)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle in the module graph (package __init -> own submodule edges excluded), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    # the checks above must be able to fail
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer_of("lrgrad.optim.lowrank") > layer_of("lrgrad.rules.adamw") > layer_of("lrgrad.kernels.projection")
    known = modules()
    src = "from lrgrad.optim.lowrank import LowRankOptimizer\nfrom lrgrad import kernels\n"
    path = tmp_path / "fake.py"
    path.write_text(src)
    assert imports_of("lrgrad.rules.fake", path, known) == {"lrgrad.optim.lowrank", "lrgrad.kernels"}
