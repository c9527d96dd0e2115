"""One function that returns a SparkSession with Delta Lake enabled.

* On a cluster (spark-submit, Databricks, an active session) the session it is given wins: we call
  ``getOrCreate()`` and set nothing, so the cluster's own Delta setup and resources stay in force.
  Only a submit to ``--master local[N]`` (one machine) gets the local session's SQL defaults where
  it did not set them (see :func:`local_sql_defaults`).
* Embedded default (local mode): all cores, Python workers on the running interpreter, Delta's jars
  from Maven Central. The first start resolves them through Spark's Ivy (``spark.jars.packages``,
  the coordinates ``delta.configure_spark_with_delta_pip`` computes for the pinned pyspark and
  delta-spark); we then record the resolved jar files in a manifest, and later starts pass those
  files as ``spark.jars`` so they need no network at all.
"""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

from prodsim_spark.config import SparkSettings

log = logging.getLogger(__name__)

DELTA_EXTENSIONS = {
    "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
    "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
}


def delta_maven_coordinates() -> str:
    """io.delta:delta-spark_<spark line>_2.13:<delta version>, as delta-spark's pip helper names it."""
    from importlib.metadata import version

    import pyspark

    spark_line = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_line}_2.13:{version('delta-spark')}"


def jar_cache_dir() -> Path:
    root = os.environ.get("PRODSIM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "prodsim-spark"
    )
    return Path(root) / "jars"


def _manifest_path(coords: str) -> Path:
    return jar_cache_dir() / (coords.replace(":", "_") + ".json")


def _cached_jars(coords: str) -> list[str] | None:
    manifest = _manifest_path(coords)
    try:
        jars = json.loads(manifest.read_text())["jars"]
    except (OSError, ValueError, KeyError):
        return None
    return jars if jars and all(Path(j).is_file() for j in jars) else None


def _record_jars(spark, coords: str) -> None:
    resolved = spark.sparkContext.getConf().get("spark.jars", "")
    jars = [j[len("file:"):] if j.startswith("file:") else j for j in resolved.split(",") if j]
    jars = [j for j in jars if Path(j).is_file()]
    if not any("delta-spark" in Path(j).name for j in jars):
        log.warning("could not find the resolved Delta jars in spark.jars (%s); not caching them", resolved)
        return
    path = _manifest_path(coords)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"coordinates": coords, "jars": jars}, indent=1))
    tmp.replace(path)  # atomic: a crashed first start never leaves a half-written manifest


def _under_cluster_manager() -> bool:
    # spark-submit launches the Python driver with a gateway already running; Databricks sets its runtime.
    return bool(os.environ.get("PYSPARK_GATEWAY_PORT") or os.environ.get("DATABRICKS_RUNTIME_VERSION"))


def get_session(settings: SparkSettings | None = None):
    """Return the SparkSession to use, with Delta Lake enabled (see module docstring)."""
    from pyspark.sql import SparkSession

    settings = settings or SparkSettings()
    active = SparkSession.getActiveSession()
    if settings.mode != "local" and active is not None:
        return active
    if settings.mode == "cluster" or (settings.mode == "auto" and _under_cluster_manager()):
        spark = SparkSession.builder.appName(settings.app_name).getOrCreate()
        _fill_local_master_defaults(spark, settings)
        return spark
    return _local_session(settings)


def local_sql_defaults(settings: SparkSettings, cores: int) -> dict[str, str]:
    """SQL settings for a one-machine master: a few shuffle partitions, and Delta's log replayed in 2
    tasks (its default, 50, is for a cluster's cores; on 2 cores each table read waited on them)."""
    return {"spark.sql.shuffle.partitions": str(settings.shuffle_partitions or 2 * cores),
            "spark.databricks.delta.snapshotPartitions": "2"}


def _fill_local_master_defaults(spark, settings: SparkSettings) -> None:
    """``spark-submit --master local[N]`` (an Airflow connection to local, a test) is one machine, not
    a cluster: the local session's SQL defaults apply there too, except where the submit set them."""
    conf = spark.sparkContext.getConf()
    if not conf.get("spark.master", "").startswith("local"):
        return
    filled = {key: value for key, value in local_sql_defaults(settings, spark.sparkContext.defaultParallelism).items()
              if not conf.contains(key)}
    for key, value in filled.items():
        spark.conf.set(key, value)
    if filled:
        log.info("master %s is one machine: %s", conf.get("spark.master"),
                 ", ".join(f"{k}={v}" for k, v in filled.items()))


def local_master(settings: SparkSettings) -> str:
    """The master URL with task retries: ``local[N]`` becomes ``local[N,task_attempts]`` (local mode reads
    its retry count from the URL and ignores spark.task.maxFailures); a URL that says F keeps it."""
    match = re.fullmatch(r"local(\[(\*|\d+)\])?", settings.master)
    if not match:
        return settings.master
    return f"local[{match.group(2) or 1},{settings.task_attempts}]"


def _local_session(settings: SparkSettings):
    from pyspark.sql import SparkSession

    cores = os.cpu_count() or 2
    builder = (
        SparkSession.builder.master(local_master(settings))
        .appName(settings.app_name)
        .config("spark.driver.memory", settings.driver_memory)
        # The Python workers must import the same pandas/torch as this process.
        .config("spark.pyspark.python", sys.executable)
        .config("spark.pyspark.driver.python", sys.executable)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.ui.showConsoleProgress", "false")
    )
    for key, value in local_sql_defaults(settings, cores).items():
        builder = builder.config(key, value)
    for key, value in DELTA_EXTENSIONS.items():
        builder = builder.config(key, value)
    for key, value in settings.extra_conf.items():
        builder = builder.config(key, value)

    coords = delta_maven_coordinates()
    jars = _cached_jars(coords)
    if jars:
        builder = builder.config("spark.jars", ",".join(jars))
    else:
        from delta import configure_spark_with_delta_pip

        log.info("resolving Delta Lake jars %s from Maven Central (first run on this machine)", coords)
        builder = configure_spark_with_delta_pip(builder)
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # one machine: no need to pick a network interface
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    if not jars:
        _record_jars(spark, coords)
    return spark


def submit_arguments() -> list[str]:
    """spark-submit options that give a job Delta Lake on this machine: the cached jars when a local
    session has already resolved them (no network), else ``--packages`` (Ivy, Maven Central)."""
    coords = delta_maven_coordinates()
    jars = _cached_jars(coords)
    args = ["--jars", ",".join(jars)] if jars else ["--packages", coords]
    for key, value in DELTA_EXTENSIONS.items():
        args += ["--conf", f"{key}={value}"]
    return args
