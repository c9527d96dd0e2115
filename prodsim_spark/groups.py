"""Group stage: listings of the same product, from the neighbour lists, on Spark.

1. Edges: neighbour pairs scoring at least ``group.threshold`` (optionally only pairs that list each
   other, ``group.mutual``).
2. Connected components of the edges, on Spark's DataFrame operators (:func:`connected_components`):
   iterative min-label propagation with pointer jumping, the lineage cut by a checkpoint every
   iteration (GraphFrames for Spark 4 is not served here; Splink computes its clusters the same way).
3. Chaining guard: thresholded components chain look-alikes into giant groups (A ~ B ~ C ... while A
   and Z share nothing). A component larger than ``group.max_size`` is split again by its own edges
   at a threshold ``group.split_step`` higher, until every part fits.
4. Average linkage inside each part (a pandas UDF per part, after Spark has found the parts): the
   fused score of *every* pair of its members is computed from their vectors, and clusters merge
   while their mean pairwise score is at least ``group.threshold``. A group then holds listings that
   are alike on average, not just linked by a chain of close pairs; this is what keeps look-alike
   products of one kind apart. With ``group.text_specificity``, a text that n other listings of the
   part share weighs 1/sqrt(n) in their pairs' scores (:func:`text_specificity`): a vague title that
   many different products carry stops outvoting their photos.

Groups table (``<output>/groups``), one row per catalog row:

=================  ========  ==============================================================
column             type      meaning
=================  ========  ==============================================================
product_id         string
source_row, status           as in the catalog
reason             string    the catalog's reason (a rejected row has no group)
group_id           string    the lowest product_id of the group: stable while the group keeps
                             its members, so downstream tables can join on it
group_size         int       1 for a product alone in its group
representative     string    the member most similar to the others (highest mean score)
min_edge_score     float     lowest / highest neighbour-list score between two members (null
max_edge_score     float     for a group of one)
=================  ========  ==============================================================
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark import fusion, join
from prodsim_spark.config import GroupSettings, JoinSettings

log = logging.getLogger(__name__)

CLUSTERED = T.StructType([T.StructField("product_id", T.StringType()), T.StructField("group_id", T.StringType()),
                          T.StructField("group_size", T.IntegerType()), T.StructField("representative", T.StringType())])


def checkpoint(df: DataFrame) -> DataFrame:
    """``df`` materialised with its plan cut (a local checkpoint), re-wrapped so that its size estimate
    starts afresh. Why: a checkpoint keeps the estimate of the plan it replaces, and a join multiplies
    its sides' estimates, so in an iterative loop of joins the estimate squares every iteration; after a
    few dozen iterations Spark spent minutes multiplying numbers of millions of digits before each job."""
    cut = df.localCheckpoint(eager=True)
    jvm = getattr(cut, "_jdf", None)
    if jvm is None:  # Spark Connect: no JVM handle here; the server's own plan cache applies
        return cut
    return DataFrame(cut.sparkSession._jsparkSession.createDataFrame(jvm.javaRDD(), jvm.schema()), cut.sparkSession)


def edges(neighbours: DataFrame, threshold: float, *, mutual: bool = False) -> DataFrame:
    """(src, dst, score): undirected pairs (src < dst) that a neighbour list links with a score of at least
    ``threshold`` (the higher score when both lists have the pair); with ``mutual``, only pairs that
    both products list."""
    directed = (neighbours.select(F.col("product_id").alias("a"), F.explode("neighbours").alias("n"))
                .select("a", F.col("n.product_id").alias("b"), F.col("n.score").alias("score"))
                .where(F.col("score") >= threshold))
    pairs = directed.select(F.least("a", "b").alias("src"), F.greatest("a", "b").alias("dst"), "score")
    agg = pairs.groupBy("src", "dst").agg(F.max("score").alias("score"), F.count("*").alias("listed"))
    return (agg.where("listed = 2") if mutual else agg).select("src", "dst", "score")


def connected_components(nodes: DataFrame, edges: DataFrame, *, max_iterations: int = 100) -> DataFrame:
    """(product_id, component): the lowest product_id reachable through ``edges`` (src, dst), for every
    row of ``nodes`` (product_id). Each iteration takes the lowest label among a node's neighbours, then
    jumps to its label's label (so a chain of n nodes needs about log n iterations, not n), and is
    checkpointed, so the plan does not grow with the iterations."""
    both = edges.select("src", "dst").unionByName(edges.select(F.col("dst").alias("src"), F.col("src").alias("dst")))
    both = checkpoint(both)
    labels = checkpoint(nodes.select("product_id", F.col("product_id").alias("label")))
    for iteration in range(1, max_iterations + 1):
        offered = both.join(labels.withColumnRenamed("product_id", "dst"), "dst") \
            .select(F.col("src").alias("product_id"), "label")
        lowest = labels.unionByName(offered).groupBy("product_id").agg(F.min("label").alias("label"))
        jumped = (lowest.join(lowest.select(F.col("product_id").alias("label"), F.col("label").alias("via")), "label", "left")
                  .select("product_id", F.least("label", F.coalesce("via", "label")).alias("label")))
        jumped = checkpoint(jumped)
        changed = jumped.join(labels.withColumnRenamed("label", "before"), "product_id") \
            .where(F.col("label") != F.col("before")).limit(1).count()
        labels = jumped
        if not changed:
            log.info("[group] connected components converged in %d iterations", iteration)
            break
    else:
        log.warning("[group] connected components stopped after %d iterations without converging", max_iterations)
    return labels.withColumnRenamed("label", "component")


def split_oversized(components: DataFrame, edge_table: DataFrame, settings: GroupSettings) -> tuple[DataFrame, int]:
    """The chaining guard: (product_id, part) where every part holds at most ``settings.max_size``
    products, and how many components were split. A component over the cap is split by its own edges
    at a threshold ``split_step`` higher, again and again (up to 1.0, where a part is a product alone)."""
    parts = components.withColumnRenamed("component", "part")
    sizes = parts.groupBy("part").count()
    big = sizes.where(F.col("count") > settings.max_size).select("part")
    split = big.count()
    threshold = settings.threshold
    while big.limit(1).count() and threshold < 1.0:
        threshold = min(1.0, threshold + settings.split_step)
        members = parts.join(big, "part", "left_semi")
        inside = (edge_table.where(F.col("score") >= threshold)
                  .join(members.select(F.col("product_id").alias("src"), F.col("part")), "src")
                  .join(members.select(F.col("product_id").alias("dst"), F.col("part").alias("dst_part")), "dst")
                  .where(F.col("part") == F.col("dst_part")).select("src", "dst"))
        again = connected_components(members.select("product_id"), inside).withColumnRenamed("component", "part")
        parts = checkpoint(parts.join(big, "part", "left_anti").unionByName(again))
        big = parts.groupBy("part").count().where(F.col("count") > settings.max_size).select("part")
        log.info("[group] chaining guard: split oversized components at threshold %.2f", threshold)
    if big.limit(1).count():  # at 1.0 every edge below a perfect score is gone: cannot happen but for ties
        raise RuntimeError("the chaining guard could not bring every group under group.max_size")
    return parts, split


@dataclass(frozen=True)
class Linkage:
    """What the average-linkage step needs inside a task."""

    dims: dict
    join: JoinSettings
    threshold: float
    penalty: float
    text_specificity: bool = True


SAME_TEXT = 0.99  # text cosine at which two listings count as sharing one text (copies, case, spacing)


def text_specificity(p: fusion.Products) -> np.ndarray | None:
    """Per member of a part, 1/sqrt(n) where n is how many *other* members have the same text (text
    cosine >= SAME_TEXT; at least 1), or None when the part has no text vectors. Why: a text that many
    listings of one component share ("Juice" on 170 photos of ten juices) says what kind of product
    they are, not which one; pairs of such listings should be told apart by what else they have (the
    photo). A text that one other listing has too is a copy, evidence of one product: full weight."""
    vectors = p.vectors.get("text")
    if vectors is None or not vectors.shape[1] or not p.has["text"].any():
        return None
    has = p.has["text"]
    same = (vectors @ vectors.T >= SAME_TEXT) & np.outer(has, has)
    return 1.0 / np.sqrt(np.maximum(same.sum(axis=1) - 1, 1))


def average_linkage(pdf: pd.DataFrame, linkage: Linkage) -> pd.DataFrame:
    """One part's members (rows as :func:`prodsim_spark.join.join_inputs` gives, plus ``part``) ->
    (product_id, group_id, group_size, representative): average-linkage clusters of their pairwise
    fused scores, cut where the mean pairwise score falls below the threshold. A pair that shares no
    content component scores 0 here."""
    from scipy.cluster.hierarchy import fcluster, linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    p = join.products_from_columns(pdf, linkage.dims)
    n = len(p)
    ids = p.ids.astype(str)
    if n == 1:
        return pd.DataFrame({"product_id": ids, "group_id": ids, "group_size": [1], "representative": ids})
    specificity = text_specificity(p) if linkage.text_specificity else None
    pair_weights = None
    if specificity is not None:  # a pair's text evidence is worth the less specific of its two texts
        both = np.minimum(specificity[:, None], specificity[None, :]).astype(np.float32)
        pair_weights = {"text": both, "lexical": both}
    score, _ = fusion.pair_scores(p, p, linkage.join.weights, price_scale=linkage.join.price_scale,
                                  same_source_penalty=linkage.penalty, pair_weights=pair_weights)
    score = np.nan_to_num(score, nan=0.0)
    np.fill_diagonal(score, 1.0)
    distance = np.clip(1.0 - (score + score.T) / 2, 0.0, 2.0)
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(scipy_linkage(squareform(distance, checks=False), method="average"),
                      t=1.0 - linkage.threshold, criterion="distance")
    out = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        inner = score[np.ix_(members, members)]
        centre = members[int(np.argmax(inner.sum(axis=1)))]
        out.append(pd.DataFrame({"product_id": ids[members], "group_id": min(ids[members]),
                                 "group_size": len(members), "representative": ids[centre]}))
    return pd.concat(out, ignore_index=True)


def find_groups(products: DataFrame, neighbours: DataFrame, settings: GroupSettings, join_settings: JoinSettings
                ) -> tuple[DataFrame, DataFrame, dict]:
    """(grouped, edges, counts): (product_id, group_id, group_size, representative) for every product in
    ``products`` (the join's input), the edges (see :func:`edges`), and counts (components, components
    split by the chaining guard, groups, largest)."""
    products = join.standard_columns(products)
    shape = join.input_shape(products)
    penalty = join_settings.same_source_penalty if shape.several_sources else 0.0
    edge_table = checkpoint(edges(neighbours, settings.threshold, mutual=settings.mutual))
    components = connected_components(products.select("product_id"), edge_table)
    parts, split = split_oversized(components, edge_table, settings)
    linkage = Linkage(shape.dims, join_settings, settings.threshold, penalty, settings.text_specificity)
    sizes = parts.groupBy("part").agg(F.count("*").cast("int").alias("size"))
    parts = parts.join(sizes, "part")
    # a part of one or two products is its own group (two: their one edge already clears the
    # threshold, which is their average); the labels are the parts' lowest ids
    small = parts.where(F.col("size") <= 2 if settings.linkage == "average" else F.lit(True)).select(
        "product_id", F.col("part").alias("group_id"), F.col("size").alias("group_size"),
        F.col("part").alias("representative"))
    grouped = small
    if settings.linkage == "average":
        members = products.join(parts.where(F.col("size") > 2).drop("size"), "product_id")
        linked = members.groupBy("part").applyInPandas(lambda pdf: average_linkage(pdf, linkage), CLUSTERED)
        grouped = small.unionByName(linked)
    grouped = checkpoint(grouped)
    row = grouped.agg(F.countDistinct("group_id").alias("groups"), F.max("group_size").alias("largest")).first()
    counts = {"components": components.select("component").distinct().count(), "components_split": split,
              "groups": int(row["groups"] or 0), "largest_group": int(row["largest"] or 0)}
    return grouped, edge_table, counts


def label_groups(pairs: DataFrame) -> DataFrame:
    """(product_id, group) from labelled pairs (left_id, right_id): their connected components."""
    ends = pairs.select(F.col("left_id").alias("src"), F.col("right_id").alias("dst")).where("src IS NOT NULL AND dst IS NOT NULL")
    nodes = ends.select(F.col("src").alias("product_id")).unionByName(ends.select(F.col("dst").alias("product_id"))).distinct()
    return connected_components(nodes, ends).withColumnRenamed("component", "group")


def groups_table(catalog: DataFrame, grouped: DataFrame, edge_table: DataFrame) -> DataFrame:
    """One row per catalog row (see the module docstring): rejected rows and products that could not be
    joined are groups of one only when they are live; rejected rows get no group."""
    inside = (edge_table.join(grouped.select(F.col("product_id").alias("src"), F.col("group_id").alias("g1")), "src")
              .join(grouped.select(F.col("product_id").alias("dst"), F.col("group_id").alias("g2")), "dst")
              .where(F.col("g1") == F.col("g2")).groupBy(F.col("g1").alias("group_id"))
              .agg(F.min("score").alias("min_edge_score"), F.max("score").alias("max_edge_score")))
    rows = catalog.select("product_id", "source_row", "status", "reason").join(grouped, "product_id", "left") \
        .join(inside, "group_id", "left")
    live = F.col("status") != "rejected"
    alone = live & F.col("group_id").isNull()  # a live product the join had no vector for
    return rows.select(
        "product_id", "source_row", "status", "reason",
        F.when(alone, F.col("product_id")).when(live, F.col("group_id")).alias("group_id"),
        F.when(alone, F.lit(1)).when(live, F.col("group_size")).cast("int").alias("group_size"),
        F.when(alone, F.col("product_id")).when(live, F.col("representative")).alias("representative"),
        F.when(live & (F.col("group_size") > 1), F.col("min_edge_score")).cast("float").alias("min_edge_score"),
        F.when(live & (F.col("group_size") > 1), F.col("max_edge_score")).cast("float").alias("max_edge_score"))
