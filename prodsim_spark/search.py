"""Search stage: rank a run's products for shoppers' queries (text, image or both), with the run's index.

A query is what a shopper gives: a text ("羊毛衫", "golden delicious apple"), a photo, or both, and
optional filters (a category, a price range). It is embedded with the run's encoders (the same text
encoder, fine-tuned when configured, the lexical channel with the catalog's IDF, the image encoder),
and scored against products with the join's fused score over the components the query has: text,
image and lexical (a query has no brand or price of its own; filters are hard conditions, not score
terms). As in the join, a product that shares no content component with the query is never a result.
Unlike the join, a component the query has and a product lacks still counts with
``search.missing_share`` of its weight, as similarity 0: a shopper who gives a photo asks for that
look, and a listing without a photo cannot show it (the join renormalises over what both have).

Instead of scoring every product, a query probes its ``search.probe`` nearest cells of the run's index
(:mod:`prodsim_spark.index`) and scores the products stored in them: as in the join, each product is
stored in its ``search.spill`` nearest cells, so that with one probe (the default) a query's results
come from one cell and need no merge.

* :func:`validate_queries`: raw query rows -> canonical query columns with status and reason (every
  query is kept: a bad one gets a reason and an empty result, never a crash).
* :func:`embed_queries`: the queries' text, image and lexical vectors (Spark pandas UDFs).
* :func:`search_products`: query vectors x products -> the best ``k`` per query (Spark).
* :func:`results_table`: one row per query: its results, or none and the reason.
* :class:`Searcher`: the notebook API; loads the index and the products once, answers one query at a
  time on the driver.

Queries table (CSV, Parquet, JSON Lines or Delta): ``query_id`` (required), ``text``, ``image_uri``,
``category``, ``min_price``, ``max_price`` (column names mapped by ``search.columns``).

Search table (``<output>/search``): ``query_id, source_row, status, reason, results
array<struct<product_id, score, text, image, lexical>>, searched_at, index_fingerprint``.
"""
from __future__ import annotations

import logging
from functools import partial
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark import bridge, fusion, ingest, join, lexical
from prodsim_spark.config import ProdsimConfig, SearchSettings
from prodsim_spark.index import Index
from prodsim_spark.io import CORRUPT_RECORD, SOURCE_ROW
from prodsim_spark.tables import live_catalog

log = logging.getLogger(__name__)

QUERY_PARTS = fusion.DENSE  # what a result's score is the sum of
RESULT = T.StructType([T.StructField("product_id", T.StringType()), T.StructField("score", T.FloatType()),
                       *[T.StructField(c, T.FloatType()) for c in QUERY_PARTS]])
QUERY_COLUMNS = ("query_id", "text", "image_uri", "category", "min_price", "max_price")
QUERY_REJECTING = ("malformed_row", "missing_query_id", "duplicate_query_id", "no_content")


# --------------------------------------------------------------------------------------------
# queries in: validated like the catalog


