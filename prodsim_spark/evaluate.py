"""Evaluate stage: how often neighbour lists find the labelled true matches.

Metrics, over every *query*: a product of a labelled pair that is in the neighbours table (both
products of a pair are queries, so both directions count):

* ``recall@k``: share of queries with at least one true match among their first k neighbours
  (with one match per product, as in most matching benchmarks, this is the usual recall@k);
* ``mrr``: mean of 1 / rank of the first true match (0 when none is in the list);
* ``precision@k``: mean share of the first k neighbours that are true matches (for groups of
  matches, e.g. all listings of one product).

Pairs naming a product that is not in the table are counted apart (``pairs_unknown``), never
silently: the evaluation says how much of the labelled data it could use. The cut-offs k are
``evaluate.cutoffs`` in config.

:func:`ablations` recomputes neighbour lists with each vector component alone, to show what each
adds (``prodsim evaluate --ablation``, ``prodsim bench quality``).
"""
from __future__ import annotations

from typing import Sequence

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from prodsim_spark import fusion, join
from prodsim_spark.config import EvaluateSettings, FusionWeights, ProdsimConfig
from prodsim_spark.tables import neighbours_counts

CUTOFFS = tuple(EvaluateSettings().cutoffs)


def directed_pairs(pairs: DataFrame) -> DataFrame:
    """(query, match) both ways from (left_id, right_id), without self pairs and duplicates."""
    both = pairs.select(F.col("left_id").alias("query"), F.col("right_id").alias("match")).unionByName(
        pairs.select(F.col("right_id").alias("query"), F.col("left_id").alias("match")))
    return both.where("query IS NOT NULL AND match IS NOT NULL AND query != match").distinct()


def match_ranks(neighbours: DataFrame, pairs: DataFrame, cutoffs: Sequence[int] = CUTOFFS) -> DataFrame:
    """Per query: ``first_rank`` of a true match (1-based; null when none listed), ``hits`` per k,
    and the list length."""
    listed = neighbours.select("product_id", F.posexplode("neighbours").alias("pos", "nb")).select(
        F.col("product_id").alias("query"), (F.col("pos") + 1).alias("rank"), F.col("nb.product_id").alias("match"))
    truth = directed_pairs(pairs)
    known = truth.join(neighbours.select(F.col("product_id").alias("query")), "query", "left_semi")
    found = known.join(listed, ["query", "match"], "inner")
    per_query = found.groupBy("query").agg(
        F.min("rank").alias("first_rank"),
        *[F.sum(F.when(F.col("rank") <= k, 1).otherwise(0)).alias(f"hits_{k}") for k in cutoffs])
    return known.select("query").distinct().join(per_query, "query", "left").fillna(0, [f"hits_{k}" for k in cutoffs])


def metrics(neighbours: DataFrame, pairs: DataFrame, queries: DataFrame | None = None, *,
            cutoffs: Sequence[int] = CUTOFFS) -> dict:
    """recall@k, mrr, precision@k over the queries (optionally only those in ``queries.product_id``)."""
    ranks = match_ranks(neighbours, pairs, cutoffs)
    if queries is not None:
        ranks = ranks.join(queries.select(F.col("product_id").alias("query")), "query", "left_semi")
    row = ranks.agg(
        F.count("*").alias("queries"),
        *[F.avg(F.when(F.col("first_rank") <= k, 1.0).otherwise(0.0)).alias(f"recall@{k}") for k in cutoffs],
        F.avg(F.when(F.col("first_rank").isNotNull(), 1.0 / F.col("first_rank")).otherwise(0.0)).alias("mrr"),
        *[F.avg(F.col(f"hits_{k}") / k).alias(f"precision@{k}") for k in cutoffs]).first().asDict()
    truth = directed_pairs(pairs)
    unknown = truth.join(neighbours.select(F.col("product_id").alias("query")), "query", "left_anti").count()
    out = {k: (round(float(v), 4) if v is not None and k != "queries" else v) for k, v in row.items()}
    out["queries"] = int(row["queries"] or 0)
    out["pairs_unknown"] = int(unknown)
    return out


def coverage(neighbours: DataFrame) -> dict:
    """What a neighbours table holds when there are no labels: rows, how many have a list, list length,
    the first neighbour's score (mean and quartiles) and the reasons of rows without a list."""
    counts = neighbours_counts(neighbours)
    row = neighbours.agg(
        F.avg(F.size("neighbours")).alias("mean_list_length"),
        F.avg(F.get("neighbours", 0)["score"]).alias("top1_score_mean"),
        F.percentile_approx(F.get("neighbours", 0)["score"], [0.25, 0.5, 0.75]).alias("q")).first()
    reason = F.col("reason") if "reason" in neighbours.columns else F.lit(None).cast("string")
    without = {r["reason"] or "none": r["count"] for r in neighbours.where(F.size("neighbours") == 0)
               .groupBy(reason.alias("reason")).count().orderBy(F.desc("count")).collect()}
    rows, listed = counts["rows"], counts["with_neighbours"]
    q = row["q"] or [None, None, None]
    return {"rows": rows, "with_neighbours": listed,
            "share_with_neighbours": round(listed / rows, 4) if rows else 0.0,
            "mean_list_length": round(float(row["mean_list_length"] or 0), 3),
            "top1_score_mean": None if row["top1_score_mean"] is None else round(float(row["top1_score_mean"]), 4),
            "top1_score_quartiles": [None if v is None else round(float(v), 4) for v in q],
            "without_neighbours_by_reason": without}


