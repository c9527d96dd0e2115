"""spark-submit entry point: the search stage only.

    spark-submit [cluster options] jobs/search.py --output DIR --queries PATH [--k N] [--conf FILE] [--set K=V]...

Takes the same arguments as ``prodsim search``; under spark-submit the session comes from
``getOrCreate()``, so the cluster's settings win.
"""
import sys

from prodsim_spark.cli import main

if __name__ == "__main__":
    sys.exit(main(["search", *sys.argv[1:]]))
