# Databricks notebook source
# MAGIC %md
# MAGIC # prodsim-spark: explore one product's neighbours
# MAGIC Reads a finished run's tables (`<output>/catalog`, `<output>/neighbours`) and shows one product's
# MAGIC neighbours with the score broken down by component (the parts add up to the score).

# COMMAND ----------

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd())
try:
    from _widgets import widgets
except ImportError:
    def widgets():
        return dbutils.widgets  # noqa: F821

w = widgets()
w.text("output", "out/notebook", "A run's output folder")
w.text("product_id", "", "Product to look at (empty: the first with neighbours)")
w.text("query", "golden delicious apple", "A shopper's query, for the search cell")
w.text("set", "", "KEY=VALUE overrides the run was made with, separated by ';' (e.g. a fine-tuned embed.text.model)")

# COMMAND ----------

from pyspark.sql import functions as F

from prodsim_spark import fusion
from prodsim_spark.config import load_config
from prodsim_spark.session import get_session
from prodsim_spark.tables import CATALOG, NEIGHBOURS, RunTables

# the run's config: the search cell must embed queries as the run embedded its products (the index
# refuses another encoder, naming both)
config = load_config(overrides=[item.strip() for item in w.get("set").split(";") if item.strip()])
spark = get_session(config.spark)
tables = RunTables.at(w.get("output"))  # the run's folder and table paths (local paths made absolute)
catalog = tables.read(spark, CATALOG)
neighbours = tables.read(spark, NEIGHBOURS)
product_id = w.get("product_id") or (
    neighbours.where(F.size("neighbours") > 0).orderBy("source_row").first()["product_id"])

# COMMAND ----------

# MAGIC %md ## The product and its neighbours, score by component

# COMMAND ----------

row = neighbours.where(F.col("product_id") == product_id).first()
assert row is not None, f"{product_id} is not in {tables.neighbours}"
info = {r["product_id"]: r for r in catalog.select("product_id", "title", "brand", "price").collect()}
me = info.get(product_id)
print(f"{product_id}: {me['title'] if me else ''}  status={row['status']} reason={row['reason']}")
breakdown = []
for nb in row["neighbours"]:
    parts = {c: round(nb[c], 3) for c in fusion.PARTS}
    other = info.get(nb["product_id"])
    breakdown.append({"neighbour": nb["product_id"], "title": other["title"] if other else None,
                      "score": round(nb["score"], 3), **parts})
    assert abs(sum(parts.values()) - nb["score"]) < 0.01  # the parts add up to the score
import pandas as pd

table = pd.DataFrame(breakdown)
print(table.to_string(index=False))

# COMMAND ----------

# MAGIC %md ## Who lists this product among their neighbours?

# COMMAND ----------

reverse = (neighbours.select("product_id", F.explode("neighbours").alias("n"))
           .where(F.col("n.product_id") == product_id).select("product_id", F.round("n.score", 3).alias("score"))
           .orderBy(F.desc("score")))
reverse.show(10, truncate=False)

# COMMAND ----------

# MAGIC %md ## Search the catalog: a shopper's query, answered from the run's index
# MAGIC `Searcher.load` reads the index and every product's vectors once; each `search` then takes
# MAGIC milliseconds (text, image path or PIL image, or both; optional category and price filters).
# MAGIC The score's parts (text, image, lexical) add up to the score.

# COMMAND ----------

from prodsim_spark.search import Searcher

searcher = Searcher.load(spark, tables.output, config)
answer = searcher.search(text=w.get("query"), k=5)
print(answer.to_string(index=False))
assert len(answer) > 0 and (abs(answer[["text", "image", "lexical"]].sum(axis=1) - answer["score"]) < 1e-4).all()
