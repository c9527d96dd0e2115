"""Faults, for real on local Spark: a killed Python worker, a killed driver, two runs on one output, an
empty export. Each run is the `prodsim` command in its own process, on a small slice of the sample
catalog; the reference is a clean run of the same slice."""
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from prodsim_spark import cli
from prodsim_spark.tables import CATALOG, EMBEDDINGS, NEIGHBOURS, RunTables
from conftest import SAMPLE_CATALOG

PRODSIM = str(Path(sys.executable).with_name("prodsim"))
SETTINGS = ["--set", f"ingest.image_root={SAMPLE_CATALOG.parent}", "--set", "spark.driver_memory=2g",
            "--set", "spark.master=local[2]", "--progress", "off"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "SPARK_LOCAL_IP": "127.0.0.1"}


def write_slice(path: Path, rows: int) -> Path:
    """The first ``rows`` products of the sample catalog (images resolved against the sample's folder)."""
    with open(SAMPLE_CATALOG, newline="", encoding="utf-8") as f, open(path, "w", newline="", encoding="utf-8") as g:
        csv.writer(g).writerows(list(csv.reader(f))[:rows + 1])
    return path


@pytest.fixture(scope="module")
def slice_catalog(tmp_path_factory) -> Path:
    return write_slice(tmp_path_factory.mktemp("faults") / "catalog.csv", 80)


