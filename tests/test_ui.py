"""``modelloop ui`` in a real browser: Debian's headless Chromium, driven through its
chromedriver, against the UI started as a user starts it. Each page is saved as a
screenshot under ``test-output/ui/``.

The flow a newcomer follows: a bad form says what is wrong beside the field, the checks
show the data and the plan, a LoRA SFT launched from the form finishes with its loss
plot, the playground chats with it beside its base, and a run stopped from its page
stays resumable.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from modelloop.parallel.world import free_port

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = Path(__file__).resolve().parent.parent / "test-output" / "ui"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (make test installs them)",
)


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_models):
    """A runs home with sums to learn from, and the tiny model to start from."""
    root = tmp_path_factory.mktemp("ui-home")
    chats = [
        {"messages": [{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": str(a + b)}]}
        for a in range(10)
        for b in range(10)
    ]
    (root / "sums.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))
    return {"root": root, "data": root / "sums.jsonl", "model": tiny_models("qwen2")}


@pytest.fixture(scope="module")
def ui(home, subprocess_env):
    """``modelloop ui`` on a free port, its runs under the home; stopped after the module."""
    port = free_port()
    env = {**subprocess_env, "MODELLOOP_HOME": str(home["root"])}
    process = subprocess.Popen(
        [sys.executable, "-m", "modelloop", "ui", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/plugins", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"modelloop ui did not answer: {process.stdout.read() if process.stdout else ''}")
    yield url
    process.terminate()
    process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-background-networking",  # this machine's network is closed: no calls home
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def wait_for(condition, timeout=60.0, what="the page"):
    """``condition()`` once it holds; a page that reloads meanwhile (a run's page does as
    its status changes) is read again. chromedriver reports an element read while the page
    was being replaced either as stale or as a node that "does not belong to the document"."""
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
        WebDriverException,
    )

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = condition()
        except (NoSuchElementException, StaleElementReferenceException):
            found = None
        except WebDriverException as error:
            if "does not belong to the document" not in str(error):
                raise
            found = None
        if found:
            return found
        time.sleep(0.25)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


def shot(browser, name):
    browser.save_screenshot(str(SHOTS / f"{name}.png"))


def fill(browser, values):
    from selenium.webdriver.common.by import By

    form = browser.find_element(By.ID, "launch")
    browser.execute_script("document.querySelectorAll('details').forEach((more) => { more.open = true; })")
    for name, value in values.items():
        field = form.find_element(By.NAME, name)
        if field.tag_name == "select":
            from selenium.webdriver.support.select import Select

            Select(field).select_by_visible_text(value)
        else:
            field.clear()
            field.send_keys(value)


def error_beside(browser, field):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, f'[data-error="{field}"]').text


def launch(browser, ui, home, **extra):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui}/launch?stage=sft")
    values = {
        "model": str(home["model"]),
        "data": str(home["data"]),
        "tuner": "lora",
        "lr": "0.002",
        "max_steps": "30",
        "batch_size": "16",
        "max_length": "64",
        **extra,
    }
    fill(browser, values)
    browser.find_element(By.ID, "start").click()
    wait_for(lambda: "/run?id=" in browser.current_url, 60, "the run's page")
    return browser.current_url.split("id=", 1)[1]


def test_the_form_says_what_is_wrong_beside_the_field(ui, home, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui}/launch?stage=sft")
    fill(browser, {"model": str(home["model"]), "data": str(home["root"] / "missing.jsonl"), "lr": "fast"})
    browser.find_element(By.ID, "check").click()
    wait_for(lambda: error_beside(browser, "data"), 30, "the data field's error")
    assert error_beside(browser, "data") == f"no such file: {home['root'] / 'missing.jsonl'}"
    assert error_beside(browser, "lr") == "not a number: 'fast'"
    assert error_beside(browser, "model") == ""
    assert "Traceback" not in browser.page_source
    shot(browser, "launch-errors")
    fill(browser, {"data": str(home["data"]), "lr": "0.001", "batch_size": "-2"})
    browser.find_element(By.ID, "check").click()
    wait_for(lambda: error_beside(browser, "batch_size"), 30, "the batch size's error")
    assert error_beside(browser, "batch_size") == "Input should be greater than 0"
    assert error_beside(browser, "data") == ""


def test_checks_show_the_data_the_trained_tokens_and_the_memory_plan(ui, home, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui}/launch?stage=sft")
    fill(browser, {"model": str(home["model"]), "data": str(home["data"]), "max_length": "64"})
    browser.find_element(By.ID, "check").click()
    checks = wait_for(lambda: browser.find_element(By.ID, "checks").is_displayed(), 120, "the checks")
    assert checks
    assert "100 good records" in browser.find_element(By.ID, "data_check").text
    trained = browser.find_elements(By.CSS_SELECTOR, "#preview mark.trained")
    assert [mark.text for mark in trained[:2]] == ["0<|im_end|>", "1<|im_end|>"]  # answers and their end train
    assert "weights" in browser.find_element(By.ID, "plan").text
    shot(browser, "launch-checks")


def test_a_lora_run_launched_from_the_form_finishes_with_its_loss_plot(ui, home, browser):
    from selenium.webdriver.common.by import By

    run = launch(browser, ui, home)
    status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
    wait_for(lambda: status() in ("completed", "failed"), 240, "the run to finish")
    assert status() == "completed", browser.find_element(By.ID, "log").text
    shot(browser, "run")
    loss = wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, 'path.series[data-series="loss"]'), 10, "the loss")
    assert loss[0].get_attribute("d").count("L") >= 2  # a curve through the logged steps
    legend = browser.find_element(By.CSS_SELECTOR, "figure.plot .legend").text
    manifest = json.loads((home["root"] / "runs" / run / "manifest.json").read_text())
    assert manifest["config"]["tuner"] == "lora" and manifest["config"]["max_steps"] == 30
    assert legend.startswith("loss: ")
    browser.get(f"{ui}/")
    assert run in browser.find_element(By.CSS_SELECTOR, "table.runs").text
    shot(browser, "runs")
    browser.get(f"{ui}/lineage")
    assert run in browser.find_element(By.CSS_SELECTOR, "svg.lineage").text
    shot(browser, "lineage")


def test_the_playground_chats_with_the_run_beside_its_base(ui, home, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    runs = [path.name for path in (home["root"] / "runs").iterdir() if (path / "manifest.json").is_file()]
    finished = [
        run
        for run in runs
        if json.loads((home["root"] / "runs" / run / "manifest.json").read_text())["status"] == "completed"
    ]
    assert finished, "the launched run has not finished"
    browser.get(f"{ui}/playground?a={finished[0]}")
    second = Select(browser.find_elements(By.CSS_SELECTOR, ".chat .model")[1])
    second.select_by_visible_text(str(home["model"]))
    say = browser.find_element(By.CSS_SELECTOR, "#say input")
    say.send_keys("What is 2+3?")
    browser.find_element(By.CSS_SELECTOR, "#say button").click()
    answers = wait_for(
        lambda: (
            [
                element.text
                for element in browser.find_elements(By.CSS_SELECTOR, ".message.assistant")
                if "pending" not in element.get_attribute("class")
            ]
            if len(browser.find_elements(By.CSS_SELECTOR, ".message.assistant.pending")) == 0
            else None
        ),
        120,
        "both answers",
    )
    shot(browser, "playground")
    assert len(answers) == 2 and not browser.find_elements(By.CSS_SELECTOR, ".message.error")
    assert answers[0].isdigit()  # 30 steps taught the run to answer a sum with a number
    assert not answers[1].isdigit()  # its random base says anything


def test_a_run_stopped_from_its_page_stays_resumable(ui, home, browser):
    from selenium.webdriver.common.by import By

    run = launch(browser, ui, home, max_steps="5000", save_steps="2")
    status = lambda: browser.find_element(By.ID, "status").text  # noqa: E731
    wait_for(lambda: status() == "running", 120, "the run to start")
    checkpoints = home["root"] / "runs" / run / "checkpoints"
    wait_for(lambda: checkpoints.is_dir() and any(checkpoints.iterdir()), 120, "a first checkpoint")
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: status() == "stopped", 120, "the run to stop")
    shot(browser, "stopped")
    manifest = json.loads((home["root"] / "runs" / run / "manifest.json").read_text())
    assert manifest["status"] == "failed" and manifest["error"].startswith("KeyboardInterrupt")
    browser.find_element(By.ID, "resume").click()
    wait_for(lambda: status() == "running", 120, "the run to resume")
    log = wait_for(
        lambda: "resuming from" in browser.find_element(By.ID, "log").text and browser.find_element(By.ID, "log").text,
        60,
        "the resumed run's log",
    )
    assert f"resuming from {checkpoints}" in log  # the checkpoint the stop saved
    browser.find_element(By.ID, "stop").click()
    wait_for(lambda: status() == "stopped", 120, "the resumed run to stop")


def test_a_recipe_launched_from_the_form_is_followed_stage_by_stage(ui, home, browser):
    import yaml
    from selenium.webdriver.common.by import By

    prompts = home["root"] / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"What is {a}+1?", "solution": str(a + 1)}) + "\n" for a in range(8))
    )
    recipe = home["root"] / "recipe.yaml"
    sft = {"stage": "sft", "data": [str(home["data"])], "tuner": "lora", "lr": 2e-3, "max_steps": 40}
    sft.update(batch_size=16, max_length=64, logging_steps=5)
    evaluation = {"stage": "eval", "data": str(prompts), "metrics": ["accuracy"], "max_tokens": 4}
    recipe.write_text(yaml.safe_dump({"name": "ui", "model": str(home["model"]), "stages": [sft, evaluation]}))
    browser.get(f"{ui}/launch?stage=recipe")
    fill(browser, {"recipe": str(home["root"] / "none.yaml")})
    browser.find_element(By.ID, "check").click()
    wait_for(lambda: error_beside(browser, "recipe"), 30, "the recipe's error")
    assert error_beside(browser, "recipe") == f"no such file: {home['root'] / 'none.yaml'}"
    fill(browser, {"recipe": str(recipe), "set": "sft.max_steps=10"})
    browser.find_element(By.ID, "check").click()
    wait_for(lambda: browser.find_element(By.ID, "checks").is_displayed(), 120, "the recipe's check")
    assert "ui" in browser.find_element(By.ID, "data_check").text
    browser.find_element(By.ID, "start").click()
    wait_for(lambda: "/run?id=" in browser.current_url, 60, "the recipe's page")
    run = browser.current_url.split("id=", 1)[1]

    def stages():
        rows = browser.find_elements(By.CSS_SELECTOR, "table.steps tbody tr")
        return (
            [row.text for row in rows] if rows and "running" not in browser.find_element(By.ID, "status").text else None
        )

    done = wait_for(stages, 300, "the recipe's stages")
    shot(browser, "recipe")
    assert browser.find_element(By.ID, "status").text == "completed", browser.page_source[-3000:]
    assert [line.split()[:3] for line in done] == [
        ["sft", f"{run}/01-sft", "completed"],
        ["eval", f"{run}/02-eval", "completed"],
    ]
    manifest = json.loads((home["root"] / "runs" / run / "01-sft" / "manifest.json").read_text())
    assert manifest["config"]["max_steps"] == 10  # the override from the form


def test_two_runs_compared_side_by_side_and_the_list_filtered(ui, home, browser):
    """The LoRA run launched from the form against the recipe's SFT stage: both loss curves
    on one plot, and the config keys in which they differ."""
    from selenium.webdriver.common.by import By

    manifests = {
        path.parent.relative_to(home["root"] / "runs").as_posix(): json.loads(path.read_text())
        for path in (home["root"] / "runs").glob("**/manifest.json")
    }
    sft = sorted(run for run, manifest in manifests.items() if manifest["stage"] == "sft")
    form, stage = [run for run in sft if "/" not in run and manifests[run]["status"] == "completed"][0], sft[-1]
    browser.get(f"{ui}/compare?a={form}&b={stage}")
    rows = {
        row.find_elements(By.TAG_NAME, "td")[0].text: row.text
        for row in browser.find_elements(By.CSS_SELECTOR, "table.diff tbody tr")
    }
    assert rows["config.max_steps"].split()[1:] == ["30", "10"]
    curves = wait_for(
        lambda: browser.find_elements(By.CSS_SELECTOR, 'path.series[data-series$=": loss"]'), 10, "both curves"
    )
    assert sorted(curve.get_attribute("data-series") for curve in curves) == sorted([f"{form}: loss", f"{stage}: loss"])
    shot(browser, "compare")
    browser.get(f"{ui}/?stage=sft&status=stopped")
    listed = [
        row.find_elements(By.TAG_NAME, "td")[2].text
        for row in browser.find_elements(By.CSS_SELECTOR, "table.runs tbody tr")
    ]
    assert listed and all(manifests[run]["error"].startswith("KeyboardInterrupt") for run in listed)


def test_the_plugins_page_shows_what_each_plugin_registers(ui, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{ui}/plugins")
    text = browser.find_element(By.CSS_SELECTOR, "table.plugins").text
    assert "register_engines" in text and "engine: hf, hf-server" in text
    shot(browser, "plugins")


def test_with_a_key_the_ui_wants_it(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from modelloop.ui.app import create_app

    monkeypatch.setenv("MODELLOOP_HOME", str(tmp_path))
    client = TestClient(create_app(api_key="sesame"))
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert client.get("/?key=sesame").status_code == 200
    assert client.get("/plugins").status_code == 200  # the cookie the key set
