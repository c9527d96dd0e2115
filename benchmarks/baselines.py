"""Baselines that the quality benchmark measures ours against."""
from __future__ import annotations

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame

from prodsim_spark import fusion, lexical
from prodsim_spark.config import ProdsimConfig
from prodsim_spark.tables import live_catalog


def tfidf_baseline(catalog: DataFrame, config: ProdsimConfig, same_source_penalty: float = 0.0) -> DataFrame:
    """A plain character n-gram TF-IDF (scikit-learn, char_wb 3-5 grams, sublinear tf, exact cosine on
    the driver) over the same fields as the lexical channel, top ``join.k`` per product. With
    ``same_source_penalty``, same-source pairs score that much lower, as in the join: the baseline
    given the same knowledge of sources as the fused score."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    k = config.join.k
    live = live_catalog(catalog)
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
