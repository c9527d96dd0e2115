"""Reading catalogs, labelled pairs, images and Delta tables: the library's edge to files.

Stages take and return DataFrames; jobs, the CLI and :mod:`prodsim_spark.pipeline` call these
functions at the edges (a run's table paths come from :mod:`prodsim_spark.tables`).
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from urllib.parse import urlparse

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark.config import IngestSettings
from prodsim_spark.errors import CatalogError, InputError

log = logging.getLogger(__name__)

CORRUPT_RECORD = "_corrupt_record"
SOURCE_ROW = "source_row"
_EXTENSIONS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet",
               ".json": "json", ".jsonl": "json", ".ndjson": "json"}


def local_path(path: str) -> Path | None:
    """The local filesystem path behind ``path``, or None for remote URIs (s3a://, dbfs:/, ...)."""
    parsed = urlparse(path)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(parsed.path if parsed.scheme == "file" else path)
    return None


def resolve_path(path: str) -> str:
    """A local path made absolute (Spark workers and Delta need no working directory); URIs
    (``s3a://``, ``file://``, ``dbfs:/`` ...) unchanged."""
    return path if "://" in path or path.startswith("dbfs:") else str(Path(path).resolve())


def catalog_folder(path: str) -> str:
    """The folder that holds a catalog file (or the catalog folder itself), as an absolute URI/path."""
    local = local_path(path)
    if local is not None:
        local = local.resolve()
        return str(local if local.is_dir() else local.parent)
    return path.rstrip("/").rsplit("/", 1)[0]


def detect_format(path: str, configured: str) -> str:
    if configured != "auto":
        return configured
    local = local_path(path)
    if local is not None and (local / "_delta_log").is_dir():
        return "delta"
    suffix = Path(urlparse(path).path.rstrip("/")).suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    if local is not None and local.is_dir():
        found = {_EXTENSIONS.get(p.suffix.lower()) for p in local.iterdir() if not p.name.startswith(("_", "."))}
        found.discard(None)
        if len(found) == 1:
            return found.pop()
    raise CatalogError(
        f"cannot tell the catalog's format from its name; pass --format csv|parquet|json|delta",
        stage="ingest", path=path)


def peek_columns(path: str, fmt: str, settings: IngestSettings) -> list[str] | None:
    """Column names of a local catalog, read without Spark (None when that is not cheap here).

    Lets a missing required column fail in a second, before a Spark session even starts.
    """
    local = local_path(path)
    if local is None:
        return None
    if not local.exists():
        raise CatalogError("no such file or folder", stage="ingest", path=path)
    try:
        if fmt == "csv":
            files = [local] if local.is_file() else sorted(local.glob("*.csv"))
            if not files:
                return None
            with open(files[0], newline="", encoding=settings.encoding, errors="replace") as f:
                header = next(csv.reader(f, delimiter=settings.csv_delimiter), None)
            if header is None:
                raise CatalogError("the CSV file is empty (no header row)", stage="ingest", path=str(files[0]))
            return [h.strip().lstrip("\ufeff") for h in header]
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(local if local.is_file() else next(local.glob("*.parquet"))).names)
    except (OSError, StopIteration, ValueError) as exc:
        raise CatalogError(f"cannot read the catalog: {exc}", stage="ingest", path=path) from None
    return None


def read_catalog(spark: SparkSession, path: str, settings: IngestSettings) -> DataFrame:
    """Read a catalog as its source columns (strings where the format is untyped) plus ``source_row``.

    ``source_row`` numbers the input rows 0..n-1 in file order, so every message can name its row.
    Rows the reader cannot parse are kept, with their raw text in ``_corrupt_record``.
    """
    fmt = detect_format(path, settings.format)
    local = local_path(path)
    if local is not None and not local.exists():
        raise CatalogError("no such file or folder", stage="ingest", path=path)
    log.info("reading %s catalog %s", fmt, path)
    try:
        if fmt == "csv":
            opts = dict(header=True, multiLine=True, escape='"', sep=settings.csv_delimiter,
                        encoding=settings.encoding, mode="PERMISSIVE")
            header = spark.read.options(**opts).csv(path).schema  # reads the header line only
            schema = T.StructType([T.StructField(f.name, T.StringType()) for f in header]
                                  + [T.StructField(CORRUPT_RECORD, T.StringType())])
            df = spark.read.options(**opts, columnNameOfCorruptRecord=CORRUPT_RECORD).schema(schema).csv(path)
        elif fmt == "json":
            df = spark.read.options(primitivesAsString=True, mode="PERMISSIVE",
                                    columnNameOfCorruptRecord=CORRUPT_RECORD, encoding=settings.encoding).json(path)
        elif fmt == "parquet":
            df = spark.read.parquet(path)
        elif fmt == "delta":
            df = spark.read.format("delta").load(path)
        else:  # pragma: no cover - guarded by the config schema
            raise CatalogError(f"unsupported format {fmt!r}", stage="ingest", path=path)
    except CatalogError:
        raise
    except Exception as exc:  # Spark's AnalysisException and friends: keep the first line, name the path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatalogError(f"cannot read the catalog as {fmt}: {first}", stage="ingest", path=path) from None
    return with_source_row(df)


