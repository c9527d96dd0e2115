"""Learned fusion weights: fit the component weights of the fused score on labelled pairs.

The model is the fused score itself, ``sum_c w_c a_c s_c / sum_c w_c a_c`` (see
:mod:`prodsim_spark.fusion`), with one non-negative weight per component: nothing new to explain,
the learned weights go straight into ``join.weights``, and, when the candidates come from several
sources, the ``join.same_source_penalty`` subtracted from same-source pairs; the ``join.hubness`` hub
correction is chosen from a grid by two-fold cross-validation (:func:`choose_hubness`). It is fitted as a listwise ranking model: for
each labelled product, a softmax over its candidates (the neighbours found by the fused and
single-component joins: the hard negatives) with temperature t, maximising the probability of its
true matches. Weights are kept positive (fitted as logs) and scaled so the largest is 1.

:func:`fit` is the pure fit on arrays; :func:`fit_on_lists` gathers its inputs from a run's products
and neighbour lists (``prodsim fit-weights``); :func:`cross_validated` measures it on held-out
products (``prodsim bench quality``).
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from scipy.optimize import minimize

from prodsim_spark import evaluate, fusion, join
from prodsim_spark.config import FusionWeights, ProdsimConfig
from prodsim_spark.errors import InputError

log = logging.getLogger(__name__)


def pair_components(a: fusion.Products, b: fusion.Products, price_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Row-aligned pairs (a[i], b[i]): raw similarity and availability per component, (n, C) each."""
    n = len(a)
    sims = np.zeros((n, len(fusion.COMPONENTS)), dtype=np.float64)
    avail = np.zeros_like(sims, dtype=bool)
    for j, name in enumerate(fusion.COMPONENTS):
        if name in fusion.DENSE:
            if name in a.vectors and a.vectors[name].shape[1]:
                sims[:, j] = np.einsum("ij,ij->i", a.vectors[name], b.vectors[name])
                avail[:, j] = a.has[name] & b.has[name]
        else:
            field = fusion.ATTRIBUTES[name]
            sims[:, j], avail[:, j] = fusion.attribute_similarity(name, getattr(a, field), getattr(b, field),
                                                                  price_scale)
    return sims, avail


def comparable(avail: np.ndarray) -> np.ndarray:
    """Rows (pairs) the join compares: those sharing a content component (see fusion.shared_content)."""
    content = [fusion.COMPONENTS.index(name) for name in fusion.DENSE]
    return avail[:, content].any(axis=1) | ~avail[:, content].any(axis=0).any()


def fused(weights: np.ndarray, sims: np.ndarray, avail: np.ndarray) -> np.ndarray:
    w = avail * weights
    total = w.sum(axis=1)
    return np.where(total > 0, (w * sims).sum(axis=1) / np.where(total > 0, total, 1), 0.0)


