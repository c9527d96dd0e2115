"""The persisted index: the join's IVF cells and everything that makes a query comparable with them.

The neighbours stage writes ``<output>/index`` (one Delta transaction) from the cells it searched:

=========  ==============  ================================================================
column     type            meaning
=========  ==============  ================================================================
kind       string          ``cell`` (one row per centroid) or ``meta`` (one row)
cell       long            the cell number (``cell`` rows)
vector     array<float>    the centroid (``cell`` rows); the lexical channel's IDF weights (``meta``)
meta       string          JSON (``meta`` row): the fusion weights, price scale, the text and image
                           encoder ids and vector sizes, the lexical settings, the number of cells,
                           and ``fingerprint``, a hash of all of it
=========  ==============  ================================================================

Search reads it back (:func:`read_index`) and refuses to mix vectors built another way: a query
embedded with another encoder, or fused with other weights, would be compared on a different scale,
so :meth:`Index.check` raises a ConfigError naming both values instead.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from prodsim_spark.config import FusionWeights, ProdsimConfig
from prodsim_spark.errors import ConfigError

INDEX_SCHEMA = T.StructType([
    T.StructField("kind", T.StringType(), False), T.StructField("cell", T.LongType()),
    T.StructField("vector", T.ArrayType(T.FloatType())), T.StructField("meta", T.StringType())])


@dataclass
class Index:
    """IVF centroids over the fused dense vectors, and what they were built with."""

    centroids: np.ndarray        # (cells, d) float32, unit rows
    idf: np.ndarray | None       # the lexical channel's IDF weights (None: no lexical channel)
    meta: dict                   # see the module docstring

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def weights(self) -> FusionWeights:
        return FusionWeights.model_validate(self.meta["weights"])

    @property
    def dims(self) -> dict[str, int]:
        return {m: int(d) for m, d in self.meta["dims"].items()}

    def check(self, config: ProdsimConfig, text_encoder: str | None, image_encoder: str | None, *, path: str) -> None:
        """A ConfigError naming both values when ``config`` would embed or fuse differently from the index."""
        wanted = {"text encoder (embed.text)": (self.meta["text_encoder"], text_encoder),
                  "image encoder (embed.image)": (self.meta["image_encoder"], image_encoder),
                  "fusion weights (join.weights)": (self.meta["weights"], config.join.weights.as_dict()),
                  "lexical channel (lexical)": (self.meta["lexical"], _lexical_settings(config))}
        for what, (built, now) in wanted.items():
            if built != now:
                raise ConfigError(f"the index was built with {what} {built}, this config has {now}; re-run "
                                  f"'prodsim neighbours' with this config, or search with the run's config",
                                  stage="search", path=path)


def _lexical_settings(config: ProdsimConfig) -> dict | None:
    return config.lexical.model_dump(mode="json") if config.lexical.enabled and config.join.weights.lexical > 0 else None


def routing_settings(config: ProdsimConfig) -> dict:
    """The join settings that decide which products meet and how lists are cut: an incremental re-run
    over these cells needs them unchanged."""
    j = config.join
    settings = {"k": j.k, "spill": j.spill, "category_mode": j.category_mode, "same_source_penalty": j.same_source_penalty}
    # only when off, so that indexes written before the setting existed (on by default) still match
    return settings if j.image_from_text else {**settings, "image_from_text": False}


def build_index(centroids: np.ndarray, idf: np.ndarray | None, dims: dict[str, int], config: ProdsimConfig,
                text_encoder: str | None, image_encoder: str | None, *, several_sources: bool | None = None,
                products: int | None = None) -> Index:
    meta = {"weights": config.join.weights.as_dict(), "price_scale": config.join.price_scale,
            "text_encoder": text_encoder, "image_encoder": image_encoder,
            "dims": {m: int(d) for m, d in dims.items()}, "lexical": _lexical_settings(config),
            "cells": int(len(centroids)), "join": routing_settings(config), "several_sources": several_sources}
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(centroids, dtype=np.float32).tobytes())
    if idf is not None:
        digest.update(np.ascontiguousarray(idf, dtype=np.float32).tobytes())
    meta["fingerprint"] = digest.hexdigest()[:16]
    # counters for the drift measure (not part of the fingerprint: the cells are the same)
    meta["products_at_build"], meta["changed_since_build"] = products, 0
    return Index(np.asarray(centroids, dtype=np.float32), idf, meta)


def incremental_mismatch(index: Index, config: ProdsimConfig, text_encoder: str | None, image_encoder: str | None
                         ) -> str | None:
    """Why the previous run's cells cannot be reused for ``config`` (None: they can)."""
    wanted = {"text encoder": (index.meta.get("text_encoder"), text_encoder),
              "image encoder": (index.meta.get("image_encoder"), image_encoder),
              "fusion weights": (index.meta.get("weights"), config.join.weights.as_dict()),
              "price scale": (index.meta.get("price_scale"), config.join.price_scale),
              "lexical channel": (index.meta.get("lexical"), _lexical_settings(config)),
              "join settings": (index.meta.get("join"), routing_settings(config))}
    for what, (built, now) in wanted.items():
        if built != now:
            return f"the {what} changed ({built} -> {now})"
    if index.meta.get("products_at_build") is None:
        return "the index was written before incremental runs"
    return None


def index_rows(spark: SparkSession, index: Index) -> DataFrame:
    rows = [("meta", None, None if index.idf is None else [float(v) for v in index.idf], json.dumps(index.meta))]
    rows += [("cell", i, [float(v) for v in c], None) for i, c in enumerate(index.centroids)]
    return spark.createDataFrame(rows, INDEX_SCHEMA)


def read_index(index_table: DataFrame) -> Index:
    rows = index_table.collect()
    meta_rows = [r for r in rows if r["kind"] == "meta"]
    if len(meta_rows) != 1:
        raise ConfigError(f"the index table has {len(meta_rows)} meta rows, not 1: rebuild it with prodsim neighbours",
                          stage="search")
    meta = json.loads(meta_rows[0]["meta"])
    cells = sorted((r for r in rows if r["kind"] == "cell"), key=lambda r: r["cell"])
    centroids = np.array([r["vector"] for r in cells], dtype=np.float32).reshape(len(cells), -1)
    idf = None if meta_rows[0]["vector"] is None else np.array(meta_rows[0]["vector"], dtype=np.float64)
    return Index(centroids, idf, meta)
