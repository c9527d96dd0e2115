"""``prodsim bench quality``: match quality on a labelled dataset, every method in one run on the same
tables: the TF-IDF baseline (amazon-google), each vector component alone, the fused default, and
fused with learned weights (two-fold cross-validated). Lists have ``join.k`` entries
(``benchmarks/quality.yaml`` sets 20 for the CLI); metrics are at ``evaluate.cutoffs``."""
from __future__ import annotations

import logging
from pathlib import Path

from prodsim_spark import evaluate, io, weights
from prodsim_spark.config import ProdsimConfig
from prodsim_spark.pipeline import run_embed, run_ingest, run_products
from prodsim_spark.tables import CATALOG, RunTables

from benchmarks import baselines, datasets

log = logging.getLogger(__name__)

DEFAULTS = Path(__file__).with_name("quality.yaml")  # layered under the user's --conf/--set by the CLI


def bench_quality(spark, config: ProdsimConfig, dataset: str, data: Path, work: Path) -> dict:
    catalog, pairs_path = datasets.build(dataset, data, work / "data")
    tables = RunTables.at(str(work / "run"))
    result = run_ingest(spark, str(catalog), tables.output, config)
    run_embed(spark, tables.output, config, result)
    pairs = io.read_pairs(spark, str(pairs_path)).persist()
    products = run_products(spark, tables.output, config)
    cutoffs = config.evaluate.cutoffs
    methods: dict[str, dict] = {}
    if dataset == "amazon-google":
        catalog_table = tables.read(spark, CATALOG)
        methods["tf-idf baseline"] = evaluate.metrics(baselines.tfidf_baseline(catalog_table, config), pairs,
                                                      cutoffs=cutoffs)
        if config.join.same_source_penalty > 0:  # the baseline given the same knowledge of sources
            methods["tf-idf + same-source penalty"] = evaluate.metrics(
                baselines.tfidf_baseline(catalog_table, config, config.join.same_source_penalty), pairs,
                cutoffs=cutoffs)
    lists = evaluate.ablations(products, config)
    for name, df in lists.items():
        methods[name] = evaluate.metrics(df, pairs, cutoffs=cutoffs)
        log.info("[bench quality] %s: %s", name, methods[name])
    learned, fits = weights.cross_validated(products, lists, pairs, config)
    methods["fused, learned weights (2-fold CV)"] = learned
    log.info("[bench quality] learned: %s", learned)
    return {"dataset": dataset, "products": result.rows, "k": config.join.k, "methods": methods, "fits": fits}
