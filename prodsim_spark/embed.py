"""Embed stage: text and image embeddings in Spark pandas UDFs, incremental against the last run.

Each Python worker builds each encoder once (a module-level cache keyed by the encoder settings,
the pattern of ``pyspark.ml.functions.predict_batch_udf``) and reuses it for every batch of every
task it runs. Only products whose text/image content hash or encoder id changed are encoded; the
pipeline MERGEs the result into the embeddings table (see :func:`merge_embeddings`).

Embeddings table (one row per product that passed ingest):

=================  ==============  ===========================================================
column             type            meaning
=================  ==============  ===========================================================
product_id         string
text_embedding     array<float>    L2-normalised; null when the product has no text
image_embedding    array<float>    L2-normalised; null when no image or it could not be read
text_hash          string          sha256 of the composed text the vector was computed from
image_hash         string          sha256 of the image_uri (point to a new URI when an image changes)
text_encoder       string          encoder id (model, revision, max_tokens)
image_encoder      string          encoder id (kind, model, weights revision, size)
image_error        string          reason code and detail when image_embedding is null but a URI was given
updated_at         timestamp       last time either vector was (re)computed
removed_at         timestamp       set when the product left the catalog (deleted after the next
                                   neighbours table when embed.on_removed=delete)
=================  ==============  ===========================================================
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Iterator

import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark.config import TEMPLATE_FIELD, EmbedSettings, ImageEncoderSettings, TextEncoderSettings
from prodsim_spark.encoders import EncoderStats
from prodsim_spark.io import delta_commit
from prodsim_spark.tables import live_catalog

log = logging.getLogger(__name__)

VECTOR = T.ArrayType(T.FloatType())
IMAGE_RESULT = T.StructType([T.StructField("embedding", VECTOR), T.StructField("error", T.StringType())])
EMBEDDINGS_SCHEMA = T.StructType([
    T.StructField("product_id", T.StringType(), False),
    T.StructField("text_embedding", VECTOR), T.StructField("image_embedding", VECTOR),
    T.StructField("text_hash", T.StringType()), T.StructField("image_hash", T.StringType()),
    T.StructField("text_encoder", T.StringType()), T.StructField("image_encoder", T.StringType()),
    T.StructField("image_error", T.StringType()),
    T.StructField("updated_at", T.TimestampType()), T.StructField("removed_at", T.TimestampType()),
])

# --------------------------------------------------------------------------------------------
# the per-worker encoder cache

_ENCODERS: dict[str, object] = {}
STATS = EncoderStats()


def encoder_key(kind: str, settings_json: str, device: str) -> str:
    return f"{kind}|{settings_json}|{device}"


def _encoder(kind: str, settings_json: str, device: str, threads: int | None):
    """Build the encoder once per Python process and settings; every later batch reuses it."""
    key = encoder_key(kind, settings_json, device)
    if key not in _ENCODERS:
        import torch

        from prodsim_spark import encoders

        if threads:
            torch.set_num_threads(threads)
        if kind == "text":
            _ENCODERS[key] = encoders.TextEncoder(TextEncoderSettings.model_validate_json(settings_json), device)
        else:
            _ENCODERS[key] = encoders.ImageEncoder(ImageEncoderSettings.model_validate_json(settings_json), device)
        STATS.count(STATS.loads, key)
        log.info("worker %d loaded %s encoder", os.getpid(), kind)
    return _ENCODERS[key]


def _note_batch(key: str) -> None:
    # A module-level function: the UDF closures below are pickled by value, and a STATS they
    # referenced directly would be a copy, not this process's counters.
    STATS.count(STATS.batches, key)


def _non_empty(values: pd.Series) -> list[int]:
    """Positions of the rows that hold a non-empty string (the rest get a null vector)."""
    return [i for i, v in enumerate(values) if isinstance(v, str) and v]


def text_embedding_udf(settings: EmbedSettings, threads: int | None):
    settings_json, device, batch = settings.text.model_dump_json(), settings.device, settings.batch_size

    @F.pandas_udf(VECTOR)
    def text_embedding(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        encoder = _encoder("text", settings_json, device, threads)
        key = encoder_key("text", settings_json, device)
        for texts in batches:
            _note_batch(key)
            out: list = [None] * len(texts)
            present = _non_empty(texts)
            vectors = encoder.encode([texts.iloc[i] for i in present], batch_size=batch)
            for i, vec in zip(present, vectors):
                out[i] = vec
            yield pd.Series(out, dtype=object)

    return text_embedding


def image_embedding_udf(settings: EmbedSettings, threads: int | None):
    settings_json, device = settings.image.model_dump_json(), settings.device
    batch, decode_threads = settings.batch_size, settings.decode_threads

    @F.pandas_udf(IMAGE_RESULT)
    def image_embedding(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        encoder = _encoder("image", settings_json, device, threads)
        key = encoder_key("image", settings_json, device)
        for uris in batches:
            _note_batch(key)
            vectors, errors = [None] * len(uris), [None] * len(uris)
            present = _non_empty(uris)
            got, errs = encoder.encode_uris([uris.iloc[i] for i in present], batch, decode_threads)
            for i, vec, err in zip(present, got, errs):
                vectors[i], errors[i] = vec, err
            yield pd.DataFrame({"embedding": vectors, "error": errors})

    return image_embedding


def worker_stats(spark, partitions: int = 8) -> dict[int, dict]:
    """{pid: {"loads": {key: n}, "batches": {key: n}}} of the Python workers that run a small job
    (every worker of a local session, when partitions >= its cores): for tests and diagnostics."""
    def report(_: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        from prodsim_spark import embed

        stats = {"loads": embed.STATS.loads, "batches": embed.STATS.batches}
        yield pd.DataFrame({"pid": [os.getpid()], "stats": [json.dumps(stats)]})

    rows = spark.range(partitions).repartition(partitions).mapInPandas(report, "pid long, stats string").collect()
    return {r["pid"]: json.loads(r["stats"]) for r in rows}


# --------------------------------------------------------------------------------------------
# the stage


def compose_text(template: str, description_chars: int) -> Column:
    """The text to encode: the template's {field}s filled in; a field that is empty is left out
    together with the literal text just before it (so "{title}. {brand}" gives "Shoe" without a brand);
    {a|b} is field a, or b when a is empty (so "{title|description}" still has a text without a title)."""
    parts: list[Column] = []
    pos = 0
    for match in TEMPLATE_FIELD.finditer(template):
        literal = template[pos:match.start()]
        pos = match.end()
        values = []
        for field in match.group(1).split("|"):
            value = F.col(field).cast("string")
            if field == "description":
                value = F.substring(value, 1, description_chars) if description_chars else F.lit(None)
            values.append(F.when(F.length(F.trim(value)) > 0, F.trim(value)))
        value = F.coalesce(*values)
        parts.append(F.when(value.isNotNull(), F.concat(F.lit(literal), value)))
    tail = template[pos:]
    text = F.concat_ws("", *parts)
    text = F.regexp_replace(text, r"^[\s.,;:|/-]+", "")  # a left-out first field leaves a separator
    return F.when(F.length(text) > 0, F.concat(text, F.lit(tail)) if tail else text)


@dataclass
class EmbedPlan:
    """What a run will do: the catalog rows to embed, with what needs encoding flagged."""

    rows: DataFrame          # product_id, text, text_hash, image_uri, image_hash, need_text, need_image + old values
    text_encoder: str | None
    image_encoder: str | None


def plan_embeddings(catalog: DataFrame, existing: DataFrame | None, settings: EmbedSettings,
                    text_encoder: str | None, image_encoder: str | None) -> EmbedPlan:
    """Decide per product what to (re)encode: new product, changed content hash, or new encoder id."""
    current = live_catalog(catalog).select(
        "product_id",
        (compose_text(settings.text.template, settings.text.description_chars)
         if text_encoder else F.lit(None).cast("string")).alias("text"),
        (F.col("image_uri") if image_encoder else F.lit(None).cast("string")).alias("image_uri"),
    ).withColumn("text_hash", F.sha2("text", 256)).withColumn("image_hash", F.sha2("image_uri", 256))
    if existing is None:
        existing = current.sparkSession.createDataFrame([], EMBEDDINGS_SCHEMA)
    old = existing.select("product_id", *[F.col(c).alias(f"old_{c}") for c in EMBEDDINGS_SCHEMA.fieldNames()
                                          if c != "product_id"])
    rows = current.join(old, "product_id", "left")

    def needs(hash_col: str, enc_col: str, enc: str | None) -> Column:
        if enc is None:
            return F.lit(False)
        changed = ~F.col(hash_col).eqNullSafe(F.col(f"old_{hash_col}")) | ~F.col(f"old_{enc_col}").eqNullSafe(F.lit(enc))
        # a product whose content is absent and was absent needs nothing
        return F.col(hash_col).isNotNull() & (changed | F.col("old_removed_at").isNotNull()) | (
            F.col(hash_col).isNull() & F.col(f"old_{hash_col}").isNotNull())

    rows = (rows.withColumn("need_text", needs("text_hash", "text_encoder", text_encoder))
            .withColumn("need_image", needs("image_hash", "image_encoder", image_encoder))
            .withColumn("is_new", F.col("old_updated_at").isNull() & F.col("old_text_hash").isNull()
                        & F.col("old_image_hash").isNull()))
    return EmbedPlan(rows, text_encoder, image_encoder)


def encode(plan: EmbedPlan, settings: EmbedSettings, threads: int | None) -> DataFrame:
    """The new state of every current product's row: fresh vectors where needed, old ones reused."""
    rows = plan.rows
    # a small catalog is often one file, so one partition: spread the work over every core
    spread = rows.sparkSession.sparkContext.defaultParallelism
    # each distinct text and image URI is encoded once and its vector joined back by hash: copies (one
    # title on many listings, one stock photo's URI on many sellers' offers) cost one encoding and
    # get the same vector, where rows encoded in different batches would differ in the last bits
    if plan.text_encoder:
        text = (rows.where("need_text AND text IS NOT NULL").select("text_hash", "text")
                .repartition(spread, "text_hash").dropDuplicates(["text_hash"])  # one shuffle serves both
                .select("text_hash", text_embedding_udf(settings, threads)("text").alias("new_text_embedding")))
        rows = rows.join(text, "text_hash", "left")
    else:
        rows = rows.withColumn("new_text_embedding", F.lit(None).cast(VECTOR))
    if plan.image_encoder:
        image = (rows.where("need_image AND image_uri IS NOT NULL").select("image_hash", "image_uri")
                 .repartition(spread, "image_hash").dropDuplicates(["image_hash"])
                 .select("image_hash", image_embedding_udf(settings, threads)("image_uri").alias("img")))
        rows = rows.join(image, "image_hash", "left")
    else:
        rows = rows.withColumn("img", F.lit(None).cast(IMAGE_RESULT))
    now = F.current_timestamp()
    text_state = F.when(F.col("need_text"), F.col("new_text_embedding")).otherwise(F.col("old_text_embedding"))
    return rows.select(
        "product_id",
        text_state.alias("text_embedding"),
        F.when(F.col("need_image"), F.col("img.embedding")).otherwise(F.col("old_image_embedding")).alias("image_embedding"),
        F.col("text_hash"), F.col("image_hash"),
        F.lit(plan.text_encoder).alias("text_encoder"), F.lit(plan.image_encoder).alias("image_encoder"),
        F.when(F.col("need_image"), F.col("img.error")).otherwise(F.col("old_image_error")).alias("image_error"),
        F.when(F.col("need_text") | F.col("need_image"), now).otherwise(F.col("old_updated_at")).alias("updated_at"),
        F.lit(None).cast("timestamp").alias("removed_at"),
        "need_text", "need_image", "is_new",
    )


