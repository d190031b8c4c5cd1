"""The status page (`GET /`): served with a strict CSP, and driven in a real headless Chromium.

The browser tests need Debian's `chromium` and `chromium-driver` (`make browser` installs them) and
the `selenium` package (the `test` extras). Without them they fail, saying so: they never skip.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import DEADLINE, Daemon, Project, png_bytes, sha256
from test_evaluation import biased, with_evaluation
from tinynet import colour_state_dict

try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # reported by the `browser` fixture, as a failure
    webdriver = None  # type: ignore[assignment]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CARD = '[data-model="colours"]'


def inline(page: str, tag: str) -> list[str]:
    return re.findall(rf"<{tag}>(.*?)</{tag}>", page, re.S)


def csp_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def test_the_page_is_html_with_a_strict_csp_and_nothing_from_the_internet(project: Project, start_daemon):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)

    response = daemon.get("/")

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"
    page = response.text
    assert not re.search(r"https?:", page, re.I), "the page must load nothing from the internet"
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=\"(?!data:,)", page, re.I)
    policy = dict(d.strip().split(" ", 1) for d in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["img-src"] == "'self' data: blob:"
    assert policy["object-src"] == "'none'"
    # Exactly the page's own inline script and style, by hash: no 'unsafe-inline', nothing else.
    assert policy["script-src"] == " ".join(csp_source(s) for s in inline(page, "script"))
    assert policy["style-src"] == " ".join(csp_source(s) for s in inline(page, "style"))
    assert "unsafe" not in response.headers["content-security-policy"]
    assert len(inline(page, "script")) == 1 and len(inline(page, "style")) == 1
    assert daemon.client.head("/").status_code == 200


# -- in a real browser ----------------------------------------------------------------------------------


@pytest.fixture
def browser(start_daemon) -> Iterator[Any]:
    """A headless Chromium, quit before the daemons stop (it depends on start_daemon, so it is torn down first)."""
    if webdriver is None:
        pytest.fail("selenium is not installed: run `.venv/bin/pip install -e '.[test]'` (or `make test`)")
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: run `make browser` (Debian's chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,900"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def each(driver: Any, css: str, expression: str) -> list[Any]:
    """`expression` of every node `n` matching `css`, read in one script: nothing goes stale mid-render."""
    return js(driver, f"return Array.from(document.querySelectorAll(arguments[0]), n => {expression})", css)


def texts(driver: Any, css: str) -> list[str]:
    return each(driver, css, "n.textContent")


def rows(driver: Any, css: str) -> list[list[str]]:
    return each(driver, css, "Array.from(n.cells, c => c.textContent)")


def wait_for(driver: Any, predicate: Callable[[], Any], what: str) -> Any:
    try:
        return WebDriverWait(driver, DEADLINE, poll_frequency=0.05).until(lambda _: predicate())
    except TimeoutException:
        shown = texts(driver, "main")
        pytest.fail(f"timed out after {DEADLINE} s waiting for the page to show {what}; it shows:\n{shown}")


def history_row(driver: Any, file: str, result: str) -> list[str] | None:
    """The newest history row for `file` with `result`: [time, result, file, reason, timings]."""
    return next((r for r in rows(driver, f"{CARD} .history tbody tr") if r[2] == file and r[1] == result), None)


def console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def screenshot(driver: Any, tmp_path: Path) -> list[Path]:
    """The whole page, as a test artifact under tmp_path, and at $RELOADER_SCREENSHOT when that is set."""
    chrome = js(driver, "return window.outerHeight - window.innerHeight")
    height = js(driver, "return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height) + int(chrome), 4000))
    targets = [tmp_path / "status-page.png"]
    if os.environ.get("RELOADER_SCREENSHOT"):
        targets.append(Path(os.environ["RELOADER_SCREENSHOT"]))
    png = driver.get_screenshot_as_png()
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
    return targets


def test_the_page_follows_swaps_and_rejections_and_answers_an_uploaded_image(
    project: Project, start_daemon: Callable[..., Daemon], browser: Any, tmp_path: Path
):
    with_evaluation(project)  # 12 muted images; min_accuracy 0.3, max_regression 0.05
    project.save("colours-v1.pt", biased(4.0))  # 0.917 on the set
    daemon = start_daemon(project.config)
    browser.get(daemon.url + "/")
    wait_for(browser, lambda: texts(browser, f"{CARD} .live .version") == ["1"], "version 1 live")
    assert texts(browser, f"{CARD} .canary")[0] == "no canary"  # whether the key is null or absent

    better = project.save("colours-v2.pt", biased(0.0))  # 1.000: goes live
    wait_for(browser, lambda: texts(browser, f"{CARD} .live .version") == ["2"], "version 2 live")
    wait_for(browser, lambda: history_row(browser, "colours-v2.pt", "live"), "the swap to v2 in the history")
    assert texts(browser, f"{CARD} .live .sha") == [sha256(better)]
    assert texts(browser, f"{CARD} .report .accuracy") == ["1.000"]
    assert "accuracy 1.000, the version before 0.917 (+0.083)" in texts(browser, f"{CARD} .report")[0]

    project.save("colours-v3.pt", biased(6.0))  # passes the golden images, 0.417 on the set
    row = wait_for(browser, lambda: history_row(browser, "colours-v3.pt", "rejected"), "v3's rejection")
    assert row[3] == "evaluation: accuracy 0.417 < live 1.000 - 0.05"
    assert "evaluation\u00a0" in row[4] and row[4].endswith("\u00a0ms")
    project.save("colours-v4.pt", colour_state_dict(permute=(2, 1, 0)))  # answers blue for red
    row = wait_for(browser, lambda: history_row(browser, "colours-v4.pt", "rejected"), "v4's rejection")
    assert row[3].startswith("warmup: red.png: expected 'red', got 'blue'")
    files = f"{CARD} .files tbody tr"
    wait_for(
        browser, lambda: ["colours-v4.pt", "4", "rejected"] in [r[:3] for r in rows(browser, files)], "v4 in files"
    )
    assert [r[1] for r in rows(browser, f"{CARD} .history tbody tr")] == ["rejected", "rejected", "live", "live"]
    assert texts(browser, f"{CARD} .live .version") == ["2"]  # no page reload happened: one card, updated in place
    assert len(browser.find_elements(By.CSS_SELECTOR, "section.model")) == 1

    image = tmp_path / "red.png"
    image.write_bytes(png_bytes("red"))
    browser.find_element(By.CSS_SELECTOR, f"{CARD} .predict input[type=file]").send_keys(str(image))
    wait_for(browser, lambda: texts(browser, f"{CARD} .predict .label")[:1] == ["red"], "the top label red")
    assert len(texts(browser, f"{CARD} .predict li")) == 3
    assert texts(browser, f"{CARD} .predict .answered")[0].startswith("answered by version 2 ")

    # Polls re-render only what changed: an unchanged table, and the answer, are the same nodes a poll later.
    unchanged = f"{CARD} .files table, {CARD} .history table, {CARD} .predict .answer"
    assert each(browser, unchanged, "n.reloaderMark = 1") == [1, 1, 1]
    polled = texts(browser, "#updated")
    wait_for(browser, lambda: texts(browser, "#updated") != polled, "another poll")
    assert each(browser, unchanged, "n.reloaderMark") == [1, 1, 1]

    shots = screenshot(browser, tmp_path)
    assert all(shot.stat().st_size > 10_000 for shot in shots)
    assert console_errors(browser) == []


# A canary as the daemon describes one, with strings that would be markup if they were rendered as HTML.
CANARY = {
    "version": 3,
    "sha256": "ab" * 32,
    "compared": 40,
    "requests": 100,
    "agreement": 0.975,
    "min_agreement": 0.95,
    "state": "shadowing",
    "reason": "<script>window.hacked = 1</script><b>bold</b>",
}
# Makes the page see `window.canary` in every /models answer: the object, or no key at all when it is null.
WITH_CANARY = """
const real = window.fetch.bind(window);
window.canary = arguments[0];
window.fetch = async (url, init) => {
  const response = await real(url, init);
  if (String(url) !== "/models") return response;
  const data = await response.json();
  for (const m of Object.values(data.models)) {
    if (window.canary) m.canary = window.canary; else delete m.canary;
  }
  return new Response(JSON.stringify(data), {status: 200, headers: {"Content-Type": "application/json"}});
};
"""


def test_file_names_and_reasons_render_as_text_and_a_canary_shows_its_progress(
    project: Project, start_daemon: Callable[..., Daemon], browser: Any
):
    project.save("colours-v1.pt")
    daemon = start_daemon(project.config)
    browser.get(daemon.url + "/")
    wait_for(browser, lambda: texts(browser, f"{CARD} .live .version") == ["1"], "version 1 live")

    hostile = '<img src=x onerror="window.hacked=1">&amp;-v2.pt'
    project.save(hostile, colour_state_dict(permute=(2, 1, 0)))
    wait_for(browser, lambda: history_row(browser, hostile, "rejected"), "the hostile file name, as text")
    assert [r[0] for r in rows(browser, f"{CARD} .files tbody tr")] == [hostile, "colours-v1.pt"]
    assert browser.find_elements(By.CSS_SELECTOR, "main img") == []

    js(browser, WITH_CANARY, CANARY)
    wait_for(browser, lambda: "shadowing" in texts(browser, f"{CARD} .canary")[0], "the canary")
    canary = texts(browser, f"{CARD} .canary")[0]
    for shown in ("version 3 abababababab", "40 of 100 requests", "97.5% (needs 95.0%)", CANARY["reason"]):
        assert shown in canary
    progress = browser.find_element(By.CSS_SELECTOR, f"{CARD} .canary progress")
    assert (progress.get_attribute("value"), progress.get_attribute("max")) == ("40", "100")
    js(browser, "window.canary = arguments[0]", {**CANARY, "compared": 100, "agreement": 0.5, "state": "reject"})
    wait_for(browser, lambda: "100 of 100 requests" in texts(browser, f"{CARD} .canary")[0], "the canary's end")
    js(browser, "window.canary = null")  # the key is absent, as from a daemon without canaries
    wait_for(browser, lambda: texts(browser, f"{CARD} .canary") == ["no canary"], "no canary")

    assert browser.find_elements(By.CSS_SELECTOR, "main script, main b, main img") == []
    assert js(browser, "return window.hacked") is None
    assert console_errors(browser) == []
