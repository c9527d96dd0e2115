"""The Airflow DAG against real Airflow (its own venv, .venv-airflow, set up by bin/test): it imports,
its graph is ingest -> embed -> neighbours -> evaluate and group, and one dag.test() run on the sample catalog
with local Spark succeeds and leaves the neighbours table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prodsim_spark import io
from prodsim_spark.session import DELTA_EXTENSIONS, delta_maven_coordinates
from conftest import ROOT, SAMPLE_CATALOG

CHECK = ROOT / "tests" / "airflow_dag_check.py"


def airflow_python() -> str:
    python = os.environ.get("PRODSIM_AIRFLOW_PYTHON") or str(ROOT / ".venv-airflow" / "bin" / "python")
    assert Path(python).exists(), f"{python} missing: bin/test sets up .venv-airflow (requirements-airflow.txt)"
    return python


def airflow_env(home: Path, **variables: str) -> dict:
    bin_dir = str(Path(sys.executable).parent)  # .venv/bin: spark-submit and the job's python
    env = {**os.environ,
           "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
           "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "jobs" / "airflow"),
           "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
           "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
           # the Spark connection: local mode here; a cluster's master (yarn, spark://, k8s://) in production
           "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
           "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
           "HF_HUB_OFFLINE": "1", "SPARK_LOCAL_IP": "127.0.0.1"}
    env.update({f"AIRFLOW_VAR_{k.upper()}": v for k, v in variables.items()})
    return env


def check(env: dict, *args: str, timeout: int = 300) -> dict:
    done = subprocess.run([airflow_python(), str(CHECK), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (done.stdout[-3000:], done.stderr[-5000:])
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow")
    migrate = subprocess.run([str(Path(airflow_python()).with_name("airflow")), "db", "migrate"],
                             env=airflow_env(home), capture_output=True, text=True, timeout=600)
    assert migrate.returncode == 0, migrate.stderr[-3000:]
    return home


def test_dag_imports_and_has_the_documented_graph(airflow_home):
    found = check(airflow_env(airflow_home))
    assert found["import_errors"] == {} and found["dag_ids"] == ["prodsim_daily"]
    assert found["downstream"] == {"ingest": ["embed"], "embed": ["neighbours"], "neighbours": ["evaluate", "group"],
                                   "evaluate": [], "group": []}
    assert set(found["operators"].values()) == {"SparkSubmitOperator"}
    assert found["applications"] == {"ingest": "ingest.py", "embed": "embed.py", "neighbours": "neighbours.py",
                                     "evaluate": "evaluate.py", "group": "group.py"}
    # the DAG runs where prodsim_spark is not installed, so it spells out the Delta settings: the same
    # as the library's (the package matching the pinned pyspark, the Delta SQL extension and catalog)
    for task in found["downstream"]:
        assert delta_maven_coordinates() in found["packages"][task]
        assert DELTA_EXTENSIONS.items() <= found["conf"][task].items()
    assert all(r >= 1 for r in found["retries"].values())
    assert "daily" in found["schedule"] or "0 0 * * *" in found["schedule"]
    assert found["catchup"] is False and found["max_active_runs"] == 1
    assert found["params"] == ["catalog", "conf", "output", "pairs"]


@pytest.mark.slow
def test_one_dag_run_on_the_sample_catalog(spark, airflow_home, tmp_path):
    # `spark` first: a local session has resolved the Delta jars into Ivy's cache for the submits
    out = tmp_path / "out"
    env = airflow_env(airflow_home, prodsim_output=str(out), prodsim_driver_memory="2g")
    found = check(env, "--run", json.dumps({"catalog": str(SAMPLE_CATALOG),
                                            "pairs": str(ROOT / "data" / "sample" / "groups.csv")}), timeout=1800)
    assert found["state"] == "success", found
    assert found["task_states"] == {t: "success" for t in ("ingest", "embed", "neighbours", "evaluate", "group")}
    assert io.read_delta(spark, str(out / "neighbours")).count() == 308
    assert io.read_delta(spark, str(out / "groups")).count() == 308
    assert io.read_delta(spark, str(out / "embeddings")).count() > 250
