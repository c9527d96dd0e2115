"""Join stage: each product's K most similar products by fused score, without comparing all pairs.

Plan (IVF blocking, see :mod:`prodsim_spark.fusion` for the maths):

1. centroids: spherical k-means on a sample of the fused dense vectors, on the driver; cells that
   would hold more than ``join.max_block_size`` products are split again (skew guard); then
   ``join.refine_passes`` Lloyd passes over all products on the executors;
2. every product is stored in its ``join.spill`` nearest cells, and searched from the nearest (its
   home) only; with ``join.category_mode=hard`` a cell is also keyed by category, so only products
   of one category meet;
3. per cell, exact fused scores of its home products x all products stored in it, by matrix multiply
   (``applyInPandas``); each product's best K (score descending, ties by product id) is final there.

A neighbour is found when it was spilled into the product's home cell. Spilling members rather than
probing with queries (as IVF does) gives about the same recall for the same work, and each product's
list is complete in one task, so there is no second shuffle to merge candidate lists and no product
can go missing. Recall against exact top-K grows with spill; time grows with spill x block_size per
product.
"""
from __future__ import annotations

import logging
from functools import partial
import time
from typing import Iterator, NamedTuple

import numpy as np
import pandas as pd
from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark import fusion
from prodsim_spark.config import FusionWeights, JoinSettings
from prodsim_spark.tables import live_catalog, live_embeddings

log = logging.getLogger(__name__)

NEIGHBOUR = T.StructType([
    T.StructField("product_id", T.StringType()), T.StructField("score", T.FloatType()),
    *[T.StructField(c, T.FloatType()) for c in fusion.PARTS]])


def code(col: Column) -> Column:
    """A stable int64 code for a string value (lower-cased, trimmed); -1 when missing."""
    clean = F.lower(F.trim(col))
    return F.when(clean.isNull() | (clean == ""), F.lit(-1).cast("long")).otherwise(F.abs(F.xxhash64(clean)))


def join_inputs(catalog: DataFrame, embeddings: DataFrame, lexical: DataFrame | None = None) -> DataFrame:
    """Products that can be joined: not rejected, with their embeddings (and lexical vectors, when
    given) and structured attributes."""
    live = live_embeddings(embeddings).select("product_id", "text_embedding", "image_embedding")
    # catalogs written before the source column existed have none: no source, no penalty
    source = F.col("source") if "source" in catalog.columns else F.lit(None).cast("string")
    products = (live_catalog(catalog)
                .select("product_id", code(F.col("brand")).alias("brand"), code(F.col("category")).alias("category"),
                        F.when(F.col("price") > 0, F.log("price")).alias("log_price"), code(source).alias("source"))
                .join(live, "product_id", "inner"))
    return products if lexical is None else products.join(lexical, "product_id", "left")


def _vector_col(name: str) -> str:
    return f"{name}_embedding"


class InputShape(NamedTuple):
    dims: dict[str, int]      # each vector modality's dimension (0: absent)
    count: int                # products
    several_sources: bool     # two or more known sources (the same-source penalty applies)


def input_shape(products: DataFrame) -> InputShape:
    """What the join needs to know of its input before planning, in one pass over it."""
    present = [m for m in fusion.DENSE if _vector_col(m) in products.columns]
    known = (F.when(F.col("source") >= 0, F.col("source")) if "source" in products.columns
             else F.lit(None).cast("long"))
    row = products.select(*[F.max(F.size(_vector_col(m))).alias(m) for m in present],
                          F.count("*").alias("n"), F.min(known).alias("lo"), F.max(known).alias("hi")).first()
    dims = {m: max(int(row[m] or 0), 0) if m in present else 0 for m in fusion.DENSE}
    return InputShape(dims, int(row["n"]), row["lo"] is not None and row["lo"] != row["hi"])


