"""The kernel's import graph is layered (docs/architecture.md, "The import graph"): no
cycles, no module imports the package facade, the parts below the stages import no stage,
and ``data/`` loads no model.

Every import counts, those inside functions too: a lazy import keeps ``modelloop --help``
light, and still says which module the importer is built on.
"""

from __future__ import annotations

import ast

from conftest import REPO

KERNEL = REPO / "kernel"

#: The stages layer and what sits above it: the only modules that may import a stage.
STAGE_IMPORTERS = (
    "modelloop.stages",
    "modelloop.recipes",
    "modelloop.export",
    "modelloop.inference.server",
    "modelloop.commands",
    "modelloop.cli",
    "modelloop.testing",  # the plugin test kit runs stages as a plugin's user does
)


def module_name(path) -> str:
    parts = path.relative_to(KERNEL).with_suffix("").parts
    return ".".join(("modelloop", *(parts[:-1] if parts[-1] == "__init__" else parts)))


MODULES = {module_name(path): path for path in KERNEL.rglob("*.py")}


def imported(path) -> set[str]:
    """The kernel modules a module imports; ``from modelloop.x import name`` imports
    ``modelloop.x.name`` where that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = (f"{node.module}.{alias.name}" for alias in node.names)
            found |= {name if name in MODULES else node.module for name in names}
    return found & MODULES.keys()


GRAPH = {name: imported(path) - {name} for name, path in MODULES.items()}


def within(module: str, *packages: str) -> bool:
    return any(module == package or module.startswith(package + ".") for package in packages)


def below_the_stages(module: str) -> bool:
    return module != "modelloop" and not within(module, *STAGE_IMPORTERS)  # the package facade is above them all


def edges(importers, imports) -> list[str]:
    return sorted(f"{a} -> {b}" for a in GRAPH for b in GRAPH[a] if importers(a) and imports(b))


def cycles() -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(module: str) -> None:
        order[module] = low[module] = len(order)
        stack.append(module)
        for other in GRAPH[module]:
            if other not in order:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], order[other])
        if low[module] == order[module]:
            component = stack[stack.index(module) :]
            del stack[stack.index(module) :]
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in order:
            visit(module)
    return found


def test_no_import_cycle_among_kernel_modules():
    shown = []
    for loop in cycles():
        inside = edges(loop.__contains__, loop.__contains__)
        shown.append(", ".join(loop) + ", through:\n    " + "\n    ".join(inside))
    assert not shown, (
        "modules import one another round a loop; cut one of these imports by moving what it takes into a module "
        "below both ends:\n" + "\n".join(shown)
    )


def test_no_kernel_module_imports_the_package_facade():
    wrong = edges(lambda a: True, lambda b: b == "modelloop")
    assert not wrong, (
        "modelloop/__init__.py is the facade for Python callers and imports the stages; "
        "import the module that defines the name:\n" + "\n".join(wrong)
    )


def test_only_the_stages_and_what_is_above_them_import_a_stage():
    wrong = edges(below_the_stages, lambda b: within(b, "modelloop.stages"))
    assert not wrong, (
        "a part (data, models, parallel, training, ...) imports a stage; "
        "move what it needs out of stages/ into a part:\n" + "\n".join(wrong)
    )


def test_data_loads_no_model():
    wrong = edges(lambda a: within(a, "modelloop.data"), lambda b: within(b, "modelloop.models"))
    assert not wrong, (
        "data/ works with the tokenizer and image handling it is given; "
        "load them in models/ and pass them in:\n" + "\n".join(wrong)
    )
