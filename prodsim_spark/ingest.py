"""Ingest stage: map source columns to the canonical schema and validate every row.

Nothing is dropped: each row leaves with ``status`` (ok / warn / rejected) and ``reason`` (the
reason codes below, ``;``-separated, null when ok). All of it is Spark SQL expressions, so it
runs on the JVM at catalog scale with no Python UDF.

``source`` (the feed or seller) comes from its column, else from the product_id prefix before
``ingest.source_id_separator`` ("amazon:b000jz4hqo" -> "amazon"); the join penalises same-source pairs
in catalogs of several sources.

Reason codes (``rejected`` ones stop a product from being embedded and joined):

=========================  ========  ===============================================================
code                       status    meaning
=========================  ========  ===============================================================
malformed_row              rejected  the reader could not parse the line (raw text in source_corrupt_record)
empty_row                  rejected  every canonical field is empty
missing_product_id         rejected  product_id is empty
duplicate_product_id       rejected  an earlier row (lower source_row) has the same product_id
no_content                 rejected  no title, no description and no image_uri: nothing to compare
image_not_allowed          warn      image_uri outside the allowed folders or schemes; set to null, never
                                     opened (the URI and why in image_uri_raw)
id_trimmed                 warn      product_id had spaces around it; they were removed
unparsable_price           warn      price is not a number (e.g. "n/a"); price set to null
negative_price             warn      price below zero; price set to null
truncated_title            warn      title longer than ingest.max_title_chars; truncated
truncated_description      warn      description longer than ingest.max_description_chars; truncated
bad_encoding_<field>       warn      undecodable bytes (U+FFFD) or control characters in that text field
=========================  ========  ===============================================================
"""
from __future__ import annotations

import logging
from typing import Iterable, Sequence

import pandas as pd
from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark.config import CANONICAL_COLUMNS, IngestSettings
from prodsim_spark.errors import CatalogError
from prodsim_spark.io import CORRUPT_RECORD, SOURCE_ROW, image_uri_verdict
from prodsim_spark.tables import live_catalog

log = logging.getLogger(__name__)

REJECTING = ("malformed_row", "empty_row", "missing_product_id", "duplicate_product_id", "no_content")
TEXT_FIELDS = ("title", "description", "brand", "category", "image_uri", "source")
STATUS_COLUMNS = ("status", "reason", SOURCE_ROW)
# Control characters other than tab/newline/CR: they break downstream tokenisers and CSV exports.
CONTROL = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"
# Currency symbols, currency codes, spaces and thousands separators around a number.
_PRICE_NOISE = r"(?i)(^\s*(usd|eur|gbp|sek|us)\s*|\s*(usd|eur|gbp|sek)\s*$|[\s$€£¥,'])"


def check_columns(columns: Iterable[str], settings: IngestSettings, *, path: str | None = None) -> list[str]:
    """Fail on a missing required column; return the canonical columns the source lacks (to fill with nulls)."""
    columns = set(columns)
    mapping = settings.columns.model_dump()
    missing_required = [c for c in settings.required_columns if mapping[c] not in columns]
    if missing_required:
        names = ", ".join(f"'{mapping[c]}'" + (f" (for {c})" if mapping[c] != c else "") for c in missing_required)
        raise CatalogError(
            f"missing required column {names}; the catalog has: {', '.join(sorted(columns)) or '(none)'}. "
            f"Map source names with --set ingest.columns.<canonical>=<source column>",
            stage="ingest", path=path)
    content = [c for c in ("title", "description", "image_uri") if mapping[c] in columns]
    if not content:
        raise CatalogError(
            "the catalog has none of the content columns "
            + ", ".join(f"'{mapping[c]}'" for c in ("title", "description", "image_uri"))
            + "; there is nothing to compare products by", stage="ingest", path=path)
    return [c for c in CANONICAL_COLUMNS if mapping[c] not in columns]


def clean_text(col: Column) -> Column:
    """A text field without control characters, U+FFFD or surrounding spaces; empty is null."""
    col = F.regexp_replace(col.cast("string"), CONTROL, "")
    col = F.trim(F.regexp_replace(col, "\ufffd", ""))
    return F.when(col == "", None).otherwise(col)


def parse_price(raw: Column) -> Column:
    """'$1,299.00' -> 1299.0; anything not a finite number -> null (the caller flags it)."""
    cleaned = F.regexp_replace(raw.cast("string"), _PRICE_NOISE, "")
    value = cleaned.try_cast("double")
    return F.when(F.isnan(value) | value.isin(float("inf"), float("-inf")), None).otherwise(value)


def resolve_image_uri(uri: Column, image_root: str | None) -> Column:
    """Relative paths (no scheme, no leading '/') are taken relative to ``image_root``."""
    if not image_root:
        return uri
    relative = ~uri.rlike(r"^([a-zA-Z][a-zA-Z0-9+.-]*:|/)")
    return F.when(relative, F.concat(F.lit(image_root.rstrip("/") + "/"), uri)).otherwise(uri)


