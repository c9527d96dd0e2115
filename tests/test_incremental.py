"""Incremental neighbours on real local Spark and Delta: a re-run after a few products were added,
changed and removed equals a full join over the same cells, and rewrites only the lists that change."""
import csv
import shutil

import pytest
from pyspark.sql import functions as F

from prodsim_spark import pipeline
from prodsim_spark.config import load_config
from prodsim_spark.tables import EMBEDDINGS, INDEX, NEIGHBOURS, RunTables
from conftest import ROOT, SAMPLE_CATALOG

# several cells on the 308-product sample, so that routing and spill matter; groups are not needed here
SETTINGS = ["join.block_size=40", "join.max_block_size=80", "join.exact_max_products=0", "group.enabled=false",
            f"ingest.image_root={ROOT / 'data' / 'sample'}"]


def write_catalog(rows, path):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return str(path)


def lists(df):
    return {r["product_id"]: (r["ids"], r["scores"]) for r in df.select(
        "product_id", F.col("neighbours.product_id").alias("ids"), F.col("neighbours.score").alias("scores")).collect()}


def test_an_incremental_run_equals_a_full_join_on_the_same_cells(spark, sample_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(sample_run[0], out)  # its embeddings are reused: only the edited products are encoded
    rows = list(csv.DictReader(open(SAMPLE_CATALOG, encoding="utf-8")))
    full = load_config(overrides=SETTINGS + ["join.incremental=false"])
    first = pipeline.run_pipeline(spark, write_catalog(rows, tmp_path / "v1.csv"), str(out), full)
    assert not first.incremental
    tables = RunTables.at(str(out))
    cells = len(tables.read(spark, INDEX).where("kind = 'cell'").collect())
    assert cells >= 5

    # near the end, as a daily export loses rows: the rows after them move up (a new source_row)
    removed = [r["product_id"] for r in rows[290:293]]
    edited = rows[:290] + rows[293:]
    for r in edited[100:103]:
        r["title"] = r["title"] + " family pack"  # changed text: new vectors
    edited[150]["price"] = "99.0"  # changed attribute only
    added = [{**rows[200], "product_id": "NEW1", "title": rows[200]["title"] + " organic"},
             {**rows[201], "product_id": "NEW2", "title": "store brand " + rows[201]["title"]}]
    config = load_config(overrides=SETTINGS + ["join.incremental=true"])
    second = pipeline.run_pipeline(spark, write_catalog(edited + added, tmp_path / "v2.csv"), str(out), config)
    assert second.incremental["new_or_changed"] == 6 and second.incremental["removed"] == 3
    assert 0 < second.incremental["rescored_unchanged"] < 300
    # the lists scored again: the changed products', those that held one, and those a new product
    # entered; not every list of the cells the new products landed in
    assert second.incremental["lists_updated"] < len(rows) / 2

    got = lists(tables.read(spark, NEIGHBOURS).where("status != 'rejected'"))
    want = lists(pipeline.lists_on_index(spark, str(out), config))
    assert set(got) == set(want) and {"NEW1", "NEW2"} <= set(got) and not set(removed) & set(got)
    for pid, want_list in want.items():
        assert got[pid] == want_list, pid  # the same ids in the same order, the same score bits (fusion.exact_top_k)
    assert not {n for ids, _ in got.values() for n in ids} & set(removed)  # gone from every list
    assert {"NEW1", "NEW2"} <= {n for ids, _ in got.values() for n in ids}

    # one MERGE that rewrote only the rows whose list (or source row) changed; the cells were kept
    from delta.tables import DeltaTable

    last = DeltaTable.forPath(spark, tables.neighbours).history(1).first()
    assert last["operation"] == "MERGE"
    metrics = {k: int(v) for k, v in last["operationMetrics"].items() if k.startswith("numTarget")}
    assert metrics["numTargetRowsInserted"] - metrics["numTargetRowsDeleted"] == 2 - 3
    assert 0 < metrics["numTargetRowsUpdated"] + metrics["numTargetRowsInserted"] < len(edited) / 2
    assert tables.read(spark, NEIGHBOURS).count() == len(edited) + len(added)
    assert len(tables.read(spark, INDEX).where("kind = 'cell'").collect()) == cells

    # a crash after the lists' MERGE, before the index members and the index were written: the re-run
    # finds the same changes again over lists that already hold them, and ends with the same lists
    for path in (tables.index_members, tables.index):
        table = DeltaTable.forPath(spark, path)
        table.restoreToVersion(table.history(2).collect()[-1]["version"])
    again = pipeline.run_pipeline(spark, write_catalog(edited + added, tmp_path / "v2.csv"), str(out), config)
    assert again.incremental["new_or_changed"] == 6
    after = lists(tables.read(spark, NEIGHBOURS).where("status != 'rejected'"))
    assert set(after) == set(got)
    for pid, (ids, scores) in got.items():
        assert after[pid][0] == ids, pid  # no neighbour listed twice
        assert after[pid][1] == pytest.approx(scores, abs=1e-5), pid

    # a change of the join's settings plans new cells, and says why (the decision a full run then takes)
    spill = load_config(overrides=SETTINGS + ["join.incremental=true", "join.spill=2"])
    kept, why = pipeline.previous_cells(spark, tables, spill, tables.read(spark, EMBEDDINGS))
    assert kept is None and why.startswith("the join settings changed") and "spill" in why
    assert pipeline.previous_cells(spark, tables, config, tables.read(spark, EMBEDDINGS))[1] is None
