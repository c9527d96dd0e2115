"""Benchmarks that live in the project (``prodsim bench ...``). Each compares ours with a baseline in
one run, on the same inputs, and reports medians over repeats, since machines are shared and noisy."""
from __future__ import annotations

import csv
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

from prodsim_spark.config import ProdsimConfig

log = logging.getLogger(__name__)

SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample"


def _sample_inputs(catalog: Path) -> tuple[list[str], list[str]]:
    """Texts (title + description) and image paths of a catalog CSV, to cycle through."""
    texts, images = [], []
    with open(catalog, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = ". ".join(v for v in (row.get("title"), row.get("brand"), row.get("category"),
                                         (row.get("description") or "")[:300]) if v)
            if text:
                texts.append(text)
            uri = row.get("image_uri") or ""
            path = (catalog.parent / uri) if uri and not os.path.isabs(uri) else Path(uri)
            if uri and path.is_file() and path.stat().st_size > 2000:
                images.append(str(path))
    return texts, images


def _cycle(items: list[str], n: int) -> list[str]:
    # a running number keeps every text distinct, so nothing downstream can deduplicate the work
    return [f"{items[i % len(items)]} #{i}" if i >= len(items) else items[i] for i in range(n)] if items else []


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_embed(spark, config: ProdsimConfig, *, rows: int = 2000, image_rows: int = 400, repeats: int = 3,
                catalog: Path | None = None) -> dict:
    """Spark stage vs bare encoder, text and images, same rows and batch size, in this process.

    Spark: the pandas UDF over a cached DataFrame, written to the no-op sink, tasks x torch threads =
    cores. Bare: the same encoder class called directly in this process with all cores' threads.
    Medians of ``repeats`` runs; the first Spark run also pays for starting workers and loading models.
    """
    import torch

    from prodsim_spark import embed
    from prodsim_spark.encoders import ImageEncoder, TextEncoder

    texts, images = _sample_inputs(catalog or SAMPLE_DIR / "catalog.csv")
    settings = config.embed
    threads = settings.torch_threads or int(spark.conf.get("spark.task.cpus", "1") or 1)
    parallelism = spark.sparkContext.defaultParallelism
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(settings.arrow_batch_size))
    cores = os.cpu_count() or 1
    results: dict = {"cores": cores, "spark_tasks": parallelism, "torch_threads_per_task": threads,
                     "batch_size": settings.batch_size, "repeats": repeats}

    def run(kind: str, items: list[str], udf, bare_fn) -> dict:
        df = spark.createDataFrame([(x,) for x in items], "x string").repartition(parallelism).cache()
        df.count()
        spark_times, bare_times = [], []
        for _ in range(repeats):
            spark_times.append(_time(lambda: df.select(udf("x")).write.format("noop").mode("overwrite").save()))
            torch.set_num_threads(cores)
            bare_times.append(_time(bare_fn))
        df.unpersist()
        spark_s, bare_s = statistics.median(spark_times), statistics.median(bare_times)
        out = {"rows": len(items), "spark_s": round(spark_s, 3), "bare_s": round(bare_s, 3),
               "rows_per_s_spark": round(len(items) / spark_s, 1), "rows_per_s_bare": round(len(items) / bare_s, 1),
               "ratio": round(bare_s / spark_s, 3),
               "spark_s_runs": [round(t, 2) for t in spark_times], "bare_s_runs": [round(t, 2) for t in bare_times]}
        log.info("[bench embed] %s: spark %.1f rows/s, bare %.1f rows/s, ratio %.3f",
                 kind, out["rows_per_s_spark"], out["rows_per_s_bare"], out["ratio"])
        return out

    if settings.text.enabled and rows:
        items = _cycle(texts, rows)
        bare = TextEncoder(settings.text, "cpu" if settings.device == "auto" and not torch.cuda.is_available()
                           else settings.device)
        results["text"] = run("text", items, embed.text_embedding_udf(settings, threads),
                              lambda: bare.encode(items, batch_size=settings.batch_size))
    if settings.image.enabled and image_rows:
        items = _cycle(images, image_rows)
        items = [i.split(" #")[0] for i in items]  # paths must stay paths
        bare_img = ImageEncoder(settings.image, settings.device)
        results["image"] = run("image", items, embed.image_embedding_udf(settings, threads),
                               lambda: bare_img.encode_uris(items, settings.batch_size, settings.decode_threads))
    return results


