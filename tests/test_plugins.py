"""The plugin manager: discovery, filters, and broken plugins isolated."""

from __future__ import annotations

import pytest

import modelloop
from modelloop.plugin import API_VERSION
from modelloop.plugins import BUILTIN_PLUGINS, make_plugin_manager
from modelloop.registry import REWARDS, get_registry


def manager_loading(*distributions: str, **environ: str):
    """A manager that sees only the named installed plugins, whatever else is installed."""
    return make_plugin_manager({"MODELLOOP_LOAD_PLUGINS": ",".join(distributions), **environ})


GOOD = """
    import modelloop
    from modelloop.specs import Reward

    @modelloop.hookimpl
    def register_rewards(register):
        register(Reward(name="{name}", score=lambda prompts, completions, **columns: [1.0] * len(completions)))
"""


def test_entry_points_are_found_and_versioned(install_plugin):
    install_plugin("modelloop-plugin-good", GOOD.format(name="good"), version="2.3")
    manager = manager_loading("modelloop-plugin-good")
    info = manager.info["modelloop-plugin-good"]
    assert (info.version, info.builtin) == ("2.3", False)
    assert get_registry(REWARDS, manager).provider("good") == "modelloop-plugin-good"


def test_builtins_load_before_entry_points(install_plugin):
    install_plugin("modelloop-plugin-good", GOOD.format(name="good"))
    names = list(manager_loading("modelloop-plugin-good").info)
    assert names == [f"modelloop.builtin.{module}" for module in BUILTIN_PLUGINS] + ["modelloop-plugin-good"]


def test_load_plugins_selects_and_empty_loads_none(install_plugin):
    install_plugin("modelloop-plugin-a", GOOD.format(name="a"))
    install_plugin("modelloop-plugin-b", GOOD.format(name="b"))
    only_b = manager_loading("modelloop_plugin_B")
    assert [name for name, info in only_b.info.items() if not info.builtin] == ["modelloop-plugin-b"]
    none = manager_loading()
    assert all(info.builtin for info in none.info.values())


def test_block_plugins_blocks(install_plugin):
    install_plugin("modelloop-plugin-a", GOOD.format(name="a"))
    install_plugin("modelloop-plugin-b", GOOD.format(name="b"))
    manager = manager_loading("modelloop-plugin-a", "modelloop-plugin-b", MODELLOOP_BLOCK_PLUGINS="modelloop-plugin-a")
    assert "modelloop-plugin-a" not in manager.info
    assert "modelloop-plugin-b" in manager.info


def test_plugin_failing_to_import_is_reported_once_and_skipped(install_plugin, capsys):
    install_plugin("modelloop-plugin-broken", "raise RuntimeError('missing dependency xyz')", version="0.3")
    install_plugin("modelloop-plugin-good", GOOD.format(name="good"))
    manager = manager_loading("modelloop-plugin-broken", "modelloop-plugin-good")
    assert "modelloop-plugin-broken" not in manager.info
    assert "good" in get_registry(REWARDS, manager)
    (line,) = capsys.readouterr().err.splitlines()
    assert "modelloop-plugin-broken 0.3" in line
    assert "RuntimeError: missing dependency xyz" in line
    assert f"modelloop {modelloop.__version__}" in line


def test_misspelled_hook_is_reported_and_plugin_skipped(install_plugin, capsys):
    install_plugin(
        "modelloop-plugin-typo",
        """
        import modelloop

        @modelloop.hookimpl
        def register_rewardz(register):
            pass
        """,
    )
    install_plugin("modelloop-plugin-good", GOOD.format(name="good"))
    manager = manager_loading("modelloop-plugin-typo", "modelloop-plugin-good")
    assert "modelloop-plugin-typo" not in manager.info
    assert manager.get_plugin("modelloop-plugin-typo") is None
    (line,) = capsys.readouterr().err.splitlines()
    assert "modelloop-plugin-typo" in line and "register_rewardz" in line


