"""One real local Spark session with Delta Lake per test worker (two workers: pytest.ini)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CATALOG = ROOT / "data" / "sample" / "catalog.csv"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)


def pytest_collection_modifyitems(items):
    """The suite runs on two pytest-xdist workers (pytest.ini), each with its own Spark session. The
    tests that read the shared sample run go to one worker together, so the run is made once."""
    for item in items:
        if "sample_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("sample_run"))


@pytest.fixture(scope="session")
def spark():
    from prodsim_spark.config import SparkSettings
    from prodsim_spark.session import get_session

    session = get_session(SparkSettings(master="local[2]", driver_memory="3g", shuffle_partitions=4))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def sample_run(spark, tmp_path_factory):
    """One `prodsim run` of the bundled sample catalog, shared by the tests that read its tables:
    (output folder, what the command printed)."""
    import contextlib
    import io

    from prodsim_spark import cli

    out = tmp_path_factory.mktemp("sample-run") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(["run", "--catalog", str(SAMPLE_CATALOG), "--output", str(out), "--progress", "off"]) == 0
    return out, printed.getvalue()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = ROOT / "test-artifacts"
    path.mkdir(exist_ok=True)
    return path


def assert_same_ranking(label, got, want, tol=1e-5):
    """Two ranked lists, each (ids, scores) best first, are equal: the same scores, and the same ids in
    the same order except among equal scores. For two rankings from separately encoded vectors (the
    batch search and the notebook API each encode the query): the sample has copies of one listing,
    and a query vector encoded in another batch differs in its last float bits, so the copies may
    trade places or the other copy stay at the last place. (Rankings from the same vectors are equal
    bit for bit: fusion.exact_top_k.)"""
    (got_ids, got_scores), (want_ids, want_scores) = got, want
    assert len(got_ids) == len(want_ids) and list(got_scores) == pytest.approx(list(want_scores), abs=tol), label
    for i, (g, w) in enumerate(zip(got_ids, want_ids)):
        if g != w:
            tied = [j for j, s in enumerate(want_scores) if abs(s - want_scores[i]) <= tol]
            assert len(tied) > 1, (label, i, g, w)
            assert g in {want_ids[j] for j in tied} or tied[-1] == len(want_ids) - 1, (label, i, g, w)
