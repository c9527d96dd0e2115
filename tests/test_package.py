"""The package as cluster users install it: a wheel with the library only, whose declared requirements
cover what it imports, and that runs `prodsim run` with no checkout on sys.path (what
`spark-submit --py-files` and Databricks library users get)."""
import ast
import os
import subprocess
import sys
import venv
import zipfile
from importlib.metadata import packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT, SAMPLE_CATALOG


def third_party_imports(folder: Path) -> set[str]:
    """Top-level names of every module the library imports that is neither stdlib nor its own."""
    names = set()
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("prodsim_spark", "__future__")}


def test_install_requires_covers_every_import():
    declared = {canonicalize_name(Requirement(r).name) for r in requires("prodsim-spark")
                if "extra ==" not in r}
    providers = packages_distributions()
    missing = {}
    for module in third_party_imports(ROOT / "prodsim_spark"):
        if module == "benchmarks":
            continue  # imported by `prodsim bench` from a checkout only (see cli._benchmarks_package)
        dists = {canonicalize_name(d) for d in providers.get(module, [module])}
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported by prodsim_spark but not in setup.py install_requires: {missing}"


@pytest.mark.slow
def test_wheel_runs_the_sample_catalog_without_the_checkout(spark, tmp_path):
    # `spark` first: the local session has cached the Delta jars that the installed package reuses
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(dist), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("prodsim_spark-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "prodsim_spark/cli.py" in names and "prodsim_spark/tables.py" in names
    assert all(n.startswith(("prodsim_spark/", "prodsim_spark-")) for n in names), names  # no benchmarks, tests

    # a new venv holding only the wheel; its dependencies are this venv's packages, added as a path
    # after the install (a .pth line adds the folder itself, not this venv's editable install of the repo)
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
                                "--no-index", "-q", str(wheel)], capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    ours = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_relative_to(ROOT / ".venv")))
    (site / "zz_dependencies.pth").write_text(str(ours) + "\n")

    work = tmp_path / "elsewhere"  # not the repo: nothing of the checkout is importable from here
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    env.update(HF_HUB_OFFLINE="1", SPARK_LOCAL_IP="127.0.0.1")
    where = subprocess.run([str(python), "-c", "import prodsim_spark, importlib.util as u; print(prodsim_spark.__file__);"
                            "print(u.find_spec('benchmarks'))"], cwd=work, env=env, capture_output=True, text=True)
    assert where.returncode == 0, where.stderr
    module_file, benchmarks = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and benchmarks == "None"

    out = work / "out"
    run = subprocess.run([str(env_dir / "bin" / "prodsim"), "run", "--catalog", str(SAMPLE_CATALOG), "--output",
                          str(out), "--progress", "off", "--set", "spark.master=local[2]",
                          "--set", "spark.driver_memory=2g", "--set", "spark.shuffle_partitions=4"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "prodsim run: 308 catalog rows" in run.stdout and "305 of 308 rows have neighbours" in run.stdout
    bench = subprocess.run([str(env_dir / "bin" / "prodsim"), "bench", "join", "--n", "100"], cwd=work, env=env,
                           capture_output=True, text=True, timeout=120)
    assert bench.returncode == 2 and "from a checkout" in bench.stderr
