"""The prodsim command as a user meets it."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest


from prodsim_spark import fusion, io
from conftest import SAMPLE_CATALOG

PRODSIM = str(Path(sys.executable).with_name("prodsim"))
SPARK_STARTED = "log4j"  # Spark prints its log4j profile line when a JVM starts


def run_cli(*args, timeout=120):
    return subprocess.run([PRODSIM, *args], capture_output=True, text=True, timeout=timeout)


def test_help_documents_commands():
    top = run_cli("--help")
    assert top.returncode == 0 and "run" in top.stdout
    sub = run_cli("run", "--help")
    assert sub.returncode == 0
    for flag in ("--catalog", "--output", "--format", "--conf", "--set"):
        assert flag in sub.stdout


def test_missing_required_column_fails_before_spark(tmp_path):
    catalog = tmp_path / "no_id.csv"
    catalog.write_text("sku,title,price\n1,shoe,3\n")
    proc = run_cli("run", "--catalog", str(catalog), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "missing required column 'product_id'" in proc.stderr and str(catalog) in proc.stderr
    assert SPARK_STARTED not in proc.stderr + proc.stdout  # no JVM was started
    assert not (tmp_path / "out").exists()


def test_bad_arguments_fail_clearly(tmp_path):
    missing = run_cli("run", "--catalog", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "nope.csv" in missing.stderr
    bad_set = run_cli("run", "--catalog", str(SAMPLE_CATALOG), "--output", str(tmp_path / "o"),
                      "--set", "ingest.format=xml")
    assert bad_set.returncode == 2 and "ingest.format" in bad_set.stderr and "parquet" in bad_set.stderr
    no_args = run_cli("run")
    assert no_args.returncode == 2 and "--catalog" in no_args.stderr
    unknown_fmt = run_cli("run", "--catalog", str(tmp_path), "--output", str(tmp_path / "o"))
    assert unknown_fmt.returncode == 2 and "--format" in unknown_fmt.stderr


def test_run_on_sample_catalog_keeps_every_row(spark, sample_run):
    out, printed = sample_run
    assert "status:" in printed and "duplicate_product_id" in printed
    assert (out / "catalog" / "_delta_log").is_dir()
    with open(SAMPLE_CATALOG, newline="", encoding="utf-8") as f:
        n_input = sum(1 for _ in csv.DictReader(f))
    catalog = io.read_delta(spark, str(out / "catalog"))
    assert catalog.count() == n_input
    by_id = {r["product_id"]: r for r in catalog.where("status != 'rejected'").collect()}
    assert by_id["X902"]["price"] == 1299.0
    assert by_id["X901"]["price"] is None and by_id["X901"]["reason"] == "unparsable_price"
    assert Path(by_id["G000"]["image_uri"]).is_file()  # relative image paths resolved
    # neighbours: one row per input row; rejected rows have an empty list and their reason
    neighbours = io.read_delta(spark, str(out / "neighbours"))
    rows = neighbours.collect()
    assert len(rows) == n_input and sorted(r["source_row"] for r in rows) == list(range(n_input))
    for r in rows:
        if r["status"] == "rejected":
            assert r["neighbours"] == [] and r["reason"]
            continue
        nbs = r["neighbours"]
        assert 0 < len(nbs) <= 10 and all(nb["product_id"] != r["product_id"] for nb in nbs)
        assert [nb["score"] for nb in nbs] == sorted((nb["score"] for nb in nbs), reverse=True)
        for nb in nbs:  # the component scores add up to the score
            parts = sum(nb[c] for c in fusion.PARTS)
            assert parts == pytest.approx(nb["score"], abs=1e-5)
    assert "sample neighbours" in printed
    # X900's image is a truncated JPEG: no image vector, but text neighbours and the reason kept
    emb = {r["product_id"]: r for r in io.read_delta(spark, str(out / "embeddings")).collect()}
    assert emb["X900"]["image_embedding"] is None and emb["X900"]["image_error"].startswith("image_unreadable")
    assert emb["X903"]["image_error"].startswith("image_missing")
