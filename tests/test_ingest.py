"""Ingest on a real local Spark session: every input format, every validation reason, Delta round trip."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prodsim_spark import io
from prodsim_spark.config import IngestSettings, load_config
from prodsim_spark.errors import CatalogError
from prodsim_spark.ingest import REJECTING, check_columns, reason_counts, validate_catalog
from prodsim_spark.pipeline import run_ingest

MESSY_CSV = """product_id,title,description,brand,price,image_uri,color
A1,Widget  ,A fine widget,Acme,"$1,299.00",img/a1.jpg,red
A2,Gadget,,Acme,n/a,,blue
A1,Widget again,,Acme,5,,red
,No id product,,,3,,
,,,,,,
A3,Extra fields,x,y,1,,z,EXTRA
A5,,,,,,
A6,Negative,,,-4,,
A8,"Multi-line
description in quotes",,,USD 12.50,s3a://bucket/a8.jpg,
"""


def ingest_rows(spark, path, settings=None, **kw):
    settings = settings or IngestSettings()
    raw = io.read_catalog(spark, str(path), settings)
    df = validate_catalog(raw, settings, **kw)
    return {r["source_row"]: r.asDict() for r in df.collect()}, df


def test_csv_every_row_kept_with_status_and_reason(spark, tmp_path):
    path = tmp_path / "messy.csv"
    path.write_text(MESSY_CSV, encoding="utf-8")
    rows, df = ingest_rows(spark, path, image_root="/data/cat")
    assert sorted(rows) == list(range(9))  # 9 data rows in, 9 out, numbered in file order
    r = rows
    assert (r[0]["product_id"], r[0]["title"], r[0]["price"], r[0]["status"]) == ("A1", "Widget", 1299.0, "ok")
    assert r[0]["image_uri"] == "/data/cat/img/a1.jpg"  # relative path resolved against the catalog folder
    assert r[0]["color"] == "red" and r[0]["price_raw"] == "$1,299.00"  # extra columns carried through
    assert (r[1]["price"], r[1]["status"], r[1]["reason"]) == (None, "warn", "unparsable_price")
    assert (r[2]["status"], r[2]["reason"]) == ("rejected", "duplicate_product_id")
    assert (r[3]["status"], r[3]["reason"]) == ("rejected", "missing_product_id")
    assert (r[4]["status"], r[4]["reason"]) == ("rejected", "empty_row")
    assert (r[5]["status"], r[5]["reason"]) == ("rejected", "malformed_row")
    assert "EXTRA" in r[5]["source_corrupt_record"]
    assert (r[6]["status"], r[6]["reason"]) == ("rejected", "no_content")
    assert (r[7]["price"], r[7]["reason"]) == (None, "negative_price")
    assert r[8]["title"] == "Multi-line\ndescription in quotes" and r[8]["price"] == 12.5
    assert r[8]["image_uri"] == "s3a://bucket/a8.jpg" and r[8]["status"] == "ok"
    counts = reason_counts(df)
    assert counts["duplicate_product_id"] == 1 and counts["unparsable_price"] == 1


def test_truncation_and_bad_encoding(spark, tmp_path):
    path = tmp_path / "enc.csv"
    path.write_bytes(b"product_id,title,description\nB1,caf\xe9 latin-1,ok\nB2,tab\x01ctrl," + b"d" * 50 + b"\n")
    settings = IngestSettings(max_title_chars=8, max_description_chars=20)
    rows, _ = ingest_rows(spark, path, settings)
    assert rows[0]["title"] == "caf lati" and set(rows[0]["reason"].split(";")) == {"bad_encoding_title", "truncated_title"}
    assert rows[0]["status"] == "warn"
    assert rows[1]["title"] == "tabctrl" and len(rows[1]["description"]) == 20
    assert set(rows[1]["reason"].split(";")) == {"bad_encoding_title", "truncated_description"}


CANON = [
    {"product_id": "P1", "title": "Red shoe", "description": "leather", "brand": "Acme", "category": "Shoes",
     "price": "19.99", "image_uri": ""},
    {"product_id": "P2", "title": "Blue shoe", "description": "", "brand": "Acme", "category": "Shoes",
     "price": "n/a", "image_uri": ""},
    {"product_id": "P1", "title": "Red shoe dup", "description": "", "brand": "", "category": "",
     "price": "", "image_uri": ""},
    {"product_id": "", "title": "orphan", "description": "", "brand": "", "category": "", "price": "1",
     "image_uri": ""},
]
EXPECTED = [("P1", "ok", None), ("P2", "warn", "unparsable_price"), ("P1", "rejected", "duplicate_product_id"),
            (None, "rejected", "missing_product_id")]


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet", "delta"])
def test_each_input_format(spark, tmp_path, fmt):
    if fmt == "csv":
        path = tmp_path / "cat.csv"
        header = list(CANON[0])
        path.write_text(",".join(header) + "\n" + "\n".join(",".join(r[h] for h in header) for r in CANON) + "\n")
    elif fmt == "json":
        path = tmp_path / "cat.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in CANON) + "\n")
    elif fmt == "parquet":
        path = tmp_path / "cat.parquet"
        pq.write_table(pa.Table.from_pylist(CANON), path)
    else:
        path = tmp_path / "cat_delta"
        spark.createDataFrame(CANON).coalesce(1).write.format("delta").save(str(path))
    assert io.detect_format(str(path), "auto") == fmt
    rows, _ = ingest_rows(spark, path)
    got = [(rows[i]["product_id"], rows[i]["status"], rows[i]["reason"]) for i in sorted(rows)]
    assert got == EXPECTED


def test_json_malformed_line_is_kept(spark, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"product_id": "J1", "title": "ok", "price": 3}\n{"product_id": "J2", "title": \n')
    rows, _ = ingest_rows(spark, path)
    assert rows[0]["status"] == "ok" and rows[0]["price"] == 3.0
    assert rows[1]["status"] == "rejected" and rows[1]["reason"] == "malformed_row"


def test_column_mapping_and_missing_optional_columns(spark, tmp_path):
    path = tmp_path / "google.csv"
    path.write_text('id,name,manufacturer,cost\nG1,"learning quickbooks 2007",intuit,38.99\n')
    config = load_config(overrides=["ingest.columns.product_id=id", "ingest.columns.title=name",
                                    "ingest.columns.brand=manufacturer", "ingest.columns.price=cost"])
    rows, df = ingest_rows(spark, path, config.ingest)
    assert rows[0]["product_id"] == "G1" and rows[0]["brand"] == "intuit" and rows[0]["price"] == 38.99
    assert rows[0]["description"] is None and rows[0]["status"] == "ok"
    assert "name" not in df.columns and "id" not in df.columns  # mapped sources are not duplicated


def test_source_from_its_column_or_the_id_prefix(spark, tmp_path):
    path = tmp_path / "pooled.csv"
    path.write_text("product_id,title,source\namazon:b000jz4hqo,clickart,\ngoogle:http://g.co/1,clickart 950,\n"
                    "S1,shop item,shop-7\nB000X,no prefix,\n:x,empty prefix,\n")
    rows, _ = ingest_rows(spark, path)
    assert [rows[i]["source"] for i in range(5)] == ["amazon", "google", "shop-7", None, None]
    assert rows[1]["product_id"] == "google:http://g.co/1"  # the id itself is kept whole
    off = load_config(overrides=["ingest.source_id_separator=null"]).ingest
    rows, _ = ingest_rows(spark, path, off)
    assert [rows[i]["source"] for i in range(5)] == [None, None, "shop-7", None, None]
    pipe = load_config(overrides=["ingest.source_id_separator='|'"]).ingest  # a regex character, taken literally
    path.write_text("product_id,title\nfeed1|A,a\nB,b\n")
    rows, _ = ingest_rows(spark, path, pipe)
    assert (rows[0]["source"], rows[1]["source"]) == ("feed1", None)


def test_missing_required_column_is_named():
    with pytest.raises(CatalogError) as err:
        check_columns(["sku", "title"], IngestSettings(), path="x.csv")
    assert "'product_id'" in str(err.value) and "x.csv" in str(err.value)
    with pytest.raises(CatalogError, match="content columns"):
        check_columns(["product_id", "brand"], IngestSettings())


def test_unreadable_catalog_names_path(spark, tmp_path):
    with pytest.raises(CatalogError, match="no such file"):
        io.read_catalog(spark, str(tmp_path / "nope.csv"), IngestSettings())
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(CatalogError) as err:
        io.read_catalog(spark, str(junk), IngestSettings())
    assert "junk.parquet" in str(err.value)


def test_pipeline_round_trip_through_delta(spark, tmp_path):
    path = tmp_path / "messy.csv"
    path.write_text(MESSY_CSV, encoding="utf-8")
    out = tmp_path / "out"
    result = run_ingest(spark, str(path), str(out), load_config())
    assert (out / "catalog" / "_delta_log").is_dir()
    back = io.read_delta(spark, str(out / "catalog"))
    direct, _ = ingest_rows(spark, path, image_root=str(tmp_path))
    stored = {r["source_row"]: r.asDict() for r in back.collect()}
    assert stored == direct
    assert result.rows == 9 and result.status == {"ok": 2, "warn": 2, "rejected": 5}
    assert set(result.reasons) <= set(REJECTING) | {"unparsable_price", "negative_price"}
    # a second run replaces the table in one new transaction and keeps its history
    run_ingest(spark, str(path), str(out), load_config())
    from delta.tables import DeltaTable
    assert DeltaTable.forPath(spark, str(out / "catalog")).history().count() == 2
    assert io.read_delta(spark, str(out / "catalog")).count() == 9


def test_image_paths_outside_the_catalog_are_never_opened(spark, tmp_path):
    """Seller catalogs are untrusted: an image_uri may only point under the catalog's folder (or a
    configured root) or use an allowed scheme; anything else is flagged and set to null."""
    shop = tmp_path / "shop"
    (shop / "img").mkdir(parents=True)
    (shop / "img" / "ok.jpg").write_bytes(b"x")
    secret = tmp_path / "private.jpg"
    secret.write_bytes(b"x")
    (shop / "img" / "link.jpg").symlink_to(secret)
    uris = ["img/ok.jpg", "../private.jpg", str(secret), secret.as_uri(), "img/link.jpg", "/proc/self/environ",
            "http://169.254.169.254/latest/meta-data", "s3a://bucket/a.jpg"]
    path = shop / "cat.csv"
    path.write_text("product_id,title,image_uri\n" + "".join(f"P{i},t{i},{u}\n" for i, u in enumerate(uris)))
    rows, _ = ingest_rows(spark, path, image_root=str(shop))
    by_uri = dict(zip(uris, (rows[i] for i in range(len(uris)))))
    assert by_uri["img/ok.jpg"]["image_uri"] == str((shop / "img" / "ok.jpg").resolve())
    assert by_uri["img/ok.jpg"]["reason"] is None and by_uri["img/ok.jpg"]["image_uri_raw"] is None
    assert by_uri["s3a://bucket/a.jpg"]["image_uri"] == "s3a://bucket/a.jpg"
    for uri in uris[1:-1]:
        row = by_uri[uri]
        assert row["image_uri"] is None and row["reason"] == "image_not_allowed" and row["status"] == "warn", uri
        assert row["image_uri_raw"] and ": " in row["image_uri_raw"]
    # a root the user allows
    allowed = IngestSettings(image_roots=[str(tmp_path)])
    rows, _ = ingest_rows(spark, path, allowed, image_root=str(shop))
    assert rows[2]["image_uri"] == str(secret.resolve()) and rows[2]["reason"] is None


def test_trimmed_ids_and_json_price_objects_say_what_happened(spark, tmp_path):
    path = tmp_path / "cat.csv"
    path.write_text("product_id,title\nA1,first\n A1 ,second\n")
    rows, _ = ingest_rows(spark, path)
    assert rows[1]["product_id"] == "A1" and rows[1]["status"] == "rejected"
    assert set(rows[1]["reason"].split(";")) == {"id_trimmed", "duplicate_product_id"}  # says why it collides
    feed = tmp_path / "cat.jsonl"
    feed.write_text('{"product_id": "J1", "title": "t", "price": {"amount": 5, "currency": "EUR"}}\n')
    rows, _ = ingest_rows(spark, feed)
    assert json.loads(rows[0]["price_raw"]) == {"amount": "5", "currency": "EUR"}  # keys kept
    assert rows[0]["reason"] == "unparsable_price"
