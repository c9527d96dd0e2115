"""Fine-tune stage: encoders learned from the catalog's own matches, trained on Spark.

Pretrained encoders know language and pictures, not a shop's products: a sentence model puts
"bias peak pro 5" next to "bias peak le 5" and cannot tell that "(macintosh)" is noise; ImageNet
features confuse look-alike products of one kind. Fine-tuning on labelled matches of the catalog
itself fixes what it can see. Two steps, "make the data" apart from "run the training":

1. Spark: :func:`text_training_rows` turns labelled pairs (or groups) into (anchor, positive, hard
   negatives) rows, the texts composed exactly as the embed stage composes them. Hard negatives are
   the first products of the run's neighbour lists that are not a labelled match: those ranked above
   the true match (same-line siblings, other editions: what the current encoder confuses), or, where
   the match is first, its nearest rivals below it.
   :func:`image_training_rows` turns groups (or pairs, by their connected components) into
   (image URI, group) rows of products that have an image; :func:`bridge_rows` gives the run's text
   vectors of labelled products, for the text bridge fitted after the image head
   (:mod:`prodsim_spark.bridge`).
2. :func:`fine_tune` runs :func:`prodsim_spark.training.train_text` / ``train_image`` through
   ``pyspark.ml.torch.distributor.TorchDistributor`` (``finetune.num_processes`` processes: local mode
   here, one per GPU on a cluster) and writes ``training.json`` beside the model. The folder is a
   normal model folder (Hugging Face ``save_pretrained`` for text; ``model.safetensors`` + the
   architecture name for images); the ``set`` overrides it returns make ``embed`` use it, and its new
   encoder id re-encodes that modality, and only that one, for every product.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from prodsim_spark import encoders, training
from prodsim_spark.config import ImageEncoderSettings, ProdsimConfig
from prodsim_spark.embed import compose_text
from prodsim_spark.errors import InputError
from prodsim_spark.evaluate import directed_pairs
from prodsim_spark.tables import live_catalog, live_embeddings

log = logging.getLogger(__name__)

TRAINING_JSON = "training.json"


def _renamed(df: DataFrame, **names: str) -> DataFrame:
    return df.select(*[F.col(old).alias(new) for old, new in names.items()])


def text_training_rows(catalog: DataFrame, pairs: DataFrame, neighbours: DataFrame | None, config: ProdsimConfig
                       ) -> tuple[DataFrame, int]:
    """(rows, ids_not_found): one row per labelled pair whose two products have text, ``anchor_id,
    anchor_text, positive_id, positive_text, anchor_negatives, positive_negatives`` (a seeded sample of
    ``finetune.text.max_pairs`` when there are more), and how many labelled ids have no text in the
    catalog (reported, not fatal). The loss is symmetric, so each pair appears once; each side gets
    the hard negatives of its own neighbour list."""
    settings = config.finetune.text
    text = compose_text(config.embed.text.template, config.embed.text.description_chars)
    texts = live_catalog(catalog).select("product_id", text.alias("text")).where(F.col("text").isNotNull())
    truth = directed_pairs(pairs)
    not_found = truth.select(F.col("query").alias("product_id")).distinct().join(texts, "product_id", "left_anti").count()
    rows = (truth.where(F.col("query") < F.col("match"))
            .join(_renamed(texts, product_id="query", text="anchor_text"), "query")
            .join(_renamed(texts, product_id="match", text="positive_text"), "match"))
    if rows.count() > settings.max_pairs:
        rows = rows.orderBy(F.xxhash64("query", "match", F.lit(config.finetune.seed))).limit(settings.max_pairs)
    empty = F.array().cast("array<string>")
    if neighbours is not None and settings.hard_negatives > 0:
        hard = hard_negatives(rows.select("query", "match"), truth, neighbours, texts, settings.hard_negatives)
        back = _renamed(hard, query="match", match="query", negatives="positive_negatives")
        rows = (rows.join(hard.withColumnRenamed("negatives", "anchor_negatives"), ["query", "match"], "left")
                .join(back, ["query", "match"], "left"))
    else:
        rows = rows.withColumn("anchor_negatives", empty).withColumn("positive_negatives", empty)
    out = rows.select(F.col("query").alias("anchor_id"), "anchor_text", F.col("match").alias("positive_id"),
                      "positive_text", F.coalesce("anchor_negatives", empty).alias("anchor_negatives"),
                      F.coalesce("positive_negatives", empty).alias("positive_negatives"))
    return out.orderBy("anchor_id", "positive_id"), not_found


def hard_negatives(pairs: DataFrame, truth: DataFrame, neighbours: DataFrame, texts: DataFrame, count: int
                   ) -> DataFrame:
    """(query, match, negatives): for each labelled pair (both ways round), the texts of the first
    ``count`` products of the query's neighbour list that are not its labelled matches (``truth``:
    query, match), best first. Those ranked above the match are what the encoder confuses today; when
    the match is already first, the products just below it are the ones it must stay ahead of (mining
    only those above it left most pairs without a hard negative, and measured worse: docs/benchmarks.md)."""
    both = pairs.unionByName(_renamed(pairs, match="query", query="match"))
    # the negatives depend on the query alone: found once per query, then given to each of its pairs
    queries = both.select("query").distinct()
    ranked = neighbours.select(F.col("product_id").alias("query"),
                               F.posexplode("neighbours.product_id").alias("rank", "candidate"))
    listed = (ranked.join(queries, "query", "left_semi")
              .join(_renamed(truth, query="query", match="candidate"), ["query", "candidate"], "left_anti")
              .join(_renamed(texts, product_id="candidate", text="negative_text"), "candidate"))
    per_query = (listed.groupBy("query")
                 .agg(F.slice(F.sort_array(F.collect_list(F.struct("rank", "negative_text"))), 1, count).alias("n"))
                 .select("query", F.col("n.negative_text").alias("negatives")))
    return both.join(per_query, "query").select("query", "match", "negatives")


def image_training_rows(catalog: DataFrame, groups: DataFrame) -> tuple[DataFrame, int]:
    """(rows, ids_not_found): rows ``product_id, uri, group`` of the labelled products that have an image
    (after ingest's image policy), in groups of two or more such products (a photo alone in its group
    has no positive), and how many labelled ids have no image in the catalog."""
    images = live_catalog(catalog).where(F.col("image_uri").isNotNull()).select("product_id", F.col("image_uri").alias("uri"))
    labelled = groups.select(F.trim("product_id").alias("product_id"), F.trim(F.col("group").cast("string")).alias("group")) \
        .where("product_id IS NOT NULL AND group IS NOT NULL").dropDuplicates(["product_id"])
    not_found = labelled.join(images, "product_id", "left_anti").count()
    rows = labelled.join(images, "product_id")
    sizes = rows.groupBy("group").count().where("count >= 2").select("group")
    return rows.join(sizes, "group").select("product_id", "uri", "group").orderBy("product_id"), not_found


def bridge_rows(embeddings: DataFrame, groups: DataFrame) -> tuple[DataFrame, str | None]:
    """(rows, text encoder id): rows ``product_id, vector, group`` of the labelled products with a live
    text vector in the run's embeddings (photo or not: the bridge maps every kind of text), and the id
    of the text encoder that made those vectors (several joined by '|', which no config matches)."""
    labelled = groups.select(F.trim("product_id").alias("product_id"), F.trim(F.col("group").cast("string")).alias("group")) \
        .where("product_id IS NOT NULL AND group IS NOT NULL").dropDuplicates(["product_id"])
    texts = live_embeddings(embeddings).where(F.col("text_embedding").isNotNull()) \
        .select("product_id", F.col("text_embedding").alias("vector"), "text_encoder")
    rows = labelled.join(texts, "product_id").persist()
    encoder = rows.agg(F.array_sort(F.collect_set("text_encoder")).alias("ids")).first()["ids"]
    return rows.select("product_id", "vector", "group").orderBy("product_id"), ("|".join(encoder) or None)


def missing_ids(modality: str) -> str:
    """What ``ids_not_found`` counts, in words: labelled ids the training could not use."""
    return "not in the catalog" if modality == "text" else "without a photo in the catalog"


def overrides(modality: str, model_dir: str, image: ImageEncoderSettings | None = None) -> list[str]:
    """The ``--set`` overrides that make ``prodsim run``/``embed`` use a fine-tuned model folder; for an
    image model also the preprocessing it was trained with (``image``: the embed.image settings of the
    training), which embedding must repeat."""
    if modality == "text":
        return [f"embed.text.model={model_dir}", "embed.text.revision=null"]
    prepared = [f"embed.image.{k}={json.dumps(v, separators=(',', ':'))}"  # no spaces: one shell word each
                for k, v in training.preprocessing(image).items()] if image else []
    return [f"embed.image.model={model_dir}", "embed.image.weights=null", "embed.image.revision=null", *prepared]


def fine_tune(spark, modality: str, rows: DataFrame, not_found: int, config: ProdsimConfig, model_out: str,
              base: str | None = None, bridge_texts: tuple[DataFrame, str | None] | None = None) -> dict:
    """Train on ``rows`` (from :func:`text_training_rows` / :func:`image_training_rows`) through
    TorchDistributor, write the model folder ``model_out`` with its ``training.json``, and return what
    that file holds plus ``set`` (the config overrides that use the model). ``bridge_texts`` (image
    only; from :func:`bridge_rows`): fit the text bridge too, when ``finetune.image.text_bridge``."""
    import torch
    from pyspark.ml.torch.distributor import TorchDistributor

    settings = config.finetune
    model_out = str(Path(model_out).resolve())
    use_gpu = torch.cuda.is_available() and config.embed.device != "cpu"
    common = {"seed": settings.seed, "mixed_precision": settings.mixed_precision, "device": "cuda" if use_gpu else "cpu",
              "threads": settings.threads or int(spark.sparkContext.defaultParallelism)}
    records = [r.asDict(recursive=True) for r in rows.collect()]  # labels are small: one list for every process
    if modality == "text":
        if len(records) < 2:
            raise InputError(f"{len(records)} labelled pairs name two products with text in this run; fine-tuning "
                             f"needs at least 2 ({not_found} labelled ids have no text in the catalog)",
                             stage="fine-tune")
        base = base or config.embed.text.model
        base_folder = encoders.model_folder(base, "--base" if base != config.embed.text.model else "embed.text.model")
        train_settings = {**settings.text.model_dump(), **common, "max_tokens": config.embed.text.max_tokens}
        function, args = training.train_text, (records, base_folder, model_out, train_settings)
        data = {"pairs": len(records),
                "hard_negatives": sum(len(r["anchor_negatives"]) + len(r["positive_negatives"]) for r in records)}
        fingerprint = encoders.fingerprint(base_folder)
    else:
        if len(records) < 2:
            raise InputError(f"{len(records)} labelled products with an image are in groups of two or more in this "
                             f"run; fine-tuning needs at least 2 ({not_found} labelled ids have no image)",
                             stage="fine-tune")
        image = config.embed.image if base is None else config.embed.image.model_copy(update={"model": base})
        base = f"{image.kind}:{image.model}" + (f" ({image.weights})" if image.weights else "")
        fingerprint = encoders.image_encoder_id(image)  # also checks the model and weights exist
        texts, text_encoder = None, None
        if bridge_texts is not None and settings.image.text_bridge:
            texts = [{"vector": [float(v) for v in r["vector"]], "group": r["group"]} for r in bridge_texts[0].collect()]
            text_encoder = bridge_texts[1]
        train_settings = {**settings.image.model_dump(), **common, "text_encoder": text_encoder}
        function, args = training.train_image, (records, image.model_dump_json(), model_out, train_settings, texts)
        data = {"photos": len(records), "groups": len({r["group"] for r in records}),
                "bridge_texts": len(texts or [])}
    log.info("[fine-tune] %s: %s (%d labelled ids %s), %d process(es) on %s", modality, data, not_found,
             missing_ids(modality),
             settings.num_processes, common["device"])
    distributor = TorchDistributor(num_processes=settings.num_processes, local_mode=settings.local_mode,
                                   use_gpu=use_gpu)
    # the training processes print to stdout: keep it for the command's own output (--json)
    with contextlib.redirect_stdout(sys.stderr):
        figures = distributor.run(function, *args)
    report = {"modality": modality, "model_dir": model_out, "base_model": base, "base_fingerprint": fingerprint,
              **data, "ids_not_found": not_found, "seed": settings.seed,
              "settings": {k: v for k, v in train_settings.items() if k != "device"}, **figures}
    (Path(model_out) / TRAINING_JSON).write_text(json.dumps(report, indent=2), encoding="utf-8")
    log.info("[fine-tune] loss per epoch %s in %.0f s -> %s", figures["loss_per_epoch"], figures["train_s"], model_out)
    return {**report, "set": overrides(modality, model_out, image if modality == "image" else None)}
