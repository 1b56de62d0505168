"""The README's pictures of the blinded study: a screenshot of the rating page in headless Chromium, and a
report plot, both from studies/dense-fp-vs-safe-core.

The votes behind the plot are NOT a human study: a stand-in rater, the embedded model's automatic checker
(safe_dit.embedded.grader), rates every pair through the real page with the keyboard, preferring the image
with more attributes right and pressing = on a tie. The votes go to a temporary database, so the committed
study stays vote-free for people to rate.

    python3 scripts/study_demo.py [--study studies/dense-fp-vs-safe-core] [--out docs/study]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from safe_dit.embedded import grader, world  # noqa: E402
from safe_dit.study.browser import chromium  # noqa: E402
from safe_dit.study.store import Study  # noqa: E402

ATTRIBUTES = ("background", "color", "shape", "position", "count")


def checker_key(study: Study, prompt: str, left: str, right: str) -> str:
    scene = world.parse_caption(prompt)
    score = [sum(grader.grade(np.asarray(Image.open(study.folder / "images" / n).convert("RGB")), scene)[a]
                 for a in ATTRIBUTES) for n in (left, right)]
    return "ArrowLeft" if score[0] > score[1] else "ArrowRight" if score[1] > score[0] else "="


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default="studies/dense-fp-vs-safe-core", help="relative to the repository root")
    ap.add_argument("--out", default="docs/study", help="relative to the repository root")
    ap.add_argument("--shot-at", type=int, default=9, help="take the screenshot before this many votes")
    args = ap.parse_args()
    os.chdir(ROOT)  # the files written name the study and themselves relative to the repository
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = Study(args.study)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "votes.sqlite"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        server = subprocess.Popen([sys.executable, "-m", "safe_dit.cli", "study", "serve", args.study, "--port", "0",
                                   "--db", str(db)], stderr=subprocess.PIPE, text=True, env=env)
        try:
            url = None
            while url is None:
                line = server.stderr.readline()
                if not line and server.poll() is not None:
                    raise SystemExit("the server did not start")
                found = re.search(r"http://\S+/", line)
                url = found.group(0) if found else None
            driver = chromium(900, 700)
            try:
                driver.get(url)
                driver.find_element(By.ID, "rater").send_keys("checker", Keys.ENTER)
                wait = WebDriverWait(driver, 30)
                keys = {"ArrowLeft": Keys.ARROW_LEFT, "ArrowRight": Keys.ARROW_RIGHT, "=": "="}
                for i in range(len(study.pairs)):
                    wait.until(lambda d: d.find_element(By.ID, "count").text == f"{i} / {len(study.pairs)} rated")
                    wait.until(lambda d: d.execute_script("return document.getElementById('right').complete"))
                    src = [driver.find_element(By.ID, s).get_attribute("src").rsplit("/", 1)[1]
                           for s in ("left", "right")]
                    prompt = study.pairs[driver.find_element(By.TAG_NAME, "body").get_attribute("data-pair")]["prompt"]
                    if i == args.shot_at:
                        time.sleep(0.3)  # the progress bar's transition
                        driver.save_screenshot(str(out / "page.png"))
                    driver.find_element(By.TAG_NAME, "body").send_keys(keys[checker_key(study, prompt, *src)])
                wait.until(lambda d: d.find_element(By.ID, "done").is_displayed())
            finally:
                driver.quit()
        finally:
            server.terminate()
            server.wait(timeout=30)
        report = subprocess.run([sys.executable, "-m", "safe_dit.cli", "study", "report", args.study, "--db", str(db),
                                 "--plot", str(out / "report-checker.png"), "--json",
                                 str(out / "report-checker.json")],
                                env=env, capture_output=True, text=True, check=True)
    print("\n".join(report.stdout.splitlines()[:-1]))
    result = json.loads(report.stdout.splitlines()[-1])
    print(f"wrote {out / 'page.png'}, {out / 'report-checker.png'} ({result['votes']} votes by the checker)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
