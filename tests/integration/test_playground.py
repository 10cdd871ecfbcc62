"""The playground page and the API docs in a real headless Chromium (Debian's `chromium` and
`chromium-driver`; `.ci/run` installs them when it can, else these tests skip and say why).
One browser and the session's live server for the whole module; nothing is fetched from
outside the server (this machine is offline, so a CDN asset would leave a blank page)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import API_KEY, LiveServer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
WAIT_S = 60
SCREENSHOT = os.environ.get("BLOCKSERVE_PLAYGROUND_SCREENSHOT")  # where to save one, if set


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(.ci/run does when apt is available)")
    profile = tempfile.mkdtemp(prefix="blockserve-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=900,1100"):
        options.add_argument(flag)
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER),
                                  options=options)
    except WebDriverException as error:
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"headless chromium did not start: {error.msg}")
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _wait(driver, condition, timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout).until(condition)


@pytest.fixture(scope="module")
def page(browser, server: LiveServer):
    """The playground, with the server's API key typed in and the models loaded."""
    browser.get(server.base_url + "/")
    error = _wait(browser, expected_conditions.visibility_of_element_located((By.ID, "error")))
    assert "API key" in error.text  # the server wants one: the page says so, as the API does
    key = browser.find_element(By.NAME, "api_key")
    key.send_keys(API_KEY)
    browser.find_element(By.NAME, "prompt").click()  # leaving the field saves the key
    _wait(browser, lambda d: len(Select(d.find_element(By.NAME, "model")).options) > 1)
    return browser


def _fill(page, **values: str) -> None:
    for name, value in values.items():
        field = page.find_element(By.NAME, name)
        if field.tag_name == "select":
            Select(field).select_by_value(value)
        else:
            field.clear()
            field.send_keys(value)


def test_a_prompt_makes_an_image_with_progress_and_previews(page) -> None:
    _fill(page, prompt="a red circle", num_inference_steps="6", seed="11")
    Select(page.find_element(By.NAME, "model")).select_by_value("demo")
    page.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    image = _wait(page, expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, "#result figure img")))
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    assert page.execute_script("return arguments[0].naturalWidth", image) == 32
    progress = page.find_element(By.ID, "progress")
    assert progress.get_attribute("data-step") == "6"  # every step was reported
    assert int(progress.get_attribute("data-previews")) >= 1  # previews came with them
    assert "seed 11" in page.find_element(By.CSS_SELECTOR, "#result figcaption").text
    assert not page.find_element(By.ID, "error").is_displayed()
    if SCREENSHOT:
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        page.save_screenshot(SCREENSHOT)


def test_the_gallery_gives_back_the_seed(page) -> None:
    item = _wait(page, expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, "#gallery li")))
    _fill(page, seed="999")
    item.click()
    assert page.find_element(By.NAME, "seed").get_attribute("value") == item.get_attribute(
        "data-seed") == "11"


def test_a_bad_value_shows_the_apis_error(page) -> None:
    Select(page.find_element(By.NAME, "model")).select_by_value("demo")
    _fill(page, num_inference_steps="99")
    page.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    error = _wait(page, expected_conditions.visibility_of_element_located((By.ID, "error")))
    _wait(page, lambda _d: error.text.strip() != "")
    assert error.text == "'num_inference_steps' is 99; model 'demo' allows 1 to 8"


def test_the_api_docs_render_offline(page, server: LiveServer) -> None:
    page.get(server.base_url + "/docs")
    title = _wait(page, expected_conditions.visibility_of_element_located(
        (By.CSS_SELECTOR, ".swagger-ui .info .title")))
    assert "blockserve" in title.text
    assert page.find_elements(By.CSS_SELECTOR, ".opblock")  # the routes are listed
    page.get(server.base_url + "/redoc")
    heading = _wait(page, expected_conditions.visibility_of_element_located(
        (By.CSS_SELECTOR, ".api-info h1")))
    assert "blockserve" in heading.text
    assert "/v1/images/generations" in page.page_source
