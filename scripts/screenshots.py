"""Remake docs/img/report*.png and review.png from a watcher state, in headless Chromium.

Usage: python scripts/screenshots.py STATE [OUT_DIR=docs/img]

Writes the report of STATE into a temporary folder, opens its index and the first rejected job
page from ``file://``, serves the review page on a loopback port, and saves full-width
screenshots. Needs chromium and chromedriver (scripts/install_browser.sh) and selenium.
"""

from __future__ import annotations

import sys
import tempfile
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

from inspect3d.review import shop
from inspect3d.review.report import build_report, page_name
from inspect3d.review.server import ReviewServer


def driver(width: int = 1280) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    args = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--no-proxy-server"]
    for arg in [*args, f"--window-size={width},900", "--hide-scrollbars"]:
        options.add_argument(arg)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def shoot(d: webdriver.Chrome, url: str, out: Path, max_h: int = 2400) -> None:
    d.get(url)
    h = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(d.get_window_size()["width"], min(max_h, h + 20))
    d.save_screenshot(str(out))
    print(f"wrote {out}")


def main(state: str, out_dir: str = "docs/img") -> None:
    out = Path(out_dir)
    store = shop.open_store(state)
    try:
        s = shop.load(store)
    finally:
        store.close()
    job = next((j for j in s.jobs if j.verdict == "REJECT" and j.flagged), s.jobs[0])
    with tempfile.TemporaryDirectory() as tmp:
        index = build_report(state, tmp)
        d = driver()
        try:
            shoot(d, index.as_uri(), out / "report_index.png")
            page = index.parent / "jobs" / f"{page_name(job)}.html"
            shoot(d, page.as_uri(), out / "report.png")
            srv = ReviewServer(Path(state), "127.0.0.1", 0, None, "qa")
            thread = threading.Thread(target=srv.serve_forever, daemon=True)
            thread.start()
            try:
                shoot(d, f"{srv.url}?job={job.id}", out / "review.png", max_h=1400)
            finally:
                srv.shutdown()
                srv.server_close()
        finally:
            d.quit()


if __name__ == "__main__":
    main(*sys.argv[1:])
