"""Check that a report page renders in a real headless browser (Chromium) and that every image on it loads.

A copy of the page with a small script is opened with ``chromium --headless --dump-dom``; after the load event
the script writes each image's natural width into the DOM, which the dump then shows. Chromium must be
installed (Debian: ``apt-get install chromium``); :func:`find_chromium` says where it is, or None.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_PROBE = """<script>window.addEventListener('load', function () {
  var r = Array.prototype.map.call(document.images, function (i) {
    return {src: i.getAttribute('src'), width: i.naturalWidth, height: i.naturalHeight};
  });
  var p = document.createElement('pre'); p.id = 'recap-probe'; p.textContent = JSON.stringify(r);
  document.body.appendChild(p);
});</script>"""
_RESULT = re.compile(r'<pre id="recap-probe">(.*?)</pre>', re.S)


class BrowserCheckError(RuntimeError):
    """The browser did not run, or the page did not report its images; the text says which."""


@dataclass(frozen=True)
class BrowserCheck:
    title: str
    images: list[dict]       # src, width, height (natural size; 0 when the image did not load)

    @property
    def broken(self) -> list[str]:
        return [i["src"] for i in self.images if not i["width"] or not i["height"]]


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def check_page(page: str | Path, chromium: str | None = None, timeout_s: float = 60.0) -> BrowserCheck:
    """Open the page (next to its images) in headless Chromium; the images it shows and their sizes."""
    page = Path(page).resolve()
    chromium = chromium or find_chromium()
    if chromium is None:
        raise BrowserCheckError(f"no Chromium found (tried {', '.join(CANDIDATES)}); Debian: apt-get install "
                                "chromium")
    probe = page.with_name(f".{page.stem}.browser-check.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise BrowserCheckError(f"{chromium} did not finish within {timeout_s:g} s") from None
    finally:
        probe.unlink(missing_ok=True)
    m = _RESULT.search(done.stdout)
    if m is None:
        raise BrowserCheckError(f"{chromium} exited with {done.returncode} without the page's image report; "
                                f"stderr: {done.stderr.strip()[-500:]}")
    title = re.search(r"<title>(.*?)</title>", done.stdout, re.S)
    return BrowserCheck(title[1] if title else "", json.loads(m[1].replace("&quot;", '"').replace("&amp;", "&")))
