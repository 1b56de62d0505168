"""The rating page in a real headless Chromium: a rater votes on the 6-pair study with the keyboard only,
and the report's counts equal the votes as the page showed them.

Needs the system Chromium and chromedriver (`scripts/install.sh --test` installs them with apt-get when it
runs as root); skipped, with the reason, where they are not installed."""

from __future__ import annotations

import json

import pytest

from safe_dit.study.browser import find_chromium
from safe_dit.study.store import Study

FOUND = find_chromium()
pytestmark = pytest.mark.skipif(isinstance(FOUND, str), reason=f"no browser test: {FOUND}")
KEYS = ["ArrowLeft", "ArrowRight", "=", "ArrowLeft", "=", "ArrowLeft"]


@pytest.fixture
def browser():
    from safe_dit.study.browser import chromium

    driver = chromium()
    yield driver
    driver.quit()


def test_keyboard_votes_on_six_pairs_are_what_the_report_counts(server, browser, study_dir, cli):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    study = Study(study_dir)
    wait = WebDriverWait(browser, 20)
    text = lambda i: browser.find_element(By.ID, i).text  # noqa: E731
    browser.get(server.url + "/")
    browser.find_element(By.ID, "rater").send_keys("browser-rater", Keys.ENTER)
    keys = {"ArrowLeft": Keys.ARROW_LEFT, "ArrowRight": Keys.ARROW_RIGHT, "=": "="}
    expected = {"a": 0, "b": 0, "same": 0}
    seen = []
    for i, key in enumerate(KEYS):
        wait.until(lambda d: text("count") == f"{i} / 6 rated")
        wait.until(lambda d: d.execute_script("return document.getElementById('left').complete "
                                              "&& document.getElementById('left').naturalWidth > 0"))
        pair = browser.find_element(By.TAG_NAME, "body").get_attribute("data-pair")
        left = browser.find_element(By.ID, "left").get_attribute("src").rsplit("/", 1)[1]
        right = browser.find_element(By.ID, "right").get_attribute("src").rsplit("/", 1)[1]
        assert {left, right} == {study.pairs[pair]["a"]["image"], study.pairs[pair]["b"]["image"]}
        assert text("prompt").strip("\u201c\u201d") == study.pairs[pair]["prompt"]
        width = browser.execute_script("return document.getElementById('bar').style.width")
        assert float(width.rstrip("%")) == pytest.approx(100 * i / 6, abs=1e-3)
        seen.append(pair)
        # which setting the rater preferred, from what the page showed (the manifest unblinds the images)
        expected["same" if key == "=" else study.images[left if key == "ArrowLeft" else right]] += 1
        browser.find_element(By.TAG_NAME, "body").send_keys(keys[key])
    wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
    assert text("thanks") == "All 6 pairs rated. Thank you!" and sorted(seen) == sorted(study.pairs)
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_LEFT)  # after the end: nothing is sent
    code, out, err = cli("study", "report", str(study_dir), "--db", str(server.db), "--json",
                         str(server.db.with_suffix(".json")), "--plot", str(server.db.with_suffix(".png")))
    assert code == 0, err
    result = json.loads(out.splitlines()[-1])
    assert result["votes"] == 6 and result["raters"] == 1
    assert {k: result["preference"][k]["count"] for k in expected} == expected
    assert result["keys"] == {"left": 3, "right": 1, "same": 2}
    assert all(row["votes"] == 1 for row in result["per_prompt"])
