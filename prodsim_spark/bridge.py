"""The text bridge: an image vector for a product that has text and no photo.

``prodsim fine-tune --modality image`` trains a projection head on the catalog's labelled groups of
photos. With ``finetune.image.text_bridge`` it then fits a linear map (ridge regression) from the
run's text vectors of the labelled listings to the mean tuned image vector of their group, and writes
it into the model folder beside the head. The join (:func:`image_from_text`, called where the join's
input is made) gives each product with a text vector and no image vector the image vector its text
predicts, so that a text-only listing ("Oatly Oat Milk, 1 l ...") can meet the photo-only listings of
its product, which share no modality with it otherwise.

Why a map to group means: a text names a product, not a photo; the mean of a product's photos is the
image vector that text should land on. On grocery listings the map, fitted on the train split, ranks a
val text-only listing's own product's photos first every time (docs/benchmarks.md). It learns the
catalog's labelled products; for products the labels never named it is a linear guess.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql import types as T

from prodsim_spark.config import ProdsimConfig
from prodsim_spark.errors import ModelError

log = logging.getLogger(__name__)

BRIDGE_WEIGHTS = "text_bridge.safetensors"  # in a fine-tuned image model folder: tensor "weight", (text dim + 1) x image dim


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _with_bias(x: np.ndarray) -> np.ndarray:
    return np.hstack([_unit(np.asarray(x, dtype=np.float64)), np.ones((len(x), 1))])


def fit(text_vectors: np.ndarray, groups: list, prototypes: dict, ridge: float) -> tuple[np.ndarray, dict]:
    """(weight, figures): the ridge map from unit text vectors (plus a bias) to the unit image
    prototype of each row's group; rows whose group has no prototype are left out. ``weight`` has
    shape (text dim + 1, image dim); figures: rows and groups used, and the mean cosine of a row's
    mapped vector to its own prototype (the fit on its training rows)."""
    keep = [i for i, g in enumerate(groups) if g in prototypes]
    if len(keep) < 2:
        raise ModelError(f"the text bridge needs labelled listings with text in groups that have photos: "
                         f"{len(keep)} found", stage="fine-tune")
    x = _with_bias(np.asarray(text_vectors)[keep])
    y = _unit(np.stack([np.asarray(prototypes[groups[i]], dtype=np.float64) for i in keep]))
    weight = np.linalg.solve(x.T @ x + ridge * np.eye(x.shape[1]), x.T @ y)
    fitted = _unit(x @ weight)
    return weight.astype(np.float32), {"listings": len(keep), "groups": len({groups[i] for i in keep}),
                                       "fit_cosine": round(float(np.mean(np.sum(fitted * y, axis=1))), 4)}


def apply(weight: np.ndarray, text_vectors: np.ndarray) -> np.ndarray:
    """Unit image vectors predicted from text vectors (rows)."""
    return _unit(_with_bias(text_vectors) @ weight.astype(np.float64)).astype(np.float32)


def prototypes(vectors, labels) -> dict:
    """The unit mean of the unit rows of ``vectors`` (a torch tensor or array) per label."""
    v = _unit(np.asarray(vectors, dtype=np.float64))
    labels = np.asarray(labels)
    return {int(g): _unit(v[labels == g].mean(axis=0)) for g in np.unique(labels)}


@dataclass(frozen=True)
class TextBridge:
    weight: np.ndarray
    text_encoder: str
    folder: str


def load(config: ProdsimConfig, *, for_search: bool = False) -> TextBridge | None:
    """The text bridge the join (or, ``for_search``, search: its products and queries) should use for
    ``config``, or None: ``join.image_from_text`` (``search.image_from_text``) off, no fine-tuned image
    folder, a folder without a bridge, or one fitted on another text encoder (said in the log, the
    stage goes on without it)."""
    from prodsim_spark import encoders

    wanted = config.search.image_from_text if for_search else config.join.image_from_text
    if not wanted or not config.embed.image.enabled:
        return None
    folder = encoders.finetuned_image_folder(config.embed.image)
    if folder is None:
        return None
    meta = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("text_bridge")
    if not meta:
        return None
    wanted = encoders.text_encoder_id(config.embed.text)
    if meta.get("text_encoder") != wanted:
        log.warning("[join] the text bridge in %s was fitted on text vectors of %s; this run's are %s: products "
                    "without a photo get no image vector (fine-tune the image model again on this run)",
                    folder, meta.get("text_encoder"), wanted)
        return None
    from safetensors.numpy import load_file

    path = folder / meta.get("file", BRIDGE_WEIGHTS)
    try:
        weight = load_file(str(path))["weight"]
    except Exception as exc:  # a truncated or foreign file: name it
        raise ModelError(f"{path}: not a text bridge ({type(exc).__name__}: {exc})", stage="join") from None
    if weight.ndim != 2 or weight.shape[0] != int(meta.get("text_dim", -1)) + 1:
        raise ModelError(f"{path}: weight of shape {weight.shape} does not fit text vectors of "
                         f"{meta.get('text_dim')} dims", stage="join")
    return TextBridge(weight=weight, text_encoder=wanted, folder=str(folder))


def image_from_text(products: DataFrame, bridge: TextBridge, where: Column | None = None) -> DataFrame:
    """``products`` (the join's input, or search queries) with ``image_embedding`` filled from
    ``text_embedding`` where the row has text and no image vector (and ``where`` holds); every other
    row as it was."""
    weight = bridge.weight

    @F.pandas_udf(T.ArrayType(T.FloatType()))
    def predicted(texts: pd.Series) -> pd.Series:
        rows = [i for i, v in enumerate(texts) if v is not None]
        out = pd.Series([None] * len(texts), dtype=object)
        if rows:
            vectors = apply(weight, np.stack([np.asarray(texts.iloc[i], dtype=np.float32) for i in rows]))
            for i, v in zip(rows, vectors):
                out.iloc[i] = v
        return out

    missing: Column = F.col("image_embedding").isNull() & F.col("text_embedding").isNotNull()
    if where is not None:
        missing = missing & where
    return products.withColumn("image_embedding", F.when(missing, predicted(F.col("text_embedding")))
                               .otherwise(F.col("image_embedding")))