def fit(sims: np.ndarray, avail: np.ndarray, query: np.ndarray, positive: np.ndarray, *, start: FusionWeights,
        same: np.ndarray | None = None, start_penalty: float = 0.0, hub: np.ndarray | None = None,
        hubness: float = 0.0, l2: float = 0.01) -> dict:
    """Weights maximising the listwise softmax likelihood of true matches among each query's candidates.

    ``query`` groups candidate rows (an int per row), ``positive`` marks true matches, ``same`` marks
    same-source pairs (the penalty is fitted only when some candidates are and some are not), ``hub``
    is each candidate's hub score less the catalog's mean, subtracted ``hubness`` times (fixed here:
    :func:`choose_hubness` picks it on held-out queries). Queries with no true match among their
    candidates carry no signal and are left out. Returns the weights (largest 1), the same-source
    penalty (on the scale of the returned weights' fused score), the hub correction, the temperature,
    and the loss before and after.
    """
    frame = pd.DataFrame({"q": query, "pos": positive})
    useful = frame.groupby("q")["pos"].transform("any").to_numpy()
    same = np.zeros(len(sims), dtype=bool) if same is None else same
    hub = np.zeros(len(sims)) if hub is None else hub
    sims, avail, query, positive, same, hub = (sims[useful], avail[useful], query[useful], positive[useful],
                                               same[useful], hub[useful])
    fit_penalty = bool(same.any() and (~same).any())
    groups, inverse = np.unique(query, return_inverse=True)
    used = avail.any(axis=0)  # components no pair has keep their start weight
    w0 = np.array([max(getattr(start, c), 1e-3) for c in fusion.COMPONENTS])
    n_w = int(used.sum())

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, float]:
        w = w0.copy()
        w[used] = np.exp(theta[:n_w])
        return w, (float(theta[n_w]) if fit_penalty else start_penalty)

    def loss(theta: np.ndarray) -> float:
        w, penalty = unpack(theta)
        z = np.exp(theta[-1]) * (fused(w, sims, avail) - penalty * same - hubness * hub)
        zmax = np.full(len(groups), -np.inf)
        np.maximum.at(zmax, inverse, z)
        e = np.exp(z - zmax[inverse])
        all_ = np.bincount(inverse, weights=e, minlength=len(groups))
        pos = np.bincount(inverse, weights=e * positive, minlength=len(groups))
        return float(-np.mean(np.log(pos / all_ + 1e-12)) + l2 * np.sum(theta[:n_w] ** 2))

    theta0 = np.concatenate([np.log(w0[used]), [start_penalty] if fit_penalty else [], [np.log(10.0)]])
    # the penalty stays in [0, 1], as the config allows
    bounds = [(None, None)] * n_w + ([(0.0, 1.0)] if fit_penalty else []) + [(None, None)]
    before = loss(theta0)
    result = minimize(loss, theta0, method="L-BFGS-B", bounds=bounds)
    w, penalty = unpack(result.x)
    w = w / w.max()  # the fused score is a weighted mean: scaling the weights changes nothing
    log.info("[fit-weights] %d queries, %d candidate pairs: loss %.4f -> %.4f", len(groups), len(sims), before,
             result.fun)
    return {"weights": {c: round(float(v), 4) for c, v in zip(fusion.COMPONENTS, w)},
            "same_source_penalty": round(penalty, 4), "hubness": round(hubness, 4), "temperature": round(float(np.exp(result.x[-1])), 3),
            "queries": int(len(groups)), "candidate_pairs": int(len(sims)), "loss_before": round(before, 4), "loss_after": round(float(result.fun), 4)}


HUBNESS_GRID = (0.0, 0.25, 0.5, 0.75, 1.0)


def top1_recall(weights: dict, penalty: float, hubness: float, sims, avail, query, positive, same, hub) -> float:
    """Share of the queries (with a true match among their candidates) whose best-scored candidate is one."""
    w = np.array([weights[c] for c in fusion.COMPONENTS])
    score = fused(w, sims, avail) - penalty * same - hubness * hub
    frame = pd.DataFrame({"q": query, "s": score, "pos": positive})
    frame = frame[frame.groupby("q")["pos"].transform("any")]
    best = frame.sort_values(["q", "s"], ascending=[True, False], kind="stable").groupby("q").head(1)
    return float(best["pos"].mean()) if len(best) else 0.0


def choose_hubness(sims, avail, query, positive, same, hub, *, start: FusionWeights, start_penalty: float
                   ) -> tuple[float, dict]:
    """``join.hubness`` from HUBNESS_GRID by two-fold cross-validation over the labelled queries: for each
    value, fit the weights (and penalty) on one half and count first-place hits on the other. Why not
    fitted with the weights: the softmax fit's hub term went to whichever bound it started nearer on
    the grocery listings (where dense groups of true duplicates look like hubs) and lost R@1 held out;
    chosen on held-out queries it stays 0 or small where the correction does not help. Ties go to the
    smaller."""
    fold = (pd.util.hash_array(np.asarray(query, dtype=np.int64)) % 2).astype(bool)
    recall = {}
    for beta in HUBNESS_GRID:
        hits = []
        for held_out in (False, True):
            train, test = fold != held_out, fold == held_out
            f = fit(sims[train], avail[train], query[train], positive[train], start=start, same=same[train],
                    start_penalty=start_penalty, hub=hub[train], hubness=beta)
            hits.append(top1_recall(f["weights"], f["same_source_penalty"], beta, sims[test], avail[test],
                                    query[test], positive[test], same[test], hub[test]))
        recall[beta] = round(float(np.mean(hits)), 4)
    best = max(HUBNESS_GRID, key=lambda b: (recall[b], -b))
    log.info("[fit-weights] hub correction by two-fold R@1 among the candidates: %s -> %.2f", recall, best)
    return best, recall


def fitted_config(report: dict) -> dict:
    """The part of a config that a fit sets, for :func:`prodsim_spark.config.write_config`."""
    return {"join": {"weights": report["weights"], "same_source_penalty": report["same_source_penalty"],
                     "hubness": report["hubness"]}}


# --------------------------------------------------------------------------------------------
# from a run's tables


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
    return join.products_from_columns(pdf, dims)


