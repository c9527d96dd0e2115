"""Catalogs whose titles have no spaces between words (Chinese, Japanese): the lexical channel's terms,
character-safe text handling, and the bundled Chinese sample catalog end to end."""
import contextlib
import io
import json

from prodsim_spark import cli, lexical
from prodsim_spark.config import LexicalSettings
from conftest import ROOT

SAMPLE_ZH = ROOT / "data" / "sample-zh"


def test_han_and_kana_characters_are_terms_of_their_own(spark):
    df = spark.createDataFrame([("1", "恒源祥女士纯羊毛衫 V领"), ("2", "Xiaomi 小米手环8 NFC版"), ("3", "ソニー ヘッドホン")],
                               "product_id string, title string")
    got = {r["product_id"]: r["lexical_text"] for r in lexical.lexical_text(df, LexicalSettings()).collect()}
    assert got["1"] == "恒 源 祥 女 士 纯 羊 毛 衫 v 领"
    assert got["2"] == "xiaomi 小 米 手 环 8 nfc 版"  # Latin and digits keep their words
    assert got["3"] == "ソ ニ ー ヘ ッ ド ホ ン"


def test_the_chinese_sample_catalog_finds_its_duplicates(spark, tmp_path):
    out = tmp_path / "zh"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["run", "--catalog", str(SAMPLE_ZH / "catalog.csv"), "--output", str(out), "--progress", "off",
                         "--set", "ingest.max_title_chars=20"]) == 0
        assert cli.main(["evaluate", "--output", str(out), "--pairs", str(SAMPLE_ZH / "groups.csv"), "--json"]) == 0
    text = printed.getvalue()
    assert "prodsim run: 51 catalog rows" in text and "51 of 51 rows have neighbours" in text
    metrics = json.loads(text[text.index("{"):])["neighbours table"]
    assert metrics["queries"] == 51
    # every listing's first neighbour is another shop's listing of the same product, for almost all
    assert metrics["recall@1"] >= 0.9 and metrics["recall@5"] == 1.0

    # titles over 20 characters were cut on a character boundary (no broken UTF-8), and flagged
    from prodsim_spark.tables import RunTables

    catalog = RunTables.at(str(out)).read(spark, "catalog")
    cut = catalog.where("reason LIKE '%truncated_title%'").collect()
    assert cut and all(len(r["title"]) == 20 and "\ufffd" not in r["title"] for r in cut)
