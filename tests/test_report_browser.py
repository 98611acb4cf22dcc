"""The report as a user sees it: reports/index.html rendered in headless Chromium (skipped when no
Chromium is installed; .ci/run installs Debian's chromium-headless-shell when it runs as root).

A page built here from a small grid (fast), and the repository's own reports/index.html when a run
has written it (CI runs `make run` first): every table present, every image decoded by the browser
(none broken), and a screenshot that is not blank."""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")
BROWSER = next((path for path in map(shutil.which, BROWSERS) if path), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason=f"no headless browser installed (looked for {', '.join(BROWSERS)})")

# Run by the browser once the page has loaded: what a reader would see, written into the DOM for --dump-dom.
PROBE = """<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const result = {tables: document.querySelectorAll('table').length,
                  rows: document.querySelectorAll('table tbody tr').length,
                  images: images.length,
                  broken: images.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt),
                  headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent)};
  const out = document.createElement('pre'); out.id = 'ux-probe'; out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def _browser(*args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]
    return subprocess.run([BROWSER, *flags, *args], capture_output=True, text=True, timeout=120, check=False)


def _render(page: Path, tmp_path: Path) -> tuple[dict, Path]:
    """The probe's findings on `page` and a screenshot of it."""
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _browser("--dump-dom", probed.as_uri())
    found = re.search(r'<pre id="ux-probe">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, f"the page did not finish loading in the browser:\n{dom.stderr[-2000:]}"
    shot = tmp_path / "shot.png"
    _browser("--window-size=1400,2400", f"--screenshot={shot}", page.as_uri())
    assert shot.is_file(), "the browser wrote no screenshot"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")), shot


def _not_blank(shot: Path) -> bool:
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    return pixels.shape[0] > 100 and float(pixels[..., :3].std()) > 0.05


@pytest.fixture
def small_page(repo_params, tmp_path):
    """A report page from the ranking tests' small grid: the ranking, the generality table and a plot."""
    from test_report_ranking import _setting

    from unlearnops import report

    params = copy.deepcopy(repo_params)
    setting = params["ops"]["benchmark_setting"]
    res = _setting(params, {"finetune": (0.4, 0.35, 0.55), "scrub": (0.6, 0.5, 0.7), "muso": (0.1, 0.05, 0.2)},
                   {"finetune": 0.1, "scrub": 0.4, "muso": 1.5})
    results = {setting: res}
    auto = report.auto_choice(params, results)
    ranked = report.setting_ranking(setting, res, auto)
    plot = report.plot_final_vs_time(res, tmp_path / "plots" / "final_vs_time.png", auto["method"])
    page = report.write_html(tmp_path / "index.html", "unlearnops benchmark", [report.recommendation(setting, ranked, res, auto)],
                             {f"Ranking: {setting}": report.ranking_shown(ranked), "Generality": report.generality(results)},
                             {}, {f"{setting}: Final vs time per model": plot})
    return page


def test_the_report_renders_with_its_tables_and_images(small_page, tmp_path):
    found, shot = _render(small_page, tmp_path)
    assert found["tables"] == 2 and found["rows"] == 3 + 3
    assert found["images"] == 1 and found["broken"] == []
    assert found["headings"][0].startswith("Ranking: ")
    assert _not_blank(shot)


@pytest.mark.skipif(not (REPO / "reports" / "index.html").is_file(), reason="no reports/index.html (run the pipeline first)")
def test_the_pipelines_report_renders(tmp_path):
    page = REPO / "reports" / "index.html"
    found, shot = _render(page, tmp_path)
    assert found["tables"] >= 4 and found["rows"] > 0
    assert found["images"] == page.read_text().count("data:image/png;base64,") > 0 and found["broken"] == []
    assert any(h.startswith("Ranking: ") for h in found["headings"])
    assert _not_blank(shot)
