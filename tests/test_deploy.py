"""Where users run it: spark-submit jobs and the Databricks notebooks, run for real on local Spark."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prodsim_spark import finetune, io
from prodsim_spark.session import submit_arguments
from conftest import ROOT, SAMPLE_CATALOG

SPARK_SUBMIT = str(Path(sys.executable).with_name("spark-submit"))
ENV = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
       "HF_HUB_OFFLINE": "1", "SPARK_LOCAL_IP": "127.0.0.1"}


@pytest.mark.slow
def test_spark_submit_pipeline_job_on_the_sample_catalog(spark, tmp_path):
    # `spark` first: a local session resolves and caches the Delta jars this submit then reuses
    out = tmp_path / "out"
    cmd = [SPARK_SUBMIT, "--master", "local[2]", "--driver-memory", "2g", *submit_arguments(),
           "--conf", f"spark.pyspark.python={sys.executable}", "--conf", "spark.sql.shuffle.partitions=4",
           str(ROOT / "jobs" / "pipeline.py"), "--catalog", str(SAMPLE_CATALOG), "--output", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prodsim run: 308 catalog rows" in done.stdout
    # a local master is one machine: the small-machine SQL defaults the submit did not set are filled in
    assert "is one machine: spark.databricks.delta.snapshotPartitions=2" in done.stdout + done.stderr
    neighbours = io.read_delta(spark, str(out / "neighbours"))
    assert neighbours.count() == 308


@pytest.mark.slow
def test_notebooks_run_as_scripts(spark, tmp_path):
    env = {**ENV, "PRODSIM_OUTPUT": str(tmp_path / "nb"), "PRODSIM_CATALOG": str(SAMPLE_CATALOG),
           "PRODSIM_PAIRS": str(ROOT / "data" / "sample" / "groups.csv")}
    # end_to_end fine-tunes the text encoder into <output>/models/text; explore is told, as a user would be
    tuned = ";".join(finetune.overrides("text", str(tmp_path / "nb" / "models" / "text")))
    for notebook, extra in (("end_to_end.py", {}), ("explore.py", {"PRODSIM_SET": tuned})):
        done = subprocess.run([sys.executable, str(ROOT / "notebooks" / notebook)], cwd=ROOT, env={**env, **extra},
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{notebook}: {done.stderr[-3000:]}"
    assert io.read_delta(spark, str(tmp_path / "nb" / "neighbours")).count() == 308
    assert "data-product-id" in (tmp_path / "nb" / "report.html").read_text(encoding="utf-8")
    assert "score" in done.stdout  # explore printed the breakdown table
