"""Incremental neighbours: a re-run over the previous run's cells re-scores only what changed.

A product's list in a full join is the top k over the members of its home cell (the products that
store a copy there: the home is one of their ``join.spill`` nearest cells). Given the previous lists,
each product's input hash (vectors and attributes) and the same centroids, after products were
added, changed or removed:

* *rescored*: added and changed products, and unchanged products whose list held a changed or removed
  product, get a complete list: every member of their home cell is scored again;
* every other product keeps its list, merged with the added and changed products that now store a
  copy in its home cell: its old list is the top k of the old members, which are all still there and
  unchanged, so the merged top k is what a full join would give. Only a new member scoring at least
  the list's k-th score can enter it, so only such candidates leave the scan: a list no new member
  enters is not touched at all (at 1% changed, most lists);
* removed products leave every list (only rescored products listed them).

So the result equals a full join on the same cells (a test checks it). One scan of the products does
all the scoring: the rescored and the new products are broadcast to the executors, grouped by cell,
and nothing of the catalog is shuffled except the candidates. The broadcast is the limit: it holds
the changed share of the catalog (``join.incremental.max_changed_share`` bounds it; above it, and
when the cells have drifted, the neighbours stage plans new cells instead: see
:func:`drift_reasons`).
"""
from __future__ import annotations

import logging
from functools import partial
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.pandas.types import to_arrow_schema

from prodsim_spark import fusion
from prodsim_spark.config import JoinSettings
from prodsim_spark.join import (NEIGHBOUR, is_exact, merged_top_k, neighbours_table, products_from_arrow,
                                products_from_columns, standard_columns)

log = logging.getLogger(__name__)

# A state of at most this many rows (~50 bytes each) is broadcast to the tasks that read the products,
# so that the products (vectors) are not shuffled to meet it; a larger one is joined by a shuffle.
BROADCAST_STATE_ROWS = 1_000_000
# A new member enters a kept list when it scores at least the list's k-th score; the two scores come
# from matrix products of other shapes, so they may differ in their last bits: candidates this close
# below are kept too, and the merge of old and new entries ranks them exactly.
SCORE_SLACK = 1e-5
SCAN_TASKS_PER_CORE = 4

# the scan's output: one row per (product, candidate neighbour)
CANDIDATE_SCHEMA = T.StructType([T.StructField("product_id", T.StringType()),
                                 *[T.StructField(f"n_{f.name}", f.dataType) for f in NEIGHBOUR.fields]])
STATE_SCHEMA = T.StructType([T.StructField("product_id", T.StringType()), T.StructField("input_hash", T.LongType()),
                             T.StructField("home", T.LongType()), T.StructField("cells", T.ArrayType(T.LongType()))])


