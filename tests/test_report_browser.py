"""The report as a person sees it: opened in real headless Chromium.

The report stage renders the synthetic run (every section, every table kind);
Chromium then

1. loads ``report.html`` as written, logging the console to stderr, and takes
   a screenshot (kept in the test's tmp dir): any console message (a script
   error, a blocked network request, a broken image) fails the test;
2. loads an instrumented copy (a checking script appended and allowed by the
   page's Content-Security-Policy) and dumps the DOM after the load event: the
   script records every section id, every ``<img>`` with its
   ``naturalWidth`` and any error event.

Skipped only when no Chromium binary is installed (CI installs Debian's
``chromium``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import anndata as ad
import pandas as pd
import pytest
from test_report import SECTION_IDS, write_synthetic_run

from pipeline.config import load_config
from pipeline.stages import StageContext
from pipeline.stages.report import run_report

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM = next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--enable-logging=stderr",
    "--v=0",
]

#: Appended to the instrumented copy: records sections, images and errors into the DOM.
CHECK_SCRIPT = """
<script>
window.__errors = [];
window.addEventListener("error", (e) => {
  window.__errors.push(String(e.message || (e.target && (e.target.src || e.target.tagName)) || "error").slice(0, 200));
}, true);
window.addEventListener("load", () => {
  const imgs = Array.from(document.images).map((i) => ({
    figure: i.dataset.figure, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
  }));
  const sections = Array.from(document.querySelectorAll("section[id]")).map((s) => s.id);
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({imgs: imgs, sections: sections, errors: window.__errors});
  document.body.appendChild(out);
});
</script>
"""


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    profile = tmp / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_report_in_browser(report: Path, tmp: Path) -> dict:
    """Open ``report`` in headless Chromium; return the page's own record and the screenshot path.

    Raises AssertionError on console messages or when the DOM record is missing.
    """
    shot = tmp / "report_screenshot.png"
    r = _chromium(["--window-size=1400,3000", f"--screenshot={shot}", report.as_uri()], tmp)
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    assert r.returncode == 0, r.stderr[-3000:]
    assert not console, "console messages:\n" + "\n".join(console)
    assert shot.is_file() and shot.stat().st_size > 10_000

    html = report.read_text(encoding="utf-8")
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    assert csp in html
    checked = tmp / "report_checked.html"
    checked.write_text(
        html.replace(csp, csp + "; script-src 'unsafe-inline'").replace(
            "</body>", CHECK_SCRIPT + "</body>"
        ),
        encoding="utf-8",
    )
    r = _chromium(["--virtual-time-budget=10000", "--dump-dom", checked.as_uri()], tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, "console messages:\n" + "\n".join(console)
    m = re.search(r'<pre id="browser-check">(.*?)</pre>', r.stdout, re.S)
    assert m, "the checking script did not run (no #browser-check in the dumped DOM)"
    record = json.loads(
        m.group(1)
        .replace("&quot;", '"')
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
    )
    record["screenshot"] = shot
    return record


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it",
)
def test_report_opens_in_chromium_with_every_section_and_figure(tmp_path):
    out = tmp_path / "out"
    adata, prov = write_synthetic_run(out)
    pb = ad.AnnData(obs=pd.DataFrame(index=["pb0", "pb1"]))
    cfg = load_config(None, {"report": {"dpi": 60}})
    res = run_report(adata, pb, cfg, device=None, context=StageContext(out, prov))
    report = out / "report.html"
    res.files["report.html"](report)
    (out / "figures").mkdir()
    res.files["figures/"](out / "figures")
    figure_files = sorted(p.name for p in (out / "figures").iterdir())
    assert len(figure_files) >= 15

    record = check_report_in_browser(report, tmp_path)

    assert record["errors"] == []
    assert list(record["sections"]) == list(SECTION_IDS)
    shown = sorted(i["figure"] for i in record["imgs"])
    assert shown == figure_files
    bad = [i for i in record["imgs"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0)]
    assert bad == [], f"figures not decoded by the browser: {bad}"
    assert record["screenshot"].is_file()
