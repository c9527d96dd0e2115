"""spark-submit entry point: the ingest stage only.

    spark-submit [cluster options] jobs/ingest.py --catalog PATH --output DIR [--conf FILE] [--set K=V]...

Takes the same arguments as ``prodsim ingest``; under spark-submit the session comes from
``getOrCreate()``, so the cluster's settings win.
"""
import sys

from prodsim_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["ingest", *sys.argv[1:]]))