@pytest.fixture(scope="module")
def clean_run(spark, slice_catalog, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "out"
    assert cli.main(["run", "--catalog", str(slice_catalog), "--output", str(out), *SETTINGS]) == 0
    return out


def start(catalog: Path, out: Path, log: Path) -> subprocess.Popen:
    """`prodsim run` in its own process group (so the driver, its JVM and workers can be killed together)."""
    return subprocess.Popen([PRODSIM, "run", "--catalog", str(catalog), "--output", str(out), *SETTINGS],
                            stdout=open(log.with_suffix(".out"), "w"), stderr=open(log, "w"), env=ENV,
                            start_new_session=True)


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert proc.poll() is None, f"ended before {text!r}: {log.read_text(errors='replace')[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
        time.sleep(0.5)


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``pid``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found.append((child, (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()))
            except OSError:
                continue
            todo.append(child)
    return found


def rss_mb(pid: int) -> float:
    try:
        line = next(l for l in (Path("/proc") / str(pid) / "status").read_text().splitlines() if l.startswith("VmRSS"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024


def busy_worker(proc: subprocess.Popen, timeout: float = 300) -> int:
    """A forked Python worker that is running an embed task: one that has loaded an encoder (torch and a
    model take a few hundred MB; an idle worker or the daemon, which forks them, hold far less)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before a worker was busy"
        workers = sorted(pid for pid, cmd in descendants(proc.pid) if "pyspark" in cmd and "daemon" in cmd)
        busy = [pid for pid in workers[1:] if rss_mb(pid) > 400]  # workers[0] is the daemon
        if busy:
            return busy[-1]
        time.sleep(0.2)
    raise AssertionError(f"no busy worker in {timeout} s: {descendants(proc.pid)}")


def tables_of(spark, out: Path) -> dict:
    tables = RunTables.at(str(out))
    catalog = {r["product_id"]: (r["status"], r["reason"]) for r in tables.read(spark, CATALOG).collect()}
    embeddings = {r["product_id"]: r.asDict() for r in tables.read(spark, EMBEDDINGS).collect()}
    neighbours = {r["product_id"]: r["neighbours"] for r in tables.read(spark, NEIGHBOURS).collect()}
    return {"catalog": catalog, "embeddings": embeddings, "neighbours": neighbours}


def assert_consistent(t: dict) -> None:
    """What every committed state satisfies, even between two stages of a run that crashed: every
    product the neighbours table lists (as a row with a list, or as a neighbour) still has its
    embeddings row. (The catalog may be a stage ahead: products new in it have no list yet.)"""
    listed = {nb["product_id"] for nbs in t["neighbours"].values() for nb in nbs}
    with_lists = {p for p, nbs in t["neighbours"].items() if nbs}
    assert listed | with_lists <= set(t["embeddings"])


def assert_same_tables(got: dict, want: dict) -> None:
    """Same rows, hashes and encoders, vectors equal to float noise, same neighbour lists."""
    assert got["catalog"] == want["catalog"]
    assert set(got["embeddings"]) == set(want["embeddings"]) and set(got["neighbours"]) == set(got["catalog"])
    for pid, w in want["embeddings"].items():
        g = got["embeddings"][pid]
        assert (g["text_hash"], g["image_hash"], g["text_encoder"], g["image_encoder"], g["image_error"]) == \
               (w["text_hash"], w["image_hash"], w["text_encoder"], w["image_encoder"], w["image_error"]), pid
        for col in ("text_embedding", "image_embedding"):
            assert (g[col] is None) == (w[col] is None), (pid, col)
            if w[col] is not None:
                assert np.abs(np.array(g[col]) - np.array(w[col])).max() < 1e-4, (pid, col)
    for pid, w in want["neighbours"].items():
        g = got["neighbours"][pid]
        assert len(g) == len(w) and np.allclose([n["score"] for n in g], [n["score"] for n in w], atol=1e-4), pid
        # the same products; two whose scores tie to float noise may swap places
        assert {n["product_id"] for n in g[:-1]} <= {n["product_id"] for n in w}, pid


@pytest.mark.slow
def test_a_worker_killed_mid_embed_is_retried_and_the_run_ends_green(spark, slice_catalog, clean_run, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    proc = start(slice_catalog, out, log)
    try:
        wait_for(log, "[embed] start", proc)
        os.kill(busy_worker(proc), signal.SIGKILL)
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text(errors="replace")
    assert "Lost task" in text or "worker exited unexpectedly" in text.lower(), "the kill hit no running task"
    got = tables_of(spark, out)
    assert_consistent(got)
    assert_same_tables(got, tables_of(spark, clean_run))


@pytest.mark.slow
def test_a_driver_killed_mid_stage_then_a_rerun_converges(spark, slice_catalog, clean_run, tmp_path):
    out, log = tmp_path / "out", tmp_path / "run.log"
    # a first clean state to crash on top of: yesterday's run on a catalog missing the last 20 rows
    shorter = write_slice(tmp_path / "catalog.csv", 60)
    assert cli.main(["run", "--catalog", str(shorter), "--output", str(out), *SETTINGS]) == 0
    shutil.copy(slice_catalog, shorter)
    proc = start(shorter, out, log)
    try:
        wait_for(log, "[embed] start", proc)
        time.sleep(4)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its JVM and workers, mid-embed
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert_consistent(tables_of(spark, out))  # what the crash left: the catalog may be new, nothing disagrees
    assert cli.main(["run", "--catalog", str(shorter), "--output", str(out), *SETTINGS]) == 0
    got = tables_of(spark, out)
    assert_consistent(got)
    assert_same_tables(got, tables_of(spark, clean_run))


@pytest.mark.slow
def test_two_runs_on_one_output_commit_or_stop_cleanly(spark, slice_catalog, clean_run, tmp_path):
    out = tmp_path / "out"
    procs = [(start(slice_catalog, out, tmp_path / f"run{i}.log"), tmp_path / f"run{i}.log") for i in (1, 2)]
    codes = []
    for proc, log in procs:
        try:
            codes.append(proc.wait(timeout=600))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    for code, (_, log) in zip(codes, procs):
        text = log.read_text(errors="replace")
        assert code in (0, 2), text[-3000:]
        if code == 2:
            assert "another run is writing to" in text and "nothing of this run was committed" in text
            assert "Traceback" not in text
    assert 0 in codes or cli.main(["run", "--catalog", str(slice_catalog), "--output", str(out), *SETTINGS]) == 0
    got = tables_of(spark, out)
    assert_consistent(got)
    if codes == [0, 0] or 2 in codes:
        # whichever run committed last wrote a whole, valid state of the same catalog; a run that
        # stopped may have been the one to write the neighbours, so re-run once for the final state
        assert cli.main(["run", "--catalog", str(slice_catalog), "--output", str(out), *SETTINGS]) == 0
        assert_same_tables(tables_of(spark, out), tables_of(spark, clean_run))


def test_an_empty_or_shrunken_export_leaves_every_table_as_it_was(spark, clean_run, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(clean_run, out)
    from delta.tables import DeltaTable

    def versions():
        return {name: DeltaTable.forPath(spark, str(out / name)).history(1).first()["version"]
                for name in (CATALOG, EMBEDDINGS, NEIGHBOURS)}

    before = versions()
    header_only = tmp_path / "empty.csv"
    header_only.write_text("product_id,title,description,brand,category,price,image_uri\n")
    all_rejected = tmp_path / "rejected.csv"
    all_rejected.write_text("product_id,title,description,brand,category,price,image_uri\n,no id,,,,,\n,,,,,,\n")
    shrunk = write_slice(tmp_path / "shrunk.csv", 10)  # 10 of the 80 products
    for export, message in ((header_only, "no rows (an empty or header-only export)"),
                            (all_rejected, "2 rows, all rejected"),
                            (shrunk, "ingest.max_removed_share")):
        code = cli.main(["run", "--catalog", str(export), "--output", str(out), *SETTINGS])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "nothing was written" in err, err
        assert versions() == before
    assert_same_tables(tables_of(spark, out), tables_of(spark, clean_run))
    # a removal the user says is real goes through, and the tables agree afterwards
    assert cli.main(["run", "--catalog", str(shrunk), "--output", str(out), *SETTINGS,
                     "--set", "ingest.max_removed_share=1"]) == 0
    got = tables_of(spark, out)
    assert_consistent(got)
    assert len(got["catalog"]) == 10 and set(got["neighbours"]) == set(got["catalog"])
    assert set(got["embeddings"]) == set(got["catalog"])  # the 70 removed ones are gone from embeddings too