def validate_queries(raw: DataFrame, settings: SearchSettings, *, image_roots: Sequence[str],
                     image_schemes: Sequence[str]) -> DataFrame:
    """Canonical query columns + ``status``/``reason``/``source_row``; every row kept. ``image_roots``:
    the folders query images may be read from (the first is the base of relative paths); others
    get ``image_not_allowed`` and are never opened, as catalog images. Reasons: ``malformed_row``,
    ``missing_query_id``, ``duplicate_query_id``, ``no_content`` (rejected); ``truncated_text``,
    ``image_not_allowed``, ``unparsable_min_price``/``max_price``, ``bad_encoding_text`` (warn)."""
    mapping = settings.columns.model_dump()
    if mapping["query_id"] not in raw.columns:
        from prodsim_spark.errors import InputError

        raise InputError(f"the queries have no '{mapping['query_id']}' column (columns: {', '.join(raw.columns)}); map "
                         f"it with --set search.columns.query_id=<column>", stage="search")
    present = {c: F.col(f"`{mapping[c]}`").cast("string") if mapping[c] in raw.columns else F.lit(None).cast("string")
               for c in QUERY_COLUMNS}
    reasons = []

    def flag(condition, code: str) -> None:
        reasons.append(F.when(condition, F.lit(code)))

    query_id = ingest.clean_text(present["query_id"])
    text = ingest.clean_text(present["text"])
    flag(present["text"].contains("\ufffd") | present["text"].rlike(ingest.CONTROL), "bad_encoding_text")
    flag(F.length(text) > settings.max_text_chars, "truncated_text")
    text = F.substring(text, 1, settings.max_text_chars)
    resolved = ingest.resolve_image_uri(ingest.clean_text(present["image_uri"]), image_roots[0] if image_roots else None)
    checked = ingest.image_policy(resolved, image_roots, image_schemes)
    flag(resolved.isNotNull() & checked["why"].isNotNull(), "image_not_allowed")
    image = F.when(resolved.isNotNull(), checked["uri"])
    prices = {}
    for bound in ("min_price", "max_price"):
        given = ingest.clean_text(present[bound])
        prices[bound] = ingest.parse_price(given)
        flag(given.isNotNull() & prices[bound].isNull(), f"unparsable_{bound}")
    malformed = F.col(CORRUPT_RECORD).isNotNull() if CORRUPT_RECORD in raw.columns else F.lit(False)
    flag(malformed, "malformed_row")
    flag(~malformed & query_id.isNull(), "missing_query_id")
    flag(~malformed & text.isNull() & image.isNull(), "no_content")
    df = raw.select(query_id.alias("query_id"), text.alias("text"), image.alias("image_uri"),
                    ingest.clean_text(present["category"]).alias("category"),
                    prices["min_price"].alias("min_price"), prices["max_price"].alias("max_price"),
                    F.col(SOURCE_ROW), F.array_compact(F.array(*reasons)).alias("__reasons"))
    return ingest.with_status(df, "query_id", QUERY_REJECTING, "duplicate_query_id")


# --------------------------------------------------------------------------------------------
# query vectors


def embed_queries(queries: DataFrame, config: ProdsimConfig, idf: np.ndarray | None, threads: int | None) -> DataFrame:
    """(query_id, text_embedding, image_embedding, lexical_embedding, image_error, category, log_min_price,
    log_max_price) of the live queries, embedded as the catalog's products are."""
    from prodsim_spark import embed

    live = queries.where(F.col("status") != "rejected").repartition(queries.sparkSession.sparkContext.defaultParallelism)
    settings = config.embed
    text = (embed.text_embedding_udf(settings, threads)("text") if settings.text.enabled
            else F.lit(None).cast(embed.VECTOR))
    image = (embed.image_embedding_udf(settings, threads)("image_uri") if settings.image.enabled
             else F.lit(None).cast(embed.IMAGE_RESULT))
    vectors = live.select("query_id", "category", "min_price", "max_price", text.alias("text_embedding"),
                          image.alias("img"))
    out = vectors.select("query_id", "text_embedding", F.col("img.embedding").alias("image_embedding"),
                         F.col("img.error").alias("image_error"), join.code(F.col("category")).alias("category"),
                         F.when(F.col("min_price") > 0, F.log("min_price")).alias("log_min_price"),
                         F.when(F.col("max_price") > 0, F.log("max_price")).alias("log_max_price"))
    text_bridge = bridge.load(config, for_search=True)
    if text_bridge is not None:  # not for a query whose photo failed: it asked to be matched by that photo
        out = bridge.image_from_text(out, text_bridge, where=F.col("image_error").isNull())
    if idf is None:
        return out.withColumn("lexical_embedding", F.lit(None).cast("array<float>"))
    fields = config.lexical.fields  # the query's text stands for every lexical field of a product
    as_product = live.select(F.col("query_id").alias("product_id"), F.col("text").alias(fields[0]),
                             *[F.lit(None).cast("string").alias(f) for f in fields[1:]])
    lex = lexical.lexical_vectors(as_product, config.lexical, idf).withColumnRenamed("product_id", "query_id")
    return out.join(lex, "query_id", "left")


