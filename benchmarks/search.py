"""``prodsim bench search``: batch search on Spark and the single-query API against exact search, on
clustered synthetic vectors (as ``bench join``), and search quality on the labelled datasets.

Synthetic: N products and Q queries from the same clusters (new noise), text vectors only. Ours: the
index cells of a join plan, each query probing ``search.probe`` cells; batch = :func:`search_products`
on Spark over all Q queries; single = :class:`Searcher` answering queries one at a time after loading.
Exact: every product scored by blocked numpy matrix multiply on the driver, for a sample of queries,
time extrapolated to all Q (what searching without an index costs). Recall@k is ours against exact on
that sample.

Quality (``--dataset``): real queries over a real catalog, through the notebook API (the same scoring
as the batch job): grocery, one query per product (its name with its kind, e.g. "Golden Delicious
Apple", and its iconic studio photo) over a split's listings, its listings relevant; amazon-google,
each matched Google title over the Amazon catalog. Ours (``search.probe`` cells), the same fused
scoring over every product (what the index costs), and a baseline: grocery, plain exact search with the
mean of text and image cosine over what the listing has; amazon-google, a character TF-IDF ranking.
"""
from __future__ import annotations

import csv
import logging
import statistics
import time
from pathlib import Path

import numpy as np

from prodsim_spark import fusion, join
from prodsim_spark.config import FusionWeights, ProdsimConfig
from prodsim_spark.index import build_index
from prodsim_spark.search import Searcher, search_products

from benchmarks import datasets
from benchmarks.join import clustered_vectors, synthetic_frame, synthetic_products

log = logging.getLogger(__name__)


QUERY_STREAM = (1,)  # queries: other points of the products' clusters


def query_vectors(start: int, end: int, d: int, seed: int, n_products: int, queries: int) -> np.ndarray:
    """Queries [start, end) of ``queries``: points of the products' clusters with fresh noise."""
    return clustered_vectors(start, end, d, seed, n_products, rows=queries, stream=QUERY_STREAM)


def synthetic_queries(spark, n_products: int, queries: int, d: int, seed: int = 7):
    """A DataFrame of Q query vectors (:func:`query_vectors`), generated inside Spark tasks."""
    return synthetic_frame(spark, queries, "query_id", "q",
                           lambda lo, hi: query_vectors(lo, hi, d, seed, n_products, queries))


def text_products(ids: np.ndarray, x: np.ndarray) -> fusion.Products:
    """Products with a text vector only (no brand, category, price or source)."""
    n = len(ids)
    return fusion.Products(ids, {"text": x}, {"text": np.ones(n, bool)}, np.full(n, -1), np.full(n, -1),
                           np.full(n, np.nan), np.full(n, -1))


