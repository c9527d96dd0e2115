"""``prodsim bench fine-tune``: pretrained vs fine-tuned encoders, measured on products the training
never saw, in one run.

* amazon-google: two folds by connected component of the match pairs (a product, and every product
  matched to it, is in one fold only). For each fold: fine-tune the text encoder on that fold's pairs
  (hard negatives from the pretrained run's neighbour lists), embed the whole pooled catalog with it,
  and measure with the *other* fold's products as queries, over the whole catalog. Content only
  (``join.same_source_penalty=0``) and the default; the TF-IDF baseline on the same queries; and, for
  pretrained and fine-tuned alike, the weights and penalty fitted (``fit-weights``) on the training
  fold's pairs, as a user with those labels would do next.
* grocery: the train split's listings (the products the shop knows) and the val split's (new photos
  of them) in one catalog; fine-tune the image encoder (and, with ``--modalities text,image``, the text
  encoder) on the train listings' groups, measure with the val listings as queries: image alone, text
  alone and fused, pretrained and fine-tuned.

Figures are medians over the folds (amazon-google), plus each fold's, and the training time and
pairs (or images) per second of each fine-tune.
"""
from __future__ import annotations

import logging
import statistics
from pathlib import Path

from pyspark.sql import functions as F

from prodsim_spark import evaluate, finetune, groups, io, join, weights
from prodsim_spark.config import FusionWeights, ProdsimConfig, with_overrides
from prodsim_spark.pipeline import run_products
from prodsim_spark.tables import CATALOG, EMBEDDINGS, NEIGHBOURS, live_embeddings

from benchmarks import baselines, datasets

log = logging.getLogger(__name__)

HUBNESS = 0.5  # join.hubness measured beside the default (0: off)
DEFAULTS = Path(__file__).with_name("quality.yaml")  # lists of 20, as bench quality (layered under --conf/--set)
TRAINING_KEYS = ("train_s", "pairs_per_s", "images_per_s", "pairs", "hard_negatives", "photos", "groups",
                 "loss_per_epoch", "ids_not_found")


def _measure(products, settings, pairs, queries, cutoffs) -> dict:
    lists = join.find_neighbours(products, settings)
    return evaluate.metrics(lists, pairs, queries, cutoffs=cutoffs)


def _training(report: dict) -> dict:
    return {k: report[k] for k in TRAINING_KEYS if k in report}


def _median(folds: list[dict]) -> dict:
    out = {}
    for method in folds[0]:
        keys = [k for k in folds[0][method] if isinstance(folds[0][method][k], (int, float))]
        out[method] = {k: round(statistics.median(f[method][k] for f in folds), 4) for k in keys}
    return out