# --------------------------------------------------------------------------------------------
# scoring


@dataclass
class Filters:
    category: np.ndarray      # (q,) int64 code (join.code); -1: any; -2: one no product has
    log_min_price: np.ndarray  # (q,) float64; NaN: none
    log_max_price: np.ndarray

    def allowed(self, members: fusion.Products) -> np.ndarray:
        """(q, m) bool: the members each query's filters let through (a product with no price fails a
        price filter; one with no category fails a category filter)."""
        ok = (self.category[:, None] == -1) | (self.category[:, None] == members.category[None, :])
        with np.errstate(invalid="ignore"):
            price = members.log_price[None, :]
            ok &= np.isnan(self.log_min_price)[:, None] | (price >= self.log_min_price[:, None])
            ok &= np.isnan(self.log_max_price)[:, None] | (price <= self.log_max_price[:, None])
        return ok


def score_queries(q: fusion.Products, filters: Filters, members: fusion.Products, index: Index, k: int,
                  missing_share: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(rows, cols, score, parts): each query's best k members by fused score over the content
    components (see the module docstring; ``missing_share``: ``search.missing_share``), filters applied;
    rows grouped by query, best first."""
    weights = index.weights.replaced(brand=0.0, category=0.0, price=0.0)  # a query has no attributes
    scorer = partial(fusion.pair_scores, weights=weights, price_scale=index.meta["price_scale"],
                     missing_share=missing_share)
    score, _ = scorer(q, members)
    score = np.where(filters.allowed(members), score, np.nan)
    rows, cols, best, parts = fusion.exact_top_k(score, q, members, k, scorer,
                                                 q_ids=np.array([None] * len(q), dtype=object))
    return rows, cols, best, {c: parts.get(c, np.zeros(len(rows), np.float32)) for c in QUERY_PARTS}


QUERY_SCHEMA = T.StructType([
    T.StructField("cell", T.LongType()), T.StructField("query_id", T.StringType()),
    *[T.StructField(f"{m}_vec", T.BinaryType()) for m in fusion.DENSE],
    T.StructField("category", T.LongType()), T.StructField("log_min_price", T.DoubleType()),
    T.StructField("log_max_price", T.DoubleType())])
FOUND_SCHEMA = T.StructType([T.StructField("query_id", T.StringType()),
                             *[T.StructField(f"r_{f.name}", T.ArrayType(f.dataType)) for f in RESULT.fields]])


def _query_products(pdf: pd.DataFrame, dims: dict[str, int]) -> tuple[fusion.Products, Filters]:
    n = len(pdf)
    vectors = {m: join.unpack_vectors(pdf[f"{m}_vec"].tolist(), d) for m, d in dims.items()}
    q = fusion.Products(pdf["query_id"].to_numpy(dtype=object), {m: v[0] for m, v in vectors.items()},
                        {m: v[1] for m, v in vectors.items()}, np.full(n, -1, np.int64), np.full(n, -1, np.int64),
                        np.full(n, np.nan), np.full(n, -1, np.int64))
    return q, Filters(pdf["category"].to_numpy(dtype=np.int64),
                      pdf["log_min_price"].to_numpy(dtype=np.float64, na_value=np.nan),
                      pdf["log_max_price"].to_numpy(dtype=np.float64, na_value=np.nan))


def search_products(query_vectors: DataFrame, products: DataFrame, index: Index, settings: SearchSettings
                    ) -> DataFrame:
    """(query_id, results array<struct>) for every query in ``query_vectors`` (columns as
    :func:`embed_queries` gives), against ``products`` (as :func:`prodsim_spark.join.join_inputs`
    gives), probing each query's ``settings.probe`` nearest cells of ``index``."""
    products = join.standard_columns(products)
    dims, centroids, weights, k = index.dims, index.centroids, index.weights, settings.k
    probe = min(settings.probe, len(centroids))
    for m in fusion.DENSE:
        if f"{m}_embedding" not in query_vectors.columns:
            query_vectors = query_vectors.withColumn(f"{m}_embedding", F.lit(None).cast("array<float>"))
    for col, typ in (("category", "long"), ("log_min_price", "double"), ("log_max_price", "double")):
        if col not in query_vectors.columns:
            query_vectors = query_vectors.withColumn(col, F.lit(-1 if col == "category" else None).cast(typ))

    spill = min(settings.spill, len(centroids))

    def route_products(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:  # each product to its `spill` nearest cells, as the join stores them
            yield join.routed_copies(pdf, dims, weights, centroids, spill)

    def route_queries(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for pdf in batches:
            q = join.products_from_columns(pdf.rename(columns={"query_id": "product_id"}).assign(
                brand=-1, source=-1, log_price=np.nan), dims)
            cells = fusion.nearest_cells(fusion.fused_dense(q, weights), centroids, probe)
            flat = pd.DataFrame({"query_id": pdf["query_id"].to_numpy(),
                                 **{f"{m}_vec": [v.tobytes() if h else None for v, h in zip(q.vectors[m], q.has[m])]
                                    for m in fusion.DENSE},
                                 "category": pdf["category"].to_numpy(), "log_min_price": pdf["log_min_price"].to_numpy(),
                                 "log_max_price": pdf["log_max_price"].to_numpy()})
            copies = flat.loc[flat.index.repeat(cells.shape[1])].assign(cell=cells.reshape(-1).astype(np.int64))
            yield copies[QUERY_SCHEMA.fieldNames()]

    def score(members_pdf: pd.DataFrame, queries_pdf: pd.DataFrame) -> pd.DataFrame:
        out: dict[str, list] = {f: [] for f in FOUND_SCHEMA.fieldNames()}
        if len(queries_pdf) and len(members_pdf):
            members = join.products_from_routed(members_pdf, dims)
            for start in range(0, len(queries_pdf), join.QUERY_CHUNK):
                q, filters = _query_products(queries_pdf.iloc[start:start + join.QUERY_CHUNK], dims)
                rows, cols, s, parts = score_queries(q, filters, members, index, k, settings.missing_share)
                bounds = np.searchsorted(rows, np.arange(len(q) + 1))
                values = {"product_id": members.ids[cols], "score": s, **parts}
                out["query_id"].extend(q.ids)
                for name, v in values.items():
                    out[f"r_{name}"].extend(np.split(v, bounds[1:-1]))
        return pd.DataFrame({f: pd.Series(out[f], dtype=object) for f in FOUND_SCHEMA.fieldNames()})

    query_cols = ["query_id", *[f"{m}_embedding" for m in fusion.DENSE], "category", "log_min_price", "log_max_price"]
    routed_queries = query_vectors.select(*query_cols).mapInPandas(route_queries, QUERY_SCHEMA)
    routed_products = products.mapInPandas(route_products, join.ROUTED_SCHEMA)
    found = (routed_products.groupBy("cell").cogroup(routed_queries.groupBy("cell"))
             .applyInPandas(score, FOUND_SCHEMA))
    results = F.arrays_zip(*[F.col(f"r_{f}").alias(f) for f in RESULT.fieldNames()])
    if probe == 1:  # one cell per query: its list is final there, in order (best first, ties by id)
        return found.select("query_id", results.cast(T.ArrayType(RESULT)).alias("results"))
    # each query's candidates from its probed cells, merged: best score first, ties by product id; a
    # product stored in two probed cells is listed by both (kept once)
    per_result = found.select("query_id", results.alias("r")).select("query_id", F.explode("r").alias("r"))
    return join.merged_top_k(per_result, "query_id", "r", k).select(
        "query_id", F.col("entries").cast(T.ArrayType(RESULT)).alias("results"))


def results_table(queries: DataFrame, found: DataFrame, query_vectors: DataFrame, index: Index) -> DataFrame:
    """One row per query row: its results, or an empty list and the reason (its validation reason,
    ``image_*`` when its image could not be read, ``no_embedding``, ``no_results``)."""
    errors = query_vectors.select("query_id", F.split("image_error", ":")[0].alias("image_reason"),
                                  (F.col("text_embedding").isNotNull() | F.col("image_embedding").isNotNull()
                                   | F.col("lexical_embedding").isNotNull()).alias("has_vector"))
    rows = (queries.select("query_id", SOURCE_ROW, "status", "reason")
            .join(errors, "query_id", "left").join(found, "query_id", "left"))
    rejected = F.col("status") == "rejected"
    no_vector = ~F.coalesce(F.col("has_vector"), F.lit(False))
    none_found = F.coalesce(F.size("results"), F.lit(0)) <= 0
    codes = F.array(F.col("reason"), F.col("image_reason"), F.when(no_vector, F.lit("no_embedding")),
                    F.when(~no_vector & none_found, F.lit("no_results")))
    joined = F.array_join(F.filter(codes, lambda c: c.isNotNull() & (c != "")), ";")
    reason = F.when(rejected, F.col("reason")).otherwise(F.when(joined != "", joined))
    empty = F.array().cast(T.ArrayType(RESULT))
    return rows.select("query_id", SOURCE_ROW, F.when(F.col("image_reason").isNotNull() & ~rejected, "warn")
                       .otherwise(F.col("status")).alias("status"),
                       reason.alias("reason"),
                       F.when(rejected | F.col("results").isNull(), empty).otherwise(F.col("results")).alias("results"),
                       F.current_timestamp().alias("searched_at"), F.lit(index.fingerprint).alias("index_fingerprint"))


# --------------------------------------------------------------------------------------------
# the notebook API: one query at a time


class Searcher:
    """Loads a run's index and products once (to the driver) and answers single queries::

        searcher = Searcher.load(spark, "out/run1", config)
        searcher.search(text="golden delicious apple", image="photo.jpg", k=10)  # a pandas DataFrame

    Memory: every product's vectors (dims x 4 bytes each): for very large catalogs use the batch
    search (``prodsim search``) instead."""

    def __init__(self, index: Index, products: fusion.Products, titles: dict[str, str | None],
                 categories: dict[str, int], config: ProdsimConfig):
        self.index, self.products, self.titles, self.config = index, products, titles, config
        self.categories = categories  # lower-cased, trimmed name -> the code products carry
        # each cell's members: the products storing a copy there (their `search.spill` nearest cells)
        spill = min(config.search.spill, len(index.centroids))
        cells = fusion.nearest_cells(fusion.fused_dense(products, index.weights), index.centroids, spill)
        self._members = fusion.rows_by_cell(cells, len(index.centroids))
        self._text = self._image = None
        self._bridge = bridge.load(config, for_search=True)

    @classmethod
    def load(cls, spark, output: str, config: ProdsimConfig) -> "Searcher":
        from prodsim_spark import pipeline
        from prodsim_spark.tables import CATALOG, EMBEDDINGS, RunTables

        tables = RunTables.at(output)
        index = load_index(spark, tables, config)
        catalog = tables.read(spark, CATALOG)
        products = pipeline.join_products(catalog, tables.read(spark, EMBEDDINGS), config,
                                          with_lexical=index.idf is not None, idf=index.idf, for_search=True)
        pdf = join.standard_columns(products).toPandas()
        products.unpersist()
        live = live_catalog(catalog)
        titles = {r["product_id"]: r["title"] for r in live.select("product_id", "title").collect()}
        categories = {r["name"]: r["code"] for r in live.select(
            F.lower(F.trim("category")).alias("name"), join.code(F.col("category")).alias("code")).distinct().collect()}
        return cls(index, join.products_from_columns(pdf, index.dims), titles, categories, config)

    def embed_query(self, text: str | None = None, image=None) -> fusion.Products:
        """One query (text, image: a path/URI or a PIL image, or both) as a row of ``fusion.Products``,
        embedded as the catalog was (text encoder, lexical channel, image encoder); a text without an
        image also gets the image vector the text bridge predicts (``search.image_from_text``, off by default)."""
        from prodsim_spark.encoders import ImageEncoder, TextEncoder

        dims, vectors, has = self.index.dims, {}, {}
        for m, d in dims.items():
            vectors[m], has[m] = np.zeros((1, d), np.float32), np.zeros(1, bool)
        if text and dims.get("text"):
            self._text = self._text or TextEncoder(self.config.embed.text, self.config.embed.device)
            vectors["text"], has["text"] = self._text.encode([text]), np.ones(1, bool)
        if text and dims.get("lexical") and self.index.idf is not None:
            vectors["lexical"], has["lexical"] = lexical.query_vectors([text], self.config.lexical, self.index.idf)
        if image is not None and dims.get("image"):
            self._image = self._image or ImageEncoder(self.config.embed.image, self.config.embed.device)
            if isinstance(image, str):
                got, errors = self._image.encode_uris([image])
                if errors[0]:
                    raise ValueError(f"query image: {errors[0]}")
                vectors["image"] = got[0][None, :]
            else:  # a PIL image
                vectors["image"] = self._image.encode_pixels(self._image.preprocess(image.convert("RGB"))[None])
            has["image"] = np.ones(1, bool)
        elif self._bridge is not None and has.get("text", np.zeros(1, bool))[0] and dims.get("image"):
            vectors["image"], has["image"] = bridge.apply(self._bridge.weight, vectors["text"]), np.ones(1, bool)
        return fusion.Products(np.array(["query"], dtype=object), vectors, has, np.full(1, -1), np.full(1, -1),
                               np.full(1, np.nan), np.full(1, -1))

    def search(self, text: str | None = None, image=None, k: int | None = None, *, category: str | None = None,
               min_price: float | None = None, max_price: float | None = None, probe: int | None = None
               ) -> pd.DataFrame:
        """The best ``k`` products for one query (``image``: a path/URI or a PIL image): rank, product_id,
        title, score and its parts (text, image, lexical contributions: they add up to the score)."""
        if not text and image is None:
            raise ValueError("give a text, an image or both")
        return self.search_vectors(self.embed_query(text, image), k=k, category=category, min_price=min_price,
                                   max_price=max_price, probe=probe)

    def search_vectors(self, q: fusion.Products, *, k: int | None = None, category: str | None = None,
                       min_price: float | None = None, max_price: float | None = None, probe: int | None = None
                       ) -> pd.DataFrame:
        """:meth:`search` for a query already embedded (one row of ``fusion.Products``)."""
        k = k or self.config.search.k
        probe = min(probe or self.config.search.probe, len(self._members))
        cells = fusion.nearest_cells(fusion.fused_dense(q, self.index.weights), self.index.centroids, probe)[0]
        candidates = np.unique(np.concatenate([self._members[c] for c in cells])) if len(cells) else np.zeros(0, np.int64)
        members = self.products.take(candidates)
        code = -1 if not category or not category.strip() else self.categories.get(category.strip().lower(), -2)
        filters = Filters(np.array([code]), np.array([np.log(min_price) if min_price else np.nan]),
                          np.array([np.log(max_price) if max_price else np.nan]))
        _, cols, score, parts = score_queries(q, filters, members, self.index, k, self.config.search.missing_share)
        ids = members.ids[cols]
        return pd.DataFrame({"rank": np.arange(1, len(cols) + 1), "product_id": ids,
                             "title": [self.titles.get(i) for i in ids], "score": score, **parts})


def load_index(spark, tables, config: ProdsimConfig) -> Index:
    """The run's index, checked against ``config`` (a ConfigError naming both when they differ)."""
    from prodsim_spark import encoders
    from prodsim_spark.index import read_index
    from prodsim_spark.tables import INDEX

    index = read_index(tables.read(spark, INDEX))
    text_id = encoders.text_encoder_id(config.embed.text) if config.embed.text.enabled and index.dims.get("text") else None
    image_id = (encoders.image_encoder_id(config.embed.image) if config.embed.image.enabled and index.dims.get("image")
                else None)
    index.check(config, text_id, image_id, path=tables.index)
    return index
