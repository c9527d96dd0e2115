"""Reading catalogs, labelled pairs, images and Delta tables: the library's edge to files.

Stages take and return DataFrames; jobs, the CLI and :mod:`prodsim_spark.pipeline` call these
functions at the edges (a run's table paths come from :mod:`prodsim_spark.tables`).
"""
from __future__ import annotations

import csv
import logging
import os
import re
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence
from urllib.parse import urlparse

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark.config import IngestSettings
from prodsim_spark.errors import CatalogError, ConflictError, InputError

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


def detect_format(path: str, configured: str, *, what: str = "catalog", stage: str = "ingest") -> str:
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
    raise CatalogError(f"cannot tell the {what}'s format from its name; pass --format csv|parquet|json|delta",
                       stage=stage, path=path)


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


def read_catalog(spark: SparkSession, path: str, settings: IngestSettings, *, what: str = "catalog",
                 stage: str = "ingest", fmt: str | None = None) -> DataFrame:
    """Read a catalog (or another table of rows: ``what``, e.g. queries) as its source columns
    (strings where the format is untyped) plus ``source_row``.

    ``source_row`` numbers the input rows 0..n-1 in file order, so every message can name its row.
    Rows the reader cannot parse are kept, with their raw text in ``_corrupt_record``.
    """
    fmt = detect_format(path, fmt or settings.format, what=what, stage=stage)
    local = local_path(path)
    if local is not None and not local.exists():
        raise CatalogError("no such file or folder", stage=stage, path=path)
    log.info("reading %s %s %s", fmt, what, path)
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
            raise CatalogError(f"unsupported format {fmt!r}", stage=stage, path=path)
    except CatalogError:
        raise
    except Exception as exc:  # Spark's AnalysisException and friends: keep the first line, name the path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatalogError(f"cannot read the {what} as {fmt}: {first}", stage=stage, path=path) from None
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


# Delta's optimistic concurrency: the commit of a transaction that another writer got ahead of
_CONFLICT = re.compile(r"DELTA_(CONCURRENT_\w+|PROTOCOL_CHANGED|METADATA_CHANGED)|Concurrent\w*Exception|"
                       r"ProtocolChangedException|MetadataChangedException")


@contextmanager
def delta_commit(path: str):
    """Turn a Delta write conflict into a ConflictError naming the table. Decision: no automatic retry:
    two runs on one output interleave their stages, and a retried commit would mix their inputs;
    the losing run stops with nothing of it committed to that table, and a re-run is safe."""
    try:
        yield
    except Exception as exc:
        if _CONFLICT.search(f"{type(exc).__name__} {exc}"):
            raise ConflictError("another run is writing to this table; nothing of this run was committed to "
                                "it; re-run when that run is done", path=path) from None
        raise


def write_delta(df: DataFrame, path: str, *, mode: str = "overwrite") -> None:
    """Write a Delta table in one transaction (a crash leaves the previous version readable)."""
    with delta_commit(path):
        (df.write.format("delta").mode(mode).option("overwriteSchema", "true" if mode == "overwrite" else "false")
         .save(path))