def image_policy(uri: Column, roots: Sequence[str], schemes: Sequence[str]) -> Column:
    """struct<uri, why>: the URI to read (local paths resolved, symlinks included) when the image
    policy allows it, else a null uri and why (see :func:`prodsim_spark.io.image_uri_verdict`).
    A Python UDF, unlike the rest of ingest: resolving symlinks needs the filesystem."""
    roots, schemes = list(roots), list(schemes)

    @F.pandas_udf("uri string, why string")
    def verdict(uris: pd.Series) -> pd.DataFrame:
        found = [image_uri_verdict(u, roots, schemes) if isinstance(u, str) else (None, None) for u in uris]
        return pd.DataFrame(found, columns=["uri", "why"], dtype=object)

    return verdict(uri)


def source_from_id(product_id: Column, separator: str | None) -> Column:
    """The id's prefix before the first ``separator`` ("amazon:b000jz4hqo" -> "amazon"); null without one."""
    if not separator:
        return F.lit(None).cast("string")
    prefix = F.regexp_extract(product_id, r"^(.+?)\Q" + separator + r"\E.", 1)  # \Q..\E: the separator literally
    return F.when(prefix != "", prefix)


def validate_catalog(raw: DataFrame, settings: IngestSettings, *, image_root: str | None = None) -> DataFrame:
    """Map ``raw`` (source columns + ``source_row``) to the canonical schema with status and reason.

    ``image_root`` (default: ``settings.image_root``) is the base of relative ``image_uri`` values.
    """
    missing = check_columns([c for c in raw.columns if c not in (SOURCE_ROW, CORRUPT_RECORD)], settings)
    unfilled = [c for c in missing if not (c == "source" and settings.source_id_separator)]
    if unfilled:
        log.warning("catalog has no column for %s; filled with nulls", ", ".join(unfilled))
    mapping = settings.columns.model_dump()
    mapped_sources = set(mapping.values())

    def source(canonical: str) -> Column:
        return F.col(f"`{mapping[canonical]}`") if canonical not in missing else F.lit(None).cast("string")

    df = raw
    reasons: list[Column] = []

    def flag(condition: Column, code: str) -> None:
        reasons.append(F.when(condition, F.lit(code)))

    # text fields: clean, flag encoding damage, truncate over-long values. Ids are trimmed, and a
    # trimmed id says so: " A1" and "A1" are one product, and the later row is a duplicate of it
    raw_id = source("product_id").cast("string")
    out: dict[str, Column] = {"product_id": clean_text(raw_id)}
    flag((F.trim(raw_id) != raw_id) & (F.trim(raw_id) != ""), "id_trimmed")
    for field in TEXT_FIELDS:
        raw_text = source(field).cast("string")
        flag(raw_text.contains("\ufffd") | raw_text.rlike(CONTROL), f"bad_encoding_{field}")
        out[field] = clean_text(raw_text)
    for field, limit in (("title", settings.max_title_chars), ("description", settings.max_description_chars)):
        flag(F.length(out[field]) > limit, f"truncated_{field}")
        out[field] = F.substring(out[field], 1, limit)

    out["source"] = F.coalesce(out["source"], source_from_id(out["product_id"], settings.source_id_separator))
    # the image policy: only images under the allowed folders or of the allowed schemes are ever opened
    resolved = resolve_image_uri(out["image_uri"], settings.image_root or image_root)
    roots = [r for r in (image_root, settings.image_root, *settings.image_roots) if r]
    checked = image_policy(resolved, roots, settings.image_schemes)
    flag(resolved.isNotNull() & checked["why"].isNotNull(), "image_not_allowed")
    image_refused = F.when(checked["why"].isNotNull(), F.concat(resolved, F.lit(": "), checked["why"]))
    out["image_uri"] = F.when(resolved.isNotNull(), checked["uri"])

    raw_price = source("price")
    price_type = raw.schema[mapping["price"]].dataType if "price" not in missing else None
    # a JSON price given as an object ({"amount": 5, "currency": "EUR"}) keeps its keys in price_raw
    nested = isinstance(price_type, (T.StructType, T.MapType, T.ArrayType))
    price_text = F.trim(F.to_json(raw_price) if nested else raw_price.cast("string"))
    has_price = raw_price.isNotNull() & (price_text != "")
    parsed = parse_price(raw_price)
    flag(has_price & parsed.isNull(), "unparsable_price")
    flag(parsed < 0, "negative_price")
    out["price"] = F.when(parsed >= 0, parsed)

    has_corrupt = CORRUPT_RECORD in raw.columns
    all_empty = F.lit(True)
    for field in CANONICAL_COLUMNS:
        value = out[field]
        all_empty = all_empty & value.isNull()
    malformed = F.col(CORRUPT_RECORD).isNotNull() if has_corrupt else F.lit(False)
    flag(malformed, "malformed_row")
    # a malformed row's fields are unreliable: it gets that one structural reason, not three
    flag(~malformed & all_empty, "empty_row")
    flag(~malformed & ~all_empty & out["product_id"].isNull(), "missing_product_id")
    no_content = out["title"].isNull() & out["description"].isNull() & out["image_uri"].isNull()
    flag(~malformed & ~all_empty & no_content, "no_content")

    # extra source columns travel along; a name that collides with ours gets a source_ prefix
    ours = set(CANONICAL_COLUMNS) | set(STATUS_COLUMNS)
    extras = []
    for name in raw.columns:
        if name in mapped_sources or name == SOURCE_ROW:
            continue
        alias = f"source_{name.lstrip('_')}" if name in ours or name == CORRUPT_RECORD else name
        extras.append(F.col(f"`{name}`").alias(alias))
    if "price" not in missing:
        extras.append(price_text.alias("price_raw"))
    extras.append(image_refused.alias("image_uri_raw"))

    df = raw.select(*[out[c].alias(c) for c in CANONICAL_COLUMNS], F.col(SOURCE_ROW),
                    F.array_compact(F.array(*reasons)).alias("__reasons"), *extras)

    df = with_status(df, "product_id", REJECTING, "duplicate_product_id")
    front = [*CANONICAL_COLUMNS, "status", "reason", SOURCE_ROW]
    return df.select(*front, *[c for c in df.columns if c not in front])


