"""The whole job, stage after stage, from a catalog path to Delta tables under an output folder.

Used by the CLI (``prodsim run`` and the per-stage commands), the spark-submit jobs and the notebooks,
so all of them run the same thing. Tables written under ``<output>`` (names and paths:
:mod:`prodsim_spark.tables`):

* ``catalog``: the validated catalog, every input row with status and reason (ingest stage).
* ``embeddings``: text and image vectors per product, updated incrementally (embed stage).
* ``neighbours``: per catalog row, its K most similar products with per-component scores (join stage;
  the lexical channel is computed from the catalog there, see :mod:`prodsim_spark.lexical`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from prodsim_spark import bridge, embed, encoders, index, ingest, io, join, lexical
from prodsim_spark.config import ProdsimConfig
from prodsim_spark.progress import stage
from prodsim_spark.tables import CATALOG, EMBEDDINGS, GROUPS, INDEX, INDEX_MEMBERS, NEIGHBOURS, SEARCH, RunTables, \
    live_catalog, live_embeddings, neighbours_counts

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: str
    tables: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    status: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    embed: dict[str, int] = field(default_factory=dict)
    join: dict[str, int] = field(default_factory=dict)
    groups: dict[str, int] = field(default_factory=dict)
    incremental: dict[str, int] = field(default_factory=dict)  # set when the join ran incrementally


def run_ingest(spark: SparkSession, catalog_path: str, output: str, config: ProdsimConfig) -> RunResult:
    tables = RunTables.at(output)
    result = RunResult(output=tables.output)
    path = tables.catalog
    with stage(spark, "ingest", f"validate {catalog_path} -> {path}"):
        raw = io.read_catalog(spark, catalog_path, config.ingest)
        catalog = ingest.validate_catalog(raw, config.ingest, image_root=io.catalog_folder(catalog_path)).persist()
        previous = tables.read(spark, CATALOG) if tables.exists(spark, CATALOG) else None
        ingest.check_export(catalog, previous, config.ingest, path=catalog_path)
        io.write_delta(catalog, path)
        catalog.unpersist()
        written = io.read_delta(spark, path)  # count what landed, not a recomputation
        result.status, result.reasons = ingest.row_counts(written)
        result.rows = sum(result.status.values())
        result.tables[CATALOG] = path
    log.info("[ingest] %d rows: %s", result.rows, ", ".join(f"{k}={v}" for k, v in result.status.items()))
    for code, count in result.reasons.items():
        log.info("[ingest]   %-24s %d rows", code, count)
    return result


def torch_threads(spark: SparkSession, config: ProdsimConfig) -> int:
    """CPU threads per task: tasks x threads should not exceed the cores (spark.task.cpus per task)."""
    return config.embed.torch_threads or int(spark.conf.get("spark.task.cpus", "1") or 1)


def run_embed(spark: SparkSession, output: str, config: ProdsimConfig, result: RunResult) -> RunResult:
    settings = config.embed
    tables = RunTables.at(output)
    catalog = tables.read(spark, CATALOG)
    path = tables.embeddings
    existing = tables.read(spark, EMBEDDINGS) if tables.exists(spark, EMBEDDINGS) else None
    # on the driver, before any task: a missing model folder or weights file is a clear error here
    text_id = encoders.text_encoder_id(settings.text) if settings.text.enabled else None
    image_id = encoders.image_encoder_id(settings.image) if settings.image.enabled else None
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(settings.arrow_batch_size))
    with stage(spark, "embed", f"encode new or changed products -> {path}"):
        plan = embed.plan_embeddings(catalog, existing, settings, text_id, image_id)
        # encode once: the MERGE and the counts below read the persisted result, not a recomputation
        updates = embed.encode(plan, settings, torch_threads(spark, config)).persist()
        counts = updates.agg(
            F.count("*").alias("products"),
            F.sum(F.when(F.col("need_text") & F.col("text_embedding").isNotNull(), 1).otherwise(0)).alias("text_encoded"),
            F.sum(F.when(F.col("need_image") & F.col("image_embedding").isNotNull(), 1).otherwise(0)).alias("image_encoded"),
            F.sum(F.when(F.col("need_image") & F.col("image_error").isNotNull(), 1).otherwise(0)).alias("image_failed"),
            F.sum(F.when(~F.col("need_text") & ~F.col("need_image"), 1).otherwise(0)).alias("reused"),
            F.sum(F.when(F.col("is_new"), 1).otherwise(0)).alias("new_products"),
        ).first().asDict()
        removed = 0 if existing is None else (
            live_embeddings(existing).join(updates.select("product_id"), "product_id", "left_anti").count())
        embed.merge_embeddings(spark, path, updates)
        updates.unpersist()
    result.embed = {k: int(v or 0) for k, v in counts.items()} | {"removed": removed}
    result.tables[EMBEDDINGS] = path
    e = result.embed
    log.info("[embed] %d products: encoded %d texts and %d images (%d images failed), reused %d, removed %d",
             e["products"], e["text_encoded"], e["image_encoded"], e["image_failed"], e["reused"], removed)
    return result


def join_products(catalog: DataFrame, embeddings: DataFrame, config: ProdsimConfig, *, with_lexical: bool,
                  idf=None, for_search: bool = False) -> DataFrame:
    """The join's input, persisted: catalog attributes and embeddings, plus the lexical channel when
    ``with_lexical`` and ``lexical.enabled`` (recomputed from the catalog: its IDF depends on all of it;
    ``idf``: weights already fitted, e.g. the index's). With a text bridge in the fine-tuned image
    model (``join.image_from_text``), a product without a photo carries the image vector its text
    predicts (:mod:`prodsim_spark.bridge`); ``for_search``: the products search scores, bridged only
    with ``search.image_from_text``."""
    lexical_vectors = (lexical.lexical_vectors(live_catalog(catalog), config.lexical, idf)
                       if with_lexical and config.lexical.enabled else None)
    products = join.join_inputs(catalog, embeddings, lexical_vectors)
    text_bridge = bridge.load(config, for_search=for_search)
    if text_bridge is not None:
        log.info("[join] products without a photo get an image vector from their text (the text bridge of %s)",
                 text_bridge.folder)
        products = bridge.image_from_text(products, text_bridge)
    return products.persist()


def run_products(spark: SparkSession, output: str, config: ProdsimConfig) -> DataFrame:
    """The join's input for a finished run (catalog + embeddings + lexical channel), persisted: what
    ablations and the weight fit recompute neighbour lists from."""
    tables = RunTables.at(output)
    return join_products(tables.read(spark, CATALOG), tables.read(spark, EMBEDDINGS), config, with_lexical=True)


def encoder_ids(embeddings: DataFrame) -> tuple[str | None, str | None]:
    """The text and image encoder ids the live vectors of an embeddings table were made with (one each
    after an embed run; several would be joined by '|', which no config matches)."""
    row = live_embeddings(embeddings).agg(
        F.array_sort(F.collect_set(F.when(F.col("text_embedding").isNotNull(), F.col("text_encoder")))).alias("t"),
        F.array_sort(F.collect_set(F.when(F.col("image_embedding").isNotNull(), F.col("image_encoder")))).alias("i"),
    ).first()
    return ("|".join(row["t"]) or None), ("|".join(row["i"]) or None)


def previous_cells(spark: SparkSession, tables: RunTables, config: ProdsimConfig, embeddings: DataFrame
                   ) -> tuple["index.Index | None", str | None]:
    """(the previous run's index, None) when this run can join incrementally over its cells, else
    (None, why not)."""
    if not config.join.incremental:
        return None, "join.incremental is off"
    if not (tables.exists(spark, INDEX) and tables.exists(spark, INDEX_MEMBERS) and tables.exists(spark, NEIGHBOURS)):
        return None, "no previous cells"
    built = index.read_index(tables.read(spark, INDEX))
    why = index.incremental_mismatch(built, config, *encoder_ids(embeddings))
    return (None, why) if why else (built, None)


def run_join(spark: SparkSession, output: str, config: ProdsimConfig, result: RunResult) -> RunResult:
    """The neighbours stage: incremental over the previous run's cells when they still fit (see
    :mod:`prodsim_spark.incremental`), else new cells and a full join. Writes the neighbours table,
    the index and the index members."""
    from prodsim_spark import incremental

    tables = RunTables.at(output)
    catalog = tables.read(spark, CATALOG)
    embeddings = tables.read(spark, EMBEDDINGS)
    path = tables.neighbours
    with stage(spark, "join", f"top-{config.join.k} fused neighbours -> {path}"):
        with_lexical = config.lexical.enabled and config.join.weights.lexical > 0
        previous, why = previous_cells(spark, tables, config, embeddings)
        built, state, products = None, None, None
        if previous is not None:
            products = join_products(catalog, embeddings, config, with_lexical=with_lexical, idf=previous.idf)
            shape = join.input_shape(products)
            state = incremental.input_state(products, previous.centroids, config.join.weights, shape.dims,
                                            config.join.spill, tables.read(spark, INDEX_MEMBERS)).persist()
            old_lists = (tables.read(spark, NEIGHBOURS).where(F.col("status") != "rejected")
                         .join(tables.read(spark, INDEX_MEMBERS).select("product_id"), "product_id", "left_semi")
                         .select("product_id", "neighbours"))
            changes = incremental.find_changes(state, tables.read(spark, INDEX_MEMBERS), old_lists)
            reasons = incremental.drift_reasons(changes, state, previous.meta["products_at_build"],
                                                previous.meta["changed_since_build"], config.join)
            if shape.several_sources != previous.meta.get("several_sources"):
                reasons.append("the catalog's number of sources changed (one vs several: the same-source penalty)")
            if reasons:
                log.info("[join] planning new cells: %s", "; ".join(reasons))
                state.unpersist()
                state = None
            else:
                updated = incremental.update_neighbours(products, state, old_lists, changes, previous.centroids,
                                                        shape.dims, config.join, shape.several_sources).persist()
                updated_lists = updated.count()  # scored once, before the MERGE (which reads its source twice)
                upserts, deletes = incremental.neighbours_changes(catalog, embeddings, tables.read(spark, NEIGHBOURS),
                                                                  old_lists, updated, changes, state)
                io.merge_changes(upserts, deletes, path, keys=("product_id", "source_row"))
                updated.unpersist()
                built = previous
                built.meta["changed_since_build"] += changes.changed
                result.incremental = {"new_or_changed": len(changes.new), "removed": len(changes.removed),
                                      "rescored_unchanged": len(changes.rescored), "lists_updated": updated_lists,
                                      "products": changes.products}
        else:
            log.info("[join] a full join: %s", why)
        if built is None:  # new cells, every product
            idf = lexical.fit_idf(live_catalog(catalog), config.lexical) if with_lexical else None
            if idf is not None:  # as the index stores it (float32), so a re-run's lexical vectors are these
                idf = idf.astype("float32").astype("float64")
            if products is not None:  # built on the previous IDF: the new cells get a new one
                products.unpersist()
            products = join_products(catalog, embeddings, config, with_lexical=with_lexical, idf=idf)
            cells = join.plan_cells(products, config.join)
            found = join.find_neighbours(products, config.join, cells)
            io.write_delta(join.neighbours_table(catalog, found, embeddings), path)
            built = index.build_index(cells.centroids, idf, cells.shape.dims, config, *encoder_ids(embeddings),
                                      several_sources=cells.shape.several_sources, products=cells.shape.count)
            state = incremental.input_state(products, cells.centroids, config.join.weights, cells.shape.dims,
                                            config.join.spill)
        io.write_delta(state, tables.index_members)
        io.write_delta(index.index_rows(spark, built), tables.index)
        products.unpersist()
        if isinstance(state, DataFrame):
            state.unpersist()
        result.join = neighbours_counts(tables.read(spark, NEIGHBOURS))  # what landed
        if config.embed.on_removed == "delete":  # no table lists them any more: safe to delete now
            embed.purge_removed(spark, tables.embeddings)
    result.tables[NEIGHBOURS] = path
    result.tables[INDEX] = tables.index
    log.info("[join] %d rows, %d with neighbours; index of %d cells (%s)%s", result.join["rows"],
             result.join["with_neighbours"], len(built.centroids), built.fingerprint,
             f"; incremental: {result.incremental}" if result.incremental else "")
    return result


def lists_on_index(spark: SparkSession, output: str, config: ProdsimConfig) -> DataFrame:
    """Every product's list from a full join over the run's own cells and IDF (no new planning): what
    an incremental run must equal."""
    tables = RunTables.at(output)
    built = index.read_index(tables.read(spark, INDEX))
    with_lexical = config.lexical.enabled and config.join.weights.lexical > 0
    products = join_products(tables.read(spark, CATALOG), tables.read(spark, EMBEDDINGS), config,
                             with_lexical=with_lexical, idf=built.idf)
    return join.find_neighbours(products, config.join, join.Cells(built.centroids, join.input_shape(products)))


def group_products(spark: SparkSession, output: str, config: ProdsimConfig, products: DataFrame | None = None
                   ) -> tuple[DataFrame, DataFrame, dict]:
    """(groups table, edges, counts) of a finished run at ``config.group`` (nothing written);
    ``products``: the join's input when the caller has it persisted already."""
    from prodsim_spark import groups

    tables = RunTables.at(output)
    own = products is None
    if own:
        products = join_products(tables.read(spark, CATALOG), tables.read(spark, EMBEDDINGS), config,
                                 with_lexical=config.lexical.enabled and config.join.weights.lexical > 0)
    neighbours = tables.read(spark, NEIGHBOURS)
    grouped, edge_table, counts = groups.find_groups(products, neighbours, config.group, config.join)
    table = groups.groups_table(tables.read(spark, CATALOG), grouped, edge_table)
    if own:
        products.unpersist()
    return table, edge_table, counts


def run_group(spark: SparkSession, output: str, config: ProdsimConfig, result: RunResult) -> RunResult:
    """Group a finished run's listings into <output>/groups (one transaction)."""
    tables = RunTables.at(output)
    tables.require(spark, CATALOG, EMBEDDINGS, NEIGHBOURS)
    with stage(spark, "group", f"groups at threshold {config.group.threshold} -> {tables.groups}"):
        table, _, counts = group_products(spark, output, config)
        io.write_delta(table, tables.groups)
    result.groups = counts
    result.tables[GROUPS] = tables.groups
    log.info("[group] %d groups, the largest of %d; %d of %d components split by the chaining guard "
             "(group.max_size %d)", counts["groups"], counts["largest_group"], counts["components_split"],
             counts["components"], config.group.max_size)
    return result


def run_search(spark: SparkSession, queries_path: str, output: str, config: ProdsimConfig, *,
               fmt: str | None = None) -> dict[str, int]:
    """Answer a queries table against a finished run (its catalog, embeddings and index) and write
    ``<output>/search`` in one transaction; returns the counts of what landed."""
    from prodsim_spark import search
    from prodsim_spark.errors import InputError

    tables = RunTables.at(output)
    tables.require(spark, CATALOG, EMBEDDINGS, INDEX)
    built = search.load_index(spark, tables, config)
    path = tables.search
    with stage(spark, "search", f"top-{config.search.k} products per query of {queries_path} -> {path}"):
        raw = io.read_catalog(spark, queries_path, config.ingest, what="queries", stage="search", fmt=fmt)
        folder = io.catalog_folder(queries_path)
        roots = [folder, *(r for r in (config.ingest.image_root, *config.ingest.image_roots) if r)]
        queries = search.validate_queries(raw, config.search, image_roots=roots,
                                          image_schemes=config.ingest.image_schemes).persist()
        if queries.limit(1).count() == 0:
            raise InputError("the queries table has no rows; nothing was written", stage="search", path=queries_path)
        vectors = search.embed_queries(queries, config, built.idf, torch_threads(spark, config)).persist()
        products = join_products(tables.read(spark, CATALOG), tables.read(spark, EMBEDDINGS), config,
                                 with_lexical=built.idf is not None, idf=built.idf, for_search=True)
        found = search.search_products(vectors, products, built, config.search)
        io.write_delta(search.results_table(queries, found, vectors, built), path)
        for df in (queries, vectors, products):
            df.unpersist()
        written = tables.read(spark, SEARCH)
        row = written.agg(F.count("*").alias("queries"),
                          F.sum(F.when(F.size("results") > 0, 1).otherwise(0)).alias("with_results"),
                          F.sum(F.when(F.col("status") == "rejected", 1).otherwise(0)).alias("rejected")).first()
    counts = {k: int(row[k] or 0) for k in ("queries", "with_results", "rejected")}
    log.info("[search] %d queries: %d with results, %d rejected", counts["queries"], counts["with_results"],
             counts["rejected"])
    return counts


def run_pipeline(spark: SparkSession, catalog_path: str, output: str, config: ProdsimConfig) -> RunResult:
    """Run every stage in order and return what was written."""
    result = run_ingest(spark, catalog_path, output, config)
    if config.embed.text.enabled or config.embed.image.enabled:
        run_embed(spark, output, config, result)
        run_join(spark, output, config, result)
        if config.group.enabled:
            run_group(spark, output, config, result)
    return result