def test_plugin_requiring_another_kernel_is_skipped(install_plugin, capsys):
    install_plugin("modelloop-plugin-future", GOOD.format(name="future"), requires="modelloop>=9")
    manager = manager_loading("modelloop-plugin-future")
    assert "modelloop-plugin-future" not in manager.info
    err = capsys.readouterr().err
    assert "it requires modelloop>=9" in err
    assert f"modelloop {modelloop.__version__}" in err


def test_trace_prints_hook_calls(install_plugin, capsys):
    install_plugin("modelloop-plugin-good", GOOD.format(name="good"))
    manager = manager_loading("modelloop-plugin-good", MODELLOOP_TRACE_PLUGINS="1")
    get_registry(REWARDS, manager).get("good")
    manager.hook.on_log(stage="sft", step=1, metrics={"loss": 1.0}, run_dir=".")
    err = capsys.readouterr().err
    assert "modelloop-plugin-good.register_rewards(register=" in err
    assert "on_log -> [" in err


@pytest.mark.parametrize("value", ["", "0"])
def test_trace_is_off_unless_asked(value, install_plugin, capsys):
    install_plugin("modelloop-plugin-good", GOOD.format(name="good"))
    get_registry(REWARDS, manager_loading("modelloop-plugin-good", MODELLOOP_TRACE_PLUGINS=value)).get("good")
    assert capsys.readouterr().err == ""


def test_a_plugin_that_exits_at_import_is_reported_and_skipped(install_plugin, capsys):
    install_plugin("modelloop-plugin-exits", "import sys\nsys.exit('needs a GPU')")
    install_plugin("modelloop-plugin-good", GOOD.format(name="good"))
    manager = manager_loading("modelloop-plugin-exits", "modelloop-plugin-good")
    assert "good" in get_registry(REWARDS, manager) and "modelloop-plugin-exits" not in manager.info
    assert "modelloop-plugin-exits 1.0: not loaded: import failed: SystemExit: needs a GPU" in capsys.readouterr().err


def test_a_plugin_written_for_another_plugin_api_is_reported_and_skipped(install_plugin, capsys):
    install_plugin("modelloop-plugin-future", GOOD.format(name="future") + '    PLUGIN_API = ">=2.0,<3"\n')
    install_plugin("modelloop-plugin-garbled", GOOD.format(name="garbled") + '    PLUGIN_API = "two"\n')
    install_plugin("modelloop-plugin-good", GOOD.format(name="good") + '    PLUGIN_API = ">=1.0,<2"\n')
    manager = manager_loading("modelloop-plugin-future", "modelloop-plugin-garbled", "modelloop-plugin-good")
    assert set(manager.info) & {"modelloop-plugin-future", "modelloop-plugin-garbled", "modelloop-plugin-good"} == {
        "modelloop-plugin-good"
    }
    err = capsys.readouterr().err
    assert (
        f"modelloop-plugin-future 1.0: not loaded: it is written for plugin API >=2.0,<3, and this modelloop has {API_VERSION}"
        in err
    )
    assert (
        "modelloop-plugin-garbled 1.0: not loaded: its PLUGIN_API 'two' is not a version range like '>=1.0,<2'" in err
    )


def test_names_in_the_plugin_settings_that_nothing_is_called_are_reported(install_plugin, capsys):
    install_plugin("modelloop-plugin-good", GOOD.format(name="good"))
    manager_loading(
        "modelloop-plugin-good", "modelloop-plugin-godo", MODELLOOP_BLOCK_PLUGINS="templates,modelloop-plugin-bda"
    )
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "modelloop: MODELLOOP_LOAD_PLUGINS names modelloop-plugin-godo, which no installed plugin is called",
        "modelloop: MODELLOOP_BLOCK_PLUGINS names modelloop-plugin-bda, which no installed plugin is called",
    ]
