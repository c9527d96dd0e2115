# Databricks notebook source
# MAGIC %md
# MAGIC # prodsim-spark: end to end
# MAGIC Validate a catalog, embed it (incrementally), find each product's K most similar products,
# MAGIC evaluate against labelled pairs when there are some, and look at a few results.
# MAGIC Every step calls the library (`prodsim_spark`); install it on the cluster first
# MAGIC (`%pip install /dbfs/.../prodsim_spark-*.whl`, or a cluster library).

# COMMAND ----------

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)) if "__file__" in globals() else os.getcwd())
try:
    from _widgets import widgets
except ImportError:  # on Databricks the helper may not be beside the notebook
    def widgets():
        return dbutils.widgets  # noqa: F821

w = widgets()
w.text("catalog", "data/sample/catalog.csv", "Catalog (file or folder)")
w.text("output", "out/notebook", "Output folder for the Delta tables")
w.text("pairs", "", "Labelled pairs CSV (optional)")
w.text("k", "10", "Neighbours per product")
w.text("fine_tune_pairs", "64", "Fine-tune the text encoder on at most this many labelled pairs (0: skip)")

# COMMAND ----------

from prodsim_spark import evaluate, io, pipeline
from prodsim_spark.config import load_config
from prodsim_spark.progress import setup_logging
from prodsim_spark.session import get_session
from prodsim_spark.tables import CATALOG, NEIGHBOURS, RunTables

setup_logging("INFO")
config = load_config(overrides=[f"join.k={int(w.get('k'))}"])
spark = get_session(config.spark)  # on Databricks: the cluster's session, unchanged
catalog_path = w.get("catalog")
tables = RunTables.at(w.get("output"))  # the run's folder and table paths (local paths made absolute)
output = tables.output

# COMMAND ----------

# MAGIC %md ## 1. Ingest: every row kept, with a status and reason

# COMMAND ----------

result = pipeline.run_ingest(spark, catalog_path, output, config)
print(result.status, result.reasons)
catalog = tables.read(spark, CATALOG)
catalog.groupBy("status").count().show()

# COMMAND ----------

# MAGIC %md ## 2. Embed (only new or changed products) and 3. neighbours

# COMMAND ----------

pipeline.run_embed(spark, output, config, result)
pipeline.run_join(spark, output, config, result)
print(result.embed, result.join)
neighbours = tables.read(spark, NEIGHBOURS)
assert neighbours.count() == catalog.count(), "every catalog row has a neighbours row"

# COMMAND ----------

# MAGIC %md ## 4. Evaluate (when labelled pairs are given)

# COMMAND ----------

pairs = io.read_pairs(spark, w.get("pairs")) if w.get("pairs") else None
if pairs is not None:
    print(evaluate.markdown_table({"neighbours": evaluate.metrics(neighbours, pairs, cutoffs=config.evaluate.cutoffs)}))

# COMMAND ----------

# MAGIC %md ## 5. Fine-tune the text encoder on the labelled matches (when there are some)
# MAGIC Contrastive training on the pairs, with hard negatives from the neighbour lists above, through
# MAGIC Spark's TorchDistributor. The new model folder changes the text encoder id, so the embed stage
# MAGIC re-encodes every text (and no image); the join then uses the new vectors. One epoch on a few
# MAGIC pairs here, for a quick look: `prodsim bench fine-tune` measures the real gain.

# COMMAND ----------

from prodsim_spark import finetune
from prodsim_spark.config import with_overrides

if pairs is not None and int(w.get("fine_tune_pairs")) > 0:
    tune = with_overrides(config, ["finetune.text.epochs=1", f"finetune.text.max_pairs={int(w.get('fine_tune_pairs'))}"])
    rows, not_found = finetune.text_training_rows(catalog, pairs, neighbours, tune)
    # a folder every executor reads: beside a local run's tables, or on the workspace's FUSE mount
    model_dir = f"{output}/models/text" if io.local_path(output) else "/dbfs/prodsim/models/text"
    trained = finetune.fine_tune(spark, "text", rows, not_found, tune, model_dir)
    print({k: trained[k] for k in ("model_dir", "pairs", "loss_per_epoch", "train_s", "set")})
    config = with_overrides(config, trained["set"])
    pipeline.run_embed(spark, output, config, result)
    pipeline.run_join(spark, output, config, result)
    assert result.embed["image_encoded"] == 0 and result.embed["text_encoded"] > 0, result.embed
    neighbours = tables.read(spark, NEIGHBOURS)
    print(evaluate.markdown_table({"neighbours, fine-tuned text": evaluate.metrics(
        neighbours, pairs, cutoffs=config.evaluate.cutoffs)}))

# COMMAND ----------

# MAGIC %md ## 6. A look at the results

# COMMAND ----------

from pyspark.sql import functions as F

titles = catalog.select("product_id", "title")
view = (neighbours.where(F.size("neighbours") > 0).orderBy("source_row").limit(5)
        .select("product_id", F.posexplode("neighbours").alias("rank", "n"))
        .select("product_id", "rank", F.col("n.product_id").alias("neighbour"), F.round("n.score", 3).alias("score"))
        .join(titles, "product_id")
        .join(titles.withColumnRenamed("product_id", "neighbour").withColumnRenamed("title", "neighbour_title"),
              "neighbour"))
rows = view.orderBy("product_id", "rank").collect()
for r in rows[:15]:
    print(f"{r['product_id']:<8} {str(r['title'])[:30]:<30} #{r['rank'] + 1} {r['score']:.3f} {str(r['neighbour_title'])[:30]}")
assert rows, "some products have neighbours"

# COMMAND ----------

# MAGIC %md ## 7. The report: sampled products beside their neighbours, thumbnails and score bars
# MAGIC The same page as `prodsim report`; on Databricks it is shown inline, elsewhere written next to the tables.

# COMMAND ----------

from prodsim_spark import report

data = report.collect_report(catalog, neighbours, output=output, sample=10, pairs=pairs)
page = report.render_html(data)
try:
    displayHTML(page)  # noqa: F821 (Databricks)
except NameError:
    if io.local_path(output) is not None:  # a local run; remote folders are Databricks' (displayHTML above)
        report.write_html(page, tables.report_html)
        print(f"report: {tables.report_html}")
assert len(data.samples) == min(10, data.with_neighbours)