def with_status(df: DataFrame, id_col: str, rejecting: Sequence[str], duplicate_code: str) -> DataFrame:
    """``status`` and ``reason`` from the reason codes in ``__reasons`` (dropped), after flagging every
    row but the first (lowest source_row) of an id with ``duplicate_code``: the first keeps the id."""
    first = Window.partitionBy(id_col).orderBy(SOURCE_ROW)
    is_dup = F.col(id_col).isNotNull() & (F.row_number().over(first) > 1)
    df = df.withColumn("__reasons", F.when(is_dup, F.array_union(F.col("__reasons"), F.array(F.lit(duplicate_code))))
                       .otherwise(F.col("__reasons")))
    status = (F.when(F.size(F.array_intersect("__reasons", F.array(*[F.lit(c) for c in rejecting]))) > 0, "rejected")
              .when(F.size("__reasons") > 0, "warn").otherwise("ok"))
    reason = F.when(F.size("__reasons") > 0, F.array_join("__reasons", ";"))
    return df.withColumn("status", status).withColumn("reason", reason).drop("__reasons")


def check_export(catalog: DataFrame, previous: DataFrame | None, settings: IngestSettings, *, path: str) -> None:
    """Refuse an export that would wipe a run's state, before anything is written: one with no valid
    product (a header-only file, every row rejected), or, on a re-run, one that drops more than
    ``ingest.max_removed_share`` of the last run's live products. Raises CatalogError (exit 2)."""
    live = live_catalog(catalog).select("product_id")
    if live.limit(1).count() == 0:
        reasons = reason_counts(catalog)
        rows = catalog.count()
        detail = (f"{rows} rows, all rejected: " + ", ".join(f"{c} {n}" for c, n in reasons.items())
                  if rows else "no rows (an empty or header-only export)")
        raise CatalogError(f"no product passed validation ({detail}); nothing was written, every table of the "
                           f"run is as it was", stage="ingest", path=path)
    if previous is None or settings.max_removed_share >= 1:
        return
    before = live_catalog(previous).select("product_id")
    # one job: the last run's live products, and those of them this export lacks
    counts = (before.join(live.dropDuplicates(["product_id"]).withColumn("present", F.lit(True)), "product_id", "left")
              .agg(F.count("*").alias("known"), F.count(F.when(F.col("present").isNull(), 1)).alias("removed"))
              .first())
    known, removed = counts["known"], counts["removed"]
    if known and removed / known > settings.max_removed_share:
        raise CatalogError(
            f"{removed} of the last run's {known} products ({removed / known:.0%}) are not in this export, more than "
            f"ingest.max_removed_share ({settings.max_removed_share:.0%}); an export that shrinks this much is "
            f"usually broken upstream, so nothing was written. If the removal is real, re-run with "
            f"--set ingest.max_removed_share=1", stage="ingest", path=path)


def row_counts(catalog: DataFrame) -> tuple[dict[str, int], dict[str, int]]:
    """(rows per status, rows per reason code) in one Spark job, for logs and the CLI summary; a row
    with two reasons counts under both."""
    statuses, reasons = {s: 0 for s in ("ok", "warn", "rejected")}, {}
    for r in catalog.groupBy("status", "reason").count().collect():
        statuses[r["status"]] = statuses.get(r["status"], 0) + r["count"]
        for code in (r["reason"] or "").split(";"):
            if code:
                reasons[code] = reasons.get(code, 0) + r["count"]
    return statuses, dict(sorted(reasons.items()))


def reason_counts(catalog: DataFrame) -> dict[str, int]:
    """Rows per reason code (a row with two reasons counts under both)."""
    return row_counts(catalog)[1]
