"""prodsim-spark: catalog-scale product similarity on Spark.

Stages (each takes DataFrames and a typed config section, returns DataFrames):

* :func:`prodsim_spark.ingest.validate_catalog`: canonical schema, status and reason for every row.

Glue: :func:`prodsim_spark.session.get_session`, :func:`prodsim_spark.pipeline.run_pipeline`,
:func:`prodsim_spark.config.load_config`.
"""
__version__ = "0.1.0"
