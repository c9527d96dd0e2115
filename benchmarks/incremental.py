"""``prodsim bench incremental``: a day's re-run after a small share of the catalog changed, incremental
vs full, in one run, on clustered synthetic vectors (as ``bench join``).

Day 1: N products, a full join (new cells), lists and index members written to Delta. Day 2: a share
``changed`` of the products changed: a third edited (their vector moved a little, as an edited
description moves it), a third removed, and as many new products added (other points of the same
clusters). Timed on day 2, each from the same cached products:

* ``incremental_s``: hashes, changes, rescoring over day 1's cells, MERGE of the changed lists;
* ``full_s``: what a run did before: new cells, every list, the table overwritten;
* ``full_same_cells_s``: every list over day 1's cells (no planning): what the incremental lists must
  equal; ``same_lists`` compares them (same neighbours in the same order, scores within 1e-5).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import functions as F

from prodsim_spark import incremental, io, join
from prodsim_spark.config import FusionWeights, ProdsimConfig

from benchmarks.join import synthetic_frame, synthetic_products
from benchmarks.search import query_vectors

log = logging.getLogger(__name__)


def day_two(spark, day_one, n: int, changed: float, d: int):
    """Day 1's products with ``changed`` of them edited, removed or added (a third each)."""
    step = max(1, int(round(1 / max(changed, 1e-9))))
    number = F.substring("product_id", 2, 7).cast("int")
    kind = F.when(number % step != 0, "same").when((number / step).cast("int") % 3 == 1, "removed") \
        .when((number / step).cast("int") % 3 == 2, "edited").otherwise("same")

    def edit(batches):
        for pdf in batches:
            out = []
            for pid, v, k in zip(pdf["product_id"], pdf["text_embedding"], pdf["kind"]):
                if k == "edited":
                    rng = np.random.default_rng(int(pid[1:]))
                    v = np.asarray(v, np.float32) + rng.normal(scale=0.3 / np.sqrt(d), size=d).astype(np.float32)
                    v = v / np.linalg.norm(v)
                out.append(np.asarray(v, np.float32))
            yield pd.DataFrame({"product_id": pdf["product_id"], "text_embedding": out})

    kept = (day_one.withColumn("kind", kind).where("kind != 'removed'")
            .mapInPandas(edit, "product_id string, text_embedding array<float>"))
    added = max(1, int(n * changed / 3))
    new = synthetic_frame(spark, added, "product_id", "a", lambda lo, hi: query_vectors(lo, hi, d, 7, n, added))
    return kept.unionByName(new)


def _lists(df) -> dict:
    return {r["product_id"]: (r["ids"], r["scores"]) for r in df.select(
        "product_id", F.col("neighbours.product_id").alias("ids"), F.col("neighbours.score").alias("scores")).collect()}


def differing_lists(got: dict, want: dict) -> list[str]:
    """Products whose lists differ (other neighbours or order, or a score off by more than 1e-5)."""
    return sorted(p for p in set(got) | set(want) if p not in got or p not in want or got[p][0] != want[p][0]
                  or not np.allclose(got[p][1], want[p][1], atol=1e-5))


def bench_incremental(spark, config: ProdsimConfig, *, n: int = 400_000, changed: float = 0.01, d: int = 384,
                      work: Path = Path("out/bench-incremental")) -> dict:
    settings = config.join.replaced(weights=FusionWeights.only(text=1.0))
    lists_path, members_path = str((work / "neighbours").resolve()), str((work / "index_members").resolve())
    day_one = synthetic_products(spark, n, d).cache()
    day_one.count()
    started = time.perf_counter()
    cells = join.plan_cells(day_one, settings)
    io.write_delta(join.find_neighbours(day_one, settings, cells), lists_path)
    io.write_delta(incremental.input_state(day_one, cells.centroids, settings.weights, cells.shape.dims,
                                           settings.spill), members_path)
    day_one_s = time.perf_counter() - started
    log.info("[bench incremental] day 1: %d products, %d cells, %.1f s", n, len(cells.centroids), day_one_s)

    products = day_two(spark, day_one, n, changed, d).cache()
    count = products.count()
    day_one.unpersist()
    shape = join.input_shape(products)

    started = time.perf_counter()
    steps, mark = {}, started

    def step(name: str) -> None:
        nonlocal mark
        steps[name] = round(time.perf_counter() - mark, 2)
        mark = time.perf_counter()

    previous_state = io.read_delta(spark, members_path)
    state = incremental.input_state(products, cells.centroids, settings.weights, shape.dims, settings.spill,
                                    previous_state).persist()
    state.count()
    step("state")
    old_lists = io.read_delta(spark, lists_path)
    changes = incremental.find_changes(state, previous_state, old_lists)
    step("changes")
    updated = incremental.update_neighbours(products, state, old_lists, changes, cells.centroids, shape.dims, settings,
                                            shape.several_sources).persist()
    lists_updated = updated.count()
    step("rescore")
    io.merge_changes(updated, incremental.id_frame(spark, changes.removed), lists_path, keys=("product_id",))
    step("merge")
    io.write_delta(state, members_path)
    step("state_write")
    incremental_s = time.perf_counter() - started
    updated.unpersist()
    state.unpersist()
    got = _lists(io.read_delta(spark, lists_path))

    started = time.perf_counter()
    same_cells = join.find_neighbours(products, settings, join.Cells(cells.centroids, shape)).persist()
    same_cells.count()
    full_same_cells_s = time.perf_counter() - started
    want = _lists(same_cells)
    same_cells.unpersist()

    started = time.perf_counter()
    io.write_delta(join.find_neighbours(products, settings), str((work / "neighbours-full").resolve()))
    full_s = time.perf_counter() - started
    products.unpersist()
    differing = differing_lists(got, want)
    out = {"n": n, "products_day_two": count, "changed": changed, "cells": int(len(cells.centroids)),
           "new_or_changed": len(changes.new), "removed": len(changes.removed),
           "rescored_unchanged": len(changes.rescored), "lists_updated": lists_updated,
           "full_s": round(full_s, 2), "incremental_s": round(incremental_s, 2),
           "full_same_cells_s": round(full_same_cells_s, 2), "day_one_s": round(day_one_s, 2),
           "fraction": round(incremental_s / full_s, 3),
           "fraction_vs_same_cells": round(incremental_s / full_same_cells_s, 3), "incremental_steps_s": steps,
           "same_lists": not differing, "lists_differing": len(differing), "differing_sample": differing[:5],
           "settings": {"block_size": settings.block_size, "spill": settings.spill, "k": settings.k}}
    log.info("[bench incremental] %s", out)
    return out
