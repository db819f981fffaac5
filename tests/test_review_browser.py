"""The review page in a real headless Chromium (Selenium): load it, mark layers, see them stored.

Chromium and chromedriver come from Debian packages (scripts/install_browser.sh, run by
``make test``). Without them the test is skipped with the reason, except in CI (``CI=true``),
where a missing browser is a failure. Only 127.0.0.1 traffic; every wait is bounded.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from review_fixtures import HOSTILE_NOTE, load_shop, serving

from inspect3d.review.server import ReviewServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT_S = 20


def browser_or_skip() -> None:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[dev]')")
    if missing:
        reason = f"headless browser test needs {missing}: run scripts/install_browser.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
def server(state) -> Iterator[ReviewServer]:
    with serving(state, "browser-qa") as srv:
        yield srv


@pytest.fixture
def driver():
    browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--no-proxy-server"):  # fmt: skip
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.set_page_load_timeout(WAIT_S)
    d.set_script_timeout(WAIT_S)
    try:
        yield d
    finally:
        d.quit()


def saved(card):
    return lambda _: "(saved)" in card.find_element("css selector", ".status").text


def test_mark_layers_by_key_and_by_click_and_see_them_stored(server, driver, state):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(driver, WAIT_S)
    driver.get(server.url)
    wait.until(lambda d: d.find_elements("css selector", ".card.current"))
    cards = driver.find_elements("css selector", ".card")
    assert len(cards) >= 2
    first, second = cards[0], cards[1]
    open_before = int(driver.find_element("id", "open-count").text)

    ActionChains(driver).send_keys("1").perform()  # keyboard: confirmed defect, default reason
    wait.until(saved(first))
    assert "current" in second.get_attribute("class")  # moved on to the next layer

    Select(second.find_element("css selector", "select")).select_by_value("camera")
    second.find_element("css selector", "input[name=note]").send_keys(HOSTILE_NOTE)
    second.find_element("css selector", "button[data-decision=false_alarm]").click()  # mouse
    wait.until(saved(second))
    history = second.find_element("css selector", ".history").text
    assert "False alarm (camera) by browser-qa" in history and HOSTILE_NOTE in history
    assert int(driver.find_element("id", "open-count").text) == open_before - 2
    # the note's <script> did not run: an alert() would make this call raise
    assert driver.execute_script("return document.title").startswith("Review")

    reviews = {x.id: x.review for j in load_shop(state).jobs for x in j.layers if x.review}
    one, two = (int(c.get_attribute("data-layer-id")) for c in (first, second))
    assert set(reviews) == {one, two}
    assert (
        reviews[one]["decision"] == "confirmed_defect" and reviews[one]["reviewer"] == "browser-qa"
    )
    assert (reviews[two]["decision"], reviews[two]["reason"], reviews[two]["note"]) == (
        "false_alarm", "camera", HOSTILE_NOTE.strip()
    )  # fmt: skip

    driver.refresh()  # the decision survives a reload, with its history
    wait.until(lambda d: d.find_elements("css selector", ".card.current"))
    card = driver.find_element("css selector", f'.card[data-layer-id="{two}"]')
    assert "False alarm: camera" in card.find_element("css selector", ".status").text


def test_flagged_layer_shows_the_plain_layer_its_overlay_and_the_colour_bar(server, driver, state):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url)
    card = WebDriverWait(driver, WAIT_S).until(
        lambda d: d.find_elements("css selector", ".card.current")
    )[0]
    plain = card.find_element("css selector", "figure.plain img")
    overlay = card.find_element("css selector", "figure.map img.overlay")
    js = "return Array.from(arguments).map(i => [i.complete, i.naturalWidth, i.naturalHeight]);"
    sizes = driver.execute_script(js, plain, overlay)
    (p_ok, p_w, p_h), (o_ok, o_w, o_h) = sizes
    assert p_ok and o_ok and p_w > 0 and o_w == p_w  # both decoded, same layer width
    assert o_h > p_h + 40  # the overlay carries its title above and the colour bar below
    layer_id = int(card.get_attribute("data-layer-id"))
    x = next(x for j in load_shop(state).jobs for x in j.layers if x.id == layer_id)
    assert f"Layer {x.layer}" in card.text and "Likeliest defect" in card.text
    assert x.defect_class in card.text