def merge_embeddings(spark, path: str, updates: DataFrame) -> None:
    """MERGE the new state into the Delta table in one transaction: changed rows updated, new rows
    inserted, products gone from the catalog flagged with removed_at. They are not deleted here: the
    neighbours table may still list them until the join stage rewrites it (see :func:`purge_removed`)."""
    from delta.tables import DeltaTable

    columns = EMBEDDINGS_SCHEMA.fieldNames()
    if not DeltaTable.isDeltaTable(spark, path):
        with delta_commit(path):
            updates.select(*columns).write.format("delta").save(path)
        return
    changed = "s.need_text OR s.need_image OR t.removed_at IS NOT NULL"
    merge = (DeltaTable.forPath(spark, path).alias("t").merge(updates.alias("s"), "t.product_id = s.product_id")
             .whenMatchedUpdate(condition=changed, set={c: f"s.{c}" for c in columns})
             .whenNotMatchedInsert(values={c: f"s.{c}" for c in columns})
             .whenNotMatchedBySourceUpdate(condition="t.removed_at IS NULL", set={"removed_at": "current_timestamp()"}))
    with delta_commit(path):
        merge.execute()


def purge_removed(spark, path: str) -> None:
    """Delete the rows flagged removed (``embed.on_removed: delete``), in one transaction: called once a
    neighbours table that no longer lists them has been committed."""
    from delta.tables import DeltaTable

    if DeltaTable.isDeltaTable(spark, path):
        with delta_commit(path):
            DeltaTable.forPath(spark, path).delete("removed_at IS NOT NULL")
