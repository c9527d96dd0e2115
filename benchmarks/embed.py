"""``prodsim bench embed``: the Spark embedding stage vs the bare encoder in one process."""
from __future__ import annotations

import csv
import logging
import os
import statistics
import time
from pathlib import Path

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