# --------------------------------------------------------------------------------------------
# join

CHUNK = 10_000


def clustered_vectors(start: int, end: int, d: int, seed: int, n_total: int) -> np.ndarray:
    """Rows [start, end) of a clustered synthetic set of unit vectors, the same whoever computes them
    (the driver for exact search, Spark tasks for ours): rows come in seeded chunks of CHUNK.

    About n/100 clusters (catalog-like: groups of near-duplicates and variants); noise such that a
    point's cosine to its own centre is about 0.7."""
    clusters = max(10, n_total // 100)
    centres = np.random.default_rng(seed).normal(size=(clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = []
    for chunk in range(start // CHUNK, (end - 1) // CHUNK + 1):
        rng = np.random.default_rng([seed, chunk])
        lo = chunk * CHUNK
        hi = min(lo + CHUNK, n_total)
        which = rng.integers(clusters, size=hi - lo)
        x = centres[which] + rng.normal(scale=1.0 / np.sqrt(d), size=(hi - lo, d)).astype(np.float32)
        out.append(x[max(start, lo) - lo:min(end, hi) - lo])
    x = np.concatenate(out)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_products(spark, n: int, d: int, seed: int = 7):
    """A DataFrame of n products with synthetic text embeddings, generated inside Spark tasks."""
    parts = max(1, min(n // CHUNK + 1, spark.sparkContext.defaultParallelism * 4))
    bounds = np.linspace(0, n, parts + 1).astype(int)

    def gen(batches):
        import pandas as pd

        for pdf in batches:
            for part in pdf["id"]:
                lo, hi = int(bounds[part]), int(bounds[part + 1])
                if hi > lo:
                    x = clustered_vectors(lo, hi, d, seed, n)
                    yield pd.DataFrame({"product_id": [f"p{i:07d}" for i in range(lo, hi)],
                                        "text_embedding": list(x)})

    return (spark.range(parts).repartition(parts)
            .mapInPandas(gen, "product_id string, text_embedding array<float>"))


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


def bench_join(spark, config: ProdsimConfig, *, n: int, k: int, d: int = 384, sample: int = 2000,
               mllib: bool | None = None, mllib_bucket_length: float = 1.0, mllib_tables: int = 4,
               repeats: int = 3) -> dict:
    """Ours vs exact top-K (on a sample of queries, time extrapolated to all n) vs MLlib BRP-LSH (n <= 20,000).

    Ours runs ``repeats`` times (median reported; the first run also starts Python workers); exact and
    MLlib once each, as they take minutes where ours takes seconds.
    """
    from pyspark.sql import functions as F

    from prodsim_spark import join

    settings = config.join.model_copy(update={"k": k})
    settings.weights = settings.weights.model_copy(update={"image": 0.0, "brand": 0.0, "category": 0.0, "price": 0.0})
    products = synthetic_products(spark, n, d).cache()
    products.count()
    query_rows = np.sort(np.random.default_rng(3).choice(n, size=min(sample, n), replace=False))
    wanted = [f"p{i:07d}" for i in query_rows]
    runs = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        result = (join.find_neighbours(products, settings)
                  .select("product_id", F.col("neighbours.product_id").alias("ids")).persist())
        rows = result.count()  # forces the whole join, for every product
        runs.append(time.perf_counter() - started)
        found = {r["product_id"]: r["ids"] for r in result.where(F.col("product_id").isin(wanted)).collect()}
        result.unpersist()
        log.info("[bench join] ours: %d products in %.1f s", rows, runs[-1])
    ours_s = statistics.median(runs)

    x = clustered_vectors(0, n, d, 7, n)
    started = time.perf_counter()
    exact = exact_top_k(x, query_rows, k)
    exact_s = (time.perf_counter() - started) * n / len(query_rows)
    out = {"n": n, "k": k, "d": d, "ours_s": round(ours_s, 2), "ours_recall": round(recall(found, exact, query_rows, k), 4),
           "ours_s_runs": [round(t, 2) for t in runs],
           "exact_s": round(exact_s, 2), "exact_sample": len(query_rows),
           "speedup_vs_exact": round(exact_s / ours_s, 2),
           "settings": {"block_size": settings.block_size, "spill": settings.spill}}
    if mllib is None:
        mllib = n <= 20_000
    if mllib:
        # MLlib's join needs a distance threshold: the largest exact k-th neighbour distance in the
        # sample, the tightest one that can still reach full recall (a looser one only adds pairs).
        kth = np.einsum("ij,ij->i", x[query_rows], x[exact[:, -1]])
        threshold = float(np.sqrt(max(0.0, 2 - 2 * kth.min())))
        started = time.perf_counter()
        lsh = _mllib_join(spark, products, n, k, mllib_bucket_length, mllib_tables, threshold=threshold)
        out["mllib_s"] = round(time.perf_counter() - started, 2)
        out["mllib_recall"] = round(recall(lsh, exact, query_rows, k), 4)
        out["mllib_setting"] = {"bucketLength": mllib_bucket_length, "numHashTables": mllib_tables,
                                "threshold": round(threshold, 4)}
        out["speedup_vs_mllib"] = round(out["mllib_s"] / ours_s, 2)
    else:
        out.update(mllib_s=None, mllib_recall=None, speedup_vs_mllib=None)
    products.unpersist()
    log.info("[bench join] %s", out)
    return out


def bench_scaling(spark, config: ProdsimConfig, sizes=(50_000, 100_000, 200_000, 400_000), k: int = 10) -> dict:
    runs = [bench_join(spark, config, n=n, k=k, sample=500, mllib=False, repeats=1) for n in sizes]
    t = np.log([r["ours_s"] for r in runs])
    exponent = float(np.polyfit(np.log(sizes), t, 1)[0])
    return {"runs": runs, "scaling_exponent": round(exponent, 3)}


# --------------------------------------------------------------------------------------------
# quality


def bench_quality(spark, config: ProdsimConfig, dataset: str, data: Path, work: Path, k: int = 20) -> dict:
    """Labelled benchmark, all methods in one run on the same tables: TF-IDF baseline (amazon-google),
    each modality alone, fused default, fused with learned weights (two-fold cross-validated)."""
    from prodsim_spark import evaluate, quality
    from prodsim_spark.pipeline import run_ingest, run_embed

    if not data.exists():
        raise FileNotFoundError(f"bench quality: data folder {data} does not exist")
    if dataset == "amazon-google":
        catalog, pairs_path = quality.amazon_google_catalog(data, work / "data")
    else:
        catalog, pairs_path = quality.grocery_catalog(data, work / "data")
    output = str((work / "run").resolve())
    result = run_ingest(spark, str(catalog), output, config)
    run_embed(spark, output, config, result)
    pairs = quality.read_pairs(spark, str(pairs_path)).persist()
    products = quality.run_products(spark, output, config)
    methods: dict[str, dict] = {}
    if dataset == "amazon-google":
        from prodsim_spark import io

        catalog_table = io.read_delta(spark, output + "/catalog")
        methods["tf-idf baseline"] = evaluate.metrics(quality.tfidf_baseline(catalog_table, config, k), pairs)
        if config.join.same_source_penalty > 0:  # the baseline given the same knowledge of sources
            methods["tf-idf + same-source penalty"] = evaluate.metrics(
                quality.tfidf_baseline(catalog_table, config, k, config.join.same_source_penalty), pairs)
    lists = quality.ablations(products, config, k)
    for name, df in lists.items():
        methods[name] = evaluate.metrics(df, pairs)
        log.info("[bench quality] %s: %s", name, methods[name])
    learned, fits = quality.cross_validated(products, lists, pairs, config, k)
    methods["fused, learned weights (2-fold CV)"] = learned
    log.info("[bench quality] learned: %s", learned)
    return {"dataset": dataset, "products": result.rows, "k": k, "methods": methods, "fits": fits}
