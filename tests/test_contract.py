"""The contract stays documented, tested and cheap to load — checked by construction."""

from __future__ import annotations

import ast
import inspect
import re
import subprocess
import sys

from conftest import REPO
from modelloop import hooks
from modelloop.hooks import HOOK_NAMES

HEAVY = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "numpy", "bitsandbytes")


def spec_signature(name: str) -> str:
    return ", ".join(inspect.signature(getattr(hooks, name)).parameters)


def test_every_hook_is_documented_with_its_signature():
    text = (REPO / "docs" / "plugins.md").read_text()
    documented = dict(re.findall(r"^### `(\w+)\(([^)]*)\)`$", text, flags=re.MULTILINE))
    assert sorted(documented) == list(HOOK_NAMES)
    for name in HOOK_NAMES:
        assert documented[name] == spec_signature(name), f"docs/plugins.md: {name} signature differs from hooks.py"


def test_every_hook_has_a_test():
    test_names = set()
    for path in [*REPO.glob("tests/**/test_*.py"), *REPO.glob("plugins/*/tests/**/test_*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_hook_"):
                test_names.add(node.name)
    untested = [name for name in HOOK_NAMES if not any(t.startswith(f"test_hook_{name}") for t in test_names)]
    assert untested == []


def test_every_hook_has_a_docstring_saying_when_it_is_called():
    for name in HOOK_NAMES:
        doc = inspect.getdoc(getattr(hooks, name)) or ""
        assert "Called" in doc and ":param" in doc, name


def imported_modules(code: str, env: dict[str, str]) -> set[str]:
    """Run ``code`` in a fresh interpreter and return the top-level modules it imported."""
    probe = f"""
import atexit, sys
atexit.register(lambda: print(",".join(sorted({{m.split(".")[0] for m in sys.modules}})), file=sys.stderr))
{code}
"""
    completed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return set(completed.stderr.strip().splitlines()[-1].split(","))


def test_plugins_command_imports_nothing_heavy(subprocess_env):
    # Every plugin of this repository is loaded (the hermetic env names them all).
    modules = imported_modules("from modelloop.cli import main; main(['plugins', '--all'])", subprocess_env)
    assert "modelloop" in modules
    assert modules.isdisjoint(HEAVY), modules & set(HEAVY)


def test_help_imports_nothing_heavy(subprocess_env):
    modules = imported_modules("from modelloop.cli import main; main(['--help'])", subprocess_env)
    assert "click" in modules
    assert modules.isdisjoint(HEAVY), modules & set(HEAVY)