def exact_search(x: np.ndarray, queries: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """(queries, k) indices of each query's k most similar rows of x, by blocked matrix multiply."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), block):
        sims = queries[s:s + block] @ x.T
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, axis=1), axis=1)
        out[s:s + block] = np.take_along_axis(part, order, axis=1)
    return out


def bench_search(spark, config: ProdsimConfig, *, n: int = 100_000, queries: int = 100_000, d: int = 384,
                 sample: int = 1000, single: int = 300) -> dict:
    from pyspark.sql import functions as F

    weights = FusionWeights.only(text=1.0)
    settings = config.join.replaced(weights=weights)
    search = config.search
    k = search.k
    products = synthetic_products(spark, n, d).cache()
    products.count()
    started = time.perf_counter()
    cells = join.plan_cells(products, settings)
    plan_s = time.perf_counter() - started
    tuned = config.model_copy(update={"join": settings})
    index = build_index(cells.centroids, None, cells.shape.dims, tuned, "synthetic", None)

    x, q = clustered_vectors(0, n, d, 7, n), query_vectors(0, queries, d, 7, n, queries)  # what the Spark tasks make
    rows = np.sort(np.random.default_rng(3).choice(queries, size=min(sample, queries), replace=False))
    timings = []
    for _ in range(3):  # a sample of a few hundred queries takes ~1 s: the median of 3 steadies it
        started = time.perf_counter()
        exact = exact_search(x, q[rows], k)
        timings.append(time.perf_counter() - started)
    exact_s = statistics.median(timings) * queries / len(rows)

    batch = synthetic_queries(spark, n, queries, d).cache()
    batch.count()
    started = time.perf_counter()
    found = search_products(batch, products, index, search).persist()
    answered = found.count()
    batch_s = time.perf_counter() - started
    wanted = [f"q{i:07d}" for i in rows]
    got = {r["query_id"]: r["ids"] for r in found.where(F.col("query_id").isin(wanted))
           .select("query_id", F.col("results.product_id").alias("ids")).collect()}
    hits = sum(len({f"p{j:07d}" for j in truth} & set(got.get(wanted[i], [])[:k])) for i, truth in enumerate(exact))
    found.unpersist()

    # the notebook API: load once (here: the synthetic products, already in memory), then one query at a time
    p = text_products(np.array([f"p{i:07d}" for i in range(n)], dtype=object), x)
    started = time.perf_counter()
    searcher = Searcher(index, p, {}, {}, tuned)
    load_s = time.perf_counter() - started
    latencies, single_hits = [], 0
    for i, row in enumerate(rows[:single]):
        one = text_products(np.array(["q"], dtype=object), q[row][None, :])
        started = time.perf_counter()
        answer = searcher.search_vectors(one, k=k)
        latencies.append((time.perf_counter() - started) * 1000)
        single_hits += len({f"p{j:07d}" for j in exact[i]} & set(answer["product_id"]))
    batch.unpersist()
    products.unpersist()
    out = {"n": n, "queries": queries, "k": k, "d": d, "probe": search.probe, "cells": int(len(cells.centroids)),
           "plan_s": round(plan_s, 2),
           "batch_s": round(batch_s, 2), "batch_queries_per_s": round(answered / batch_s, 1),
           "exact_s": round(exact_s, 2), "exact_queries_per_s": round(queries / exact_s, 1),
           "exact_sample": len(rows), "batch_speedup_vs_exact": round(exact_s / batch_s, 2),
           "recall_at_k": round(hits / (len(rows) * k), 4),
           "single_load_s": round(load_s, 2), "single_queries": len(latencies),
           "single_recall_at_k": round(single_hits / (len(latencies) * k), 4),
           "single_p50_ms": round(statistics.median(latencies), 2),
           "single_p95_ms": round(float(np.percentile(latencies, 95)), 2)}
    log.info("[bench search] %s", out)
    return out


# --------------------------------------------------------------------------------------------
# quality on labelled data


def ranking_metrics(ranked: list, relevant: list[set], k: int) -> dict:
    """R@1 (the first result is relevant), R@k (one of the first k is), P@k (relevant share of the first
    k, over k) and MRR@k (1 / rank of the first relevant result in the first k, else 0)."""
    first = [next((i for i, x in enumerate(list(r)[:k]) if x in rel), None) for r, rel in zip(ranked, relevant)]
    n = len(ranked)
    return {"queries": n,
            "recall@1": round(sum(f == 0 for f in first) / n, 4),
            f"recall@{k}": round(sum(f is not None for f in first) / n, 4),
            f"precision@{k}": round(sum(len(set(list(r)[:k]) & rel) for r, rel in zip(ranked, relevant)) / (n * k), 4),
            "mrr": round(sum(1 / (f + 1) for f in first if f is not None) / n, 4)}


def exact_ranking(scores: np.ndarray, ids: np.ndarray, k: int) -> list:
    """The ids of the k best scores of each row (NaN or -inf: never ranked)."""
    scores = np.where(np.isfinite(scores), scores, -np.inf)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[ids[j] for j in row if np.isfinite(scores[i, j])] for i, row in enumerate(top)]


def mean_cosine(q: fusion.Products, p: fusion.Products) -> np.ndarray:
    """(queries, products): the mean of text and image cosine over the modalities both have (the plain
    exact search the issue measured); -inf where they share none."""
    total = np.zeros((len(q), len(p)))
    count = np.zeros((len(q), len(p)))
    for m in ("text", "image"):
        if m in q.vectors and m in p.vectors:
            both = q.has[m][:, None] & p.has[m][None, :]
            total += np.where(both, q.vectors[m] @ p.vectors[m].T, 0.0)
            count += both
    return np.where(count > 0, total / np.maximum(count, 1), -np.inf)


def stack_queries(rows: list[fusion.Products]) -> fusion.Products:
    """Single-row query products stacked into one block."""
    return fusion.Products(np.concatenate([r.ids for r in rows]),
                           {m: np.concatenate([r.vectors[m] for r in rows]) for m in rows[0].vectors},
                           {m: np.concatenate([r.has[m] for r in rows]) for m in rows[0].has},
                           *(np.concatenate([getattr(r, f) for r in rows]) for f in ("brand", "category", "log_price",
                                                                                     "source")))


def query_text(name: str, kind: str) -> str:
    """A shopper's words for a grocery product: its name with its kind ("Golden Delicious Apple"), the
    kind left out when the name already says it ("Bravo Apple Juice")."""
    name, kind = name.replace("-", " "), kind.replace("-", " ")
    return name if kind.lower() in name.lower() else f"{name} {kind}"


def grocery_queries(src: Path, groups_csv: Path) -> list[dict]:
    """One query per product of the split: text, its iconic photo, the ids of its listings."""
    members: dict[int, set] = {}
    for r in csv.DictReader(open(groups_csv, encoding="utf-8")):
        members.setdefault(int(r["group"]), set()).add(r["product_id"])
    out = []
    for c in csv.DictReader(open(src / "dataset" / "classes.csv", encoding="utf-8")):
        fine = int(c["Class ID (int)"])
        if fine in members:
            out.append({"query_id": f"g{fine}", "relevant": members[fine],
                        "text": query_text(c["Class Name (str)"], c["Coarse Class Name (str)"]),
                        "image": str(src / "dataset" / c["Iconic Image Path (str)"].lstrip("/"))})
    return out


def _rank_all(searcher: Searcher, q: fusion.Products, k: int, probe: int | None = None) -> list:
    return [list(searcher.search_vectors(q.take([i]), k=k, probe=probe)["product_id"]) for i in range(len(q))]


def bench_search_quality(spark, config: ProdsimConfig, dataset: str, data: Path, work: Path, *,
                         split: str = "train", tuned_image: bool = False) -> dict:
    """Search quality on ``dataset`` (see the module docstring): per query mode, ours, exact fused and
    the baseline, with R@1, R@k, P@k and MRR at k = ``search.k``. ``tuned_image`` (grocery): see
    :func:`bench_tuned_image_search`."""
    if tuned_image:
        if dataset != "grocery":
            raise ValueError("a tuned image encoder is measured on the grocery listings only")
        return bench_tuned_image_search(spark, config, data, work, split=split)
    if dataset == "grocery":
        catalog, _ = datasets.grocery_catalog(data, work / f"listings-{split}", split)
        queries = grocery_queries(data, catalog.parent / "groups.csv")
    else:
        catalog, queries = datasets.amazon_catalog_and_google_queries(data, work / "data")
    out = measure_search(spark, config, dataset, catalog, queries, work / "run")
    if dataset == "grocery":
        out["split"] = split
    return out


def measure_search(spark, config: ProdsimConfig, dataset: str, catalog: Path, queries: list[dict], run: Path) -> dict:
    """``catalog`` run (ingest, embed, neighbours) into ``run``, then every query through the notebook
    API: ours, exact fused and the dataset's baseline, per query mode."""
    k = config.search.k
    if dataset == "grocery":
        modes = {"text": lambda q: (q["text"], None), "image": lambda q: (None, q["image"]),
                 "text+image": lambda q: (q["text"], q["image"])}
    else:
        modes = {"text": lambda q: (q["text"], None)}
    tables = datasets.run_catalog(spark, catalog, run, config)
    searcher = Searcher.load(spark, tables.output, config)
    relevant = [q["relevant"] for q in queries]
    out = {"dataset": dataset, "k": k, "probe": config.search.probe, "products": len(searcher.products),
           "cells": int(len(searcher.index.centroids)), "methods": {}}
    for mode, parts in modes.items():
        started = time.perf_counter()
        q = stack_queries([searcher.embed_query(*parts(one)) for one in queries])
        embed_s = time.perf_counter() - started
        started = time.perf_counter()
        ours = _rank_all(searcher, q, k)
        search_ms = (time.perf_counter() - started) * 1000 / len(queries)
        methods = {"ours": ranking_metrics(ours, relevant, k),
                   "exact_fused": ranking_metrics(_rank_all(searcher, q, k, probe=len(searcher.index.centroids)),
                                                  relevant, k)}
        if dataset == "grocery":
            methods["mean_cosine_exact"] = ranking_metrics(
                exact_ranking(mean_cosine(q, searcher.products), searcher.products.ids, k), relevant, k)
        else:
            methods["tfidf"] = ranking_metrics(tfidf_ranking(queries, searcher, k), relevant, k)
        methods["ours"].update(embed_ms_per_query=round(embed_s * 1000 / len(queries), 1),
                               search_ms_per_query=round(search_ms, 2))
        out["methods"][mode] = methods
    log.info("[bench search %s] %s", dataset, out)
    return out


def halves(catalog: Path, groups: Path, out: Path) -> dict[str, tuple[Path, Path]]:
    """The listings of ``catalog`` in two halves by their id (a hash: no product's listings all on one
    side), each written as (catalog, groups) under ``out``/tune and ``out``/search."""
    rows = list(csv.DictReader(open(catalog, encoding="utf-8")))
    group = {r["product_id"]: r["group"] for r in csv.DictReader(open(groups, encoding="utf-8"))}
    written = {}
    for side, parity in (("tune", 0), ("search", 1)):
        folder = out / side
        mine = [r for r in rows if int(r["product_id"][1:], 16) % 2 == parity]  # ids are "L" + hex digits
        datasets.write_catalog(mine, folder)
        with open(folder / "groups.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["product_id", "group"])
            w.writerows((r["product_id"], group[r["product_id"]]) for r in mine)
        written[side] = (folder / "catalog.csv", folder / "groups.csv")
    return written


def bench_tuned_image_search(spark, config: ProdsimConfig, data: Path, work: Path, *, split: str = "train") -> dict:
    """Search with a fine-tuned image encoder, as a shop that tuned it on its own listings would run it,
    without measuring on what it trained on: the split's listings in two halves by id; the image
    encoder is fine-tuned (``prodsim fine-tune --modality image``, the configured settings) on one half's
    groups, and the other half is the catalog searched, with the pretrained and with the tuned encoder
    (new photos of known products; the queries' studio photos and names are never trained on). With
    ``finetune.image.text_bridge`` the tuned half is embedded (text only) and the bridge fitted on it."""
    from prodsim_spark import finetune, io
    from prodsim_spark.config import with_overrides
    from prodsim_spark.pipeline import run_embed, run_ingest
    from prodsim_spark.tables import CATALOG, EMBEDDINGS, RunTables

    catalog, _ = datasets.grocery_catalog(data, work / f"listings-{split}", split)
    parts = halves(catalog, catalog.parent / "groups.csv", work / f"halves-{split}")
    # the halves name the listings' photos where make_listings.py put them, beside the whole catalog
    config = with_overrides(config, [f"ingest.image_root={catalog.parent.resolve()}"])
    tune_catalog, tune_groups = parts["tune"]
    tune_run = RunTables.at(str(work / "tune-run"))
    ingested = run_ingest(spark, str(tune_catalog), tune_run.output, config)
    labelled = io.read_groups(spark, str(tune_groups))
    rows, not_found = finetune.image_training_rows(tune_run.read(spark, CATALOG), labelled)
    bridge_texts = None
    if config.finetune.image.text_bridge:  # the text bridge is fitted on the tuned half's text vectors
        run_embed(spark, tune_run.output, with_overrides(config, ["embed.image.enabled=false"]), ingested)
        bridge_texts = finetune.bridge_rows(tune_run.read(spark, EMBEDDINGS), labelled)
    report = finetune.fine_tune(spark, "image", rows, not_found, config, str(work / "models" / "image"),
                                bridge_texts=bridge_texts)
    search_catalog, search_groups = parts["search"]
    queries = grocery_queries(data, search_groups)
    out = {"dataset": "grocery", "split": split, "tuned_on": str(tune_catalog), "searched": str(search_catalog),
           "training": {key: report[key] for key in ("train_s", "photos", "groups", "loss_per_epoch", "ids_not_found")
                        if key in report}, "set": report["set"], "encoders": {}}
    for label, settings in (("pretrained", config), ("fine-tuned image", with_overrides(config, report["set"]))):
        out["encoders"][label] = measure_search(spark, settings, "grocery", search_catalog, queries,
                                                work / f"search-run-{label.split()[0]}")
    return out


def tfidf_ranking(queries: list[dict], searcher: Searcher, k: int) -> list:
    """Character TF-IDF (char_wb 3-5 grams, sublinear tf, as the quality benchmark's baseline) of each
    query's text against the catalog's titles, exact cosine."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    ids = searcher.products.ids
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)
    x = vectorizer.fit_transform([searcher.titles.get(i) or "" for i in ids])
    sims = (vectorizer.transform([q["text"] for q in queries]) @ x.T).toarray()
    return exact_ranking(sims, ids, k)