def markdown_table(results: dict[str, dict], columns: Sequence[str] | None = None) -> str:
    """One row per method, one column per metric (default: every recall@k, mrr, precision@10 when measured)."""
    if columns is None:
        first = next(iter(results.values()), {})
        columns = [c for c in first if c.startswith("recall@")] + ["mrr"] + [
            c for c in ("precision@10",) if c in first]
    lines = ["| method | " + " | ".join(columns) + " | queries |", "|---" * (len(columns) + 2) + "|"]
    for name, m in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.3f}" for c in columns)
                     + f" | {m.get('queries', '')} |")
    return "\n".join(lines)


def ablations(products: DataFrame, config: ProdsimConfig) -> dict[str, DataFrame]:
    """Neighbour lists (K = ``join.k``) per method: each vector component alone (where the catalog has
    it, similarity only), fused as configured, and, for a catalog of several sources, fused without
    the same-source penalty (what the penalty adds). ``products``: the join's input
    (:func:`prodsim_spark.pipeline.run_products`)."""
    shape = join.input_shape(products)
    settings = config.join
    out = {}
    for name in fusion.DENSE:
        if shape.dims.get(name) and getattr(settings.weights, name) > 0:
            alone = settings.replaced(weights=FusionWeights.only(**{name: 1.0}), same_source_penalty=0.0)
            out[f"{name} alone"] = join.find_neighbours(products, alone).persist()
    if shape.several_sources and settings.same_source_penalty > 0:
        out["fused, no same-source penalty"] = join.find_neighbours(
            products, settings.replaced(same_source_penalty=0.0)).persist()
    out["fused"] = join.find_neighbours(products, settings).persist()
    return out


# --------------------------------------------------------------------------------------------
# groups


def group_metrics(groups: DataFrame, truth: DataFrame) -> dict:
    """Pairwise precision, recall and F1 and B-cubed F1 of predicted groups (product_id, group_id) against
    labelled groups (product_id, group), over the products of ``groups``; a product without a label is
    a true group of its own (labels list every match)."""
    live = groups.where(F.col("group_id").isNotNull()).select("product_id", "group_id")
    labelled = live.join(truth.select("product_id", F.col("group").cast("string").alias("truth")), "product_id", "left") \
        .withColumn("truth", F.coalesce("truth", F.concat(F.lit("\u0000"), "product_id")))
    cells = labelled.groupBy("group_id", "truth").agg(F.count("*").alias("c"))
    pred = labelled.groupBy("group_id").agg(F.count("*").alias("g"))
    true = labelled.groupBy("truth").agg(F.count("*").alias("t"))
    row = (cells.join(pred, "group_id").join(true, "truth")
           .agg(F.sum(F.col("c") * (F.col("c") - 1) / 2).alias("both"), F.sum("c").alias("n"),
                F.sum(F.col("c") * F.col("c") / F.col("g")).alias("b_precision"),
                F.sum(F.col("c") * F.col("c") / F.col("t")).alias("b_recall")).first())
    predicted = pred.agg(F.sum(F.col("g") * (F.col("g") - 1) / 2)).first()[0] or 0
    actual = true.agg(F.sum(F.col("t") * (F.col("t") - 1) / 2)).first()[0] or 0
    both, n = float(row["both"] or 0), int(row["n"] or 0)
    precision = both / predicted if predicted else 1.0
    recall = both / actual if actual else 1.0
    bp = float(row["b_precision"] or 0) / n if n else 0.0
    br = float(row["b_recall"] or 0) / n if n else 0.0
    f1 = lambda p, r: 2 * p * r / (p + r) if p + r else 0.0  # noqa: E731
    sizes = pred.agg(F.count("*").alias("groups"), F.max("g").alias("largest")).first()
    return {"pairwise_precision": round(precision, 4), "pairwise_recall": round(recall, 4),
            "pairwise_f1": round(f1(precision, recall), 4), "bcubed_precision": round(bp, 4),
            "bcubed_recall": round(br, 4), "bcubed_f1": round(f1(bp, br), 4), "products": n,
            "groups": int(sizes["groups"] or 0), "largest_group": int(sizes["largest"] or 0)}
