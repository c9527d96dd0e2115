"""prodsim report: the page's parts (pure) and the whole page rendered by a real headless Chromium."""
import re
import shutil
import subprocess

from prodsim_spark import cli, report
from prodsim_spark.fusion import PARTS
from conftest import ROOT

GROUPS = ROOT / "data" / "sample" / "groups.csv"


def test_score_bar_splits_the_score_into_positive_components():
    nb = {"product_id": "b", "brand": "Acme", "price": 3.5, "score": 0.6,
          "parts": {"text": 0.3, "image": 0.25, "lexical": 0.1, "brand": 0.0, "category": 0.0, "price": -0.05}}
    bar = report._score_bar(nb)
    widths = {c: float(w) for c, w in re.findall(r'data-component="(\w+)" style="width:([\d.]+)%', bar)}
    assert widths == {"text": 30.0, "image": 25.0, "lexical": 10.0}  # zero and negative parts are not drawn
    assert "price: -0.050" in bar and "0.600" in bar  # ... but the tooltip lists them, and the score is shown


def test_page_is_self_contained_and_escapes_catalog_text():
    nb = {"product_id": "n1", "title": "Milk <b>", "brand": "Arla", "price": 1.25, "score": 0.5,
          "parts": {c: 0.5 / len(PARTS) for c in PARTS}}
    data = report.ReportData(output="o", rows=2, with_neighbours=1, status={"ok": 2}, reasons={},
                             samples=[{"product": {"product_id": "p1", "title": "Tom & Jerry"}, "neighbours": [nb]}],
                             top1_hist=[1] + [0] * (report.BINS - 1), all_hist=[1] + [0] * (report.BINS - 1),
                             hist_range=(0.0, 1.0), component_means={c: 0.1 for c in PARTS},
                             recall_curve=[(1, 0.5), (2, 1.0)], pairs_queries=2)
    page = report.render_html(data)
    assert "Tom &amp; Jerry" in page and "Milk &lt;b&gt;" in page
    assert "Arla · 1.25" in page  # the neighbour's catalog fields, not its score parts of the same names
    assert 'id="plot-recall"' in page and 'id="plot-scores"' in page
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from elsewhere


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    assert found, "no chromium: bin/test installs Debian's chromium package (apt-get install chromium)"
    return found


def test_report_renders_in_headless_chromium(sample_run, artifacts_dir, capsys):
    out, _ = sample_run
    page = artifacts_dir / "report.html"
    assert cli.main(["report", "--output", str(out), "--sample", "6", "--pairs", str(GROUPS),
                     "--html", str(page), "--progress", "off"]) == 0
    assert "6 products" in capsys.readouterr().out
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               "--virtual-time-budget=5000"]
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    # the rendered DOM: 6 product rows, each with its query card and 10 neighbour cards with score bars
    rows = re.findall(r'<section class="product-row" data-product-id="([^"]+)">', dom)
    assert len(rows) == 6 and len(set(rows)) == 6
    assert dom.count('class="card neighbour"') == 60 and dom.count('class="score"') == 60
    assert dom.count('class="seg"') >= 60  # every neighbour's bar has at least one coloured part
    # every picture (thumbnails and plots) was decoded by the browser, and there are thumbnails
    loaded = int(re.search(r'data-images-loaded="(\d+)"', dom).group(1))
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    assert loaded == total and dom.count('class="thumb"') >= 30
    assert 'id="plot-recall"' in dom and 'id="plot-scores"' in dom
    # a sample of the run's groups, each with its members' cards, the representative first
    groups = re.findall(r'<section class="group-row" data-group-id="([^"]+)">', dom)
    assert 1 <= len(groups) <= 8 and dom.count('class="rep"') == len(groups)
    assert dom.count('class="card member"') >= 2 * len(groups)
    assert not re.search(r"\b\d\.\d{5,}", dom)  # cards show catalog prices, not raw score floats
    shot = artifacts_dir / "report.png"
    shot.unlink(missing_ok=True)
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1500,1400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image, ImageStat

    with Image.open(shot) as im:
        assert im.size == (1500, 1400)
        assert max(ImageStat.Stat(im.convert("L")).stddev) > 20  # a page with pictures, not a blank one


def test_report_needs_a_finished_run(spark, tmp_path, capsys):
    assert cli.main(["report", "--output", str(tmp_path / "nothing"), "--progress", "off"]) == 2
    assert "prodsim run" in capsys.readouterr().err