def _products(pdf: pd.DataFrame, vectors: dict[str, tuple[np.ndarray, np.ndarray]]) -> fusion.Products:
    return fusion.Products(pdf["product_id"].to_numpy(dtype=object), {m: v[0] for m, v in vectors.items()},
                           {m: v[1] for m, v in vectors.items()},
                           pdf["brand"].to_numpy(dtype=np.int64), pdf["category"].to_numpy(dtype=np.int64),
                           pdf["log_price"].to_numpy(dtype=np.float64, na_value=np.nan),
                           pdf["source"].to_numpy(dtype=np.int64))


def products_from_columns(pdf: pd.DataFrame, dims: dict[str, int]) -> fusion.Products:
    """Products from rows with the columns :func:`join_inputs` returns (vectors as arrays; normalised here)."""
    return _products(pdf, {m: fusion.stack_vectors(pdf[_vector_col(m)].tolist(), d) for m, d in dims.items()})


def arrow_vectors(column, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`fusion.stack_vectors` of an Arrow list<float> column (null or another length: missing),
    without a Python object per row: on a block of 100k products the pandas path (one numpy array
    per row, then a stack) took longer than all the scoring of an incremental scan."""
    import pyarrow as pa
    import pyarrow.compute as pc

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    out, has = np.zeros((n, dim), dtype=np.float32), np.zeros(n, dtype=bool)
    if dim and n:
        has = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False) == dim
        if has.any():
            kept = arr if has.all() else arr.filter(pa.array(has))
            out[has] = kept.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    return fusion.unit_rows(out, has)


def products_from_arrow(table, dims: dict[str, int]) -> fusion.Products:
    """:func:`products_from_columns` of an Arrow table or record batch with the same columns."""
    import pyarrow.compute as pc

    def ints(name: str) -> np.ndarray:
        return pc.fill_null(table.column(name), -1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)

    vectors = {m: arrow_vectors(table.column(_vector_col(m)), d) for m, d in dims.items()}
    log_price = pc.fill_null(table.column("log_price").cast("double"), float("nan")).to_numpy(zero_copy_only=False)
    return fusion.Products(table.column("product_id").to_numpy(zero_copy_only=False).astype(object),
                           {m: v[0] for m, v in vectors.items()}, {m: v[1] for m, v in vectors.items()},
                           ints("brand"), ints("category"), log_price, ints("source"))


def unpack_vectors(values, dim: int) -> tuple[np.ndarray, np.ndarray]:
    out = np.zeros((len(values), dim), dtype=np.float32)
    has = np.array([v is not None for v in values], dtype=bool)
    if dim and has.any():
        out[has] = np.frombuffer(b"".join(v for v in values if v is not None), dtype=np.float32).reshape(-1, dim)
    return out, has


def products_from_routed(pdf: pd.DataFrame, dims: dict[str, int]) -> fusion.Products:
    """Products from routed rows (vectors as float32 bytes, already normalised)."""
    return _products(pdf, {m: unpack_vectors(pdf[f"{m}_vec"].tolist(), d) for m, d in dims.items()})


def routed_frame(ids: np.ndarray, p: fusion.Products) -> pd.DataFrame:
    """Products as rows to ship to a cell: vectors as raw float32 bytes (Arrow moves a binary value in
    one copy, where an array<float> costs a conversion per element on both sides)."""
    return pd.DataFrame({"product_id": ids,
                         **{f"{m}_vec": [v.tobytes() if h else None for v, h in zip(p.vectors[m], p.has[m])]
                            for m in fusion.DENSE},
                         "brand": p.brand, "category": p.category, "log_price": p.log_price, "source": p.source})


def routed_copies(pdf: pd.DataFrame, dims: dict[str, int], weights: FusionWeights, centroids: np.ndarray,
                  spill: int) -> pd.DataFrame:
    """Rows of products (columns as :func:`join_inputs` returns) as ``ROUTED_SCHEMA`` rows: one copy per
    cell among each product's ``spill`` nearest; ``home`` marks the nearest."""
    p = products_from_columns(pdf, dims)
    nearest = fusion.nearest_cells(fusion.fused_dense(p, weights), centroids, spill)
    flat = routed_frame(pdf["product_id"].to_numpy(), p)
    copies = flat.loc[flat.index.repeat(nearest.shape[1])].assign(
        cell=nearest.reshape(-1).astype(np.int64), home=np.tile(np.arange(nearest.shape[1]) == 0, len(flat)))
    return copies[ROUTED_SCHEMA.fieldNames()]


ROUTED_SCHEMA = T.StructType([
    T.StructField("cell", T.LongType()), T.StructField("home", T.BooleanType()),
    T.StructField("product_id", T.StringType()),
    *[T.StructField(f"{m}_vec", T.BinaryType()) for m in fusion.DENSE],
    T.StructField("brand", T.LongType()), T.StructField("category", T.LongType()),
    T.StructField("log_price", T.DoubleType()), T.StructField("source", T.LongType())])
# per product: its neighbours as parallel arrays (assembled into structs on the JVM, which is cheaper
# than building Python dicts per neighbour)
LISTS_SCHEMA = T.StructType([T.StructField("product_id", T.StringType()),
                             *[T.StructField(f"n_{f.name}", T.ArrayType(f.dataType)) for f in NEIGHBOUR.fields]])
QUERY_CHUNK = 1024  # queries scored at a time: bounds memory to QUERY_CHUNK x members floats per matrix


def score_cell(pdf: pd.DataFrame, *, dims: dict[str, int], weights: FusionWeights, price_scale: float,
               k: int, same_source_penalty: float = 0.0) -> pd.DataFrame:
    """One cell: every product whose home it is, against every product stored in it; best k each."""
    members = products_from_routed(pdf, dims)
    query_rows = np.flatnonzero(pdf["home"].to_numpy(dtype=bool))
    out: dict[str, list] = {f: [] for f in LISTS_SCHEMA.fieldNames()}
    scorer = partial(fusion.pair_scores, weights=weights, price_scale=price_scale,
                     same_source_penalty=same_source_penalty)
    for start in range(0, len(query_rows), QUERY_CHUNK):
        q = members.take(query_rows[start:start + QUERY_CHUNK])
        score, _ = scorer(q, members)
        rows, cols, best, parts = fusion.exact_top_k(score, q, members, k, scorer)
        bounds = np.searchsorted(rows, np.arange(len(q) + 1))
        values = {"product_id": members.ids[cols], "score": best,
                  **{c: parts.get(c, np.zeros(len(rows), np.float32)) for c in fusion.PARTS}}
        out["product_id"].extend(q.ids)
        for name, v in values.items():
            out[f"n_{name}"].extend(np.split(v, bounds[1:-1]))
    # object dtype even when empty: a cell holding only spilled copies has no queries, and Arrow
    # cannot convert pandas' default float64 for an empty column into a list column
    return pd.DataFrame({f: pd.Series(out[f], dtype=object) for f in LISTS_SCHEMA.fieldNames()})


def merged_top_k(rows: DataFrame, key: str, entry: str, k: int) -> DataFrame:
    """(``key``, entries): per ``key``, its ``entry`` structs (each with ``score`` and ``product_id``) from
    several places, merged: best score first, ties by product id, each product once (two cells that
    both hold a pair score it alike: see fusion.exact_top_k), at most ``k``."""
    ranked = rows.groupBy(key).agg(F.sort_array(F.collect_list(F.struct(
        (-F.col(f"{entry}.score")).alias("neg"), F.col(f"{entry}.product_id").alias("pid"),
        F.col(entry).alias("e")))).alias("all"))
    once = F.filter("all", lambda e, i: ~F.exists(F.slice("all", 1, i), lambda x: x["pid"] == e["pid"]))
    return ranked.select(key, F.transform(F.slice(once, 1, k), lambda x: x["e"]).alias("entries"))


def _refine(products: DataFrame, centroids: np.ndarray, *, dims: dict[str, int], weights: FusionWeights,
            passes: int) -> np.ndarray:
    """Lloyd passes of spherical k-means over *all* products, on the executors. Centroids from a
    sample alone are noisy when the catalog has many small groups (a few sampled products per group),
    and noisy centroids split groups across cells; each pass costs one scan of the products.

    The fused vectors are computed once and kept (memory, else disk) as raw float32 bytes per product:
    converting the array<float> columns to numpy again on every pass cost about twice the pass's own
    matrix product."""
    if not passes:
        return centroids
    width = centroids.shape[1]

    def pack(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            x = np.ascontiguousarray(fusion.fused_dense(products_from_columns(pdf, dims), weights), dtype=np.float32)
            yield pd.DataFrame({"fused": [row.tobytes() for row in x]})

    packed = products.mapInPandas(pack, "fused binary").persist(StorageLevel.MEMORY_AND_DISK)
    try:
        for done in range(passes):
            def sums(batches: Iterator[pd.DataFrame], c=centroids) -> Iterator[pd.DataFrame]:
                acc = np.zeros(c.shape, dtype=np.float64)
                for pdf in batches:
                    x = np.frombuffer(b"".join(pdf["fused"].tolist()), dtype=np.float32).reshape(-1, width)
                    acc += fusion.cell_sums(x, c)
                yield pd.DataFrame({"sums": [acc.tobytes()]})

            parts = packed.mapInPandas(sums, "sums binary").collect()
            total = sum(np.frombuffer(r["sums"], dtype=np.float64).reshape(centroids.shape) for r in parts)
            moved = centroids
            centroids = fusion.update_centroids(centroids, total)
            log.info("[join] refine pass %d/%d: mean centroid move %.4f", done + 1, passes,
                     float(np.mean(1 - np.sum(moved * centroids, axis=1))))
    finally:
        packed.unpersist()
    return centroids


class Cells(NamedTuple):
    """The IVF plan of one join: centroids over the fused dense vectors and the input's shape."""

    centroids: np.ndarray     # (cells, d) float32 unit rows
    shape: InputShape


def standard_columns(products: DataFrame) -> DataFrame:
    """``products`` with exactly the columns the join reads (absent vectors null, attributes missing)."""
    for m in fusion.DENSE:
        if _vector_col(m) not in products.columns:
            products = products.withColumn(_vector_col(m), F.lit(None).cast("array<float>"))
    for col, typ in (("brand", "long"), ("category", "long"), ("log_price", "double"), ("source", "long")):
        if col not in products.columns:
            products = products.withColumn(col, F.lit(None if col == "log_price" else -1).cast(typ))
    return products.select("product_id", *[_vector_col(m) for m in fusion.DENSE], "brand", "category",
                           "log_price", "source")


def is_exact(products: int, settings: JoinSettings) -> bool:
    """Whether a catalog of this size is joined exactly (``join.exact_max_products``)."""
    return products <= settings.exact_max_products


def sample_rows(n_total: int, dims: dict[str, int], settings: JoinSettings) -> int:
    """Products to sample for the first centroids: ``sample_size``, or ``sample_per_cell`` per cell when
    that is more, as far as ``max_sample_mb`` of fused vectors allows (never more than the catalog)."""
    width = max(1, sum(d for m, d in dims.items() if settings.weights.as_dict().get(m, 0) > 0))
    per_cell = settings.sample_per_cell * int(np.ceil(n_total / settings.block_size))
    cap = settings.max_sample_mb * 2**20 // (4 * width)
    return int(min(n_total, max(settings.sample_size, min(per_cell, cap))))


def plan_cells(products: DataFrame, settings: JoinSettings) -> Cells:
    """Step 1 of the join: centroids from a k-means on a sample (driver), refined over all products."""
    products = standard_columns(products)
    started = time.perf_counter()
    shape = input_shape(products)
    dims, n_total = shape.dims, shape.count
    if n_total == 0:
        return Cells(np.zeros((1, 1), dtype=np.float32), shape)
    rows = sample_rows(n_total, dims, settings)
    fraction = min(1.0, rows / n_total)
    sample = products.sample(fraction=fraction, seed=settings.seed).limit(rows).toPandas()
    exact = is_exact(n_total, settings)  # at most `spill` cells: every product is stored in every one
    centroids = fusion.train_cells(fusion.fused_dense(products_from_columns(sample, dims), settings.weights), n_total,
                                   block_size=settings.block_size, max_block_size=settings.max_block_size,
                                   iterations=settings.kmeans_iterations, seed=settings.seed,
                                   max_cells=settings.spill if exact else None)
    # when the sample was every product, its k-means already saw all the data: nothing to refine
    refine = settings.refine_passes if fraction < 1 and len(centroids) > 1 else 0
    centroids = _refine(products, centroids, dims=dims, weights=settings.weights, passes=refine)
    log.info("[join] %d products, %d cells (block_size %d, max %d) from a sample of %d, spill %d%s; planned in %.1f s",
             n_total, len(centroids), settings.block_size, settings.max_block_size, len(sample), settings.spill,
             f", exact (join.exact_max_products {settings.exact_max_products})" if exact else "",
             time.perf_counter() - started)
    return Cells(centroids, shape)


def find_neighbours(products: DataFrame, settings: JoinSettings, cells: Cells | None = None) -> DataFrame:
    """(product_id, neighbours: array<struct>) for every product in ``products`` (columns as
    :func:`join_inputs` returns; vector columns may be null or absent), using ``cells`` (default: planned
    here by :func:`plan_cells`). ``products`` is scanned 3 + ``refine_passes`` times: persist it first
    when it is expensive to compute."""
    spark = products.sparkSession
    products = standard_columns(products)
    weights = settings.weights
    cells = cells or plan_cells(products, settings)
    centroids, (dims, n_total, several_sources) = cells
    # one source (or none known): the penalty would lower every score alike and change no ranking
    penalty = settings.same_source_penalty if several_sources else 0.0
    if n_total == 0:
        return spark.createDataFrame([], T.StructType([T.StructField("product_id", T.StringType()),
                                                        T.StructField("neighbours", T.ArrayType(NEIGHBOUR))]))
    if several_sources:
        log.info("[join] products come from several sources: same-source pairs score %.2f lower "
                 "(join.same_source_penalty)", penalty)
    spill, hard, k, scale = settings.spill, settings.category_mode == "hard", settings.k, settings.price_scale
    if settings.hubness > 0:  # the correction may lift a candidate from below the k-th place: find 2k
        k = 2 * settings.k

    # 2. route: each product to its `spill` nearest cells; the nearest is its home, where it is searched from
    def route(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            yield routed_copies(pdf, dims, weights, centroids, spill)

    # 3. exact fused scores inside each cell; each product is a query in exactly one cell, so its
    # list is final there: no merge shuffle, and every product gets a row.
    keys = ["cell", "category"] if hard else ["cell"]
    lists = (products.mapInPandas(route, ROUTED_SCHEMA).groupBy(*keys)
             .applyInPandas(lambda pdf: score_cell(pdf, dims=dims, weights=weights, price_scale=scale, k=k,
                                                   same_source_penalty=penalty), LISTS_SCHEMA))
    lists = lists.select("product_id", F.transform("n_product_id", lambda _, i: F.struct(
        *[F.col(f"n_{f}")[i].alias(f) for f in NEIGHBOUR.fieldNames()])).alias("neighbours"))
    return hub_corrected(lists, settings.k, settings.hubness) if settings.hubness > 0 else lists


HUB_NEIGHBOURS = 10  # a product's hub score: the mean score of its first 10 neighbours (as CSLS uses)


def hub_score(scores: str) -> Column:
    """A product's hub score from ``scores``, an SQL array of its list's raw scores, best first: their
    mean over the first HUB_NEIGHBOURS (null for an empty list)."""
    h = HUB_NEIGHBOURS
    return F.expr(f"aggregate(slice({scores}, 1, {h}), 0D, (acc, x) -> acc + x) / least(size({scores}), {h})")


def hub_corrected(lists: DataFrame, k: int, hubness: float) -> DataFrame:
    """``lists`` (best first) re-ranked by score - hubness x (the candidate's hub score - the catalog's
    mean hub score), cut to ``k``; a product's hub score is the mean score of its own first
    ``HUB_NEIGHBOURS`` neighbours (join.hubness). Products with an empty list keep it."""
    lists = lists.persist()  # read three times below: the join behind it runs once
    hub = lists.where(F.size("neighbours") > 0).select(F.col("product_id").alias("candidate"),
                                                       hub_score("neighbours.score").alias("hub"))
    mean = hub.agg(F.avg("hub")).first()[0] or 0.0
    entries = (lists.select("product_id", F.explode("neighbours").alias("n"))
               .join(hub, F.col("n.product_id") == F.col("candidate"), "left")
               .select("product_id", F.struct(
                   *[(F.col("n.score") - F.lit(hubness) * (F.coalesce("hub", F.lit(mean)) - F.lit(mean))).cast("float")
                     .alias("score") if f == "score" else F.col(f"n.{f}") for f in NEIGHBOUR.fieldNames()]).alias("n")))
    # each candidate is in a list once: a plain sort (corrected score, then id) and a cut
    ranked = entries.groupBy("product_id").agg(F.slice(F.sort_array(F.collect_list(F.struct(
        (-F.col("n.score")).alias("neg"), F.col("n.product_id").alias("pid"), F.col("n").alias("e")))), 1, k)
        .alias("top")).select("product_id", F.transform("top", lambda x: x["e"]).alias("entries"))
    out = (lists.select("product_id").join(ranked, "product_id", "left")
           .select("product_id", F.coalesce("entries", F.array().cast(T.ArrayType(NEIGHBOUR))).alias("neighbours")))
    log.info("[join] hub correction: lists of %d re-ranked by score - %.2f x (candidate's hub score - %.3f)",
             2 * k, hubness, mean)
    return out


def neighbours_table(catalog: DataFrame, neighbours: DataFrame, embeddings: DataFrame | None = None) -> DataFrame:
    """One row per catalog row: its neighbours, or an empty list and the reason there are none:
    the ingest reason of a rejected row, ``no_embedding`` (no text or image vector: e.g. its only
    image was unreadable), or ``no_shared_content`` (no other product shares a content component
    with it). ``embeddings`` (the embeddings table) tells the first two apart."""
    found = neighbours.withColumnRenamed("neighbours", "found").withColumn("joined", F.lit(True))
    if embeddings is not None:
        vectors = live_embeddings(embeddings).select(
            "product_id", (F.col("text_embedding").isNotNull() | F.col("image_embedding").isNotNull()).alias("has_vector"))
        found = found.join(vectors, "product_id", "left")
    else:
        found = found.withColumn("has_vector", F.lit(True))
    empty = F.array().cast(T.ArrayType(NEIGHBOUR))
    rows = catalog.select("product_id", "source_row", "status", "reason").join(found, "product_id", "left")
    rejected = F.col("status") == "rejected"
    no_vector = F.col("joined").isNull() | ~F.coalesce(F.col("has_vector"), F.lit(False))
    return rows.select(
        "product_id", "source_row", "status",
        F.when(rejected, F.col("reason"))
        .when(no_vector, F.concat_ws(";", F.col("reason"), F.lit("no_embedding")))
        .when(F.size("found") == 0, F.concat_ws(";", F.col("reason"), F.lit("no_shared_content")))
        .otherwise(F.col("reason")).alias("reason"),
        F.when(rejected | F.col("joined").isNull(), empty).otherwise(F.col("found")).alias("neighbours"))
