"""report.html in a real headless browser: it loads without console errors, every figure decodes,
no table pushes the page wider than the window, and the first screen (saved as a screenshot) shows
the answer. Skipped, with the reason, where no Chromium is installed (``.ci/run`` installs it)."""

from __future__ import annotations

import html as _html
import json
import re
import shutil
import subprocess

import pytest

from .helpers import full_sweep, report_on

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
BROWSER = next((b for b in map(shutil.which, BROWSERS) if b), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium found (apt-get install -y chromium; "
                                                        ".ci/run installs it)")
WINDOW = (1280, 900)      # a laptop's first screen

# Injected before anything else of the page: records every error and console.error, and once the
# page has loaded writes what it found into the DOM, where --dump-dom prints it.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', function (e) {
  var t = e.target || {};
  window.__errors.push(e.message || ('failed to load ' + (t.tagName || '?') + ' ' + (t.alt || '')));
}, true);
var _ce = console.error;
console.error = function () { window.__errors.push('console.error: ' + [].join.call(arguments, ' ')); };
window.addEventListener('load', function () {
  var imgs = [].slice.call(document.images), h = window.innerHeight;
  var out = {images: imgs.length,
             undecoded: imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                            .map(function (i) { return i.alt; }),
             first_screen: imgs.filter(function (i) { return i.getBoundingClientRect().top < h; })
                               .map(function (i) { return i.alt; }),
             page_wider_than_window: document.documentElement.scrollWidth > document.documentElement.clientWidth,
             errors: window.__errors};
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--window-size={WINDOW[0]},{WINDOW[1]}", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow   # a three-seed report, then headless Chromium
def test_report_in_a_real_browser(tmp_path):
    out = full_sweep(tmp_path)
    report_on(tmp_path)
    page = out / "report.html"
    text = page.read_text()
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(text.replace("<head>", "<head>" + PROBE, 1))

    res = _chromium("--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom",
                    probe_page.as_uri())
    m = re.search(r'<pre id="probe">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the page did not finish loading in Chromium:\n{res.stderr[-2000:]}"
    found = json.loads(_html.unescape(m.group(1)))
    assert found["errors"] == [], found["errors"]
    console = [ln for ln in res.stderr.splitlines() if "CONSOLE" in ln]
    assert console == [], console
    assert found["images"] >= 3 and found["undecoded"] == []
    # the answer is on the first screen: the headline figure and the pruning curves
    assert any(a.startswith("Headline") for a in found["first_screen"]), found["first_screen"]
    assert any(a.startswith("pruning curves") for a in found["first_screen"]), found["first_screen"]
    # wide tables scroll inside their box instead of widening the page
    assert not found["page_wider_than_window"]

    shot = tmp_path / "report_first_screen.png"
    _chromium(f"--screenshot={shot}", page.as_uri())
    assert shot.is_file() and shot.stat().st_size > 20_000
    import matplotlib.image as mpimg

    img = mpimg.imread(shot)
    assert img.shape[:2] == (WINDOW[1], WINDOW[0]) and img[..., :3].std() > 0.05    # not a blank page


PAGE = 1400      # the width the report is read at (issue 28)
# Once loaded: every table's rendered width against the box it sits in, and every figure's shown width
# against its own (a figure shrunk to fit has smaller text than it was drawn with).
WIDTHS = """<script>
window.addEventListener('load', function () {
  var tables = [].slice.call(document.querySelectorAll('table')).map(function (t) {
    var box = t.parentElement;
    return {id: t.id || '', caption: (box.previousElementSibling || {}).textContent || '',
            width: t.getBoundingClientRect().width, box: box.clientWidth, scroll: box.scrollWidth};
  });
  var figs = [].slice.call(document.images).map(function (i) {
    return {alt: i.alt, shown: i.getBoundingClientRect().width, natural: i.naturalWidth};
  });
  var pre = document.createElement('pre'); pre.id = 'widths';
  pre.textContent = JSON.stringify({tables: tables, figures: figs,
                                    page: document.documentElement.scrollWidth, window: window.innerWidth});
  document.body.appendChild(pre);
});
</script>"""


def test_every_table_fits_a_1400px_page(tmp_path):

    out = full_sweep(tmp_path, every=True)
    report_on(tmp_path)
    page = tmp_path / "widths.html"
    page.write_text((out / "report.html").read_text().replace("<head>", "<head>" + WIDTHS, 1))
    res = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          f"--window-size={PAGE},900", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="widths">(.*?)</pre>', res.stdout, re.S)
    assert m, f"the page did not finish loading in Chromium:\n{res.stderr[-2000:]}"
    found = json.loads(_html.unescape(m.group(1)))
    assert len(found["tables"]) >= 12
    # no table is wider than its box: nothing is clipped or hidden behind a scroll
    wide = [(t["caption"][:60], round(t["width"]), t["box"]) for t in found["tables"] if t["scroll"] > t["box"] + 1]
    assert wide == [], wide
    assert found["page"] <= found["window"]
    # the small multiples are shown at the size they were drawn (their text as drawn, not shrunk)
    for f in found["figures"]:
        if f["alt"].startswith(("definitions", "training dynamics")):
            assert f["shown"] >= 0.97 * f["natural"], f
