"""``prodsim bench embed``: the Spark embedding stage vs the bare encoder in one process, and the CPU
runtimes (``embed.*.runtime``): each one's Spark rows/s on the same rows, in the same run, and what it
costs in quality (text: R@10 on Amazon-Google, text alone; images: image-alone R@1 on grocery
listings' photos), exact search so that only the vectors differ."""
from __future__ import annotations

import csv
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np

from prodsim_spark.config import ProdsimConfig
from prodsim_spark.pipeline import torch_threads

log = logging.getLogger(__name__)

SAMPLE_CATALOG = Path(__file__).resolve().parents[1] / "data" / "sample" / "catalog.csv"


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

    texts, images = _sample_inputs(catalog or SAMPLE_CATALOG)
    settings = config.embed
    threads = torch_threads(spark, config)
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
            spark_times.append(_spark_time(df, udf))
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


def _spark_time(df, udf) -> float:
    return _time(lambda: df.select(udf("x")).write.format("noop").mode("overwrite").save())


TEXT_RUNTIMES = ("torch", "onnx", "onnx-int8")
IMAGE_RUNTIMES = ("torch", "onnx")


def bench_runtimes(spark, config: ProdsimConfig, *, rows: int = 2000, image_rows: int = 400, repeats: int = 3,
                   amazon_google: Path | None = None, grocery: Path | None = None, work: Path | None = None,
                   catalog: Path | None = None) -> dict:
    """Per runtime: Spark stage rows/s (median of ``repeats``, after a warm-up run that loads the
    model and exports it) on the rows :func:`bench_embed` uses, and the quality figures (None when the
    dataset folder is not given)."""
    from prodsim_spark import embed

    texts, images = _sample_inputs(catalog or SAMPLE_CATALOG)
    threads = torch_threads(spark, config)
    parallelism = spark.sparkContext.defaultParallelism
    out: dict = {}

    def frame(items):
        df = spark.createDataFrame([(x,) for x in items], "x string").repartition(parallelism).cache()
        df.count()
        return df

    jobs = []
    if config.embed.text.enabled and rows:
        jobs.append(("text", TEXT_RUNTIMES, frame(_cycle(texts, rows)), embed.text_embedding_udf))
    if config.embed.image.enabled and image_rows:
        jobs.append(("image", IMAGE_RUNTIMES, frame([i.split(" #")[0] for i in _cycle(images, image_rows)]),
                     embed.image_embedding_udf))
    for modality, names, df, make_udf in jobs:
        n = df.count()
        for name in names:
            settings = _with_runtime(config, modality, name).embed
            udf = make_udf(settings, threads)
            _spark_time(df, udf)  # warm-up: workers load (and export) the model
            seconds = statistics.median(_spark_time(df, udf) for _ in range(repeats))
            out.setdefault(name, {})[f"{modality}_rows_per_s"] = round(n / seconds, 1)
            log.info("[bench embed] %s runtime %s: %.1f rows/s", modality, name, n / seconds)
        df.unpersist()
    for name in out:
        if "text_rows_per_s" in out[name] and amazon_google is not None:
            out[name]["text_r10_amazon_google"] = amazon_google_text_recall(
                spark, _with_runtime(config, "text", name), amazon_google, 10)
        if "image_rows_per_s" in out[name] and grocery is not None:
            out[name]["image_r1_grocery"] = grocery_image_recall_at_1(
                _with_runtime(config, "image", name), grocery, work or Path("out/bench-embed"))
    base = out.get("torch", {})
    for figures in out.values():  # ratios and losses against torch, measured in this run
        for modality in ("text", "image"):
            if f"{modality}_rows_per_s" in figures:
                figures[f"{modality}_speedup"] = round(figures[f"{modality}_rows_per_s"] / base[f"{modality}_rows_per_s"], 2)
        for key, loss in (("text_r10_amazon_google", "text_r10_loss"), ("image_r1_grocery", "image_r1_loss")):
            if key in figures:
                figures[loss] = round(base[key] - figures[key], 4)
    return out


def _with_runtime(config: ProdsimConfig, modality: str, runtime: str) -> ProdsimConfig:
    encoder = getattr(config.embed, modality).model_copy(update={"runtime": runtime})
    return config.model_copy(update={"embed": config.embed.model_copy(update={modality: encoder})})


def _recall(x: np.ndarray, ids: list[str], truth: dict[str, set], k: int) -> float:
    """Exact cosine top-k (self excluded) of each product with a true match: the share with one in it."""
    rows = [i for i, p in enumerate(ids) if p in truth]
    sims = x[rows] @ x.T
    sims[np.arange(len(rows)), rows] = -np.inf
    top = np.argsort(-sims, axis=1)[:, :k]
    return round(float(np.mean([bool(truth[ids[r]] & {ids[j] for j in t}) for r, t in zip(rows, top)])), 4)


def amazon_google_text_recall(spark, config: ProdsimConfig, src: Path, k: int) -> float:
    """Text alone, exact, over the pooled Amazon + Google catalog: R@k of the matched products."""
    from benchmarks import datasets
    from prodsim_spark import embed
    from prodsim_spark.encoders import TextEncoder

    rows = datasets.shop_rows(src, "amazon") + datasets.shop_rows(src, "google")
    settings = config.embed.text
    texts = [r["text"] for r in spark.createDataFrame(rows).select(
        embed.compose_text(settings.template, settings.description_chars).alias("text")).collect()]
    x = TextEncoder(settings, "cpu").encode([t or "" for t in texts], batch_size=config.embed.batch_size)
    truth: dict[str, set] = {}
    for a, g in datasets.amazon_google_matches(src):
        truth.setdefault(a, set()).add(g)
        truth.setdefault(g, set()).add(a)
    return _recall(x, [r["product_id"] for r in rows], truth, k)


def grocery_image_recall_at_1(config: ProdsimConfig, src: Path, work: Path) -> float:
    """Image alone, exact, over the train split's listing photos: R@1 (the nearest other photo is a
    listing of the same product)."""
    from benchmarks import datasets
    from prodsim_spark.encoders import ImageEncoder

    catalog, _ = datasets.grocery_catalog(src, work / "grocery-train", "train")
    listings = [r for r in csv.DictReader(open(catalog, encoding="utf-8")) if r["image_uri"]]
    group = {r["product_id"]: r["group"] for r in csv.DictReader(open(catalog.parent / "groups.csv", encoding="utf-8"))}
    settings = config.embed
    vectors, errors = ImageEncoder(settings.image, "cpu").encode_uris(
        [r["image_uri"] for r in listings], settings.batch_size, settings.decode_threads)
    keep = [i for i, v in enumerate(vectors) if v is not None]
    ids = [listings[i]["product_id"] for i in keep]
    members: dict[str, set] = {}
    for p in ids:
        members.setdefault(group[p], set()).add(p)
    truth = {p: members[group[p]] - {p} for p in ids if len(members[group[p]]) > 1}
    return _recall(np.stack([vectors[i] for i in keep]), ids, truth, 1)