def bench_amazon_google(spark, config: ProdsimConfig, data: Path, work: Path) -> dict:
    catalog_csv, pairs_csv = datasets.build("amazon-google", data, work / "data")
    pairs = io.read_pairs(spark, str(pairs_csv)).persist()
    pretrained = datasets.run_catalog(spark, catalog_csv, work / "pretrained", config)
    catalog = pretrained.read(spark, CATALOG)
    neighbours = pretrained.read(spark, NEIGHBOURS)
    # folds by connected component: no product, and no product of a matched group, on both sides
    fold_of = groups.label_groups(pairs).select("product_id", (F.abs(F.xxhash64("group")) % 2).alias("fold")).persist()
    cutoffs = config.evaluate.cutoffs
    content_only = config.join.replaced(same_source_penalty=0.0)
    base_products = run_products(spark, pretrained.output, config)
    base_lists = evaluate.ablations(base_products, config)  # candidates (hard negatives) for the weight fits
    tfidf_lists = baselines.tfidf_baseline(catalog, config).persist()  # one catalog: the same lists in both folds
    folds, trainings = [], []
    for fold in (0, 1):
        in_fold = fold_of.where(F.col("fold") == fold).select("product_id")
        train_pairs = (pairs.join(in_fold.withColumnRenamed("product_id", "left_id"), "left_id", "left_semi")
                       .join(in_fold.withColumnRenamed("product_id", "right_id"), "right_id", "left_semi"))
        queries = fold_of.where(F.col("fold") != fold).select("product_id")
        rows, not_found = finetune.text_training_rows(catalog, train_pairs, neighbours, config)
        report = finetune.fine_tune(spark, "text", rows, not_found, config, str(work / "models" / f"text-fold{fold}"))
        trainings.append(_training(report))
        tuned_config = with_overrides(config, report["set"])
        tuned = datasets.run_catalog(spark, catalog_csv, work / f"tuned-fold{fold}", tuned_config, neighbours=False)
        tuned_products = run_products(spark, tuned.output, tuned_config)
        methods = {
            "tf-idf baseline": evaluate.metrics(tfidf_lists, pairs, queries, cutoffs=cutoffs),
            "pretrained, content only": _measure(base_products, content_only, pairs, queries, cutoffs),
            "fine-tuned, content only": _measure(tuned_products, content_only, pairs, queries, cutoffs),
            "pretrained text alone, content only": _measure(
                base_products, content_only.replaced(weights=FusionWeights.only(text=1.0)), pairs, queries, cutoffs),
            "fine-tuned text alone, content only": _measure(
                tuned_products, content_only.replaced(weights=FusionWeights.only(text=1.0)), pairs, queries, cutoffs),
            "pretrained, default": _measure(base_products, config.join, pairs, queries, cutoffs),
            "fine-tuned, default": _measure(tuned_products, config.join, pairs, queries, cutoffs),
        }
        # what a user with these labels does next: fit the weights (and penalty) on the training fold's
        # pairs; a fine-tuned dense channel deserves a weight the pretrained one did not
        tuned_lists = evaluate.ablations(tuned_products, config)
        for label, products, lists in (("pretrained", base_products, base_lists),
                                       ("fine-tuned", tuned_products, tuned_lists)):
            fit = weights.fit_on_lists(products, lists, train_pairs, config, hubness=False)
            fitted = config.join.replaced(weights=fit["weights"], same_source_penalty=fit["same_source_penalty"])
            methods[f"{label}, fitted weights, content only"] = _measure(
                products, fitted.replaced(same_source_penalty=0.0), pairs, queries, cutoffs)
            methods[f"{label}, fitted weights and penalty"] = _measure(products, fitted, pairs, queries, cutoffs)
            trainings[-1][f"{label} fitted weights"] = {"weights": fit["weights"],
                                                        "same_source_penalty": fit["same_source_penalty"]}
            # the same fit with the hub correction (join.hubness) chosen by two-fold cross-validation
            fit = weights.fit_on_lists(products, lists, train_pairs, config)
            hub_fitted = config.join.replaced(weights=fit["weights"], same_source_penalty=fit["same_source_penalty"],
                                              hubness=fit["hubness"])
            methods[f"{label}, fitted weights and hub correction, content only"] = _measure(
                products, hub_fitted.replaced(same_source_penalty=0.0), pairs, queries, cutoffs)
            methods[f"{label}, fitted weights, penalty and hub correction"] = _measure(
                products, hub_fitted, pairs, queries, cutoffs)
            trainings[-1][f"{label} fitted weights, penalty and hub correction"] = {
                k_: fit[k_] for k_ in ("weights", "same_source_penalty", "hubness", "hubness_r1")}
            # the hub correction (join.hubness, off by default) on the same lists' settings
            for name, settings in ((f"{label}, content only", content_only), (f"{label}, default", config.join),
                                   (f"{label}, fitted weights and penalty", fitted)):
                methods[f"{name}, hub correction {HUBNESS}"] = _measure(
                    products, settings.replaced(hubness=HUBNESS), pairs, queries, cutoffs)
        for df in tuned_lists.values():
            df.unpersist()
        tuned_products.unpersist()
        for name, m in methods.items():
            log.info("[bench fine-tune] fold %d %s: %s", fold, name, m)
        folds.append(methods)
    for df in [*base_lists.values(), tfidf_lists]:
        df.unpersist()
    base_products.unpersist()
    return {"dataset": "amazon-google", "k": config.join.k, "methods": _median(folds), "folds": folds,
            "training": trainings}


