"""The prodsim command as a user meets it."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest


from prodsim_spark import fusion, io
from conftest import SAMPLE_CATALOG

PRODSIM = str(Path(sys.executable).with_name("prodsim"))
SPARK_STARTED = "log4j"  # Spark prints its log4j profile line when a JVM starts


def run_cli(*args, timeout=120):
    return subprocess.run([PRODSIM, *args], capture_output=True, text=True, timeout=timeout)


def test_help_documents_commands():
    top = run_cli("--help")
    assert top.returncode == 0 and "run" in top.stdout
    sub = run_cli("run", "--help")
    assert sub.returncode == 0
    for flag in ("--catalog", "--output", "--format", "--conf", "--set"):
        assert flag in sub.stdout


def test_missing_required_column_fails_before_spark(tmp_path):
    catalog = tmp_path / "no_id.csv"
    catalog.write_text("sku,title,price\n1,shoe,3\n")
    proc = run_cli("run", "--catalog", str(catalog), "--output", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "missing required column 'product_id'" in proc.stderr and str(catalog) in proc.stderr
    assert SPARK_STARTED not in proc.stderr + proc.stdout  # no JVM was started
    assert not (tmp_path / "out").exists()


def test_bad_arguments_fail_clearly(tmp_path):
    missing = run_cli("run", "--catalog", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o"))
    assert missing.returncode == 2 and "no such file" in missing.stderr and "nope.csv" in missing.stderr
    bad_set = run_cli("run", "--catalog", str(SAMPLE_CATALOG), "--output", str(tmp_path / "o"),
                      "--set", "ingest.format=xml")
    assert bad_set.returncode == 2 and "ingest.format" in bad_set.stderr and "parquet" in bad_set.stderr
    no_args = run_cli("run")
    assert no_args.returncode == 2 and "--catalog" in no_args.stderr
    unknown_fmt = run_cli("run", "--catalog", str(tmp_path), "--output", str(tmp_path / "o"))
    assert unknown_fmt.returncode == 2 and "--format" in unknown_fmt.stderr


def test_run_on_sample_catalog_keeps_every_row(spark, sample_run):
    out, printed = sample_run
    assert "status:" in printed and "duplicate_product_id" in printed
    assert (out / "catalog" / "_delta_log").is_dir()
    with open(SAMPLE_CATALOG, newline="", encoding="utf-8") as f:
        n_input = sum(1 for _ in csv.DictReader(f))
    catalog = io.read_delta(spark, str(out / "catalog"))
    assert catalog.count() == n_input
    by_id = {r["product_id"]: r for r in catalog.where("status != 'rejected'").collect()}
    assert by_id["X902"]["price"] == 1299.0
    assert by_id["X901"]["price"] is None and by_id["X901"]["reason"] == "unparsable_price"
    assert Path(by_id["G000"]["image_uri"]).is_file()  # relative image paths resolved
    # neighbours: one row per input row; rejected rows have an empty list and their reason
    neighbours = io.read_delta(spark, str(out / "neighbours"))
    rows = neighbours.collect()
    assert len(rows) == n_input and sorted(r["source_row"] for r in rows) == list(range(n_input))
    for r in rows:
        if r["status"] == "rejected":
            assert r["neighbours"] == [] and r["reason"]
            continue
        nbs = r["neighbours"]
        assert 0 < len(nbs) <= 10 and all(nb["product_id"] != r["product_id"] for nb in nbs)
        assert [nb["score"] for nb in nbs] == sorted((nb["score"] for nb in nbs), reverse=True)
        for nb in nbs:  # the component scores add up to the score
            parts = sum(nb[c] for c in fusion.PARTS)
            assert parts == pytest.approx(nb["score"], abs=1e-5)
    assert "sample neighbours" in printed
    # X900's image is a truncated JPEG: no image vector, but text neighbours and the reason kept
    emb = {r["product_id"]: r for r in io.read_delta(spark, str(out / "embeddings")).collect()}
    assert emb["X900"]["image_embedding"] is None and emb["X900"]["image_error"].startswith("image_unreadable")
    assert emb["X903"]["image_error"].startswith("image_missing")


def test_user_errors_end_as_short_messages_before_spark(tmp_path):
    """Mistakes that need no Spark to find: exit 2, the command and the key/path named, no JVM, no traceback."""
    model = run_cli("run", "--catalog", str(SAMPLE_CATALOG), "--output", str(tmp_path / "o"),
                    "--set", f"embed.text.model={tmp_path / 'no-model'}")
    assert model.returncode == 2 and model.stderr.startswith("prodsim run: error:")
    assert "embed.text.model" in model.stderr and "no-model" in model.stderr
    weights = run_cli("embed", "--output", str(tmp_path / "o"), "--set", "embed.image.weights=/nope/w.safetensors")
    assert weights.returncode == 2 and "embed.image.weights" in weights.stderr and "/nope/w.safetensors" in weights.stderr
    disagree = run_cli("bench", "join", "--k", "5", "--set", "join.k=10")
    assert disagree.returncode == 2 and "--k 5 and --set join.k=10 disagree" in disagree.stderr
    dataset = run_cli("bench", "quality", "--dataset", "grocery", "--data", str(tmp_path / "nope"))
    assert dataset.returncode == 2 and dataset.stderr.startswith("prodsim bench quality: error:")
    assert "grocery dataset folder does not exist" in dataset.stderr
    tuned = run_cli("bench", "search", "--tuned-image")  # would silently run the synthetic bench
    assert tuned.returncode == 2 and "--tuned-image needs --dataset grocery" in tuned.stderr
    pairs = run_cli("evaluate", "--output", str(tmp_path), "--pairs", str(tmp_path / "none.csv"))
    assert pairs.returncode == 2 and "none.csv" in pairs.stderr
    # these used to start a JVM and die in it (JAVA_GATEWAY_EXITED, a Java stack)
    memory = run_cli("run", "--catalog", str(SAMPLE_CATALOG), "--output", str(tmp_path / "o"),
                     "--set", "spark.driver_memory=abc")
    assert memory.returncode == 2 and "spark.driver_memory" in memory.stderr and "4g" in memory.stderr
    master = run_cli("run", "--catalog", str(SAMPLE_CATALOG), "--output", str(tmp_path / "o"),
                     "--set", "spark.master=bogus://x")
    assert master.returncode == 2 and "spark.master" in master.stderr and "bogus://x" in master.stderr
    for proc in (model, weights, disagree, dataset, pairs, memory, master):
        assert "Traceback" not in proc.stderr and SPARK_STARTED not in proc.stderr + proc.stdout


def test_a_stage_without_its_input_table_names_the_command_that_writes_it(spark, tmp_path, capsys):
    from prodsim_spark import cli

    assert cli.main(["neighbours", "--output", str(tmp_path / "empty"), "--progress", "off"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prodsim neighbours: error:") and "catalog" in err
    assert "not a Delta table; it is written by prodsim ingest" in err


def test_evaluate_a_run_folder_with_its_cutoffs(spark, sample_run, capsys):
    import json

    from prodsim_spark import cli

    out, _ = sample_run
    groups = SAMPLE_CATALOG.with_name("groups.csv")
    assert cli.main(["evaluate", "--output", str(out), "--pairs", str(groups), "--json",
                     "--set", "evaluate.cutoffs=[1, 3]"]) == 0
    found = json.loads(capsys.readouterr().out)["neighbours table"]
    assert {"recall@1", "recall@3", "precision@3", "mrr"} <= set(found) and "recall@10" not in found
    assert found["queries"] > 100 and 0 < found["recall@1"] <= found["recall@3"] <= 1


def test_an_encoder_error_inside_a_task_ends_as_a_message(spark, sample_run, tmp_path, capsys):
    """A weights file that exists but does not fit the architecture fails in the Python workers; the
    user still gets one line naming it, and exit 2."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from prodsim_spark import cli

    out, _ = sample_run
    run = tmp_path / "run"
    shutil.copytree(out / "catalog", run / "catalog")
    weights = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(weights))
    code = cli.main(["embed", "--output", str(run), "--progress", "off", "--set", "embed.text.enabled=false",
                     "--set", f"embed.image.weights={weights}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("prodsim embed: error:"), err[-2000:]
    assert "other.safetensors" in err and "neither the names nor the shapes match the model" in err
    assert "Traceback" not in err
