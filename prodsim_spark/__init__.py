"""prodsim-spark: catalog-scale product similarity on Spark.

What a notebook or job calls (each stage takes DataFrames and a typed config section and returns
DataFrames; only the ``run_*`` glue and :class:`RunTables` touch paths)::

    from prodsim_spark import get_session, load_config, run_pipeline, RunTables

    config = load_config(["conf/mine.yaml"], ["join.k=20"])
    spark = get_session(config.spark)
    result = run_pipeline(spark, "catalog.parquet", "out/run1", config)
    neighbours = RunTables.at("out/run1").read(spark, "neighbours")

Stages: :func:`validate_catalog` (ingest), :func:`plan_embeddings` / :func:`encode` (embed),
:func:`join_inputs` / :func:`find_neighbours` / :func:`neighbours_table` (join), :func:`metrics` /
:func:`coverage` / :func:`ablations` (evaluate), :func:`fit_on_lists` (weights),
:func:`collect_report` / :func:`render_html` (report), :func:`text_training_rows` / :func:`fine_tune`
(fine-tune), :func:`validate_queries` / :func:`embed_queries` / :func:`search_products` and
:class:`Searcher` (search), :func:`find_groups` / :func:`groups_table` / :func:`group_metrics` (groups).
``docs/architecture.md`` shows how they fit.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it; imported on first use, so that `prodsim --help` and
# the Python workers import only what they need
_EXPORTS = {
    "load_config": "config", "ProdsimConfig": "config", "FusionWeights": "config", "JoinSettings": "config",
    "get_session": "session",
    "RunTables": "tables", "live_catalog": "tables", "live_embeddings": "tables",
    "read_catalog": "io", "read_pairs": "io", "read_delta": "io", "write_delta": "io",
    "validate_catalog": "ingest",
    "plan_embeddings": "embed", "encode": "embed",
    "join_inputs": "join", "find_neighbours": "join", "neighbours_table": "join",
    "metrics": "evaluate", "coverage": "evaluate", "ablations": "evaluate",
    "fit_on_lists": "weights",
    "text_training_rows": "finetune", "image_training_rows": "finetune", "fine_tune": "finetune",
    "Searcher": "search", "validate_queries": "search", "embed_queries": "search", "search_products": "search",
    "find_groups": "groups", "groups_table": "groups", "group_metrics": "evaluate",
    "Index": "index", "read_index": "index",
    "collect_report": "report", "render_html": "report", "write_html": "report",
    "run_pipeline": "pipeline", "run_ingest": "pipeline", "run_embed": "pipeline", "run_join": "pipeline",
    "run_products": "pipeline", "RunResult": "pipeline", "run_search": "pipeline", "run_group": "pipeline",
    "with_overrides": "config",
    "ProdsimError": "errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prodsim_spark' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"prodsim_spark.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
