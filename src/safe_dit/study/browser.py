"""Headless Chromium for the study page's browser test and its README screenshot (not used by the commands).

Drives the system's Chromium (Debian: ``apt-get install chromium chromium-driver``, which
``scripts/install.sh --test`` does when it runs as root) through Selenium with the matching system
chromedriver, so nothing is downloaded at run time (Selenium Manager is never asked for a driver).
"""

from __future__ import annotations

import os
import shutil

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVERS = ("chromedriver",)
_DEBIAN_DRIVER = "/usr/lib/chromium/chromedriver"


def find_chromium() -> tuple[str, str] | str:
    """(browser, driver) paths, or the reason why there is none ($CHROMIUM and $CHROMEDRIVER override)."""
    browser = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, BROWSERS)), None)
    driver = os.environ.get("CHROMEDRIVER") or next(filter(None, map(shutil.which, DRIVERS)), None)
    if driver is None and os.access(_DEBIAN_DRIVER, os.X_OK):
        driver = _DEBIAN_DRIVER
    for name, path in (("browser", browser), ("driver", driver)):
        if path is not None and not os.access(path, os.X_OK):
            return f"the Chromium {name} {path} is not an executable file"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if browser is None:
        return ("no Chromium on this machine: install it with `apt-get install chromium chromium-driver` "
                "(scripts/install.sh --test does it when it runs as root with apt-get)")
    if driver is None:
        return f"Chromium at {browser} but no chromedriver: install it with `apt-get install chromium-driver`"
    return browser, driver


def chromium(width: int = 1000, height: int = 720):
    """A headless Chromium WebDriver of the given window size; raises RuntimeError with the reason when none."""
    found = find_chromium()
    if isinstance(found, str):
        raise RuntimeError(found)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}", "--hide-scrollbars", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))
