"""A run's folder and its tables: the one place that knows their names, paths and which rows are live.

A run writes Delta tables under one output folder (``--output``)::

    <output>/catalog      every input row, with status and reason          (ingest)
    <output>/embeddings   text and image vectors per product, incremental  (embed)
    <output>/neighbours   per catalog row, its K most similar products     (neighbours)
    <output>/index        the join's IVF cells and what they were built with (neighbours)
    <output>/index_members per product: a hash of its join inputs, its cells and home (neighbours; what
                          an incremental re-run compares)
    <output>/search       per query, the products that answer it           (search)
    <output>/groups       per catalog row, its group of listings of one product (group)
    <output>/report.html  the HTML report                                  (report)

Live rows: catalog rows that were not rejected, embeddings rows that were not flagged removed. Every
stage, command, notebook and benchmark reaches the tables through :class:`RunTables` and filters
rows through :func:`live_catalog` / :func:`live_embeddings`, so a new table or rule changes here only.
"""
from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from prodsim_spark.errors import TableError

CATALOG, EMBEDDINGS, NEIGHBOURS, INDEX, SEARCH, GROUPS = "catalog", "embeddings", "neighbours", "index", "search", "groups"
INDEX_MEMBERS = "index_members"
TABLES = (CATALOG, EMBEDDINGS, NEIGHBOURS, INDEX, INDEX_MEMBERS, SEARCH, GROUPS)
REPORT_HTML = "report.html"
# the command that writes each table: named in the error when a table is missing
WRITTEN_BY = {CATALOG: "prodsim ingest (or prodsim run)", EMBEDDINGS: "prodsim embed (or prodsim run)",
              NEIGHBOURS: "prodsim neighbours (or prodsim run)", INDEX: "prodsim neighbours (or prodsim run)",
              INDEX_MEMBERS: "prodsim neighbours (or prodsim run)",
              SEARCH: "prodsim search", GROUPS: "prodsim group (or prodsim run)"}


@dataclass(frozen=True)
class RunTables:
    """The tables of one run folder. ``output`` is absolute for local folders, a URI otherwise."""

    output: str

    @classmethod
    def at(cls, output: str) -> "RunTables":
        from prodsim_spark.io import resolve_path

        return cls(resolve_path(output).rstrip("/"))

    @classmethod
    def of_table(cls, table_path: str) -> "RunTables":
        """The run folder that holds a table (``<output>/neighbours`` -> ``<output>``)."""
        return cls.at(table_path.rstrip("/").rsplit("/", 1)[0])

    def path(self, name: str) -> str:
        return f"{self.output}/{name}"

    catalog = property(lambda self: self.path(CATALOG), doc="<output>/catalog")
    embeddings = property(lambda self: self.path(EMBEDDINGS), doc="<output>/embeddings")
    neighbours = property(lambda self: self.path(NEIGHBOURS), doc="<output>/neighbours")
    index = property(lambda self: self.path(INDEX), doc="<output>/index")
    index_members = property(lambda self: self.path(INDEX_MEMBERS), doc="<output>/index_members")
    search = property(lambda self: self.path(SEARCH), doc="<output>/search")
    groups = property(lambda self: self.path(GROUPS), doc="<output>/groups")
    report_html = property(lambda self: self.path(REPORT_HTML), doc="<output>/report.html")

    def exists(self, spark: SparkSession, name: str) -> bool:
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(spark, self.path(name))

    def require(self, spark: SparkSession, *names: str) -> None:
        """Fail with the command that writes a table when one of ``names`` is not a Delta table yet."""
        for name in names:
            if not self.exists(spark, name):
                raise TableError(f"not a Delta table; it is written by {WRITTEN_BY.get(name, 'a prodsim run')}",
                                 path=self.path(name))

    def read(self, spark: SparkSession, name: str) -> DataFrame:
        self.require(spark, name)
        return spark.read.format("delta").load(self.path(name))


def live_catalog(catalog: DataFrame) -> DataFrame:
    """Catalog rows that go on to embed and join: every status but ``rejected``."""
    return catalog.where(F.col("status") != "rejected")


def live_embeddings(embeddings: DataFrame) -> DataFrame:
    """Embeddings of products still in the catalog (``embed.on_removed: flag`` keeps the others)."""
    return embeddings.where(F.col("removed_at").isNull())


def neighbours_counts(neighbours: DataFrame) -> dict[str, int]:
    """``rows`` and ``with_neighbours`` (rows whose list is not empty) of a neighbours table, one pass."""
    row = neighbours.agg(F.count("*").alias("rows"),
                         F.sum(F.when(F.size("neighbours") > 0, 1).otherwise(0)).alias("with_neighbours")).first()
    return {"rows": int(row["rows"] or 0), "with_neighbours": int(row["with_neighbours"] or 0)}
