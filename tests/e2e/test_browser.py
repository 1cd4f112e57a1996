"""The page at `/` and the API documentation at `/docs` in a real headless Chromium (Debian's `chromium` and
`chromium-driver`, driven by selenium), against a real `vlltr serve`, with every address but the loopback
unreachable (a dead proxy): nothing may come from a CDN.

Pick an image and see the top-k as bars with the matching sentences; an invalid upload shows the API's own
message; add a class (with the admin token) and find it listed, then delete it; the page fits a phone's width
and the drop zone is reached from the keyboard; `/docs` lists the operations with no network."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

from support.programs import program

TOKEN = "browser-admin-token"
WAIT_S = 30


@pytest.fixture(scope="module")
def server(bundle_v1, server_factory, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("browser")
    env = {"VLLTR_CLASS_STORE": str(workdir / "classes.json"), "VLLTR_ADMIN_TOKEN": TOKEN}
    srv = server_factory(env=env, args=["--bundle", str(bundle_v1)], workdir=workdir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    options = webdriver.ChromeOptions()
    options.binary_location = program("chromium", "chromium")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,900",
        # No network: every request but the loopback's goes to a proxy that is not there.
        "--proxy-server=http://127.0.0.1:9",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(
        service=Service(executable_path=program("chromedriver", "chromium-driver")), options=options
    )
    yield driver
    driver.quit()


def _image(bundle: Path) -> Path:
    data = bundle.parent / "run" / "data"
    return data / (data / "test.txt").read_text().split()[0]


def _wait(driver, condition):
    return WebDriverWait(driver, WAIT_S).until(condition)


def _open(browser, server) -> None:
    browser.get(f"{server.url}/")
    _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#classes tr"))


def test_the_browser_has_no_network_but_the_loopback(browser, server):
    browser.get(f"{server.url}/")
    outcome = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css')"
        ".then(() => done('loaded'), () => done('failed'));"
    )
    assert outcome == "failed"


def test_picking_an_image_shows_bars_with_the_matching_sentences(browser, server, bundle_v1):
    image = _image(bundle_v1)
    expected = httpx.post(
        f"{server.url}/v1/classify",
        files={"file": (image.name, image.read_bytes())},
        params={"top_k": 5, "explain": "true"},
        timeout=30,
    ).json()["predictions"]
    _open(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(image))
    items = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#predictions li.prediction"))
    assert [i.find_element(By.CLASS_NAME, "name").text for i in items] == [p["label"] for p in expected]
    widths = [i.find_element(By.CSS_SELECTOR, ".bar > span").get_attribute("style") for i in items]
    assert all("width" in w for w in widths)
    sentences = items[0].find_elements(By.CLASS_NAME, "sentence")
    best_anchor = expected[0]["explanation"]["anchors"][0]["text"]
    assert sentences and best_anchor in sentences[0].text
    assert browser.find_element(By.ID, "classify-error").text == ""


def test_an_invalid_upload_shows_the_api_message(browser, server, tmp_path):
    junk = tmp_path / "notes.png"
    junk.write_bytes(b"these are notes, not an image")
    message = httpx.post(f"{server.url}/v1/classify", files={"file": ("notes.png", junk.read_bytes())}, timeout=30)
    assert message.status_code == 400
    _open(browser, server)
    browser.find_element(By.ID, "file").send_keys(str(junk))
    error = _wait(browser, lambda d: d.find_element(By.ID, "classify-error").text)
    assert error == message.json()["error"]["message"]
    assert not browser.find_elements(By.CSS_SELECTOR, "#predictions li")


def test_add_a_class_find_it_listed_and_delete_it(browser, server):
    _open(browser, server)
    browser.find_element(By.ID, "token").clear()
    browser.find_element(By.ID, "class-name").send_keys("amber kite")
    browser.find_element(By.ID, "class-descriptions").send_keys("an amber kite in the sky\na diamond of orange paper")
    browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    refused = _wait(browser, lambda d: d.find_element(By.ID, "classes-error").text)
    assert "token" in refused.lower()  # the API's 401 message, shown as it is

    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.CSS_SELECTOR, "#add-form button[type=submit]").click()
    row = _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#classes tr[data-name='amber kite']"))[0]
    assert "added" in row.text and "an amber kite in the sky" in row.text
    assert "added amber kite" in browser.find_element(By.ID, "classes-note").text
    assert "amber kite" in {c["name"] for c in httpx.get(f"{server.url}/v1/classes", timeout=30).json()["classes"]}

    row.find_element(By.TAG_NAME, "button").click()
    _wait(browser, lambda d: not d.find_elements(By.CSS_SELECTOR, "#classes tr[data-name='amber kite']"))
    assert "amber kite" not in {c["name"] for c in httpx.get(f"{server.url}/v1/classes", timeout=30).json()["classes"]}


def test_the_page_fits_a_phone_and_is_reached_from_the_keyboard(browser, server):
    browser.set_window_size(390, 844)
    try:
        _open(browser, server)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        body = browser.find_element(By.TAG_NAME, "body")
        reached = []
        for _ in range(8):
            body.send_keys(Keys.TAB) if not reached else browser.switch_to.active_element.send_keys(Keys.TAB)
            reached.append(browser.switch_to.active_element.get_attribute("id"))
            if reached[-1] == "drop":
                break
        assert "drop" in reached, reached
    finally:
        browser.set_window_size(1200, 900)


def test_the_docs_list_the_operations_with_no_network(browser, server):
    browser.get(f"{server.url}/docs")
    paths = _wait(
        browser,
        lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")] or False,
    )
    for path in ("/v1/classify", "/v1/classify/batch", "/v1/classes", "/v1/model", "/healthz"):
        assert path in " ".join(paths).replace("\u200b", ""), paths
    scripts = browser.execute_script("return [...document.scripts].map(s => s.src).filter(s => s)")
    assert scripts and all(s.startswith(server.url) for s in scripts), scripts
    assert ec.title_contains("vlltr")(browser)
