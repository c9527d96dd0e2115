"""The package's declared requirements cover what it imports. (The wheel itself, installed away from
the checkout and run under spark-submit, is tests/test_deploy.py's.)"""
import ast
import sys
from importlib.metadata import packages_distributions, requires
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT


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
