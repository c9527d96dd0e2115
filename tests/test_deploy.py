"""Where users run it: spark-submit jobs from the installed wheel and the Databricks notebooks, run for
real on local Spark."""
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from prodsim_spark import finetune, io
from prodsim_spark.session import submit_arguments
from conftest import ROOT, SAMPLE_CATALOG

SPARK_SUBMIT = str(Path(sys.executable).with_name("spark-submit"))
ENV = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable,
       "HF_HUB_OFFLINE": "1", "SPARK_LOCAL_IP": "127.0.0.1"}


def installed_wheel(tmp_path: Path) -> Path:
    """The package as cluster users install it: a wheel of the library only, in a new venv. Returns that
    venv's python; its dependencies are this venv's packages, added as a path after the install (a .pth
    line adds the folder itself, not this venv's editable install of the repo)."""
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("prodsim_spark-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "prodsim_spark/cli.py" in names and "prodsim_spark/tables.py" in names
    assert all(n.startswith(("prodsim_spark/", "prodsim_spark-")) for n in names), names  # no benchmarks, tests

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    ours = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(ROOT / ".venv")))
    (site / "zz_dependencies.pth").write_text(str(ours) + "\n")
    return python


@pytest.mark.slow
def test_spark_submit_runs_the_pipeline_job_from_the_installed_wheel(spark, tmp_path):
    # `spark` first: a local session resolves and caches the Delta jars this submit then reuses.
    # One run covers two ways users deploy: spark-submit of jobs/pipeline.py, and the wheel installed
    # where the driver and workers run, with no checkout importable (--py-files, Databricks libraries).
    python = installed_wheel(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    job = shutil.copy(ROOT / "jobs" / "pipeline.py", work / "pipeline.py")
    env = {k: v for k, v in ENV.items() if k != "PYTHONPATH"}
    env.update(PYSPARK_PYTHON=str(python), PYSPARK_DRIVER_PYTHON=str(python))
    where = subprocess.run([str(python), "-c", "import prodsim_spark, importlib.util as u; print(prodsim_spark.__file__);"
                            "print(u.find_spec('benchmarks'))"], cwd=work, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    module_file, benchmarks = where.stdout.split()
    assert Path(module_file).is_relative_to(python.parents[1]) and benchmarks == "None"

    out = work / "out"
    cmd = [SPARK_SUBMIT, "--master", "local[2]", "--driver-memory", "2g", *submit_arguments(),
           "--conf", f"spark.pyspark.python={python}", "--conf", "spark.sql.shuffle.partitions=4",
           str(job), "--catalog", str(SAMPLE_CATALOG), "--output", str(out)]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prodsim run: 308 catalog rows" in done.stdout and "305 of 308 rows have neighbours" in done.stdout
    # a local master is one machine: the small-machine SQL defaults the submit did not set are filled in
    assert "is one machine: spark.databricks.delta.snapshotPartitions=2" in done.stdout + done.stderr
    assert io.read_delta(spark, str(out / "neighbours")).count() == 308

    # the wheel's console script; the benchmarks are not in the wheel, and it says so
    bench = subprocess.run([str(python.with_name("prodsim")), "bench", "join", "--n", "100"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 2 and "from a checkout" in bench.stderr


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
