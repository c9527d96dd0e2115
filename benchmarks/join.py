"""``prodsim bench join``: our blocked join vs exact top-K vs Spark MLlib LSH, on clustered synthetic
vectors; ``--scaling`` fits the exponent of time vs N."""
from __future__ import annotations

import logging
import statistics
import time

import numpy as np

from prodsim_spark.config import ProdsimConfig

log = logging.getLogger(__name__)


CHUNK = 10_000


def clustered_vectors(start: int, end: int, d: int, seed: int, n_total: int, *, rows: int | None = None,
                      stream: tuple[int, ...] = ()) -> np.ndarray:
    """Rows [start, end) of a clustered synthetic set of ``rows`` (default ``n_total``) unit vectors, the
    same whoever computes them (the driver for exact search, Spark tasks for ours): rows come in seeded
    chunks of CHUNK.

    About n_total/100 clusters (catalog-like: groups of near-duplicates and variants); noise such that a
    point's cosine to its own centre is about 0.7. Another ``stream`` draws other points of the same
    clusters (the search bench's queries)."""
    clusters = max(10, n_total // 100)
    rows = n_total if rows is None else rows
    centres = np.random.default_rng(seed).normal(size=(clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = []
    for chunk in range(start // CHUNK, (end - 1) // CHUNK + 1):
        rng = np.random.default_rng([seed, *stream, chunk])
        lo = chunk * CHUNK
        hi = min(lo + CHUNK, rows)
        which = rng.integers(clusters, size=hi - lo)
        x = centres[which] + rng.normal(scale=1.0 / np.sqrt(d), size=(hi - lo, d)).astype(np.float32)
        out.append(x[max(start, lo) - lo:min(end, hi) - lo])
    x = np.concatenate(out)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_frame(spark, rows: int, id_column: str, prefix: str, vectors):
    """A DataFrame (``id_column``, text_embedding) of ``rows`` synthetic rows, generated inside Spark
    tasks: ``vectors(lo, hi)`` gives rows [lo, hi), ids are ``prefix`` + the row number."""
    parts = max(1, min(rows // CHUNK + 1, spark.sparkContext.defaultParallelism * 4))
    bounds = np.linspace(0, rows, parts + 1).astype(int)

    def gen(batches):
        import pandas as pd

        for pdf in batches:
            for part in pdf["id"]:
                lo, hi = int(bounds[part]), int(bounds[part + 1])
                if hi > lo:
                    yield pd.DataFrame({id_column: [f"{prefix}{i:07d}" for i in range(lo, hi)],
                                        "text_embedding": list(vectors(lo, hi))})

    return (spark.range(parts).repartition(parts)
            .mapInPandas(gen, f"{id_column} string, text_embedding array<float>"))


def synthetic_products(spark, n: int, d: int, seed: int = 7):
    """A DataFrame of n products with synthetic text embeddings (:func:`clustered_vectors`)."""
    return synthetic_frame(spark, n, "product_id", "p", lambda lo, hi: clustered_vectors(lo, hi, d, seed, n))


def exact_top_k(x: np.ndarray, query_rows: np.ndarray, k: int, block: int = 512) -> np.ndarray:
    """Exact top-k (self excluded) of the given rows against all of x, by blocked matrix multiply."""
    out = np.empty((len(query_rows), k), dtype=np.int64)
    for s in range(0, len(query_rows), block):
        rows = query_rows[s:s + block]
        sims = x[rows] @ x.T
        sims[np.arange(len(rows)), rows] = -np.inf
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[s:s + block] = np.take_along_axis(part, order, axis=1)
    return out


def exact_top_k_streamed(n: int, d: int, seed: int, query_rows: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """:func:`exact_top_k` of the synthetic set without holding it: the vectors are generated again
    chunk by chunk (CHUNK rows), so memory stays at a chunk whatever n (2M x 384 floats would be 3 GB
    beside the JVM). Also returns the seconds spent scoring and ranking (what exact search costs; the
    generation of the vectors is not part of it)."""
    queries = np.concatenate([clustered_vectors(lo, min(lo + CHUNK, n), d, seed, n)[
        query_rows[(query_rows >= lo) & (query_rows < lo + CHUNK)] - lo] for lo in range(0, n, CHUNK)])
    best_s = np.full((len(query_rows), k), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(query_rows), k), dtype=np.int64)
    spent = 0.0
    for lo in range(0, n, CHUNK):
        x = clustered_vectors(lo, min(lo + CHUNK, n), d, seed, n)
        started = time.perf_counter()
        sims = queries @ x.T
        mine = (query_rows >= lo) & (query_rows < lo + len(x))
        sims[np.flatnonzero(mine), query_rows[mine] - lo] = -np.inf  # self excluded
        both_s = np.concatenate([best_s, sims], axis=1)
        both_i = np.concatenate([best_i, np.broadcast_to(np.arange(lo, lo + len(x)), sims.shape)], axis=1)
        top = np.argpartition(-both_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(both_s, top, axis=1), np.take_along_axis(both_i, top, axis=1)
        spent += time.perf_counter() - started
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_i, order, axis=1), spent


def recall(found: dict[str, list[str]], exact: np.ndarray, query_rows: np.ndarray, k: int) -> float:
    hits = 0
    for qi, row in enumerate(query_rows):
        truth = {f"p{j:07d}" for j in exact[qi][:k]}
        hits += len(truth & set(found.get(f"p{row:07d}", [])[:k]))
    return hits / (len(query_rows) * k)


def _mllib_join(spark, products, n: int, k: int, bucket_length: float, tables: int, threshold: float):
    """Spark MLlib BucketedRandomProjectionLSH self-join + per-item top-K (the baseline)."""
    from pyspark.ml.feature import BucketedRandomProjectionLSH
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    df = products.select("product_id", array_to_vector("text_embedding").alias("v")).cache()
    df.count()
    model = BucketedRandomProjectionLSH(inputCol="v", outputCol="h", bucketLength=bucket_length,
                                        numHashTables=tables, seed=1).fit(df)
    pairs = (model.approxSimilarityJoin(df, df, threshold, distCol="dist")
             .select(F.col("datasetA.product_id").alias("q"), F.col("datasetB.product_id").alias("m"), "dist")
             .where("q != m"))
    w = Window.partitionBy("q").orderBy("dist", "m")
    top = pairs.withColumn("r", F.row_number().over(w)).where(f"r <= {k}")
    rows = top.groupBy("q").agg(F.sort_array(F.collect_list(F.struct("r", "m"))).alias("l")).collect()
    df.unpersist()
    return {r["q"]: [x["m"] for x in r["l"]] for r in rows}


def shuffle_write_bytes(spark) -> int | None:
    """Shuffle bytes written by this application so far (Spark's monitoring REST API); None without a UI."""
    import json
    import urllib.request

    url = spark.sparkContext.uiWebUrl
    if not url:
        return None
    try:
        with urllib.request.urlopen(f"{url}/api/v1/applications/{spark.sparkContext.applicationId}/stages",
                                    timeout=30) as answer:
            return int(sum(stage.get("shuffleWriteBytes", 0) for stage in json.load(answer)))
    except OSError:
        return None


def bench_join(spark, config: ProdsimConfig, *, n: int, d: int = 384, sample: int = 2000,
               mllib: bool | None = None, mllib_bucket_length: float = 1.0, mllib_tables: int = 4,
               repeats: int = 3) -> dict:
    """Ours vs exact top-K (on a sample of queries, time extrapolated to all n) vs MLlib BRP-LSH (n <= 20,000).
    K and the join's knobs are ``config.join``'s.

    Ours runs ``repeats`` times (median reported; the first run also starts Python workers); exact and
    MLlib once each, as they take minutes where ours takes seconds.
    """
    from pyspark.sql import functions as F

    from prodsim_spark import join

    # the synthetic products have text vectors only: the other components would weigh nothing anyway
    settings = config.join.replaced(weights={"image": 0.0, "brand": 0.0, "category": 0.0, "price": 0.0})
    k = settings.k
    products = synthetic_products(spark, n, d).cache()
    products.count()
    query_rows = np.sort(np.random.default_rng(3).choice(n, size=min(sample, n), replace=False))
    wanted = [f"p{i:07d}" for i in query_rows]
    runs = []
    for _ in range(max(1, repeats)):
        shuffled = shuffle_write_bytes(spark)
        started = time.perf_counter()
        result = (join.find_neighbours(products, settings)
                  .select("product_id", F.col("neighbours.product_id").alias("ids")).persist())
        rows = result.count()  # forces the whole join, for every product
        runs.append(time.perf_counter() - started)
        shuffled = shuffle_write_bytes(spark) - shuffled if shuffled is not None else None
        found = {r["product_id"]: r["ids"] for r in result.where(F.col("product_id").isin(wanted)).collect()}
        result.unpersist()
        log.info("[bench join] ours: %d products in %.1f s", rows, runs[-1])
    ours_s = statistics.median(runs)

    products.unpersist()  # the exact baseline runs on the driver alone
    exact, spent = exact_top_k_streamed(n, d, 7, query_rows, k)
    exact_s = spent * n / len(query_rows)
    out = {"n": n, "k": k, "d": d, "ours_s": round(ours_s, 2), "ours_recall": round(recall(found, exact, query_rows, k), 4),
           "ours_s_runs": [round(t, 2) for t in runs],
           "exact_s": round(exact_s, 2), "exact_sample": len(query_rows),
           "speedup_vs_exact": round(exact_s / ours_s, 2),
           "settings": {"block_size": settings.block_size, "spill": settings.spill,
                        "refine_passes": settings.refine_passes, "sample_size": settings.sample_size,
                        "sample_per_cell": settings.sample_per_cell},
           "shuffle_bytes_per_product": round(shuffled / n, 1) if shuffled is not None else None}
    if mllib is None:
        mllib = n <= 20_000
    if mllib:
        # MLlib's join needs a distance threshold: the largest exact k-th neighbour distance in the
        # sample, the tightest one that can still reach full recall (a looser one only adds pairs).
        x = clustered_vectors(0, n, d, 7, n)
        kth = np.einsum("ij,ij->i", x[query_rows], x[exact[:, -1]])
        threshold = float(np.sqrt(max(0.0, 2 - 2 * kth.min())))
        started = time.perf_counter()
        lsh = _mllib_join(spark, synthetic_products(spark, n, d), n, k, mllib_bucket_length, mllib_tables,
                          threshold=threshold)
        out["mllib_s"] = round(time.perf_counter() - started, 2)
        out["mllib_recall"] = round(recall(lsh, exact, query_rows, k), 4)
        out["mllib_setting"] = {"bucketLength": mllib_bucket_length, "numHashTables": mllib_tables,
                                "threshold": round(threshold, 4)}
        out["speedup_vs_mllib"] = round(out["mllib_s"] / ours_s, 2)
    else:
        out.update(mllib_s=None, mllib_recall=None, speedup_vs_mllib=None)
    log.info("[bench join] %s", out)
    return out


def bench_scaling(spark, config: ProdsimConfig, sizes=(50_000, 100_000, 200_000, 400_000), sample: int = 500) -> dict:
    runs = [bench_join(spark, config, n=n, sample=min(sample, 500), mllib=False, repeats=1) for n in sorted(sizes)]
    t = np.log([r["ours_s"] for r in runs])
    exponent = float(np.polyfit(np.log(sorted(sizes)), t, 1)[0])
    return {"runs": runs, "scaling_exponent": round(exponent, 3)}
