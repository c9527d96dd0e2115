"""Join stage: each product's K most similar products by fused score, without comparing all pairs.

Plan (IVF blocking, see :mod:`prodsim_spark.fusion` for the maths):

1. centroids: spherical k-means on a sample of the fused dense vectors, on the driver; cells that
   would hold more than ``join.max_block_size`` products are split again (skew guard);
2. every product is stored in its nearest cell (member) and probes its ``join.nprobe`` nearest cells
   (query); with ``join.category_mode=hard`` a cell is also keyed by category, so only products of one
   category meet;
3. per cell, exact fused scores of queries x members by matrix multiply (``applyInPandas``),
   best K per query kept;
4. per product, the candidate lists of its probed cells merged to the top K (score descending,
   ties by product id).

Recall against exact top-K grows with nprobe; time grows with nprobe x block_size per product.
"""
from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark import fusion
from prodsim_spark.config import JoinSettings

log = logging.getLogger(__name__)

NEIGHBOUR = T.StructType([
    T.StructField("product_id", T.StringType()), T.StructField("score", T.FloatType()),
    *[T.StructField(c, T.FloatType()) for c in fusion.COMPONENTS]])
CANDIDATES_SCHEMA = T.StructType([T.StructField("query_id", T.StringType()), *NEIGHBOUR.fields])


def _code(col: Column) -> Column:
    """A stable int64 code for a string value (lower-cased, trimmed); -1 when missing."""
    clean = F.lower(F.trim(col))
    return F.when(clean.isNull() | (clean == ""), F.lit(-1).cast("long")).otherwise(F.abs(F.xxhash64(clean)))


def join_inputs(catalog: DataFrame, embeddings: DataFrame) -> DataFrame:
    """Products that can be joined: not rejected, with their embeddings and structured attributes."""
    live = embeddings.where("removed_at IS NULL").select("product_id", "text_embedding", "image_embedding")
    return (catalog.where("status != 'rejected'")
            .select("product_id", _code(F.col("brand")).alias("brand"), _code(F.col("category")).alias("category"),
                    F.when(F.col("price") > 0, F.log("price")).alias("log_price"))
            .join(live, "product_id", "inner"))


def _dims(products: DataFrame) -> tuple[int, int, int]:
    """Text and image dimensions and the product count, in one pass."""
    row = products.select(F.max(F.size("text_embedding")).alias("t"), F.max(F.size("image_embedding")).alias("i"),
                          F.count("*").alias("n")).first()
    return max(int(row["t"] or 0), 0), max(int(row["i"] or 0), 0), int(row["n"])


def _to_products(pdf: pd.DataFrame, dt: int, di: int) -> fusion.Products:
    text, has_text = fusion.stack_vectors(pdf["text_embedding"].tolist(), dt)
    image, has_image = fusion.stack_vectors(pdf["image_embedding"].tolist(), di)
    log_price = pdf["log_price"].to_numpy(dtype=np.float64, na_value=np.nan)
    return fusion.Products(pdf["product_id"].to_numpy(dtype=object), text, has_text, image, has_image,
                           pdf["brand"].to_numpy(dtype=np.int64), pdf["category"].to_numpy(dtype=np.int64), log_price)


def _unpack(values, dim: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(values), dim), dtype=np.float32)
    has = np.array([v is not None for v in values], dtype=bool)
    if dim and has.any():
        out[has] = np.frombuffer(b"".join(v for v in values if v is not None), dtype=np.float32).reshape(-1, dim)
    return out, has


def _from_routed(pdf: pd.DataFrame, dt: int, di: int) -> fusion.Products:
    text, has_text = _unpack(pdf["text_vec"].tolist(), dt)
    image, has_image = _unpack(pdf["image_vec"].tolist(), di)
    return fusion.Products(pdf["product_id"].to_numpy(dtype=object), text, has_text, image, has_image,
                           pdf["brand"].to_numpy(dtype=np.int64), pdf["category"].to_numpy(dtype=np.int64),
                           pdf["log_price"].to_numpy(dtype=np.float64, na_value=np.nan))


