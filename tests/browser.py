"""A headless Chromium (Debian's chromium and chromium-driver, driven by selenium) and an MLflow UI to point it at:
`mlflow server` on a run's store, as a user runs `mlflow ui` after `make demo`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mlflow_server import running_mlflow
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

PAGE_TIMEOUT = 120  # a loaded 2-core machine renders MLflow's UI in seconds, its first page in tens of them


@contextmanager
def mlflow_ui(store_uri: str) -> Iterator[str]:
    """`mlflow server` (what `mlflow ui` starts) on store_uri; yields its address."""
    with tempfile.TemporaryDirectory(prefix="mlflowui") as root:
        with running_mlflow(["--backend-store-uri", store_uri], Path(root) / "server.log") as address:
            yield address


@contextmanager
def chromium() -> Iterator[webdriver.Chrome]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver, "chromium and chromedriver not found: install Debian's chromium and chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1800,1000"):
        options.add_argument(argument)
    if os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium's sandbox refuses to run as root
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    try:
        yield chrome
    finally:
        chrome.quit()


def page_text(chrome: webdriver.Chrome, *expected: str) -> str:
    """The page's text once it shows every one of `expected` (the UI renders after its API calls answer)."""
    try:
        WebDriverWait(chrome, PAGE_TIMEOUT).until(lambda c: all(e in _text(c) for e in expected))
    except TimeoutException:
        missing = [e for e in expected if e not in _text(chrome)]
        raise AssertionError(f"{chrome.current_url} does not show {missing}:\n{_text(chrome)[:3000]}") from None
    return _text(chrome)


def _text(chrome: webdriver.Chrome) -> str:
    return chrome.find_element(By.TAG_NAME, "body").text


def close_assistant(chrome: webdriver.Chrome) -> None:
    """Closes the MLflow Assistant panel, which opens on a browser's first visit and takes a third of the page."""
    for button in chrome.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
        if button.is_displayed():
            button.click()
