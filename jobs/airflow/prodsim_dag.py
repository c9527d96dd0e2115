"""Airflow DAG ``prodsim_daily``: the prodsim-spark stages as spark-submit jobs, once a day.

    ingest -> embed -> neighbours -> evaluate
                                  -> group

Each task is a ``SparkSubmitOperator`` running one of the thin jobs beside this folder
(``jobs/ingest.py`` ...), so Airflow only schedules and retries; Spark does the work on the cluster
named by the Airflow connection (``spark_default`` unless ``PRODSIM_SPARK_CONN_ID`` says otherwise).

The run is incremental: ``<output>/embeddings`` keeps yesterday's vectors and the embed task encodes
only products that are new or changed in today's catalog export; ingest and neighbours rewrite their
tables in one Delta transaction each, so a retried or re-run task is safe. ``max_active_runs=1``
because two runs would MERGE into the same embeddings table.

Parameters, first match wins: the run's params (Trigger DAG w/ config), then Airflow Variables, then
the defaults below (the bundled sample catalog, for a first try):

=================  ==========================  ==============================================
param              Variable                    meaning
=================  ==========================  ==============================================
catalog            prodsim_catalog             catalog file or folder (the daily export)
output             prodsim_output              folder of the Delta tables
conf               prodsim_conf                a YAML config file for --conf (optional)
pairs              prodsim_pairs               labelled pairs or groups CSV for evaluate
                                               (optional: without it evaluate reports coverage)
=================  ==========================  ==============================================

Spark settings: Variable ``prodsim_spark_packages`` (default: the Delta Lake package matching the
pinned pyspark), ``prodsim_driver_memory`` (default 2g). The executors need the ``prodsim_spark``
package installed (cluster init script or image), as the README's "Running on a cluster" says.
"""
from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

try:  # Airflow 3
    from airflow.sdk import DAG, Param
except ImportError:  # Airflow 2.x
    from airflow import DAG
    from airflow.models.param import Param
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

JOBS = Path(__file__).resolve().parents[1]
REPO = JOBS.parent
DELTA_PACKAGE = "io.delta:delta-spark_4.1_2.13:4.4.0"  # pyspark 4.1.x + delta-spark 4.4.0 (README: Versions)
DELTA_CONF = {"spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
              "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog"}
SPARK_CONN_ID = os.environ.get("PRODSIM_SPARK_CONN_ID", "spark_default")

DEFAULTS = {"catalog": str(REPO / "data" / "sample" / "catalog.csv"),
            "output": str(REPO / "out" / "airflow"),
            "conf": "",
            "pairs": ""}


def setting(name: str) -> str:
    """Jinja for one parameter: the run's param, else the Variable ``prodsim_<name>``, else the default."""
    return f"{{{{ params.{name} or var.value.get('prodsim_{name}', '{DEFAULTS[name]}') }}}}"


def config_args() -> list[str]:
    # an empty --conf is rendered as '--conf ""' -> the CLI treats an empty path as no file
    return ["--conf", setting("conf")]


default_args = {
    "owner": "prodsim",
    "retries": 2,
    "retry_delay": timedelta(minutes=10),
    "retry_exponential_backoff": True,
    "execution_timeout": timedelta(hours=8),
}

with DAG(
    dag_id="prodsim_daily",
    description="prodsim-spark: ingest -> embed (incremental) -> neighbours -> evaluate, group",
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,          # each run reads the latest export; missed days need no replay
    max_active_runs=1,      # runs share the embeddings table
    default_args=default_args,
    params={name: Param(default="", type="string", description=f"overrides Variable prodsim_{name}")
            for name in DEFAULTS},
    tags=["prodsim", "spark"],
    doc_md=__doc__,
) as dag:
    def spark_job(task_id: str, job: str, args: list[str]) -> SparkSubmitOperator:
        return SparkSubmitOperator(
            task_id=task_id,
            application=str(JOBS / job),
            name=f"prodsim-{task_id}",
            conn_id=SPARK_CONN_ID,
            packages="{{ var.value.get('prodsim_spark_packages', '" + DELTA_PACKAGE + "') }}",
            # conf is templated (driver_memory is not): spark-submit applies spark.driver.memory before the JVM starts
            conf={**DELTA_CONF, "spark.driver.memory": "{{ var.value.get('prodsim_driver_memory', '2g') }}"},
            application_args=args,
        )

    output = ["--output", setting("output")]
    ingest = spark_job("ingest", "ingest.py", ["--catalog", setting("catalog"), *output, *config_args()])
    embed = spark_job("embed", "embed.py", [*output, *config_args()])
    neighbours = spark_job("neighbours", "neighbours.py", [*output, *config_args()])
    # every task names the run folder only: the library knows the tables in it (prodsim_spark/tables.py)
    evaluate = spark_job("evaluate", "evaluate.py", [*output, "--pairs", setting("pairs"), *config_args()])
    # duplicate groups from today's lists; ids stay stable for groups that did not change
    group = spark_job("group", "group.py", [*output, *config_args()])

    ingest >> embed >> neighbours >> [evaluate, group]