def fit_on_lists(products: DataFrame, lists: dict[str, DataFrame], pairs: DataFrame, config: ProdsimConfig,
                 *, hubness: bool = True) -> dict:
    """Fit join.weights (and the same-source penalty, and with ``hubness`` the hub correction) on
    labelled pairs against the candidates in ``lists`` (the hard negatives); ``products`` as
    :func:`prodsim_spark.pipeline.run_products` gives. Returns the fit report."""
    cand = _candidates(lists, pairs)
    if cand.empty:
        raise InputError("no labelled pair names two products of this run")
    p = _products_frame(products, pd.concat([cand["query"], cand["match"]]))
    index = pd.Index(p.ids)
    qi, mi = index.get_indexer(cand["query"]), index.get_indexer(cand["match"])
    ok = (qi >= 0) & (mi >= 0)
    a, b = p.take(qi[ok]), p.take(mi[ok])
    sims, avail = pair_components(a, b, config.join.price_scale)
    keep = comparable(avail)  # pairs sharing no content are never listed, whatever the weights
    query, positive = qi[ok][keep], cand["positive"].to_numpy(dtype=bool)[ok][keep]
    sims, avail, same = sims[keep], avail[keep], fusion.same_source(a.source, b.source)[keep]
    start, penalty = config.join.weights, config.join.same_source_penalty
    if hubness and "fused" in lists and not config.join.incremental:  # hubness cannot be on with incremental
        hub = _hub_of(lists, cand, ok, keep)
        beta, recall = choose_hubness(sims, avail, query, positive, same, hub, start=start, start_penalty=penalty)
        return {**fit(sims, avail, query, positive, start=start, same=same, start_penalty=penalty, hub=hub,
                      hubness=beta), "hubness_r1": recall}
    # not chosen: the hub correction as configured (0 unless set); its hub scores come from the fused lists
    if config.join.hubness and "fused" not in lists:
        raise ValueError(f"join.hubness is {config.join.hubness}, and the lists given ({', '.join(lists)}) have no "
                         "'fused' list to take hub scores from")
    hub = _hub_of(lists, cand, ok, keep) if config.join.hubness else None
    return fit(sims, avail, query, positive, start=start, same=same, start_penalty=penalty, hub=hub,
               hubness=config.join.hubness)


def _hub_of(lists: dict[str, DataFrame], cand: pd.DataFrame, ok: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Each candidate row's hub score less the catalog's mean (0 for a product without a list)."""
    scores = hub_scores(lists["fused"])
    return (cand["match"].map(scores).fillna(scores.mean()) - scores.mean()).to_numpy()[ok][keep]


def hub_scores(lists: DataFrame) -> pd.Series:
    """Each listed product's hub score (join.hubness): the mean score of its first ``join.HUB_NEIGHBOURS``
    neighbours, before any hub correction (the sum of each neighbour's parts)."""
    raw = " + ".join(f"n.{p}" for p in fusion.PARTS)
    frame = lists.where(F.size("neighbours") > 0).select(
        "product_id", join.hub_score(f"transform(neighbours, n -> {raw})").alias("hub")).toPandas()
    return frame.set_index("product_id")["hub"]


def cross_validated(products: DataFrame, lists: dict[str, DataFrame], pairs: DataFrame, config: ProdsimConfig
                    ) -> tuple[dict, list[dict]]:
    """Two folds over the *products*: fit on the pairs whose two products are both in one fold, measure
    on the other fold's products (every pair that names one of them is left out of fitting, so no
    label of a measured product is seen); metrics averaged over the two folds."""
    fold = lambda col: F.abs(F.xxhash64(col)) % 2  # noqa: E731
    results, fits = [], []
    for held_out in (0, 1):
        train = pairs.where((fold("left_id") != held_out) & (fold("right_id") != held_out))
        report = fit_on_lists(products, lists, train, config)
        settings = config.join.replaced(weights=report["weights"], same_source_penalty=report["same_source_penalty"],
                                        hubness=report["hubness"])
        found = join.find_neighbours(products, settings)
        queries = products.select("product_id").where(fold("product_id") == held_out)
        results.append(evaluate.metrics(found, pairs, queries, cutoffs=config.evaluate.cutoffs))
        fits.append(report)
    keys = [k_ for k_ in results[0] if k_ not in ("queries", "pairs_unknown")]
    merged = {k_: round(float(np.mean([r[k_] for r in results])), 4) for k_ in keys}
    merged["queries"] = sum(r["queries"] for r in results)
    return merged, fits
