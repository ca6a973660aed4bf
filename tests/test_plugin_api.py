"""The plugin API (``modelloop.plugin``) is all a shipped plugin imports from the kernel, and a
plugin imports another plugin only through a dependency it declares."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

import modelloop.plugin
from conftest import REPO

PLUGINS = sorted(path.parent for path in REPO.glob("plugins/*/pyproject.toml"))


def project(folder: Path) -> dict:
    return tomllib.loads((folder / "pyproject.toml").read_text())


def modules_of(folder: Path) -> set[str]:
    return set(project(folder)["tool"]["setuptools"]["py-modules"])


def distribution_name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]


def kernel_imports(source: str) -> list[tuple[int, str]]:
    """Every import of the kernel (``modelloop`` or ``modelloop.X``), and of any plugin module."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return [
        (line, name) for line, name in found if name == "modelloop" or name.startswith(("modelloop.", "modelloop_"))
    ]


@pytest.mark.parametrize("folder", PLUGINS, ids=lambda folder: folder.name)
def test_a_shipped_plugin_imports_the_kernel_only_through_the_plugin_api(folder):
    by_distribution = {project(other)["project"]["name"]: modules_of(other) for other in PLUGINS}
    allowed = {"modelloop.plugin", *modules_of(folder)}
    for requirement in project(folder)["project"]["dependencies"]:
        allowed |= by_distribution.get(
            distribution_name(requirement), set()
        )  # a plugin it depends on: its public names
    wrong = [
        f"{path.relative_to(REPO)}:{line}: {name}"
        for path in sorted(folder.glob("*.py"))
        for line, name in kernel_imports(path.read_text())
        if name not in allowed
    ]
    assert wrong == [], "import from modelloop.plugin (or a plugin declared as a dependency) instead:\n" + "\n".join(
        wrong
    )


def test_every_public_name_resolves_and_nothing_else_does():
    for name in modelloop.plugin.__all__:
        assert getattr(modelloop.plugin, name) is not None
    with pytest.raises(AttributeError, match="the plugin API names"):
        modelloop.plugin.load_model  # noqa: B018  # the kernel's, not the API's


@pytest.mark.parametrize("folder", PLUGINS, ids=lambda folder: folder.name)
def test_a_shipped_plugin_declares_the_plugin_api_it_is_written_against(folder):
    from packaging.specifiers import SpecifierSet

    entry = next(iter(project(folder)["project"]["entry-points"]["modelloop"].values()))
    declared = re.search(r'^PLUGIN_API = "([^"]+)"', (folder / f"{entry}.py").read_text(), flags=re.M)
    assert declared, f"{entry}.py declares no PLUGIN_API"
    assert SpecifierSet(declared.group(1)).contains(modelloop.plugin.API_VERSION)