def with_source_row(df: DataFrame) -> DataFrame:
    """Add contiguous 0-based row numbers in input order, computed on the JVM (no Python rows).

    monotonically_increasing_id() is (partition << 33) + index-in-partition and is stable for a file
    scan; one small job counts the rows per partition, and a broadcast join of the running offsets
    turns it into a contiguous number.
    """
    spark = df.sparkSession
    tagged = df.withColumn("__mid", F.monotonically_increasing_id()).withColumn("__part", F.shiftright("__mid", 33))
    offsets, total = [], 0
    for row in tagged.groupBy("__part").count().orderBy("__part").collect():
        offsets.append((row["__part"], total))
        total += row["count"]
    offsets_df = spark.createDataFrame(offsets or [(0, 0)], "__part long, __offset long")
    return (tagged.join(F.broadcast(offsets_df), "__part", "left")
            .withColumn(SOURCE_ROW, F.col("__offset") + F.col("__mid").bitwiseAND(F.lit((1 << 33) - 1)))
            .drop("__mid", "__part", "__offset"))


def write_delta(df: DataFrame, path: str, *, mode: str = "overwrite") -> None:
    """Write a Delta table in one transaction (a crash leaves the previous version readable)."""
    (df.write.format("delta").mode(mode).option("overwriteSchema", "true" if mode == "overwrite" else "false")
     .save(path))


def read_delta(spark: SparkSession, path: str) -> DataFrame:
    return spark.read.format("delta").load(path)


def delta_table_exists(spark: SparkSession, path: str) -> bool:
    from delta.tables import DeltaTable

    return DeltaTable.isDeltaTable(spark, path)


def open_uri(uri: str):
    """A binary file object for a local path, ``file://``, ``dbfs:/`` (the FUSE mount) or any URI
    ``fsspec`` opens (``s3://``, ``abfss://`` with the matching fsspec package)."""
    if uri.startswith("dbfs:/") and os.path.isdir("/dbfs"):
        return open("/dbfs/" + uri[len("dbfs:/"):].lstrip("/"), "rb")  # Databricks' FUSE mount
    if "://" not in uri:
        return open(uri, "rb")
    import fsspec

    return fsspec.open(uri, "rb").open()


def read_pairs(spark: SparkSession, path: str, left_col: str | None = None, right_col: str | None = None
               ) -> DataFrame:
    """Labelled match pairs as (left_id, right_id) from a CSV with a header: a pairs file (default: its
    first two columns), or a groups file with a ``group`` column (every two products of one group match)."""
    if not Path(path).is_file():
        raise InputError("labelled pairs file does not exist", path=path)
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    df = spark.read.option("header", True).csv(path)
    if "group" in header and not (left_col and right_col):
        ids = left_col or next((c for c in header if c != "group"), None)
        if ids not in header:
            raise InputError(f"groups file has no id column {ids!r} (columns: {header})", path=path)
        members = df.select(F.trim(F.col(f"`{ids}`")).alias("id"), F.trim(F.col("group")).alias("g")) \
            .where("id IS NOT NULL AND g IS NOT NULL")
        a, b = members.alias("a"), members.alias("b")
        return a.join(b, (F.col("a.g") == F.col("b.g")) & (F.col("a.id") < F.col("b.id"))) \
            .select(F.col("a.id").alias("left_id"), F.col("b.id").alias("right_id"))
    left_col = left_col or (header[0] if header else None)
    right_col = right_col or (header[1] if len(header) > 1 else None)
    missing = [c for c in (left_col, right_col) if c not in header]
    if missing:
        raise InputError(f"pairs file has no column {missing[0]!r} (columns: {header})", path=path)
    return df.select(F.trim(F.col(f"`{left_col}`")).alias("left_id"), F.trim(F.col(f"`{right_col}`")).alias("right_id"))
