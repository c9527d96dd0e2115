"""Grouping listings of one product on real Spark: connected components, the chaining guard, average
linkage, the groups table, stable group ids, and the pairwise / B-cubed scores."""
import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from prodsim_spark import cli, groups, join
from prodsim_spark.config import GroupSettings, JoinSettings, load_config
from prodsim_spark.evaluate import group_metrics
from prodsim_spark.tables import GROUPS, RunTables
from conftest import ROOT, SAMPLE_CATALOG

NB = "array<struct<product_id:string,score:float>>"


def neighbours_of(spark, lists: dict[str, list[tuple[str, float]]]):
    return spark.createDataFrame([(p, [(q, float(s)) for q, s in nbs]) for p, nbs in lists.items()],
                                 f"product_id string, neighbours {NB}")


def test_connected_components_label_every_node_with_its_lowest_member(spark):
    chain = [(f"n{i:03d}", f"n{i + 1:03d}") for i in range(60)]  # a long chain converges in a few jumps
    edges = spark.createDataFrame(chain + [("x", "y")], "src string, dst string")
    nodes = spark.createDataFrame([(f"n{i:03d}",) for i in range(61)] + [("x",), ("y",), ("z",)], "product_id string")
    got = {r["product_id"]: r["component"] for r in groups.connected_components(nodes, edges).collect()}
    assert {got[f"n{i:03d}"] for i in range(61)} == {"n000"}
    assert got["x"] == got["y"] == "x" and got["z"] == "z"



def test_iterations_do_not_compound_the_planners_size_estimate(spark):
    """A plain checkpoint keeps the estimate of the plan it cut, and each join multiplies estimates: after
    twenty iterations Spark spent minutes on numbers of a million digits before every job (a grocery
    threshold sweep hung). The stage's checkpoint starts each estimate afresh."""
    labels = groups.checkpoint(spark.range(100).selectExpr("cast(id as string) as product_id", "cast(id as string) as label"))
    for _ in range(12):  # with a plain checkpoint: an estimate of ~30,000 digits
        other = labels.withColumnRenamed("product_id", "via_id").withColumnRenamed("label", "via")
        labels = groups.checkpoint(labels.join(other, labels["label"] == other["via_id"], "left")
                                   .selectExpr("product_id", "least(label, coalesce(via, label)) as label"))
    estimate = labels._jdf.queryExecution().optimizedPlan().stats().sizeInBytes()
    assert len(str(estimate)) < 30 and labels.count() == 100

def test_the_chaining_guard_splits_a_long_chain_at_a_higher_threshold(spark):
    # a chain a0 - a1 - ... - a9 whose every third link is weak: one component of 10 at 0.7
    lists = {f"a{i}": [(f"a{i + 1}", 0.75 if i % 3 == 2 else 0.95)] for i in range(9)}
    nodes = spark.createDataFrame([(f"a{i}",) for i in range(10)], "product_id string")
    edge_table = groups.edges(neighbours_of(spark, lists), 0.7)
    components = groups.connected_components(nodes, edge_table)
    assert components.select("component").distinct().count() == 1
    parts, split = groups.split_oversized(components, edge_table, GroupSettings(threshold=0.7, max_size=4))
    sizes = parts.groupBy("part").count().collect()
    assert split == 1 and max(r["count"] for r in sizes) <= 4 and len(sizes) == 4  # cut at the weak links


def test_average_linkage_keeps_look_alikes_apart_that_a_chain_joins():
    rng = np.random.default_rng(0)
    base = np.linalg.qr(rng.normal(size=(16, 2)))[0].T  # two orthogonal products
    a = base[0] + 0.05 * rng.normal(size=(4, 16))      # four listings of product A
    b = base[1] + 0.05 * rng.normal(size=(4, 16))      # four of product B
    bridge = (base[0] + base[1])[None, :]              # one listing halfway (0.71 to both): a chain joins A and B
    vectors = np.vstack([a, b, bridge])
    pdf = pd.DataFrame({"product_id": [f"A{i}" for i in range(4)] + [f"B{i}" for i in range(4)] + ["M"],
                        "text_embedding": list(vectors.astype(np.float32)), "image_embedding": [None] * 9,
                        "lexical_embedding": [None] * 9, "brand": -1, "category": -1, "log_price": np.nan, "source": -1})
    linkage = groups.Linkage({"text": 16, "image": 0, "lexical": 0}, JoinSettings(), 0.8, 0.0)
    got = groups.average_linkage(pdf, linkage).set_index("product_id")
    assert len({got.loc[f"A{i}", "group_id"] for i in range(4)}) == 1
    assert got.loc["A0", "group_id"] != got.loc["B0", "group_id"]
    assert got.loc["A0", "group_id"] == "A0" and got.loc["B1", "group_id"] == "B0"  # the lowest id names a group
    assert got.loc["A0", "group_size"] == 4 and got.loc["M", "group_size"] == 1