def input_state(products: DataFrame, centroids: np.ndarray, weights, dims: dict[str, int], spill: int,
                previous: DataFrame | None = None) -> DataFrame:
    """(product_id, input_hash, home, cells) of every product: a hash of everything the join reads of
    it (vectors, attributes, which of them are missing), its ``spill`` nearest cells and the nearest,
    its home. With the ``previous`` state over the same centroids, a product whose hash did not change
    keeps its cells and only the others are routed (routing compares every product with every cell:
    the largest cost of a re-run that re-routed all)."""
    products = standard_columns(products)
    cols = [c for c in products.columns if c != "product_id"]
    hashed = products.select("product_id", F.xxhash64(*cols, F.array(*[F.col(c).isNull() for c in cols])).alias("input_hash"),
                             *cols)

    def route(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            p = products_from_columns(pdf, dims)
            cells = fusion.nearest_cells(fusion.fused_dense(p, weights), centroids, spill)
            yield pd.DataFrame({"product_id": pdf["product_id"], "input_hash": pdf["input_hash"],
                                "home": cells[:, 0], "cells": list(cells)})

    if previous is None or "cells" not in previous.columns:
        return hashed.mapInPandas(route, STATE_SCHEMA)
    old = _small(previous.select("product_id", F.col("input_hash").alias("old_hash"), F.col("home").alias("old_home"),
                                 F.col("cells").alias("old_cells")))
    both = hashed.join(old, "product_id", "left")
    same = F.coalesce((F.col("old_hash") == F.col("input_hash")) & (F.size("old_cells") == spill), F.lit(False))
    kept = both.where(same).select("product_id", "input_hash", F.col("old_home").alias("home"),
                                   F.col("old_cells").alias("cells"))
    return kept.unionByName(both.where(~same).select("product_id", "input_hash", *cols).mapInPandas(route, STATE_SCHEMA))


def id_frame(spark, ids) -> DataFrame:
    """A one-column (product_id) DataFrame of ids held on the driver."""
    return spark.createDataFrame([(i,) for i in ids], "product_id string")


def _small(state: DataFrame) -> DataFrame:
    """``state`` with a broadcast hint when it is small enough (see BROADCAST_STATE_ROWS)."""
    return F.broadcast(state) if state.count() <= BROADCAST_STATE_ROWS else state


@dataclass
class Changes:
    """What changed since the previous state: ids (driver lists: a small share of the catalog)."""

    new: list[str]        # added or changed: their new version is routed and gets a complete list
    removed: list[str]    # gone from the products
    rescored: list[str]   # unchanged, but their old list held a changed or removed product
    products: int         # products now

    @property
    def changed(self) -> int:
        return len(self.new) + len(self.removed)


def find_changes(state: DataFrame, previous_state: DataFrame, previous_lists: DataFrame) -> Changes:
    old = previous_state.select("product_id", F.col("input_hash").alias("old_hash"))
    both = state.select("product_id", "input_hash").join(old, "product_id", "full")
    rows = both.where(F.col("old_hash").isNull() | F.col("input_hash").isNull()
                      | (F.col("input_hash") != F.col("old_hash"))).collect()
    new = sorted(r["product_id"] for r in rows if r["input_hash"] is not None)
    removed = sorted(r["product_id"] for r in rows if r["input_hash"] is None)
    existed = {r["product_id"] for r in rows if r["old_hash"] is not None}
    lost = sorted(existed)  # changed or removed: their old version leaves every list
    spark = state.sparkSession
    rescored: list[str] = []
    if lost:
        lost_ids = spark.createDataFrame([(i,) for i in lost], "lost string")
        listed = (previous_lists.select("product_id", F.explode("neighbours.product_id").alias("lost"))
                  .join(F.broadcast(lost_ids), "lost", "left_semi").select("product_id").distinct())
        live = state.select("product_id")
        rescored = sorted({r["product_id"] for r in listed.join(live, "product_id", "left_semi").collect()}
                          - set(new))
    return Changes(new, removed, rescored, state.count())


def update_neighbours(products: DataFrame, state: DataFrame, previous_lists: DataFrame, changes: Changes,
                      centroids: np.ndarray, dims: dict[str, int], settings: JoinSettings, several_sources: bool
                      ) -> DataFrame:
    """(product_id, neighbours) of the products whose list is new or may have changed (see the module
    docstring); every other product's list stands. ``products`` as :func:`join.find_neighbours` takes;
    ``state`` from :func:`input_state` over them (each product's cells: nothing is routed again)."""
    spark = products.sparkSession
    weights, k, spill, scale = settings.weights, settings.k, settings.spill, settings.price_scale
    # each product's k-th score (null when its list is shorter: anything enters it)
    floors = previous_lists.select("product_id", F.when(F.size("neighbours") >= k, F.col("neighbours.score")[k - 1])
                                   .alias("floor"))
    products = standard_columns(products).join(
        _small(state.select("product_id", "cells").join(floors, "product_id", "left")), "product_id")
    penalty = settings.same_source_penalty if several_sources else 0.0
    hard = settings.category_mode == "hard"
    queries_ids = changes.new + changes.rescored
    if not queries_ids:
        return spark.createDataFrame([], T.StructType([T.StructField("product_id", T.StringType()),
                                                        T.StructField("neighbours", T.ArrayType(NEIGHBOUR))]))
    started = time.perf_counter()
    query_ids = id_frame(spark, queries_ids)
    rows = products.join(F.broadcast(query_ids), "product_id", "left_semi").toPandas()
    q = products_from_columns(rows, dims)
    q_cells = np.stack(rows["cells"].to_numpy()) if len(rows) else np.zeros((0, spill), dtype=np.int64)
    is_new = np.isin(q.ids, np.array(changes.new, dtype=object))
    # queries by home cell (complete lists), new members by every cell they store a copy in
    new_rows = np.flatnonzero(is_new)
    q_by_home = {c: members for c, members in enumerate(fusion.rows_by_cell(q_cells[:, :1], len(centroids)))
                 if len(members)}
    m_by_cell = {c: new_rows[members] for c, members in enumerate(fusion.rows_by_cell(q_cells[is_new], len(centroids)))
                 if len(members)}
    shared = spark.sparkContext.broadcast({"q": q, "q_by_home": q_by_home, "m_by_cell": m_by_cell,
                                           "queries": set(queries_ids)})
    log.info("[join] incremental: %d new or changed, %d removed, %d unchanged products rescored; %d cells touched "
             "(queries collected in %.1f s)", len(changes.new), len(changes.removed), len(changes.rescored),
             len(set(q_by_home) | set(m_by_cell)), time.perf_counter() - started)

    scorer = partial(fusion.pair_scores, weights=weights, price_scale=scale, same_source_penalty=penalty)

    def emit(out: list, a: fusion.Products, b: fusion.Products, floor: np.ndarray | None = None) -> None:
        """Each row of ``a``'s best k among ``b`` (those scoring at least its ``floor``), one row per
        candidate (flat: splitting them into per-product arrays cost more than the scoring)."""
        score, _ = scorer(a, b)
        if hard:  # as the full join's (cell, category) groups
            score = np.where(a.category[:, None] == b.category[None, :], score, np.nan)
        r, c, best, parts = fusion.exact_top_k(score, a, b, k, scorer)
        if floor is not None:
            keep = best >= floor[r]
            r, c, best, parts = r[keep], c[keep], best[keep], {f: v[keep] for f, v in parts.items()}
        if len(r):
            out.append(pd.DataFrame({"product_id": a.ids[r], "n_product_id": b.ids[c], "n_score": best,
                                     **{f"n_{f}": parts.get(f, np.zeros(len(r), np.float32)) for f in fusion.PARTS}}))

    def blocks(batches: Iterator[pa.RecordBatch], rows: int = 250_000) -> Iterator[pa.Table]:
        # whole partitions (up to `rows`: ~1 GB of 384-d rows) at a time: the per-cell loop below runs
        # once per block, and its cost is mostly per call
        pending, size = [], 0
        for batch in batches:
            pending.append(batch)
            size += batch.num_rows
            if size >= rows:
                yield pa.Table.from_batches(pending)
                pending, size = [], 0
        if pending:
            yield pa.Table.from_batches(pending)

    out_schema = to_arrow_schema(CANDIDATE_SCHEMA)

    def scan(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        # Arrow, not pandas: the vectors become one matrix without a Python object per row
        s = shared.value
        q_all = s["q"]
        for table in blocks(batches):
            if not table.num_rows:
                continue
            p = products_from_arrow(table, dims)
            cells = table.column("cells").combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
            floor = pc.fill_null(table.column("floor").cast("double"), -np.inf).to_numpy(zero_copy_only=False) \
                - SCORE_SLACK
            # the rows storing a copy in each cell, and the rows homed there, by one sort each
            stored = fusion.rows_by_cell(cells, len(centroids))
            kept = ~pd.Index(p.ids).isin(s["queries"])
            homed = fusion.rows_by_cell(cells[:, :1], len(centroids))
            out: list[pd.DataFrame] = []
            # complete lists: a query against every member of its home cell found in this block
            for cell, idx in s["q_by_home"].items():
                if len(stored[cell]):
                    emit(out, q_all.take(idx), p.take(stored[cell]))
            # kept lists: an unchanged product against the new members that store a copy in its home
            for cell, idx in s["m_by_cell"].items():
                rows = homed[cell][kept[homed[cell]]]
                if len(rows):
                    emit(out, p.take(rows), q_all.take(idx), floor[rows])
            if out:
                yield pa.RecordBatch.from_pandas(pd.concat(out, ignore_index=True), schema=out_schema,
                                                 preserve_index=False)

    # a few partitions per core (coalesce: no shuffle): few blocks, as the per-cell loop costs per call,
    # but more tasks than cores, so that unevenly coalesced partitions still share the cores (with one
    # task per core, measured at 200k: one task had 150k rows, the other 50k)
    scanned = products.coalesce(max(1, SCAN_TASKS_PER_CORE * spark.sparkContext.defaultParallelism))
    candidates = scanned.mapInArrow(scan, CANDIDATE_SCHEMA).select(
        "product_id", F.struct(*[F.col(f"n_{f}").alias(f) for f in NEIGHBOUR.fieldNames()]).alias("n")
    ).persist()  # read three times below: the scan runs once
    started = time.perf_counter()
    found_candidates = candidates.count()
    log.info("[join] incremental scan: %d candidates in %.1f s", found_candidates, time.perf_counter() - started)
    started = time.perf_counter()
    # kept lists take their old entries too (none of them changed or removed: else they'd be rescored)
    old = (previous_lists.join(F.broadcast(query_ids), "product_id", "left_anti")
           .join(candidates.select("product_id").distinct(), "product_id", "left_semi")
           .select("product_id", F.explode("neighbours").alias("n")))
    entry = F.struct(*[F.col(f"n.{f}").cast(NEIGHBOUR[f].dataType).alias(f) for f in NEIGHBOUR.fieldNames()])
    # a neighbour listed twice, as an old entry and as a candidate, is kept once (its better place): that
    # happens only on a re-run after a run that crashed between the lists' MERGE and the state's write
    # (the lists then already hold the new products the old state does not know)
    found = merged_top_k(candidates.select("product_id", entry.alias("n"))
                         .unionByName(old.select("product_id", entry.alias("n"))), "product_id", "n", k
                         ).withColumnRenamed("entries", "neighbours")
    # a query with no candidate in any block (alone in its cell) still gets its (empty) list
    present = id_frame(spark, q.ids)
    alone = present.join(found, "product_id", "left_anti").select(
        "product_id", F.array().cast(T.ArrayType(NEIGHBOUR)).alias("neighbours"))
    result = found.unionByName(alone).persist()
    ranked = result.count()
    log.info("[join] incremental: %d lists ranked again in %.1f s", ranked, time.perf_counter() - started)
    candidates.unpersist()
    return result


def neighbours_changes(catalog: DataFrame, embeddings: DataFrame, old_table: DataFrame, old_lists: DataFrame,
                       updated: DataFrame, changes: Changes, state: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(upserts, deletes): the neighbours table's rows that an update changes, whole, and the keys
    (product_id, source_row) of the rows it drops, for :func:`prodsim_spark.io.merge_changes`. A row
    is recomputed when its product's list was updated or removed, its catalog row is new to the table
    or got another status or reason, or its product has no list or no id (rejected, no vector: a small row); a
    row whose catalog row is gone is deleted. Every other row stands as it is, so the MERGE reads and
    writes what changed, not the whole table (at 1% changed, a tenth of the rows)."""
    keys = ["product_id", "source_row"]
    rows = catalog.select(*keys, "status", "reason")
    listed = old_table.select(*[F.col(k).alias(f"was_{k}") for k in keys], F.col("status").alias("was_status"),
                              F.col("reason").alias("was_reason"))
    # one pass over both tables' keys (null-safe: rejected rows may have no id): a catalog row the table
    # lacks or holds with another status or reason is recomputed; a table row the catalog lacks goes
    both = rows.join(listed, [F.col(k).eqNullSafe(F.col(f"was_{k}")) for k in keys], "full")
    moved = both.where(F.col("source_row").isNotNull() & (
        F.col("was_source_row").isNull() | ~F.col("status").eqNullSafe(F.col("was_status"))
        | ~F.col("reason").eqNullSafe(F.col("was_reason")))).select("product_id")
    deletes = both.where(F.col("source_row").isNull()).select(*[F.col(f"was_{k}").alias(k) for k in keys])
    without_list = rows.join(state.select("product_id"), "product_id", "left_anti").select("product_id")
    ids = (moved.unionByName(without_list).unionByName(updated.select("product_id"))
           .unionByName(id_frame(catalog.sparkSession, changes.removed)).distinct())
    # the affected products' lists: the updated ones, the others as they were
    found = (old_lists.join(ids, "product_id", "left_semi").join(updated.select("product_id"), "product_id", "left_anti")
             .select("product_id", "neighbours").unionByName(updated.select("product_id", "neighbours")))
    # rows without a product id (rejected) are always recomputed: no id to select them by
    affected = catalog.join(ids, "product_id", "left_semi").unionByName(catalog.where(F.col("product_id").isNull()))
    upserts = neighbours_table(affected, found, embeddings)
    return upserts, deletes


def drift_reasons(changes: Changes, state: DataFrame, built_products: int, changed_since_build: int,
                  settings: JoinSettings) -> list[str]:
    """Why the cells should be planned again (empty: they still fit). Two measures, both in the
    README: the share of products added, changed or removed since the cells were planned (their
    centroids describe an older catalog), and the largest cell's home count against
    ``join.max_block_size`` (new products crowding one cell make one slow task); and a catalog that
    grew past ``join.exact_max_products`` (or shrank under it) is planned again."""
    reasons = []
    share = (changed_since_build + changes.changed) / max(1, built_products)
    limit = settings.max_changed_share
    if share > limit:
        reasons.append(f"{share:.1%} of the products changed since the cells were planned "
                       f"(join.incremental.max_changed_share {limit:g})")
    if is_exact(built_products, settings) != is_exact(changes.products, settings):
        reasons.append(f"the catalog crossed join.exact_max_products {settings.exact_max_products} ({built_products} "
                       f"products when the cells were planned, {changes.products} now)")
    elif not is_exact(built_products, settings):  # an exact join's cells hold every product anyway
        largest = state.groupBy("home").count().agg(F.max("count")).first()[0] or 0
        if largest > settings.max_block_size:
            reasons.append(f"the largest cell holds {largest} products, over join.max_block_size "
                           f"{settings.max_block_size}")
    return reasons
