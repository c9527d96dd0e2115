"""Match quality: ablations, learned weights and the labelled benchmarks (``prodsim evaluate``,
``prodsim fit-weights``, ``prodsim bench quality``).

All of them work on a run's tables (``<output>/catalog``, ``embeddings``; see
:mod:`prodsim_spark.pipeline`): a neighbours list is recomputed per weight setting with the same join
stage ``prodsim run`` uses, so what is measured is what users get.
"""
from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from prodsim_spark import evaluate, fusion, io, join, lexical, pipeline, weights
from prodsim_spark.config import ProdsimConfig
from prodsim_spark.errors import CatalogError

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# inputs


def read_pairs(spark: SparkSession, path: str, left_col: str | None = None, right_col: str | None = None
               ) -> DataFrame:
    """Labelled match pairs as (left_id, right_id) from a CSV with a header: a pairs file (default: its
    first two columns), or a groups file with a ``group`` column (every two products of one group match)."""
    if not Path(path).exists():
        raise CatalogError(f"evaluate: pairs file {path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    df = spark.read.option("header", True).csv(path)
    if "group" in header and not (left_col and right_col):
        ids = left_col or next((c for c in header if c != "group"), None)
        if ids not in header:
            raise CatalogError(f"evaluate: groups file {path} has no id column {ids!r} (columns: {header})")
        members = df.select(F.trim(F.col(f"`{ids}`")).alias("id"), F.trim(F.col("group")).alias("g")) \
            .where("id IS NOT NULL AND g IS NOT NULL")
        a, b = members.alias("a"), members.alias("b")
        return a.join(b, (F.col("a.g") == F.col("b.g")) & (F.col("a.id") < F.col("b.id"))) \
            .select(F.col("a.id").alias("left_id"), F.col("b.id").alias("right_id"))
    left_col, right_col = left_col or (header[0] if header else None), right_col or (header[1] if len(header) > 1 else None)
    missing = [c for c in (left_col, right_col) if c not in header]
    if missing:
        raise CatalogError(f"evaluate: pairs file {path} has no column {missing[0]!r} (columns: {header})")
    return df.select(F.trim(F.col(f"`{left_col}`")).alias("left_id"), F.trim(F.col(f"`{right_col}`")).alias("right_id"))


def run_products(spark: SparkSession, output: str, config: ProdsimConfig) -> DataFrame:
    """The join's input for a finished run (catalog + embeddings + lexical channel), persisted."""
    return pipeline.join_products(io.read_delta(spark, pipeline.table_path(output, "catalog")),
                                  io.read_delta(spark, pipeline.table_path(output, "embeddings")), config,
                                  with_lexical=True)


def _weights_only(config: ProdsimConfig, keep: dict[str, float], k: int):
    settings = config.join.model_copy(update={"k": k, "same_source_penalty": 0.0})
    settings.weights = settings.weights.model_copy(update={c: keep.get(c, 0.0) for c in fusion.COMPONENTS})
    return settings


def ablations(products: DataFrame, config: ProdsimConfig, k: int = 20) -> dict[str, DataFrame]:
    """Neighbour lists per method: each vector component alone (where the catalog has it, similarity
    only), fused as configured, and, for a catalog of several sources, fused without the same-source
    penalty (what the penalty adds)."""
    dims, _, several_sources = join._dims(products)
    out = {}
    for name in fusion.DENSE:
        if dims.get(name) and config.join.weights.model_dump()[name] > 0:
            out[f"{name} alone"] = join.find_neighbours(products, _weights_only(config, {name: 1.0}, k)).persist()
    if several_sources and config.join.same_source_penalty > 0:
        out["fused, no same-source penalty"] = join.find_neighbours(
            products, config.join.model_copy(update={"k": k, "same_source_penalty": 0.0})).persist()
    out["fused"] = join.find_neighbours(products, config.join.model_copy(update={"k": k})).persist()
    return out


def tfidf_baseline(catalog: DataFrame, config: ProdsimConfig, k: int = 20, same_source_penalty: float = 0.0
                   ) -> DataFrame:
    """A plain character n-gram TF-IDF (scikit-learn, char_wb 3-5 grams, sublinear tf, exact cosine on
    the driver) over the same fields as the lexical channel: the baseline the issue names. With
    ``same_source_penalty``, same-source pairs score that much lower, as in the join: the baseline
    given the same knowledge of sources as the fused score."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    live = catalog.where("status != 'rejected'")
    pdf = lexical.lexical_text(live, config.lexical).join(live.select("product_id", "source"), "product_id").toPandas()
    x = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True).fit_transform(
        pdf["lexical_text"].fillna(""))
    ids = pdf["product_id"].to_numpy(dtype=object)
    source = pd.factorize(pdf["source"], use_na_sentinel=True)[0]  # -1: no source
    rows = []
    for start in range(0, len(ids), 1000):
        sims = (x[start:start + 1000] @ x.T).toarray()
        sims -= same_source_penalty * fusion.same_source(source[start:start + 1000, None], source[None, :])
        r, c = fusion.top_k(sims, ids[start:start + 1000], ids, k)
        bounds = np.searchsorted(r, np.arange(len(sims) + 1))
        for i in range(len(sims)):
            sel = c[bounds[i]:bounds[i + 1]]
            rows.append((ids[start + i], [(ids[j], float(sims[i, j])) for j in sel]))
    spark = catalog.sparkSession
    return spark.createDataFrame(rows, "product_id string, neighbours array<struct<product_id:string,score:float>>")


# --------------------------------------------------------------------------------------------
# learned weights


def _candidates(lists: dict[str, DataFrame], pairs: DataFrame) -> pd.DataFrame:
    """(query, candidate, positive) for labelled queries: the union of every method's neighbours."""
    truth = evaluate.directed_pairs(pairs)
    queries = truth.select("query").distinct()
    union = None
    for df in lists.values():
        c = df.select(F.col("product_id").alias("query"), F.explode("neighbours.product_id").alias("match"))
        union = c if union is None else union.unionByName(c)
    cand = union.join(queries, "query", "left_semi").unionByName(
        truth.join(union.select("query").distinct(), "query", "left_semi")).distinct()
    labelled = cand.join(truth.withColumn("positive", F.lit(True)), ["query", "match"], "left")
    return labelled.fillna(False, ["positive"]).toPandas()


def _products_frame(products: DataFrame, ids: pd.Series) -> fusion.Products:
    spark = products.sparkSession
    wanted = spark.createDataFrame(pd.DataFrame({"product_id": ids.unique()}))
    pdf = products.join(wanted, "product_id", "left_semi").toPandas()
    for m in fusion.DENSE:
        if f"{m}_embedding" not in pdf:
            pdf[f"{m}_embedding"] = None
    dims = {m: max((len(v) for v in pdf[f"{m}_embedding"] if v is not None), default=0) for m in fusion.DENSE}
    return join._from_arrays(pdf, dims)


def fit_weights(products: DataFrame, lists: dict[str, DataFrame], pairs: DataFrame, config: ProdsimConfig) -> dict:
    """Fit join.weights on labelled pairs (see :mod:`prodsim_spark.weights`); returns the fit report."""
    cand = _candidates(lists, pairs)
    if cand.empty:
        raise CatalogError("fit-weights: no labelled pair names two products of this run")
    p = _products_frame(products, pd.concat([cand["query"], cand["match"]]))
    index = pd.Index(p.ids)
    qi, mi = index.get_indexer(cand["query"]), index.get_indexer(cand["match"])
    ok = (qi >= 0) & (mi >= 0)
    a, b = p.take(qi[ok]), p.take(mi[ok])
    sims, avail = weights.pair_components(a, b, config.join.price_scale)
    return weights.fit(sims, avail, qi[ok], cand["positive"].to_numpy(dtype=bool)[ok],
                       config.join.weights.model_dump(), same=fusion.same_source(a.source, b.source),
                       start_penalty=config.join.same_source_penalty)


def cross_validated(products: DataFrame, lists: dict[str, DataFrame], pairs: DataFrame, config: ProdsimConfig,
                    k: int = 20) -> tuple[dict, list[dict]]:
    """Two folds over the *products*: fit on the pairs whose two products are both in one fold, measure
    on the other fold's products (every pair that names one of them is left out of fitting, so no
    label of a measured product is seen); metrics averaged over the two folds."""
    fold = lambda col: F.abs(F.xxhash64(col)) % 2  # noqa: E731
    results, fits = [], []
    for held_out in (0, 1):
        train = pairs.where((fold("left_id") != held_out) & (fold("right_id") != held_out))
        report = fit_weights(products, lists, train, config)
        settings = config.join.model_copy(update={"k": k, "same_source_penalty": report["same_source_penalty"]})
        settings.weights = settings.weights.model_copy(update=report["weights"])
        found = join.find_neighbours(products, settings)
        queries = products.select("product_id").where(fold("product_id") == held_out)
        results.append(evaluate.metrics(found, pairs, queries))
        fits.append(report)
    keys = [k_ for k_ in results[0] if k_ not in ("queries", "pairs_unknown")]
    merged = {k_: round(float(np.mean([r[k_] for r in results])), 4) for k_ in keys}
    merged["queries"] = sum(r["queries"] for r in results)
    return merged, fits


# --------------------------------------------------------------------------------------------
# benchmark datasets


def amazon_google_catalog(src: Path, out: Path) -> tuple[Path, Path]:
    """Amazon.csv + GoogleProducts.csv pooled into one catalog (ids prefixed amazon:/google:), and
    perfect_mapping.csv as pairs.csv. Returns (catalog, pairs) paths."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, prefix, title_col in (("Amazon.csv", "amazon:", "title"), ("GoogleProducts.csv", "google:", "name")):
        with open(src / name, newline="", encoding="latin-1") as f:
            for r in csv.DictReader(f):
                rows.append({"product_id": prefix + r["id"], "title": r[title_col], "description": r["description"],
                             "brand": r["manufacturer"], "category": "", "price": r["price"], "image_uri": ""})
    catalog = out / "catalog.csv"
    with open(catalog, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    pairs = out / "pairs.csv"
    with open(src / "perfect_mapping.csv", newline="", encoding="utf-8") as f, open(pairs, "w", newline="") as g:
        w = csv.writer(g)
        w.writerow(["left_id", "right_id"])
        for r in csv.DictReader(f):
            w.writerow(["amazon:" + r["idAmazon"], "google:" + r["idGoogleBase"]])
    return catalog, pairs


def grocery_catalog(src: Path, out: Path, split: str = "train") -> tuple[Path, Path]:
    """The grocery listings catalog, made by the dataset's own make_listings.py."""
    if not (out / "catalog.csv").exists():
        done = subprocess.run([sys.executable, str(src / "make_listings.py"), str(src / "dataset"), split, str(out)],
                              check=True, capture_output=True, text=True)  # stdout stays clean for --json
        log.info("[bench quality] %s", done.stdout.strip())
    return out / "catalog.csv", out / "pairs.csv"