def merge_changes(upserts: DataFrame, deletes: DataFrame, path: str, *, keys: tuple[str, ...]) -> None:
    """Apply a table's changes in one MERGE transaction: ``upserts`` (whole rows) replace the rows
    with their keys when another column differs, or are inserted; the rows with the keys in
    ``deletes`` are deleted. Rows named in neither are not read into the source nor rewritten, so the
    MERGE costs what changed, not the table. ``keys`` identify a row (null-safe)."""
    from delta.tables import DeltaTable

    columns = upserts.columns
    drop = "_prodsim_drop"
    source = (upserts.withColumn(drop, F.lit(False))
              .unionByName(deletes.select(*keys).withColumn(drop, F.lit(True)), allowMissingColumns=True))
    changed = " OR ".join(f"NOT (t.`{c}` <=> s.`{c}`)" for c in columns if c not in keys) or "false"
    merge = (DeltaTable.forPath(upserts.sparkSession, path).alias("t")
             .merge(source.alias("s"), " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys))
             .whenMatchedDelete(condition=f"s.{drop}")
             .whenMatchedUpdate(condition=f"NOT s.{drop} AND ({changed})", set={c: f"s.`{c}`" for c in columns})
             .whenNotMatchedInsert(condition=f"NOT s.{drop}", values={c: f"s.`{c}`" for c in columns}))
    with delta_commit(path):
        merge.execute()


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


class NotARegularFile(OSError):
    """A local path that is a folder, a pipe, a device or a socket: never opened (a read could block)."""


def read_bytes(uri: str, limit: int, timeout_s: float) -> bytes:
    """Up to ``limit`` bytes of ``uri``, within ``timeout_s`` seconds or TimeoutError.

    A local path must be a regular file (a named pipe or device would block or never end). The read
    runs in a daemon thread: a read that blocks (a stalled network mount, a slow object store) costs
    the caller its deadline, not the job, and the thread does not keep the worker process alive."""
    box: dict = {}

    def work() -> None:
        try:
            local = local_path(uri) if not uri.startswith("dbfs:") else None
            if local is not None and not stat.S_ISREG(os.stat(local).st_mode):
                raise NotARegularFile(f"{uri}: not a regular file")
            with open_uri(uri) as f:
                box["data"] = f.read(limit)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    reader = threading.Thread(target=work, daemon=True, name="prodsim-read")
    reader.start()
    reader.join(timeout_s)
    if reader.is_alive():
        raise TimeoutError(f"{uri}: no data within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["data"]


def image_uri_verdict(uri: str, roots: Sequence[str], schemes: Sequence[str]) -> tuple[str | None, str | None]:
    """(the URI to read, None) when the image policy allows ``uri``, else (None, why).

    Local paths (plain or ``file://``) are resolved, symlinks included, and must lie under one of
    ``roots``; the resolved path is what gets read. Other URIs must use one of ``schemes``."""
    parsed = urlparse(uri)
    if parsed.scheme and parsed.scheme != "file" and len(parsed.scheme) > 1:
        if parsed.scheme.lower() in {s.lower() for s in schemes}:
            return uri, None
        return None, f"scheme {parsed.scheme}: is not in ingest.image_schemes"
    path = os.path.realpath(parsed.path if parsed.scheme == "file" else uri)
    for root in roots:
        real_root = os.path.realpath(root)
        if path == real_root or path.startswith(real_root.rstrip(os.sep) + os.sep):
            return path, None
    return None, "outside the catalog folder and ingest.image_roots"


def csv_header(path: str) -> list[str]:
    """The header row of a labels CSV (InputError when the file does not exist)."""
    if not Path(path).is_file():
        raise InputError("labelled pairs file does not exist", path=path)
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f), [])


def read_groups(spark: SparkSession, path: str, id_col: str | None = None) -> DataFrame:
    """Labelled groups as (product_id, group) from a CSV with a header: a ``group`` column and an id
    column (``id_col``; default: the first other column)."""
    header = csv_header(path)
    if "group" not in header:
        raise InputError(f"groups file has no 'group' column (columns: {header})", path=path)
    ids = id_col or next((c for c in header if c != "group"), None)
    if ids not in header:
        raise InputError(f"groups file has no id column {ids!r} (columns: {header})", path=path)
    df = spark.read.option("header", True).csv(path)
    return df.select(F.trim(F.col(f"`{ids}`")).alias("product_id"), F.trim(F.col("group")).alias("group")) \
        .where("product_id IS NOT NULL AND group IS NOT NULL")


def read_pairs(spark: SparkSession, path: str, left_col: str | None = None, right_col: str | None = None
               ) -> DataFrame:
    """Labelled match pairs as (left_id, right_id) from a CSV with a header: a pairs file (default: its
    first two columns), or a groups file with a ``group`` column (every two products of one group match)."""
    header = csv_header(path)
    if "group" in header and not (left_col and right_col):
        members = read_groups(spark, path, left_col)
        a, b = members.alias("a"), members.alias("b")
        return a.join(b, (F.col("a.group") == F.col("b.group")) & (F.col("a.product_id") < F.col("b.product_id"))) \
            .select(F.col("a.product_id").alias("left_id"), F.col("b.product_id").alias("right_id"))
    df = spark.read.option("header", True).csv(path)
    left_col = left_col or (header[0] if header else None)
    right_col = right_col or (header[1] if len(header) > 1 else None)
    missing = [c for c in (left_col, right_col) if c not in header]
    if missing:
        raise InputError(f"pairs file has no column {missing[0]!r} (columns: {header})", path=path)
    return df.select(F.trim(F.col(f"`{left_col}`")).alias("left_id"), F.trim(F.col(f"`{right_col}`")).alias("right_id"))
