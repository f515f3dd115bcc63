"""Debian's headless Chromium under Selenium, for the /ui dashboard's browser tests and its
screenshot command (`python -m benchmarks.dashboard_screenshot`).

Only the system's `chromium` and `chromedriver` (apt: chromium chromium-driver) are used: the
paths are given to Selenium, so its manager never downloads a browser or a driver.
"""

from __future__ import annotations

import os
import shutil

BROWSERS = ("chromium", "chromium-browser")
DRIVERS = ("chromedriver",)


def _which(names: tuple[str, ...]) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


def missing() -> str | None:
    """Why a browser cannot be driven here (None when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (the dev extra)"
    if _which(BROWSERS) is None:
        return "no chromium on PATH (apt-get install chromium)"
    if _which(DRIVERS) is None:
        return "no chromedriver on PATH (apt-get install chromium-driver)"
    return None


def chromium(width: int = 1280, height: int = 1000):
    """A headless Chromium WebDriver with its browser console log kept (`driver.get_log("browser")`)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    problem = missing()
    if problem:
        raise RuntimeError(problem)
    os.environ.setdefault("SE_AVOID_STATS", "true")  # Selenium's manager: no usage statistics
    options = webdriver.ChromeOptions()
    options.binary_location = _which(BROWSERS)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--disable-extensions", "--no-first-run", "--hide-scrollbars",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=_which(DRIVERS)), options=options)


def full_page_png(driver) -> bytes:
    """A screenshot of the whole page (the window grown to the document's height first)."""
    height = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
    width = driver.get_window_size()["width"]
    driver.set_window_size(width, height + 120)
    driver.execute_script("window.scrollTo(0, 0)")
    return driver.get_screenshot_as_png()
