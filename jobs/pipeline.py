"""spark-submit entry point: every stage on a catalog.

    spark-submit [cluster options] jobs/pipeline.py --catalog PATH --output DIR [--conf FILE] [--set K=V]...

Takes the same arguments as ``prodsim run``; the session comes from ``getOrCreate()`` under
spark-submit, so the cluster's settings win.
"""
import sys

from prodsim_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
