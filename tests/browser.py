"""A headless Chromium (Debian's chromium and chromium-driver, driven by selenium) and an MLflow UI to point it at:
`mlflow server` on a run's store, as a user runs `mlflow ui` after `make demo`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ray_cluster import free_port
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

BIN = Path(sys.executable).parent
PAGE_TIMEOUT = 120  # a loaded 2-core machine renders MLflow's UI in seconds, its first page in tens of them


@contextmanager
def mlflow_ui(store_uri: str) -> Iterator[str]:
    """`mlflow server` (what `mlflow ui` starts) on store_uri; yields its address."""
    port = free_port()
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", store_uri, "--host", "127.0.0.1"]
            + ["--port", str(port), "--workers", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            address, deadline = f"http://127.0.0.1:{port}", time.time() + 180
            while not _answers(f"{address}/health"):
                if server.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise AssertionError(f"mlflow server did not come up: {log.read()[-3000:]}")
                time.sleep(1)
            yield address
        finally:
            server.terminate()
            server.wait(60)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status == 200
    except OSError:
        return False


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
