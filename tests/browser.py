"""A real headless Chromium, driven by Selenium through Debian's chromedriver, for the UI tests.

The pages are checked as a person sees them: the text of the DOM after the page's scripts ran
(``document.body.innerText``), polled until what the test waits for shows up. Each page checked is
also saved as a PNG: under the test's temporary folder, and under ``$D2V_SCREENSHOTS`` when it is
set (``D2V_SCREENSHOTS=docs/screenshots`` refreshes the README's pictures).

Chromium comes from Debian (``apt-get install chromium chromium-driver``; scripts/setup.sh does it
as root). Where it cannot be had the tests skip and say so. Nothing is downloaded: the driver path
is given, so Selenium Manager never runs, and the browser's own background traffic is off.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

# the flags of shared env notes: without the background-networking ones, Chromium keeps dialling
# Google's hosts, refused by this machine's closed network
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--window-size=1920,1080"]


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) paths, from D2V_CHROMIUM / D2V_CHROMEDRIVER or the PATH; None if absent."""
    browser = os.environ.get("D2V_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("D2V_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


class Browser:
    """One Chromium session: ``page(url, *texts)`` opens a page and waits until every text is on it."""

    def __init__(self, profile: Path, shots: Path):
        os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager's telemetry, should it ever run
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        paths = find_chromium()
        if paths is None:
            pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; "
                        "scripts/setup.sh installs them when run as root)")
        options = webdriver.ChromeOptions()
        options.binary_location = paths[0]
        for flag in [*FLAGS, f"--user-data-dir={profile}"]:
            options.add_argument(flag)
        self.driver = webdriver.Chrome(options=options, service=Service(paths[1]))
        self.shots = shots
        self.saved: list[Path] = []

    def text(self) -> str:
        return self.driver.execute_script("return document.body ? document.body.innerText : ''")

    def wait_for(self, *texts: str, timeout: float = 60.0) -> str:
        """The page's text once every one of ``texts`` is in it; fails naming what never showed up."""
        deadline = time.monotonic() + timeout
        while True:
            body = self.text()
            missing = [t for t in texts if t not in body]
            if not missing:
                return body
            if time.monotonic() > deadline:
                pytest.fail(f"{self.driver.current_url}: never showed {missing} in {timeout:.0f} s; "
                            f"the page said:\n{body[:3000]}")
            time.sleep(0.25)

    def page(self, url: str, *texts: str, timeout: float = 60.0) -> str:
        self.driver.get(url)
        return self.wait_for(*texts, timeout=timeout)

    def click_text(self, text: str, tag: str = "*") -> None:
        """Click the innermost visible element of ``tag`` whose own text is ``text`` (a tab, a link)."""
        from selenium.webdriver.common.by import By

        found = [e for e in self.driver.find_elements(By.XPATH, f"//{tag}[normalize-space(.)='{text}']")
                 if e.is_displayed()]
        if not found:
            pytest.fail(f"{self.driver.current_url}: no visible element says {text!r}")
        found[-1].click()  # document order: the last match is the innermost

    def click_if_present(self, css: str) -> bool:
        """Click the first visible element matching ``css`` (a panel's close button); False if none."""
        from selenium.webdriver.common.by import By

        found = [e for e in self.driver.find_elements(By.CSS_SELECTOR, css) if e.is_displayed()]
        if found:
            found[0].click()
        return bool(found)

    def wait_image(self, alt_or_src: str, timeout: float = 30.0) -> None:
        """Wait until an <img> whose alt or src mentions ``alt_or_src`` has loaded and has pixels."""
        js = ("return Array.from(document.images).some(i => (i.alt.includes(arguments[0]) || "
              "i.src.includes(arguments[0])) && i.complete && i.naturalWidth > 0)")
        deadline = time.monotonic() + timeout
        while not self.driver.execute_script(js, alt_or_src):
            if time.monotonic() > deadline:
                imgs = self.driver.execute_script("return Array.from(document.images).map(i => [i.alt, i.src])")
                pytest.fail(f"{self.driver.current_url}: no loaded image for {alt_or_src!r}; images: {imgs}")
            time.sleep(0.25)

    def screenshot(self, name: str) -> Path:
        time.sleep(0.5)  # let charts and fonts settle after the text showed up
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        self.saved.append(path)
        if os.environ.get("D2V_SCREENSHOTS"):
            keep = Path(os.environ["D2V_SCREENSHOTS"])
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, keep / path.name)
        return path

    def close(self) -> None:
        self.driver.quit()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Browser:
    root = tmp_path_factory.mktemp("browser")
    b = Browser(root / "profile", root)
    yield b
    b.close()