def test_a_title_many_different_photos_share_does_not_outvote_the_photos():
    """Grocery-like listings: twelve photos of two juices, all titled "Juice" (one text, one lexical
    vector), and two text-only listings of a third product with its full name. The shared title weighs
    1/sqrt(11) in the linkage, so the photos split the juices; the text-only pair, with nothing else to
    compare, stays together. Without the specificity weight the title merges the two juices."""
    rng = np.random.default_rng(1)
    photo = np.linalg.qr(rng.normal(size=(32, 2)))[0].T
    juice_a = photo[0] + 0.1 * rng.normal(size=(6, 32))
    juice_b = 0.75 * photo[0] + 0.66 * photo[1] + 0.1 * rng.normal(size=(6, 32))  # a look-alike carton
    title = rng.normal(size=(16,)).astype(np.float32)
    full_name = rng.normal(size=(16,)).astype(np.float32)
    ids = [f"A{i}" for i in range(6)] + [f"B{i}" for i in range(6)] + ["T0", "T1"]
    texts = [title] * 12 + [full_name] * 2
    pdf = pd.DataFrame({"product_id": ids, "text_embedding": texts, "lexical_embedding": texts,
                        "image_embedding": list(np.vstack([juice_a, juice_b]).astype(np.float32)) + [None, None],
                        "brand": -1, "category": -1, "log_price": np.nan, "source": -1})
    dims = {"text": 16, "image": 32, "lexical": 16}
    specificity = groups.text_specificity(join.products_from_columns(pdf, dims))
    np.testing.assert_allclose(specificity, [11 ** -0.5] * 12 + [1.0, 1.0], rtol=1e-6)  # a copy keeps its weight
    got = groups.average_linkage(pdf, groups.Linkage(dims, JoinSettings(), 0.8, 0.0)).set_index("product_id")
    assert got.loc["A0", "group_size"] == 6 and got.loc["B0", "group_size"] == 6
    assert got.loc["A0", "group_id"] != got.loc["B0", "group_id"]
    assert got.loc["T0", "group_id"] == got.loc["T1", "group_id"] == "T0"
    plain = groups.average_linkage(pdf, groups.Linkage(dims, JoinSettings(), 0.8, 0.0, text_specificity=False))
    assert plain.set_index("product_id").loc["A0", "group_size"] == 12


def test_pairwise_and_bcubed_scores(spark):
    predicted = spark.createDataFrame([("a", "a"), ("b", "a"), ("c", "a"), ("d", "d"), ("e", "e")],
                                      "product_id string, group_id string")
    truth = spark.createDataFrame([("a", "1"), ("b", "1"), ("d", "1"), ("c", "2")], "product_id string, group string")
    got = group_metrics(predicted, truth)
    # predicted pairs ab ac bc; true pairs ab ad bd: one in common
    assert (got["pairwise_precision"], got["pairwise_recall"]) == (round(1 / 3, 4), round(1 / 3, 4))
    assert got["products"] == 5 and got["groups"] == 3 and got["largest_group"] == 3
    # B-cubed precision: a, b 2/3, c 1/3, d 1, e 1 (alone in truth too) -> 11/15
    assert got["bcubed_precision"] == round((2 / 3 + 2 / 3 + 1 / 3 + 1 + 1) / 5, 4)


def test_group_writes_one_row_per_catalog_row_with_stable_ids(spark, sample_run, tmp_path):
    out, printed = sample_run
    assert "groups:" in printed  # prodsim run groups after the neighbours
    rows = RunTables.at(str(out)).read(spark, GROUPS).collect()
    assert len(rows) == RunTables.at(str(out)).read(spark, "catalog").count()  # one row per catalog row
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert rejected and all(r["group_id"] is None for r in rejected)
    table = {r["product_id"]: r for r in rows if r["status"] != "rejected"}
    members: dict[str, list[str]] = {}
    for r in table.values():
        if r["group_id"] is not None:
            members.setdefault(r["group_id"], []).append(r["product_id"])
    for gid, ids in members.items():
        assert gid == min(ids) and all(table[i]["group_size"] == len(ids) for i in ids)
        assert table[ids[0]]["representative"] in ids
        if len(ids) > 1:
            assert table[ids[0]]["min_edge_score"] <= table[ids[0]]["max_edge_score"]
    assert max(len(v) for v in members.values()) <= load_config().group.max_size

    # evaluate --groups sweeps the thresholds and writes the best one as a config
    fitted = tmp_path / "threshold.yaml"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["evaluate", "--groups", "--output", str(out), "--pairs", str(ROOT / "data/sample/groups.csv"),
                         "--json", "--write", str(fitted), "--set", "evaluate.group_thresholds=[0.6,0.8]",
                         "--progress", "off"]) == 0
    result = json.loads(printed.getvalue()[printed.getvalue().index("{"):])
    assert set(result["thresholds"]) == {"0.6", "0.8"} and 0 < result["best"]["pairwise_f1"] <= 1
    assert load_config([fitted]).group.threshold == result["best_threshold"]


@pytest.mark.slow
def test_a_rerun_after_a_small_change_keeps_the_ids_of_unchanged_groups(spark, sample_run, tmp_path):
    out, _ = sample_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    before = group_members(spark, run)
    with open(SAMPLE_CATALOG, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    changed = tmp_path / "catalog.csv"
    with open(changed, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows[:-3])  # three products fewer
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["run", "--catalog", str(changed), "--output", str(run), "--progress", "off",
                         "--set", f"ingest.image_root={SAMPLE_CATALOG.parent}"]) == 0
    after = group_members(spark, run)
    kept = {members: gid for gid, members in before.items()}
    same = [(gid, kept[members]) for gid, members in after.items() if members in kept]
    assert len(same) >= 0.8 * len(after)  # most groups did not change
    assert all(a == b for a, b in same)   # and kept their ids


def group_members(spark, out) -> dict:
    members: dict[str, set] = {}
    for r in RunTables.at(str(out)).read(spark, GROUPS).where("group_id IS NOT NULL").collect():
        members.setdefault(r["group_id"], set()).add(r["product_id"])
    return {gid: frozenset(m) for gid, m in members.items()}
