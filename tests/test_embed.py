"""The embed stage on real Spark and real Delta: encoders loaded once per worker, incremental runs."""
import csv
import shutil

import numpy as np

from prodsim_spark import embed, io
from prodsim_spark.config import load_config
from prodsim_spark.encoders import TextEncoder
from prodsim_spark.pipeline import RunResult, run_embed, run_ingest, run_join
from conftest import ROOT

FIELDS = ["product_id", "title", "description", "brand", "category", "price", "image_uri"]


def write_catalog(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in FIELDS})


def run(spark, catalog, out, *overrides):
    config = load_config(overrides=["embed.arrow_batch_size=4", *overrides])
    result = run_ingest(spark, str(catalog), str(out), config)
    return run_embed(spark, str(out), config, result).embed, config


def vectors(spark, out):
    return {r["product_id"]: r.asDict() for r in io.read_delta(spark, str(out / "embeddings")).collect()}


def test_incremental_runs_encode_only_what_changed(spark, tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    for name in ("G006", "G000", "G001"):
        shutil.copy(ROOT / f"data/sample/images/{name}.jpg", images / f"{name}.jpg")
    rows = [
        dict(product_id="P1", title="Banana", brand="Chiquita", category="Fruit", image_uri="img/G006.jpg"),
        dict(product_id="P2", title="Golden apple", category="Fruit", image_uri="img/G000.jpg"),
        dict(product_id="P3", title="Oat milk", description="Oat drink, 1 litre", brand="Oatly"),
        dict(product_id="P4", title="Green apple", image_uri="img/missing.jpg"),
        dict(product_id="", title="no id: rejected, never embedded"),
    ]
    catalog, out = tmp_path / "cat.csv", tmp_path / "out"
    write_catalog(catalog, rows)

    first, config = run(spark, catalog, out)
    assert (first["text_encoded"], first["image_encoded"], first["image_failed"]) == (4, 2, 1)
    got = vectors(spark, out)
    assert set(got) == {"P1", "P2", "P3", "P4"}
    assert got["P3"]["image_embedding"] is None and got["P3"]["image_error"] is None  # no image given
    assert got["P4"]["image_embedding"] is None and got["P4"]["image_error"].startswith("image_missing")
    assert len(got["P1"]["image_embedding"]) == 1280 and len(got["P1"]["text_embedding"]) == 384
    # the Spark path gives the bare encoder's vector for the composed text
    bare = TextEncoder(config.embed.text, "cpu").encode(["Banana. Chiquita. Fruit"])[0]
    assert np.abs(np.array(got["P1"]["text_embedding"]) - bare).max() < 1e-5

    second, _ = run(spark, catalog, out)
    assert (second["text_encoded"], second["image_encoded"], second["reused"]) == (0, 0, 4)

    rows[0]["title"] = "Organic banana"                 # P1: text changed
    rows[1]["image_uri"] = "img/G001.jpg"               # P2: image changed
    rows[3] = dict(product_id="P5", title="Pear")       # P4 removed, P5 new
    write_catalog(catalog, rows)
    third, config = run(spark, catalog, out)
    assert (third["text_encoded"], third["image_encoded"], third["removed"], third["new_products"]) == (2, 1, 1, 1)
    after = vectors(spark, out)
    # P4 is flagged, not yet deleted: the neighbours table of the last run may still list it
    assert {p for p, r in after.items() if r["removed_at"] is None} == {"P1", "P2", "P3", "P5"}
    assert after["P4"]["removed_at"] is not None
    run_join(spark, str(out), config, RunResult(output=str(out)))  # a neighbours table without P4: now deleted
    assert set(vectors(spark, out)) == {"P1", "P2", "P3", "P5"}
    assert after["P1"]["image_embedding"] == got["P1"]["image_embedding"]  # untouched modality kept
    assert after["P2"]["text_embedding"] == got["P2"]["text_embedding"]
    assert after["P2"]["image_embedding"] != got["P2"]["image_embedding"]
    assert after["P3"]["updated_at"] == got["P3"]["updated_at"]

    # a new text encoder id re-encodes every text and no image
    fourth, _ = run(spark, catalog, out, "embed.text.max_tokens=64")
    assert (fourth["text_encoded"], fourth["image_encoded"]) == (4, 0)


def test_copies_of_a_text_or_an_image_get_one_vector(spark, tmp_path):
    # a marketplace has many listings titled alike and many offers of one stock photo's URI: each
    # distinct text and URI is encoded once, so copies get the same vector bit for bit, not vectors
    # that differ in their last bits with whatever shared their batch (batches of 4 rows here)
    images = tmp_path / "img"
    images.mkdir()
    for name in ("G006", "G000", "G001"):
        shutil.copy(ROOT / f"data/sample/images/{name}.jpg", images / f"{name}.jpg")
    rows = []
    for i in range(24):
        if i % 3 == 0:
            rows.append(dict(product_id=f"C{i:02d}", title="Juice", image_uri="img/G006.jpg"))
        else:
            rows.append(dict(product_id=f"P{i:02d}", title=f"Orange juice, {'fresh ' * i}pressed",
                             image_uri=f"img/{('G000', 'G001')[i % 2]}.jpg"))
    catalog, out = tmp_path / "cat.csv", tmp_path / "out"
    write_catalog(catalog, rows)
    counts, _ = run(spark, catalog, out)
    assert (counts["text_encoded"], counts["image_encoded"]) == (24, 24)  # products given a fresh vector
    got = vectors(spark, out)
    copies = [got[r["product_id"]] for r in rows if r["product_id"].startswith("C")]
    assert len(copies) == 8
    for kind in ("text_embedding", "image_embedding"):
        assert all(c[kind] == copies[0][kind] for c in copies), kind
    assert got["P01"]["text_embedding"] != copies[0]["text_embedding"]


def test_removed_products_can_be_flagged(spark, tmp_path):
    catalog, out = tmp_path / "cat.csv", tmp_path / "out"
    write_catalog(catalog, [dict(product_id="A", title="red shoe"), dict(product_id="B", title="blue shoe")])
    run(spark, catalog, out, "embed.image.enabled=false")
    write_catalog(catalog, [dict(product_id="A", title="red shoe")])
    result, _ = run(spark, catalog, out, "embed.image.enabled=false", "embed.on_removed=flag")
    assert result["removed"] == 1
    got = vectors(spark, out)
    assert got["B"]["removed_at"] is not None and got["A"]["removed_at"] is None
    # B comes back: re-encoded and no longer flagged
    write_catalog(catalog, [dict(product_id="A", title="red shoe"), dict(product_id="B", title="blue shoe")])
    back, _ = run(spark, catalog, out, "embed.image.enabled=false", "embed.on_removed=flag")
    assert back["text_encoded"] == 1 and vectors(spark, out)["B"]["removed_at"] is None


def test_each_worker_loads_each_encoder_once(spark):
    config = load_config(overrides=["embed.text.max_tokens=32"])
    texts = spark.createDataFrame([(f"product number {i}",) for i in range(240)], "text string").repartition(8)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", "10")
    udf = embed.text_embedding_udf(config.embed, threads=1)
    assert texts.select(udf("text").alias("v")).where("size(v) = 384").count() == 240
    key = embed.encoder_key("text", config.embed.text.model_dump_json(), config.embed.device)
    stats = embed.worker_stats(spark, partitions=8)
    loads = {pid: s["loads"].get(key, 0) for pid, s in stats.items()}
    batches = sum(s["batches"].get(key, 0) for s in stats.values())
    assert max(loads.values()) == 1            # no worker loaded it twice
    assert batches >= 24 > sum(loads.values())  # 8 tasks x 3 batches each, served by <= 2 loads


def test_text_template_leaves_out_empty_fields_and_falls_back_to_the_next_alternative(spark):
    rows = [("A", "Red shoe", "soft leather upper", "Acme"), ("B", None, "a shoe without a title", ""),
            ("C", "Blue shoe", None, None), ("D", "", "", None)]
    df = spark.createDataFrame(rows, "product_id string, title string, description string, brand string")

    def texts(template, chars=300):
        got = df.select("product_id", embed.compose_text(template, chars).alias("t")).collect()
        return {r["product_id"]: r["t"] for r in got}

    assert texts("{title}. {brand}") == {"A": "Red shoe. Acme", "B": None, "C": "Blue shoe", "D": None}
    assert texts("{title|description}. {brand}", 6) == {"A": "Red shoe. Acme", "B": "a shoe", "C": "Blue shoe",
                                                        "D": None}
    assert texts("{brand}: {title}. {description}") == {"A": "Acme: Red shoe. soft leather upper",
                                                        "B": "a shoe without a title", "C": "Blue shoe", "D": None}
