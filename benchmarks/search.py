"""``prodsim bench search``: batch search on Spark and the single-query API against exact search, on
clustered synthetic vectors (as ``bench join``), and search quality on the labelled datasets.

Synthetic: N products and Q queries from the same clusters (new noise), text vectors only. Ours: the
index cells of a join plan, each query probing ``search.probe`` cells; batch = :func:`search_products`
on Spark over all Q queries; single = :class:`Searcher` answering queries one at a time after loading.
Exact: every product scored by blocked numpy matrix multiply on the driver, for a sample of queries,
time extrapolated to all Q (what searching without an index costs). Recall@k is ours against exact on
that sample.
"""
from __future__ import annotations

import logging
import statistics
import time

import numpy as np

from prodsim_spark import fusion, join
from prodsim_spark.config import FusionWeights, ProdsimConfig
from prodsim_spark.index import build_index
from prodsim_spark.search import Searcher, search_products

from benchmarks.join import clustered_vectors, synthetic_frame, synthetic_products

log = logging.getLogger(__name__)


QUERY_STREAM = (1,)  # queries: other points of the products' clusters


def query_vectors(start: int, end: int, d: int, seed: int, n_products: int, queries: int) -> np.ndarray:
    """Queries [start, end) of ``queries``: points of the products' clusters with fresh noise."""
    return clustered_vectors(start, end, d, seed, n_products, rows=queries, stream=QUERY_STREAM)


def synthetic_queries(spark, n_products: int, queries: int, d: int, seed: int = 7):
    """A DataFrame of Q query vectors (:func:`query_vectors`), generated inside Spark tasks."""
    return synthetic_frame(spark, queries, "query_id", "q",
                           lambda lo, hi: query_vectors(lo, hi, d, seed, n_products, queries))


def text_products(ids: np.ndarray, x: np.ndarray) -> fusion.Products:
    """Products with a text vector only (no brand, category, price or source)."""
    n = len(ids)
    return fusion.Products(ids, {"text": x}, {"text": np.ones(n, bool)}, np.full(n, -1), np.full(n, -1),
                           np.full(n, np.nan), np.full(n, -1))


def exact_search(x: np.ndarray, queries: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """(queries, k) indices of each query's k most similar rows of x, by blocked matrix multiply."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), block):
        sims = queries[s:s + block] @ x.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[s:s + block] = np.take_along_axis(part, order, axis=1)
    return out


def bench_search(spark, config: ProdsimConfig, *, n: int = 100_000, queries: int = 100_000, d: int = 384,
                 sample: int = 1000, single: int = 300) -> dict:
    from pyspark.sql import functions as F

    weights = FusionWeights.only(text=1.0)
    settings = config.join.replaced(weights=weights)
    search = config.search
    k = search.k
    products = synthetic_products(spark, n, d).cache()
    products.count()
    started = time.perf_counter()
    cells = join.plan_cells(products, settings)
    plan_s = time.perf_counter() - started
    tuned = config.model_copy(update={"join": settings})
    index = build_index(cells.centroids, None, cells.shape.dims, tuned, "synthetic", None)

    x, q = clustered_vectors(0, n, d, 7, n), query_vectors(0, queries, d, 7, n, queries)  # what the Spark tasks make
    rows = np.sort(np.random.default_rng(3).choice(queries, size=min(sample, queries), replace=False))
    started = time.perf_counter()
    exact = exact_search(x, q[rows], k)
    exact_s = (time.perf_counter() - started) * queries / len(rows)

    batch = synthetic_queries(spark, n, queries, d).cache()
    batch.count()
    started = time.perf_counter()
    found = search_products(batch, products, index, search).persist()
    answered = found.count()
    batch_s = time.perf_counter() - started
    wanted = [f"q{i:07d}" for i in rows]
    got = {r["query_id"]: r["ids"] for r in found.where(F.col("query_id").isin(wanted))
           .select("query_id", F.col("results.product_id").alias("ids")).collect()}
    hits = sum(len({f"p{j:07d}" for j in truth} & set(got.get(wanted[i], [])[:k])) for i, truth in enumerate(exact))
    found.unpersist()

    # the notebook API: load once (here: the synthetic products, already in memory), then one query at a time
    p = text_products(np.array([f"p{i:07d}" for i in range(n)], dtype=object), x)
    started = time.perf_counter()
    searcher = Searcher(index, p, {}, {}, tuned)
    load_s = time.perf_counter() - started
    latencies, single_hits = [], 0
    for i, row in enumerate(rows[:single]):
        one = text_products(np.array(["q"], dtype=object), q[row][None, :])
        started = time.perf_counter()
        answer = searcher.search_vectors(one, k=k)
        latencies.append((time.perf_counter() - started) * 1000)
        single_hits += len({f"p{j:07d}" for j in exact[i]} & set(answer["product_id"]))
    batch.unpersist()
    products.unpersist()
    out = {"n": n, "queries": queries, "k": k, "d": d, "probe": search.probe, "cells": int(len(cells.centroids)),
           "plan_s": round(plan_s, 2),
           "batch_s": round(batch_s, 2), "batch_queries_per_s": round(answered / batch_s, 1),
           "exact_s": round(exact_s, 2), "exact_queries_per_s": round(queries / exact_s, 1),
           "exact_sample": len(rows), "batch_speedup_vs_exact": round(exact_s / batch_s, 2),
           "recall_at_k": round(hits / (len(rows) * k), 4),
           "single_load_s": round(load_s, 2), "single_queries": len(latencies),
           "single_recall_at_k": round(single_hits / (len(latencies) * k), 4),
           "single_p50_ms": round(statistics.median(latencies), 2),
           "single_p95_ms": round(float(np.percentile(latencies, 95)), 2)}
    log.info("[bench search] %s", out)
    return out