def bench_grocery(spark, config: ProdsimConfig, data: Path, work: Path, modalities: tuple[str, ...] = ("image",)
                  ) -> dict:
    catalog_csv, _, pairs_csv, val_ids = datasets.grocery_known_products(data, work / "data")
    train_groups = work / "data" / "train" / "groups.csv"
    pairs = io.read_pairs(spark, str(pairs_csv)).persist()
    queries = spark.createDataFrame([(i,) for i in val_ids], "product_id string")
    pretrained = datasets.run_catalog(spark, catalog_csv, work / "pretrained", config)
    catalog = pretrained.read(spark, CATALOG)
    neighbours = pretrained.read(spark, NEIGHBOURS)
    overrides, trainings = [], {}
    for modality in modalities:
        if modality == "text":
            rows, not_found = finetune.text_training_rows(catalog, io.read_pairs(spark, str(train_groups)), neighbours,
                                                          config)
            bridge_texts = None
        else:
            labelled = io.read_groups(spark, str(train_groups))
            rows, not_found = finetune.image_training_rows(catalog, labelled)
            bridge_texts = finetune.bridge_rows(pretrained.read(spark, EMBEDDINGS), labelled)
        report = finetune.fine_tune(spark, modality, rows, not_found, config, str(work / "models" / modality),
                                    bridge_texts=bridge_texts)
        trainings[modality] = _training(report)
        overrides += report["set"]
    tuned_config = with_overrides(config, overrides)
    tuned = datasets.run_catalog(spark, catalog_csv, work / "tuned", tuned_config, neighbours=False)
    cutoffs = config.evaluate.cutoffs
    train_pairs = io.read_pairs(spark, str(train_groups)).persist()
    methods, fitted = {}, {}
    for label, run, products in (("pretrained", pretrained, run_products(spark, pretrained.output, config)),
                                 ("fine-tuned", tuned, run_products(spark, tuned.output, tuned_config))):
        # image alone also over the val listings that have a photo: a text-only listing cannot be a query
        # of an image-only search, and counts as a miss over all val listings (15% of them). From the
        # embeddings table: in the join's input a text bridge gives text-only listings an image vector too
        photos = live_embeddings(run.read(spark, EMBEDDINGS)).where(F.col("image_embedding").isNotNull()).select("product_id")
        with_photo = queries.join(photos, "product_id", "left_semi")
        for name, component_weights, query_sets in (
                ("image alone", FusionWeights.only(image=1.0), {"": queries, ", listings with a photo": with_photo}),
                ("text alone", FusionWeights.only(text=1.0), {"": queries}),
                ("fused", config.join.weights, {"": queries})):
            lists = join.find_neighbours(products, config.join.replaced(weights=component_weights)).persist()
            for suffix, measured in query_sets.items():
                methods[f"{label} {name}{suffix}"] = evaluate.metrics(lists, pairs, measured, cutoffs=cutoffs)
                log.info("[bench fine-tune] %s %s%s: %s", label, name, suffix, methods[f"{label} {name}{suffix}"])
            lists.unpersist()
        # the weights fitted on the train listings' pairs (the val listings' labels are never seen)
        lists = evaluate.ablations(products, config)
        fit = weights.fit_on_lists(products, lists, train_pairs, config, hubness=False)
        methods[f"{label} fused, fitted weights"] = _measure(products, config.join.replaced(weights=fit["weights"]),
                                                             pairs, queries, cutoffs)
        fitted[label] = fit["weights"]
        log.info("[bench fine-tune] %s fused, fitted weights %s: %s", label, fit["weights"],
                 methods[f"{label} fused, fitted weights"])
        for df in lists.values():
            df.unpersist()
        products.unpersist()
    return {"dataset": "grocery", "fitted_weights": fitted, "k": config.join.k, "queries": len(val_ids), "modalities": list(modalities),
            "methods": methods, "training": trainings}