def find_neighbours(products: DataFrame, settings: JoinSettings) -> DataFrame:
    """(product_id, neighbours: array<struct>) for every product in ``products`` (columns as
    :func:`join_inputs` returns; text/image embeddings may be null or absent)."""
    spark = products.sparkSession
    for col, typ in (("text_embedding", "array<float>"), ("image_embedding", "array<float>"),
                     ("brand", "long"), ("category", "long"), ("log_price", "double")):
        if col not in products.columns:
            products = products.withColumn(col, F.lit(None).cast(typ) if col not in ("brand", "category")
                                           else F.lit(-1).cast("long"))
    products = products.select("product_id", "text_embedding", "image_embedding", "brand", "category", "log_price")
    weights = settings.weights.model_dump()
    dt, di, n_total = _dims(products)
    if n_total == 0:
        return spark.createDataFrame([], T.StructType([T.StructField("product_id", T.StringType()),
                                                        T.StructField("neighbours", T.ArrayType(NEIGHBOUR))]))

    # 1. centroids from a sample, on the driver
    fraction = min(1.0, settings.sample_size / n_total)
    sample = products.sample(fraction=fraction, seed=settings.seed).limit(settings.sample_size).toPandas()
    sp = _to_products(sample, dt, di)
    centroids = fusion.train_cells(fusion.fused_dense(sp.text, sp.has_text, sp.image, sp.has_image, weights),
                                   n_total, settings.block_size, settings.max_block_size,
                                   settings.kmeans_iterations, settings.seed)
    log.info("[join] %d products, %d cells (block_size %d, max %d), nprobe %d",
             n_total, len(centroids), settings.block_size, settings.max_block_size, settings.nprobe)
    nprobe, hard = settings.nprobe, settings.category_mode == "hard"

    # 2. route: each product once as member of its home cell, and as query to its nprobe cells.
    # Vectors travel as raw float32 bytes: Arrow moves a binary value in one copy, where an
    # array<float> costs a conversion per element on both sides.
    routed_schema = T.StructType([
        T.StructField("cell", T.LongType()), T.StructField("role", T.ByteType()),
        T.StructField("product_id", T.StringType()), T.StructField("text_vec", T.BinaryType()),
        T.StructField("image_vec", T.BinaryType()), T.StructField("brand", T.LongType()),
        T.StructField("category", T.LongType()), T.StructField("log_price", T.DoubleType())])

    def route(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            p = _to_products(pdf, dt, di)
            cells = fusion.nearest_cells(fusion.fused_dense(p.text, p.has_text, p.image, p.has_image, weights),
                                         centroids, nprobe)
            flat = pd.DataFrame({
                "product_id": pdf["product_id"].to_numpy(),
                "text_vec": [v.tobytes() if h else None for v, h in zip(p.text, p.has_text)],
                "image_vec": [v.tobytes() if h else None for v, h in zip(p.image, p.has_image)],
                "brand": p.brand, "category": p.category, "log_price": p.log_price})
            member = flat.assign(cell=cells[:, 0].astype(np.int64), role=np.int8(0))
            queries = flat.loc[flat.index.repeat(cells.shape[1])].assign(
                cell=cells.reshape(-1).astype(np.int64), role=np.int8(1))
            yield pd.concat([member, queries], ignore_index=True)[routed_schema.fieldNames()]

    routed = products.mapInPandas(route, routed_schema)
    k, scale = settings.k, settings.price_scale

    # 3. exact fused scores inside each cell
    def score_cell(pdf: pd.DataFrame) -> pd.DataFrame:
        members = _from_routed(pdf[pdf["role"] == 0], dt, di)
        queries = _from_routed(pdf[pdf["role"] == 1], dt, di)
        frames = []
        if len(members) and len(queries):
            for start in range(0, len(queries), 1024):  # bounded memory: 1024 x block_size at a time
                q = queries.take(slice(start, start + 1024))
                score, parts = fusion.pair_scores(q, members, weights, scale)
                r, c = fusion.top_k(score, q.ids, members.ids, k)
                frames.append(pd.DataFrame({
                    "query_id": q.ids[r], "product_id": members.ids[c], "score": score[r, c],
                    **{name: parts[name][r, c] if name in parts else np.zeros(len(r), np.float32)
                       for name in fusion.COMPONENTS}}))
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            {f: pd.Series(dtype=object if f in ("query_id", "product_id") else np.float32)
             for f in CANDIDATES_SCHEMA.fieldNames()})

    keys = ["cell", "category"] if hard else ["cell"]
    candidates = routed.groupBy(*keys).applyInPandas(score_cell, CANDIDATES_SCHEMA)

    # 4. merge each product's candidate lists: best K, score descending, ties by product id.
    # sort_array orders structs field by field, so (-score, product_id) first gives that order.
    merged = (candidates.groupBy("query_id")
              .agg(F.sort_array(F.collect_list(F.struct((-F.col("score")).alias("neg"), "product_id",
                                                        "score", *fusion.COMPONENTS))).alias("c"))
              .select(F.col("query_id").alias("product_id"),
                      F.transform(F.slice("c", 1, k), lambda x: F.struct(
                          *[x[f].alias(f) for f in NEIGHBOUR.fieldNames()])).alias("neighbours")))
    # products that found no candidate still get a row
    return (products.select("product_id").join(merged, "product_id", "left")
            .select("product_id", F.coalesce("neighbours", F.array().cast(T.ArrayType(NEIGHBOUR))).alias("neighbours")))


def neighbours_table(catalog: DataFrame, neighbours: DataFrame) -> DataFrame:
    """One row per catalog row: its neighbours, or an empty list and the reason there are none."""
    found = neighbours.withColumnRenamed("neighbours", "found")
    empty = F.array().cast(T.ArrayType(NEIGHBOUR))
    rows = catalog.select("product_id", "source_row", "status", "reason").join(
        found.withColumn("joined", F.lit(True)), "product_id", "left")
    rejected = F.col("status") == "rejected"
    return rows.select(
        "product_id", "source_row", "status",
        F.when(rejected, F.col("reason"))
        .when(F.col("joined").isNull(), F.concat_ws(";", F.col("reason"), F.lit("no_embedding")))
        .otherwise(F.col("reason")).alias("reason"),
        F.when(rejected | F.col("joined").isNull(), empty).otherwise(F.col("found")).alias("neighbours"))
