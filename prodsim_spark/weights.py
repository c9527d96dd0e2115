"""Learned fusion weights: fit the component weights of the fused score on labelled pairs.

The model is the fused score itself, ``sum_c w_c a_c s_c / sum_c w_c a_c`` (see
:mod:`prodsim_spark.fusion`), with one non-negative weight per component: nothing new to explain,
the learned weights go straight into ``join.weights``, and, when the candidates come from several
sources, the ``join.same_source_penalty`` subtracted from same-source pairs. It is fitted as a listwise ranking model: for
each labelled product, a softmax over its candidates (the neighbours found by the fused and
single-component joins: the hard negatives) with temperature t, maximising the probability of its
true matches. Weights are kept positive (fitted as logs) and scaled so the largest is 1.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.optimize import minimize

from prodsim_spark import fusion

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


def fused(weights: np.ndarray, sims: np.ndarray, avail: np.ndarray) -> np.ndarray:
    w = avail * weights
    total = w.sum(axis=1)
    return np.where(total > 0, (w * sims).sum(axis=1) / np.where(total > 0, total, 1), 0.0)


def fit(sims: np.ndarray, avail: np.ndarray, query: np.ndarray, positive: np.ndarray, start: dict[str, float],
        same: np.ndarray | None = None, start_penalty: float = 0.0, l2: float = 0.01) -> dict:
    """Weights maximising the listwise softmax likelihood of true matches among each query's candidates.

    ``query`` groups candidate rows (an int per row), ``positive`` marks true matches, ``same`` marks
    same-source pairs (the penalty is fitted only when some candidates are and some are not). Queries
    with no true match among their candidates carry no signal and are left out. Returns the weights
    (largest 1), the same-source penalty (on the scale of the returned weights' fused score), the
    temperature, and the loss before and after.
    """
    frame = pd.DataFrame({"q": query, "pos": positive})
    useful = frame.groupby("q")["pos"].transform("any").to_numpy()
    same = np.zeros(len(sims), dtype=bool) if same is None else same
    sims, avail, query, positive, same = sims[useful], avail[useful], query[useful], positive[useful], same[useful]
    fit_penalty = bool(same.any() and (~same).any())
    groups, inverse = np.unique(query, return_inverse=True)
    used = avail.any(axis=0)  # components no pair has keep their start weight
    w0 = np.array([max(start.get(c, 0.0), 1e-3) for c in fusion.COMPONENTS])
    n_w = int(used.sum())

    def unpack(theta: np.ndarray) -> tuple[np.ndarray, float]:
        w = w0.copy()
        w[used] = np.exp(theta[:n_w])
        return w, (float(theta[n_w]) if fit_penalty else start_penalty)

    def loss(theta: np.ndarray) -> float:
        w, penalty = unpack(theta)
        z = np.exp(theta[-1]) * (fused(w, sims, avail) - penalty * same)
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
            "same_source_penalty": round(penalty, 4), "temperature": round(float(np.exp(result.x[-1])), 3),
            "queries": int(len(groups)), "candidate_pairs": int(len(sims)), "loss_before": round(before, 4), "loss_after": round(float(result.fun), 4)}
